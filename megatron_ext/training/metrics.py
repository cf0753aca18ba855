"""Training metrics: model FLOPs, device peak for MFU, and the console/TensorBoard log."""

import logging
import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron_ext import platform
from megatron_ext.config import Config

logger = logging.getLogger("megatron_ext")

# Dense bf16/fp16 tensor-core peak (TFLOP/s) by device name, most specific name first; MFU is
# reported only for 16-bit training on a known device.
_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
                "A100": 312.0, "A800": 312.0}


def device_peak_tflops(config: Config) -> Optional[float]:
    if not (platform.cuda_available() and (config.model.bf16 or config.model.fp16)):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(config: Config, vocab_size: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward; recomputation is
    not counted, as in MFU). Causal attention counts half of the full score matrix."""
    m = config.model
    s, h = m.seq_length, m.hidden_size
    q_dim = m.num_attention_heads * m.kv_channels
    kv_dim = m.num_query_groups * m.kv_channels
    mlp_mats = 3 if m.swiglu else 2
    per_layer = (
        2 * h * (q_dim + 2 * kv_dim)  # QKV projection
        + 2 * q_dim * h  # output projection
        + 2 * mlp_mats * h * m.ffn_hidden_size  # MLP
        + 2 * 2 * s * q_dim / 2  # scores and weighted values, causal half
    )
    forward = m.num_layers * per_layer + 2 * h * vocab_size
    return 3 * forward


class MetricsLogger:
    """Writes one line per ``--log-interval`` and, with ``--tensorboard-dir``, scalars."""

    def __init__(self, config: Config, vocab_size: int, world_size: int, enabled: bool):
        self.config = config
        self.enabled = enabled
        self.world_size = world_size
        self.flops_per_token = flops_per_token(config, vocab_size)
        self.peak = device_peak_tflops(config)
        self.writer = None
        self.task_names: Optional[List[str]] = None  # multi-task data: per-task losses logged
        if enabled and config.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # a dependency (setup.py); a broken install is named
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
                ) from error
            self.writer = SummaryWriter(log_dir=config.logging.tensorboard_dir)

    def log_train(self, iteration: int, window: List[Dict[str, float]],
                  seconds_per_iter: float) -> None:
        """Megatron-LM's iteration line for the steps since the last one (loss averaged over
        them, skipped and NaN steps counted), then our fields, over the same steps: the tokens
        trained in them and the rate of the tokens they processed (with a batch-size ramp-up
        the steps' batches differ; Megatron-LM's throughput takes the last step's)."""
        if not self.enabled:
            return
        t, stats = self.config.training, window[-1]
        tokens = sum(s["global_batch_size"] for s in window) * self.config.model.seq_length
        tokens_per_s = tokens / (seconds_per_iter * len(window))
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        advanced = [s for s in window if not s["skipped"]]
        loss = sum(s["lm loss"] for s in advanced) / max(len(advanced), 1)
        trained = sum(s["trained_tokens"] for s in advanced)
        fields = [
            f"iteration {iteration:8d}/{t.train_iters:8d}",
            f"consumed samples: {stats['consumed_samples']:12d}",
            f"elapsed time per iteration (ms): {1000 * seconds_per_iter:.1f}",
        ]
        if self.config.logging.log_throughput:
            fields.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
        fields += [
            f"learning rate: {stats['lr']:.6E}",
            f"global batch size: {stats['global_batch_size']:5d}",
        ]
        if advanced:
            fields.append(f"lm loss: {loss:.6E}")
        tasks = self._task_fields([s.get("task_totals") for s in advanced])
        fields += [f"{name}: {value:.6E}" for name, value in tasks.items()]
        if stats.get("task_weights") is not None:  # --weighted-loss-mode coba's, this step
            weights = {f"task weight [{name}]": float(w)
                       for name, w in zip(self.task_names, stats["task_weights"])}
            fields += [f"{name}: {value:.4f}" for name, value in weights.items()]
            tasks.update(weights)
        fields += [
            f"loss scale: {stats['loss_scale']:.1f}",
            f"grad norm: {stats['grad_norm']:.3f}",
            f"number of skipped iterations: {sum(s['skipped'] for s in window):3d}",
            f"number of nan iterations: {sum(s['nan'] for s in window):3d}",
            # Ours, after Megatron-LM's.
            f"trained tokens: {trained:d}",
            f"tokens/s: {tokens_per_s:.0f}",
            f"TFLOP/s/device: {tflops:.3g}",
        ]
        if self.peak:
            fields.append(f"MFU: {100 * tflops / self.peak:.1f}%")
        logger.info(" " + " | ".join(fields) + " |")
        self._write_scalars(iteration, {
            "lm loss": loss, "learning-rate": stats["lr"],
            "grad-norm": stats["grad_norm"], "loss-scale": stats["loss_scale"],
            "batch-size": stats["global_batch_size"],
            "consumed-samples": stats["consumed_samples"],
            "trained-tokens": trained, "iteration-time": seconds_per_iter,
            "tokens-per-sec": tokens_per_s, "throughput": tflops,
            **({"mfu": 100 * tflops / self.peak} if self.peak else {}), **tasks,
        })

    def _task_fields(self, totals: list, prefix: str = "lm loss") -> Dict[str, float]:
        """Each task's per-token loss over ``totals`` (steps' [2, tasks] sums and counts)."""
        from megatron_ext.training.multitask import task_fields

        totals = [t for t in totals if t is not None]
        # One task's loss is lm loss itself: per-task fields only when there are several.
        if not self.task_names or len(self.task_names) < 2 or not totals:
            return {}
        return task_fields(self.task_names, sum(totals), prefix)

    def _write_scalars(self, iteration: int, scalars: Dict[str, float]) -> None:
        """TensorBoard, under Megatron-LM's tags (``lm loss``, ``learning-rate``, ``grad-norm``,
        ``throughput`` in TFLOP/s per device, ``lm loss validation`` ...), so that runs of both
        read alike; ``python -m megatron_ext.plot`` reads them back."""
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)

    def log_eval(self, iteration: int, loss: float, split: str = "valid",
                 final: bool = False, task_totals=None, suffix: str = "") -> None:
        """Megatron-LM's validation line; at the end of training its words for the split;
        multi-task data adds each task's loss (``task_totals`` [2, tasks]). ``suffix`` names
        one of --multiple-validation-sets (``-0``: "validation-0 loss", "lm loss validation-0")."""
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 20.0))
        where = f"iteration {iteration}"
        if split == "test":
            where += " on test set"
        elif final:
            where += " on validation set"
        tasks = self._task_fields([task_totals])
        line = (f" validation{suffix} loss at {where} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} | "
                + "".join(f"{name}: {value:.6E} | " for name, value in tasks.items()))
        logger.info("-" * (len(line) + 1))
        logger.info(line)
        logger.info("-" * (len(line) + 1))
        name = f"validation{suffix}" if split == "valid" else split
        self._write_scalars(iteration, {
            f"lm loss {name}": loss, f"lm loss {name} ppl": ppl,
            **{tag.replace("lm loss", f"lm loss {name}", 1): value
               for tag, value in tasks.items()}})

    def close(self) -> None:
        if self.writer:
            self.writer.close()


_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_VALIDATION = re.compile(
    r"validation(-\S+)? loss at iteration (\d+)( on (validation|test) set)? \|(.*)$")


def _fields(text: str) -> Dict[str, str]:
    pairs = (part.split(":", 1) for part in text.split("|") if ":" in part)
    return {name.strip(): value.strip() for name, value in pairs}


def parse_log(text: str) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(iteration records, validation records) from Megatron-LM-format log text, ours
    included: each a dict of field name -> text ("lm loss", "consumed samples", ...) plus
    "iteration" (and "iterations" for the run's total). The one parser tests and tools use."""
    train, valid = [], []
    for line in text.splitlines():
        found = _VALIDATION.search(line)
        if found:
            # "set": which of --multiple-validation-sets ("0", or its --validation-set-names).
            named = {"set": found.group(1)[1:]} if found.group(1) else {}
            valid.append({"iteration": found.group(2), "final": bool(found.group(3)),
                          "split": found.group(4) or "validation", **named,
                          **_fields(found.group(5))})
            continue
        found = _ITERATION.search(line)
        if found:
            train.append({"iteration": found.group(1), "iterations": found.group(2),
                          **_fields(found.group(3))})
    return train, valid
