"""CoBa, MFTCoder's convergence balancing (``--weighted-loss-mode coba``): task weights from the
slopes of the tasks' validation losses.

CoBa (Gong et al., "CoBa: Convergence Balancer for Multitask Finetuning of Large Language
Models", EMNLP 2024; MFTCoder's "self-paced loss", ``weighted_loss_mode: coba``) measures, after
every ``--coba-update-interval`` steps, each task's per-token validation loss on
``--coba-sample-valid-num`` global batches of the validation split, divided by the task's loss
at the start of training (over ``--eval-iters`` batches): v_i(t). Before a step, once
``--coba-warmup-steps`` steps are done (equal weights until then), with T tasks:

- s_i: the least-squares slope of v_i over its last ``--coba-history-length`` measurements
  (measurements without the task left out); S: that of max_i v_i;
- relative convergence RCS = softmax(T s / sum_j |s_j|): the slower a task converges relative to
  the others, the more weight;
- absolute convergence ACS = softmax(-n s_i / sum_tau |s_i(tau)|) over the task's last n <=
  history-length slopes: a task whose own loss starts rising (over-fitting) loses weight;
- divergence factor DF = m softmax(-m tau S / sum |S|)[last] over all m slopes S so far
  (``--coba-tau``): near 1 while the losses fall together, small once they start diverging;
- w = softmax(T (DF RCS + (1 - DF) ACS)); when some w_i < 1 / (10 T): w = 0.9 w + 1 / (10 T).

The weights then enter case3 (``multitask.py``): L = sum_t w_t L_t / sum_t w_t over the tasks of
the global batch. As in MFTCoder, these are MFTCoder's formulas (``CoBaStatus``); the measured
validation loss here is the global per-token loss of the batches (all data-parallel ranks),
the same on every rank.

Checkpoints hold CoBa's state (``state_dict``: the tasks, the start losses, every measurement,
slope and the weights, and how many validation samples its own pass has read) as plain
tensors, lists and numbers under ``"coba"``: in the rank files (``--ckpt-format torch``) and in
torch_dist's common (non-sharded) state. A resumed run continues the weights exactly; a
checkpoint without that state (older, or not a coba run) starts CoBa afresh, with a warning.
"""

import logging
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron_ext.checkpoint.format import CheckpointError
from megatron_ext.config import ConfigError
from megatron_ext.training import data
from megatron_ext.training.evaluation import eval_mode
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")

KEY = "coba"  # the checkpoint entry


def checkpoint_entry(trainer) -> dict:
    """What a checkpoint adds for CoBa: ``{"coba": state}`` in a coba run, else nothing."""
    return {KEY: trainer.coba.state_dict()} if trainer.coba is not None else {}


def note_resumed(trainer, state: Optional[dict], source) -> None:
    """A resume from ``source`` (loaded before ``CoBaSchedule`` exists): keep its CoBa state,
    None if it has none, for the schedule to restore."""
    trainer.coba_checkpoint = (str(source), state)


def window_slope(values: List[float]) -> float:
    """Least-squares slope of the finite ``values`` against their positions (0 with < 2)."""
    points = [(x, y) for x, y in enumerate(values) if math.isfinite(y)]
    if len(points) < 2:
        return 0.0
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _normalized(values: torch.Tensor, scale: float) -> torch.Tensor:
    total = values.abs().sum()
    return scale * values / total if total > 0 else torch.zeros_like(values)


class CoBa:
    """The weights' state: validation measurements and the slopes fitted so far."""

    def __init__(self, num_tasks: int, history_length: int, tau: float):
        self.num_tasks, self.history_length, self.tau = num_tasks, history_length, tau
        self.history: List[List[float]] = []  # v(t) per measurement (nan: task not measured)
        self.slopes: List[torch.Tensor] = []  # s per update
        self.total_slopes: List[float] = []  # S per update

    def record(self, normalized_losses: List[float]) -> None:
        self.history.append(list(normalized_losses))

    def weights(self) -> torch.Tensor:
        """w from the measurements so far (the module docstring), float64 [tasks]."""
        n_tasks = self.num_tasks
        window = self.history[-self.history_length:]
        slopes = torch.tensor([window_slope([v[i] for v in window]) for i in range(n_tasks)],
                              dtype=torch.float64)
        worst = [max((x for x in v if math.isfinite(x)), default=math.nan) for v in window]
        self.slopes.append(slopes)
        self.total_slopes.append(window_slope(worst))
        rcs = F.softmax(_normalized(slopes, n_tasks), dim=-1)
        recent = torch.stack(self.slopes[-self.history_length:])  # [n, tasks]
        own = recent.abs().sum(dim=0)
        acs = F.softmax(torch.where(own > 0, -recent.size(0) * slopes / own.clamp(min=1e-300),
                                    torch.zeros_like(slopes)), dim=-1)
        total = torch.tensor(self.total_slopes, dtype=torch.float64)
        m = total.numel()
        df = m * F.softmax(-self.tau * _normalized(total, m), dim=-1)[-1]
        weights = F.softmax(n_tasks * (df * rcs + (1 - df) * acs), dim=-1)
        floor = 1.0 / (10 * n_tasks)
        if (weights < floor).any():
            weights = weights * (1 - floor * n_tasks) + floor
        return weights


class CoBaSchedule:
    """When the trainer measures and reweighs (``Trainer.train`` calls both hooks)."""

    def __init__(self, trainer):
        t = trainer.config.training
        self.warmup, self.interval = t.coba_warmup_steps, t.coba_update_interval
        self.batches = t.coba_sample_valid_num
        tasks = len(trainer.multitask.names)
        self.coba = CoBa(tasks, t.coba_history_length, t.coba_tau)
        trainer.multitask.weights = torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
        self.multitask = trainer.multitask
        self.tasks = list(trainer.multitask.names)
        self.start: Optional[torch.Tensor] = None  # per-task validation loss at the start
        self.valid_samples = 0  # read by its own validation pass
        if trainer.coba_checkpoint is not None:
            self._restore(trainer, *trainer.coba_checkpoint)
        if trainer.valid_ds is None:  # megatron-core builds no dataset for a split of 0
            raise ConfigError(
                f"--weighted-loss-mode coba measures the validation split, and --split "
                f"{trainer.config.data.split} leaves it empty: give it a share (e.g. --split "
                f"98,2,0)")
        topo = trainer.topology
        # Its own pass over the validation split: --eval-interval's evaluations keep theirs.
        self.iterator = data.cyclic_iterator(trainer.valid_ds, t.micro_batch_size, topo.dp_rank,
                                             topo.data_parallel, self.valid_samples,
                                             num_workers=trainer.config.data.num_workers)

    def state_dict(self) -> dict:
        """Everything the next weights depend on, as plain tensors, lists and numbers."""
        tasks, c = len(self.tasks), self.coba
        return {
            "tasks": list(self.tasks),
            "start": None if self.start is None else self.start.clone(),
            "history": torch.tensor(c.history, dtype=torch.float64).reshape(-1, tasks),
            "slopes": (torch.stack(c.slopes) if c.slopes
                       else torch.zeros(0, tasks, dtype=torch.float64)),
            "total_slopes": torch.tensor(c.total_slopes, dtype=torch.float64),
            "weights": self.multitask.weights.clone(),
            "valid_samples": self.valid_samples,
        }

    def _restore(self, trainer, source: str, state: Optional[dict]) -> None:
        if state is None:
            log_once(logger, logging.WARNING,
                     f"{source} holds no CoBa state (an older checkpoint, or not from a "
                     f"--weighted-loss-mode coba run): CoBa starts afresh at iteration "
                     f"{trainer.iteration}: start losses measured now, an empty loss history "
                     f"(equal weights until it has measurements again)")
            return
        if list(state["tasks"]) != self.tasks:
            raise CheckpointError(
                f"{source} was saved by a --weighted-loss-mode coba run with the tasks "
                f"{list(state['tasks'])}, this run has {self.tasks}: its CoBa weights do not "
                f"fit; resume with the same --data-path, or start without --load")
        self.start = None if state["start"] is None else state["start"].clone()
        self.coba.history = [[float(v) for v in row] for row in state["history"]]
        self.coba.slopes = [row.clone() for row in state["slopes"]]
        self.coba.total_slopes = [float(v) for v in state["total_slopes"]]
        self.multitask.weights = state["weights"].clone().to(torch.float64)
        self.valid_samples = int(state["valid_samples"])

    def _measure(self, trainer, batches: int) -> torch.Tensor:
        totals = 0
        with eval_mode(trainer), torch.no_grad():
            for _ in range(batches):
                trainer._forward_backward(self.iterator, forward_only=True)
                totals = totals + trainer.task_totals
        self.valid_samples += batches * trainer.config.training.global_batch_size
        return torch.where(totals[1] > 0, totals[0] / totals[1].clamp(min=1),
                           torch.full_like(totals[0], math.nan))

    def before_step(self, trainer) -> None:
        step = trainer.iteration
        if self.start is None:
            self.start = self._measure(trainer, trainer.config.logging.eval_iters)
        if step >= self.warmup and step % self.interval == 0 and self.coba.history:
            trainer.multitask.weights = self.coba.weights()

    def after_step(self, trainer, stats: dict) -> None:
        stats["task_weights"] = trainer.multitask.weights.clone()
        if trainer.iteration % self.interval == 0:
            losses = self._measure(trainer, self.batches) / self.start
            self.coba.record([float(v) for v in losses])
