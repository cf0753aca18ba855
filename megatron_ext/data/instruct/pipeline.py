"""Instruction (fine-tuning) data: record -> conversation turns -> token ids + loss mask.

    python preprocess_data.py --input chats.jsonl --output-prefix out/sft \\
        --handler-name SharegptStyleInstructionHandler --prompt-type chatml \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ \\
        --pack --seq-length 2048 --workers 4

writes ``out/sft_input_ids_document`` and ``out/sft_loss_mask_document`` (uint8), two
Megatron indexed datasets with the same sequences and documents (docs/finetune.md):
- with ``--pack``: one document per packed sample of exactly ``seq_length + 1`` tokens (a
  training sample's inputs and its shifted labels, as Megatron's GPTDataset), one sequence per
  conversation, and the padding, when there is any, as a last sequence of its own (mask 0);
- without: one document of one sequence per conversation.
and ``out/sft_task_ids_document`` + ``out/sft_tasks.json``, each token's task (MFTCoder's
``data_name``; ``megatron_ext.data.instruct.tasks``).
The mask is 1 on the tokens of every assistant turn and its end token, 0 elsewhere; a
conversation's first token is never trained on, so the label that crosses from one packed
conversation to the next is always masked.

Records become turns in ``megatron_ext.data.instruct.handlers`` (``--handler-name``, ``--map-keys``);
here turns become ids and mask with a chat template. The main process packs
(``megatron_ext.data.instruct.packing``), in input order, so the output does not depend on
``--workers``. Reading, workers, ordering, skips and progress are preprocess_data.py's
(``megatron_ext.data.preprocess``).
"""

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.data import preprocess as _pre
from megatron_ext.data.instruct.handlers import build_handler
from megatron_ext.data.indexed import IndexedDatasetWriter, as_token_array, best_dtype
from megatron_ext.data.inputs import InputError, expand_inputs, file_format
from megatron_ext.data.outputs import prepare_output_dir
from megatron_ext.data.readers import json_records, read_chunks
from megatron_ext.data.shard_meta import TOOL
from megatron_ext.data.instruct.packing import Packer
from megatron_ext.data.instruct.tasks import (TASK_DTYPE, TaskTable, record_task, task_ids_prefix,
                                              write_tasks)
from megatron_ext.data.instruct.templates import HF_PROMPT_TYPE, Special, Template, Turn, get_template
from megatron_ext.tokenizer import build_tokenizer

INPUT_IDS_KEY = "input_ids"
LOSS_MASK_KEY = "loss_mask"
MASK_DTYPE = np.uint8
OVERLONG = ("drop", "truncate")


def output_prefixes(output_prefix: str) -> Tuple[str, str]:
    """(token ids, loss mask) dataset prefixes for ``--output-prefix`` / ``--data-path``."""
    return (f"{output_prefix}_{INPUT_IDS_KEY}_document",
            f"{output_prefix}_{LOSS_MASK_KEY}_document")


# --------------------------------------------------------------------------------- encoding


class ConversationEncoder:
    """turns -> (ids int64, mask uint8) with a template from templates.json or, for
    ``--prompt-type hf``, the tokenizer's own ``chat_template``."""

    def __init__(self, tokenizer, prompt_type: str):
        self.tokenizer = tokenizer
        self.prompt_type = prompt_type
        if prompt_type == HF_PROMPT_TYPE:
            hf = tokenizer.hf_tokenizer
            if hf is None:
                raise ValueError(f"--prompt-type hf uses the HF tokenizer's chat_template; "
                                 f"{type(tokenizer).__name__} has none (use "
                                 "--tokenizer-type HuggingFaceTokenizer or a template name)")
            if not getattr(hf, "chat_template", None):
                raise ValueError("--prompt-type hf: the tokenizer has no chat_template "
                                 "(tokenizer_config.json); pick a --prompt-type template")
            if not getattr(hf, "is_fast", False):
                raise ValueError("--prompt-type hf needs a fast tokenizer (token offsets)")
            self.hf, self.template = hf, None
            return
        self.template: Template = get_template(prompt_type)
        self.specials = {"eos": tokenizer.eos, "bos": tokenizer.bos}
        for name in self.template.specials:
            if self.specials[name] is None:
                raise ValueError(f"--prompt-type {prompt_type} uses {{{name}}}, but "
                                 f"{type(tokenizer).__name__} has no {name.upper()} token")
        # Templates place BOS/EOS themselves: no BOS per text run (Llama2Tokenizer, Llama-3).
        self._encode_text = tokenizer.tokenize_without_special_tokens

    def encode(self, turns: Sequence[Turn]) -> Tuple[np.ndarray, np.ndarray]:
        if self.template is None:
            ids, mask = self._encode_hf(turns)
        else:
            ids, mask = self._encode_template(turns)
        ids, mask = np.asarray(ids, np.int64), np.asarray(mask, MASK_DTYPE)
        if ids.size < 2 or not mask[1:].any():
            raise ValueError("no assistant token left to train on after tokenization")
        if mask[0]:
            raise ValueError(f"--prompt-type {self.prompt_type} trains on a conversation's first "
                             "token; a template must start with an untrained prompt")
        return ids, mask

    def encode_prompt(self, turns: Sequence[Turn]) -> List[int]:
        """The ids a model continues to answer: a conversation ending with a user turn,
        rendered up to and including the assistant's prefix (generation, not training)."""
        if not turns or turns[-1][0] != "user":
            raise ValueError("a prompt conversation ends with a user turn")
        if self.template is None:
            messages = [{"role": role, "content": content} for role, content in turns]
            text = self._render_hf(messages, add_generation_prompt=True)
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        return [int(i) for i in self._encode_template(turns)[0]]

    def stop_texts(self, stops: Sequence[str] = ()) -> List[str]:
        """The texts that end an answer: the template's stop text and ``stops`` (a request's)."""
        return [s for s in (self.template.stop if self.template is not None else None, *stops)
                if s]

    def reply(self, new_ids: Sequence[int], stops: Sequence[str] = ()) -> Tuple[str, int, bool]:
        """(text, tokens kept, stopped) of generated ids as an assistant's answer: cut before
        the first of the template's stop text and ``stops`` (a request's)."""
        text = self.tokenizer.detokenize(list(new_ids))
        stops = self.stop_texts(stops)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut < 0:
            return text, len(new_ids), False
        kept = next(i for i in range(len(new_ids) + 1)
                    if len(self.tokenizer.detokenize(list(new_ids[:i + 1]))) > cut)
        return text[:cut], kept, True

    def _encode_template(self, turns):
        ids, mask = [], []
        run, run_trained = [], False

        def flush():
            if run:
                encoded = self._encode_text("".join(run))
                ids.extend(encoded)
                mask.extend([int(run_trained)] * len(encoded))
                run.clear()

        # Text is tokenized in runs of the same mask: the boundary between prompt and answer
        # is a tokenization boundary, so the mask is exact.
        for piece, trained in self.template.render(turns):
            if isinstance(piece, Special):
                flush()
                ids.append(self.specials[piece.name])
                mask.append(int(trained))
                continue
            if trained != run_trained:
                flush()
                run_trained = trained
            run.append(piece)
        flush()
        return ids, mask

    def _render_hf(self, messages, **kwargs) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:  # jinja2 errors: raise_exception() in templates, bad roles
            raise ValueError(f"chat_template failed: {type(e).__name__}: {e}") from None

    def _encode_hf(self, turns):
        """The whole conversation rendered and tokenized as ``apply_chat_template`` does; the
        characters an assistant message adds to the rendering (after the generation prompt)
        are trained on: a token is trained when it starts inside them."""
        messages = [{"role": role, "content": content} for role, content in turns]
        full = self._render_hf(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render_hf(messages[:i], add_generation_prompt=True)
            through = self._render_hf(messages[:i + 1])
            if not (full.startswith(before) and full.startswith(through)
                    and through.startswith(before)):
                raise ValueError(
                    "the chat_template does not render a conversation as its prefixes "
                    f"(at message {i}), so assistant tokens cannot be located; use a "
                    "--prompt-type from templates.json")
            spans.append((len(before), len(through)))
        encoding = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([start for start, _ in encoding["offset_mapping"]], np.int64)
        mask = np.zeros(len(starts), MASK_DTYPE)
        for begin, end in spans:
            mask[(starts >= begin) & (starts < end)] = 1
        return encoding["input_ids"], mask


# -------------------------------------------------------------------------- worker (chunks)

_STATE = {}


def _init_worker(tokenizer_args: tuple, handler_name: str, map_keys, prompt_type: str,
                 skip_invalid: bool, single_threaded: bool) -> None:
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(*tokenizer_args)
    _STATE.update(handler=build_handler(handler_name, map_keys),
                  encoder=ConversationEncoder(tokenizer, prompt_type), skip_invalid=skip_invalid)


def encode_chunk(chunk) -> "_pre._ChunkResult":
    """Records of one chunk (in a worker) -> conversations: arrays [(ids, lengths), (mask,
    lengths), (task names, lengths)], one entry per conversation."""
    handler, encoder, skip = _STATE["handler"], _STATE["encoder"], _STATE["skip_invalid"]
    ids, masks, tasks, skips = [], [], [], []
    read = skipped = 0
    for where, record in json_records(chunk):
        read += 1
        try:
            if isinstance(record, ValueError):
                raise record
            task = record_task(record)
            conversation_ids, mask = encoder.encode(handler.turns(record))
        except ValueError as e:
            if not skip:
                return _pre._ChunkResult(read, skipped, chunk.nbytes, f"{where}: {e}", [], [])
            skipped += 1
            skips.append(f"{where}: {e}")
            continue
        ids.append(conversation_ids)
        masks.append(mask)
        tasks.append(task)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    flat_mask = np.concatenate(masks) if masks else np.zeros(0, MASK_DTYPE)
    return _pre._ChunkResult(read, skipped, chunk.nbytes, None,
                             [(flat_ids, lengths), (flat_mask, lengths), (tasks, lengths)],
                             [0, 0, 0],
                             skips[:_pre.SHOWN_SKIPS])


# ------------------------------------------------------------------------------ main process


@dataclass
class InstructionSummary(_pre.Summary):
    conversations: int = 0  # written
    samples: int = 0  # documents written: packed samples, or conversations
    trained: int = 0  # tokens with mask 1
    padding: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    capacity: Optional[int] = None  # seq_length + 1 when --seq-length is given
    packed: bool = False
    tasks: dict = field(default_factory=dict)  # conversations written per task name


    def report(self) -> str:
        tokens = sum(self.tokens.values())
        parts = [f"done: {self.read} records read, {self.skipped} skipped, "
                 f"{self.conversations} conversations written"]
        if self.packed:
            fill = 100.0 * (1 - self.padding / max(tokens, 1))
            parts.append(f"as {self.samples} packed samples of {self.capacity} tokens "
                         f"({self.padding} padding tokens, {fill:.1f}% filled)")
        if self.capacity is not None:
            parts.append(f"overlong (> {self.capacity} tokens = --seq-length + 1): "
                         f"{self.dropped_overlong} dropped, {self.truncated} truncated")
        if set(self.tasks) - {""}:
            parts.append("conversations per task (data_name): " + ", ".join(
                f"{name or '(none)'} {count}" for name, count in self.tasks.items()))
        parts.append(f"{tokens} tokens, {self.trained} trained on; {self.bytes / 1e6:.2f} MB "
                     f"in {self.seconds:.2f} s ({self.rates()})")
        return "; ".join(parts) + self.ignored_line()


def _check_inputs(files: Sequence[str]) -> None:
    for path in files:
        if file_format(path) not in ("jsonl", "json"):
            raise InputError(f"--input {path}: instruction data is read from .jsonl, .ndjson "
                             "or .json (optionally compressed) files")


def preprocess_instructions(
    inputs: Sequence[str], output_prefix: str, tokenizer_type: str,
    tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
    handler_name: str = "AlpacaStyleInstructionHandler", prompt_type: str = "chatml",
    map_keys=None, pack: bool = False, seq_length: Optional[int] = None,
    overlong: str = "drop", workers: int = 1, log_interval: int = 10000,
    skip_invalid: bool = False, log=None, tokenizer_options=None,
) -> InstructionSummary:
    """Tokenize instruction records into ``{prefix}_input_ids_document`` and
    ``{prefix}_loss_mask_document``. Configuration errors are ValueErrors naming the flag,
    raised before any file is created; bad records are InputErrors naming file and line."""
    start = time.perf_counter()
    log = log or sys.stderr
    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size, tokenizer_options)
    tokenizer = build_tokenizer(*tokenizer_args)
    build_handler(handler_name, map_keys)  # flag errors now, not in a worker
    ConversationEncoder(tokenizer, prompt_type)
    if overlong not in OVERLONG:
        raise ValueError(f"--overlong {overlong!r}: choose one of {', '.join(OVERLONG)}")
    if pack and seq_length is None:
        raise ValueError("--pack needs --seq-length (the training --seq-length)")
    if seq_length is not None and seq_length < 1:
        raise ValueError("--seq-length must be >= 1")
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    found = expand_inputs(inputs)
    files = found.files
    _check_inputs(files)
    dtype = best_dtype(tokenizer.vocab_size)
    prepare_output_dir(output_prefix)

    capacity = None if seq_length is None else seq_length + 1
    summary = InstructionSummary(tokens={INPUT_IDS_KEY: 0}, empty={INPUT_IDS_KEY: 0},
                                 capacity=capacity, packed=pack, ignored=found.ignored_report())
    pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
    packer = Packer(capacity, pad_id) if pack else None
    # Task ids in order of first appearance in the input: the same for any --workers.
    table = TaskTable()
    init_args = (tokenizer_args, handler_name, map_keys, prompt_type, skip_invalid, workers > 1)
    with ExitStack() as stack:
        ids_prefix, mask_prefix = output_prefixes(output_prefix)
        ids_writer = stack.enter_context(IndexedDatasetWriter(ids_prefix, dtype, log))
        mask_writer = stack.enter_context(IndexedDatasetWriter(mask_prefix, MASK_DTYPE, log))
        task_writer = stack.enter_context(
            IndexedDatasetWriter(task_ids_prefix(output_prefix), TASK_DTYPE, log))

        def write(ids, mask, task, lengths=None):
            ids_writer.add_document(as_token_array(ids, dtype, ids_prefix), lengths)
            mask_writer.add_document(mask, lengths)
            task_writer.add_document(task, lengths)
            summary.samples += 1
            summary.tokens[INPUT_IDS_KEY] += ids.size
            summary.trained += int(np.count_nonzero(mask))

        def write_packed(samples):
            for ids, mask, task, lengths, padding in samples:
                write(ids, mask, task, lengths)
                summary.padding += padding

        chunks = (chunk for path in files for chunk in read_chunks(path, ()))
        results = _pre._encoded(chunks, workers, init_args, stack, init=_init_worker,
                                encode=encode_chunk)
        for result in _pre.checked(results, summary, start, log, log_interval):
            (flat_ids, lengths), (flat_mask, _), (names, _) = result.arrays
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for begin, end, name in zip(offsets[:-1], offsets[1:], names):
                ids, mask = flat_ids[begin:end], flat_mask[begin:end]
                if capacity is not None and ids.size > capacity:
                    if overlong == "drop" or not mask[1:capacity].any():
                        summary.dropped_overlong += 1
                        continue
                    ids, mask = ids[:capacity], mask[:capacity]
                    summary.truncated += 1
                summary.conversations += 1
                summary.tasks[name] = summary.tasks.get(name, 0) + 1
                task = np.full(ids.size, table.id(name), TASK_DTYPE)
                if packer is None:
                    write(ids, mask, task)
                else:
                    write_packed(packer.add(ids, mask, task))
        if packer is not None:
            write_packed(packer.flush())
        _pre.check_not_empty(inputs, summary.tokens[INPUT_IDS_KEY],
                             f"{summary.read} records read, {summary.skipped} skipped, "
                             f"{summary.dropped_overlong} dropped as overlong")
    ids_writer.write_meta(**_pre.made_with(tokenizer, tokenizer_type, tokenizer_model, False))
    # The mask is no token shard: no tokenizer, no EOD; its largest value is 1 (its counts and
    # sizes still tell whether it belongs to the ids shard beside it).
    mask_writer.write_meta(eod_appended=False, tool=TOOL)
    task_writer.write_meta(eod_appended=False, tool=TOOL)
    write_tasks(output_prefix, table.names, [summary.tasks.get(n, 0) for n in table.names])
    summary.seconds = time.perf_counter() - start
    return summary
