"""MindSpeed-LLM's hybrid context parallelism from one of their long-sequence scripts' shape
(tests/training/scripts/pretrain_tiny_llama2_mindspeed_hybrid_cp.sh): ``--context-parallel-algo
hybrid_cp_algo --ulysses-degree-in-cp 2`` at ``--context-parallel-size 4`` runs as our
``--cp-comm-type a2a+p2p`` (the all-to-all within pairs of adjacent CP ranks, the ring across
the two pairs) on 4 ranks through ``python -m torch.distributed.launch``, and trains what the
same script trains on one rank without CP (``CP=1 NPUS_PER_NODE=1``, run on a forked rank):
the same losses, gradient norms and validation loss, up to float32 summation order.
"""

import json
import os

import pytest

from megatron_ext.data.cli import main as preprocess_main
from megatron_ext.training.metrics import parse_log
from tests.launcher import free_port, launch, pretrain_records, run_script
from tests.training.test_mindspeed_script import _tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "training", "scripts",
                      "pretrain_tiny_llama2_mindspeed_hybrid_cp.sh")
TIMEOUT_S = 300
LAUNCH_LINE = "python -m torch.distributed.launch $DISTRIBUTED_ARGS pretrain_gpt.py \\\n"
RTOL = 1e-5  # float32 summation order gives ~1e-7; the log prints 7 digits


def _env(tmp_path, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
               MASTER_PORT=str(free_port()), CKPT_SAVE_DIR=str(tmp_path / "save"),
               DATA_PATH=str(tmp_path / "enwiki_text_document"),
               TOKENIZER_PATH=str(tmp_path / "tokenizer"))
    env.update(extra)
    env.pop("WORLD_SIZE", None)
    return env


def test_hybrid_cp_script_trains_what_one_rank_trains(tmp_path):
    _tokenizer(tmp_path / "tokenizer")
    corpus = tmp_path / "train.jsonl"
    with open(corpus, "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": f"doc {i}: " + "lorem ipsum dolor " * (i % 5 + 1)}) + "\n")
    preprocess_main(["--input", str(corpus), "--tokenizer-name-or-path",
                     str(tmp_path / "tokenizer"), "--tokenizer-type", "PretrainedFromHF",
                     "--output-prefix", str(tmp_path / "enwiki"), "--json-keys", "text",
                     "--append-eod", "--workers", "1", "--log-interval", "1000"])

    output = run_script(["bash", SCRIPT], _env(tmp_path), TIMEOUT_S)
    assert output.count("--context-parallel-algo hybrid_cp_algo: runs as --cp-comm-type "
                        "a2a+p2p") == 1, output[-3000:]
    assert "--hierarchical-context-parallel-sizes 2 2)" in output
    assert output.count("--use-cp-send-recv-overlap: no effect") == 1

    # The reference: the script's argv at CP=1 on one rank (the launch line prints it).
    script = open(SCRIPT).read()
    assert script.count(LAUNCH_LINE) == 1
    printer = tmp_path / "reference_argv.sh"
    printer.write_text(script.replace(LAUNCH_LINE, "printf '%s\\n' \\\n"))
    argv = run_script(["bash", str(printer)], _env(tmp_path, CP="1", NPUS_PER_NODE="1",
                                                   CKPT_SAVE_DIR=str(tmp_path / "save-1")),
                      TIMEOUT_S).split()
    assert argv[argv.index("--context-parallel-size") + 1] == "1"
    expected, expected_valid = launch(pretrain_records, 1, argv)[-1]

    train, valid = parse_log(output)
    assert [r["iteration"] for r in train] == ["1", "2", "3"], output[-3000:]
    for ours, theirs in zip(train, expected, strict=True):
        assert ours["learning rate"] == theirs["learning rate"]
        for name in ("lm loss", "grad norm"):
            assert float(ours[name]) == pytest.approx(float(theirs[name]), rel=RTOL), name
    assert len(valid) == len(expected_valid) > 0
    for ours, theirs in zip(valid, expected_valid, strict=True):
        assert float(ours["lm loss value"]) == pytest.approx(float(theirs["lm loss value"]),
                                                             rel=RTOL)
