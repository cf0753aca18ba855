"""Parallelism and distributed flags (Megatron-LM's ``distributed`` group)."""

from dataclasses import dataclass
from typing import List, Optional

from megatron_ext.config.flags import REFUSED, WARNED, flag

CP_ALLGATHER, CP_A2A, CP_P2P, CP_A2A_P2P = "allgather", "a2a", "p2p", "a2a+p2p"
# Megatron-LM's --cp-comm-type choices, all implemented by our core attention
# (model/attention.py, model/ring_attention.py).
CP_COMM_TYPES = (CP_P2P, CP_A2A, CP_ALLGATHER, CP_A2A_P2P)
CP_RINGS = (CP_P2P, CP_A2A_P2P)  # the schemes with our ring attention (no dropout)


def a2a_heads_error(num_heads: int, num_query_groups: int, tp: int, cp: int, origin: str = "",
                    hierarchical: Optional[List[int]] = None) -> Optional[str]:
    """--cp-comm-type a2a gives each CP rank 1 / CP of its TP rank's query heads and KV groups
    (a2a+p2p, ``hierarchical`` = [A, B]: 1 / A, the all-to-all is within groups of A CP
    ranks): the error where a count does not split so (``origin``: where a2a came from), else
    None. Said by validate before any process group, and by CoreAttention for megatron-core's
    ``cp_comm_type`` (model/context_parallel.py)."""
    if hierarchical:
        scheme, ways = CP_A2A_P2P, hierarchical[0]
        over = (f"the all-to-all size {ways} (the first of --hierarchical-context-parallel-sizes "
                f"{' '.join(map(str, hierarchical))})")
    else:
        scheme, ways, over = CP_A2A, cp, f"--context-parallel-size {cp}"
    for count, name in ((num_heads, "--num-attention-heads"),
                        (num_query_groups, "--num-query-groups")):
        if (count // tp) % ways:
            return (f"--cp-comm-type {scheme}{origin} splits the heads of each tensor-parallel "
                    f"rank over the CP ranks: {name} {count} / --tensor-model-parallel-size "
                    f"{tp} = {count // tp} is not divisible by {over}; change them or use "
                    "--cp-comm-type allgather")
    return None


@dataclass
class ParallelConfig:
    GROUP = "distributed"

    tensor_model_parallel_size: int = flag(1, "Tensor model parallel size.")
    pipeline_model_parallel_size: int = flag(1, "Pipeline model parallel size.")
    decoder_first_pipeline_num_layers: Optional[int] = flag(
        None, "Transformer layers on the first pipeline stage; the stages after it (but a "
        "--decoder-last-pipeline-num-layers one) share the rest evenly. Default: even split.",
        note="megatron-core's num_layers_in_first_pipeline_stage; checkpoints and "
        "convert_ckpt.py follow it (a torch_dist checkpoint resumes at any split)")
    decoder_last_pipeline_num_layers: Optional[int] = flag(
        None, "Transformer layers on the last pipeline stage; the stages before it (but a "
        "--decoder-first-pipeline-num-layers one) share the rest evenly. Default: even split.",
        note="megatron-core's num_layers_in_last_pipeline_stage; as the first-stage flag")
    account_for_embedding_in_pipeline_split: bool = flag(
        False, "Count the embedding as a layer of the first stage when splitting.",
        status=REFUSED, note="refused: give the first stage one layer less with "
        "--decoder-first-pipeline-num-layers instead (the same split)")
    account_for_loss_in_pipeline_split: bool = flag(
        False, "Count the loss as a layer of the last stage when splitting.",
        status=REFUSED, note="refused: give the last stage one layer less with "
        "--decoder-last-pipeline-num-layers instead (the same split)")
    context_parallel_size: int = flag(
        1, "Context parallel size: each sequence is split over this many ranks (world size = "
        "TP x PP x CP x DP); docs/context-parallel.md.")
    # Megatron-LM's default is p2p (Transformer Engine's ring); ours stays allgather, which
    # attention dropout does not rule out (our ring has none) and which gives the same numbers:
    # a Megatron script that sets only --context-parallel-size runs as it does there.
    cp_comm_type: List[str] = flag(
        [CP_ALLGATHER], "Communication of context parallelism in attention, one value or one "
        "per layer as in Megatron-LM: allgather (K/V all-gathered over the CP group), a2a "
        "(Ulysses: an all-to-all trades heads for the whole sequence; needs the heads and KV "
        "groups per TP rank divisible by CP), p2p (ring attention: K/V blocks pass around "
        "the CP group, no rank holds the whole sequence's K/V; needs --attention-dropout 0) or "
        "a2a+p2p (hierarchical, with --hierarchical-context-parallel-sizes: a2a within groups "
        "of CP ranks, the ring across them), all exact for causal and packed documents.",
        nargs="+", choices=list(CP_COMM_TYPES),
        note="allgather (our default; Megatron-LM's is p2p), a2a, p2p and a2a+p2p (the ring "
        "ones with --attention-dropout 0), mixed per layer too, without Transformer Engine")
    hierarchical_context_parallel_sizes: Optional[List[int]] = flag(
        None, "--cp-comm-type a2a+p2p: A B, the all-to-all within groups of A adjacent CP "
        "ranks, the ring across B of them (A x B = --context-parallel-size).", nargs="+",
        note="their product must be --context-parallel-size, as in Megatron-LM; a2a+p2p "
        "takes two sizes (megatron-core's hierarchical CP groups); with other schemes the "
        "groups are built, unused, and a notice says so")
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
    local_rank: Optional[int] = flag(
        None, "Set by torch.distributed.launch; LOCAL_RANK, which it also sets, is what is "
        "read.", aliases=("--local_rank",),
        note="accepted as Megatron-LM does; the LOCAL_RANK environment variable is read")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        None, "Layers per virtual pipeline stage: each pipeline rank holds its layers as model "
        "chunks of this many, run by megatron-core's interleaved 1F1B schedule.",
        note="megatron-core's interleaved schedule; an even split only (with "
        "--decoder-first/last-pipeline-num-layers use --num-virtual-stages-per-pipeline-rank)")
    num_virtual_stages_per_pipeline_rank: Optional[int] = flag(
        None, "Virtual pipeline stages (model chunks) per pipeline rank, for megatron-core's "
        "interleaved 1F1B schedule.",
        note="megatron-core's interleaved schedule; each stage's layers split evenly into "
        "the chunks")
    microbatch_group_size_per_virtual_pipeline_stage: Optional[int] = flag(
        None, "Interleaved schedule: micro-batches run in a row on one model chunk before the "
        "next (default: --pipeline-model-parallel-size).",
        note="megatron-core's microbatch_group_size_per_vp_stage")
    overlap_p2p_comm: bool = flag(
        True, "Do not overlap the interleaved schedule's pipeline communication with "
        "computation (batched send/receive instead; needs --pipeline-model-parallel-size > 2).",
        name="--no-overlap-p2p-communication", action="store_false",
        note="as Megatron-LM: only the interleaved schedule overlaps")
    distributed_timeout_minutes: int = flag(
        10, "Timeout of torch.distributed collectives, in minutes.")

    @property
    def virtual_stages(self) -> int:
        """Model chunks per pipeline rank (1: the plain 1F1B schedule), once validated
        (config/validate_pipeline.py)."""
        return self.num_virtual_stages_per_pipeline_rank or 1
