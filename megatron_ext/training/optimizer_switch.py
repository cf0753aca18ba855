"""A torch_dist checkpoint's optimizer state loaded into the other kind of optimizer: saved
with --use-distributed-optimizer and resumed without it, or the reverse, at any TP/PP/DP, the
Adam moments, step and fp32 main copies carried over (the resumed run is the uninterrupted
run's to float rounding).

Both kinds store the same tensors in megatron-core's model-space formats, one per parameter in
the parameter's shape and sharding: ``optimizer.state.exp_avg.<param key>`` and
``optimizer.state.exp_avg_sq.<param key>``, and the fp32 main copy as
``optimizer.state.param.<param key>`` (the distributed optimizer's ``fully_reshardable``
sharding, which this project writes) or ``optimizer.state.fp32_param.<param key>`` (the plain
optimizer, with --bf16/--fp16; in fp32 it keeps none, the weights being the main copy). The
rest, in common.pt, is laid out differently: the distributed optimizer keeps the step in each
param group, the plain one (torch's Adam) as ``common_step`` beside the per-parameter state, and
the two nest their param groups differently. megatron-core reads only its own layout and
Megatron-LM does not convert (it fails on a missing key).

So this run's optimizer asks for its tensors under the checkpoint's names (``rename``), and its
own state dict is filled with what was loaded plus the checkpoint's param-group values, step
and loss scaler (``converted``). The distributed optimizer's other shardings hold no
per-parameter tensors (``dp_reshardable``, Megatron-LM's default: flat per-bucket DP shards of
the optimizer's internal buffers) or flattened ones that megatron-core 0.16 refuses
(``fully_sharded_model_space``): refused, with the way out.
"""

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedBase,
                                                      ShardedTensor, ShardedTensorFactory)
from megatron.core.optimizer import distrib_optimizer

from megatron_ext.checkpoint import format as ckpt

# The fp32 main copy's name in each kind's state (the key True: the distributed optimizer's).
_MAIN_COPY = {True: "param", False: "fp32_param"}
READABLE_SHARDING = "fully_reshardable"


def check_sharding(sharding: str, directory) -> None:
    """A checkpoint of the distributed optimizer loads into the plain one only from
    per-parameter tensors: say which flag writes them."""
    if sharding != READABLE_SHARDING:
        raise ckpt.CheckpointError(
            f"checkpoint {directory} was saved with --use-distributed-optimizer, its optimizer "
            f"state as '{sharding}' (Megatron-LM without --dist-ckpt-optim-fully-reshardable): "
            f"the distributed optimizer's internal buffers, which only it reads, and this run is "
            f"without it. Resume once with "
            f"--use-distributed-optimizer (this project then saves '{READABLE_SHARDING}', which "
            f"loads either way), or pass --no-load-optim")


def rename(request, model_request, saved_distributed: bool, fp32: bool) -> None:
    """This run's optimizer request (its ``sharded_state_dict(is_loading=True)``), in place:
    the main copies under the checkpoint's name. From an fp32 checkpoint of the plain
    optimizer, which has no main copies, the distributed optimizer's are the loaded weights
    themselves (``model_request``'s tensors, loaded before the optimizer state)."""
    ours, theirs = f"optimizer.state.{_MAIN_COPY[not saved_distributed]}.", \
        f"optimizer.state.{_MAIN_COPY[saved_distributed]}."
    weights = {_origin(sh, sh.key): sh.data for sh in nested_values(model_request)
               if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}

    def renamed(sh):
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or \
                not sh.key.startswith(ours):
            return sh
        if fp32 and not saved_distributed:
            return weights[_origin(sh, sh.key[len(ours):])]  # a tensor: not asked for
        sh.key = theirs + sh.key[len(ours):]
        return sh

    dict_list_map_inplace(renamed, request)


def _origin(sh, key):
    """What an optimizer entry shares with the model entry it was made from
    (``dataclasses.replace`` in megatron-core): the key (layers stacked in one share it) with
    the offsets, or a factory's build function (per layer)."""
    return key, tuple(getattr(sh, "global_offset", ())), getattr(sh, "build_fn", None)


def converted(optimizer, request, loaded, saved, directory):
    """The state dict this run's ``optimizer`` loads: its own (``request``) with the tensors
    ``loaded`` in place, and the param groups' values, step and loss scaler of the checkpoint's
    optimizer state ``saved`` (common.pt's)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) == 1:  # megatron-core's state of a chain of one is that optimizer's
        return _converted(request, loaded, saved, directory)
    return {i: _converted(request[i], loaded[i], saved[i], directory)
            for i in range(len(chained))}


def _filled(request, loaded):
    """``request`` with each sharded entry replaced by its tensor in ``loaded``
    (dist_checkpointing's result, whose other values are the checkpoint's), the rest its own."""
    if isinstance(request, ShardedBase):
        return loaded
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        return {k: _filled(v, loaded.get(k) if isinstance(loaded, dict) else None)
                for k, v in request.items()}
    if isinstance(request, list):
        return [_filled(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
                for i, v in enumerate(request)]
    return request


def _groups_holder(state):
    """The dict that holds the torch optimizer's ``param_groups`` in a megatron-core optimizer
    state (the plain fp32 optimizer's is the torch one; the others nest it as ``optimizer``)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            return state
        for value in state.values():
            holder = _groups_holder(value)
            if holder is not None:
                return holder
    return None


def _converted(request, loaded, saved, directory):
    state = _filled(request, loaded)
    ours, theirs = _groups_holder(state), _groups_holder(saved)
    if theirs is None or len(ours["param_groups"]) != len(theirs["param_groups"]):
        raise ckpt.CheckpointError(
            f"checkpoint {directory}: its optimizer has "
            f"{len(theirs['param_groups']) if theirs else 'no'} parameter groups, this run's "
            f"{len(ours['param_groups'])}; pass --no-load-optim")
    # megatron-core saves the step of the plain optimizer on torch's Adam (a step per
    # parameter) as one common_step, else (the distributed optimizer; Apex/TE's Adam, which
    # counts per group) in each param group.
    step = theirs.get("state", {}).get("common_step", theirs["param_groups"][0].get("step"))
    step = step.item() if torch.is_tensor(step) else step
    step_per_group = "state" not in ours or distrib_optimizer.HAVE_APEX_OR_TE
    for group, saved_group in zip(ours["param_groups"], theirs["param_groups"]):
        # Same order: both kinds build their groups with megatron-core's _get_param_groups.
        group.update({k: saved_group[k] for k in group if k not in ("params", "step")
                      and k in saved_group})
        if step is not None and step_per_group:
            group["step"] = step
    if step is not None and not step_per_group:
        ours["state"]["common_step"] = torch.tensor(float(step))
    if "grad_scaler" in state and "grad_scaler" in saved:
        state["grad_scaler"] = saved["grad_scaler"]
    return state
