"""Split a full (TP=1, PP=1) GPTModel state dict into tp/pp shards, and merge shards back.

Names follow megatron-core's GPTModel with our layer spec. How each tensor is split across TP
ranks mirrors megatron-core's tensor-parallel layers:
- vocab-parallel embedding and output layer: rows (the padded vocabulary);
- column-parallel linears (fused QKV, in megatron-core's per-query-group layout, and fc1): rows;
  SwiGLU's fc1 is ``[gate; up]`` and every rank holds ``[gate_r; up_r]`` (stride 2);
- row-parallel linears (attention projection, fc2): columns; their bias is replicated;
- norms and position embeddings: replicated;
- LoRA adapters (model/lora.py): B of a column-parallel linear as its rows, A of a row-parallel
  one as its columns, the other matrix replicated.
Pipeline stage ``s`` of ``pp`` holds layers ``[s*L/pp, (s+1)*L/pp)`` renumbered from 0, the
embedding on the first stage and the final norm and output layer on the last one; with
``first``/``last`` (--decoder-first/last-pipeline-num-layers) the first/last stage holds that
many layers and the stages between share the rest evenly (``stage_layers``). With ``vp``
virtual stages (the interleaved schedule) each stage's layers are cut into ``vp`` model chunks
taken round-robin: chunk ``v`` of stage ``s`` holds the ``s``-th slice of layers
``[v*L/vp, (v+1)*L/vp)``; the embedding is on chunk 0 of the first stage, the final norm and
output layer on the last chunk of the last stage.
"""

import re
from typing import Dict, Mapping, Optional

import torch

StateDict = Dict[str, torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def tp_split(name: str, swiglu: bool):
    """(dim, stride) along which ``name`` is split across TP ranks, or None if replicated."""
    if name in _VOCAB:
        return 0, 1
    if ".lora_" in name:
        # LoRA (model/lora.py): a column-parallel layer's B is split as its weight's rows, a
        # row-parallel layer's A as its weight's columns; the other matrix is replicated.
        layer, matrix = name.split(".lora_", 1)
        if matrix.startswith("B") and layer.endswith(("linear_qkv", "linear_fc1")):
            return 0, 2 if swiglu and layer.endswith("linear_fc1") else 1
        if matrix.startswith("A") and layer.endswith(("linear_proj", "linear_fc2")):
            return 1, 1
        return None
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0, 1
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return 0, 2 if swiglu else 1
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None


def _merge(tensors: list, dim: int, stride: int) -> torch.Tensor:
    size = len(tensors)
    pieces = [torch.chunk(t, stride, dim=dim) for t in tensors]
    return torch.cat([pieces[rank][s] for s in range(stride) for rank in range(size)], dim=dim)


def stage_layers(num_layers: int, pp_rank: int, pp_size: int, first: Optional[int] = None,
                 last: Optional[int] = None, vp_stage: int = 0, vp_size: int = 1) -> range:
    """Global indices of the layers held by pipeline stage ``pp_rank`` (its model chunk
    ``vp_stage`` of ``vp_size``): ``first`` on stage 0 and ``last`` on the last stage where
    given, the others ``num_layers`` less those, evenly; each stage's count split evenly over
    its chunks, chunk ``v`` of every stage after chunk ``v - 1`` of the last one.
    megatron-core's split of TransformerConfig.num_layers_in_first/last_pipeline_stage and
    virtual_pipeline_model_parallel_size (get_transformer_layer_offset,
    get_num_layers_to_build), for checkpoints read without a process group;
    tests/checkpoint/test_uneven_pipeline.py holds the two equal."""
    if pp_size == 1:
        return range(num_layers)
    sizes = [None] * pp_size
    sizes[0] = first
    sizes[-1] = last
    given = [size for size in sizes if size is not None]
    per_middle = (num_layers - sum(given)) // max(1, pp_size - len(given))
    sizes = [per_middle if size is None else size for size in sizes]
    sizes = [size // vp_size for size in sizes]
    start = vp_stage * sum(sizes) + sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def split_problem(num_layers: int, pp_size: int, first: Optional[int], last: Optional[int],
                  flags=("--decoder-first-pipeline-num-layers",
                         "--decoder-last-pipeline-num-layers",
                         "--pipeline-model-parallel-size"), vp_size: int = 1,
                  vp_flag: str = "--num-virtual-stages-per-pipeline-rank") -> Optional[str]:
    """Why ``stage_layers`` cannot split ``num_layers`` so (megatron-core's TransformerConfig
    checks), in terms of ``flags`` (first, last, PP size) and ``vp_flag`` (``vp_size`` model
    chunks per stage); None if it can."""
    problem = _stage_split_problem(num_layers, pp_size, first, last, flags)
    if problem is not None or vp_size == 1:
        return problem
    first_flag, last_flag, pp_flag = flags
    if first is not None and last is not None and pp_size == 2:
        # megatron-core's chunk offsets divide by the stages between (0.16-0.19).
        return (f"{vp_flag} {vp_size} with both {first_flag} and {last_flag} needs a stage "
                f"between them ({pp_flag} > 2) in megatron-core; give one of the two")
    for rank in range(pp_size):
        held = len(stage_layers(num_layers, rank, pp_size, first, last))
        if held % vp_size:
            return (f"{vp_flag} {vp_size}: pipeline stage {rank} holds {held} layers, which do "
                    f"not split into {vp_size} equal model chunks")
    return None


def _stage_split_problem(num_layers: int, pp_size: int, first: Optional[int],
                         last: Optional[int], flags) -> Optional[str]:
    first_flag, last_flag, pp_flag = flags
    if first is None and last is None:
        if num_layers % pp_size:
            return (f"{pp_flag} {pp_size} does not divide the {num_layers} layers (or give the "
                    f"first/last stage its own number with {first_flag}/{last_flag})")
        return None
    uneven = " ".join(f"{flag} {value}" for flag, value in ((first_flag, first), (last_flag, last))
                      if value is not None)
    if pp_size < 2:
        return f"{uneven}: needs {pp_flag} > 1 (one stage holds all {num_layers} layers)"
    if any(value is not None and value < 1 for value in (first, last)):
        return f"{uneven}: each stage needs at least one layer"
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if not middle_stages:
        return None if middle_layers == 0 else (
            f"{uneven}: the {pp_size} stages must add up to the {num_layers} layers")
    if middle_layers < 1 or middle_layers % middle_stages:
        return (f"{uneven} with {num_layers} layers: the other {middle_stages} of the "
                f"{pp_flag} {pp_size} stages would hold {middle_layers}, which must be a "
                f"positive multiple of {middle_stages}")
    return None


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it is exactly its own storage, else a compact copy (``torch.save`` writes
    whole storages: a view of a bigger buffer would drag the buffer into the file)."""
    exact = (tensor.is_contiguous() and tensor.storage_offset() == 0
             and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    return tensor if exact else tensor.clone(memory_format=torch.contiguous_format)


def shard_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    swiglu: bool,
    tp_rank: int,
    tp_size: int,
    vocab_rows: Optional[int] = None,
) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of the full tensor ``name`` (a full-model name; for a layer
    tensor only the suffix after ``decoder.layers.N.`` matters), with the vocabulary resized to
    ``vocab_rows`` (zero rows added or padding rows dropped) for the embedding/output layer.

    Builds only this rank's part (one copy of it at most). The result owns its storage exactly;
    it may be ``tensor`` itself when nothing needs to change, so do not modify it in place.
    """
    if name in _VOCAB and vocab_rows is not None:
        per_rank = vocab_rows // tp_size
        start, end = tp_rank * per_rank, (tp_rank + 1) * per_rank
        piece = tensor[start:min(end, tensor.size(0))]
        if piece.size(0) < per_rank:
            piece = torch.cat([piece, tensor.new_zeros(per_rank - piece.size(0), *tensor.shape[1:])])
        return _owning(piece)
    rule = tp_split(name, swiglu)
    if rule is not None and tp_size > 1:
        dim, stride = rule
        chunks = torch.chunk(tensor, tp_size * stride, dim=dim)
        return torch.cat(chunks[tp_rank::tp_size], dim=dim)
    return _owning(tensor)


def merge_tensor(name: str, parts: list, *, swiglu: bool) -> torch.Tensor:
    """Inverse of ``shard_tensor`` (without vocabulary resizing): ``parts[tp_rank]`` -> full.
    With one part (or a replicated tensor) that part itself is returned."""
    rule = tp_split(name, swiglu)
    if rule is not None and len(parts) > 1:
        return _merge(list(parts), *rule)
    return parts[0]


def global_name(local: str, num_layers: int, pp_rank: int, pp_size: int,
                first: Optional[int] = None, last: Optional[int] = None, vp_stage: int = 0,
                vp_size: int = 1) -> str:
    """The full-model (TP1/PP1) name of tensor ``local`` of stage ``pp_rank``'s model chunk
    ``vp_stage``."""
    match = _LAYER.match(local)
    if not match:
        return local
    first_layer = stage_layers(num_layers, pp_rank, pp_size, first, last, vp_stage,
                               vp_size).start
    return f"decoder.layers.{first_layer + int(match.group(1))}.{match.group(2)}"


def full_shape(name: str, local_shape, *, swiglu: bool, tp_size: int,
               vocab_rows: Optional[int] = None) -> tuple:
    """Shape of the full tensor ``name`` whose TP shard has ``local_shape``; the embedding and
    output layer get ``vocab_rows`` rows (the unpadded vocabulary) when given."""
    shape = list(local_shape)
    if name in _VOCAB and vocab_rows is not None:
        shape[0] = vocab_rows
        return tuple(shape)
    rule = tp_split(name, swiglu)
    if rule is not None:
        shape[rule[0]] *= tp_size
    return tuple(shape)


def _stage_name(name: str, num_layers: int, pp_rank: int, pp_size: int,
                first: Optional[int], last: Optional[int], vp_stage: int = 0,
                vp_size: int = 1) -> Optional[str]:
    """The name of ``name`` on stage ``pp_rank``'s chunk ``vp_stage``, or None if that chunk
    does not hold it."""
    match = _LAYER.match(name)
    if match:
        layers = stage_layers(num_layers, pp_rank, pp_size, first, last, vp_stage, vp_size)
        layer = int(match.group(1))
        if layer not in layers:
            return None
        return f"decoder.layers.{layer - layers.start}.{match.group(2)}"
    if name.startswith("embedding."):
        return name if pp_rank == 0 and vp_stage == 0 else None
    if name.startswith(("decoder.final_layernorm.", "output_layer.")):
        return name if pp_rank == pp_size - 1 and vp_stage == vp_size - 1 else None
    return name


def shard_state_dict(
    full: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    swiglu: bool,
    tied_embeddings: bool,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    vocab_rows: Optional[int] = None,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    vp_stage: int = 0,
    vp_size: int = 1,
) -> StateDict:
    """The state dict of rank (tp_rank, pp_rank)'s model chunk ``vp_stage``. ``vocab_rows``:
    padded vocabulary to use; ``first/last_stage_layers``: an uneven split (``stage_layers``)."""
    full = dict(full)
    if tied_embeddings and pp_size * vp_size > 1 and "output_layer.weight" not in full:
        # megatron-core keeps a copy of the tied embedding on the last stage.
        full["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    shard = {}
    for name, tensor in full.items():
        if tensor is None or name.endswith("._extra_state"):
            continue
        local = _stage_name(name, num_layers, pp_rank, pp_size, first_stage_layers,
                            last_stage_layers, vp_stage, vp_size)
        if local is not None:
            shard[local] = shard_tensor(name, tensor, swiglu=swiglu, tp_rank=tp_rank,
                                        tp_size=tp_size, vocab_rows=vocab_rows).clone()
    return shard


def merge_state_dicts(
    shards: Mapping[tuple, Mapping[str, torch.Tensor]],
    *,
    num_layers: int,
    swiglu: bool,
    tied_embeddings: bool,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> StateDict:
    """Inverse of ``shard_state_dict``: ``shards[(tp_rank, pp_rank)]``, or ``shards[(tp_rank,
    pp_rank, vp_stage)]`` with virtual stages, -> one full state dict."""
    shards = {(*key, 0)[:3]: shard for key, shard in shards.items()}
    tp_size, pp_size, vp_size = (1 + max(key[i] for key in shards) for i in range(3))
    full = {}
    for pp_rank, vp_stage in ((pp, vp) for pp in range(pp_size) for vp in range(vp_size)):
        names = [n for n, t in shards[(0, pp_rank, vp_stage)].items()
                 if t is not None and not n.endswith("._extra_state")]
        for local in names:
            name = global_name(local, num_layers, pp_rank, pp_size, first_stage_layers,
                               last_stage_layers, vp_stage, vp_size)
            if name in full:  # the tied output layer copy on the last stage
                continue
            full[name] = merge_tensor(
                name, [shards[(tp, pp_rank, vp_stage)][local] for tp in range(tp_size)],
                swiglu=swiglu)
    if tied_embeddings:
        full.pop("output_layer.weight", None)
    return full
