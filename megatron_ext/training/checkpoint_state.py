"""What both checkpoint formats handle the same way: RNG states, the distributed optimizers of a
(chained) optimizer, the checks that the saved optimizer state is of this run's kind (torch
format) and precision, the learning-rate schedule against the run's flags, and the pruning of old
iterations, and the staging of a save under a temporary name until every rank's files are
written."""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_ext import platform
from megatron_ext.checkpoint import format as ckpt


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers in ``optimizer`` (megatron-core chains one per param group
    kind, e.g. with --decoupled-lr)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, DistributedOptimizer)]


def check_optimizer_kind(saved_distributed: bool, distributed: bool, where) -> None:
    """--ckpt-format torch: the distributed optimizer's state (distrib_optim.pt, its flat
    buffers gathered to DP rank 0) and the plain optimizer's do not load into each other: say
    so, with the way out, before megatron-core fails on a missing key. (torch_dist checkpoints
    do: training/optimizer_switch.py.)"""
    if saved_distributed != distributed:
        raise ckpt.CheckpointError(
            f"checkpoint {where} was saved {'with' if saved_distributed else 'without'} "
            f"--use-distributed-optimizer and this run is {'with' if distributed else 'without'} "
            f"it: its optimizer state (--ckpt-format torch) does not fit; use the same flag, or "
            f"pass --no-load-optim. To switch and keep the optimizer state, resume once with the "
            f"checkpoint's flag and --ckpt-format torch_dist --save: those checkpoints load "
            f"with or without it")


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


# The scheduler's values that megatron-core's OptimizerParamScheduler.load_state_dict compares,
# with the flags that make them. Its weight-decay increment (wd_incr_steps, wd_incr_style) is
# left out: the style is always constant here, so its length has no effect.
_SCHEDULE = (
    ("max_lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_steps", "warmup samples (--lr-warmup-iters/-samples/-fraction, x "
                        "--global-batch-size)"),
    ("lr_decay_steps", "decay samples (--lr-decay-iters, default --train-iters, x "
                       "--global-batch-size)"),
    ("lr_decay_style", "--lr-decay-style"),
    ("start_wd", "--weight-decay"),
)


def check_schedule(trainer, saved: dict, source) -> None:
    """The checkpoint's learning-rate schedule (``saved``: its scheduler state) against this
    run's flags. As in Megatron-LM, a difference is an error unless
    --override-opt_param-scheduler (this run's flags) or --use-checkpoint-opt_param-scheduler
    (the checkpoint's) says which applies: megatron-core's scheduler alone keeps the
    checkpoint's silently, so a changed --lr or a longer --train-iters would have no effect."""
    t = trainer.config.training
    if t.override_opt_param_scheduler or t.use_checkpoint_opt_param_scheduler:
        return
    differences = [f"{label}: {saved[key]} in the checkpoint, {getattr(trainer.scheduler, key)} "
                   f"in this run" for key, label in _SCHEDULE
                   if key in saved and saved[key] != getattr(trainer.scheduler, key)]
    if differences:
        raise ckpt.CheckpointError(
            f"checkpoint {source} was saved with another learning-rate schedule: "
            f"{'; '.join(differences)}. Pass --override-opt_param-scheduler to schedule by this "
            f"run's flags from the checkpoint's iteration on, or --use-checkpoint-opt_param-"
            f"scheduler to keep the checkpoint's schedule (or the flags it was saved with)")


def _precision(dtype) -> str:
    return {torch.bfloat16: "--bf16", torch.float16: "--fp16"}.get(dtype, "fp32 (no --bf16/--fp16)")


def check_precision(trainer, saved_args, source) -> None:
    """The optimizer state of a checkpoint in another precision does not load: with --bf16 or
    --fp16, megatron-core's optimizer keeps fp32 main copies of the weights beside the Adam
    moments, in fp32 none (loading one into the other is a KeyError deep in megatron-core, in
    Megatron-LM too)."""
    saved = getattr(saved_args, "params_dtype", None)
    if saved is None:  # args without it: Megatron-LM's flags say
        saved = (torch.bfloat16 if getattr(saved_args, "bf16", False) else
                 torch.float16 if getattr(saved_args, "fp16", False) else torch.float32)
    ours = trainer.config.model.params_dtype
    if saved != ours:
        raise ckpt.CheckpointError(
            f"checkpoint {source} was saved with {_precision(saved)}, this run has "
            f"{_precision(ours)}: its optimizer state does not fit this run's optimizer; resume "
            f"in the checkpoint's precision, or pass --no-load-optim to load the weights (cast "
            f"to this precision) with a fresh optimizer")


# What megatron-core keeps of the schedule in each parameter group (the scheduler reads the
# rates there).
_GROUP_SCHEDULE = ("max_lr", "min_lr", "start_wd", "end_wd")


def _saved_param_groups(state):
    """The parameter groups in a (chained) optimizer state dict, in order."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            yield from state["param_groups"]
            return
        for key, value in state.items():
            if key != "state":  # per-parameter tensors
                yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


def adopt_schedule(trainer, optimizer_state, source) -> None:
    """Each parameter group's rates and weight decay, saved (``optimizer_state``, before it is
    loaded) against this run's: --override-opt_param-scheduler writes this run's into the saved
    groups, --use-checkpoint-opt_param-scheduler the saved ones into this run's, so that loading
    keeps the one chosen (0.16-0.18 load the saved ones; 0.19 matches saved groups to this
    run's by them). Without either, a difference is an error: check_schedule has compared
    --lr/--min-lr/--weight-decay, so here it is --decoupled-lr or --decoupled-min-lr. The saved
    groups lose the marks 0.16-0.18 need and 0.19 refuses (platform/checkpoint.py)."""
    t = trainer.config.training
    saved = list(_saved_param_groups(optimizer_state))
    platform.unmark_saved_decoupled_lr_groups(saved)  # saved on megatron-core 0.16-0.18
    if len(saved) != len(trainer.optimizer.param_groups):
        return  # another grouping: megatron-core's loading says so
    for theirs, ours in zip(saved, trainer.optimizer.param_groups):
        keys = [k for k in _GROUP_SCHEDULE if k in ours and k in theirs]
        if t.override_opt_param_scheduler:
            theirs.update({k: ours[k] for k in keys})
        elif t.use_checkpoint_opt_param_scheduler:
            ours.update({k: theirs[k] for k in keys})
        elif any(theirs[k] != ours[k] for k in keys):
            rates = lambda group: ", ".join(f"{k} {group[k]}" for k in keys)  # noqa: E731
            raise ckpt.CheckpointError(
                f"checkpoint {source} was saved with other rates for a parameter group "
                f"(--decoupled-lr/--decoupled-min-lr): {rates(theirs)} in the checkpoint, "
                f"{rates(ours)} in this run. Pass --override-opt_param-scheduler to use this "
                f"run's, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")


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


# -- staging ---------------------------------------------------------------------------------


def staging_dir(root, iteration) -> Path:
    """Where a save of ``iteration`` is written until every rank has finished: a hidden name
    that no loader, converter or --save-total-limit takes for a checkpoint (iter_* only)."""
    return Path(root) / f".{ckpt.iteration_dir(root, iteration).name}.incomplete"


def begin_staging(root, iteration) -> Path:
    """Collective: rank 0 deletes the staging directories killed saves left (of any iteration:
    none is in flight when a save starts) and makes a fresh one for ``iteration``."""
    staging = staging_dir(root, iteration)
    if dist.get_rank() == 0:
        for stale in Path(root).glob(".iter_*.incomplete"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


def publish(root, iteration, keep) -> None:
    """Rank 0, once every rank's files are written: rename the staging directory into place,
    then point the tracker at it (atomically), then prune to ``keep`` iterations."""
    final = ckpt.iteration_dir(root, iteration)
    replaced = Path(root) / f".{final.name}.replaced"
    if final.exists():  # an untracked earlier save of the same iteration
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging_dir(root, iteration), final)
    ckpt.fsync_dir(Path(root))
    ckpt.write_tracker(root, iteration)
    shutil.rmtree(replaced, ignore_errors=True)
    prune(root, keep)
