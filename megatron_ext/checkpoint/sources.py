"""Conversion sources: a checkpoint read as full (TP=1) Megatron tensors, one layer at a time.

``HfSource`` maps a Hugging Face safetensors checkpoint, ``MegatronSource`` merges the TP
ranks of a Megatron checkpoint. Both check their whole input when opened (so nothing is written
from a bad one) and read tensors lazily (``safe_open``; rank files memory-mapped).
"""

import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint import hf
from megatron_ext.checkpoint.args import build_args, saved_value
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.hf_io import HfReader, check_finite
from megatron_ext.checkpoint.sharding import merge_tensor, stage_layers

HF_OUTPUT_ITERATION = 1

# Megatron-LM's Transformer Engine spec fuses the pre-norms into the following linear layer.
_TE_RENAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)


def _hf_tokenizer_args(load_dir: Path) -> dict:
    """The tokenizer flags of a model directory that holds its tokenizer (tokenizer.json), as
    Megatron-LM saves them: the checkpoint then loads without --tokenizer-* flags."""
    if not (load_dir / "tokenizer.json").is_file():
        return {}
    return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(load_dir.resolve())}


class HfSource:
    def __init__(self, load_dir: Path, model_type_hf: Optional[str]):
        self.path = load_dir
        if not load_dir.is_dir():
            raise ConversionError(f"--load-dir {load_dir} does not exist")
        self.hf_config = hf.read_hf_config(load_dir, model_type_hf)
        self.flags = hf.megatron_flags_from_hf(self.hf_config, load_dir / "config.json")
        self.model_type_hf = model_type_hf or self.hf_config["model_type"]
        self.reader = HfReader(load_dir)
        self._check_tensors()
        self.dtype = self._get(hf.EMBEDDING[0]).dtype
        self.iteration = HF_OUTPUT_ITERATION
        self.num_layers = self.flags["num_layers"]
        self.untied = self.flags["untie_embeddings_and_output_weights"]
        self.args = build_args(
            **self.flags, padded_vocab_size=self.flags["vocab_size"], make_vocab_size_divisible_by=1,
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, params_dtype=self.dtype,
            hf_model_type=self.model_type_hf, hf_config=self.hf_config,
            **_hf_tokenizer_args(load_dir))

    def _check_tensors(self) -> None:
        """Every tensor the config implies is in the files, with the right shape."""
        f = self.flags
        expected = {hf.EMBEDDING[0]: (f["vocab_size"], f["hidden_size"]),
                    hf.FINAL_NORM[0]: (f["hidden_size"],)}
        if f["untie_embeddings_and_output_weights"]:
            expected[hf.OUTPUT[0]] = (f["vocab_size"], f["hidden_size"])
        for layer in range(f["num_layers"]):
            expected.update(hf.hf_layer_shapes(layer, f))
        names = self.reader.names()
        missing = [name for name in expected if name not in names]
        if missing:
            raise ConversionError(
                f"--load-dir {self.path}: {len(missing)} tensor(s) that config.json implies are "
                f"missing from the safetensors files, e.g. {', '.join(missing[:3])}")
        for name, shape in expected.items():
            found = self.reader.shape(name)
            if found != shape:
                raise ConversionError(f"--load-dir {self.path}: {name} has shape {found}, "
                                      f"config.json implies {shape}")

    # Each read releases the files afterwards: a memory-mapped file keeps every page read from
    # it resident (and counted in the RSS) while it stays open.
    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        try:
            return hf.hf_layer_to_megatron(self.reader.get, index, self.args)
        finally:
            self.reader.close()

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.reader.get(name)
        finally:
            self.reader.close()

    def embedding(self) -> torch.Tensor:
        return self._get(hf.EMBEDDING[0])

    def final_norm(self) -> Dict[str, torch.Tensor]:
        return {"decoder.final_layernorm.weight": self._get(hf.FINAL_NORM[0])}

    def output_layer(self) -> Optional[torch.Tensor]:
        return self._get(hf.OUTPUT[0]) if self.untied else None

    def close(self):
        self.reader.close()


class MegatronSource:
    def __init__(self, load_dir: Path):
        self.path = load_dir
        if not load_dir.is_dir():
            raise ConversionError(f"--load-dir {load_dir} does not exist")
        iteration = fmt.read_tracker(load_dir)
        if iteration is None:
            raise ConversionError(
                f"--load-dir {load_dir}: no {fmt.TRACKER_FILENAME} (not a Megatron checkpoint "
                f"directory, or no complete checkpoint in it)")
        self.iteration = iteration
        it_dir = fmt.iteration_dir(load_dir, iteration)
        if not it_dir.is_dir():
            raise ConversionError(f"{fmt.tracker_file(load_dir)} names iteration {iteration} but "
                                  f"{it_dir} does not exist")
        first = fmt.load_rank_file(self._find_first(it_dir))
        self.args = first.get("args")
        if self.args is None:
            raise ConversionError(f"{self._find_first(it_dir)} has no 'args': the model shape is unknown")
        a = self.args
        # Our torch checkpoints of before 2026-12-02 kept the consumed samples beside args
        # only; the converted checkpoint's resume reads them from args, as Megatron-LM's.
        for key, name in (("consumed_samples", "consumed_train_samples"),
                          ("consumed_valid_samples", "consumed_valid_samples")):
            if key in first and saved_value(a, name) is None:
                setattr(a, name, first[key])
        lacking = [k for k in ("num_layers", "hidden_size", "num_attention_heads")
                   if saved_value(a, k) is None]
        if lacking:
            raise ConversionError(f"{self._find_first(it_dir)}: its args lack {', '.join(lacking)}")
        self.tp = saved_value(a, "tensor_model_parallel_size") or 1
        self.pp = saved_value(a, "pipeline_model_parallel_size")
        self.num_layers = saved_value(a, "num_layers")
        self.swiglu = saved_value(a, "swiglu")
        self.untied = saved_value(a, "untie_embeddings_and_output_weights")
        # Model chunks per stage (the interleaved schedule): model0, model1, ... per rank file.
        self.vp = saved_value(a, "virtual_pipeline_model_parallel_size") or 1
        self.model_keys = fmt.model_keys(self.vp)
        for name in ("account_for_embedding_in_pipeline_split",
                     "account_for_loss_in_pipeline_split"):
            if saved_value(a, name) and self.pp > 1:
                raise ConversionError(f"{it_dir}: saved with --{name.replace('_', '-')}, a "
                                      f"pipeline split not supported here")
        # The uneven split it was saved with (--decoder-first/last-pipeline-num-layers).
        self.stage_split = (saved_value(a, "decoder_first_pipeline_num_layers"),
                            saved_value(a, "decoder_last_pipeline_num_layers"))
        expected = {fmt.rank_dir_name(t, p, self.pp) for t in range(self.tp) for p in range(self.pp)}
        present = {d.name for d in it_dir.iterdir() if d.is_dir() and d.name.startswith("mp_rank_")}
        if present != expected:
            raise ConversionError(
                f"{it_dir}: the rank directories {sorted(present)} do not match the args in the "
                f"checkpoint (TP {self.tp}, PP {self.pp}: {sorted(expected)})")
        # Every rank file must be readable (and hold a model) before anything is written.
        self._dtype = None
        for t in range(self.tp):
            for p in range(self.pp):
                path = fmt.rank_file(load_dir, iteration, t, p, self.pp)
                payload = fmt.load_rank_file(path)
                missing = [k for k in self.model_keys if not isinstance(payload.get(k), dict)]
                if missing:
                    held = sorted(k for k in payload if k.startswith("model"))
                    raise ConversionError(
                        f"{path} has no {' '.join(repr(k) for k in missing)} state dict: its args "
                        f"say {self.vp} model chunk(s) per stage (virtual_pipeline_model_"
                        f"parallel_size), the file holds {held}")
                if self._dtype is None:
                    self._dtype = next(v.dtype for v in payload[self.model_keys[0]].values()
                                       if torch.is_tensor(v))
                del payload
        if "optimizer" in first:
            print("note: optimizer and RNG states are not converted; train from the output with "
                  "--finetune or --no-load-optim --no-load-rng", file=sys.stderr)
        self.dtype = self._dtype

    @staticmethod
    def _find_first(it_dir: Path) -> Path:
        for name in ("mp_rank_00", "mp_rank_00_000"):
            path = it_dir / name / fmt.RANK_FILENAME
            if path.exists():
                return path
        return it_dir / "mp_rank_00" / fmt.RANK_FILENAME

    def _stage_layers(self, pp_rank: int, chunk: int) -> range:
        return stage_layers(self.num_layers, pp_rank, self.pp, *self.stage_split, chunk, self.vp)

    def _stage_models(self, pp_rank: int, chunk: int = 0) -> List[dict]:
        """The memory-mapped models of stage ``pp_rank``'s TP ranks (their model chunk
        ``chunk``). Loaded per request and dropped after it: a mapping keeps every page read
        from it resident while it lives."""
        return [fmt.load_rank_file(fmt.rank_file(self.path, self.iteration, t, pp_rank,
                                                 self.pp))[self.model_keys[chunk]]
                for t in range(self.tp)]

    def _merged(self, models: List[dict], pp_rank: int, local_name: str) -> torch.Tensor:
        if local_name not in models[0]:
            path = fmt.rank_file(self.path, self.iteration, 0, pp_rank, self.pp)
            raise ConversionError(f"{path}: tensor {local_name} is missing")
        parts = [check_finite(m[local_name], local_name,
                              fmt.rank_file(self.path, self.iteration, t, pp_rank, self.pp))
                 for t, m in enumerate(models)]
        full = merge_tensor(local_name, parts, swiglu=self.swiglu)
        return full.clone() if full is parts[0] else full  # never a view of the mapped file

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        pp_rank, chunk = next((stage, chunk) for stage in range(self.pp)
                              for chunk in range(self.vp)
                              if index in self._stage_layers(stage, chunk))
        local = index - self._stage_layers(pp_rank, chunk).start
        prefix = f"decoder.layers.{local}."
        models = self._stage_models(pp_rank, chunk)
        out = {}
        for name, value in models[0].items():
            if not name.startswith(prefix) or not torch.is_tensor(value) or name.endswith("._extra_state"):
                continue
            suffix = name[len(prefix):]
            tensor = self._merged(models, pp_rank, name)
            for te_name, local_name in _TE_RENAMES:
                if suffix == te_name:
                    suffix = local_name
            out[suffix] = tensor
        if not out:
            raise ConversionError(f"{fmt.rank_file(self.path, self.iteration, 0, pp_rank, self.pp)}: "
                                  f"layer {index} (local {local}) is missing")
        return out

    def embedding(self) -> torch.Tensor:
        return self._merged(self._stage_models(0), 0, "embedding.word_embeddings.weight")

    def final_norm(self) -> Dict[str, torch.Tensor]:
        last = self.pp - 1
        models = self._stage_models(last, self.vp - 1)
        names = [n for n in models[0] if n.startswith("decoder.final_layernorm.") and torch.is_tensor(models[0][n])]
        if not names:
            raise ConversionError(f"{fmt.rank_file(self.path, self.iteration, 0, last, self.pp)}: "
                                  f"decoder.final_layernorm is missing")
        return {n: self._merged(models, last, n) for n in names}

    def output_layer(self) -> Optional[torch.Tensor]:
        if not self.untied:
            return None
        return self._merged(self._stage_models(self.pp - 1, self.vp - 1), self.pp - 1,
                            "output_layer.weight")

    def close(self):
        pass
