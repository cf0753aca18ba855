"""convert_ckpt.py: Hugging Face <-> Megatron checkpoints, and Megatron tp/pp resharding.

    python convert_ckpt.py --model-type GPT --load-model-type hf --save-model-type mg \\
        --load-dir llama-2-7b-hf --save-dir ckpt/llama-2-7b-tp2pp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --model-type-hf llama2

Every conversion goes through a *source* (``sources.py``) that yields full (TP=1) Megatron
tensors one layer at a time, and a *sink* (``sinks.py``) that writes one output file (a Megatron
rank file or an HF safetensors shard) at a time, so peak memory is about one full layer plus one
output file. Sources open their files lazily (``safe_open``; rank files memory-mapped).
Everything is checked before anything is written; the output goes into a temp directory next to ``--save-dir`` that is renamed to
``--save-dir`` at the end (the Megatron tracker written last inside it), so a failed conversion
leaves no ``--save-dir``.

With ``--lora-load`` the adapters of a LoRA run are merged into the base first, or exported
alone for PEFT with ``--save-lora-to-hf`` (checkpoint/lora.py).

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
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint import hf, lora
from megatron_ext.checkpoint.args import saved_value
from megatron_ext.checkpoint.dist_format import DistSink, DistSource, is_dist_checkpoint
from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.sinks import HfSink, MegatronSink
from megatron_ext.checkpoint.sources import HfSource, MegatronSource

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    parser.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None,
                        help="layers on the first stage of the Megatron output (default: an "
                             "even split), as training's --decoder-first-pipeline-num-layers")
    parser.add_argument("--target-decoder-last-pipeline-num-layers", type=int, default=None,
                        help="layers on the last stage of the Megatron output (default: an "
                             "even split), as training's --decoder-last-pipeline-num-layers")
    parser.add_argument("--target-num-virtual-stages-per-pipeline-rank", type=int, default=None,
                        help="model chunks per stage of the Megatron output (default 1), as "
                             "training's --num-virtual-stages-per-pipeline-rank (the "
                             "interleaved schedule: model0, model1, ... per rank file)")
    parser.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                        help="format of a Megatron output: torch (per-rank model_optim_rng.pt, "
                             "the default) or torch_dist (megatron-core's distributed format, no "
                             "TP/PP layout); a Megatron input is read in either")
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
    lora.add_arguments(parser)
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
        fmt.fsync_dir(save_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def megatron_source(load_dir: Path, adapters: bool = False):
    """The source for a Megatron checkpoint in either format (torch_dist or per-rank); with
    ``adapters``, of a LoRA checkpoint (layers' adapters only)."""
    iteration = fmt.read_tracker(load_dir) if load_dir.is_dir() else None
    if iteration is not None and is_dist_checkpoint(fmt.iteration_dir(load_dir, iteration)):
        return DistSource(load_dir, iteration, fmt.iteration_dir(load_dir, iteration), adapters)
    return MegatronSource(load_dir)


# The layout of a Megatron output in the torch format (neither HF nor torch_dist has one).
_TARGET_LAYOUT = ("target_tensor_parallel_size", "target_pipeline_parallel_size",
                  "target_decoder_first_pipeline_num_layers",
                  "target_decoder_last_pipeline_num_layers",
                  "target_num_virtual_stages_per_pipeline_rank")


def convert(argv=None) -> Path:
    """Run a conversion (raises ``ConversionError``/``CheckpointError`` on bad input)."""
    opts = build_parser().parse_args(argv)
    if opts.load_model_type == "hf" and opts.save_model_type == "hf":
        raise ConversionError("--load-model-type hf --save-model-type hf: nothing to convert")
    if opts.save_model_type == "hf":
        for flag in _TARGET_LAYOUT:
            if getattr(opts, flag) not in (None, 1):
                raise ConversionError(f"--{flag.replace('_', '-')} applies to --save-model-type mg only")
    if opts.make_vocab_size_divisible_by is not None and opts.make_vocab_size_divisible_by < 1:
        raise ConversionError("--make-vocab-size-divisible-by must be >= 1")
    max_shard_bytes = parse_size(opts.max_shard_size)
    if opts.tokenizer_model is not None and not opts.tokenizer_model.exists():
        raise ConversionError(f"--tokenizer-model {opts.tokenizer_model} does not exist")
    check_save_dir(opts.save_dir, opts.load_dir)
    if opts.lora_load is not None and opts.load_model_type != "mg":
        raise ConversionError("--lora-load merges Megatron adapters into a Megatron base: "
                              "use --load-model-type mg")
    if opts.save_lora_to_hf and (opts.lora_load is None or opts.save_model_type != "hf"):
        raise ConversionError("--save-lora-to-hf needs --lora-load and --save-model-type hf")

    if opts.ckpt_format == "torch_dist" and opts.save_model_type == "mg":
        for flag in _TARGET_LAYOUT:
            if getattr(opts, flag) not in (None, 1):
                raise ConversionError(f"--{flag.replace('_', '-')}: a torch_dist checkpoint has no "
                                      f"TP/PP layout (it loads at any); leave it out")
    meta = lora.read_metadata(opts) if opts.lora_load is not None else None
    source = (HfSource(opts.load_dir, opts.model_type_hf) if opts.load_model_type == "hf"
              else megatron_source(opts.load_dir))
    if meta is not None:
        source = lora.MergedSource(source, megatron_source(opts.lora_load, adapters=True), meta)
    try:
        dtype = PARAMS_DTYPES[opts.params_dtype] if opts.params_dtype else source.dtype
        if meta is not None:
            lora.check(opts, meta, source.base.args, source.adapters.args)
        if opts.save_lora_to_hf:
            sink = lora.PeftSink(meta, dtype, str(opts.load_dir))
        elif opts.save_model_type == "mg":
            divisible_by = opts.make_vocab_size_divisible_by or (
                128 if opts.load_model_type == "hf"
                else saved_value(source.args, "make_vocab_size_divisible_by") or 128)
            tp, pp = opts.target_tensor_parallel_size, opts.target_pipeline_parallel_size
            sink = (DistSink(source, dtype, divisible_by, opts.tokenizer_model)
                    if opts.ckpt_format == "torch_dist"
                    else MegatronSink(source, 1 if tp is None else tp, 1 if pp is None else pp,
                                      dtype, divisible_by, opts.tokenizer_model,
                                      (opts.target_decoder_first_pipeline_num_layers,
                                       opts.target_decoder_last_pipeline_num_layers),
                                      opts.target_num_virtual_stages_per_pipeline_rank or 1))
        else:
            # HF Llama/Qwen2 have neither: their norms scale by the weight, RoPE rotates all.
            if saved_value(source.args, "apply_layernorm_1p") or \
                    saved_value(source.args, "rotary_percent") != 1.0:
                raise ConversionError(
                    f"{opts.load_dir} was trained with --apply-layernorm-1p or --rotary-percent "
                    "< 1, which Hugging Face Llama/Qwen2 models cannot express; convert a model "
                    "trained without them")
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
