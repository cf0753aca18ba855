"""What a LoRA run loads and saves, for both checkpoint formats (MindSpeed-LLM's semantics).

- ``--load BASE``: the frozen base model, weights only (a checkpoint of either format, without
  adapters: what pretraining, full fine-tuning or convert_ckpt.py wrote).
- ``--lora-load ADAPTERS``: a LoRA checkpoint: the adapters and the training state (optimizer,
  scheduler, RNG, iteration, consumed samples), which ``--finetune``, ``--no-load-optim`` and
  ``--no-load-rng`` apply to, as ``--load`` without LoRA.
- ``--save``: the adapters only (MindSpeed-LLM's ``--lora-ckpt-filter``, always on): the base
  is unchanged and stays where ``--load`` points. The checkpoint records under ``lora`` the
  hyper-parameters and which base it belongs to (its ``--load`` directory and iteration);
  resuming checks the former against the flags and warns when the latter differs.
"""

import logging
import os
from typing import Callable, Optional

from megatron_ext.checkpoint import format as ckpt
from megatron_ext.model.lora import is_adapter
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")

BASE, ADAPTERS = "base", "adapters"
_HYPER = ("lora_r", "lora_alpha", "lora_target_modules")


def keys(part: Optional[str]) -> Optional[Callable[[str], bool]]:
    """The model entries a part holds (None: all of them, a run without LoRA)."""
    if part == ADAPTERS:
        return is_adapter
    if part == BASE:
        return lambda name: not is_adapter(name)
    return None


def saved_part(config) -> Optional[str]:
    return ADAPTERS if config.lora.enabled else None


def metadata(trainer) -> dict:
    """The ``lora`` entry of a LoRA checkpoint."""
    lora, base = trainer.config.lora, getattr(trainer, "lora_base", None)
    entry = {name: getattr(lora, name) for name in _HYPER + ("lora_dropout",)}
    entry["base_load"], entry["base_iteration"] = base if base else (None, None)
    return entry


def note_base(trainer, root, iteration) -> None:
    trainer.lora_base = (os.path.abspath(root), iteration)


def check_part(trainer, part: Optional[str], saved_lora, where) -> None:
    """A checkpoint's ``lora`` entry (None: a full model) against what this run loads from it:
    ``part`` ADAPTERS from ``--lora-load``; BASE (a LoRA run) or the whole model (a run without
    LoRA) from ``--load``, which must then hold a full model, not adapters alone."""
    if part == ADAPTERS:
        check_adapters(trainer, saved_lora, where)
        return
    if saved_lora is None:
        return
    base = saved_lora.get("base_load") or "the --load of its training run"
    if part == BASE:
        raise ckpt.CheckpointError(
            f"{where} is a LoRA checkpoint (adapters only): pass it as --lora-load, and its base "
            f"model ({base}) as --load")
    # Without LoRA flags the model has no adapters to load them into and no base under them.
    flags = (f"--lora-target-modules {' '.join(saved_lora.get('lora_target_modules') or [])} "
             f"--lora-r {saved_lora.get('lora_r')} --lora-alpha {saved_lora.get('lora_alpha')}")
    raise ckpt.CheckpointError(
        f"--load: {where} is a LoRA checkpoint (adapters only, trained with {flags}), and "
        f"this run has no --lora-target-modules. To continue its training, add {flags} "
        f"--lora-load with it, and give its base model ({base}) as --load; to train or use it "
        f"as a full model, merge it into the base first: convert_ckpt.py --load-model-type mg "
        f"--save-model-type mg --load-dir BASE --lora-load ADAPTERS --save-dir MERGED")


def torch_layout_error(saved: str, tp: int, pp: int) -> str:
    """Torch-format adapters load at their own TP/PP only: convert_ckpt.py reshards whole
    models, not adapters with their optimizer state; torch_dist reshards both at load."""
    return (f"--lora-load: {saved}; torch-format adapters resume only at their own layout "
            f"(--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}). To change "
            f"layouts, resume there once with --ckpt-format torch_dist (its saves reshard at "
            f"load), or merge them into the base with convert_ckpt.py --load-dir BASE "
            f"--lora-load ADAPTERS --save-model-type mg --target-tensor-parallel-size N (a full "
            f"model, no longer LoRA)")


def check_adapters(trainer, saved_lora, where) -> None:
    """A ``--lora-load`` checkpoint against this run's LoRA flags and base."""
    if saved_lora is None:
        raise ckpt.CheckpointError(
            f"--lora-load: {where} holds no LoRA adapters (a base model?); pass it as --load")
    lora = trainer.config.lora
    for name in _HYPER:
        if saved_lora.get(name) != getattr(lora, name):
            flag = "--" + name.replace("_", "-")
            # As typed on the command line (target modules: space-separated names).
            saved, given = (" ".join(v) if isinstance(v, list) else v
                            for v in (saved_lora.get(name), getattr(lora, name)))
            raise ckpt.CheckpointError(
                f"--lora-load: {where} was trained with {flag} {saved}, this run has {given}; "
                f"use the same {flag}")
    base = getattr(trainer, "lora_base", None)
    saved_base = (saved_lora.get("base_load"), saved_lora.get("base_iteration"))
    if saved_base[0] and (base is None or tuple(base) != saved_base):
        log_once(logger, logging.WARNING,
                 f"--lora-load: {where} was trained on the base {saved_base[0]} (iteration "
                 f"{saved_base[1]}); this run's --load is "
                 f"{f'{base[0]} (iteration {base[1]})' if base else 'none (the seed)'}")
