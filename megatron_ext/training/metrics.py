"""Training metrics: model FLOPs, device peak for MFU, and the console/TensorBoard log."""

import logging
import math
from typing import Dict, Optional

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
        if enabled and config.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # a dependency (setup.py); a broken install is named
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
                ) from error
            self.writer = SummaryWriter(log_dir=config.logging.tensorboard_dir)

    def log_train(self, iteration: int, stats: Dict[str, float], seconds_per_iter: float) -> None:
        if not self.enabled:
            return
        t = self.config.training
        tokens = t.global_batch_size * self.config.model.seq_length
        tokens_per_s = tokens / seconds_per_iter
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        parts = [
            f"iteration {iteration:8d}/{t.train_iters}",
            f"consumed samples {stats['consumed_samples']:10d}",
            f"lm loss {stats['lm loss']:.6E}",
            f"trained tokens {stats['trained_tokens']:d}",
            f"grad norm {stats['grad_norm']:.4f}",
            f"learning rate {stats['lr']:.6E}",
        ]
        if self.config.model.fp16:
            parts.append(f"loss scale {stats['loss_scale']:.1f}")
        parts += [
            f"s/iter {seconds_per_iter:.3f}",
            f"tokens/s {tokens_per_s:.0f}",
            f"TFLOP/s/device {tflops:.3g}",
        ]
        if self.peak:
            parts.append(f"MFU {100 * tflops / self.peak:.1f}%")
        logger.info(" | ".join(parts))
        self._write_scalars(iteration, {
            "lm loss": stats["lm loss"], "learning-rate": stats["lr"],
            "grad-norm": stats["grad_norm"], "loss-scale": stats["loss_scale"],
            "batch-size": t.global_batch_size, "consumed-samples": stats["consumed_samples"],
            "trained-tokens": stats["trained_tokens"], "iteration-time": seconds_per_iter,
            "tokens-per-sec": tokens_per_s, "throughput": tflops,
            **({"mfu": 100 * tflops / self.peak} if self.peak else {}),
        })

    def _write_scalars(self, iteration: int, scalars: Dict[str, float]) -> None:
        """TensorBoard, under Megatron-LM's tags (``lm loss``, ``learning-rate``, ``grad-norm``,
        ``throughput`` in TFLOP/s per device, ``lm loss validation`` ...), so that runs of both
        read alike; ``python -m megatron_ext.plot`` reads them back."""
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)

    def log_eval(self, iteration: int, loss: float, split: str = "valid") -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 20.0))
        # The test split's line has Megatron-LM's words for it.
        where = (f"validation at iteration {iteration}" if split == "valid"
                 else f"validation loss at iteration {iteration} on test set")
        logger.info(f"{where} | lm loss {loss:.6E} | lm loss PPL {ppl:.6E}")
        name = "validation" if split == "valid" else split
        self._write_scalars(iteration, {f"lm loss {name}": loss, f"lm loss {name} ppl": ppl})

    def close(self) -> None:
        if self.writer:
            self.writer.close()
