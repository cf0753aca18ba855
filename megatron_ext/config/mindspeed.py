"""MindSpeed-LLM's training flags (its dense Llama-family example scripts), with MindSpeed-LLM's
meaning: honoured where megatron-core does the same thing, a no-op said once where they pick an
Ascend kernel or memory layout that leaves the numbers unchanged, refused with the way out
otherwise (config/validate_mindspeed.py decides; docs/megatron-compat.md lists them)."""

from dataclasses import dataclass
from typing import Optional

from megatron_ext.config.flags import HONOURED, NO_OP, WARNED, flag

# megatron-core's Llama 3.1 RoPE scaling (``rope_scaling=True``) fixes these three values.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192.0}
# MindSpeed-LLM's --model-type-hf names onto convert_ckpt.py's.
HF_MODEL_TYPES = {"llama2": "llama2", "llama3": "llama3", "qwen25": "qwen2", "qwen2": "qwen2",
                  "mistral": "mistral"}
# MindSpeed's context-parallel algorithms: each computes exact attention. ulysses_cp_algo is
# our --cp-comm-type a2a, megatron_cp_algo (Megatron's ring) our p2p, hybrid_cp_algo (Ulysses
# within groups of --ulysses-degree-in-cp adjacent CP ranks, the ring across them) our a2a+p2p
# (the rings: allgather with attention dropout, which they lack); the others run as allgather
# (the same numbers).
CP_ALGOS = ("megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo", "adaptive_cp_algo",
            "hybrid_adaptive_cp_algo", "kvallgather_cp_algo")
CP_ALGO_NOTES = {"a2a": "Ulysses: heads all-to-all over the CP group, exact attention",
                 "p2p": "ring attention: K/V blocks passed around the CP group, exact attention",
                 "a2a+p2p": "Ulysses within groups of --ulysses-degree-in-cp adjacent CP ranks, "
                 "the ring across the groups, exact attention",
                 "allgather": "K/V all-gathered over the CP group: exact attention, as every "
                 "MindSpeed algorithm"}

_SAME = "the numbers are the same"


def _kernel(what: str) -> dict:
    return dict(status=NO_OP, note=f"MindSpeed-LLM's Ascend fused {what} kernel; megatron-core's "
                f"own {what} runs here: {_SAME}")


@dataclass
class MindSpeedConfig:
    GROUP = "mindspeed-llm"

    use_flash_attn: bool = flag(
        False, "MindSpeed-LLM's flash attention: runs as our --attention-backend auto (flash-attn "
        "where it can run, else the exact torch varlen or SDPA kernel); an explicit "
        "--attention-backend wins.", status=HONOURED,
        note="MindSpeed-LLM's: our --attention-backend auto (flash-attn when it can run here), "
        "logged")
    use_fused_rmsnorm: bool = flag(False, "Accepted: MindSpeed-LLM's fused RMSNorm kernel.",
                                   **_kernel("RMSNorm"))
    use_fused_swiglu: bool = flag(False, "Accepted: MindSpeed-LLM's fused SwiGLU kernel.",
                                  **_kernel("SwiGLU"))
    use_fused_rotary_pos_emb: bool = flag(
        False, "Accepted: MindSpeed-LLM's fused rotary embedding kernel.", **_kernel("RoPE"))
    lora_fusion: bool = flag(
        False, "Accepted: MindSpeed-LLM's fused LoRA kernel.", group="lora", status=NO_OP,
        note=f"MindSpeed-LLM's Ascend fused LoRA kernel; our LoRA layers run here: {_SAME}")
    reuse_fp32_param: bool = flag(
        False, "Accepted: MindSpeed-LLM keeps the bf16 weights inside the fp32 main weights' "
        "memory.", status=NO_OP, note="an NPU memory layout of the same weights (megatron-core "
        f"keeps both copies): {_SAME}")
    recompute_activation_function: bool = flag(
        False, "Accepted: MindSpeed-LLM recomputes the MLP activation in the backward pass.",
        status=NO_OP, note="a memory trade, recomputation gives the same numbers; megatron-core "
        "has no dense activation-only recompute (its moe_act is for MoE experts), so the "
        "activation is kept; --recompute-granularity saves memory here")
    recompute_activation_function_num_layers: Optional[int] = flag(
        None, "Accepted with --recompute-activation-function.", status=NO_OP,
        note="as --recompute-activation-function")
    swap_attention: bool = flag(
        False, "Accepted: MindSpeed-LLM swaps attention activations to host memory.",
        status=NO_OP, note=f"an NPU memory trade: {_SAME}")
    use_ascend_coc: bool = flag(
        False, "Accepted: Ascend compute-over-communication (TP matmuls overlapped with their "
        "communication).", status=NO_OP, note=f"an Ascend overlap of the same matmuls: {_SAME}")
    coc_fused_kernel: bool = flag(False, "Accepted with --use-ascend-coc.", status=NO_OP,
                                  note="as --use-ascend-coc")
    use_ascend_mc2: bool = flag(
        False, "Accepted: Ascend MC2 (TP matmul and communication fused).", status=NO_OP,
        note=f"an Ascend fusion of the same matmuls and collectives: {_SAME}")
    context_parallel_algo: Optional[str] = flag(
        None, "MindSpeed-LLM's context-parallel algorithm; every one computes exact attention: "
        "ulysses_cp_algo runs as our --cp-comm-type a2a, megatron_cp_algo as p2p (ring), "
        "hybrid_cp_algo as a2a+p2p with --hierarchical-context-parallel-sizes U CP/U (U: "
        "--ulysses-degree-in-cp), the rings as allgather with --attention-dropout > 0, the "
        "others as allgather; an explicit --cp-comm-type wins.", group="distributed",
        choices=list(CP_ALGOS), status=HONOURED,
        note="ulysses_cp_algo as --cp-comm-type a2a (heads all-to-all), megatron_cp_algo as "
        "p2p (ring), hybrid_cp_algo as a2a+p2p (Ulysses within groups of "
        "--ulysses-degree-in-cp, the ring across them), the rings as allgather with attention "
        "dropout, the others as allgather (every algorithm is exact attention), logged")
    ulysses_degree_in_cp: Optional[int] = flag(
        None, "--context-parallel-algo hybrid_cp_algo: the Ulysses (all-to-all) size U within "
        "the CP group, the ring across CP / U groups; must divide --context-parallel-size.",
        group="distributed", status=HONOURED,
        note="with hybrid_cp_algo: our --hierarchical-context-parallel-sizes U CP/U (the same "
        "groups: U adjacent CP ranks); without it, said to have no effect")
    use_cp_send_recv_overlap: bool = flag(
        False, "Accepted: MindSpeed-LLM overlaps its ring attention's send/recv with the "
        "attention of the block in hand.", group="distributed", status=NO_OP,
        note=f"an overlap of the same blocks' communication: {_SAME}")
    num_layer_list: Optional[str] = flag(
        None, "MindSpeed-LLM's layers per pipeline stage, e.g. 3,4,4,5: the first and last "
        "may differ, the stages between must be equal (megatron-core's uneven split).",
        group="distributed", status=HONOURED,
        note="as --decoder-first/last-pipeline-num-layers; a list whose middle stages differ "
        "is refused")
    no_shared_storage: bool = flag(
        False, "Nodes without shared storage: with --enable-hf2mg-convert each node's first "
        "rank converts --load.", group="distributed", status=HONOURED,
        note="for --enable-hf2mg-convert; the dataset indices are rank 0's, and every rank "
        "checks it sees them (all stop naming --data-cache-path otherwise, docs/multinode.md)")
    rope_scaling_type: Optional[str] = flag(
        None, "MindSpeed-LLM's RoPE scaling: llama3 is megatron-core's Llama 3.1 scaling "
        "(--use-rope-scaling, with --rope-scaling-factor).", group="network size",
        choices=["llama3", "yarn", "longrope", "plm"], status=HONOURED,
        note="llama3 honoured (megatron-core's, low 1, high 4, original 8192); yarn, longrope, "
        "plm refused")
    low_freq_factor: Optional[float] = flag(
        None, "Llama 3.1 RoPE scaling: low-frequency factor (megatron-core fixes 1).",
        group="network size", status=HONOURED, note="1 only (megatron-core's); else refused")
    high_freq_factor: Optional[float] = flag(
        None, "Llama 3.1 RoPE scaling: high-frequency factor (megatron-core fixes 4).",
        group="network size", status=HONOURED, note="4 only (megatron-core's); else refused")
    original_max_position_embeddings: Optional[float] = flag(
        None, "Llama 3.1 RoPE scaling: the pretraining context (megatron-core fixes 8192).",
        group="network size", status=HONOURED, note="8192 only (megatron-core's); else refused")
    padded_vocab_size: Optional[int] = flag(
        None, "Rows of the padded vocabulary (instead of --make-vocab-size-divisible-by); must "
        "divide by TP and hold the tokenizer's vocabulary.", group="network size",
        status=HONOURED, note="MindSpeed-LLM's; the padded rows never count in the loss")
    stage: Optional[str] = flag(
        None, "MindSpeed-LLM's training mode: sft is fine-tuning on --is-instruction-dataset "
        "shards; dpo, ray_ppo, ray_online_dpo, ray_grpo are refused.", group="training",
        choices=["sft", "dpo", "ray_ppo", "ray_online_dpo", "ray_grpo"], status=HONOURED,
        note="sft (with --is-instruction-dataset); the RL stages refused")
    no_shuffle: bool = flag(
        False, "Instruction data in file order, each epoch alike (MindSpeed-LLM's loss "
        "comparisons).", group="data and dataloader", status=HONOURED,
        note="with --is-instruction-dataset; refused for pretraining (megatron-core's "
        "GPTDataset always shuffles)")
    padded_samples: bool = flag(
        False, "MindSpeed-LLM fills an epoch's last global batch from index 0.",
        group="data and dataloader", status=WARNED,
        note="epochs run back to back here: the last batch of an epoch continues into the next "
        "epoch's order (every sample once per epoch); said once")
    no_pad_to_seq_lengths: bool = flag(
        False, "Accepted: MindSpeed-LLM pads a micro-batch to its longest conversation.",
        group="data and dataloader", status=NO_OP,
        note="padding carries no loss and no attention here (conversations are packed and "
        f"isolated), so {_SAME}")
    handler_name: Optional[str] = flag(
        None, "Accepted in a training script: the record format of preprocess_data.py.",
        group="data and dataloader", status=NO_OP,
        note="the shards are already tokenized; it acts in preprocess_data.py")
    prompt_type: Optional[str] = flag(
        None, "Accepted in a training script: the chat template of preprocess_data.py.",
        group="data and dataloader", status=NO_OP,
        note="the shards carry the template; it acts in preprocess_data.py --prompt-type")
    pack: bool = flag(
        False, "Accepted in a training script: preprocess_data.py's --pack.",
        group="data and dataloader", status=NO_OP,
        note="the shards say whether they are packed (checked against --seq-length); it acts "
        "in preprocess_data.py")
    neat_pack: bool = flag(
        False, "Accepted: MindSpeed-LLM's per-conversation (jagged) attention over packed "
        "instruction samples.", group="data and dataloader", status=NO_OP,
        note="packed conversations always attend to themselves alone here (variable-length "
        "attention from the shards' sequence boundaries); needs no --reset-attention-mask")
    tokenizer_not_use_fast: bool = flag(
        False, "Accepted: MindSpeed-LLM's slow Hugging Face tokenizer.", group="tokenizer",
        status=NO_OP, note="tokenizer.json (the fast tokenizer) is read; Llama 3 and Qwen2.5 "
        "ship only that one, so use_fast=False loads it too")
    enable_hf2mg_convert: bool = flag(
        False, "--load names a Hugging Face model: convert it at start-up (once; reused) into "
        "{load}/megatron_cache_tp{TP}pp{PP}ep1 with convert_ckpt.py's converter, and load that.",
        group="checkpointing", status=HONOURED,
        note="MindSpeed-LLM's place and reuse (here only while the HF files and options it "
        "was converted from are unchanged); the conversion is convert_ckpt.py's")
    model_type_hf: Optional[str] = flag(
        None, "The Hugging Face architecture for --enable-hf2mg-convert (MindSpeed-LLM's names: "
        "llama2, llama3, qwen25, mistral); unset: from config.json.", group="checkpointing",
        choices=sorted(HF_MODEL_TYPES), status=HONOURED,
        note="qwen25 is convert_ckpt.py's qwen2; without --enable-hf2mg-convert: no effect, "
        "said once")
