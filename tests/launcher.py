"""Run a function on N gloo ranks in forked processes and collect what each rank returns; or
run an entry script under torchrun as a user does and read its log.

Forking keeps torch and megatron-core imported once (the parent's), which is most of a rank's
start-up on a 2-core machine. Each rank gets torchrun's environment variables, so library code
initializes exactly as under torchrun.
"""

import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        # Plain pickle: tensors travel as bytes, not as shared memory owned by an exiting process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including SystemExit from arg checks
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """``[fn(*args) on rank r for r in range(world_size)]``; raises if any rank fails."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        # Not daemonic: megatron-core's torch_dist writer forks its own writer processes, which
        # a daemonic process may not do. Ranks still left at the end are killed below.
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [results[rank] for rank in range(world_size)]


def torchrun(nproc, args, timeout, launcher_flags=(), script="pretrain_gpt.py"):
    """``python -m torch.distributed.run --nproc-per-node nproc script args``, output captured;
    a run past ``timeout`` s is killed with its workers and fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *launcher_flags,
           os.path.join(ROOT, script)] + [str(a) for a in args]
    returncode, stdout, stderr = _run_killed_on_hang(cmd, env, timeout, subprocess.PIPE)
    return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)


def _run_killed_on_hang(cmd, env, timeout, stderr):
    """(returncode, stdout, stderr) of ``cmd`` in its own process group, so that on a hang
    (past ``timeout`` s) it is killed with all its workers and the test fails."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd[0]} {cmd[1]} ... did not finish in {timeout} s (hang?)\n"
                    f"{stdout[-3000:]}\n{(stderr or '')[-2000:]}")
    return proc.returncode, stdout, stderr


def run_script(argv, env, timeout) -> str:
    """A shell script as a user runs it (``argv``: ``["bash", script, ...]``), stdout and stderr
    together; it must succeed, and one past ``timeout`` s is killed with its workers."""
    returncode, output, _ = _run_killed_on_hang(argv, env, timeout, subprocess.STDOUT)
    assert returncode == 0, output[-5000:]
    return output


def iteration_records(stdout: str, train_iters: int) -> list:
    """[(iteration, {field: text})] of a run's iteration lines (``metrics.parse_log``, the one
    parser of Megatron-LM's log format)."""
    from megatron_ext.training.metrics import parse_log

    return [(int(r["iteration"]), r) for r in parse_log(stdout)[0]
            if int(r["iterations"]) == train_iters]


def pretrain_records(argv) -> tuple:
    """``pretrain_gpt.py argv`` on this rank (run it with ``launch``): the (iteration,
    validation) records of its log as ``metrics.parse_log`` reads them, the last rank's (the
    others log none). The code of a torchrun run without its cost: a fork per rank, not a fresh
    interpreter that imports torch and megatron-core."""
    import logging

    import pretrain_gpt
    from megatron_ext.training import pretrain
    from megatron_ext.training.metrics import parse_log

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("megatron_ext").addHandler(handler)
    try:
        pretrain(pretrain_gpt.forward_step, [str(a) for a in argv])
    finally:
        logging.getLogger("megatron_ext").removeHandler(handler)
    return parse_log("\n".join(messages))


def exit_code_in_fork(target, *args, timeout: float = 300) -> int:
    """Run ``target(*args)`` in a forked process (one that may kill itself) and return its
    exit code; a process still alive after ``timeout`` is killed."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(timeout=timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode
