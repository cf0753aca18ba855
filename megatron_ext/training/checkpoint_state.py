"""What both checkpoint formats handle the same way: RNG states, the distributed optimizers of a
(chained) optimizer, the check that the saved optimizer state is of this run's kind, the
learning-rate schedule, and the pruning of old iterations."""

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_ext.checkpoint import format as ckpt
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")

# The schedule's values (megatron-core's state_dict keys; lr and wd steps in samples), with the
# flags that set them here.
_SCHEDULE = (
    ("max_lr", "--lr"), ("min_lr", "--min-lr"), ("lr_decay_style", "--lr-decay-style"),
    ("lr_warmup_steps", "--lr-warmup-iters/-samples/-fraction x --global-batch-size"),
    ("lr_decay_steps", "--lr-decay-iters/--train-iters x --global-batch-size"),
    ("start_wd", "--weight-decay"), ("end_wd", "--weight-decay"),
    ("wd_incr_steps", "--train-iters x --global-batch-size"))


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers in ``optimizer`` (megatron-core chains one per param group
    kind, e.g. with --decoupled-lr)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, DistributedOptimizer)]


def check_optimizer_kind(saved_distributed: bool, distributed: bool, where) -> None:
    """The distributed optimizer's state (flat DP shards, or fully reshardable tensors) and the
    plain optimizer's do not load into each other: say so, with the way out, before megatron-core
    fails on a missing key."""
    if saved_distributed != distributed:
        raise ckpt.CheckpointError(
            f"checkpoint {where} was saved {'with' if saved_distributed else 'without'} "
            f"--use-distributed-optimizer and this run is {'with' if distributed else 'without'} "
            f"it: its optimizer state does not fit; use the same flag, or pass --no-load-optim")


def load_scheduler(trainer, saved: dict, where) -> None:
    """Resume the learning-rate schedule. Where this run's flags give other values than the
    checkpoint's (another --global-batch-size: the steps are samples), megatron-core keeps the
    checkpoint's, or with --override-opt_param-scheduler takes this run's: say which, since
    either changes the curve (Megatron-LM refuses the mismatch without one of its two flags)."""
    t, scheduler = trainer.config.training, trainer.scheduler
    differ = [f"{key} {saved[key]} in the checkpoint, {getattr(scheduler, key)} here ({flag})"
              for key, flag in _SCHEDULE
              if key in saved and saved[key] != getattr(scheduler, key)]
    scheduler.load_state_dict(saved)
    if differ and not t.use_checkpoint_opt_param_scheduler:
        kept = ("this run's (--override-opt_param-scheduler)" if t.override_opt_param_scheduler
                else "the checkpoint's; pass --override-opt_param-scheduler for this run's, or "
                "--use-checkpoint-opt_param-scheduler to keep it without this warning")
        log_once(logger, logging.WARNING,
                 f"{where}: the learning-rate schedule (its steps are samples) differs from "
                 f"this run's flags: {'; '.join(differ)}. The schedule followed is {kept}")


def fresh_on_resume(checkpoint_config) -> str:
    """What a resume leaves fresh by request, for its log line: the curve is not the
    uninterrupted run's, and the LR schedule restarting is easy to miss."""
    fresh = []
    if checkpoint_config.no_load_optim:
        fresh.append("optimizer state and LR schedule (--no-load-optim: Adam starts afresh, the "
                     "schedule at its first step, as in Megatron-LM)")
    if checkpoint_config.no_load_rng:
        fresh.append("RNG states (--no-load-rng)")
    return f"; not loaded: {', '.join(fresh)}" if fresh else ""


def rng_state() -> dict:
    """This rank's generators, under Megatron-LM's keys."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state["cuda_rng_state"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def prune(root, keep) -> None:
    """Delete all but the newest ``keep`` iteration directories (never the tracked one)."""
    if not keep:
        return
    iterations = sorted(int(p.name[len("iter_"):]) for p in Path(root).glob("iter_*")
                        if p.name[len("iter_"):].isdigit())
    latest = ckpt.read_tracker(root)
    for iteration in iterations[:-keep]:
        if iteration != latest:
            shutil.rmtree(ckpt.iteration_dir(root, iteration), ignore_errors=True)
