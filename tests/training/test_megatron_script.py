"""A Megatron-LM-style launch script (tests/training/scripts/, written in the shape of
Megatron-LM's examples: flag arrays expanded unquoted, "--split '99,1,0'") runs on 2 gloo ranks
through torchrun: it trains with the sample-based schedule and batch ramp-up, evaluates, writes
a profile trace, saves, and a second launch resumes from a saved iteration and reproduces the
rest of the first run exactly.
"""

import json
import os
import shutil

import pytest

from megatron_ext.training.metrics import parse_log
from tests.launcher import free_port, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "training", "scripts", "train_tiny_llama_megatron_style.sh")
TIMEOUT_S = 400


def _launch(ckpt, tensorboard):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return run_script(["bash", SCRIPT, str(ckpt), str(tensorboard)], env, TIMEOUT_S)


def test_megatron_style_script_trains_evaluates_saves_and_resumes(tmp_path):
    ckpt, tensorboard = tmp_path / "ckpt", tmp_path / "tb"
    output = _launch(ckpt, tensorboard)
    train, valid = parse_log(output)
    # Megatron-LM's ramp-up rule by hand: start 4, +4 once 8/((8-4)/4) = 8 samples are
    # consumed, then 8; --train-samples 48 -> 3 ramp-up steps + (48 - 16) // 8 = 7 iterations.
    assert [int(r["global batch size"]) for r in train] == [4, 4, 8, 8, 8, 8, 8], output
    assert [int(r["consumed samples"]) for r in train] == [4, 8, 16, 24, 32, 40, 48]
    assert {r["iterations"] for r in train} == {"7"}
    for record in train:
        assert "throughput per GPU (TFLOP/s/GPU)" in record  # --log-throughput
        assert int(record["number of skipped iterations"]) == 0
    losses = [float(r["lm loss"]) for r in train]
    assert losses[-1] < losses[0]
    # Warmup over 8 samples: after the first 4, half the peak.
    assert float(train[0]["learning rate"]) == pytest.approx(0.0015 / 2)
    assert [(v["iteration"], v["split"], v["final"]) for v in valid] == [
        ("3", "validation", False), ("6", "validation", False), ("7", "validation", True),
        ("7", "test", True)]
    # Accepted-but-adapted flags are said once (rank 0), not once per rank.
    for notice in ("--sequence-parallel with --tensor-model-parallel-size 1: disabled",
                   "--attention-backend fused (Megatron-LM's name) runs as our "
                   "--attention-backend auto",
                   "--use-mcore-models: no effect",
                   "--no-create-attention-mask-in-dataloader: no effect"):
        assert output.count(notice) == 1, (notice, output[-3000:])
    # --profile-ranks 1: one trace, rank 1's (of the 2 ranks; rank 0 alone before the flag).
    traces = [f for f in os.listdir(tensorboard) if f.endswith(".pt.trace.json")]
    assert len(traces) == 1, os.listdir(tensorboard)
    with open(os.path.join(tensorboard, traces[0])) as f:
        assert json.load(f)["distributedInfo"]["rank"] == 1
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "iter_0000006", "iter_0000007",
                                        "latest_checkpointed_iteration.txt"]

    # Resume from iteration 3 with the same script: iterations 4-7 as in the first run.
    resume = tmp_path / "resume"
    resume.mkdir()
    shutil.copytree(ckpt / "iter_0000003", resume / "iter_0000003")
    (resume / "latest_checkpointed_iteration.txt").write_text("3")
    resumed, resumed_valid = parse_log(_launch(resume, tmp_path / "tb2"))
    assert [r["iteration"] for r in resumed] == ["4", "5", "6", "7"]
    for first, second in zip(train[3:], resumed):
        for name in ("lm loss", "consumed samples", "global batch size", "learning rate",
                     "grad norm"):
            assert first[name] == second[name], (name, first, second)
    assert [(v["iteration"], v["split"], v["final"]) for v in resumed_valid] == [
        ("6", "validation", False), ("7", "validation", True), ("7", "test", True)]
    # The validation position is in the checkpoint: the resumed evaluations see the batches the
    # uninterrupted run saw.
    assert [v["lm loss value"] for v in resumed_valid] == [v["lm loss value"] for v in valid[1:]]
