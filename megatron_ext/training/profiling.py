"""``--profile``: a torch profiler trace of training steps [start, end) on each of the
``--profile-ranks`` (every rank when none are given, as Megatron-LM 0.19).

Megatron-LM profiles with nsys unless ``--use-pytorch-profiler``; here the torch profiler is the
one that runs everywhere (CPU activities, and CUDA kernels where there is a GPU). The trace goes
where Megatron-LM's torch-profiler traces go, ``--tensorboard-dir`` (TensorBoard's profile
plugin reads it), else ``./profile``.
"""

import logging
import os

import torch

logger = logging.getLogger("megatron_ext")


class StepProfiler:
    def __init__(self, start: int, end: int, out_dir: str, enabled: bool):
        self.start, self.end, self.out_dir = start, end, out_dir
        self.enabled = enabled
        self.profiler = None

    def before_step(self, completed_steps: int) -> None:
        """Called before each step with the number of steps already done."""
        if not self.enabled:
            return
        if completed_steps == self.start and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        elif completed_steps == self.end:
            self.stop()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(self.out_dir)(self.profiler)
        logger.info(f"profile of steps {self.start + 1}-{self.end} written to {self.out_dir}")
        self.profiler, self.enabled = None, False
