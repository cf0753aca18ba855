"""Checkpointing flags (Megatron-LM's ``checkpointing`` group)."""

from dataclasses import dataclass
from typing import Optional

from megatron_ext.config.flags import OURS, REFUSED, flag


@dataclass
class CheckpointConfig:
    GROUP = "checkpointing"

    save: Optional[str] = flag(None, "Directory to save checkpoints to.")
    save_interval: Optional[int] = flag(None, "Save a checkpoint every this many iterations.")
    load: Optional[str] = flag(None, "Directory to resume (or, with --finetune, to initialize) "
                               "from.")
    no_load_optim: bool = flag(False, "Do not load the optimizer state on --load.")
    no_load_rng: bool = flag(False, "Do not load the RNG state on --load.")
    finetune: bool = flag(False, "Load the model weights only and start at iteration 0.")
    save_total_limit: Optional[int] = flag(
        None, "Keep only the newest this many checkpoints.", status=OURS)
    ckpt_format: str = flag(
        "torch", "Checkpoint format: torch (Megatron-LM's per-rank model_optim_rng.pt).",
        status=REFUSED, choices=["torch", "torch_dist"],
        note="torch is honoured (our default; Megatron-LM's is torch_dist); torch_dist is "
        "refused until distributed checkpoints land: use --ckpt-format torch")
