"""Adaptation 8 of the package docstring, and --async-save's writer on 0.19: optimizer state
and distributed checkpoints across megatron-core releases, on any device."""

import contextlib

import torch

from megatron_ext.platform.device import check_version


def torch_adam_state_allocated(optimizers) -> None:
    """Give every parameter of the megatron-core ``DistributedOptimizer``s that drive torch's
    Adam (no Apex/TE) the Adam state torch allocates at its first step, where it has none yet:
    before any step, and with --fp16 after steps the loss scaler skipped (the first dozens).
    Both save formats and the torch_dist load read it: ``state_dict()`` asserts one ``step``
    over all parameters (0.16.1-0.19.2), ``get_parameter_state_dp_zero`` reads ``exp_avg``.
    The zeros are what torch's Adam would start from (``step`` a float32 scalar), so training
    goes on as without them; a load overwrites them. On Apex/TE it changes nothing."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in optimizers:
        adam = opt.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.zeros(()),
                                         "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def torch_adam_steps_kept(optimizers):
    """Load the state of megatron-core ``DistributedOptimizer``s that drive torch's Adam (no
    Apex/TE) inside this context; on Apex/TE it changes nothing.

    Both checkpoint formats copy the loaded shards in with
    ``DistributedOptimizer._set_main_param_and_optimizer_states``, which copies into every key
    of the Adam state, ``step`` included, from shards that have no ``step``: a KeyError. The
    copy here keeps each parameter's own ``step`` (set from the param groups by
    ``load_state_dict``), without autograd (the fp32 main params are views of leaf
    parameters). ``load_state_dict`` also hands every parameter one shared ``step`` tensor,
    which Adam would then increment once per parameter: each gets its own copy afterwards.
    The same code in megatron-core 0.16.1 and 0.19.2 (``distrib_optimizer.py``); this runs on
    GPUs too, where ``apply`` checks no version, hence the check here."""
    from megatron.core.optimizer import distrib_optimizer

    optimizers = [] if distrib_optimizer.HAVE_APEX_OR_TE else list(optimizers)
    if optimizers:
        check_version("with torch's Adam")
    for opt in optimizers:
        def set_states(model_param, tensors, opt=opt,
                       original=opt._set_main_param_and_optimizer_states):
            step = opt._get_main_param_and_optimizer_states(model_param).get("step")
            with torch.no_grad():
                original(model_param, tensors if step is None else dict(tensors, step=step))

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in optimizers:
            del opt._set_main_param_and_optimizer_states  # the class's method again
            for entry in opt.optimizer.state.values():
                if "step" in entry:
                    entry["step"] = entry["step"].clone()


def mark_decoupled_lr_groups(optimizer, lr, decoupled_lr) -> None:
    """megatron-core 0.16-0.18 match saved param groups to live ones by (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr) but leave is_decoupled_lr False on the group that
    ``--decoupled-lr`` creates, so a resume loads its state into the wrong group (or fails):
    mark it. 0.19 adds max_lr and min_lr to that key (``param_group_identifier_keys``) and tells
    the groups apart as Megatron-LM's checkpoints leave them; there nothing is marked, so
    such checkpoints load, and ``unmark_saved_decoupled_lr_groups`` lets a --decoupled-lr
    checkpoint saved on 0.16-0.18 load there too."""
    if decoupled_lr is None or _groups_keyed_by_max_lr():
        return
    for group in optimizer.param_groups:
        group["is_decoupled_lr"] = group.get("max_lr") == decoupled_lr != lr


def unmark_saved_decoupled_lr_groups(saved_groups) -> None:
    """The param groups of a checkpoint, before megatron-core 0.19+ loads them: one saved on
    0.16-0.18 with --decoupled-lr carries ``is_decoupled_lr`` True on the group that
    ``mark_decoupled_lr_groups`` marked, and 0.19, whose groups all keep megatron-core's False
    (told apart by max_lr instead), finds no group for it ("Could not find parameter group with
    key ..."). Unmarked, it matches its group by max_lr. On 0.16-0.18 nothing changes: there the
    marks are the ones this run's groups carry. (0.16-0.18 read 0.19's torch_dist checkpoints,
    which have no common.pt, through checkpoint/dist_format.py.)"""
    if not _groups_keyed_by_max_lr():
        return
    for group in saved_groups:
        if group.get("is_decoupled_lr"):
            group["is_decoupled_lr"] = False


def _groups_keyed_by_max_lr() -> bool:
    """megatron-core 0.19+: saved param groups are matched to live ones by max_lr (and min_lr,
    start_wd, ...), besides 0.16-0.18's wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr."""
    from megatron.core.optimizer import optimizer as core_optimizer

    return "max_lr" in core_optimizer.param_group_identifier_keys


def async_save_options() -> dict:
    """megatron-core 0.19 writes --async-save checkpoints with NVIDIA's nvidia-resiliency-ext by
    default (``async_strategy="nvrx"``) and fails at the first save without it; its own writer,
    the only one 0.16-0.18 have, is ``"mcore"`` (Megatron-LM 0.19 picks one with
    --async-strategy). Older releases take no such argument."""
    import inspect

    from megatron.core import dist_checkpointing

    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        return {}
    return {"async_strategy": "mcore"}
