"""Logging, evaluation and profiling flags (Megatron-LM's ``logging`` and ``validation``
groups)."""

from dataclasses import dataclass
from typing import List, Optional

from megatron_ext.config.flags import NO_OP, OURS, flag

_WANDB = dict(status=NO_OP, note="Weights & Biases is not integrated; use --tensorboard-dir")


@dataclass
class LoggingConfig:
    GROUP = "logging"

    log_interval: int = flag(100, "Log every this many iterations.")
    tensorboard_dir: Optional[str] = flag(None, "Write TensorBoard scalars (and --profile "
                                          "traces) here.")
    log_throughput: bool = flag(False, "Add Megatron-LM's 'throughput per GPU (TFLOP/s/GPU)' "
                                "to each log line.")
    profile: bool = flag(
        False, "Record a torch profiler trace of steps --profile-step-start to "
        "--profile-step-end on the --profile-ranks, into --tensorboard-dir (else ./profile).",
        note="torch profiler (Megatron-LM's --use-pytorch-profiler), CPU too")
    profile_step_start: int = flag(10, "First profiled step.")
    profile_step_end: int = flag(12, "Step at which profiling stops.")
    profile_ranks: List[int] = flag(
        [], "Global ranks that --profile traces; none given: every rank.", nargs="+",
        note="Megatron-LM 0.19's default (before: rank 0)")
    wandb_project: Optional[str] = flag(None, "Weights & Biases project.", **_WANDB)
    wandb_exp_name: Optional[str] = flag(None, "Weights & Biases run name.", **_WANDB)
    eval_interval: int = flag(1000, "Evaluate every this many iterations (0: never).",
                              group="validation")
    eval_iters: int = flag(100, "Global batches per evaluation.", group="validation")
    verbose: bool = flag(
        False, "Every rank logs, and library warnings and INFO dumps are shown unfiltered "
        "(megatron_ext/training/logs.py).", status=OURS)
    eval_prompts: Optional[str] = flag(
        None, "At each evaluation, log the model's greedy answers to these prompts (one per "
        "line, or JSONL with \"prompt\"), as XTuner's chat hook.", group="validation",
        status=OURS)
