"""End to end through torchrun: ``python -m torch.distributed.run pretrain_gpt.py ...``.

A bad topology must stop every rank quickly, before any process group exists (a rank waiting
in a rendezvous for a peer that already exited would hang until the timeout); a killed launcher
must take its ranks with it. What a valid run prints: test_run_output.py.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.launcher import ROOT, free_port, torchrun as _torchrun

# A hang shows as a test failure after these, not as a stuck session. Failing on a bad flag
# takes a few seconds (two interpreters importing torch); a training run also builds the model
# and mock datasets, and a 2-core machine shared with other jobs can be several times slower.
FAIL_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255 --mock-data "
    "--attention-dropout 0 --hidden-dropout 0 --lr 1e-3 --seed 11"
).split()


def test_invalid_topology_stops_every_rank_naming_the_flag():
    # 2 ranks cannot hold TP 3. Once one worker has failed, torchrun's agent terminates the
    # others at its next check (every 0.1 s by default); checking every 5 s instead lets a rank
    # that started slower on a loaded machine reach its own argument check and exit by itself.
    result = _torchrun(2, TINY + ["--tensor-model-parallel-size", "3"], FAIL_TIMEOUT_S,
                       launcher_flags=["--monitor-interval", "5"])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Both workers write to the same stderr pipe, so their lines may interleave: look for each
    # rank's message anywhere in the output rather than at the start of a line.
    for rank in (0, 1):
        assert (f"[rank {rank}] invalid arguments: world size 2 is not divisible by "
                f"--tensor-model-parallel-size 3") in output, output
    # torchrun's failure summary lists both workers with a non-zero exit code.
    exitcodes = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                           output)
    assert sorted(int(r) for r, _ in exitcodes) == [0, 1], output
    assert all(int(code) != 0 for _, code in exitcodes), output
    assert "iteration" not in result.stdout


def _children(pid):
    """Pids of the live processes whose parent is ``pid`` (from /proc, Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def _poll(condition, deadline_s, what):
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {deadline_s} s")
        time.sleep(0.05)


def _descendants(pids):
    found = list(pids)
    for pid in pids:
        found += _descendants(_children(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.parametrize("async_save", [False, True])
def test_killed_launcher_leaves_no_rank_and_no_half_checkpoint(tmp_path, async_save):
    """kill -9 of torchrun's agent, mid-training with a save every iteration: within seconds no
    rank is alive, nor (--async-save, the agent killed while a rank's checkpoint writer runs)
    any process a rank forked, and the tracker names a complete checkpoint."""
    from megatron_ext.checkpoint import format as ckpt
    from megatron_ext.checkpoint.dist_format import is_dist_checkpoint

    save = tmp_path / "ckpt"
    log = open(tmp_path / "log.txt", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--tensor-model-parallel-size", "2",
           "--global-batch-size", "4", "--train-iters", "100000", "--log-interval", "1",
           "--eval-interval", "0", "--save", str(save), "--save-interval", "1"] + (
               ["--async-save"] if async_save else [])
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    ranks = []
    try:
        _poll(lambda: ckpt.read_tracker(save) is not None or agent.poll() is not None,
              RUN_TIMEOUT_S, "a first checkpoint")
        assert agent.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        ranks = _children(agent.pid)
        assert len(ranks) == 2, ranks
        if async_save:  # a writer the ranks forked, writing the next checkpoint
            _poll(lambda: len(_descendants(ranks)) > 2, RUN_TIMEOUT_S, "a checkpoint writer")
            ranks = _descendants(ranks)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        _poll(lambda: not any(_alive(pid) for pid in ranks), 10, "every rank and writer stopped")
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        log.close()
    # The default --ckpt-format torch_dist: the tracked directory is complete (megatron-core
    # writes metadata.json after every rank's shards; ours renames the directory after that).
    iteration = ckpt.read_tracker(save)
    assert is_dist_checkpoint(ckpt.iteration_dir(save, iteration)), iteration
