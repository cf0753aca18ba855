"""Hugging Face Llama-family checkpoints <-> full (TP=1, PP=1) Megatron GPTModel tensors.

Supported: ``LlamaForCausalLM`` (Llama 2/3), ``MistralForCausalLM`` and ``Qwen2ForCausalLM``
(QKV biases -> megatron-core's ``add_qkv_bias``). Name map, per layer ``i``:

    model.embed_tokens.weight                 embedding.word_embeddings.weight (vocab padded)
    model.layers.i.input_layernorm.weight     decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.*   decoder.layers.i.self_attention.linear_qkv.*
    model.layers.i.self_attn.o_proj.weight    decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm   decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight  decoder.layers.i.mlp.linear_fc1.weight ([gate; up])
    model.layers.i.mlp.down_proj.weight       decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                         decoder.final_layernorm.weight
    lm_head.weight                            output_layer.weight (absent when tied)

megatron-core's fused QKV is laid out per query group: ``[ng, (np/ng q heads, 1 k, 1 v), hn]``.
HF's GQA gives query head ``j`` the kv head ``j // (np/ng)``, so group ``g`` is q heads
``g*np/ng ...`` plus kv head ``g``. Both use the rotate-half RoPE convention: no permutation.

The safetensors files themselves are read and written by ``hf_io``.
"""

import json
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from megatron_ext.checkpoint.args import saved_value
from megatron_ext.checkpoint.format import CheckpointError

# --model-type-hf -> HF model_type
MODEL_TYPES_HF = {"llama2": "llama", "llama3": "llama", "mistral": "mistral", "qwen2": "qwen2"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(CheckpointError):
    """Bad converter input (a flag or a file); the message names it."""


def hf_model_type(model_type_hf: Optional[str]) -> Optional[str]:
    if model_type_hf is None:
        return None
    return MODEL_TYPES_HF.get(model_type_hf, model_type_hf)


# ---------------------------------------------------------------------------------------------
# Configs


def read_hf_config(load_dir: Path, model_type_hf: Optional[str]) -> dict:
    path = Path(load_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"--load-dir {load_dir}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in ARCHITECTURES or any(a not in ARCHITECTURES.values() for a in archs):
        raise ConversionError(
            f"{path}: unknown architecture (model_type {model_type!r}, architectures {archs}); "
            f"supported: {', '.join(sorted(ARCHITECTURES.values()))} "
            f"(--model-type-hf {'|'.join(MODEL_TYPES_HF)})"
        )
    wanted = hf_model_type(model_type_hf)
    if wanted is not None and wanted != model_type:
        raise ConversionError(
            f"--model-type-hf {model_type_hf} expects model_type {wanted!r}, but {path} is a "
            f"{model_type!r} model"
        )
    return cfg


def _rope(cfg: dict, path) -> dict:
    """RoPE settings of an HF config (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x
    ``rope_parameters``) as Megatron flags."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return {"rotary_base": theta, "use_rope_scaling": False}
    if rope_type == "llama3":
        info = {**scaling, **params}
        # megatron-core's llama3 scaling hard-codes these (rotary_pos_embedding._apply_scaling).
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        odd = {k: info[k] for k, v in fixed.items() if k in info and float(info[k]) != v}
        if odd:
            raise ConversionError(f"{path}: llama3 RoPE scaling with {odd} is not supported "
                                  f"(megatron-core fixes {fixed})")
        return {"rotary_base": theta, "use_rope_scaling": True,
                "rope_scaling_factor": float(info.get("factor", 8.0))}
    raise ConversionError(f"{path}: RoPE type {rope_type!r} is not supported (only default and llama3)")


def megatron_flags_from_hf(cfg: dict, path) -> dict:
    """``args.build_args`` keywords (less parallelism and vocabulary padding) for an HF config."""
    model_type = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{path}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if model_type in ("llama", "mistral"):
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConversionError(f"{path}: {key}=true is not supported (Megatron's "
                                      f"--add-bias-linear biases every linear layer)")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    if window:
        print(f"warning: {path} has sliding_window={window}; megatron_ext attends over the whole "
              f"sequence, which is the same only for --seq-length <= {window}", file=sys.stderr)
    return dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or hidden // heads,
        vocab_size=cfg["vocab_size"],
        seq_length=cfg.get("max_position_embeddings", 4096),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        position_embedding_type="rope",
        normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        swiglu=True,
        # LlamaConfig, MistralConfig and Qwen2Config all default to untied.
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",
        **_rope(cfg, path),
    )


def hf_config_from_args(args, model_type_hf: Optional[str], dtype: torch.dtype) -> dict:
    """A ``config.json`` for ``args`` (starting from the HF config recorded at conversion, if any)."""
    model_type = hf_model_type(model_type_hf or getattr(args, "hf_model_type", None)) or "llama"
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"--model-type-hf {model_type_hf}: unknown; use one of {'|'.join(MODEL_TYPES_HF)}")
    problems = []
    if saved_value(args, "normalization") != "RMSNorm":
        problems.append("--normalization RMSNorm")
    if not saved_value(args, "swiglu"):
        problems.append("--swiglu")
    if saved_value(args, "position_embedding_type") != "rope":
        problems.append("--position-embedding-type rope")
    if saved_value(args, "add_bias_linear"):
        problems.append("--disable-bias-linear")
    if problems:
        raise ConversionError("the checkpoint is not a Llama-family model: it lacks "
                              + ", ".join(problems))
    qkv_bias = saved_value(args, "add_qkv_bias")
    if qkv_bias != (model_type == "qwen2"):
        raise ConversionError(
            f"--model-type-hf {model_type_hf or model_type}: the checkpoint "
            f"{'has' if qkv_bias else 'has no'} QKV biases; use "
            f"{'--model-type-hf qwen2' if qkv_bias else '--model-type-hf llama2|llama3|mistral'}"
        )
    base = dict(getattr(args, "hf_config", None) or {})
    cfg = base if base.get("model_type") == model_type else {}
    heads = saved_value(args, "num_attention_heads")
    cfg.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=saved_value(args, "vocab_size") or saved_value(args, "padded_vocab_size"),
        hidden_size=saved_value(args, "hidden_size"),
        intermediate_size=saved_value(args, "ffn_hidden_size"),
        num_hidden_layers=saved_value(args, "num_layers"),
        num_attention_heads=heads,
        num_key_value_heads=saved_value(args, "num_query_groups"),
        head_dim=saved_value(args, "kv_channels"),
        hidden_act="silu",
        rms_norm_eps=saved_value(args, "norm_epsilon"),
        tie_word_embeddings=not saved_value(args, "untie_embeddings_and_output_weights"),
    )
    # transformers 5 writes "dtype", 4.x "torch_dtype" (5 still reads it): keep the input's key.
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = DTYPE_NAMES[dtype]
    cfg.setdefault("max_position_embeddings", saved_value(args, "max_position_embeddings")
                   or saved_value(args, "seq_length"))
    if model_type != "qwen2":
        cfg.update(attention_bias=False, mlp_bias=False)
    theta = saved_value(args, "rotary_base")
    theta = float(theta) if theta is not None else 10000.0
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": theta}
    else:
        cfg["rope_theta"] = theta
        if saved_value(args, "use_rope_scaling") and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {
                "rope_type": "llama3", "factor": float(getattr(args, "rope_scaling_factor", 8.0)),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
    return cfg


# ---------------------------------------------------------------------------------------------
# Tensors


def qkv_to_megatron(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """HF q/k/v projections (weights ``[n*hn, h]`` or biases ``[n*hn]``) -> megatron-core's fused
    per-query-group layout ``[ng * (np/ng + 2) * hn, ...]``."""
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv, heads: int, groups: int, head_dim: int):
    rest = qkv.shape[1:]
    per_group = heads // groups * head_dim
    q, k, v = torch.split(qkv.reshape(groups, per_group + 2 * head_dim, *rest),
                          [per_group, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


EMBEDDING = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
OUTPUT = ("lm_head.weight", "output_layer.weight")


def hf_layer_shapes(layer: int, flags: dict) -> Dict[str, tuple]:
    """The shape of each HF tensor of ``layer`` for a model described by Megatron ``flags``."""
    h, f = flags["hidden_size"], flags["ffn_hidden_size"]
    hn, n, g = flags["kv_channels"], flags["num_attention_heads"], flags["num_query_groups"]
    p = f"model.layers.{layer}."
    shapes = {
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (n * hn, h), p + "self_attn.k_proj.weight": (g * hn, h),
        p + "self_attn.v_proj.weight": (g * hn, h), p + "self_attn.o_proj.weight": (h, n * hn),
        p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }
    if flags.get("add_qkv_bias"):
        shapes.update({p + "self_attn.q_proj.bias": (n * hn,), p + "self_attn.k_proj.bias": (g * hn,),
                       p + "self_attn.v_proj.bias": (g * hn,)})
    return shapes


def hf_layer_to_megatron(get: Callable[[str], torch.Tensor], layer: int, args) -> Dict[str, torch.Tensor]:
    """One layer's Megatron tensors (names relative to ``decoder.layers.N.``), full size."""
    n, g, hn = (saved_value(args, k) for k in ("num_attention_heads", "num_query_groups", "kv_channels"))
    p = f"model.layers.{layer}."
    out = {
        "input_layernorm.weight": get(p + "input_layernorm.weight"),
        "self_attention.linear_qkv.weight": qkv_to_megatron(
            *(get(p + f"self_attn.{x}_proj.weight") for x in "qkv"), n, g, hn),
        "self_attention.linear_proj.weight": get(p + "self_attn.o_proj.weight"),
        "pre_mlp_layernorm.weight": get(p + "post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        "mlp.linear_fc2.weight": get(p + "mlp.down_proj.weight"),
    }
    if saved_value(args, "add_qkv_bias"):
        out["self_attention.linear_qkv.bias"] = qkv_to_megatron(
            *(get(p + f"self_attn.{x}_proj.bias") for x in "qkv"), n, g, hn)
    return out


def megatron_layer_to_hf(tensors: Dict[str, torch.Tensor], layer: int, args) -> Dict[str, torch.Tensor]:
    """Inverse of ``hf_layer_to_megatron``."""
    n, g, hn = (saved_value(args, k) for k in ("num_attention_heads", "num_query_groups", "kv_channels"))
    p = f"model.layers.{layer}."
    need = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
            "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if saved_value(args, "add_qkv_bias"):
        need.append("self_attention.linear_qkv.bias")
    missing = [name for name in need if name not in tensors]
    extra = sorted(set(tensors) - set(need))
    if missing or extra:
        raise ConversionError(
            f"layer {layer}: the checkpoint's tensors do not match a Llama-family layer "
            f"(missing {missing}, unexpected {extra})")
    out = {
        p + "input_layernorm.weight": tensors["input_layernorm.weight"],
        p + "self_attn.o_proj.weight": tensors["self_attention.linear_proj.weight"],
        p + "post_attention_layernorm.weight": tensors["pre_mlp_layernorm.weight"],
        p + "mlp.down_proj.weight": tensors["mlp.linear_fc2.weight"],
    }
    q, k, v = qkv_from_megatron(tensors["self_attention.linear_qkv.weight"], n, g, hn)
    out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v})
    if "self_attention.linear_qkv.bias" in tensors:
        q, k, v = qkv_from_megatron(tensors["self_attention.linear_qkv.bias"], n, g, hn)
        out.update({p + "self_attn.q_proj.bias": q, p + "self_attn.k_proj.bias": k,
                    p + "self_attn.v_proj.bias": v})
    gate, up = torch.chunk(tensors["mlp.linear_fc1.weight"], 2, dim=0)
    out.update({p + "mlp.gate_proj.weight": gate.contiguous(), p + "mlp.up_proj.weight": up.contiguous()})
    return out
