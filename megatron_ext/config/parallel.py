"""Parallelism and distributed flags (Megatron-LM's ``distributed`` group)."""

from dataclasses import dataclass
from typing import Optional

from megatron_ext.config.flags import REFUSED, WARNED, flag


@dataclass
class ParallelConfig:
    GROUP = "distributed"

    tensor_model_parallel_size: int = flag(1, "Tensor model parallel size.")
    pipeline_model_parallel_size: int = flag(1, "Pipeline model parallel size.")
    context_parallel_size: int = flag(
        1, "Context parallel size.", status=REFUSED,
        note="1 only: context parallelism is not supported yet; drop the flag or set 1")
    expert_model_parallel_size: int = flag(
        1, "Expert model parallel size (MoE).", group="moe", status=REFUSED,
        note="1 only: MoE is not supported yet")
    sequence_parallel: bool = flag(
        False, "Split the sequence over tensor-parallel ranks outside attention and MLP "
        "(needs --tensor-model-parallel-size > 1).", status=WARNED,
        note="with --tensor-model-parallel-size 1: warned and disabled, as Megatron-LM does")
    use_distributed_optimizer: bool = flag(
        False, "Shard optimizer state over data-parallel ranks (megatron-core's distributed "
        "optimizer).")
    overlap_grad_reduce: bool = flag(
        False, "Overlap the data-parallel gradient reduce with the backward pass "
        "(megatron-core DDP buckets).")
    overlap_param_gather: bool = flag(
        False, "Overlap the distributed optimizer's parameter all-gather with the next forward "
        "pass (needs --use-distributed-optimizer and --overlap-grad-reduce).")
    distributed_backend: Optional[str] = flag(
        None, "torch.distributed backend: nccl with a GPU, gloo without (the default follows "
        "the machine).", choices=["nccl", "gloo"])
    distributed_timeout_minutes: int = flag(
        10, "Timeout of torch.distributed collectives, in minutes.")
