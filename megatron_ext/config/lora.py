"""LoRA flags (MindSpeed-LLM's ``lora`` group; model/lora.py builds the adapters).

LoRA is on when ``--lora-target-modules`` names layers, as in MindSpeed-LLM (its
``is_enable_lora``); ``--lora-r`` and ``--lora-alpha`` have MindSpeed-LLM's defaults.
"""

from dataclasses import dataclass
from typing import List, Optional

from megatron_ext.config.flags import NO_OP, OURS, REFUSED, flag

# megatron-core's names of the linear layers of a transformer layer (our layer spec).
TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraConfig:
    GROUP = "lora"

    lora_target_modules: List[str] = flag(
        [], "Layers that get LoRA adapters (megatron-core names: linear_qkv linear_proj "
        "linear_fc1 linear_fc2); LoRA is on when this names any. The other weights are frozen.",
        nargs="+", status=OURS, note="MindSpeed-LLM's")
    lora_r: int = flag(16, "LoRA rank r.", status=OURS, note="MindSpeed-LLM's")
    lora_alpha: int = flag(32, "LoRA alpha: the adapters' output is scaled by alpha / r.",
                           status=OURS, note="MindSpeed-LLM's")
    lora_dropout: float = flag(
        0.0, "Dropout on the adapters' input (PEFT's lora_dropout).", status=OURS,
        note="PEFT's; MindSpeed-LLM fixes 0.0")
    lora_load: Optional[str] = flag(
        None, "Directory of a LoRA checkpoint (adapters, optimizer, scheduler, RNG, iteration) "
        "to resume from; --load then names the frozen base model, loaded as weights only.",
        status=OURS, note="MindSpeed-LLM's")
    lora_ckpt_filter: bool = flag(
        False, "Save only the adapters: always so here (the base stays at --load).",
        status=NO_OP, note="MindSpeed-LLM's; always on")
    qlora: bool = flag(
        False, "LoRA on a 4-bit quantized base (QLoRA).", status=REFUSED,
        note="needs a GPU 4-bit library (bitsandbytes); not available")

    @property
    def enabled(self) -> bool:
        return bool(self.lora_target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_r
