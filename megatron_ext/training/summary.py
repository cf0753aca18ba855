"""The start-up summary: what is trained, where, on what data, and the memory it takes per rank.

``log_summary(trainer)`` runs once the model, optimizer and datasets exist. Every rank counts
its own parameters and the one collective (``all_gather_object``) brings them to all ranks
alike; rank 0 prints (``logs.SUMMARY_LOGGER``). Parameters are counted as Megatron-LM counts
them: a weight replicated over TP ranks (norms) once, the output layer tied to the embedding
once (megatron-core's ``param_is_not_tensor_parallel_duplicate``/``param_is_not_shared``).

Memory per rank is an estimate from the parameter counts and the flags, without megatron-core's
bucket padding:
- weights: parameters x their dtype's size;
- gradients: trainable parameters (all of them, or LoRA's adapters) x 4 (megatron-core DDP's
  fp32 ``main_grad`` buffer, ``grad_reduce_in_fp32``);
- optimizer (of the trainable parameters): Adam's two fp32 moments, plus an fp32 copy of the
  weights for --bf16/--fp16,
  divided over DP ranks with --use-distributed-optimizer;
- activations: what autograd keeps per micro-batch (``activation_bytes``), times the
  micro-batches a 1F1B stage holds at once (PP - stage, at most the accumulation steps).
  With LoRA the full model's: the adapters' own activations (small: r per token, plus the
  gathered input with SP) and what a frozen base no longer keeps roughly cancel (measured).
tests/training/test_summary.py measures all four on CPU (tensor storage sizes, and the
tensors autograd saves) and checks the estimate within ``MARGIN``.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_ext.checkpoint.args import padded_vocab_size
from megatron_ext.checkpoint.sharding import stage_layers
from megatron_ext.config import Config
from megatron_ext.config.blend import resolve
from megatron_ext.config.parallel import CP_ALLGATHER
from megatron_ext.training.logs import SUMMARY_LOGGER

logger = logging.getLogger(SUMMARY_LOGGER)

MARGIN = 0.10  # relative error of the memory estimate, checked by the test


@dataclass
class RankParams:
    rank: int
    tp: int
    pp: int
    dp: int
    cp: int
    local: int  # every parameter this rank holds
    unique: int  # counted once over the model (see the module docstring)
    embedding: int  # of ``unique``: word and position embeddings
    output_layer: int  # of ``unique``: an untied output layer
    trainable: int = 0  # of ``local``: what has gradients and optimizer state (LoRA: adapters)
    unique_trainable: int = 0  # of ``unique``


def count_parameters(chunks: List[torch.nn.Module], rank: int, tp: int, pp: int, dp: int,
                     cp: int = 0) -> RankParams:
    """The counts of a rank's model chunks (one, or one per virtual stage)."""
    local = unique = embedding = output = trainable = unique_trainable = 0
    named = [item for chunk in chunks for item in chunk.named_parameters()]
    for name, param in named:
        local += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        if not (param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)):
            continue
        unique += param.numel()
        unique_trainable += param.numel() if param.requires_grad else 0
        if name.startswith("embedding."):
            embedding += param.numel()
        elif name.startswith("output_layer."):
            output += param.numel()
    return RankParams(rank, tp, pp, dp, cp, local, unique, embedding, output, trainable,
                      unique_trainable)


def _dtype_bytes(config: Config) -> int:
    return torch.finfo(config.model.params_dtype).bits // 8


def state_bytes(config: Config, params: int, dp: int, trainable=None) -> Dict[str, int]:
    """Weights, gradients and optimizer state of ``params`` parameters on one rank, of which
    ``trainable`` (default: all) have gradients and optimizer state; the distributed optimizer
    shards over the ``dp`` data-parallel ranks and the CP ranks."""
    half = config.model.bf16 or config.model.fp16
    shards = (dp * config.parallel.context_parallel_size
              if config.parallel.use_distributed_optimizer else 1)
    trainable = params if trainable is None else trainable
    return {"weights": params * _dtype_bytes(config), "gradients": trainable * 4,
            "optimizer": trainable * (8 + (4 if half else 0)) // shards}


def activation_bytes(config: Config, vocab_size: int, stage: int) -> int:
    """Bytes autograd keeps for one micro-batch on pipeline ``stage`` (megatron-core's local
    layer spec, our core attention, which never materializes the score matrix, and torch's
    norms), as measured on CPU by tests/training/test_summary.py.

    Per token and layer, split over TP (h-sized ones with SP only): each norm's input and
    output (torch's RMSNorm keeps its input and the normalized input in fp32), the fused QKV
    output, the rotated q and k, the attention output (q = heads x head dim, kv = groups x head
    dim; the projection reads a view of it), the MLP's fc1 output, activation and fc2 input
    (SwiGLU: 2f + f + f + f, its linear half is copied; GELU: f + f), dropout masks at a byte
    per element; per layer, RoPE's cos/sin tables. The last stage adds the final norm and the
    vocabulary-parallel cross entropy's fp32 softmax. With context parallelism a rank holds
    1/CP of the tokens, plus the K and V of the whole sequence that allgather gathers per layer
    (a2a's whole rows of heads / CP take the place of the local q/k/v: the same size; p2p's ring
    keeps only its own K/V, the blocks in flight are freed after each step).
    """
    m, p, t = config.model, config.parallel, config.training
    tp = p.tensor_model_parallel_size
    sp = tp if p.sequence_parallel else 1
    e = _dtype_bytes(config)
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    rope = m.position_embedding_type == "rope"
    norm = (8 + e if m.normalization == "RMSNorm" else 2 * e) * h / sp  # bytes per token
    per_token = (2 * norm + e * ((q + 2 * kv) + ((q + kv) if rope else 0) + q) / tp
                 + e * (5 if m.swiglu else 2) * f / tp + (2 * h / sp if m.hidden_dropout else 0))
    cp = p.context_parallel_size
    tokens = t.micro_batch_size * m.seq_length // cp
    gathered_kv = 2 * e * kv / tp * t.micro_batch_size * m.seq_length if cp > 1 else 0
    per_layer = per_token * tokens + (4 * m.seq_length * m.kv_channels * e if rope else 0)
    held = [i for chunk in _stage_layers(config, stage) for i in chunk]
    layers = len(held)
    schemes = p.cp_comm_type * (m.num_layers // len(p.cp_comm_type))  # one per layer
    allgather_layers = [schemes[i] for i in held].count(CP_ALLGATHER)
    if m.recompute_granularity == "full":
        # Each recomputed chunk keeps its input; backward rebuilds one chunk at a time.
        chunk = m.recompute_num_layers
        per_stage = ((layers // chunk) * h / sp * e * tokens + chunk * per_layer
                     + min(chunk, allgather_layers) * gathered_kv)
    else:
        per_stage = layers * per_layer + allgather_layers * gathered_kv
    if stage == p.pipeline_model_parallel_size - 1:
        vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
        per_stage += (norm + vocab / tp * 4) * tokens
    return int(per_stage)


def _stage_layers(config: Config, stage: int) -> List[range]:
    """The layers of each model chunk of ``stage``."""
    p, vp = config.parallel, config.parallel.virtual_stages
    return [stage_layers(config.model.num_layers, stage, p.pipeline_model_parallel_size,
                         p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers,
                         chunk, vp) for chunk in range(vp)]


def in_flight_microbatches(config: Config, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations (of all the stage's layers) a 1F1B stage holds at its
    peak; interleaved, the chunk-micro-batches of megatron-core's warmup plus one, in whole
    micro-batches (a chunk holds 1 / chunks of the layers)."""
    p, vp = config.parallel, config.parallel.virtual_stages
    pp = p.pipeline_model_parallel_size
    if vp == 1:
        return min(pp - stage, num_microbatches)
    group = p.microbatch_group_size_per_virtual_pipeline_stage or pp
    warmup = (pp - stage - 1) * 2 + (vp - 1) * group
    return min(warmup + 1, num_microbatches * vp) / vp


# ------------------------------------------------------------------------------------ report


def _n(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _ranks(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    ranks, parts, start = sorted(ranks), [], None
    for i, rank in enumerate(ranks):
        start = rank if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts)


def _model_lines(config: Config, vocab_size: int, ranks: List[RankParams]) -> List[str]:
    m, p = config.model, config.parallel
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                               p.tensor_model_parallel_size)
    dp0 = [r for r in ranks if r.dp == 0 and r.cp == 0]
    total = sum(r.unique for r in dp0)
    embedding, output = sum(r.embedding for r in dp0), sum(r.output_layer for r in dp0)
    return [
        f"model      {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}"
        f"{' (SwiGLU)' if m.swiglu else ''}, heads {m.num_attention_heads}, query groups "
        f"{m.num_query_groups}, head dim {m.kv_channels}, seq {m.seq_length}, "
        f"{m.position_embedding_type}, {m.normalization}",
        f"vocabulary {vocab_size} from the tokenizer, padded to {padded} (+{padded - vocab_size}; "
        f"--make-vocab-size-divisible-by {m.make_vocab_size_divisible_by} x TP "
        f"{p.tensor_model_parallel_size})",
        f"parameters {_n(total)} ({total}): embedding {_n(embedding)}, "
        + (f"output layer {_n(output)}" if output else "output layer tied to the embedding")
        + f", transformer {_n(total - embedding - output)}",
    ] + _trainable_lines(config, ranks)


def _trainable_lines(config: Config, ranks: List[RankParams]) -> List[str]:
    """With LoRA: what trains, and the optimizer state it takes (the base has none)."""
    lora = config.lora
    if not lora.enabled:
        return []
    dp0 = [r for r in ranks if r.dp == 0 and r.cp == 0]
    total, trainable = sum(r.unique for r in dp0), sum(r.unique_trainable for r in dp0)
    dp = len(ranks) // (len(dp0) * config.parallel.context_parallel_size)
    per_rank = max(state_bytes(config, r.local, dp, r.trainable)["optimizer"] for r in ranks)
    whole = sum(state_bytes(config, r.unique, 1, r.unique_trainable)["optimizer"] for r in dp0)
    return [f"trainable  {_n(trainable)} ({trainable}) of {_n(total)} parameters "
            f"({trainable / max(total, 1):.2%}): LoRA r {lora.lora_r}, alpha {lora.lora_alpha} on "
            f"{' '.join(lora.lora_target_modules)}, the rest frozen; optimizer state "
            f"{_bytes(whole)} ({whole} bytes), at most {_bytes(per_rank)} per rank"]


def _layout_lines(config: Config, ranks: List[RankParams]) -> List[str]:
    p = config.parallel
    pp, cp = p.pipeline_model_parallel_size, p.context_parallel_size
    dp = len(ranks) // (p.tensor_model_parallel_size * pp * cp)
    sizes = p.hierarchical_context_parallel_sizes  # a2a+p2p: a2a within A, the ring over B
    hierarchy = f" over {' x '.join(map(str, sizes))}" if sizes else ""
    context = (f"; context parallel: each sequence over {cp} ranks ({cp * 2} chunks, "
               f"{'/'.join(p.cp_comm_type)}{hierarchy})" if cp > 1 else "")
    lines = [f"layout     {len(ranks)} ranks = TP {p.tensor_model_parallel_size} x PP {pp} x CP "
             f"{cp} x DP {dp}; sequence parallel {'on' if p.sequence_parallel else 'off'}"
             f"{context}; distributed optimizer {'on' if p.use_distributed_optimizer else 'off'}"]
    for stage in range(pp):
        on_stage = [r for r in ranks if r.pp == stage]
        parts = [", ".join(f"layers {held.start + 1}-{held.stop}" if len(held) > 1
                           else f"layer {held.stop}" for held in _stage_layers(config, stage))]
        if stage == 0:
            parts.insert(0, "embedding")
        if stage == pp - 1:
            parts.append("final norm, output layer")
        unique = sum(r.unique for r in on_stage if r.dp == 0 and r.cp == 0)
        by_count: Dict[int, List[int]] = {}
        for r in on_stage:
            by_count.setdefault(r.local, []).append(r.rank)
        held = "; ".join(f"{_n(count)} on ranks {_ranks(rs)}" for count, rs in by_count.items())
        groups = sorted({tuple(sorted(r.rank for r in on_stage if (r.dp, r.cp) == (d, c)))
                         for d in range(dp) for c in range(cp)})
        # One screen at any scale: the first TP groups stand for the rest.
        shown = " ".join(f"[{_ranks(list(g))}]" for g in groups[:4])
        shown += f" ... ({len(groups)} groups)" if len(groups) > 4 else ""
        lines.append(f"  stage {stage}: {' + '.join(parts)}: {_n(unique)} parameters; per rank "
                     f"{held}; TP groups {shown}")
    return lines


def _batch_lines(config: Config, dp: int, num_microbatches: int) -> List[str]:
    t, m = config.training, config.model
    cp = config.parallel.context_parallel_size
    precision = ("bf16" if m.bf16 else "fp16 (dynamic loss scaling)" if m.fp16 else "fp32")
    per_rank = f" ({m.seq_length // cp} tokens of each sequence per CP rank)" if cp > 1 else ""
    return [
        f"batch      micro {t.micro_batch_size} x DP {dp} x accumulation {num_microbatches} = "
        f"global {t.global_batch_size} samples = {t.global_batch_size * m.seq_length} tokens "
        f"per step{per_rank}; {t.train_iters} steps = "
        f"{_n(t.train_iters * t.global_batch_size * m.seq_length)} tokens",
        f"precision  {precision} weights"
        + (", fp32 main weights in the optimizer" if m.bf16 or m.fp16 else "")
        + ", gradients reduced in fp32",
    ]


def _attention_line(config: Config, module: torch.nn.Module) -> str:
    core = next((mod for mod in module.modules() if hasattr(mod, "backend_reason")), None)
    documents = ("documents isolated (packed, variable-length)" if config.varlen
                 else "causal over each sample")
    if core is None:  # a stage without layers cannot happen (layers divisible by PP)
        return f"attention  {documents}"
    return f"attention  {core.backend} ({core.backend_reason}); {documents}"


def _leaves(dataset):
    """(leaf MegatronDataset, share of the samples) of a dataset or a blend."""
    if dataset is None:
        return []
    if hasattr(dataset, "datasets"):  # megatron-core's BlendedDataset
        return [(leaf, float(w)) for leaf, w in zip(dataset.datasets, dataset.weights)]
    return [(dataset, 1.0)]


def _data_lines(config: Config, train_ds, valid_ds) -> List[str]:
    d, t, m = config.data, config.training, config.model
    if d.mock_data:
        return ["data       --mock-data (random tokens)"]
    cut = (f"--split {d.split}" if resolve(d).per_split is None
           else "datasets per split, each used whole")
    lines = [f"data       {cut}; index cache {d.data_cache_path}"]
    samples = t.train_iters * t.global_batch_size
    for leaf, share in _leaves(train_ds):
        low = leaf.dataset
        lengths = getattr(low, "sequence_lengths", None)
        if lengths is None:  # instruction shards: one document is one sample
            lengths, per_sample = low.document_lengths, None
        else:
            per_sample = m.seq_length
        shard_docs, split_docs = len(lengths), len(leaf.indices)
        split_tokens = int(lengths[leaf.indices].sum())
        drawn = samples * share
        epochs = drawn * per_sample / split_tokens if per_sample else drawn / split_docs
        lines.append(f"  {leaf.dataset_path}: {shard_docs} documents, {_n(int(lengths.sum()))} "
                     f"tokens; training split {split_docs} documents, {_n(split_tokens)} tokens; "
                     f"the run draws {_n(drawn)} samples ({share:.0%}) = {epochs:.2f} epochs")
    if valid_ds is not None:
        sizes = ", ".join(str(len(ds)) for ds in valid_ds) if isinstance(valid_ds, list) else (
            str(len(valid_ds)))
        each = " each" if isinstance(valid_ds, list) else ""
        lines.append(f"  validation: {sizes} samples, {config.logging.eval_iters} "
                     f"batches{each} every {config.logging.eval_interval} steps")
    return lines


def _checkpoint_lines(config: Config) -> List[str]:
    c, l = config.checkpoint, config.logging
    save = (f"save {c.save} every {c.save_interval} steps and at the end" if c.save and
            c.save_interval else f"save {c.save} at the end" if c.save else "no --save")
    load = f"load {c.load}" + (" (weights only, --finetune)" if c.finetune else "") \
        if c.load else "no --load (from scratch)"
    return [f"checkpoint {save}; {load}; tensorboard {l.tensorboard_dir or 'off'}"]


def _memory_lines(config: Config, vocab_size: int, ranks: List[RankParams],
                  num_microbatches: int) -> List[str]:
    p = config.parallel
    pp = p.pipeline_model_parallel_size
    dp = len(ranks) // (p.tensor_model_parallel_size * pp * p.context_parallel_size)
    lines = ["memory     per rank, estimated (no allocator overhead, no communication buffers):"]
    for stage in range(pp):
        params = max(r.local for r in ranks if r.pp == stage)
        trainable = max(r.trainable for r in ranks if r.pp == stage)
        state = state_bytes(config, params, dp, trainable)
        flight = in_flight_microbatches(config, stage, num_microbatches)
        acts = activation_bytes(config, vocab_size, stage) * flight
        total = sum(state.values()) + acts
        lines.append(f"  stage {stage}: weights {_bytes(state['weights'])} + gradients "
                     f"{_bytes(state['gradients'])} + optimizer {_bytes(state['optimizer'])} + "
                     f"activations {_bytes(acts)} ({flight:g} micro-batch"
                     f"{'es' if flight != 1 else ''}) = {_bytes(total)}")
    return lines


def summary_lines(config: Config, vocab_size: int, module: torch.nn.Module,
                  ranks: List[RankParams], num_microbatches: int, train_ds, valid_ds) -> List[str]:
    p = config.parallel
    dp = len(ranks) // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                        * p.context_parallel_size)
    return (["run summary " + "-" * 88]
            + _model_lines(config, vocab_size, ranks) + _layout_lines(config, ranks)
            + _batch_lines(config, dp, num_microbatches) + [_attention_line(config, module)]
            + _data_lines(config, train_ds, valid_ds) + _checkpoint_lines(config)
            + _memory_lines(config, vocab_size, ranks, num_microbatches) + ["-" * 100])


def gather_parameters(chunks: List[torch.nn.Module], topology) -> List[RankParams]:
    """Every rank's counts, on every rank (one all_gather_object, called by all ranks)."""
    mine = count_parameters(chunks, dist.get_rank(), topology.tp_rank, topology.pp_rank,
                            topology.dp_rank, topology.cp_rank)
    everyone: List[RankParams] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def log_summary(trainer) -> Tuple[List[RankParams], List[str]]:
    """Gather the counts and print the summary on rank 0; returns both (for tests)."""
    module = trainer.model[0].module
    ranks = gather_parameters([chunk.module for chunk in trainer.model], trainer.topology)
    lines = summary_lines(trainer.config, trainer.vocab_size, module, ranks,
                          trainer.num_microbatches(), trainer.train_ds, trainer.valid_ds)
    if dist.get_rank() == 0:
        logger.info("\n".join(lines))
    return ranks, lines
