"""A checkpoint's model, ready to generate: flags from its saved ``args``, weights from its files.

Either format ``--load`` holds: ``torch`` (one ``model_optim_rng.pt`` per TP/PP rank, loaded at
its own layout) or ``torch_dist`` (megatron-core's, at any TP/PP). Model flags the command line
leaves out are taken from the checkpoint's ``args`` (ours or Megatron-LM's), the tokenizer's
too: a user passes, at most, the layout. ``--lora-load ADAPTERS`` adds a LoRA run's adapters to the
base in ``--load`` (their flags read from the adapter checkpoint).
"""

import argparse
import logging
from dataclasses import fields
from pathlib import Path


from megatron_ext.checkpoint import dist_format, format as ckpt
from megatron_ext.checkpoint.args import (check_compatible, divisible_by_padding_to, fill_flags,
                                          fill_tokenizer_flags, saved_value)
from megatron_ext.config import ConfigError, ModelConfig, config_from_namespace, validate
from megatron_ext.training import dist_checkpoint, lora_checkpoint
from megatron_ext.training.checkpoint_args import read_checkpoint

logger = logging.getLogger("megatron_ext")

# Flags that do not shape the weights: never taken from a checkpoint.
_NOT_SAVED = {"attention_dropout", "hidden_dropout", "init_method_std", "attention_backend",
              "recompute_granularity", "recompute_method", "recompute_num_layers"}


def _fill_lora_flags(args: argparse.Namespace) -> None:
    """--lora-load: the adapters' hyper-parameters from their checkpoint, where not given."""
    from megatron_ext.checkpoint.lora import flag_mismatch, saved_metadata

    saved = saved_metadata(Path(args.lora_load))
    if saved is None:
        raise ckpt.CheckpointError(f"--lora-load {args.lora_load} holds no LoRA adapters (a base "
                                   f"model? pass it as --load)")
    # A flag unlike the adapters' would build layers of other shapes than those saved.
    mismatch = flag_mismatch(args, saved)
    if mismatch:
        raise ckpt.CheckpointError(mismatch)
    for name in ("lora_r", "lora_alpha", "lora_target_modules"):
        if getattr(args, name) is None:
            setattr(args, name, saved[name])


def _check_not_adapters(load_dir) -> None:
    """``--load`` must be a whole model: adapters alone (with their training run's layout in
    their args) would otherwise fail later on that layout or on missing weights."""
    from megatron_ext.checkpoint.lora import saved_metadata

    saved = saved_metadata(Path(load_dir))
    if saved is not None:
        raise ckpt.CheckpointError(
            f"--load {load_dir} is a LoRA checkpoint (adapters only): pass it as --lora-load, "
            f"and its base model ({saved.get('base_load') or 'the --load of its training run'}) "
            f"as --load")


def generation_config(args: argparse.Namespace, world_size: int):
    """A validated ``Config`` for the checkpoint in ``args.load``, and what was read of it."""
    if not args.load:
        raise ConfigError("--load CHECKPOINT_DIR is required")
    iteration, found, saved = read_checkpoint(args.load)
    _check_not_adapters(args.load)
    if saved is not None:
        divisible_given = args.make_vocab_size_divisible_by is not None
        fill_flags(args, saved, [f.name for f in fields(ModelConfig) if f.name not in _NOT_SAVED])
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(args, name) is None:
                setattr(args, name, saved_value(saved, name) or 1)
        if args.pipeline_model_parallel_size == saved_value(saved, "pipeline_model_parallel_size"):
            # At its PP, its pipeline split too (a torch-format checkpoint loads at no other).
            for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
                if getattr(args, name) is None:
                    setattr(args, name, saved_value(saved, name))
        # The padded rows are part of the saved embedding, and Megatron pads to a multiple of
        # divisible-by x TP: at another TP, keep the checkpoint's row count.
        tp, saved_padded = args.tensor_model_parallel_size, saved_value(saved, "padded_vocab_size")
        if not divisible_given and saved_padded \
                and tp != (saved_value(saved, "tensor_model_parallel_size") or 1):
            # The tokenizer is not loaded yet: Megatron-LM's args may lack the unpadded size,
            # and any size up to the saved rows pads alike.
            vocab = saved_value(saved, "vocab_size") or saved_padded
            args.make_vocab_size_divisible_by = divisible_by_padding_to(vocab, saved_padded, tp)
        # The tokenizer too (both Megatron-LM's checkpoints and ours save its flags).
        fill_tokenizer_flags(args, saved)
    elif args.num_layers is None:
        raise ConfigError(f"{args.load} saved no args: pass the model flags (--num-layers, "
                          f"--hidden-size, ...) as for training")
    if args.lora_load:
        _fill_lora_flags(args)
    # Generation reads no training data and runs the model in eval mode (no dropout).
    args.mock_data, args.attention_dropout, args.hidden_dropout = True, 0.0, 0.0
    config = config_from_namespace(args)
    validate(config, world_size)
    p = config.parallel
    if world_size != p.tensor_model_parallel_size * p.pipeline_model_parallel_size:
        raise ConfigError(
            f"generation runs one model replica: launch TP x PP = "
            f"{p.tensor_model_parallel_size * p.pipeline_model_parallel_size} ranks "
            f"(--tensor-model-parallel-size {p.tensor_model_parallel_size} x "
            f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}), not {world_size}")
    if p.virtual_stages > 1:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-"
                          "pipeline-rank: generation runs one model chunk per pipeline stage; "
                          "drop them (a torch_dist checkpoint loads at any layout, a torch one "
                          "converts with convert_ckpt.py)")
    if p.sequence_parallel:
        raise ConfigError("--sequence-parallel splits the sequence over TP ranks; a decoding "
                          "step has one token: leave it off for generation")
    return config, iteration, found, saved


def load_weights(model, config, vocab_size: int, iteration, found: str, saved, topology) -> None:
    """This rank's weights of ``iteration`` in ``config.checkpoint.load`` into ``model``; with
    --lora-load, the base from there and the adapters from the latest LoRA checkpoint."""
    lora = config.lora.lora_load
    _load(model, config, vocab_size, config.checkpoint.load, iteration, found, saved, topology,
          lora_checkpoint.keys(lora_checkpoint.BASE) if lora else None)
    if lora:
        iteration, found, saved = read_checkpoint(lora)
        if found != dist_checkpoint.FORMAT:
            _check_adapter_layout(lora, saved, topology)
        _load(model, config, vocab_size, lora, iteration, found, saved, topology,
              lora_checkpoint.keys(lora_checkpoint.ADAPTERS))


def _check_adapter_layout(root, saved, topology) -> None:
    """torch-format adapters load at their training run's TP/PP only (convert_ckpt.py
    reshards whole models, not adapters; it merges them at any layout)."""
    tp, pp = (saved_value(saved, name) or 1 for name in ("tensor_model_parallel_size",
                                                          "pipeline_model_parallel_size"))
    if (tp, pp) != (topology.tensor_parallel, topology.pipeline_parallel):
        raise ckpt.CheckpointError(
            f"--lora-load {root}: torch-format adapters saved at TP={tp} PP={pp}, this run has "
            f"TP={topology.tensor_parallel} PP={topology.pipeline_parallel}; launch with "
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}, or merge "
            f"them into the base with convert_ckpt.py --lora-load (any layout), or save them "
            f"with --ckpt-format torch_dist (loads at any)")


def _load(model, config, vocab_size: int, root, iteration, found: str, saved, topology,
          keys) -> None:
    directory = ckpt.iteration_dir(root, iteration)
    if found == dist_checkpoint.FORMAT:
        check_compatible(saved, config, vocab_size, directory, reshardable=True)
        sharded = model.sharded_state_dict(metadata={"singleton_local_shards": False})
        sharded = {k: v for k, v in sharded.items() if keys is None or keys(k)}
        state = dist_format.load({"model": sharded}, directory)
        model.load_state_dict(state["model"], strict=keys is None)
    else:
        path = ckpt.rank_file(root, iteration, topology.tp_rank, topology.pp_rank,
                              topology.pipeline_parallel)
        if not path.is_file():
            raise ckpt.CheckpointError(
                f"{path} is missing: this torch-format checkpoint was saved at another TP/PP; "
                f"launch it at its own layout (the default) or reshard it with convert_ckpt.py")
        payload = ckpt.load_rank_file(path)
        check_compatible(payload.get("args"), config, vocab_size, path)
        ckpt.load_model_state_dict(model, payload["model"], path, keys)
    logger.info(f"loaded {found} checkpoint {directory} for generation")
