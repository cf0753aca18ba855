"""Stopping early to resume later, as Megatron-LM: ``--exit-interval``, ``--exit-duration-in-mins``
and ``--exit-signal-handler``. At the end of the first iteration where one holds, the trainer
saves (with ``--save``) and returns; each is decided alike on every rank, so all ranks save and
stop together, and the command resumes with the same flags.

``--exit-signal-handler``: a scheduler about to end the job (SLURM's ``scancel`` or time limit,
Kubernetes) sends SIGTERM (or ``--exit-signal``) to the ranks, to all or to some. The handler,
installed when the trainer is built, only notes it; the iteration in progress finishes, and the
first rank that got it stops them all (Megatron-LM's DistributedSignalHandler, whose all-gather
is an all-reduce here). Without the flag the signal kills the process as usual.
"""

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.config.training import TrainingConfig


class EarlyExit:
    def __init__(self, config: TrainingConfig):
        self.config = config
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self._received = False
        self._signal = signal.Signals[config.exit_signal] if config.exit_signal_handler else None
        self._previous = (signal.signal(self._signal, self._receive) if self._signal is not None
                          else None)

    def _receive(self, signum, frame) -> None:
        self._received = True  # acted on at the end of the iteration, on every rank

    def reason(self, iteration: int) -> Optional[str]:
        """Why training stops after ``iteration`` (None: it goes on). Collective when
        --exit-duration-in-mins or --exit-signal-handler is given: call it on every rank."""
        t = self.config
        if t.exit_interval and iteration % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        if not t.exit_duration_in_mins and self._signal is None:  # as Megatron-LM: 0 = no limit
            return None
        # One all-reduce for both: the slowest clock, and a signal on any rank.
        late = bool(t.exit_duration_in_mins) and \
            time.time() - self.start_time > 60 * t.exit_duration_in_mins
        state = torch.tensor([float(late), float(self._received)], device=platform.device())
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        if state[1].item():
            return f"--exit-signal-handler: {self._signal.name} received"
        if state[0].item():
            return f"--exit-duration-in-mins {t.exit_duration_in_mins}"
        return None

    def close(self) -> None:
        """Give the signal back its previous handler."""
        if self._signal is not None:
            signal.signal(self._signal, self._previous)
            self._signal = None
