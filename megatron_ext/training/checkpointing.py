"""Save and resume training in Megatron-LM's checkpoint layouts.

``--ckpt-format torch_dist`` (the default) is megatron-core's distributed format, resumable at
any TP/PP/DP: see ``dist_checkpoint.py``. ``--load`` recognises either format whatever
``--ckpt-format`` says. The rest of this module is ``--ckpt-format torch`` (checkpoint/format.py):

Each (tp, pp) rank of DP x CP rank 0 writes ``model_optim_rng.pt``: model, optimizer
(its non-sharded part), scheduler, every DP rank's RNG states, iteration, consumed training and
validation samples. With the distributed optimizer, the optimizer state sharded over DP ranks
(over DP x CP ranks) is gathered to their rank 0 and written beside it as ``distrib_optim.pt``.

Atomic, as torch_dist saves: every rank writes into ``DIR/.iter_0000100.incomplete``; once all
have (a barrier) rank 0 renames it to ``iter_0000100`` and then points the tracker at it. A save
killed at any moment leaves no ``iter_*`` directory that lacks a file (a model_optim_rng.pt
without its distrib_optim.pt, which convert_ckpt.py or a hand-edited tracker would take), and
the previous checkpoint the latest; the next save deletes the staging directory.
"""

import logging

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import platform
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.checkpoint.args import (check_compatible, divisible_by_padding_to,
                                          model_args_namespace, padded_vocab_size, saved_value)
from megatron_ext.checkpoint.dist_format import is_dist_checkpoint
from megatron_ext.training import coba, data_resume, dist_checkpoint, lora_checkpoint
from megatron_ext.training.checkpoint_state import (adopt_schedule, check_optimizer_kind,
                                                   begin_staging, check_precision, check_schedule,
                                                   distributed_optimizers, fresh_on_resume,
                                                   publish, rng_state, set_rng_state)
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")


def _rank_file(root, iteration, topology):
    return ckpt.rank_file(root, iteration, topology.tp_rank, topology.pp_rank,
                          topology.pipeline_parallel)


def save_checkpoint(trainer) -> None:
    if trainer.config.checkpoint.ckpt_format == dist_checkpoint.FORMAT:
        dist_checkpoint.save(trainer)
        return
    root, topology = trainer.config.checkpoint.save, trainer.topology
    iteration = trainer.iteration
    staging = begin_staging(root, iteration)
    path = staging / ckpt.rank_dir_name(topology.tp_rank, topology.pp_rank,
                                        topology.pipeline_parallel) / ckpt.RANK_FILENAME
    dp_group = parallel_state.get_data_parallel_group()
    rng_states = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(rng_states, rng_state(), group=dp_group)
    # Collective over the DP x CP ranks the distributed optimizer shards over: every rank
    # takes part, DP x CP rank 0 receives the full state and writes the (tp, pp) file. CP ranks
    # hold the same weights and the same RNG states (seeded alike), so CP is not in the layout.
    platform.torch_adam_state_allocated(distributed_optimizers(trainer.optimizer))
    distrib_states = [opt.get_parameter_state_dp_zero()
                      for opt in distributed_optimizers(trainer.optimizer)]
    if topology.dp_cp_rank == 0:
        saved = lora_checkpoint.keys(lora_checkpoint.saved_part(trainer.config))
        # The consumed samples in args too, where Megatron-LM and convert_ckpt.py read them.
        args = model_args_namespace(
            trainer.config, trainer.vocab_size,
            **data_resume.saved_data_args(trainer.config, trainer.shard_sizes),
            consumed_train_samples=trainer.consumed_samples,
            consumed_valid_samples=trainer.consumed_valid_samples)
        # As Megatron-LM's args: a rank directory without its distrib_optim.pt is then known
        # to be incomplete, not a save by the plain optimizer (checkpoint_checks.py).
        args.use_distributed_optimizer = trainer.config.parallel.use_distributed_optimizer
        payload = {
            "args": args,
            "checkpoint_version": ckpt.CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_samples": trainer.consumed_samples,
            "consumed_valid_samples": trainer.consumed_valid_samples,
            # Megatron-LM's model0, model1, ... with virtual stages (one per model chunk).
            **{key: {k: v for k, v in ckpt.model_state_dict(chunk.module).items()
                     if saved is None or saved(k)}
               for key, chunk in zip(ckpt.model_keys(len(trainer.model)), trainer.model)},
            "optimizer": trainer.optimizer.state_dict(),
            "opt_param_scheduler": trainer.scheduler.state_dict(),
            "rng_state": rng_states,
        }
        if trainer.config.lora.enabled:
            payload["lora"] = lora_checkpoint.metadata(trainer)
        payload.update(coba.checkpoint_entry(trainer))
        ckpt.save_rank_file(path, payload)
        if distrib_states:
            ckpt.save_rank_file(path.parent / ckpt.DISTRIB_OPTIM_FILENAME, {"states": distrib_states})
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        publish(root, iteration, trainer.config.checkpoint.save_total_limit)
    dist.barrier()
    logger.info(f"saved checkpoint at iteration {iteration} to {root}")


def finalize_saves(blocking: bool = False) -> None:
    """Publish finished ``--async-save`` checkpoints (torch_dist); collective, every rank."""
    dist_checkpoint.finalize_saves(blocking)


def _saved_layout(directory):
    """(TP, PP) of a torch-format checkpoint directory, from its mp_rank_* names."""
    names = sorted(p.name for p in directory.glob("mp_rank_*")) if directory.is_dir() else []
    if not names:
        raise ckpt.CheckpointError(f"checkpoint directory {directory} holds no mp_rank_* "
                                   f"directories: it is incomplete or not a Megatron checkpoint")
    tp = 1 + max(int(name.split("_")[2]) for name in names)
    pp = 1 + max((int(name.split("_")[3]) for name in names if name.count("_") == 3), default=0)
    return tp, pp


def _raise_layout_mismatch(root, iteration, topology, part=None) -> None:
    """Name the TP/PP layout a checkpoint was saved with, and the way to another layout."""
    directory = ckpt.iteration_dir(root, iteration)
    tp, pp = _saved_layout(directory)
    saved = (f"checkpoint {directory} was saved with TP={tp} PP={pp} but this run has "
             f"--tensor-model-parallel-size {topology.tensor_parallel} "
             f"--pipeline-model-parallel-size {topology.pipeline_parallel} (other TP/PP)")
    if part == lora_checkpoint.ADAPTERS:
        raise ckpt.CheckpointError(lora_checkpoint.torch_layout_error(saved, tp, pp))
    raise ckpt.CheckpointError(
        f"{saved}; reshard it with convert_ckpt.py --load-model-type mg --save-model-type mg "
        f"--target-tensor-parallel-size {topology.tensor_parallel} "
        f"--target-pipeline-parallel-size {topology.pipeline_parallel} (the weights only: then "
        f"train with --no-load-optim --no-load-rng, or --finetune), or, to keep the optimizer "
        f"state, resume once at TP={tp} PP={pp} with --ckpt-format torch_dist, whose "
        f"checkpoints load at any TP/PP")


def adopt_saved_vocab_padding(config, vocab_size: int) -> None:
    """Pad the vocabulary as the torch_dist checkpoint in ``--load`` did. It loads at any TP,
    but Megatron pads to a multiple of divisible-by x TP, so at another TP its embedding and
    output layer would have other rows than this run's. The padded rows are zeros whose logits
    never count (model/vocab.py): padding alike changes nothing but the shapes, and the
    checkpoints this run saves pad alike too."""
    root = config.checkpoint.load
    iteration = ckpt.read_tracker(root) if root else None
    if iteration is None or not is_dist_checkpoint(ckpt.iteration_dir(root, iteration)):
        return  # torch-format checkpoints load at their own TP only, where the padding agrees
    saved = dist_checkpoint.saved_args(ckpt.iteration_dir(root, iteration))
    saved_padded = saved_value(saved, "padded_vocab_size")
    m, tp = config.model, config.parallel.tensor_model_parallel_size
    if not saved_padded or saved_padded == padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp):
        return
    divisible_by = divisible_by_padding_to(vocab_size, saved_padded, tp)
    if divisible_by is None:
        return  # check_compatible names the way out
    log_once(logger, logging.INFO,
             f"{root} pads the vocabulary ({vocab_size}) to {saved_padded} rows: padding alike "
             f"at TP {tp} (--make-vocab-size-divisible-by {divisible_by} for "
             f"{m.make_vocab_size_divisible_by}; the padded rows never count)")
    m.make_vocab_size_divisible_by = divisible_by


def load_checkpoint(trainer) -> None:
    """Resume from ``--load`` (or start fresh when it holds no checkpoint, as Megatron-LM).
    With LoRA: the base from ``--load`` (weights only), then the adapters and the training
    state from ``--lora-load`` (training/lora_checkpoint.py)."""
    c, lora = trainer.config.checkpoint, trainer.config.lora
    if not lora.enabled:
        _load(trainer, c.load, None, weights_only=False)
        return
    if c.load:
        _load(trainer, c.load, lora_checkpoint.BASE, weights_only=True)
    if lora.lora_load:
        _load(trainer, lora.lora_load, lora_checkpoint.ADAPTERS, weights_only=False)


def _load(trainer, root, part, weights_only: bool) -> None:
    """Load ``part`` of the model (all of it: None) from the checkpoint in ``root``, and the
    training state unless ``weights_only``."""
    c, topology = trainer.config.checkpoint, trainer.topology
    iteration = ckpt.read_tracker(root)
    if iteration is None:
        log_once(logger, logging.WARNING,
                 f"no {ckpt.TRACKER_FILENAME} in {root}: starting from scratch")
        return
    found = (dist_checkpoint.FORMAT if is_dist_checkpoint(
        ckpt.iteration_dir(root, iteration)) else "torch")
    if found != c.ckpt_format:
        logger.info(f"{ckpt.iteration_dir(root, iteration)} is a {found} checkpoint "
                    f"(--ckpt-format {c.ckpt_format} applies to saving): loading it as {found}")
    if part == lora_checkpoint.BASE:
        lora_checkpoint.note_base(trainer, root, iteration)
    if found == dist_checkpoint.FORMAT:
        dist_checkpoint.load(trainer, iteration, root, part, weights_only)
        return
    path = _rank_file(root, iteration, topology)
    # Before the saved args are compared: every rank, whether or not it finds a file of its
    # own, gives this one error (the args' TP mismatch would bring the vocabulary padding's).
    if not path.is_file() or _saved_layout(ckpt.iteration_dir(root, iteration)) \
            != (topology.tensor_parallel, topology.pipeline_parallel):
        _raise_layout_mismatch(root, iteration, topology, part)
    payload = ckpt.load_rank_file(path)
    check_compatible(payload.get("args"), trainer.config, trainer.vocab_size, path)
    lora_checkpoint.check_part(trainer, part, payload.get("lora"), path)
    # check_compatible compared the model chunks per stage (the pipeline split).
    for key, chunk in zip(ckpt.model_keys(len(trainer.model)), trainer.model):
        ckpt.load_model_state_dict(chunk.module, payload[key], path, lora_checkpoint.keys(part))
    weights_only = weights_only or c.finetune or iteration == ckpt.RELEASE
    if not weights_only:
        data_resume.warn_data_changes(payload.get("args"), trainer.config,
                                       trainer.shard_sizes, path)
    if (weights_only or c.no_load_optim) and (trainer.config.model.bf16
                                              or trainer.config.model.fp16):
        trainer.optimizer.reload_model_params()  # fp32 main params from the loaded weights
    if weights_only:
        # A release checkpoint (Megatron-LM's name for published weights) is weights alone.
        logger.info(f"loaded model weights from {path} (iteration 0, fresh optimizer, "
                    f"scheduler and data order)")
        return
    if not c.no_load_optim:
        if "optimizer" not in payload:
            raise ckpt.CheckpointError(
                f"checkpoint file {path} has no optimizer state; pass --no-load-optim or "
                f"--finetune to load the weights alone")
        # Megatron-LM writes distrib_optim.pt exactly when the distributed optimizer ran.
        distrib_path = path.parent / ckpt.DISTRIB_OPTIM_FILENAME
        check_optimizer_kind(distrib_path.is_file(),
                             trainer.config.parallel.use_distributed_optimizer, path.parent)
        check_precision(trainer, payload.get("args"), path)
        check_schedule(trainer, payload["opt_param_scheduler"], path)
        adopt_schedule(trainer, payload["optimizer"], path)
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.scheduler.load_state_dict(payload["opt_param_scheduler"])
        optimizers = distributed_optimizers(trainer.optimizer)
        if optimizers:
            states = (ckpt.load_rank_file(distrib_path)["states"] if topology.dp_cp_rank == 0
                      else [None] * len(optimizers))
            with platform.torch_adam_steps_kept(optimizers):
                for opt, state in zip(optimizers, states):
                    opt.load_parameter_state_from_dp_zero(state)
    if not c.no_load_rng:
        rng_states = payload.get("rng_state")
        if rng_states is None:
            raise ckpt.CheckpointError(
                f"checkpoint file {path} has no RNG state (a converted checkpoint?); pass "
                f"--no-load-rng, or --finetune to load the weights alone")
        if len(rng_states) != topology.data_parallel:
            log_once(logger, logging.WARNING,
                     f"{path.parent.parent} was saved with {len(rng_states)} data-parallel ranks, "
                     f"this run has {topology.data_parallel}: RNG states not restored")
        else:
            set_rng_state(rng_states[topology.dp_rank])
    trainer.iteration = payload["iteration"]
    coba.note_resumed(trainer, payload.get(coba.KEY), path)
    # Ours beside args; Megatron-LM's and converted checkpoints' in args alone.
    saved_args = payload.get("args")
    trainer.consumed_samples = payload.get(
        "consumed_samples", getattr(saved_args, "consumed_train_samples", 0))
    # Where the validation batches resume; for an older checkpoint, Megatron-LM's estimate.
    l, batch = trainer.config.logging, trainer.config.training.global_batch_size
    trainer.consumed_valid_samples = payload.get(
        "consumed_valid_samples", getattr(
            saved_args, "consumed_valid_samples",
            trainer.iteration // l.eval_interval * l.eval_iters * batch if l.eval_interval else 0))
    logger.info(f"resumed from {path} at iteration {trainer.iteration}"
                f"{fresh_on_resume(c)}")
