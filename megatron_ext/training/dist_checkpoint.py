"""Save and resume in megatron-core's distributed format (``--ckpt-format torch_dist``).

The layout is Megatron-LM's::

    DIR/latest_checkpointed_iteration.txt     the iteration; written last
    DIR/iter_0000100/common.pt                what is not sharded: args, checkpoint_version,
                                              iteration, optimizer param groups,
                                              opt_param_scheduler, consumed samples, ...
                                              (megatron-core 0.19: in the .distcp files,
                                              read on 0.16-0.18 too: checkpoint/dist_format.py)
    DIR/iter_0000100/__0_0.distcp ...         model and optimizer tensors, RNG states
    DIR/iter_0000100/.metadata                torch.distributed.checkpoint's index of them
    DIR/iter_0000100/metadata.json            megatron-core's format marker, written last

Tensors are stored under their global names and offsets (``GPTModel.sharded_state_dict``), so
a checkpoint loads at any TP/PP/DP. The distributed optimizer's state is saved with
megatron-core's ``fully_reshardable`` sharding (what Megatron-LM writes with
``--dist-ckpt-optim-fully-reshardable``): every parameter's fp32 copy and Adam moments in the
parameter's own shape and sharding, so they reshard exactly as the weights do, and load into
the plain optimizer too (a resume without --use-distributed-optimizer, or the reverse:
optimizer_switch.py). The alternatives cannot: ``dp_reshardable`` stores the optimizer's flat
per-bucket DP shards, whose layout depends on TP/PP (it reshards along DP only), and
``fully_sharded_model_space`` relies on flattened ShardedTensors, which megatron-core 0.16
refuses. The price is an all-gather of the optimizer
state over DP ranks at save time. A Megatron-LM checkpoint saved as ``dp_reshardable`` loads at
its own TP/PP (its DP may change); elsewhere the error says so.

Atomic: every rank writes into ``DIR/.iter_0000100.incomplete``; once megatron-core has written
``metadata.json`` (after every rank finished) rank 0 renames it to ``iter_0000100`` and then
points the tracker at it. A save killed at any moment leaves the previous checkpoint the latest.
"""

import logging
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_ext import platform
from megatron_ext.checkpoint import dist_format, format as ckpt
from megatron_ext.checkpoint.args import (check_compatible, model_args_namespace,
                                          pipeline_split, run_pipeline_split, saved_value)
from megatron_ext.training import coba, data_resume, lora_checkpoint, optimizer_switch
from megatron_ext.training.checkpoint_state import (adopt_schedule, begin_staging,
                                                   check_precision, check_schedule,
                                                   distributed_optimizers, fresh_on_resume,
                                                   publish, rng_state, set_rng_state)
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")

FORMAT = "torch_dist"
SHARDING_TYPE = "fully_reshardable"


def _metadata(trainer, sharding_type=SHARDING_TYPE) -> dict:
    """megatron-core's sharded-state-dict options, as Megatron-LM passes them."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if trainer.config.parallel.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = sharding_type
        if sharding_type == "fully_reshardable":
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def _saved_args(trainer):
    """Megatron-LM's ``args``: the model-defining flags, the layout and the consumed samples."""
    args = model_args_namespace(trainer.config, trainer.vocab_size)
    args.ckpt_format = FORMAT
    args.use_distributed_optimizer = trainer.config.parallel.use_distributed_optimizer
    args.world_size = trainer.topology.world_size
    args.data_parallel_size = trainer.topology.data_parallel
    args.consumed_train_samples = trainer.consumed_samples
    args.consumed_valid_samples = trainer.consumed_valid_samples
    vars(args).update(data_resume.saved_data_args(trainer.config, trainer.shard_sizes))
    return args


def _sharded_state_dict(trainer, metadata, *, optimizer: bool, rng: bool, is_loading: bool,
                        part=None):
    """The state to save or load; ``part`` of the model only (training/lora_checkpoint.py)."""
    topology = trainer.topology
    metadata = dict(metadata, dp_cp_group=parallel_state.get_data_parallel_group(
        with_context_parallel=True))
    # One entry per model chunk (Megatron-LM's model0, model1, ... with virtual stages); the
    # tensors inside are keyed by global layer number, so any layout loads them.
    wanted = lora_checkpoint.keys(part)
    models = {}
    for key, chunk in zip(ckpt.model_keys(len(trainer.model)), trainer.model):
        model = chunk.module.sharded_state_dict(metadata=metadata)
        models[key] = model if wanted is None else {k: v for k, v in model.items() if wanted(k)}
    state = {
        "args": _saved_args(trainer),
        "checkpoint_version": ckpt.CHECKPOINT_VERSION,
        "iteration": trainer.iteration,
        "consumed_samples": trainer.consumed_samples,
        "consumed_valid_samples": trainer.consumed_valid_samples,
        # Megatron-LM's key, which its loader reads; nothing here counts FLOPs across runs.
        "num_floating_point_operations_so_far": 0,
        **models,
    }
    if trainer.config.lora.enabled and not is_loading:
        state["lora"] = lora_checkpoint.metadata(trainer)
    if not is_loading:
        state.update(coba.checkpoint_entry(trainer))  # non-sharded, as the scalars above
    if optimizer:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(
            models, is_loading=is_loading, metadata=metadata)
        state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    if rng:
        # Megatron-LM's: one entry per (pp, tp) rank; data- and context-parallel ranks hold
        # replicas (their generators are seeded alike and draw alike), so CP is not part of
        # the layout either.
        state["rng_state"] = ShardedObject(
            "rng_state", [rng_state()],
            (topology.pipeline_parallel, topology.tensor_parallel),
            (topology.pp_rank, topology.tp_rank), replica_id=topology.dp_cp_rank)
    return state


# -- save ------------------------------------------------------------------------------------


def _finalize(root, iteration, keep) -> None:
    if dist.get_rank() == 0:
        publish(root, iteration, keep)
    dist.barrier()
    logger.info(f"saved checkpoint at iteration {iteration} to {root} (torch_dist)")


_async_queue = None  # megatron-core's queue of --async-save requests in flight


def finalize_saves(blocking: bool = False) -> None:
    """Publish the ``--async-save`` checkpoints whose writes have finished (all of them, waiting
    for the writers, with ``blocking``). Collective: call it on every rank alike."""
    if _async_queue is not None:
        _async_queue.maybe_finalize_async_calls(blocking=blocking)


def save(trainer) -> None:
    c = trainer.config.checkpoint
    root, iteration = Path(c.save), trainer.iteration
    global _async_queue
    finalize_saves(blocking=True)  # the previous checkpoint is published before the next starts
    staging = begin_staging(root, iteration)
    metadata = _metadata(trainer)
    platform.torch_adam_state_allocated(distributed_optimizers(trainer.optimizer))
    state = _sharded_state_dict(trainer, metadata, optimizer=True, rng=True, is_loading=False,
                                part=lora_checkpoint.saved_part(trainer.config))
    request = dist_checkpointing.save(state, str(staging), async_sharded_save=c.async_save,
                                      content_metadata=metadata,
                                      **(platform.async_save_options() if c.async_save else {}))
    if request is None:
        _finalize(root, iteration, c.save_total_limit)
    else:
        request.finalize_fns.append(lambda: _finalize(root, iteration, c.save_total_limit))
        if _async_queue is None:
            _async_queue = AsyncCallsQueue()
        _async_queue.schedule_async_request(request)


# -- load ------------------------------------------------------------------------------------


def _saved_sharding(content: dict, saved_args) -> str:
    """How the checkpoint holds the distributed optimizer's state; Megatron-LM before content
    metadata (megatron-core < 0.13) wrote these by default."""
    return content.get("distrib_optim_sharding_type") or (
        "fully_sharded_model_space" if getattr(saved_args, "ckpt_fully_parallel_save", False)
        else "dp_zero_gather_scatter")


def _optimizer_metadata(trainer, content: dict, saved_args, directory, same_layout: bool,
                        switched: bool):
    """The sharded-state-dict options that read this checkpoint's optimizer state, or an error
    that says what to change. ``switched``: saved by the other kind of optimizer
    (optimizer_switch.py), read in this run's own format."""
    mine = trainer.config.parallel.use_distributed_optimizer
    if switched:
        if not mine:
            optimizer_switch.check_sharding(_saved_sharding(content, saved_args), directory)
        return _metadata(trainer)
    if not mine:
        return _metadata(trainer)
    sharding = _saved_sharding(content, saved_args)
    if not same_layout and sharding not in DistributedOptimizer.checkpoint_fully_reshardable_formats:
        raise ckpt.CheckpointError(
            f"checkpoint {directory} holds the distributed optimizer's state as '{sharding}' "
            f"(Megatron-LM without --dist-ckpt-optim-fully-reshardable), which loads only at its "
            f"own --tensor-model-parallel-size {saved_value(saved_args, 'tensor_model_parallel_size')}"
            f" --pipeline-model-parallel-size "
            f"{saved_value(saved_args, 'pipeline_model_parallel_size')}; resume at that layout, "
            f"or pass --no-load-optim")
    return dict(content, distrib_optim_sharding_type=sharding)


def saved_args(directory):
    """The ``args`` of the torch_dist checkpoint in ``directory`` (None if it saved none)."""
    return dist_format.load_common_state_dict(directory).get("args")


def _layout_text(tp: int, pp: int, chunks) -> str:
    """TP=a PP=b, and the model chunks per stage of the interleaved schedule."""
    return f"TP={tp} PP={pp}" + (f" x {chunks} model chunks" if (chunks or 1) > 1 else "")


def load(trainer, iteration, root, part=None, weights_only: bool = False) -> None:
    """Resume from the torch_dist checkpoint of ``iteration`` in ``root`` at this run's
    TP/PP/DP (the RNG states only at the layout they were saved with); ``part`` of the model
    only, and the weights alone with ``weights_only`` (training/lora_checkpoint.py)."""
    c, topology = trainer.config.checkpoint, trainer.topology
    directory = ckpt.iteration_dir(root, iteration)
    common = dist_format.load_common_state_dict(directory)
    saved_args = common.get("args")
    check_compatible(saved_args, trainer.config, trainer.vocab_size, directory, reshardable=True)
    lora_checkpoint.check_part(trainer, part, common.get("lora"), directory)
    saved_layout = (saved_value(saved_args, "tensor_model_parallel_size") or 1,
                    saved_value(saved_args, "pipeline_model_parallel_size"))
    saved_at = _layout_text(*saved_layout,
                            saved_value(saved_args, "virtual_pipeline_model_parallel_size"))
    # The layers of each PP stage, not the PP size alone: an uneven split moves layers.
    same_layout = (saved_layout[0], pipeline_split(saved_args)) \
        == (topology.tensor_parallel, run_pipeline_split(trainer.config))
    weights_only = weights_only or c.finetune or iteration == ckpt.RELEASE
    load_optim = not weights_only and not c.no_load_optim
    if not weights_only:
        data_resume.warn_data_changes(saved_args, trainer.config, trainer.shard_sizes,
                                       directory)
    load_rng = not weights_only and not c.no_load_rng
    if load_optim and "opt_param_scheduler" not in common:
        raise ckpt.CheckpointError(
            f"checkpoint {directory} has no optimizer state; pass --no-load-optim or "
            f"--finetune to load the weights alone")
    if load_optim:
        check_precision(trainer, saved_args, directory)
        check_schedule(trainer, common["opt_param_scheduler"], directory)
    if load_rng and not same_layout:
        here = _layout_text(topology.tensor_parallel, topology.pipeline_parallel,
                            topology.virtual_pipeline)
        log_once(logger, logging.WARNING, f"{directory} was saved at {saved_at}, this run has "
                 f"{here}: RNG states not restored")
        load_rng = False
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    saved_distributed = getattr(saved_args, "use_distributed_optimizer", None)
    switched = load_optim and saved_distributed is not None and \
        bool(saved_distributed) != trainer.config.parallel.use_distributed_optimizer
    metadata = (_optimizer_metadata(trainer, content, saved_args, directory, same_layout,
                                    switched) if load_optim else _metadata(trainer))
    if load_optim:
        platform.torch_adam_state_allocated(distributed_optimizers(trainer.optimizer))
    sharded = _sharded_state_dict(trainer, metadata, optimizer=load_optim, rng=load_rng,
                                  is_loading=True, part=part)
    model_keys = ckpt.model_keys(len(trainer.model))
    if switched:
        m = trainer.config.model
        optimizer_switch.rename(sharded["optimizer"], {k: sharded[k] for k in model_keys},
                                bool(saved_distributed), fp32=not (m.bf16 or m.fp16))
    state = dist_format.load(sharded, directory, strict=c.dist_ckpt_strictness)
    # dist_checkpointing loads every key asked for (or fails); a part leaves the rest out.
    for key, chunk in zip(model_keys, trainer.model):
        chunk.module.load_state_dict(state[key], strict=part is None)
    if load_optim:
        optimizer_state = state["optimizer"]
        if switched:
            optimizer_state = optimizer_switch.converted(
                trainer.optimizer, sharded["optimizer"], optimizer_state, common["optimizer"],
                directory)
            log_once(logger, logging.INFO,
                     f"{directory} was saved {'with' if saved_distributed else 'without'} "
                     f"--use-distributed-optimizer: its optimizer state goes into this run's "
                     f"{'plain' if saved_distributed else 'distributed'} optimizer")
        adopt_schedule(trainer, optimizer_state, directory)
        with platform.torch_adam_steps_kept(distributed_optimizers(trainer.optimizer)):
            trainer.optimizer.load_state_dict(optimizer_state)
        trainer.scheduler.load_state_dict(state["opt_param_scheduler"])
    elif trainer.config.model.bf16 or trainer.config.model.fp16:
        trainer.optimizer.reload_model_params()  # fp32 main params from the loaded weights
    if load_rng:
        set_rng_state(state["rng_state"][0])
    if weights_only:
        logger.info(f"loaded model weights from {directory} (iteration 0, fresh optimizer, "
                    f"scheduler and data order)")
        return
    trainer.iteration = state["iteration"]
    coba.note_resumed(trainer, common.get(coba.KEY), directory)
    trainer.consumed_samples = state.get(
        "consumed_samples", getattr(saved_args, "consumed_train_samples", 0))
    trainer.consumed_valid_samples = state.get(
        "consumed_valid_samples", getattr(saved_args, "consumed_valid_samples", 0))
    logger.info(f"resumed from {directory} (torch_dist, saved at {saved_at}) at iteration "
                f"{trainer.iteration}{fresh_on_resume(c)}")
