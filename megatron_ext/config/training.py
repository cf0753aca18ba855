"""Training flags (Megatron-LM's ``training``, ``learning rate``, ``regularization`` and
``mixed precision`` groups)."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_ext.config.flags import OURS, flag

_MFT = dict(status=OURS)  # multi-task fine-tuning (MFTCoder)


@dataclass
class TrainingConfig:
    GROUP = "training"

    micro_batch_size: int = flag(1, "Samples per micro-batch on each data-parallel rank.")
    global_batch_size: Optional[int] = flag(
        None, "Samples per optimizer step; unset: --micro-batch-size x data-parallel size. "
        "With a ramp-up or schedule: the final size.")
    rampup_batch_size: Optional[List[int]] = flag(
        None, "Batch-size ramp-up: START INCREMENT SAMPLES. The global batch grows from START "
        "by INCREMENT to --global-batch-size, evenly over the first SAMPLES samples.",
        nargs=3, metavar=("START", "INCREMENT", "SAMPLES"),
        note="megatron-core 0.16's rule, on every version")
    step_batch_size_schedule: Optional[List[str]] = flag(
        None, "Step-wise global batch size: THRESHOLD:SIZE entries (thresholds in consumed "
        "tokens, suffixes K M B T), e.g. '0:16 2.4B:320'; the first threshold is 0.",
        nargs="+", note="0.19's rule, on every version; --global-batch-size may repeat the last "
        "size")
    train_iters: Optional[int] = flag(
        None, "Iterations to train (exclusive with --train-samples; neither: 10).")
    train_samples: Optional[int] = flag(
        None, "Samples to train (exclusive with --train-iters).")
    exit_interval: Optional[int] = flag(
        None, "Save and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[int] = flag(
        None, "Save and exit once training has run this many minutes.")
    exit_signal_handler: bool = flag(
        False, "On --exit-signal (SIGTERM) to any rank: finish the iteration, save and exit.")
    exit_signal: str = flag(
        "SIGTERM", "The signal --exit-signal-handler acts on.",
        choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"])
    calculate_per_token_loss: bool = flag(
        False, "Average the loss over all tokens of the global batch; without it, each "
        "micro-batch's per-token mean is averaged over micro-batches and data-parallel ranks.",
        note="off by default, as in Megatron-LM; our examples and fine-tuning pass it")
    manual_gc: bool = flag(
        False, "Disable Python's automatic garbage collector; collect around evaluation and "
        "every --manual-gc-interval steps instead, at the same point on every rank.")
    manual_gc_interval: int = flag(0, "Steps between manual collections (0: none).")
    empty_unused_memory_level: int = flag(
        0, "Release cached CUDA memory: 1 after each forward-backward, 2 also after each "
        "optimizer step.", choices=[0, 1, 2], note="no effect without a GPU (said once)")

    lr: float = flag(1e-4, "Peak learning rate.", group="learning rate")
    min_lr: float = flag(0.0, "Final learning rate of the decay.", group="learning rate")
    decoupled_lr: Optional[float] = flag(
        None, "Peak learning rate of the input embedding and output layer.",
        group="learning rate")
    decoupled_min_lr: Optional[float] = flag(
        None, "Final learning rate of the input embedding and output layer.",
        group="learning rate")
    lr_decay_style: str = flag("linear", "Learning-rate decay.", group="learning rate",
                               choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = flag(0, "Warmup iterations.", group="learning rate")
    lr_warmup_samples: int = flag(0, "Warmup samples.", group="learning rate")
    lr_warmup_fraction: Optional[float] = flag(
        None, "Warmup as a fraction of the decay.", group="learning rate")
    lr_decay_iters: Optional[int] = flag(
        None, "Iterations of the decay; unset: --train-iters.", group="learning rate")
    lr_decay_samples: Optional[int] = flag(
        None, "Samples of the decay; unset: --train-samples.", group="learning rate")
    # Megatron-LM's spellings (with the underscore), as its scripts write them.
    override_opt_param_scheduler: bool = flag(
        False, "On --load, schedule the learning rate and weight decay by this run's flags, "
        "not the checkpoint's.", group="learning rate", name="--override-opt_param-scheduler",
        aliases=("--override-opt-param-scheduler",))
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, "On --load, keep the checkpoint's learning-rate and weight-decay schedule, "
        "whatever this run's flags say. Without either flag a schedule flag that differs from "
        "the checkpoint's is an error.", group="learning rate",
        name="--use-checkpoint-opt_param-scheduler",
        aliases=("--use-checkpoint-opt-param-scheduler",))

    weight_decay: float = flag(0.01, "Weight decay.", group="regularization")
    adam_beta1: float = flag(0.9, "Adam beta1.", group="regularization")
    adam_beta2: float = flag(0.999, "Adam beta2.", group="regularization")
    adam_eps: float = flag(1e-8, "Adam epsilon.", group="regularization")
    clip_grad: float = flag(1.0, "Clip the global gradient norm to this.",
                            group="regularization")
    initial_loss_scale: float = flag(2.0**32, "First loss scale of --fp16.",
                                     group="mixed precision")
    grad_reduce_in_bf16: bool = flag(
        False, "Reduce gradients over data-parallel ranks in bf16 instead of fp32.",
        group="mixed precision", note="with --bf16 (otherwise no effect, said once)")
    seed: int = flag(1234, "Random seed (weights, dropout, data order).",
                     group="initialization")

    # Multi-task fine-tuning (MFTCoder's names, dashed): megatron_ext/training/multitask.py,
    # docs/finetune.md.
    weighted_loss_mode: str = flag(
        "case1", "How the tasks of --is-instruction-dataset data (MFTCoder's data_name) weigh "
        "in the loss: case1, every trained token alike; case2, every conversation alike; "
        "case3, each task's per-token mean, the tasks of the global batch averaged equally; "
        "case4, each task's mean over its conversations, tasks averaged equally; coba, case3 "
        "with CoBa's convergence-balancing task weights (from the validation loss slopes).",
        choices=["case1", "case2", "case3", "case4", "coba"], note="MFTCoder's "
        "weighted_loss_mode; all but case1 need --calculate-per-token-loss", **_MFT)
    task_weights: Optional[List[str]] = flag(
        None, "case3, case4: each task's fixed weight w_t, the loss being sum_t w_t L_t / "
        "sum_t w_t over the tasks of the global batch; one non-negative number per task, in "
        "the run's task order (the start-up line 'tasks (data_name): ...': the --data-path "
        "datasets in order, each one's data_name tasks in order of first appearance), space- "
        "or comma-separated or as MFTCoder writes them ('[1.0,2.0]'); or by name, NAME:W for "
        "every task (code:2 math:0.5). Unset: 1 each.",
        nargs="+", note="MFTCoder's task_weights", **_MFT)
    coba_warmup_steps: int = flag(
        100, "coba: steps with equal task weights before CoBa adjusts them.", **_MFT)
    coba_history_length: int = flag(
        200, "coba: validation-loss window (in updates) over which the slopes are fitted.",
        **_MFT)
    coba_tau: float = flag(5.0, "coba: temperature of the divergence factor.", **_MFT)
    coba_update_interval: int = flag(1, "coba: steps between weight updates.", **_MFT)
    coba_sample_valid_num: int = flag(
        1, "coba: validation global batches measured per update.", **_MFT)


def parse_task_weights(values: List[str]) -> List[Tuple[Optional[str], float]]:
    """``--task-weights`` as (task name or None, weight): numbers in the tasks' order (``1 2``,
    ``1,2``, MFTCoder's ``[1.0,2.0]``) or ``NAME:W`` entries (a task name holds no ``:``);
    ValueError when one is not a finite non-negative number, names are mixed with positions,
    a name repeats, or all weights are 0."""
    items = []
    for value in values:
        for part in value.strip().strip("[]").split(","):
            # A name may hold spaces: only positional numbers are also split on whitespace.
            items += [part.strip()] if ":" in part else part.split()
    weights = []
    for item in items:
        name, _, number = item.rpartition(":")
        try:
            weight = float(number)
        except ValueError:
            raise ValueError(f"{item!r} is not a number (or NAME:NUMBER)") from None
        if not (0 <= weight < float("inf")):
            raise ValueError(f"{item}: a weight must be finite and >= 0")
        weights.append((name.strip() if ":" in item else None, weight))
    named = [name for name, _ in weights if name is not None]
    if named and len(named) != len(weights):
        raise ValueError("give every weight as NAME:W, or none (the tasks' order)")
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise ValueError(f"task {repeated[0]!r} is given twice")
    if not any(weight for _, weight in weights):
        raise ValueError("all weights are 0: nothing would be trained")
    return weights
