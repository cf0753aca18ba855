"""Conversion sinks: write what a source (``sources.py``) yields as a Megatron tp/pp checkpoint
or as Hugging Face safetensors, one output file at a time.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint import hf
from megatron_ext.checkpoint.args import dtype_flags, padded_vocab_size, saved_value
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.hf_io import HfWriter
from megatron_ext.checkpoint.hf_tokenizer import tokenizer_export
from megatron_ext.checkpoint.sharding import shard_tensor, split_problem, stage_layers


class Progress:
    """A progress bar over layers, on stderr."""

    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.done = max(total, 1), desc, 0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_pct = -1
        self._draw()

    def update(self, label: str = "") -> None:
        self.done += 1
        self._draw(label)

    def _draw(self, label: str = "") -> None:
        pct = 100 * self.done // self.total
        if not self.tty and pct // 10 == self._last_pct // 10 and self.done not in (0, self.total):
            return
        self._last_pct = pct
        filled = 30 * self.done // self.total
        line = (f"{self.desc}: [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{pct:3d}% {time.monotonic() - self.start:6.1f}s {label}")
        self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def check_target(args, tp: int, pp: int, split=(None, None), vp: int = 1) -> None:
    """The target tp/pp must divide the model (named flags), before anything is written."""
    n = saved_value(args, "num_attention_heads")
    g = saved_value(args, "num_query_groups")
    layers = saved_value(args, "num_layers")
    ffn = saved_value(args, "ffn_hidden_size")
    problems = []
    if tp < 1:
        problems.append(f"--target-tensor-parallel-size {tp} must be >= 1")
    if pp < 1:
        problems.append(f"--target-pipeline-parallel-size {pp} must be >= 1")
    if vp < 1 or (vp > 1 and pp < 2):
        problems.append(f"--target-num-virtual-stages-per-pipeline-rank {vp}: the model chunks "
                        f"of the interleaved schedule need >= 1 and --target-pipeline-parallel-"
                        f"size > 1")
    if problems:
        raise ConversionError("; ".join(problems))
    if n % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the {n} attention heads")
    if g % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the {g} query groups "
                        f"(key/value heads)")
    if ffn % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the FFN hidden size {ffn}")
    split_error = split_problem(layers, pp, *split, flags=(
        "--target-decoder-first-pipeline-num-layers", "--target-decoder-last-pipeline-num-layers",
        "--target-pipeline-parallel-size"), vp_size=vp,
        vp_flag="--target-num-virtual-stages-per-pipeline-rank")
    if split_error:
        problems.append(split_error)
    if problems:
        raise ConversionError("; ".join(problems))


class MegatronSink:
    def __init__(self, source, tp: int, pp: int, dtype: torch.dtype, divisible_by: int,
                 tokenizer_model: Optional[Path], split=(None, None), vp: int = 1):
        """``split``: layers of the first and last stage (None: an even split); ``vp``: model
        chunks per stage (Megatron-LM's model0, model1, ... of the interleaved schedule)."""
        check_target(source.args, tp, pp, split, vp)
        self.tp, self.pp, self.dtype, self.split, self.vp = tp, pp, dtype, split, vp
        a = source.args
        vocab = saved_value(a, "vocab_size")
        if vocab is None:  # a Megatron-LM checkpoint without the true vocabulary size
            vocab = saved_value(a, "padded_vocab_size")
        self.padded = padded_vocab_size(vocab, divisible_by, tp)
        self.args = argparse.Namespace(**vars(a))
        self.args.__dict__.update(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            decoder_first_pipeline_num_layers=split[0], decoder_last_pipeline_num_layers=split[1],
            num_virtual_stages_per_pipeline_rank=vp if vp > 1 else None,
            virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
            num_layers_per_virtual_pipeline_stage=None,
            padded_vocab_size=self.padded, make_vocab_size_divisible_by=divisible_by,
            vocab_size=saved_value(a, "vocab_size"), **dtype_flags(dtype))
        if tokenizer_model is not None:
            self.args.tokenizer_model = str(tokenizer_model.resolve())
        self.iteration = source.iteration
        self.swiglu = saved_value(a, "swiglu")

    def _shard(self, name, tensor, tp_rank, vocab=False):
        return shard_tensor(name, tensor.to(self.dtype), swiglu=self.swiglu, tp_rank=tp_rank,
                            tp_size=self.tp, vocab_rows=self.padded if vocab else None)

    def write(self, source, out: Path) -> None:
        num_layers = source.num_layers
        progress = Progress(num_layers * self.tp, "convert (layers x TP ranks)")
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                chunks = [self._chunk(source, pp_rank, chunk, tp_rank, progress)
                          for chunk in range(self.vp)]
                payload = {"args": self.args, "checkpoint_version": fmt.CHECKPOINT_VERSION,
                           "iteration": 0 if self.iteration == fmt.RELEASE else self.iteration,
                           **dict(zip(fmt.model_keys(self.vp), chunks))}
                fmt.save_rank_file(fmt.rank_file(out, self.iteration, tp_rank, pp_rank, self.pp), payload)
                del chunks, payload
        fmt.write_tracker(out, self.iteration)  # last: the checkpoint is complete

    def _chunk(self, source, pp_rank: int, chunk: int, tp_rank: int, progress) -> dict:
        """The model of TP rank ``tp_rank``'s model chunk ``chunk`` of stage ``pp_rank``."""
        model = {}
        layers = stage_layers(source.num_layers, pp_rank, self.pp, *self.split, chunk, self.vp)
        if pp_rank == 0 and chunk == 0:
            name = "embedding.word_embeddings.weight"
            model[name] = self._shard(name, source.embedding(), tp_rank, vocab=True)
        for index in layers:
            for name, tensor in source.layer(index).items():
                local = f"decoder.layers.{index - layers.start}.{name}"
                model[local] = self._shard(name, tensor, tp_rank)
            progress.update(f"layer {index} tp {tp_rank}")
        if pp_rank == self.pp - 1 and chunk == self.vp - 1:
            for name, tensor in source.final_norm().items():
                model[name] = self._shard(name, tensor, tp_rank)
            output = source.output_layer()
            if output is None and self.pp > 1:
                # megatron-core keeps a copy of the tied embedding on the last stage.
                output = source.embedding()
            if output is not None:
                model["output_layer.weight"] = self._shard("output_layer.weight", output,
                                                           tp_rank, vocab=True)
        return model


class HfSink:
    def __init__(self, source, model_type_hf: Optional[str], dtype: torch.dtype,
                 tokenizer_model: Optional[Path], max_shard_bytes: int):
        self.args = source.args
        self.dtype = dtype
        self.config = hf.hf_config_from_args(source.args, model_type_hf, dtype)
        self.vocab = self.config["vocab_size"]
        self.untied = saved_value(source.args, "untie_embeddings_and_output_weights")
        self.tokenizer = tokenizer_export(tokenizer_model, source.args)
        self.max_shard_bytes = max_shard_bytes

    def write(self, source, out: Path) -> None:
        writer = HfWriter(out, self.max_shard_bytes)
        cast = lambda t: t.to(self.dtype)  # noqa: E731
        writer.add(hf.EMBEDDING[0], cast(source.embedding()[: self.vocab]))
        progress = Progress(source.num_layers, "convert (layers)")
        for index in range(source.num_layers):
            for name, tensor in hf.megatron_layer_to_hf(source.layer(index), index, self.args).items():
                writer.add(name, cast(tensor))
            progress.update(f"layer {index}")
        norm = source.final_norm()
        if set(norm) != {"decoder.final_layernorm.weight"}:
            raise ConversionError(f"the final norm has tensors {sorted(norm)}; RMSNorm has a weight only")
        writer.add(hf.FINAL_NORM[0], cast(norm["decoder.final_layernorm.weight"]))
        if self.untied:
            writer.add(hf.OUTPUT[0], cast(source.output_layer()[: self.vocab]))
        writer.finish()
        (out / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        self.tokenizer.write(out)
        print(self.tokenizer.note, file=sys.stderr)
