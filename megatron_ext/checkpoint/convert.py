"""convert_ckpt.py: Hugging Face <-> Megatron checkpoints, and Megatron tp/pp resharding.

    python convert_ckpt.py --model-type GPT --load-model-type hf --save-model-type mg \\
        --load-dir llama-2-7b-hf --save-dir ckpt/llama-2-7b-tp2pp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --model-type-hf llama2

Every conversion goes through a *source* that yields full (TP=1) Megatron tensors one layer at a
time, and a *sink* that writes one output file (a Megatron rank file or an HF safetensors shard)
at a time, so peak memory is about one full layer plus one output file. Sources open their
files lazily (``safe_open``; rank files memory-mapped). Everything is checked before anything
is written; the output goes into a temp directory next to ``--save-dir`` that is renamed to
``--save-dir`` at the end (the Megatron tracker written last inside it), so a failed conversion
leaves no ``--save-dir``.

Megatron output from HF is ``iter_0000001`` with the tracker at 1 (as Megatron-LM's and
MindSpeed-LLM's converters write it), no optimizer or RNG state: train from it with
``--load DIR --finetune`` (or ``--no-load-optim --no-load-rng``).
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint import hf
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.sharding import merge_tensor, shard_tensor, stage_layers

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_OUTPUT_ITERATION = 1

# Megatron-LM's Transformer Engine spec fuses the pre-norms into the following linear layer.
_TE_RENAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_ckpt.py", allow_abbrev=False,
        description="Convert Hugging Face Llama-family checkpoints to Megatron tp/pp checkpoints, "
                    "back, and between tp/pp layouts.")
    parser.add_argument("--model-type", default="GPT", choices=["GPT"],
                        help="model family (only GPT); accepted for MindSpeed-LLM compatibility")
    parser.add_argument("--load-model-type", required=True, choices=["hf", "mg"])
    parser.add_argument("--save-model-type", required=True, choices=["hf", "mg"])
    parser.add_argument("--load-dir", required=True, type=Path)
    parser.add_argument("--save-dir", required=True, type=Path)
    parser.add_argument("--target-tensor-parallel-size", type=int, default=None,
                        help="TP size of the Megatron output (default 1)")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                        help="PP size of the Megatron output (default 1)")
    parser.add_argument("--model-type-hf", choices=sorted(hf.MODEL_TYPES_HF), default=None,
                        help="HF architecture (default: from config.json, or recorded in the "
                             "Megatron checkpoint)")
    parser.add_argument("--params-dtype", choices=sorted(PARAMS_DTYPES), default=None,
                        help="dtype of the output weights (default: as in the input)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="pad the vocabulary to a multiple of this x TP (default 128 from "
                             "HF; the input checkpoint's value from Megatron)")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="tokenizer file or directory, copied into an HF output")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard of an HF output, e.g. 5GB, 500MB")
    return parser


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    if match.group(2) not in units:
        raise ConversionError(f"--max-shard-size {text!r}: unknown unit")
    return max(1, int(float(match.group(1)) * units[match.group(2)]))


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


# ---------------------------------------------------------------------------------------------
# Sources: full (TP=1) Megatron tensors, one layer at a time


class HfSource:
    def __init__(self, load_dir: Path, model_type_hf: Optional[str]):
        self.path = load_dir
        if not load_dir.is_dir():
            raise ConversionError(f"--load-dir {load_dir} does not exist")
        self.hf_config = hf.read_hf_config(load_dir, model_type_hf)
        self.flags = hf.megatron_flags_from_hf(self.hf_config, load_dir / "config.json")
        self.model_type_hf = model_type_hf or self.hf_config["model_type"]
        self.reader = hf.HfReader(load_dir)
        self._check_tensors()
        self.dtype = self._get(hf.EMBEDDING[0]).dtype
        self.iteration = HF_OUTPUT_ITERATION
        self.num_layers = self.flags["num_layers"]
        self.untied = self.flags["untie_embeddings_and_output_weights"]
        self.args = fmt.build_args(
            **self.flags, padded_vocab_size=self.flags["vocab_size"], make_vocab_size_divisible_by=1,
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, params_dtype=self.dtype,
            hf_model_type=self.model_type_hf, hf_config=self.hf_config)

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
        lacking = [k for k in ("num_layers", "hidden_size", "num_attention_heads")
                   if fmt.saved_value(a, k) is None]
        if lacking:
            raise ConversionError(f"{self._find_first(it_dir)}: its args lack {', '.join(lacking)}")
        self.tp = fmt.saved_value(a, "tensor_model_parallel_size") or 1
        self.pp = fmt.saved_value(a, "pipeline_model_parallel_size")
        self.num_layers = fmt.saved_value(a, "num_layers")
        self.swiglu = fmt.saved_value(a, "swiglu")
        self.untied = fmt.saved_value(a, "untie_embeddings_and_output_weights")
        if fmt.saved_value(a, "num_layers_per_virtual_pipeline_stage") or getattr(a, "virtual_pipeline_model_parallel_size", None):
            raise ConversionError(f"{it_dir}: virtual pipeline stages (interleaved schedule) are not supported")
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
                model = payload.get("model")
                if not isinstance(model, dict):
                    raise ConversionError(f"{path} has no 'model' state dict"
                                          + (" (interleaved 'model0'... are not supported)"
                                             if "model0" in payload else ""))
                if self._dtype is None:
                    self._dtype = next(v.dtype for v in model.values() if torch.is_tensor(v))
                del payload, model
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

    def _stage_models(self, pp_rank: int) -> List[dict]:
        """The memory-mapped models of stage ``pp_rank``'s TP ranks. Loaded per request and
        dropped after it: a mapping keeps every page read from it resident while it lives."""
        return [fmt.load_rank_file(fmt.rank_file(self.path, self.iteration, t, pp_rank, self.pp))["model"]
                for t in range(self.tp)]

    def _merged(self, models: List[dict], pp_rank: int, local_name: str) -> torch.Tensor:
        if local_name not in models[0]:
            path = fmt.rank_file(self.path, self.iteration, 0, pp_rank, self.pp)
            raise ConversionError(f"{path}: tensor {local_name} is missing")
        parts = [m[local_name] for m in models]
        full = merge_tensor(local_name, parts, swiglu=self.swiglu)
        return full.clone() if full is parts[0] else full  # never a view of the mapped file

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        per_stage = self.num_layers // self.pp
        pp_rank, local = divmod(index, per_stage)
        prefix = f"decoder.layers.{local}."
        models = self._stage_models(pp_rank)
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
        models = self._stage_models(last)
        names = [n for n in models[0] if n.startswith("decoder.final_layernorm.") and torch.is_tensor(models[0][n])]
        if not names:
            raise ConversionError(f"{fmt.rank_file(self.path, self.iteration, 0, last, self.pp)}: "
                                  f"decoder.final_layernorm is missing")
        return {n: self._merged(models, last, n) for n in names}

    def output_layer(self) -> Optional[torch.Tensor]:
        if not self.untied:
            return None
        return self._merged(self._stage_models(self.pp - 1), self.pp - 1, "output_layer.weight")

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Sinks


def check_target(args, tp: int, pp: int) -> None:
    """The target tp/pp must divide the model (named flags), before anything is written."""
    n = fmt.saved_value(args, "num_attention_heads")
    g = fmt.saved_value(args, "num_query_groups")
    layers = fmt.saved_value(args, "num_layers")
    ffn = fmt.saved_value(args, "ffn_hidden_size")
    problems = []
    if tp < 1:
        problems.append(f"--target-tensor-parallel-size {tp} must be >= 1")
    if pp < 1:
        problems.append(f"--target-pipeline-parallel-size {pp} must be >= 1")
    if problems:
        raise ConversionError("; ".join(problems))
    if n % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the {n} attention heads")
    if g % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the {g} query groups "
                        f"(key/value heads)")
    if ffn % tp:
        problems.append(f"--target-tensor-parallel-size {tp} does not divide the FFN hidden size {ffn}")
    if layers % pp:
        problems.append(f"--target-pipeline-parallel-size {pp} does not divide the {layers} layers")
    if problems:
        raise ConversionError("; ".join(problems))


class MegatronSink:
    def __init__(self, source, tp: int, pp: int, dtype: torch.dtype, divisible_by: int,
                 tokenizer_model: Optional[Path]):
        check_target(source.args, tp, pp)
        self.tp, self.pp, self.dtype = tp, pp, dtype
        a = source.args
        vocab = fmt.saved_value(a, "vocab_size")
        if vocab is None:  # a Megatron-LM checkpoint without the true vocabulary size
            vocab = fmt.saved_value(a, "padded_vocab_size")
        self.padded = fmt.padded_vocab_size(vocab, divisible_by, tp)
        self.args = argparse.Namespace(**vars(a))
        self.args.__dict__.update(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            padded_vocab_size=self.padded, make_vocab_size_divisible_by=divisible_by,
            vocab_size=fmt.saved_value(a, "vocab_size"), **fmt.dtype_flags(dtype))
        if tokenizer_model is not None:
            self.args.tokenizer_model = str(tokenizer_model)
        self.iteration = source.iteration
        self.swiglu = fmt.saved_value(a, "swiglu")

    def _shard(self, name, tensor, tp_rank, vocab=False):
        return shard_tensor(name, tensor.to(self.dtype), swiglu=self.swiglu, tp_rank=tp_rank,
                            tp_size=self.tp, vocab_rows=self.padded if vocab else None)

    def write(self, source, out: Path) -> None:
        num_layers = source.num_layers
        progress = Progress(num_layers * self.tp, "convert (layers x TP ranks)")
        for pp_rank in range(self.pp):
            layers = stage_layers(num_layers, pp_rank, self.pp)
            for tp_rank in range(self.tp):
                model = {}
                if pp_rank == 0:
                    name = "embedding.word_embeddings.weight"
                    model[name] = self._shard(name, source.embedding(), tp_rank, vocab=True)
                for index in layers:
                    for name, tensor in source.layer(index).items():
                        model[f"decoder.layers.{index - layers.start}.{name}"] = self._shard(name, tensor, tp_rank)
                    progress.update(f"layer {index} tp {tp_rank}")
                if pp_rank == self.pp - 1:
                    for name, tensor in source.final_norm().items():
                        model[name] = self._shard(name, tensor, tp_rank)
                    output = source.output_layer()
                    if output is None and self.pp > 1:
                        # megatron-core keeps a copy of the tied embedding on the last stage.
                        output = source.embedding()
                    if output is not None:
                        model["output_layer.weight"] = self._shard("output_layer.weight", output,
                                                                   tp_rank, vocab=True)
                payload = {"args": self.args, "checkpoint_version": fmt.CHECKPOINT_VERSION,
                           "iteration": 0 if self.iteration == fmt.RELEASE else self.iteration,
                           "model": model}
                fmt.save_rank_file(fmt.rank_file(out, self.iteration, tp_rank, pp_rank, self.pp), payload)
                del model, payload
        fmt.write_tracker(out, self.iteration)  # last: the checkpoint is complete


class HfSink:
    def __init__(self, source, model_type_hf: Optional[str], dtype: torch.dtype,
                 tokenizer_model: Optional[Path], max_shard_bytes: int):
        self.args = source.args
        self.dtype = dtype
        self.config = hf.hf_config_from_args(source.args, model_type_hf, dtype)
        self.vocab = self.config["vocab_size"]
        self.untied = fmt.saved_value(source.args, "untie_embeddings_and_output_weights")
        self.tokenizer = hf.tokenizer_files(tokenizer_model) if tokenizer_model is not None else []
        self.max_shard_bytes = max_shard_bytes

    def write(self, source, out: Path) -> None:
        import json

        writer = hf.HfWriter(out, self.max_shard_bytes)
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
        for file in self.tokenizer:
            shutil.copy2(file, out / file.name)


# ---------------------------------------------------------------------------------------------
# Output staging and the CLI


def check_save_dir(save_dir: Path, load_dir: Path) -> None:
    if save_dir.resolve() == load_dir.resolve():
        raise ConversionError(f"--save-dir {save_dir} is --load-dir; write to a new directory")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise ConversionError(f"--save-dir {save_dir} exists and is not empty; choose a new "
                              f"directory (nothing was written)")


@contextmanager
def staged_output(save_dir: Path):
    """A temp directory next to ``save_dir``, renamed to ``save_dir`` on success, removed on failure."""
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.converting-", dir=save_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~fmt._umask())  # mkdtemp makes 0700
        yield tmp
        if save_dir.exists():
            save_dir.rmdir()  # empty (checked before converting)
        os.replace(tmp, save_dir)
        fmt._fsync_dir(save_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(argv=None) -> Path:
    """Run a conversion (raises ``ConversionError``/``CheckpointError`` on bad input)."""
    opts = build_parser().parse_args(argv)
    if opts.load_model_type == "hf" and opts.save_model_type == "hf":
        raise ConversionError("--load-model-type hf --save-model-type hf: nothing to convert")
    if opts.save_model_type == "hf":
        for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
            if getattr(opts, flag) not in (None, 1):
                raise ConversionError(f"--{flag.replace('_', '-')} applies to --save-model-type mg only")
    if opts.make_vocab_size_divisible_by is not None and opts.make_vocab_size_divisible_by < 1:
        raise ConversionError("--make-vocab-size-divisible-by must be >= 1")
    max_shard_bytes = parse_size(opts.max_shard_size)
    if opts.tokenizer_model is not None and not opts.tokenizer_model.exists():
        raise ConversionError(f"--tokenizer-model {opts.tokenizer_model} does not exist")
    check_save_dir(opts.save_dir, opts.load_dir)

    source = (HfSource(opts.load_dir, opts.model_type_hf) if opts.load_model_type == "hf"
              else MegatronSource(opts.load_dir))
    try:
        dtype = PARAMS_DTYPES[opts.params_dtype] if opts.params_dtype else source.dtype
        if opts.save_model_type == "mg":
            divisible_by = opts.make_vocab_size_divisible_by or (
                128 if opts.load_model_type == "hf"
                else fmt.saved_value(source.args, "make_vocab_size_divisible_by") or 128)
            tp, pp = opts.target_tensor_parallel_size, opts.target_pipeline_parallel_size
            sink = MegatronSink(source, 1 if tp is None else tp, 1 if pp is None else pp, dtype,
                                divisible_by, opts.tokenizer_model)
        else:
            sink = HfSink(source, opts.model_type_hf, dtype, opts.tokenizer_model, max_shard_bytes)
        with staged_output(opts.save_dir) as tmp:
            sink.write(source, tmp)
    finally:
        source.close()
    return opts.save_dir


def _release_freed_memory() -> None:
    """Make glibc serve every tensor-sized allocation (>= 1 MiB) with its own mmap, returned to
    the OS when freed. By default glibc raises that threshold after the first large free and then
    keeps freed tensor memory in its heap, fragmented: converting one layer after another then
    grows the process by more than the output file being built (measured: about 1.6x)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; fixing it disables the dynamic threshold
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    _release_freed_memory()
    try:
        out = convert(argv)
    except fmt.CheckpointError as exc:
        print(f"convert_ckpt.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"converted checkpoint written to {out}", file=sys.stderr)
    return 0
