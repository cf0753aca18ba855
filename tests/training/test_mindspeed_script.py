"""A MindSpeed-LLM-style pretrain script (tests/training/scripts/, the flags of their
pretrain_llama2_13b_pack_ptd.sh as they write them, sizes and paths shrunk) runs unchanged on
2 gloo ranks through `python -m torch.distributed.launch`, on data written by a command in the
shape of their data_convert_llama2_pretrain_pack.sh: it converts the Hugging Face model in
--load at start-up (--enable-hf2mg-convert) and trains. The same script without the flags only
MindSpeed-LLM has (its fused kernels, NPU memory tricks, --use-flash-attn, --handler-name, the
start-up conversion), on convert_ckpt.py's conversion of that model, gives the same losses: the
no-ops change nothing and the start-up conversion is convert_ckpt.py's.
"""

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

import pretrain_gpt  # noqa: F401 - imported once here, not in each forked rank
from megatron_ext.data.cli import main as preprocess_main
from megatron_ext.training import pretrain  # noqa: F401 - likewise
from megatron_ext.training.metrics import parse_log
from tests.checkpoint.conftest import make_hf_model, run_convert
from tests.launcher import free_port, launch, pretrain_records, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "training", "scripts",
                      "pretrain_tiny_llama2_mindspeed_style.sh")
TIMEOUT_S = 300
# The brief's list: the flags of their script that Megatron-LM's parser did not know.
MINDSPEED_ONLY = ("--reuse-fp32-param", "--recompute-activation-function", "--use-fused-rmsnorm",
                  "--use-flash-attn", "--attention-softmax-in-fp32", "--use-fused-swiglu",
                  "--use-fused-rotary-pos-emb", "--handler-name", "--enable-hf2mg-convert",
                  "--model-type-hf", "--transformer-impl")
CACHE = "megatron_cache_tp1pp2ep1"  # the script's TP=1, PP=2


def _tokenizer(directory):
    """A character-level Hugging Face tokenizer (tokenizer.json + config), eos </s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [chr(c) for c in
                                                                     range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    return str(directory), len(vocab)


def _env(tmp_path, load, save):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
               MASTER_PORT=str(free_port()), CKPT_LOAD_DIR=str(load), CKPT_SAVE_DIR=str(save),
               DATA_PATH=str(tmp_path / "enwiki_text_document"),
               TOKENIZER_MODEL=str(tmp_path / "tokenizer"))
    env.pop("WORLD_SIZE", None)
    return env


def _launch(script, tmp_path, load, save):
    return run_script(["bash", str(script)], _env(tmp_path, load, save), TIMEOUT_S)


def test_mindspeed_style_script_runs_unchanged_and_its_no_ops_change_nothing(tmp_path):
    _, vocab = _tokenizer(tmp_path / "tokenizer")
    hf = make_hf_model(tmp_path / "llama-hf", vocab=vocab)
    corpus = tmp_path / "train.jsonl"
    with open(corpus, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 7 + 1)})
                    + "\n")
    preprocess_main(["--input", str(corpus), "--tokenizer-name-or-path",
                     str(tmp_path / "tokenizer"), "--tokenizer-type", "PretrainedFromHF",
                     "--handler-name", "GeneralPretrainHandler", "--output-prefix",
                     str(tmp_path / "enwiki"), "--json-keys", "text", "--append-eod",
                     "--workers", "1", "--log-interval", "1000"])

    output = _launch(SCRIPT, tmp_path, hf, tmp_path / "save")
    assert (hf / CACHE / "latest_checkpointed_iteration.txt").is_file()
    assert f"load {hf / CACHE};" in output, output[-3000:]  # the start-up summary
    assert output.count(f"--enable-hf2mg-convert: converted {hf} into {hf / CACHE}") == 1
    for notice in ("--reuse-fp32-param: no effect", "--recompute-activation-function: no effect",
                   "--use-fused-rmsnorm: no effect", "--use-fused-swiglu: no effect",
                   "--use-fused-rotary-pos-emb: no effect", "--handler-name: no effect",
                   "--attention-softmax-in-fp32: no effect",
                   "--use-flash-attn (MindSpeed-LLM's) runs as our --attention-backend auto"):
        assert output.count(notice) == 1, (notice, output[-3000:])

    # The reference: the script's own argv without those flags (the launch line prints it),
    # run on forked ranks, on convert_ckpt.py's conversion.
    lines = open(SCRIPT).read().splitlines(keepends=True)
    kept = [line for line in lines if not line.split() or line.split()[0] not in MINDSPEED_ONLY]
    assert len(lines) - len(kept) == len(MINDSPEED_ONLY)
    launch_line = "python -m torch.distributed.launch $DISTRIBUTED_ARGS pretrain_gpt.py \\\n"
    assert kept.count(launch_line) == 1
    printer = tmp_path / "reference_argv.sh"
    printer.write_text("".join(kept).replace(launch_line, "printf '%s\\n' \\\n"))
    converted = tmp_path / "converted"
    run_convert("hf", "mg", hf, converted, "--target-pipeline-parallel-size", 2,
                "--make-vocab-size-divisible-by", 1)
    argv = subprocess.run(["bash", str(printer)], env=_env(tmp_path, converted,
                                                            tmp_path / "save-reference"),
                          capture_output=True, text=True, check=True).stdout.split()
    assert not set(argv) & set(MINDSPEED_ONLY) and "--use-mcore-models" in argv
    expected, _ = launch(pretrain_records, 2, argv)[-1]

    train, _ = parse_log(output)
    # A converted checkpoint is iteration 1; --no-load-optim without --finetune resumes its
    # count, as in Megatron-LM: iterations 2 and 3 of --train-iters 3.
    assert [r["iteration"] for r in train] == ["2", "3"], output[-3000:]
    for ours, theirs in zip(train, expected, strict=True):
        for name in ("lm loss", "grad norm", "learning rate"):
            assert ours[name] == theirs[name], (name, ours, theirs)


def test_the_start_up_conversion_is_convert_ckpts_reused_and_fails_cleanly(tmp_path,
                                                                          one_rank_group):
    from megatron_ext.checkpoint.format import read_tracker
    from megatron_ext.config import ConfigError, parse_args
    from megatron_ext.training.hf2mg import SOURCE_RECORD, convert_hf_load
    from tests.checkpoint.conftest import hf_state_dict

    hf = make_hf_model(tmp_path / "hf")
    argv = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --tokenizer-type "
            f"NullTokenizer --vocab-size 250 --mock-data --enable-hf2mg-convert --load {hf} "
            "--model-type-hf llama2 --make-vocab-size-divisible-by 1").split()
    config = parse_args(argv)
    convert_hf_load(config)
    cache = hf / "megatron_cache_tp1pp1ep1"
    assert config.checkpoint.load == str(cache) and read_tracker(cache) == 1
    # The same files as convert_ckpt.py writes.
    by_hand = run_convert("hf", "mg", hf, tmp_path / "by-hand", "--make-vocab-size-divisible-by",
                          1, "--model-type-hf", "llama2")
    ours = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert ours == sorted([Path(SOURCE_RECORD)] + [p.relative_to(by_hand) for p in
                                                   by_hand.rglob("*") if p.is_file()])
    stamp = (cache / "latest_checkpointed_iteration.txt").stat().st_mtime_ns
    convert_hf_load(parse_args(argv))  # a second run reuses it
    assert (cache / "latest_checkpointed_iteration.txt").stat().st_mtime_ns == stamp
    assert hf_state_dict(hf)  # the Hugging Face model is left as it was

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"")
    config = parse_args([a if a != str(hf) else str(broken) for a in argv])
    with pytest.raises(ConfigError, match="--enable-hf2mg-convert: converting .*broken failed"):
        convert_hf_load(config)
    assert not (broken / "megatron_cache_tp1pp1ep1").exists()


def test_a_cache_of_another_model_is_converted_again(tmp_path, one_rank_group, caplog):
    """The cache records what it was converted from: another model copied over the files of
    --load (same config.json, other weights), or a cache without a record, is converted again,
    said in the log, and equals convert_ckpt.py's conversion of the model now there."""
    from megatron_ext.checkpoint import format as fmt
    from megatron_ext.config import parse_args
    from megatron_ext.training.hf2mg import SOURCE_RECORD, convert_hf_load

    hf = make_hf_model(tmp_path / "hf")
    argv = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --tokenizer-type "
            f"NullTokenizer --vocab-size 250 --mock-data --enable-hf2mg-convert --load {hf} "
            "--make-vocab-size-divisible-by 1").split()
    cache = hf / "megatron_cache_tp1pp1ep1"

    def converted(root):
        return fmt.load_rank_file(fmt.rank_file(root, 1, 0, 0, 1))["model"]

    def start(message):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="megatron_ext.training.hf2mg"):
            convert_hf_load(parse_args(argv))
        assert any(message in r.getMessage() for r in caplog.records), caplog.text

    start("converted")
    first = converted(cache)
    make_hf_model(hf, seed=7)  # another model copied over it: the same config.json
    start("the weight files changed (names, sizes or mtimes); converting it again")
    expected = converted(run_convert("hf", "mg", hf, tmp_path / "by-hand",
                                     "--make-vocab-size-divisible-by", 1))
    now = converted(cache)
    assert sorted(now) == sorted(expected)
    assert all(torch.equal(now[k], expected[k]) for k in now)
    assert not all(torch.equal(now[k], first[k]) for k in now)
    start("reusing the converted")
    (cache / SOURCE_RECORD).unlink()  # a cache made before caches recorded their source
    start(f"it has no {SOURCE_RECORD}")
    assert (cache / SOURCE_RECORD).is_file()
    assert [p.name for p in hf.iterdir() if p.name.startswith(".")] == []  # no staging left
