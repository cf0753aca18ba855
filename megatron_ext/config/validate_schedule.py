"""The schedule's checks, part of ``validate``: batch sizes and their ramp-up, iteration- or
sample-based training length, warmup and decay (filled in samples by Megatron-LM's rules)."""

import os

from megatron_ext import platform
from megatron_ext.config.components import Config, ConfigError, require
from megatron_ext.config.schedule import BatchSizeSchedule, parse_step_schedule

# Megatron-LM has no default (and fails late without either flag); short runs are what a
# missing flag means here.
DEFAULT_TRAIN_ITERS = 10


def validate_schedule(config: Config, dp: int) -> None:
    """Batch sizes (micro, global, ramp-up), the training length and the learning-rate and
    weight-decay schedule, in samples as megatron-core counts them; evaluation intervals."""
    t, m, given = config.training, config.model, config.given
    logs = config.logging
    require(t.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    require(logs.log_interval >= 1, f"--log-interval {logs.log_interval}: must be >= 1")
    require(logs.eval_interval >= 0 and logs.eval_iters >= 0,
             "--eval-interval and --eval-iters must be >= 0 (0: no evaluation)")
    require(logs.eval_prompts is None or os.path.isfile(logs.eval_prompts),
             f"--eval-prompts {logs.eval_prompts}: no such file (one prompt per line, or JSONL "
             f'with "prompt")')
    require(logs.eval_prompts is None or logs.eval_interval > 0,
             "--eval-prompts answers at each evaluation: set --eval-interval > 0")
    # Batch size and its schedule.
    require(t.rampup_batch_size is None or t.step_batch_size_schedule is None,
             "--rampup-batch-size and --step-batch-size-schedule are exclusive; pick one")
    steps = None
    if t.step_batch_size_schedule is not None:
        try:
            steps = parse_step_schedule(t.step_batch_size_schedule, m.seq_length)
        except ValueError as error:
            raise ConfigError(f"--step-batch-size-schedule: {error}") from None
        # Megatron-LM takes the final size from the schedule; its own script also passes it as
        # --global-batch-size, accepted here when the two agree.
        require(t.global_batch_size in (None, steps[-1][1]),
                 f"--global-batch-size {t.global_batch_size} differs from the last size of "
                 f"--step-batch-size-schedule ({steps[-1][1]}); drop --global-batch-size")
        t.global_batch_size = steps[-1][1]
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.rampup_batch_size is not None:
        start, increment, samples = t.rampup_batch_size
        require(0 < start < t.global_batch_size and increment > 0 and samples >= 0
                 and (t.global_batch_size - start) % increment == 0,
                 f"--rampup-batch-size {start} {increment} {samples}: needs 0 < START < "
                 f"--global-batch-size {t.global_batch_size}, INCREMENT > 0 dividing their "
                 "difference, SAMPLES >= 0")
    schedule = BatchSizeSchedule(t.global_batch_size, t.rampup_batch_size, steps)
    for size in schedule.sizes():
        require(size % (t.micro_batch_size * dp) == 0,
                 f"--global-batch-size {size} is not divisible by "
                 f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
    # Iteration- or sample-based, as in Megatron-LM: one form for all three quantities.
    require(t.train_iters is None or t.train_samples is None,
             "--train-iters and --train-samples are exclusive; pick one")
    if t.train_iters is None and t.train_samples is None:
        t.train_iters = DEFAULT_TRAIN_ITERS
    if t.train_samples is not None:
        bad = [f for f in ("lr_decay_iters", "lr_warmup_iters") if f in given]
        require(not bad, f"--{bad[0].replace('_', '-') if bad else ''} with --train-samples: "
                 "sample-based training takes --lr-decay-samples/--lr-warmup-samples")
        require(t.train_samples >= 1, f"--train-samples {t.train_samples}: must be >= 1")
        t.train_iters = schedule.iterations(t.train_samples)
    else:
        bad = [f for f in ("lr_decay_samples", "lr_warmup_samples") if f in given]
        require(not bad, f"--{bad[0].replace('_', '-') if bad else ''} with --train-iters: "
                 "iteration-based training takes --lr-decay-iters/--lr-warmup-iters")
        t.train_samples = t.train_iters * t.global_batch_size
        if t.lr_decay_iters is not None:
            t.lr_decay_samples = t.lr_decay_iters * t.global_batch_size
        t.lr_warmup_samples = t.lr_warmup_iters * t.global_batch_size
    require(t.train_iters >= 1, f"--train-iters {t.train_iters}: must be >= 1")
    if t.lr_decay_samples is None:
        t.lr_decay_samples = t.train_samples
    if t.lr_decay_iters is None:
        t.lr_decay_iters = -(-t.lr_decay_samples // t.global_batch_size)
    warmup_flags = [f for f in ("lr_warmup_iters", "lr_warmup_samples") if f in given]
    require(t.lr_warmup_fraction is None or not warmup_flags,
             f"--lr-warmup-fraction and --{(warmup_flags or ['x'])[0].replace('_', '-')} are "
             "exclusive; pick one")
    if t.lr_warmup_fraction is not None:
        t.lr_warmup_samples = t.lr_warmup_fraction * t.lr_decay_samples
    if "train_samples" in given:
        decay = f"--lr-decay-samples {t.lr_decay_samples} (default: --train-samples)"
        warmup = f"{t.lr_warmup_samples} samples from --lr-warmup-samples/--lr-warmup-fraction"
    else:
        decay = f"--lr-decay-iters {t.lr_decay_iters} (default: --train-iters)"
        warmup = (f"{t.lr_warmup_samples / t.global_batch_size:g} iterations from "
                  "--lr-warmup-iters/--lr-warmup-fraction")
    require(t.lr_warmup_samples < t.lr_decay_samples,
             f"the warmup ({warmup}) must be shorter than {decay}")
    require(t.min_lr <= t.lr, f"--min-lr {t.min_lr} is above --lr {t.lr}")
    require(not (t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are "
             "exclusive; pick one")
    if t.decoupled_lr is not None and t.decoupled_min_lr is not None:
        require(t.decoupled_min_lr <= t.decoupled_lr,
                 f"--decoupled-min-lr {t.decoupled_min_lr} is above --decoupled-lr "
                 f"{t.decoupled_lr}")
    if t.grad_reduce_in_bf16 and not m.bf16:
        config.notices.append("--grad-reduce-in-bf16: no effect without --bf16 (gradients are "
                              "reduced in the parameters' fp32, as in Megatron-LM)")
    require(t.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0")
    require(t.exit_duration_in_mins is None or t.exit_duration_in_mins >= 0,
             "--exit-duration-in-mins must be >= 0")
    if t.empty_unused_memory_level and not platform.cuda_available():
        config.notices.append(f"--empty-unused-memory-level {t.empty_unused_memory_level}: no "
                              "effect without a CUDA device (no cached CUDA memory to release)")
