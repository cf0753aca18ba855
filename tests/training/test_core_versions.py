"""A checkpoint saved under one megatron-core release resumes under another with the same
numbers: the run saved here (this interpreter's megatron-core) continues both here and under
the interpreter in MEGATRON_EXT_OTHER_CORE_PYTHON (CI: a venv with megatron-core 0.19.2, see
.ci/run). Skipped when that variable is not set."""

import os
import re
import subprocess
import sys

import pytest

from tests.launcher import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHER = os.environ.get("MEGATRON_EXT_OTHER_CORE_PYTHON")
LOSS = re.compile(r"iteration\s+(\d+)/.*?lm loss:? ([0-9.E+-]+)")
ARGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 4 --tokenizer-type NullTokenizer "
        "--vocab-size 255 --mock-data --attention-dropout 0 --hidden-dropout 0 --lr 1e-3 "
        "--seed 5 --log-interval 1 --eval-iters 0 --tensor-model-parallel-size 2").split()


def _core_version(python):
    return subprocess.run([python, "-c", "import megatron.core as m; print(m.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _run(python, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), "pretrain_gpt.py", *ARGS, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [(int(i), float(v)) for i, v in LOSS.findall(result.stdout)]


@pytest.mark.skipif(not OTHER, reason="MEGATRON_EXT_OTHER_CORE_PYTHON is not set")
@pytest.mark.parametrize("flags", [
    "--ckpt-format torch_dist",
    "--ckpt-format torch",
    # Param groups of other rates: 0.19 matches saved ones to its own by them, 0.16-0.18 by
    # marks (megatron_ext/platform/checkpoint.py); the distributed optimizer matches them alike.
    "--ckpt-format torch_dist --decoupled-lr 5e-3",
])
def test_checkpoint_resumes_under_the_other_megatron_core(tmp_path, flags):
    here, there = _core_version(sys.executable), _core_version(OTHER)
    assert here != there, f"both interpreters have megatron-core {here}"
    fmt = flags.split()
    # Stopped at 2 of the same 4 iterations: the resumed runs follow the saved schedule.
    _run(sys.executable, *fmt, "--train-iters", "4", "--exit-interval", "2", "--save",
         str(tmp_path), "--save-interval", "2")
    resumed_here = _run(sys.executable, *fmt, "--train-iters", "4", "--load", str(tmp_path))
    resumed_there = _run(OTHER, *fmt, "--train-iters", "4", "--load", str(tmp_path))
    assert [i for i, _ in resumed_here] == [3, 4]
    assert resumed_there == resumed_here, (here, there)


@pytest.mark.skipif(not OTHER, reason="MEGATRON_EXT_OTHER_CORE_PYTHON is not set")
@pytest.mark.parametrize("flags", [
    "--ckpt-format torch_dist",
    "--ckpt-format torch_dist --use-distributed-optimizer --tensor-model-parallel-size 1",
])
def test_checkpoint_of_the_other_megatron_core_resumes_here(tmp_path, flags):
    """The other direction: megatron-core 0.19 keeps the common state (args, iteration, param
    groups) in the .distcp files, where 0.16-0.18 look for common.pt
    (megatron_ext/checkpoint/dist_format.py)."""
    fmt = flags.split()
    _run(OTHER, *fmt, "--train-iters", "4", "--exit-interval", "2", "--save", str(tmp_path),
         "--save-interval", "2")
    resumed_there = _run(OTHER, *fmt, "--train-iters", "4", "--load", str(tmp_path))
    resumed_here = _run(sys.executable, *fmt, "--train-iters", "4", "--load", str(tmp_path))
    assert [i for i, _ in resumed_there] == [3, 4]
    assert resumed_here == resumed_there, (_core_version(OTHER), _core_version(sys.executable))
