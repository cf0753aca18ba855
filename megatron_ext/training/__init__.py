"""Training: the loop (``Trainer``) and the ``pretrain`` entry point used by pretrain_gpt.py."""

import ctypes
import os
import signal
import sys

from megatron_ext.config import ConfigError, UnknownFlagsError, parse_args
from megatron_ext.training import logs

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(libc) -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False where it cannot."""
    try:
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except AttributeError:
        return False


def die_with_launcher() -> None:
    """Make this rank die when the process that started it (torchrun's agent) dies, and every
    process the rank forks die with the rank.

    torch elastic starts each rank in a session of its own, so a ``kill -9`` of the agent reaches
    no rank: they would go on training and writing into ``--save`` with nobody watching. Linux
    sends a chosen signal to a process when its parent dies (``PR_SET_PDEATHSIG``); SIGKILL,
    because a rank blocked in a collective never returns to the interpreter to run a handler
    (saves stay consistent: staged, renamed into place, the tracker last). fork clears
    that setting, so it is set again in each child the rank forks: megatron-core's
    ``--async-save`` writer, orphaned mid-write, blocks forever holding its copy of the
    checkpoint in memory (its half-written directory is never published, so nothing is lost).
    It lives here, the first thing ``pretrain`` does, and not in platform/ (adaptations of
    megatron-core to CPU): it concerns the launcher, on any device. Where prctl does not exist
    (not Linux) it does nothing: the launcher's own shutdown is all there is.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    if not _die_with_parent(libc):
        return
    # The parent may have died before prctl took effect, and the signal then never comes: the
    # rank was re-parented already, to init (pid 1: caught here), or between the two reads
    # (caught by the second). A subreaper adopting it during the imports before pretrain()
    # cannot be told from the launcher (torchrun does not export its pid).
    if parent == 1 or os.getppid() != parent:
        os._exit(1)
    forking = []  # the pid of the process forking, read back in its child

    def in_child():
        # A parent that died before prctl in the child: the child is re-parented already.
        if _die_with_parent(libc) and os.getppid() != forking[-1]:
            os._exit(1)

    os.register_at_fork(before=lambda: forking.append(os.getpid()),
                        after_in_parent=forking.pop, after_in_child=in_child)


def pretrain(forward_step, argv=None):
    """Parse flags, validate them and the data before any process group exists, train,
    evaluate (validation, then the test split as Megatron-LM)."""
    die_with_launcher()
    rank = os.environ.get("RANK", "0")
    logged = []

    def setup_logs(verbose) -> None:
        # Before megatron-core is imported: its optional-dependency warnings fire at import time.
        if not logged:
            logs.setup(bool(verbose))
            logged.append(True)

    def take_checkpoint_args(args):
        if not args.use_checkpoint_args:
            return []
        setup_logs(args.verbose)  # reading the checkpoint imports megatron-core
        from megatron_ext.training.checkpoint_args import take_checkpoint_args

        return take_checkpoint_args(args)

    try:
        config = parse_args(argv, prepare=take_checkpoint_args)
    except UnknownFlagsError as error:
        # The same on every rank: said once.
        sys.exit(f"[rank {rank}] invalid arguments: {error}" if rank == "0" else 2)
    except ConfigError as error:
        sys.exit(f"[rank {rank}] invalid arguments: {error}")
    setup_logs(config.logging.verbose)
    from megatron_ext.checkpoint.format import CheckpointError
    from megatron_ext.training.trainer import Trainer

    try:
        trainer = Trainer(config, forward_step)
    except ConfigError as error:  # a tokenizer, shard or --split that cannot train
        sys.exit(f"[rank {rank}] invalid data: {error}")
    except CheckpointError as error:  # --load/--save (checkpoint_checks.py, or while loading)
        sys.exit(f"[rank {rank}] invalid checkpoint: {error}")
    try:
        trainer.train()
        # Stopped by --exit-interval to be resumed: no end-of-training evaluation (Megatron-LM).
        if not trainer.exited:
            eval_interval = config.logging.eval_interval
            if not (eval_interval and trainer.iteration % eval_interval == 0):
                trainer.evaluate(final=True)
            trainer.evaluate("test", final=True)
    finally:
        trainer.close()
    return trainer
