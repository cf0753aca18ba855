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
    save_total_limit: Optional[int] = flag(
        None, "Keep only the newest this many checkpoints.", status=OURS)
    ckpt_format: str = flag(
        "torch_dist", "Checkpoint format: torch_dist (megatron-core dist_checkpointing, "
        "resumable at any TP/PP/DP; training/dist_checkpoint.py) or torch (per-rank "
        "model_optim_rng.pt).", choices=["torch", "torch_dist"])
    async_save: bool = flag(False, "Save torch_dist checkpoints in the background.")
    dist_ckpt_optim_fully_reshardable: bool = flag(
        False, "Accepted as Megatron-LM's: torch_dist always saves the distributed optimizer "
        "fully reshardable.", status=NO_OP, note="always on here")
