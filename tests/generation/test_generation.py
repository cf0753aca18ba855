"""Generation (megatron_ext/generation, generate_gpt.py) against independent references.

- The KV cache (megatron-core's StaticInferenceContext through our core attention) against
  recomputing the whole prefix each step with plain causal attention: same tokens, close logits.
- ``generate_gpt.py`` under torchrun at TP=2 on a converted HF Llama against ``transformers``'
  ``generate(do_sample=False)``.
- Sampling: top-k 1 is the argmax; draws stay inside the top-k / nucleus computed directly;
  padded vocabulary rows are never chosen, even when their logits are the largest.
- Stopping at a stop token; ``--eval-prompts`` answers in a training run's log.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from megatron_ext.generation.sampling import SamplingParams, sample
from tests.checkpoint.conftest import make_hf_model, make_tokenizer_json, run_convert
from tests.launcher import launch, torchrun

TIMEOUT_S = 300
VOCAB = 100  # NullTokenizer --vocab-size 99: 99 ids + EOD, padded to 128 rows

MODEL_ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 "
    f"--hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB - 1} "
    "--make-vocab-size-divisible-by 64 --attention-backend sdpa --seq-length 64 "
    "--init-method-std 0.2"
).split()


def _cache_vs_recompute():
    from megatron_ext import platform
    from megatron_ext.config import parse_args
    from megatron_ext.generation.generator import Generator
    from megatron_ext.model.gpt import build_model
    from megatron_ext.parallel import ParallelTopology

    config = parse_args(MODEL_ARGS, world_size=1)
    topology = ParallelTopology.from_config(config.parallel, 1)
    topology.initialize("gloo")
    platform.manual_seed(3)
    model = build_model(config, VOCAB).eval()
    prompt, greedy = [5, 17, 42, 8, 99 - 1], SamplingParams(top_k=1)
    cached = Generator(model, VOCAB, [], use_cache=True).generate(prompt, 12, greedy,
                                                                  keep_logits=True)
    full = Generator(model, VOCAB, [], use_cache=False).generate(prompt, 12, greedy,
                                                                 keep_logits=True)
    stop = cached.tokens[4]
    stopped = Generator(model, VOCAB, [stop]).generate(prompt, 12, greedy)
    # Padded rows 100..127 get the weights of the row chosen first, times 10: their logits
    # beat every real one, and must still never be chosen.
    with torch.no_grad():
        weight = model.output_layer.weight
        weight[VOCAB:] = 10 * weight[cached.tokens[0]]
        position = torch.arange(len(prompt)).unsqueeze(0)
        raw = model(torch.tensor([prompt]), position, None)[0, -1]
    padded = Generator(model, VOCAB, []).generate(prompt, 12, greedy)
    sampled = Generator(model, VOCAB, []).generate(
        prompt, 12, SamplingParams(top_k=0), torch.Generator().manual_seed(0))
    topology.destroy()
    return (cached, full, stop, stopped, int(raw.argmax()), padded.tokens, sampled.tokens)


def test_kv_cache_equals_recompute_stops_and_skips_padded_rows():
    cached, full, stop, stopped, raw_argmax, padded, sampled = launch(_cache_vs_recompute, 1)[0]
    assert len(set(full.tokens)) > 3, "a degenerate model would prove little"
    assert cached.tokens == full.tokens
    assert len(cached.logits) == len(full.logits) == 12
    for a, b in zip(cached.logits, full.logits):
        assert a.shape == (VOCAB,)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    first = cached.tokens.index(stop)
    assert stopped.stopped and stopped.tokens == cached.tokens[:first]
    assert not cached.stopped
    assert raw_argmax >= VOCAB, "the padded rows must hold the largest logit for this check"
    assert padded == cached.tokens  # the real rows are unchanged
    assert max(sampled) < VOCAB


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 40, generator=gen) * 3
    padded = torch.cat([logits, torch.full((256, 24), 100.0)], dim=1)
    vocab = 40
    top1 = sample(padded, vocab, SamplingParams(temperature=0.7, top_k=1, top_p=0.9), gen)
    assert torch.equal(top1, logits.argmax(-1))
    top3 = sample(padded, vocab, SamplingParams(top_k=3), gen)
    allowed = torch.topk(logits, 3, dim=-1).indices
    assert (allowed == top3.unsqueeze(-1)).any(-1).all()
    assert (top3 != logits.argmax(-1)).any()  # it does sample, not only argmax
    p = 0.6
    nucleus = sample(padded, vocab, SamplingParams(top_k=0, top_p=p), gen).numpy()
    probs = logits.softmax(-1).numpy()
    for row, token in zip(probs, nucleus):
        order = np.argsort(-row)
        before = np.concatenate([[0.0], np.cumsum(row[order])[:-1]])
        assert token in set(order[before < p])  # the smallest set reaching p
    unfiltered = sample(padded, vocab, SamplingParams(top_k=0), gen)
    assert unfiltered.max() < vocab


def test_chat_prompt_is_the_training_rendering_up_to_the_answer():
    from megatron_ext.data.instruct.pipeline import ConversationEncoder
    from megatron_ext.tokenizer import ByteTokenizer

    encoder = ConversationEncoder(ByteTokenizer(), "chatml")
    turns = [("user", "hi"), ("assistant", "hello"), ("user", "how are you?")]
    prompt = encoder.encode_prompt(turns)
    ids, mask = encoder.encode(turns + [("assistant", "fine")])
    trained = np.flatnonzero(mask)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    answer_start = int(runs[-1][0])  # the last answer's first token
    assert prompt == ids[:answer_start].tolist()


def _torchrun(nproc, script, args):
    result = torchrun(nproc, args, TIMEOUT_S, script=script)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, result.stderr


def test_generate_gpt_tp2_equals_transformers_greedy(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model(tmp_path / "hf")  # vocab 250
    run_convert("hf", "mg", hf_dir, tmp_path / "mg", "--target-tensor-parallel-size", 2)
    prompts = [[1, 2, 3, 4, 5], [200, 17, 9]]
    eod, new = 249, 12  # NullTokenizer --vocab-size 249: ids 0..248, EOD 249 (HF's EOS here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                          eos_token_id=eod, pad_token_id=0)[0, len(prompt):].tolist()
        expected.append(" ".join(str(t) for t in out if t != eod))
    args = ["--load", tmp_path / "mg", "--tokenizer-type", "NullTokenizer", "--vocab-size", eod,
            "--max-new-tokens", new]
    for prompt in prompts:
        args += ["--prompt", " ".join(map(str, prompt))]
    stdout, _ = _torchrun(2, "generate_gpt.py", args)
    assert stdout.splitlines() == expected


def test_eval_prompts_answers_at_each_evaluation(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "3 1 4 1 5"}) + "\n" + json.dumps({"prompt": "9 2 6"})
                       + "\n")
    args = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
            "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255 --mock-data "
            "--attention-dropout 0 --hidden-dropout 0 --lr 1e-3 --seed 11 --train-iters 4 "
            "--eval-interval 2 --eval-iters 1 --log-interval 2 "
            "--tensor-model-parallel-size 2 --sequence-parallel "
            "--position-embedding-type rope").split()
    stdout, stderr = _torchrun(2, "pretrain_gpt.py", args + [
        "--eval-prompts", prompts, "--save", tmp_path / "ckpt"])  # torch_dist, the default
    lines = [l for l in (stdout + stderr).splitlines() if "eval prompt" in l]
    answers = {}
    for iteration in (2, 4):
        for n, prompt in enumerate(["3 1 4 1 5", "9 2 6"]):
            hits = [l for l in lines if f"eval prompt {n} at iteration {iteration} | {prompt!r} -> "
                    in l]
            assert len(hits) == 1, lines
            answers[iteration, n] = hits[0].split(" -> ", 1)[1].strip("'")
    # The answers at iteration 4 (SP: no cache) are what generate_gpt.py writes with the
    # checkpoint saved right after (torch_dist, TP=2 without SP: KV cache), greedy.
    from megatron_ext.generation.eval_prompts import EVAL_MAX_NEW_TOKENS

    stdout, _ = _torchrun(2, "generate_gpt.py", [
        "--load", tmp_path / "ckpt", "--tokenizer-type", "NullTokenizer", "--vocab-size", 255,
        "--max-new-tokens", EVAL_MAX_NEW_TOKENS, "--prompt", "3 1 4 1 5", "--prompt", "9 2 6"])
    assert stdout.splitlines() == [answers[4, 0], answers[4, 1]]
    assert any(answers.values()), "a model that answers nothing at once would prove little"


def _train_and_save(argv):
    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=1), pretrain_gpt.forward_step, world_size=1)
    trainer.train()
    trainer.close()


def _generate(argv):
    """generate_gpt.py's stdout, or its SystemExit message."""
    import contextlib
    import io

    from megatron_ext.generation.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([str(a) for a in argv])
    except SystemExit as stopped:
        return f"exit: {stopped.code}"
    return out.getvalue()


def test_generate_takes_the_tokenizer_saved_in_the_checkpoint(tmp_path):
    """A checkpoint saves its tokenizer flags (as Megatron-LM's do): generate_gpt.py without
    any writes what it writes with them; once the tokenizer file is gone, the error names it
    and the flag that points at its new place."""
    tok = make_tokenizer_json(tmp_path / "tok" / "tokenizer.json", VOCAB)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)]
    model = " ".join(MODEL_ARGS).replace(
        f"--tokenizer-type NullTokenizer --vocab-size {VOCAB - 1}", "").split()
    launch(_train_and_save, 1, model + flags + (
        f"--lr 1e-3 --train-iters 1 --micro-batch-size 2 --global-batch-size 2 --eval-iters 0 "
        f"--ckpt-format torch --save {tmp_path / 'ckpt'} --save-interval 1").split())
    ask = ["--load", tmp_path / "ckpt", "--max-new-tokens", 8, "--prompt", "w5 w17 w42"]
    given = launch(_generate, 1, ask + flags)[0]
    assert len(set(given.split())) > 2, given  # words of the tokenizer, not a degenerate run
    assert launch(_generate, 1, ask)[0] == given
    moved = tok.parent.rename(tmp_path / "moved") / "tokenizer.json"
    error = launch(_generate, 1, ask)[0]
    assert error.startswith("exit: ") and f"--tokenizer-model {tok}, which does not exist" \
        in error and "pass --tokenizer-model PATH" in error, error
    assert launch(_generate, 1, ask + ["--tokenizer-model", moved])[0] == given


def test_a_converted_hf_model_carries_its_tokenizer(tmp_path):
    """convert_ckpt.py hf->mg saves the flags of the tokenizer.json beside the weights."""
    hf_dir = make_hf_model(tmp_path / "hf")  # vocab 250
    make_tokenizer_json(hf_dir / "tokenizer.json", 250)
    run_convert("hf", "mg", hf_dir, tmp_path / "mg")
    ask = ["--load", tmp_path / "mg", "--max-new-tokens", 6, "--prompt", "w1 w2 w3 w4 w5"]
    given = launch(_generate, 1, ask + ["--tokenizer-type", "HuggingFaceTokenizer",
                                        "--tokenizer-model", hf_dir])[0]
    assert given.strip() and not given.startswith("exit: "), given
    assert launch(_generate, 1, ask)[0] == given


def test_bad_load_dir_is_named(tmp_path):
    from megatron_ext.generation.cli import main

    with pytest.raises(SystemExit, match=f"--load {tmp_path}: no latest_checkpointed_iteration"):
        main(["--load", str(tmp_path), "--tokenizer-type", "ByteTokenizer", "--prompt", "hi"])
