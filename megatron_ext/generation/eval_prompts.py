"""``--eval-prompts FILE``: what the model writes for a few prompts at each evaluation (XTuner's
``EvaluateChatHook``), logged and, with ``--tensorboard-dir``, written as TensorBoard text.

FILE holds one prompt per line, or JSONL records with a ``"prompt"`` string (a file whose first
non-blank line starts with ``{``). Blank lines are skipped. Decoding is greedy for
``EVAL_MAX_NEW_TOKENS`` tokens, stopping at EOD/EOS.
"""

import json
import logging
from typing import List

from megatron_ext.generation.generator import Generator
from megatron_ext.generation.sampling import SamplingParams

logger = logging.getLogger("megatron_ext")

EVAL_MAX_NEW_TOKENS = 32
GREEDY = SamplingParams(top_k=1)


def read_prompts(path: str) -> List[str]:
    """The prompts of ``path``; a bad file raises a ValueError naming the line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--eval-prompts {path}: cannot read it ({error})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    jsonl = bool(numbered) and numbered[0][1].lstrip().startswith("{")
    prompts = []
    for n, line in numbered:
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--eval-prompts {path}:{n}: not JSON ({error.msg}); the file is "
                             f"JSONL since its first line is") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'--eval-prompts {path}:{n}: expected {{"prompt": "..."}}')
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"--eval-prompts {path}: no prompts in it")
    return prompts


class EvalPrompts:
    def __init__(self, path: str, tokenizer, max_length=None):
        """``max_length``: the position table's size (learned absolute positions), or None."""
        self.prompts = read_prompts(path)
        self.tokenizer = tokenizer
        self.ids = []
        for n, prompt in enumerate(self.prompts, 1):
            ids = tokenizer.tokenize(prompt)
            if not ids:
                raise ValueError(f"--eval-prompts {path}: prompt {n} tokenizes to nothing")
            if max_length is not None and len(ids) + EVAL_MAX_NEW_TOKENS > max_length:
                raise ValueError(f"--eval-prompts {path}: prompt {n} has {len(ids)} tokens; with "
                                 f"{EVAL_MAX_NEW_TOKENS} new ones it exceeds "
                                 f"--max-position-embeddings {max_length}")
            self.ids.append(ids)

    def run(self, model, iteration: int, metrics) -> List[str]:
        """Every rank generates (collectives); the logging rank reports. Returns the answers."""
        generator = Generator(model, self.tokenizer.vocab_size,
                              [self.tokenizer.eod, self.tokenizer.eos])
        training = model.training
        model.eval()  # no dropout while answering
        try:
            answers = [self.tokenizer.detokenize(
                generator.generate(ids, EVAL_MAX_NEW_TOKENS, GREEDY).tokens) for ids in self.ids]
        finally:
            model.train(training)
        if metrics.enabled:
            for n, (prompt, answer) in enumerate(zip(self.prompts, answers)):
                logger.info(f"eval prompt {n} at iteration {iteration} | {prompt!r} -> {answer!r}")
                if metrics.writer:
                    metrics.writer.add_text(f"eval_prompts/{n}", f"**{prompt}** {answer}",
                                            iteration)
        return answers
