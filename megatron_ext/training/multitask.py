"""Multi-task fine-tuning (MFTCoder): per-task losses and ``--weighted-loss-mode``.

In a global batch, trained token i (loss mask 1) has the per-token loss l_i and the task t(i)
(``task_ids``, from MFTCoder's ``data_name``: ``sft_dataset.py``). With N the trained tokens,
N_t those of task t, S_t their summed loss and L_t = S_t / N_t (the task's per-token mean):

- ``case1`` (default): L = sum_i l_i / N, every token alike (megatron-core's per-token loss);
- ``case3``: L = sum_{t: N_t > 0} w_t L_t / sum_{t: N_t > 0} w_t with w_t = 1: the tasks present
  in the global batch weigh equally, tokens within a task alike (MFTCoder's default);
- ``coba``: case3 with CoBa's weights w_t (``coba.py``), updated every step.

megatron-core (``--calculate-per-token-loss``) divides the gradient of the micro-batches'
summed losses by the sum of the token counts they return, over the whole global batch. Here a
micro-batch returns sum_i c_t(i) l_i and its trained tokens, so the gradient is that of
sum_i c_t(i) l_i / N; c_t = N w_t / (N_t W), W = sum_{t: N_t > 0} w_t, makes it exactly the
gradient of L. N_t must be the global batch's: ``prepare`` reads this rank's micro-batches of
the global batch before the schedule runs, counts their trained tokens per task and sums the
counts over data-parallel ranks (tensor-parallel ranks and pipeline stages read the micro-
batches of their data-parallel rank, so they count the same), then hands every micro-batch
the scales c. A packed row holds conversations of several tasks: the ids are per token, so
packing changes nothing. ``lm loss`` stays the plain per-token mean (comparable across modes);
each task's L_t is logged beside it (``task_fields``).
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import platform

TASK_LOSS = "task loss"  # the loss function's report: [2, tasks] (summed loss, trained tokens)


def task_scales(counts: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """c_t for the global batch's per-task trained-token counts; ``weights`` None: case1."""
    counts = counts.double()
    if weights is None:
        return torch.ones_like(counts, dtype=torch.float32)
    present = counts > 0
    weights = weights.double().to(counts.device)
    total_weight = weights[present].sum()
    scales = torch.where(present, counts.sum() * weights / (counts.clamp(min=1) * total_weight),
                         torch.zeros_like(counts))
    return scales.float()


def loss_func(task_ids: torch.Tensor, loss_mask: torch.Tensor, task_scale: torch.Tensor,
              output_tensor: torch.Tensor):
    """megatron-core's per-token loss function for multi-task batches: the weighted loss sum,
    the trained tokens, and the report (``lm loss`` as pretrain_gpt.loss_func's, and
    ``task loss`` per task)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    tasks = task_ids.reshape(-1).long()
    masked = losses * mask
    loss_sum = torch.sum(masked * task_scale.to(masked)[tasks])
    num_tokens = mask.sum().to(torch.int)
    zeros = torch.zeros(task_scale.numel(), dtype=torch.float32, device=masked.device)
    per_task = torch.stack([zeros.index_add(0, tasks, masked.detach()),
                            zeros.index_add(0, tasks, mask)])
    return loss_sum, num_tokens, {"lm loss": torch.stack([masked.sum().detach(),
                                                          num_tokens.float()]),
                                  TASK_LOSS: per_task}


def task_fields(names: List[str], totals: Optional[torch.Tensor],
                prefix: str = "lm loss") -> Dict[str, float]:
    """``{"lm loss [task]": per-token mean}`` for the tasks with trained tokens in ``totals``
    ([2, tasks]: summed loss, tokens)."""
    if totals is None:
        return {}
    return {f"{prefix} [{name}]": float(totals[0, i] / totals[1, i])
            for i, name in enumerate(names) if totals[1, i] > 0}


class MultiTask:
    """The trainer's side: counts before each schedule run, per-task totals after it."""

    def __init__(self, names: List[str], mode: str):
        self.names, self.mode = names, mode
        # None: case1 (no reweighting). CoBa replaces them before every step (coba.py).
        self.weights: Optional[torch.Tensor] = (
            None if mode == "case1" else torch.ones(len(names), dtype=torch.float64))

    def prepare(self, iterator, num_microbatches: int):
        """This rank's micro-batches of the global batch, each with ``task_scale`` added."""
        batches = [next(iterator) for _ in range(num_microbatches)]
        counts = torch.zeros(len(self.names), dtype=torch.float64)
        for batch in batches:
            counts += torch.bincount(batch["task_ids"].reshape(-1),
                                     batch["loss_mask"].reshape(-1).double(),
                                     minlength=len(self.names))
        if self.weights is not None:
            counts = counts.to(platform.device())
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        scale = task_scales(counts, self.weights).cpu()
        for batch in batches:
            batch["task_scale"] = scale
        return iter(batches)

    def reduce(self, losses: List[dict]) -> torch.Tensor:
        """[2, tasks] float64 over the global batch, the same on every rank (as the trainer's
        lm loss: micro-batches of the last stage, then data-parallel ranks, then the pipeline;
        other stages report nothing)."""
        total = torch.zeros(2, len(self.names), dtype=torch.float64, device=platform.device())
        for entry in losses:
            if TASK_LOSS in entry:  # absent from a forward step that is not pretrain_gpt's
                total += entry[TASK_LOSS].to(total)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total.cpu()
