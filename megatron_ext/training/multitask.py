"""Multi-task fine-tuning (MFTCoder): per-task losses and ``--weighted-loss-mode``.

In a global batch, trained token i (loss mask 1) has the per-token loss l_i, the task t(i)
(``task_ids``, from MFTCoder's ``data_name``: ``sft_dataset.py``) and the conversation s(i)
(``sample_ids``). With N the trained tokens, N_t those of task t, S_t their summed loss,
L_t = S_t / N_t (the task's per-token mean), n_s and L_s = S_s / n_s the same for conversation
s, M the conversations with trained tokens and M_t those of task t:

- ``case1`` (default): L = sum_i l_i / N, every token alike (megatron-core's per-token loss);
- ``case2``: L = sum_s L_s / M, every conversation alike;
- ``case3``: L = sum_{t: N_t > 0} w_t L_t / W, W = sum_{t: N_t > 0} w_t, w_t = 1: the tasks
  present in the global batch weigh equally, tokens within a task alike (MFTCoder's default);
  ``--task-weights`` fixes other w_t (MFTCoder's ``task_weights``); a global batch whose tasks
  all weigh 0 trains nothing (L = 0, not 0 / 0);
- ``case4``: L = sum_t w_t (sum_{s in t} L_s / M_t) / W: tasks alike (or ``--task-weights``),
  conversations within a task alike;
- ``coba``: case3 with CoBa's weights w_t (``coba.py``), updated every step.

megatron-core (``--calculate-per-token-loss``) divides the gradient of the micro-batches'
summed losses by the sum of the token counts they return, over the whole global batch. Here a
micro-batch returns sum_i c_i l_i and its trained tokens, so the gradient is that of
sum_i c_i l_i / N: c_i = N w_t / (N_t W) (case3, coba), N / (M n_s) (case2) or
N w_t / (M_t n_s W) (case4) makes it exactly the gradient of L. The counts must be the global
batch's: ``prepare`` reads this rank's micro-batches of the global batch before the schedule
runs, counts their trained tokens and conversations per task and sums the counts over
data-parallel ranks (tensor-parallel ranks and pipeline stages read the micro-batches of their
data-parallel rank, so they count the same), then hands every micro-batch the scales
``task_scale`` [2, tasks] and its tokens' ``loss_weight`` c_i = task_scale[0, t] +
task_scale[1, t] / n_s (n_s counted in the micro-batch: a conversation never spans rows), a
per-token tensor that any later slicing of the batch (context parallelism) slices alike. A packed row holds conversations of several
tasks: the ids are per token, so packing changes nothing. ``lm loss`` stays the plain per-token
mean (comparable across modes); each task's L_t is logged beside it (``task_fields``).
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import platform
from megatron_ext.config import ConfigError
from megatron_ext.config.training import parse_task_weights

TASK_LOSS = "task loss"  # the loss function's report: [2, tasks] (summed loss, trained tokens)
SAMPLE_MODES = ("case2", "case4")  # conversations weigh alike


def task_scales(mode: str, tokens: torch.Tensor, samples: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """``task_scale`` [2, tasks] for the global batch's per-task trained tokens and
    conversations (the module docstring); ``weights`` the w_t of case3, case4 and coba."""
    tokens, samples = tokens.double(), samples.double()
    scale = torch.zeros(2, tokens.numel(), dtype=torch.float64, device=tokens.device)
    total = tokens.sum()
    if mode == "case1":
        scale[0] = 1.0
        return scale.float()
    if mode == "case2":
        scale[1] = total / samples.sum().clamp(min=1)
        return scale.float()
    present = tokens > 0
    weights = weights.double().to(tokens.device)
    present_weight = weights[present].sum()
    share = torch.where(present, total * weights / present_weight.clamp(min=1e-300),
                        torch.zeros_like(tokens))
    if mode == "case4":
        scale[1] = share / samples.clamp(min=1)
    else:
        scale[0] = share / tokens.clamp(min=1)
    return scale.float()


def _sample_keys(sample_ids: torch.Tensor) -> torch.Tensor:
    """A conversation's key unique in the micro-batch: row x seq + its index in the row."""
    rows, seq = sample_ids.shape
    return (torch.arange(rows, device=sample_ids.device)[:, None] * seq + sample_ids).reshape(-1)


def token_weights(scale: torch.Tensor, batch: dict) -> torch.Tensor:
    """c_i of every token of a micro-batch ([b, s] float32): task_scale[0, t] +
    task_scale[1, t] / n_s, n_s counted over the whole row (before any slicing of it)."""
    tasks = batch["task_ids"].long()
    weights = scale[0][tasks]
    if scale[1].any():  # sample-level modes: divided by the conversation's trained tokens
        keys = _sample_keys(batch["sample_ids"])
        mask = batch["loss_mask"].reshape(-1).double()
        per_sample = torch.bincount(keys, mask, minlength=keys.numel())[keys]
        weights = weights + scale[1][tasks] / per_sample.clamp(min=1).reshape(tasks.shape)
    return weights.float()


def loss_func(task_ids: torch.Tensor, loss_mask: torch.Tensor, loss_weight: torch.Tensor,
              task_scale: torch.Tensor, output_tensor: torch.Tensor):
    """megatron-core's per-token loss function for multi-task batches: the weighted loss sum
    (``loss_weight``: c_i per token), the trained tokens, and the report (``lm loss`` as
    pretrain_gpt.loss_func's, and ``task loss`` per task; ``task_scale`` gives their number)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    tasks = task_ids.reshape(-1).long()
    masked = losses * mask
    loss_sum = torch.sum(masked * loss_weight.to(masked).reshape(-1))
    num_tokens = mask.sum().to(torch.int)
    zeros = torch.zeros(task_scale.size(1), dtype=torch.float32, device=masked.device)
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


def fixed_weights(given: Optional[List[str]], names: List[str]) -> torch.Tensor:
    """w_t of case3 and case4: ``--task-weights`` (validated but against the data's tasks,
    known here), else 1 each."""
    if given is None:
        return torch.ones(len(names), dtype=torch.float64)
    weights = parse_task_weights(given)
    tasks = f"{', '.join(names)} (the --data-path datasets' tasks, in this order)"
    if weights[0][0] is not None:  # by name
        by_name = dict(weights)
        unknown = [name for name in by_name if name not in names]
        missing = [name for name in names if name not in by_name]
        if unknown or missing:
            what = f"no task {unknown[0]!r}" if unknown else f"no weight for task {missing[0]!r}"
            raise ConfigError(f"--task-weights: {what}; the run's tasks are {tasks}: give "
                              f"NAME:W for each")
        return torch.tensor([by_name[name] for name in names], dtype=torch.float64)
    if len(weights) != len(names):
        raise ConfigError(
            f"--task-weights gives {len(weights)} weight{'s' * (len(weights) != 1)}, the run "
            f"has {len(names)} task{'s' * (len(names) != 1)}: {tasks}; give one weight per "
            f"task (or NAME:W for each)")
    return torch.tensor([weight for _, weight in weights], dtype=torch.float64)


class MultiTask:
    """The trainer's side: counts before each schedule run, per-task totals after it."""

    def __init__(self, names: List[str], mode: str, task_weights: Optional[List[str]] = None):
        self.names, self.mode = names, mode
        # w_t of case3 and case4; CoBa replaces them before every step (coba.py).
        self.weights = fixed_weights(task_weights, names)

    def prepare(self, iterator, num_microbatches: int):
        """This rank's micro-batches of the global batch, each with ``task_scale`` added (one
        iterator of them per model chunk where ``iterator`` is a list: data.per_chunk)."""
        if isinstance(iterator, list):
            return [self.prepare(chunk, num_microbatches) for chunk in iterator]
        batches = [next(iterator) for _ in range(num_microbatches)]
        n = len(self.names)
        counts = torch.zeros(2, n, dtype=torch.float64)  # trained tokens, conversations
        for batch in batches:
            tasks, mask = batch["task_ids"].reshape(-1), batch["loss_mask"].reshape(-1).double()
            counts[0] += torch.bincount(tasks, mask, minlength=n)
            if self.mode in SAMPLE_MODES:
                keys = _sample_keys(batch["sample_ids"])
                trained = torch.bincount(keys, mask, minlength=keys.numel()) > 0
                task_of = torch.zeros(keys.numel(), dtype=torch.long).scatter_(0, keys, tasks)
                counts[1] += torch.bincount(task_of[trained], minlength=n)
        if self.mode != "case1":
            counts = counts.to(platform.device())
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        scale = task_scales(self.mode, counts[0], counts[1], self.weights).cpu()
        for batch in batches:
            batch["task_scale"] = scale
            batch["loss_weight"] = token_weights(scale, batch)
        return iter(batches)

    def reduce(self, losses: List[dict]) -> torch.Tensor:
        """[2, tasks] float64 over the global batch, the same on every rank (as the trainer's
        lm loss: micro-batches of the last stage, then data-parallel ranks, then the pipeline;
        other stages report nothing)."""
        total = torch.zeros(2, len(self.names), dtype=torch.float64, device=platform.device())
        for entry in losses:
            if TASK_LOSS in entry:  # absent from a forward step that is not pretrain_gpt's
                total += entry[TASK_LOSS].to(total)
        # Context-parallel ranks hold their own chunks of every conversation: each token once.
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total.cpu()
