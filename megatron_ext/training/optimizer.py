"""megatron-core's DDP wrapper, optimizer and learning-rate schedule, built from the config.

The optimizer is megatron-core's Adam (distributed over DP ranks with
--use-distributed-optimizer; --decoupled-lr/--decoupled-min-lr apply to the embedding and
output layer). The schedule counts samples, as Megatron-LM's: a resumed run follows this run's
flags or the checkpoint's as --override-opt_param-scheduler says, after checkpoint_state.py's
check_schedule has compared the two.
"""

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext import platform
from megatron_ext.config import Config


def wrap_ddp(config: Config, module, chunk: int = 0) -> DistributedDataParallel:
    """megatron-core's DDP around model chunk ``chunk``; chunks after the first reduce their
    gradients in one bucket, as Megatron-LM's (the interleaved schedule overlaps the first's)."""
    p, t, m = config.parallel, config.training, config.model
    ddp_config = DistributedDataParallelConfig(
        # Megatron-LM: --grad-reduce-in-bf16 keeps bf16 gradients for the reduction.
        grad_reduce_in_fp32=not (m.bf16 and t.grad_reduce_in_bf16),
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    return DistributedDataParallel(module.config, ddp_config, module, disable_bucketing=chunk > 0)


def build_optimizer(config: Config, model: list):
    t, m = config.training, config.model
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=m.bf16, fp16=m.fp16,
            params_dtype=model[0].module.config.params_dtype,
            initial_loss_scale=t.initial_loss_scale,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer,
            decoupled_lr=t.decoupled_lr, decoupled_min_lr=t.decoupled_min_lr,
        ),
        model,
    )
    platform.mark_decoupled_lr_groups(optimizer, t.lr, t.decoupled_lr)
    return optimizer


def build_scheduler(config: Config, optimizer) -> OptimizerParamScheduler:
    t = config.training
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_samples, lr_decay_steps=t.lr_decay_samples,
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.train_samples, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not t.override_opt_param_scheduler,
        override_opt_param_scheduler=t.override_opt_param_scheduler,
    )
