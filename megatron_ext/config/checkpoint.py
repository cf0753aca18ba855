"""Checkpointing flags (Megatron-LM's ``checkpointing`` group)."""

from dataclasses import dataclass
from typing import Optional

from megatron_ext.config.flags import NO_OP, OURS, WARNED, flag


@dataclass
class CheckpointConfig:
    GROUP = "checkpointing"

    save: Optional[str] = flag(None, "Directory to save checkpoints to.")
    save_interval: Optional[int] = flag(None, "Save a checkpoint every this many iterations.")
    load: Optional[str] = flag(None, "Directory to resume (or, with --finetune, to initialize) "
                               "from.")
    no_load_optim: bool = flag(False, "Do not load the optimizer state on --load.")
    no_load_rng: bool = flag(False, "Do not load the RNG state on --load.")
    exit_on_missing_checkpoint: bool = flag(
        False, "Stop when --load holds no checkpoint instead of starting from scratch.")
    save_optim: bool = flag(
        True, "Do not save the optimizer state.", name="--no-save-optim", action="store_false",
        status=WARNED, note="checkpoints keep the optimizer state (they stay resumable); said "
        "once")
    save_rng: bool = flag(
        True, "Do not save the RNG state.", name="--no-save-rng", action="store_false",
        status=WARNED, note="checkpoints keep the RNG state (they stay resumable); said once")
    finetune: bool = flag(False, "Load the model weights only and start at iteration 0.")
    pretrained_checkpoint: Optional[str] = flag(
        None, "Checkpoint to fine-tune from: while --load holds no checkpoint, its weights "
        "load as with --finetune; once the run has saved to --load, that is resumed.")
    # Megatron-LM's load_args_from_checkpoint, before validation (training/checkpoint_args.py).
    use_checkpoint_args: bool = flag(
        False, "With --load: the model flags from the checkpoint's saved args, as Megatron-LM: "
        "the sizes where not given; the layer shape, dropout and tokenizer even over the "
        "command line (its MoE/Mamba/MTP args: those models are not supported here).", note="Megatron-LM's set less its MoE/Mamba/MTP/hybrid args (not supported "
        "here); --load without a checkpoint: the command line's flags")
    use_mp_args_from_checkpoint_args: bool = flag(
        False, "With --use-checkpoint-args: the TP/PP layout from the checkpoint too.")
    use_tokenizer_model_from_checkpoint_args: bool = flag(
        True, "With --use-checkpoint-args: keep the command line's --tokenizer-type/--model.",
        name="--no-use-tokenizer-model-from-checkpoint-args", action="store_false",
        note="checkpoints save the tokenizer flags (Megatron-LM's names; files as absolute "
        "paths); without this flag its other files (--vocab-file ...) are taken where not given "
        "too; a saved file that is gone is named")
    save_total_limit: Optional[int] = flag(
        None, "Keep only the newest this many checkpoints.", status=OURS)
    ckpt_format: str = flag(
        "torch_dist", "Checkpoint format: torch_dist (megatron-core dist_checkpointing, "
        "resumable at any TP/PP/DP; training/dist_checkpoint.py) or torch (per-rank "
        "model_optim_rng.pt).", choices=["torch", "torch_dist"])
    async_save: bool = flag(False, "Save torch_dist checkpoints in the background.")
    dist_ckpt_strictness: str = flag(
        "assume_ok_unexpected", "megatron-core's StrictHandling of the keys a torch_dist "
        "checkpoint and the loaded state do not share: *_all also log or refuse the checkpoint "
        "keys the run leaves unread (the optimizer's under --no-load-optim).", choices=[
            "assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
            "ignore_all"],
        note="megatron-core's return_* values (mismatches returned to the caller) are refused")
    # Megatron-LM's dist-ckpt tuning and deprecated flags, which its scripts still pass: each
    # selects what is always done here (validate says so once).
    use_dist_ckpt: bool = flag(
        False, "Deprecated in Megatron-LM (no effect there either): use --ckpt-format.",
        status=NO_OP, note="deprecated in Megatron-LM; --ckpt-format selects the format")
    dist_ckpt_format: Optional[str] = flag(
        None, "Deprecated in Megatron-LM (no effect there either): use --ckpt-format.",
        status=NO_OP, note="deprecated in Megatron-LM; --ckpt-format selects the format")
    ckpt_fully_parallel_save_deprecated: bool = flag(
        False, "Deprecated in Megatron-LM, where parallel save is the default.",
        name="--ckpt-fully-parallel-save", status=NO_OP,
        note="every rank writes its own shards, always")
    ckpt_fully_parallel_save: bool = flag(
        True, "Megatron-LM: save from DP rank 0 only, which makes its distributed optimizer "
        "state non-reshardable.", name="--no-ckpt-fully-parallel-save", action="store_false",
        status=NO_OP, note="the distributed optimizer is saved fully reshardable, always")
    ckpt_fully_parallel_load: bool = flag(
        False, "Megatron-LM: spread the reads over DP ranks and exchange the tensors.",
        status=NO_OP, note="every rank reads the shards it needs")
    ckpt_assume_constant_structure: bool = flag(
        False, "Megatron-LM: reuse the save plan of the previous save.", status=NO_OP,
        note="each save plans afresh; the files are the same")
    auto_detect_ckpt_format: bool = flag(
        False, "Megatron-LM: detect the format of --load.", status=NO_OP,
        note="--load recognises either format whatever --ckpt-format says")
    dist_ckpt_optim_fully_reshardable: bool = flag(
        False, "Accepted as Megatron-LM's: torch_dist always saves the distributed optimizer "
        "fully reshardable.", status=NO_OP, note="always on here")
