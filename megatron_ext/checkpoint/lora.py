"""convert_ckpt.py with ``--lora-load``: LoRA adapters merged into their base, or exported for PEFT.

MindSpeed-LLM's flags: ``--load-dir BASE --lora-load ADAPTERS`` (a LoRA checkpoint of either
format, as training's ``--save`` writes it: training/lora_checkpoint.py) merges
``W + alpha/r * B @ A`` into every adapted layer, then converts as without adapters (to HF, or
to Megatron at any TP/PP). ``--save-lora-to-hf`` writes the adapters alone as a PEFT adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names for
``LlamaForCausalLM``), which ``PeftModel.from_pretrained`` loads on the HF export of the base.

A fused megatron-core layer adapts several HF modules with one A: linear_qkv's A is q_proj's,
k_proj's and v_proj's A, and its B splits into their Bs (by the per-query-group layout, as the
weight does); linear_fc1's A is gate_proj's and up_proj's, its B splits in halves. Each HF
module's update ``B_x @ A`` is then exactly the rows of the fused ``B @ A``.
``--lora-r``, ``--lora-alpha``, ``--lora-target-modules`` are read from the adapter checkpoint;
given, they must agree with it.
"""

import json
from pathlib import Path

import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.args import saved_value
from megatron_ext.checkpoint.dist_format import is_dist_checkpoint, load_common_state_dict
from megatron_ext.checkpoint.hf import ConversionError, qkv_from_megatron
from megatron_ext.model.lora import adapter_key, merge_into

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "ffn_hidden_size", "swiglu")
# megatron-core layer -> the HF Llama modules it fuses (in the order its B's rows hold them).
HF_MODULES = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj"),
              "self_attention.linear_proj": ("self_attn.o_proj",),
              "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.linear_fc2": ("mlp.down_proj",)}


def add_arguments(parser) -> None:
    parser.add_argument("--lora-load", type=Path, default=None,
                        help="LoRA checkpoint (adapters) trained on --load-dir: merged into it, "
                             "or exported alone with --save-lora-to-hf")
    parser.add_argument("--lora-r", type=int, default=None,
                        help="accepted as MindSpeed-LLM's; read from --lora-load")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="accepted as MindSpeed-LLM's; read from --lora-load")
    parser.add_argument("--lora-target-modules", nargs="+", default=None,
                        help="accepted as MindSpeed-LLM's; read from --lora-load")
    parser.add_argument("--save-lora-to-hf", action="store_true",
                        help="write the adapters alone as a PEFT adapter directory "
                             "(with --save-model-type hf and --lora-load)")


def saved_metadata(load_dir: Path):
    """The ``lora`` entry of the checkpoint in ``load_dir`` (training/lora_checkpoint.py), None
    for a checkpoint without adapters (or no checkpoint)."""
    iteration = fmt.read_tracker(load_dir) if load_dir.is_dir() else None
    if iteration is None:
        return None
    directory = fmt.iteration_dir(load_dir, iteration)
    if is_dist_checkpoint(directory):
        return load_common_state_dict(directory).get("lora")
    first = sorted(directory.glob("mp_rank_*/" + fmt.RANK_FILENAME))
    return fmt.load_rank_file(first[0]).get("lora") if first else None


def read_metadata(opts) -> dict:
    """The adapters' ``lora`` entry; --load-dir must be their base, not adapters."""
    if saved_metadata(opts.load_dir) is not None:
        raise ConversionError(f"--load-dir {opts.load_dir} is a LoRA checkpoint (adapters only): "
                              f"pass it as --lora-load and its base model as --load-dir")
    entry = saved_metadata(opts.lora_load)
    if entry is None:
        raise ConversionError(f"--lora-load {opts.lora_load} holds no LoRA adapters (a base "
                              f"model? pass it as --load-dir)")
    return entry


def flag_mismatch(opts, meta: dict):
    """The first of ``opts``' --lora-r/--lora-alpha/--lora-target-modules given (not None)
    and unlike the adapters' ``lora`` entry, as an error message; None when they agree."""
    for name in ("lora_r", "lora_alpha", "lora_target_modules"):
        given = getattr(opts, name)
        if given is not None and given != meta[name] and not (
                name == "lora_alpha" and float(given) == float(meta[name])):
            given, saved = (" ".join(v) if isinstance(v, list) else v for v in (given, meta[name]))
            return (f"--{name.replace('_', '-')} {given}: {opts.lora_load} was trained with "
                    f"{saved}; leave the flag out (it is read from the adapters)")
    return None


def check(opts, meta: dict, base_args, adapter_args) -> None:
    """The MindSpeed-LLM flags against the checkpoint, and the adapters against the base."""
    mismatch = flag_mismatch(opts, meta)
    if mismatch:
        raise ConversionError(mismatch)
    for name in _SHAPE:
        if saved_value(base_args, name) != saved_value(adapter_args, name):
            raise ConversionError(
                f"--lora-load {opts.lora_load} adapts a model with {name} "
                f"{saved_value(adapter_args, name)}, --load-dir {opts.load_dir} has "
                f"{saved_value(base_args, name)}: not its base")


class MergedSource:
    """A base source whose layers carry their adapters merged in; the rest is the base's."""

    def __init__(self, base, adapters, meta: dict):
        self.base, self.adapters = base, adapters
        self.scaling = meta["lora_alpha"] / meta["lora_r"]

    def __getattr__(self, name):
        return getattr(self.base, name)

    def layer(self, index: int):
        return merge_into(self.base.layer(index), self.adapters.layer(index), self.scaling)

    def close(self):
        self.adapters.close()
        self.base.close()


def _hf_adapters(tensors: dict, args) -> dict:
    """One layer's adapters (megatron names) -> {HF module: (A, B)}."""
    out = {}
    for module, hf_modules in HF_MODULES.items():
        if adapter_key(module, "A") not in tensors:
            continue
        a, b = tensors[adapter_key(module, "A")], tensors[adapter_key(module, "B")]
        if module.endswith("linear_qkv"):
            bs = qkv_from_megatron(b, *(saved_value(args, k) for k in
                                        ("num_attention_heads", "num_query_groups", "kv_channels")))
        elif module.endswith("linear_fc1"):
            bs = torch.chunk(b, 2, dim=0)  # [gate; up], as the weight (HF Llama is SwiGLU)
        else:
            bs = (b,)
        for hf_module, b_part in zip(hf_modules, bs):
            out[hf_module] = (a, b_part)
    return out


class PeftSink:
    """Writes a MergedSource's adapters alone as a PEFT LoRA directory for ``LlamaForCausalLM``."""

    def __init__(self, meta: dict, dtype, base_name: str):
        self.meta, self.dtype, self.base_name = meta, dtype, base_name

    def write(self, source: MergedSource, out: Path) -> None:
        write_peft(source.adapters, self.meta, source.base.args, out, self.dtype, self.base_name)


def write_peft(adapters, meta: dict, args, out: Path, dtype, base_name: str) -> None:
    """The adapters as a PEFT LoRA directory for ``LlamaForCausalLM``."""
    from safetensors.torch import save_file

    weights, targets = {}, set()
    for index in range(saved_value(args, "num_layers")):
        for hf_module, (a, b) in _hf_adapters(adapters.layer(index), args).items():
            prefix = f"base_model.model.model.layers.{index}.{hf_module}"
            weights[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous().clone()
            weights[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous().clone()
            targets.add(hf_module.split(".")[-1])
    if not weights:
        raise ConversionError("--lora-load holds no adapters")
    save_file(weights, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": meta["lora_r"], "lora_alpha": meta["lora_alpha"],
              "lora_dropout": meta.get("lora_dropout", 0.0), "target_modules": sorted(targets),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": None, "use_rslora": False}
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
