"""LoRA adapters on megatron-core's tensor-parallel linear layers (MindSpeed-LLM's ``--lora-*``).

The layer spec (model/gpt.py) swaps ``linear_qkv``/``linear_fc1`` (ColumnParallelLinear) and
``linear_proj``/``linear_fc2`` (RowParallelLinear) for the subclasses below; the base layer's
forward is megatron-core's own, and the adapter adds ``scaling * B(A(dropout(x)))``, sharded as
the base layer is:

- column-parallel: A replicated ``[r, in]``, B column-parallel ``[out/TP, r]`` (rows as the base
  weight's, SwiGLU's ``[gate_r; up_r]`` too). Without sequence parallelism ``x A^T`` goes through
  ``copy_to_tensor_model_parallel_region``, whose backward all-reduces its gradient, so every TP
  rank computes A's full gradient and the input's (the base layer all-reduces its own part).
  With sequence parallelism x is gathered as the base layer gathers it (backward:
  reduce-scatter); A's gradient is then partial per rank and A carries ``sequence_parallel``,
  so megatron-core's ``finalize_model_grads`` all-reduces it over TP, as it does the norms'.
- row-parallel: A row-parallel ``[r, in/TP]``, B replicated ``[out, r]``. The partial ``x_r A_r^T``
  is all-reduced (reduce-scattered over the sequence with sequence parallelism) exactly as the
  base output is; with sequence parallelism B's gradient is partial and B carries
  ``sequence_parallel``.

State-dict keys are PEFT's, as MindSpeed-LLM saves them (``linear_qkv.lora_A.default.weight``),
while the base weight keeps its own key (``linear_qkv.weight``): a checkpoint without adapters
loads as it is. ``freeze_base`` leaves only the adapters trainable before DDP is built, so
megatron-core's DDP allocates no gradient buffers and the optimizer no state for the base.
Initialization (layout-invariant, model/init.py): A as PEFT (kaiming-uniform, a=sqrt(5), over
the full ``[r, in]``), B zeros, so training starts from the base model's outputs.
"""

import re

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

ADAPTER = "default"  # PEFT's adapter name, part of its (and MindSpeed-LLM's) keys
_KEY = re.compile(r"\.lora_[AB]\.")


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter weight."""
    return _KEY.search(name) is not None


def adapter_key(module: str, which: str) -> str:
    """``decoder.layers.0.self_attention.linear_qkv`` + ``A`` -> its adapter weight's key."""
    return f"{module}.lora_{which}.{ADAPTER}.weight"


class _Weight(torch.nn.Module):
    """Holds one adapter matrix as ``weight`` (PEFT's ``lora_A.default`` is an nn.Linear)."""

    def __init__(self, rows: int, cols: int, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(rows, cols, dtype=config.params_dtype, device=device))


class _LoraMixin:
    def _add_adapters(self, a_shape, b_shape, lora_r, lora_alpha, lora_dropout) -> None:
        self.lora_scaling = lora_alpha / lora_r
        self.lora_dropout = torch.nn.Dropout(lora_dropout) if lora_dropout else torch.nn.Identity()
        self.lora_A = torch.nn.ModuleDict({ADAPTER: _Weight(*a_shape, self.config)})
        self.lora_B = torch.nn.ModuleDict({ADAPTER: _Weight(*b_shape, self.config)})

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron-core's own, with the adapter keys in the TP axis map (the key of a
        replicated adapter matrix is saved replicated)."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, self._tp_axis_map(),
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    @property
    def adapter_a(self) -> torch.Tensor:
        return self.lora_A[ADAPTER].weight

    @property
    def adapter_b(self) -> torch.Tensor:
        return self.lora_B[ADAPTER].weight


class LoraColumnParallelLinear(_LoraMixin, ColumnParallelLinear):
    """ColumnParallelLinear + adapter (A replicated, B split like the weight's rows)."""

    def __init__(self, *args, lora_r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 lora_glu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        assert not self.gather_output, "LoRA on a gathered column-parallel output"
        self.lora_glu = lora_glu  # SwiGLU's fc1: B's rows are [gate_r; up_r] as the weight's
        self._add_adapters((lora_r, self.input_size), (self.output_size_per_partition, lora_r),
                           lora_r, lora_alpha, lora_dropout)
        set_tensor_model_parallel_attributes(self.adapter_b, True, 0, 2 if lora_glu else 1)
        # With SP, A's gradient is partial per TP rank: finalize_model_grads all-reduces it.
        self.adapter_a.sequence_parallel = self.sequence_parallel

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        x = input_
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        z = torch.nn.functional.linear(self.lora_dropout(x), self.adapter_a)
        if not self.sequence_parallel:
            z = copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        return output + self.lora_scaling * torch.nn.functional.linear(z, self.adapter_b), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}lora_B.{ADAPTER}.weight"
        if self.lora_glu:
            # megatron-core's MLP gives fc1's weight this treatment, not our extra key.
            state[key] = apply_swiglu_sharded_factory(
                state[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return state

    def _tp_axis_map(self):
        return {"weight": 0, "bias": 0, f"lora_B.{ADAPTER}.weight": 0}


class LoraRowParallelLinear(_LoraMixin, RowParallelLinear):
    """RowParallelLinear + adapter (A split like the weight's columns, B replicated)."""

    def __init__(self, *args, lora_r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        assert self.input_is_parallel, "LoRA on a row-parallel layer with a replicated input"
        self._add_adapters((lora_r, self.input_size_per_partition), (self.output_size, lora_r),
                           lora_r, lora_alpha, lora_dropout)
        set_tensor_model_parallel_attributes(self.adapter_a, True, 1, 1)
        self.adapter_b.sequence_parallel = self.sequence_parallel

    def forward(self, input_):
        output, bias = super().forward(input_)
        x = input_
        if isinstance(self.lora_dropout, torch.nn.Dropout):
            # x is split over TP ranks: each draws its own mask (as attention dropout does).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = self.lora_dropout(x)
        z = torch.nn.functional.linear(x, self.adapter_a)
        if self.sequence_parallel:
            z = reduce_scatter_to_sequence_parallel_region(z, group=self.tp_group)
        else:
            z = reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        return output + self.lora_scaling * torch.nn.functional.linear(z, self.adapter_b), bias

    def _tp_axis_map(self):
        return {"weight": 1, f"lora_A.{ADAPTER}.weight": 1}


def _submodules(spec):
    """A ModuleSpec's submodules; megatron-core 0.19's local spec gives the MLP as
    ``functools.partial(MLP.as_mlp_submodule, submodules=...)`` instead."""
    return spec.submodules if hasattr(spec, "submodules") else spec.keywords["submodules"]


def apply_to_spec(spec, lora, swiglu: bool) -> None:
    """Swap the ``--lora-target-modules`` linears of a transformer-layer spec for LoRA ones."""
    params = dict(lora_r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout)
    attention = _submodules(spec.submodules.self_attention)
    mlp = _submodules(spec.submodules.mlp)
    targets = {"linear_qkv": (attention, LoraColumnParallelLinear, {}),
               "linear_proj": (attention, LoraRowParallelLinear, {}),
               "linear_fc1": (mlp, LoraColumnParallelLinear, {"lora_glu": swiglu}),
               "linear_fc2": (mlp, LoraRowParallelLinear, {})}
    for name in lora.lora_target_modules:
        owner, cls, extra = targets[name]
        setattr(owner, name, ModuleSpec(module=cls, params=dict(params, **extra)))


def _input_requires_grad(module, inputs, output):
    return output.requires_grad_(True) if not output.requires_grad else output


def freeze_base(module: torch.nn.Module) -> None:
    """Only the adapters train (before DDP: it sizes its gradient buffers by requires_grad).
    A frozen weight needs no TP gradient reduction either: drop ``sequence_parallel`` from the
    norms, as MindSpeed-LLM does, so that finalize_model_grads skips them."""
    for name, param in module.named_parameters():
        if is_adapter(name):
            continue
        param.requires_grad_(False)
        if hasattr(param, "sequence_parallel"):
            del param.sequence_parallel
    embedding = getattr(module, "embedding", None)  # on the first pipeline stage
    if module.config.recompute_granularity == "full" and embedding is not None:
        # The frozen embedding's output needs no gradient, so megatron-core's checkpointed
        # layers would get inputs that do not require grad and backpropagate nothing into the
        # adapters inside them (MindSpeed-LLM's --lora-register-forward-hook does the same).
        embedding.register_forward_hook(_input_requires_grad)


def merge_into(full: dict, adapters: dict, scaling: float) -> dict:
    """Full (TP1/PP1) state dict with ``W + scaling * B @ A`` for every adapted layer; the
    adapters' full tensors come from ``adapters`` (keys as ``adapter_key``)."""
    merged = dict(full)
    for key in adapters:
        if ".lora_A." not in key:
            continue
        module = key[:key.index(".lora_A.")]
        a, b = adapters[key], adapters[adapter_key(module, "B")]
        weight = merged[f"{module}.weight"]
        delta = scaling * (b.double() @ a.double())
        merged[f"{module}.weight"] = (weight.double() + delta).to(weight.dtype)
    return merged
