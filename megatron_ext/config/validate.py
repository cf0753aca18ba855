"""``validate``: the one place of checks (the schedule's in validate_schedule.py, the data's
in validate_data.py, other frameworks' flags in validate_compat.py, all called from here). It
fills derived defaults by Megatron-LM's rules, raises ``ConfigError`` naming the flag to
change, and records in ``config.notices`` what it decided about flags that are accepted but
not honoured as such (no-ops, warned-and-disabled). The pipeline split and the interleaved
schedule: validate_pipeline.py."""

import math
import os
from dataclasses import fields

from megatron_ext import platform
from megatron_ext.config.checkpoint import CheckpointConfig
from megatron_ext.config.components import Config, ConfigError, default_ffn_hidden_size, require
from megatron_ext.config.flags import NO_OP, flag_name
from megatron_ext.config.lora import TARGET_MODULES
from megatron_ext.config.model import MEGATRON_ATTENTION_BACKENDS
from megatron_ext.config.parallel import CP_A2A, CP_A2A_P2P, CP_RINGS, a2a_heads_error
from megatron_ext.config.training import parse_task_weights
from megatron_ext.config.validate_compat import validate_compat
from megatron_ext.config.validate_data import validate_data
from megatron_ext.config.validate_pipeline import validate_pipeline
from megatron_ext.config.validate_schedule import validate_schedule


# Under --save (or .cache/): the dataset index caches and shard scans of a run.
DATA_CACHE_DIR = "data_cache"


def validate(config: Config, world_size: int) -> None:
    """Check every flag and fill derived defaults (Megatron's rules), naming the flag to change."""
    dp = _validate_parallel(config, world_size)
    validate_compat(config)  # maps other frameworks' flags onto ours, before they are checked
    _validate_model(config)
    _validate_context_parallel(config)  # after both: --context-parallel-algo, the head counts
    _refuse_unsupported(config)
    validate_schedule(config, dp)
    validate_pipeline(config, dp)  # after the batch sizes: the interleaved schedule's groups
    validate_data(config)
    _validate_multitask(config)
    _validate_logging_and_checkpoint(config)
    _validate_lora(config)
    _validate_profile(config, world_size)


def _validate_parallel(config: Config, world_size: int) -> int:
    p = config.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    cp = p.context_parallel_size
    require(tp >= 1 and pp >= 1 and cp >= 1, "--tensor-model-parallel-size, "
             "--pipeline-model-parallel-size and --context-parallel-size must be >= 1")
    require(world_size % (tp * pp * cp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; change them "
             "or --nproc-per-node")
    require(p.distributed_backend != "nccl" or platform.cuda_available(),
             "--distributed-backend nccl needs a CUDA device; use gloo (the default on CPU)")
    require(p.distributed_backend != "gloo" or not platform.cuda_available(),
             "--distributed-backend gloo cannot reduce-scatter CUDA tensors (sequence parallelism, "
             "the distributed optimizer); use nccl (the default with a GPU)")
    if p.sequence_parallel and tp == 1:
        # Megatron-LM's rule: sequence parallelism needs TP ranks to split over.
        p.sequence_parallel = False
        config.notices.append("--sequence-parallel with --tensor-model-parallel-size 1: "
                              "disabled (nothing to split the sequence over)")
    require(p.distributed_timeout_minutes >= 1, "--distributed-timeout-minutes must be >= 1")
    require(not p.overlap_param_gather or p.use_distributed_optimizer,
             "--overlap-param-gather needs --use-distributed-optimizer")
    require(not p.overlap_param_gather or p.overlap_grad_reduce,
             "--overlap-param-gather needs --overlap-grad-reduce")
    return world_size // (tp * pp * cp)


def _validate_context_parallel(config: Config) -> None:
    """What the zigzag layout (docs/context-parallel.md) needs: each sequence cut into 2 x CP
    equal chunks, each CP rank's share cut again over TP ranks with sequence parallelism; with
    a2a, the heads and KV groups of each TP rank split over the CP ranks (a2a+p2p: over the
    first of --hierarchical-context-parallel-sizes, whose product is CP)."""
    p, m = config.parallel, config.model
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    # As Megatron-LM: a per-layer list's length is checked only with CP (its TransformerConfig
    # does so; without CP no layer reads it), the hierarchical sizes' product always.
    require(cp == 1 or len(p.cp_comm_type) in (1, m.num_layers),
             f"--cp-comm-type has {len(p.cp_comm_type)} values: give one, or one per layer "
             f"(--num-layers {m.num_layers})")
    sizes = p.hierarchical_context_parallel_sizes
    hierarchical = CP_A2A_P2P in p.cp_comm_type
    require(not hierarchical or sizes is not None,
             f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A B: the "
             f"all-to-all within groups of A adjacent CP ranks, the ring across B of them, "
             f"A x B = --context-parallel-size {cp}")
    if sizes is not None:
        shown = " ".join(map(str, sizes))
        require(not hierarchical or (len(sizes) == 2 and min(sizes) >= 1
                                     and sizes[0] * sizes[1] == cp),
                 f"--hierarchical-context-parallel-sizes {shown}: a2a+p2p takes two sizes A B "
                 f">= 1 (the all-to-all within groups of A, the ring across B) with A x B = "
                 f"--context-parallel-size {cp}")
        require(min(sizes) >= 1 and math.prod(sizes) == cp,
                 f"--hierarchical-context-parallel-sizes {shown}: sizes >= 1 whose product is "
                 f"--context-parallel-size {cp}")
        if not hierarchical:
            config.notices.append(
                f"--hierarchical-context-parallel-sizes {shown} without --cp-comm-type "
                "a2a+p2p: megatron-core builds the CP sub-groups, no layer's scheme uses them")
    if cp == 1:
        return
    ring = sorted(set(p.cp_comm_type) & set(CP_RINGS))
    require(not ring or m.attention_dropout == 0,
             f"--cp-comm-type {' '.join(ring)} (ring attention) has no attention dropout: pass "
             f"--attention-dropout 0 (now {m.attention_dropout}; Megatron-LM's default is 0.1), "
             "or use --cp-comm-type allgather or a2a")
    origin = ("" if "cp_comm_type" in config.given else
              f" (--context-parallel-algo {config.mindspeed.context_parallel_algo})")
    for scheme, split in ((CP_A2A, None), (CP_A2A_P2P, sizes)):
        if scheme in p.cp_comm_type:
            error = a2a_heads_error(m.num_attention_heads, m.num_query_groups, tp, cp, origin,
                                    hierarchical=split)
            require(error is None, error)
    require(m.seq_length % (2 * cp) == 0,
             f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size {cp}: "
             f"each sequence is cut into {2 * cp} equal chunks (two per CP rank)")
    # Answering prompts decodes token by token with a KV cache: no sequence to split.
    require(config.logging.eval_prompts is None,
             f"--eval-prompts with --context-parallel-size {cp}: decoding has no sequence to "
             "split over CP ranks; drop --eval-prompts and run generate_gpt.py on a checkpoint "
             "(CP is not part of its layout)")
    # With SP each CP rank's share (seq / CP per row) is split again over TP ranks.
    require(not p.sequence_parallel or m.seq_length % (2 * cp * tp) == 0,
             f"--sequence-parallel with --context-parallel-size {cp} splits each CP rank's "
             f"--seq-length {m.seq_length} / {cp} tokens over --tensor-model-parallel-size {tp}: "
             f"make --seq-length divisible by 2 x {cp} x {tp} = {2 * cp * tp}")


def _validate_model(config: Config) -> None:
    m, tp = config.model, config.parallel.tensor_model_parallel_size
    require(m.num_attention_heads % tp == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if m.group_query_attention:
        require(m.num_query_groups is not None,
                 "--group-query-attention needs --num-query-groups")
    else:
        require(m.num_query_groups is None,
                 "--num-query-groups needs --group-query-attention")
        m.num_query_groups = m.num_attention_heads
    require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by "
             f"--num-query-groups {m.num_query_groups}")
    require(m.num_query_groups % tp == 0,
             f"--num-query-groups {m.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if m.kv_channels is None:
        require(m.hidden_size % m.num_attention_heads == 0,
                 f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                 f"{m.num_attention_heads}; set --kv-channels")
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = default_ffn_hidden_size(m.hidden_size, m.swiglu)
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    require(m.position_embedding_type == "rope" or m.seq_length <= m.max_position_embeddings,
             f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
             f"{m.max_position_embeddings}")
    require(m.add_position_embedding or m.position_embedding_type == "rope",
             "--no-position-embedding is deprecated (as in Megatron-LM); use "
             "--position-embedding-type rope")
    require(0.0 < m.rotary_percent <= 1.0, f"--rotary-percent {m.rotary_percent}: must be in "
             "(0, 1]")
    require(not (m.bf16 and m.fp16), "--bf16 and --fp16 are exclusive; pick one")
    if m.recompute_granularity == "full":
        require(m.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform|block")
        if m.recompute_num_layers is None:
            m.recompute_num_layers = 1
    if m.cross_entropy_loss_fusion and not platform.cuda_available():
        # megatron-core compiles its fused kernel with torch.compile: over a minute of C++
        # compilation per process on a CPU, for the same numbers.
        m.cross_entropy_loss_fusion = False
        config.notices.append("--cross-entropy-loss-fusion: megatron-core's fused kernel is "
                              "for GPUs; on this CPU the unfused cross entropy (same result) "
                              "runs")
    if m.attention_backend in MEGATRON_ATTENTION_BACKENDS:
        ours = MEGATRON_ATTENTION_BACKENDS[m.attention_backend]
        config.notices.append(f"--attention-backend {m.attention_backend} (Megatron-LM's name) "
                              f"runs as our --attention-backend {ours}")
        m.attention_backend = ours
    for name, flag, why in (
            ("use_mcore_models", "--use-mcore-models", "megatron-core models are the only ones"),
            ("masked_softmax_fusion", "--no-masked-softmax-fusion",
             "our core attention has no masked-softmax kernel"),
            ("add_position_embedding", "--no-position-embedding", "rope has no position table")):
        if name in config.given:
            config.notices.append(f"{flag}: no effect ({why})")


def _refuse_unsupported(config: Config) -> None:
    """Flags of Megatron-LM's scripts that the parser accepts and this project cannot honour
    yet; each refusal is one check, removed when its feature lands."""
    p, given = config.parallel, config.given
    fp8 = sorted("--" + n.replace("_", "-") for n in given if n.startswith("fp8_"))
    require(not fp8, f"{' '.join(fp8)}: FP8 needs Transformer Engine and a GPU with FP8 "
             "(Hopper or newer), and is not wired here yet; drop the --fp8-* flags and train "
             "with --bf16")
    for name in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        which = "first" if "embedding" in name else "last"
        require(not getattr(p, name), f"--{name.replace('_', '-')}: not supported; give the "
                 f"{which} stage one layer less with --decoder-{which}-pipeline-num-layers "
                 f"instead (the same split)")
    moe = sorted("--" + n.replace("_", "-") for n in given
                 if n.startswith("moe_") or n == "num_experts")
    require(not moe and p.expert_model_parallel_size == 1,
             f"{' '.join(moe) or '--expert-model-parallel-size'}: MoE is not supported yet; "
             "drop the MoE flags to train the dense model")


def _validate_profile(config: Config, world_size: int) -> None:
    logs = config.logging
    if logs.profile:
        require(0 <= logs.profile_step_start < logs.profile_step_end,
                 f"--profile-step-start {logs.profile_step_start} must be below "
                 f"--profile-step-end {logs.profile_step_end}")
        outside = [r for r in logs.profile_ranks if not 0 <= r < world_size]
        require(not outside, f"--profile-ranks {' '.join(map(str, outside))}: no such rank "
                 f"in a world of {world_size} ranks")


def _validate_multitask(config: Config) -> None:
    t, mode = config.training, config.training.weighted_loss_mode
    coba = [name for name in ("coba_warmup_steps", "coba_history_length", "coba_tau",
                              "coba_update_interval", "coba_sample_valid_num")
            if name in config.given]
    require(mode == "coba" or not coba, f"--{coba[0].replace('_', '-') if coba else ''} "
             "needs --weighted-loss-mode coba")
    if t.task_weights is not None:
        # MFTCoder reads task_weights in case3 and case4 only (coba sets its own weights).
        require(mode in ("case3", "case4"), f"--task-weights weighs the tasks of "
                 f"--weighted-loss-mode case3 or case4, not {mode}")
        try:
            parse_task_weights(t.task_weights)
        except ValueError as error:
            raise ConfigError(f"--task-weights {' '.join(t.task_weights)}: {error}") from None
    if mode == "case1":
        return
    require(config.data.is_instruction_dataset, f"--weighted-loss-mode {mode} weighs the "
             "tasks of instruction data: it needs --is-instruction-dataset")
    # The weights divide by counts over the whole global batch; megatron-core's
    # per-micro-batch averaging (without the flag) would weigh micro-batches instead.
    require(t.calculate_per_token_loss, f"--weighted-loss-mode {mode} needs "
             "--calculate-per-token-loss")
    if mode == "coba":
        require(config.logging.eval_iters > 0, "--weighted-loss-mode coba measures the "
                 "validation split: --eval-iters must be > 0")
        for name in ("coba_warmup_steps", "coba_history_length", "coba_update_interval",
                     "coba_sample_valid_num"):
            require(getattr(t, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(t.coba_tau > 0, "--coba-tau must be > 0")


def _writable_directory(path, flag: str) -> None:
    """``path`` is, or can be made, a directory this process writes to; else the run would
    stop once its process groups exist (the index cache) or after training (a checkpoint)."""
    if path is None:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.path.isdir(existing),
             f"{flag} {path}: {existing} is a file, not a directory; give {flag} a directory")
    require(os.access(existing, os.W_OK | os.X_OK),
             f"{flag} {path}: {existing} is not writable; give {flag} a directory you can "
             f"write to")


def _validate_logging_and_checkpoint(config: Config) -> None:
    c, d = config.checkpoint, config.data
    if d.data_cache_path is None and not d.mock_data:
        # One cache folder beside the run: shards stay read-only and can be shared.
        d.data_cache_path = os.path.join(c.save or ".cache", DATA_CACHE_DIR)
    for path, flag in ((c.save, "--save"), (d.data_cache_path, "--data-cache-path"),
                       (config.logging.tensorboard_dir, "--tensorboard-dir")):
        _writable_directory(path, flag)
    for name in ("wandb_project", "wandb_exp_name"):
        if name in config.given:
            config.notices.append(f"--{name.replace('_', '-')}: no effect (Weights & Biases is "
                                  "not integrated; use --tensorboard-dir)")
    require(c.save_interval is None or c.save is not None, "--save-interval needs --save DIR")
    for f in fields(CheckpointConfig):
        if f.name.endswith("_from_checkpoint_args") and f.name in config.given \
                and not c.use_checkpoint_args:  # ignored, as in Megatron-LM
            config.notices.append(f"{flag_name(f)}: no effect without --use-checkpoint-args")
    require(c.save_total_limit is None or c.save_total_limit >= 1,
             "--save-total-limit must be >= 1")
    require(not (config.training.override_opt_param_scheduler
                  and config.training.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
             "contradict each other; pass one")
    require(not c.async_save or c.ckpt_format == "torch_dist",
             "--async-save needs --ckpt-format torch_dist (the torch format saves synchronously)")
    for f in fields(CheckpointConfig):  # Megatron-LM's dist-ckpt tuning and deprecated flags
        if f.metadata["status"] == NO_OP and f.name in config.given:
            config.notices.append(f"{flag_name(f)}: no effect ({f.metadata['note']})")


def _validate_lora(config: Config) -> None:
    lora, given = config.lora, config.given
    require(not lora.qlora, "--qlora: QLoRA trains LoRA on a 4-bit quantized base, which needs "
             "a GPU 4-bit library (bitsandbytes) that is not available here; drop --qlora to "
             "train LoRA on the base in its own precision")
    unknown = [m for m in lora.lora_target_modules if m not in TARGET_MODULES]
    require(not unknown, f"--lora-target-modules {' '.join(unknown)}: not a layer of this model; "
             f"choose from {' '.join(TARGET_MODULES)} (megatron-core's names)")
    require(len(set(lora.lora_target_modules)) == len(lora.lora_target_modules),
             "--lora-target-modules names a layer twice")
    require(lora.lora_r >= 1, f"--lora-r {lora.lora_r}: the rank must be >= 1")
    require(lora.lora_alpha > 0, f"--lora-alpha {lora.lora_alpha}: must be > 0")
    require(0.0 <= lora.lora_dropout < 1.0,
             f"--lora-dropout {lora.lora_dropout}: must be in [0, 1)")
    require(lora.enabled or lora.lora_load is None,
             "--lora-load needs --lora-target-modules (the adapted layers, as at training)")
    ignored = sorted(n for n in ("lora_r", "lora_alpha", "lora_dropout") if n in given)
    if ignored and not lora.enabled:
        config.notices.append(f"{' '.join('--' + n.replace('_', '-') for n in ignored)} without "
                              "--lora-target-modules: LoRA is off (MindSpeed-LLM's rule)")
    c = config.checkpoint
    # A LoRA save is the adapters alone: in the base's directory it would become the latest
    # checkpoint there, and the base's --load would then find adapters instead of a model.
    require(not (lora.enabled and c.save and c.load
                 and os.path.realpath(c.save) == os.path.realpath(c.load)),
             f"--save {c.save} is the --load directory (the LoRA base): LoRA saves the adapters "
             f"alone, which would replace the base as the latest checkpoint there; give --save "
             f"a directory of its own (resume later with --lora-load it)")
    if lora.enabled and config.checkpoint.finetune and lora.lora_load is None:
        config.notices.append("--finetune with LoRA and no --lora-load: no effect (--load is "
                              "always the base, loaded as weights only)")
