"""The model-defining ``args`` of a rank file: Megatron-LM's flag names and defaults.

Training writes them (``model_args_namespace``) and checks a loaded checkpoint against the run
(``check_compatible``); the converter builds them from an HF config (``build_args``) and reads
them back from checkpoints of either origin, ours or Megatron-LM's (``saved_value``);
generation and ``--use-checkpoint-args`` set flags from them (``fill_flags``).
"""

import argparse
import logging
import os
from typing import Optional

import torch

from megatron_ext.checkpoint.format import CheckpointError
from megatron_ext.checkpoint.sharding import stage_layers
from megatron_ext.config import default_ffn_hidden_size

logger = logging.getLogger("megatron_ext")


def padded_vocab_size(vocab_size: int, make_divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible-by x TP."""
    multiple = make_divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def divisible_by_padding_to(vocab_size: int, padded: int, tensor_parallel_size: int) -> Optional[int]:
    """The --make-vocab-size-divisible-by that pads ``vocab_size`` to ``padded`` rows at this
    TP: the smallest power of two if one does (Megatron's values are), else the smallest; None
    if none does."""
    fits = [d for d in range(1, padded // tensor_parallel_size + 1)
            if padded_vocab_size(vocab_size, d, tensor_parallel_size) == padded]
    return min(fits, key=lambda d: (d & (d - 1) != 0, d)) if fits else None


def padding_hint(vocab_size: int, saved_padded: int, tensor_parallel_size: int) -> str:
    """How this run can pad to the checkpoint's rows (its padded rows are zeros and never
    count: re-padding is exact), or else how to re-pad the checkpoint."""
    divisible_by = divisible_by_padding_to(vocab_size, saved_padded, tensor_parallel_size)
    if divisible_by:
        return f": pass --make-vocab-size-divisible-by {divisible_by} to pad as the checkpoint does"
    return (f": re-pad the checkpoint with convert_ckpt.py --load-model-type mg "
            f"--save-model-type mg --target-tensor-parallel-size {tensor_parallel_size}")


def dtype_flags(dtype: torch.dtype) -> dict:
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def build_args(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    vocab_size: Optional[int],
    padded_vocab_size: int,
    make_vocab_size_divisible_by: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    seq_length: int,
    max_position_embeddings: int,
    position_embedding_type: str = "rope",
    rotary_base: float = 10000,
    normalization: str = "RMSNorm",
    norm_epsilon: float = 1e-5,
    swiglu: bool = True,
    untie_embeddings_and_output_weights: bool = True,
    add_bias_linear: bool = False,
    add_qkv_bias: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_rope_scaling: bool = False,
    rope_scaling_factor: float = 8.0,
    rotary_percent: float = 1.0,
    apply_layernorm_1p: bool = False,
    **extra,
) -> argparse.Namespace:
    """A Namespace with the model-defining flags under Megatron-LM's names (both spellings of
    the bias flag); ``extra`` keys are stored as given."""
    args = argparse.Namespace(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        group_query_attention=num_query_groups != num_attention_heads,
        num_query_groups=num_query_groups,
        kv_channels=kv_channels,
        seq_length=seq_length,
        max_position_embeddings=max_position_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
        normalization=normalization,
        norm_epsilon=norm_epsilon,
        swiglu=swiglu,
        untie_embeddings_and_output_weights=untie_embeddings_and_output_weights,
        add_bias_linear=add_bias_linear,
        disable_bias_linear=not add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        padded_vocab_size=padded_vocab_size,
        vocab_size=vocab_size,
        use_rope_scaling=use_rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        rotary_percent=rotary_percent,
        apply_layernorm_1p=apply_layernorm_1p,
        **dtype_flags(params_dtype),
    )
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def _run_values(config, vocab_size: Optional[int]) -> dict:
    """The model-defining values of a validated Config (its derived defaults filled in)."""
    m, p = config.model, config.parallel
    padded = (padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
              if vocab_size is not None else None)
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        vocab_size=vocab_size,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        # Under Megatron-LM's names: the converters and a resume read the uneven split here.
        decoder_first_pipeline_num_layers=p.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=p.decoder_last_pipeline_num_layers,
        # Model chunks per stage: ours (None for one), and Megatron-LM's derived name.
        num_virtual_stages_per_pipeline_rank=p.num_virtual_stages_per_pipeline_rank,
        virtual_pipeline_model_parallel_size=p.num_virtual_stages_per_pipeline_rank,
        seq_length=m.seq_length,
        max_position_embeddings=m.max_position_embeddings,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        normalization=m.normalization,
        norm_epsilon=m.norm_epsilon,
        swiglu=m.swiglu,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        params_dtype=m.params_dtype,
        use_rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        rotary_percent=m.rotary_percent,
        apply_layernorm_1p=m.apply_layernorm_1p,
        # Not model-defining, but Megatron-LM's --use-checkpoint-args takes them over.
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
    )


# The tokenizer's flags, saved as Megatron-LM saves them (all its args), so that a resume with
# --use-checkpoint-args and generate_gpt.py need none: (our field, Megatron-LM's name).
TOKENIZER_ARGS = (("tokenizer_type", "tokenizer_type"), ("tokenizer_model", "tokenizer_model"),
                  ("vocab_file", "vocab_file"), ("merge_file", "merge_file"),
                  ("tiktoken_pattern", "tiktoken_pattern"),
                  ("tiktoken_num_special_tokens", "tiktoken_num_special_tokens"),
                  ("tokenizer_special_tokens", "special_tokens"))
TOKENIZER_FILES = ("tokenizer_model", "vocab_file", "merge_file")


def tokenizer_args(data) -> dict:
    """The tokenizer flags of a run's DataConfig under Megatron-LM's names; its files as
    absolute paths, so that a run started in another directory finds them."""
    values = {}
    for field, name in TOKENIZER_ARGS:
        value = getattr(data, field)
        if field in TOKENIZER_FILES and value and os.path.exists(value):
            value = os.path.abspath(value)
        values[name] = value
    return values


def model_args_namespace(config, vocab_size: Optional[int], **extra) -> argparse.Namespace:
    """The ``args`` entry of a rank file for a run with ``config`` and the tokenizer's vocab,
    and ``extra`` (the shards' sizes: ``training/data_resume.py``)."""
    return build_args(**_run_values(config, vocab_size), **tokenizer_args(config.data), **extra)


def fill_tokenizer_flags(args: argparse.Namespace, saved: argparse.Namespace, forced=(),
                         way_out: str = ""):
    """Set the tokenizer flags ``args`` leaves out (and ``forced`` even where given) from saved
    ``args``. A file they name that is not there (a checkpoint copied from another machine) is
    a CheckpointError naming it and the flag to pass instead (``way_out`` added). Returns
    fill_flags' replacements."""
    names = [field for field, _ in TOKENIZER_ARGS if field not in forced]
    replaced = fill_flags(args, saved, names, forced)
    # A path of the saved file (relative, say) is not another tokenizer: not said.
    replaced = [change for change in replaced if not _same_file(*change)]
    for field in TOKENIZER_FILES:
        value = getattr(args, field)
        if value and value == getattr(saved, field, None) and not os.path.exists(value):
            flag = "--" + field.replace("_", "-")
            raise CheckpointError(f"the checkpoint's args name {flag} {value}, which does not "
                                  f"exist here: pass {flag} PATH{way_out}")
    return replaced


def _same_file(name: str, given, taken) -> bool:
    return (name in TOKENIZER_FILES and os.path.exists(given) and os.path.exists(taken)
            and os.path.samefile(given, taken))


def pipeline_split(args) -> Optional[list]:
    """The layers of each model chunk of each pipeline stage of saved ``args`` (or a dict of
    them): the even split without --decoder-first/last-pipeline-num-layers, one chunk per
    stage without virtual stages (Megatron-LM's names); None if they do not say the number of
    layers."""
    get = args.get if isinstance(args, dict) else lambda name: saved_value(args, name)
    pp, layers = get("pipeline_model_parallel_size") or 1, get("num_layers")
    vp = get("virtual_pipeline_model_parallel_size") or 1
    if layers is None:
        return None
    return [[stage_layers(layers, rank, pp, get("decoder_first_pipeline_num_layers"),
                          get("decoder_last_pipeline_num_layers"), chunk, vp)
             for chunk in range(vp)] for rank in range(pp)]


def _chunk_sizes(split: list) -> str:
    return "[" + ", ".join("+".join(str(len(chunk)) for chunk in stage) for stage in split) + "]"


def run_pipeline_split(config) -> list:
    """``pipeline_split`` of a run with the validated ``config``."""
    return pipeline_split(_run_values(config, None))


def saved_value(args: argparse.Namespace, name: str):
    """A model-defining value from saved args (ours or Megatron-LM's), defaults as Megatron."""
    get = lambda key, default=None: getattr(args, key, default)  # noqa: E731
    if name == "num_query_groups":
        return get("num_query_groups") if get("group_query_attention", False) else get("num_attention_heads")
    if name == "kv_channels":
        heads = get("num_attention_heads")
        return get("kv_channels") or (get("hidden_size") // heads if heads else None)
    if name == "ffn_hidden_size":
        return get("ffn_hidden_size") or default_ffn_hidden_size(get("hidden_size"), get("swiglu", False))
    if name == "add_bias_linear":
        if hasattr(args, "add_bias_linear"):
            return bool(args.add_bias_linear)
        return not get("disable_bias_linear", False)
    if name == "position_embedding_type":
        return get("position_embedding_type", "learned_absolute")
    if name == "rotary_percent":
        return get(name, 1.0)
    if name in ("swiglu", "untie_embeddings_and_output_weights", "add_qkv_bias", "use_rope_scaling",
                "apply_layernorm_1p"):
        return bool(get(name, False))
    if name == "normalization":
        return get("normalization", "LayerNorm")
    if name == "pipeline_model_parallel_size":
        return get(name, 1) or 1
    return get(name)


_ABSENT = object()  # the checkpoint's args hold no value for a flag


def _flag_value(saved: argparse.Namespace, name: str):
    """Our flag ``name`` (a config field) in its own convention, from saved args; ``_ABSENT``
    where they have none. A model without GQA gives --num-query-groups None (validate wants
    none then)."""
    if name == "disable_bias_linear":
        value = saved_value(saved, "add_bias_linear")
        return _ABSENT if value is None else not value
    if name == "group_query_attention":
        return saved_value(saved, "num_query_groups") != saved_value(saved, "num_attention_heads")
    if name == "tokenizer_special_tokens":
        name = "special_tokens"  # Megatron-LM's name of --tokenizer-special-tokens
    value = saved_value(saved, name)
    if name == "num_query_groups" and value == saved_value(saved, "num_attention_heads"):
        return None
    return _ABSENT if value is None else value


def fill_flags(args: argparse.Namespace, saved: argparse.Namespace, names=(), forced=()):
    """Set the flags ``names`` that ``args`` (parsed flags, None: not given) leaves out, and
    ``forced`` even where given, from a checkpoint's saved ``args`` where they hold a value.
    Returns (name, given, taken) for each given value replaced by another."""
    replaced = []
    for name in (*names, *forced):
        given = getattr(args, name)
        if given is not None and name not in forced:
            continue
        value = _flag_value(saved, name)
        if value is _ABSENT:
            continue
        if given is not None and value != given:
            replaced.append((name, given, value))
        setattr(args, name, value)
    return replaced


# (flag, what differs, attribute): the checks of check_compatible, in the order reported.
_CHECKS = (
    ("--tensor-model-parallel-size", "other TP/PP", "tensor_model_parallel_size"),
    ("--pipeline-model-parallel-size", "other TP/PP", "pipeline_model_parallel_size"),
    ("--num-layers", "other number of layers", "num_layers"),
    ("--hidden-size", "other hidden size", "hidden_size"),
    ("--ffn-hidden-size", "other FFN hidden size", "ffn_hidden_size"),
    ("--num-attention-heads", "other number of attention heads", "num_attention_heads"),
    ("--num-query-groups", "other number of query groups (GQA)", "num_query_groups"),
    ("--kv-channels", "other head size", "kv_channels"),
    ("--position-embedding-type", "other position embedding", "position_embedding_type"),
    ("--normalization", "other normalization", "normalization"),
    ("--norm-epsilon", "other norm epsilon", "norm_epsilon"),
    ("--swiglu", "other MLP activation", "swiglu"),
    ("--untie-embeddings-and-output-weights", "other embedding tying",
     "untie_embeddings_and_output_weights"),
    ("--disable-bias-linear", "other linear biases", "add_bias_linear"),
    ("--add-qkv-bias", "other QKV bias", "add_qkv_bias"),
    ("--use-rope-scaling", "other RoPE scaling", "use_rope_scaling"),
    ("--rotary-percent", "other rotary fraction", "rotary_percent"),
    ("--apply-layernorm-1p", "other norm weight convention", "apply_layernorm_1p"),
)


def _show(flag: str, attr: str, value) -> str:
    if isinstance(value, bool):
        if attr == "add_bias_linear":
            value = not value
        return f"{flag} {'on' if value else 'off'}"
    return f"{flag} {value}"


def check_compatible(saved_args: Optional[argparse.Namespace], config, vocab_size: Optional[int], path,
                     *, reshardable: bool = False) -> None:
    """Raise ``CheckpointError`` naming ``path`` and every model-defining flag in which the
    checkpoint's ``args`` differ from this run (``config`` and the tokenizer's ``vocab_size``).
    A ``reshardable`` checkpoint (torch_dist) may have another TP/PP.
    """
    if saved_args is None:
        raise CheckpointError(f"checkpoint file {path} has no 'args': cannot check that it fits this model")
    run = _run_values(config, vocab_size)
    problems = []
    for flag, what, attr in _CHECKS:
        if reshardable and what == "other TP/PP":
            continue
        saved, mine = saved_value(saved_args, attr), run[attr]
        if attr == "norm_epsilon" and saved is not None and abs(saved - mine) <= 1e-12:
            continue
        if saved is not None and saved != mine:
            problems.append(f"{what}: {_show(flag, attr, saved)} in the checkpoint, "
                            f"{_show(flag, attr, mine)} in this run")
    split = pipeline_split(saved_args)
    # Another --num-layers splits otherwise too: said above, not as another TP/PP.
    if not reshardable and split is not None and split != pipeline_split(run) \
            and saved_value(saved_args, "pipeline_model_parallel_size") \
            == run["pipeline_model_parallel_size"] \
            and saved_value(saved_args, "num_layers") == run["num_layers"]:
        problems.append(f"other TP/PP: the checkpoint's stages hold {_chunk_sizes(split)} "
                        f"layers, this run's {_chunk_sizes(pipeline_split(run))} (--decoder-"
                        f"first/last-pipeline-num-layers, --num-virtual-stages-per-pipeline-"
                        f"rank: a + b is a stage of two model chunks)")
    if run["position_embedding_type"] == "rope":
        saved = saved_value(saved_args, "rotary_base")
        if saved is not None and float(saved) != float(run["rotary_base"]):
            problems.append(f"other RoPE base: --rotary-base {saved} in the checkpoint, "
                            f"{run['rotary_base']} in this run")
    else:
        saved = saved_value(saved_args, "max_position_embeddings")
        if saved is not None and saved != run["max_position_embeddings"]:
            problems.append(f"other position embedding table: --max-position-embeddings {saved} "
                            f"in the checkpoint, {run['max_position_embeddings']} in this run")
    saved_padded = saved_value(saved_args, "padded_vocab_size")
    if run["padded_vocab_size"] is not None and saved_padded is not None \
            and saved_padded != run["padded_vocab_size"]:
        saved_vocab = saved_value(saved_args, "vocab_size")
        problems.append(
            f"other vocabulary: the checkpoint's padded vocabulary is {saved_padded} rows "
            f"(vocab size {saved_vocab}, --make-vocab-size-divisible-by "
            f"{saved_value(saved_args, 'make_vocab_size_divisible_by')}), this run pads "
            f"{vocab_size} to {run['padded_vocab_size']} (--make-vocab-size-divisible-by "
            f"{run['make_vocab_size_divisible_by']} x TP {run['tensor_model_parallel_size']})"
            + padding_hint(vocab_size, saved_padded, run["tensor_model_parallel_size"])
        )
    _warn_tokenizer_change(saved_args, config, vocab_size, path)
    if problems:
        hint = ""
        if any(p.startswith("other TP/PP") for p in problems):
            hint = ("; reshard it with convert_ckpt.py --load-model-type mg --save-model-type mg "
                    "--target-tensor-parallel-size/--target-pipeline-parallel-size")
        raise CheckpointError(f"checkpoint {path} does not fit this run: "
                              + "; ".join(problems) + hint)


def _warn_tokenizer_change(saved_args, config, vocab_size: Optional[int], path) -> None:
    """Another tokenizer whose vocabulary pads to the same rows loads without an error (as in
    Megatron-LM, which compares no tokenizer), but its ids name other tokens than the ones the
    weights were trained on: said, with the saved flags."""
    saved_type, saved_vocab = (saved_value(saved_args, "tokenizer_type"),
                               saved_value(saved_args, "vocab_size"))
    changed = (saved_type is not None and saved_type != config.data.tokenizer_type) or \
        (saved_vocab is not None and vocab_size is not None and saved_vocab != vocab_size)
    if changed:
        logger.warning(
            f"checkpoint {path} was trained with "
            f"{f'--tokenizer-type {saved_type}' if saved_type else 'another tokenizer'} "
            f"(vocabulary {saved_vocab}), this run has --tokenizer-type {config.data.tokenizer_type} "
            f"(vocabulary {vocab_size}): the weights are loaded, but their token ids now stand "
            f"for other text; pass the checkpoint's tokenizer flags if that is not intended")
