"""torch_dist checkpoints for convert_ckpt.py: megatron-core's distributed layout, read and
written on one process as full (TP=1) tensors.

megatron-core stores every tensor whole under a global key, whatever TP/PP saved it: the
embedding, final norm and output layer under their GPTModel names; the layers stacked along a
first axis of ``num_layers`` under ``decoder.layers.<suffix>``, with the pre-norms under their
Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``, as megatron-core's
local spec maps them, so that TE and local checkpoints interchange); SwiGLU's fc1 as
``[gate; up]``; the vocabulary padded; a tied output layer not at all (it is the embedding).

Reading goes straight to the ``.distcp`` files with ``torch.distributed.checkpoint`` (no process
group); the stacked layers are read once, so the peak memory is about the model's weights.
Writing goes through megatron-core's ``dist_checkpointing.save`` on a one-process gloo group,
each layer under the key and offset GPTModel gives it, so megatron-core (and Megatron-LM) load
the result at any TP/PP.

The non-sharded part (args, iteration, optimizer param groups, ...) is ``common.pt`` up to
megatron-core 0.18; 0.19 writes it into the ``.distcp`` files instead, as the ShardedObject
``common_state``, and reads both. ``load_common_state_dict`` and ``load`` read both on 0.16-0.18
too, so a checkpoint saved on 0.19 resumes, converts and generates there.
"""

import argparse
import contextlib
import inspect
import io
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.args import saved_value
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.sinks import MegatronSink, Progress

LAYERS = "decoder.layers."
_NORMS = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
          ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
# megatron-core's linear layers save an ``_extra_state`` object per layer (None for the local
# ones, TE's FP8 metadata otherwise) and its loader asks for them.
_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                "mlp.linear_fc2")


def stored_suffix(suffix: str) -> str:
    """The stored name of a layer tensor (``input_layernorm.weight`` -> TE's name)."""
    for local, stored in _NORMS:
        if suffix.startswith(local):
            return stored + suffix[len(local):]
    return suffix


def local_suffix(suffix: str) -> str:
    for local, stored in _NORMS:
        if suffix.startswith(stored):
            return local + suffix[len(stored):]
    return suffix


def is_dist_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` (an iteration directory) is a complete torch_dist checkpoint
    (megatron-core writes its ``metadata.json`` last)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.check_is_distributed_checkpoint(str(directory))


# megatron-core 0.19's ShardedObject("common_state", data, (1,), (0,)): its unique key.
_COMMON_STATE_KEY = "common_state/shard_0_1"


def _reads_common_pt_only() -> bool:
    """megatron-core 0.16-0.18: ``dist_checkpointing.load`` reads the common state through a
    common strategy, whose torch one reads ``common.pt`` alone (0.19 took the argument away with
    the strategy, reading either layout itself)."""
    from megatron.core import dist_checkpointing

    return "common_strategy" in inspect.signature(dist_checkpointing.load).parameters


def _common_in_distcp(directory) -> bool:
    return _reads_common_pt_only() and not (Path(directory) / "common.pt").is_file()


def _read_common_state(directory) -> dict:
    """The common state a megatron-core 0.19+ save keeps in the ``.distcp`` files."""
    state = {_COMMON_STATE_KEY: io.BytesIO()}
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    except Exception as exc:  # no such key: neither layout holds it
        raise fmt.CheckpointError(
            f"checkpoint {directory} has neither common.pt nor a common_state entry in its "
            f".distcp files ({type(exc).__name__}): it is incomplete or not a megatron-core "
            f"torch_dist checkpoint") from None
    data = state[_COMMON_STATE_KEY]
    if isinstance(data, io.BytesIO):
        data.seek(0)
        data = torch.load(data, map_location="cpu")  # as megatron-core reads common.pt
    return data[0]  # saved as a one-element list (megatron-core's ShardedObject data)


def load_common_state_dict(directory) -> dict:
    """megatron-core's ``dist_checkpointing.load_common_state_dict``, for either layout."""
    from megatron.core import dist_checkpointing

    if _common_in_distcp(directory):
        return _read_common_state(directory)
    return dist_checkpointing.load_common_state_dict(str(directory))


def load(sharded_state_dict, directory, **kwargs):
    """megatron-core's ``dist_checkpointing.load``, for either layout of the common state."""
    from megatron.core import dist_checkpointing

    if _common_in_distcp(directory):
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

        class CommonInDistcp(TorchCommonLoadStrategy):
            def load_common(self, checkpoint_dir):
                return _read_common_state(checkpoint_dir)

        kwargs["common_strategy"] = CommonInDistcp()
    return dist_checkpointing.load(sharded_state_dict, str(directory), **kwargs)


class DistSource:
    """A torch_dist iteration directory as full (TP=1) tensors, one layer at a time."""

    def __init__(self, load_dir: Path, iteration, it_dir: Path, adapters: bool = False):
        """``adapters``: a LoRA checkpoint (layers' adapters only, training/lora_checkpoint.py)."""
        self.path, self.iteration, self.dir = load_dir, iteration, it_dir
        common = load_common_state_dict(it_dir)
        self.args = common.get("args")
        if not isinstance(self.args, argparse.Namespace):
            raise ConversionError(f"{it_dir}/common.pt has no 'args': the model shape is unknown")
        lacking = [k for k in ("num_layers", "hidden_size", "num_attention_heads")
                   if saved_value(self.args, k) is None]
        if lacking:
            raise ConversionError(f"{it_dir}/common.pt: its args lack {', '.join(lacking)}")
        self.num_layers = saved_value(self.args, "num_layers")
        self.untied = saved_value(self.args, "untie_embeddings_and_output_weights")
        self.meta = dcp.FileSystemReader(str(it_dir)).read_metadata().state_dict_metadata
        self.layer_keys = [k for k, v in self.meta.items() if k.startswith(LAYERS)
                           and hasattr(v, "size") and "._extra_state" not in k]
        needed = [] if adapters else (
            [EMBEDDING, "decoder.final_layernorm.weight"] + ([OUTPUT] if self.untied else []))
        missing = [k for k in needed if k not in self.meta] + ([] if self.layer_keys else [LAYERS])
        if missing:
            raise ConversionError(f"{it_dir}: the torch_dist checkpoint has no {', '.join(missing)}")
        for key in self.layer_keys:
            if self.meta[key].size[0] != self.num_layers:
                raise ConversionError(f"{it_dir}: {key} stacks {self.meta[key].size[0]} layers, "
                                      f"the args say {self.num_layers}")
        self.dtype = self.meta[EMBEDDING if not adapters else self.layer_keys[0]].properties.dtype
        if "opt_param_scheduler" in common:
            print("note: optimizer and RNG states are not converted; train from the output with "
                  "--finetune or --no-load-optim --no-load-rng", file=sys.stderr)
        self._layers = None

    def _read(self, keys) -> Dict[str, torch.Tensor]:
        state = {k: torch.empty(self.meta[k].size, dtype=self.meta[k].properties.dtype)
                 for k in keys}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.dir)), no_dist=True)
        return state

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        if self._layers is None:
            self._layers = self._read(self.layer_keys)
        return {local_suffix(k[len(LAYERS):]): t[index].clone() for k, t in self._layers.items()}

    def embedding(self) -> torch.Tensor:
        return self._read([EMBEDDING])[EMBEDDING]

    def final_norm(self) -> Dict[str, torch.Tensor]:
        return self._read([k for k in self.meta if k.startswith("decoder.final_layernorm.")])

    def output_layer(self) -> Optional[torch.Tensor]:
        return self._read([OUTPUT])[OUTPUT] if self.untied else None

    def close(self):
        self._layers = None


@contextlib.contextmanager
def _single_process_group():
    """The process group dist_checkpointing.save needs: this process alone (gone afterwards)."""
    from megatron_ext import platform

    platform.apply()  # dist_checkpointing's CUDA calls, on a machine without CUDA
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


class DistSink(MegatronSink):
    """A torch_dist checkpoint (no TP/PP layout: it loads at any), args as ``MegatronSink``."""

    def __init__(self, source, dtype: torch.dtype, divisible_by: int, tokenizer_model):
        super().__init__(source, 1, 1, dtype, divisible_by, tokenizer_model)
        self.args.ckpt_format = "torch_dist"

    def write(self, source, out: Path) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

        def whole(key, tensor, layer=None):
            if layer is None:
                return ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
            return ShardedTensor.from_rank_offsets(key, tensor, (0, layer, self.num_layers),
                                                   replica_id=0, prepend_axis_num=1)

        self.num_layers = source.num_layers
        model = {EMBEDDING: whole(EMBEDDING, self._shard(EMBEDDING, source.embedding(), 0, vocab=True))}
        progress = Progress(self.num_layers, "convert (layers)")
        for index in range(self.num_layers):
            for name, tensor in source.layer(index).items():
                key = LAYERS + stored_suffix(name)
                model[f"{key}.{index}"] = whole(key, self._shard(name, tensor, 0), index)
            for linear in _EXTRA_STATE:
                key = f"{LAYERS}{linear}._extra_state"
                model[f"{key}.{index}"] = ShardedObject(key, None, (self.num_layers,), (index,),
                                                        replica_id=0)
            progress.update(f"layer {index}")
        for name, tensor in source.final_norm().items():
            model[name] = whole(name, self._shard(name, tensor, 0))
        output = source.output_layer()
        if output is not None:
            model[OUTPUT] = whole(OUTPUT, self._shard(OUTPUT, output, 0, vocab=True))
        iteration = 0 if self.iteration == fmt.RELEASE else self.iteration
        directory = fmt.iteration_dir(out, self.iteration)
        directory.mkdir(parents=True)
        with _single_process_group():
            dist_checkpointing.save({"args": self.args, "iteration": iteration, "model": model,
                                     "checkpoint_version": fmt.CHECKPOINT_VERSION}, str(directory))
        fmt.write_tracker(out, self.iteration)  # last: the checkpoint is complete
