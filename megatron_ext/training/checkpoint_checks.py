"""``--load`` and ``--lora-load`` checked before any process group exists.

What the files alone tell fails every rank alike, with the file and the way out, instead of a
traceback from one rank once the process groups are up, or a fresh start that looks like a
resume:

- a Hugging Face model directory is not a Megatron checkpoint: the convert_ckpt.py command;
  nor is a PEFT adapter directory;
- iteration directories without a tracker are named, then training starts from scratch as in
  Megatron-LM (the first save of a killed run leaves them so);
- the tracker's iteration directory exists and is a checkpoint of either format;
- torch: each rank file's zip directory is readable (a truncated file has none), and each has
  its distrib_optim.pt where the args say the distributed optimizer saved it;
- torch_dist: megatron-core's ``metadata.json`` is there, and each ``.distcp`` file is as long
  as the ``.metadata`` index says.

``--pretrained-checkpoint`` gets the same checks where it is the checkpoint loaded (``--load``
holds none yet), and then takes ``--load``'s place with ``--finetune``, as in Megatron-LM.
(``--save`` is checked with the flags: config/validate.py.)
"""

import logging
import os
import zipfile
from pathlib import Path

from megatron_ext.checkpoint import format as ckpt
from megatron_ext.checkpoint.args import saved_value
from megatron_ext.config import Config
from megatron_ext.training.logs import log_once

logger = logging.getLogger("megatron_ext")

HF_CONFIG, HF_WEIGHTS = "config.json", ("*.safetensors", "pytorch_model*.bin")
PEFT_CONFIG = "adapter_config.json"  # a PEFT adapter directory (convert_ckpt.py --save-lora-to-hf)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6; older files are read without the check


def _iterations(root: Path):
    return sorted(p.name for p in root.glob("iter_*") if p.name[len("iter_"):].isdigit())


def _check_zip(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return
    try:
        zipfile.ZipFile(path).close()  # reads the central directory, written last
    except (zipfile.BadZipFile, OSError) as exc:
        raise ckpt.CheckpointError(f"checkpoint file {path} is truncated or unreadable ({exc})")


def _check_dist_files(directory: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    if not (directory / "metadata.json").is_file():  # else it would be read as torch format
        raise ckpt.CheckpointError(
            f"checkpoint {directory} has a .metadata but no metadata.json, which megatron-core "
            f"writes last: the save did not finish, or it was copied in part; copy it again, or "
            f"point {ckpt.tracker_file(directory.parent)} at a complete iteration")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # truncated pickle, I/O error
        raise ckpt.CheckpointError(f"checkpoint {directory}/.metadata is truncated or "
                                   f"unreadable ({type(exc).__name__}: {exc})") from None
    needed = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        found = path.stat().st_size if path.is_file() else None
        if found is None or found < size:
            state = "is missing" if found is None else f"has {found} bytes"
            raise ckpt.CheckpointError(f"checkpoint file {path} {state}, its .metadata needs "
                                       f"{size}: the checkpoint is damaged (copied in part?)")
    if (directory / "common.pt").is_file():  # megatron-core 0.19 keeps it in the .distcp files
        _check_zip(directory / "common.pt")


def check_load_dir(root, flag: str, instead: str = "starting from scratch") -> None:
    """The checkpoint in ``root`` (given as ``flag``) as far as its files tell; ``instead``:
    what the run does when it holds none."""
    root = Path(root)
    iteration = ckpt.read_tracker(root)
    if iteration is None:
        if (root / HF_CONFIG).is_file() and any(next(root.glob(p), None) for p in HF_WEIGHTS):
            raise ckpt.CheckpointError(
                f"{flag} {root} is a Hugging Face model, not a Megatron checkpoint; convert it "
                f"first: python convert_ckpt.py --model-type GPT --load-model-type hf "
                f"--save-model-type mg --ckpt-format torch_dist --load-dir {root} --save-dir "
                f"DIR, then train with {flag} DIR --finetune (or convert at start-up: "
                f"--enable-hf2mg-convert, as MindSpeed-LLM)")
        if (root / PEFT_CONFIG).is_file():
            raise ckpt.CheckpointError(
                f"{flag} {root} is a PEFT adapter directory, which training does not read; give "
                f"{flag} the Megatron checkpoint of the LoRA run (its --save; convert_ckpt.py "
                f"--save-lora-to-hf exports PEFT directories from it)")
        found = _iterations(root) if root.is_dir() else []
        if found:
            log_once(logger, logging.WARNING,
                     f"{root} holds {', '.join(found)} but no {ckpt.TRACKER_FILENAME} (a first "
                     f"save that did not finish?): {instead}. To resume from one, "
                     f"write its number into {ckpt.tracker_file(root)}")
        return
    directory = ckpt.iteration_dir(root, iteration)
    if not directory.is_dir():
        others = [name for name in _iterations(root) if name != directory.name]
        raise ckpt.CheckpointError(
            f"{ckpt.tracker_file(root)} names iteration {iteration}, but {directory} does not "
            f"exist" + (f"; the directory holds {', '.join(others)}: write the number of the "
                        f"one to resume from into the tracker" if others else ""))
    if (directory / ".metadata").is_file():
        _check_dist_files(directory)
        return
    _check_torch_files(directory)


def _check_torch_files(directory: Path) -> None:
    rank_files = sorted(directory.glob(f"mp_rank_*/{ckpt.RANK_FILENAME}"))
    if not rank_files:
        raise ckpt.CheckpointError(f"checkpoint directory {directory} holds neither a "
                                   f"torch_dist checkpoint (.metadata) nor mp_rank_*/"
                                   f"{ckpt.RANK_FILENAME} files: it is incomplete or not a "
                                   f"Megatron checkpoint")
    for path in sorted(directory.glob("mp_rank_*/*.pt")):
        _check_zip(path)
    # The layout it was saved with, from the first rank file (memory-mapped: its tensors are not
    # read): a rank file missing would otherwise read as a checkpoint of another TP/PP.
    args = ckpt.load_rank_file(rank_files[0]).get("args")
    if args is None:
        return  # said when it is loaded (check_compatible)
    tp = saved_value(args, "tensor_model_parallel_size") or 1
    pp = saved_value(args, "pipeline_model_parallel_size")
    expected = (directory / ckpt.rank_dir_name(t, p, pp) / ckpt.RANK_FILENAME
                for t in range(tp) for p in range(pp))
    missing = [path for path in expected if not path.is_file()]
    if not missing and getattr(args, "use_distributed_optimizer", False):
        # Megatron-LM's and ours write one beside each rank file (a save killed before this
        # rename-published layout, or a partial copy, left some out).
        missing = [path.parent / ckpt.DISTRIB_OPTIM_FILENAME for path in rank_files
                   if not (path.parent / ckpt.DISTRIB_OPTIM_FILENAME).is_file()]
        if missing:
            raise ckpt.CheckpointError(
                f"checkpoint {directory} was saved with --use-distributed-optimizer but "
                f"{missing[0]} is missing: it is incomplete (a save killed mid-write, or copied "
                f"in part); point {ckpt.tracker_file(directory.parent)} at a complete "
                f"iteration, or pass --no-load-optim to load its weights alone")
    if missing:
        raise ckpt.CheckpointError(
            f"checkpoint {directory} was saved at TP={tp} PP={pp} but {len(missing)} of its "
            f"{tp * pp} rank files are missing, e.g. {missing[0]}: it is incomplete (copied in "
            f"part?); copy it again")


def check_checkpoints(config: Config) -> None:
    c, lora = config.checkpoint, config.lora
    # --enable-hf2mg-convert: --load is the Hugging Face model to convert (training/hf2mg.py).
    load = None if config.mindspeed.enable_hf2mg_convert else c.load
    scratch = "starting from scratch"
    instead = (f"fine-tuning from --pretrained-checkpoint {c.pretrained_checkpoint}"
               if c.pretrained_checkpoint else scratch)
    for root, flag, without in ((load, "--load", instead),
                                (lora.lora_load, "--lora-load", scratch)):
        if root:
            check_load_dir(root, flag, without)
    _take_pretrained(config)
    _check_fresh_start_over_save(config)


def _take_pretrained(config: Config) -> None:
    """Megatron-LM's --pretrained-checkpoint (load_checkpoint, core_v0.16 to 0.19): while
    --load holds no checkpoint, the checkpoint loaded is --pretrained-checkpoint's, with
    --finetune; a --load with one (this run's earlier save) is resumed as usual."""
    c = config.checkpoint
    pretrained = c.pretrained_checkpoint
    if not pretrained or (c.load and ckpt.read_tracker(Path(c.load)) is not None):
        return
    check_load_dir(pretrained, "--pretrained-checkpoint")
    if ckpt.read_tracker(Path(pretrained)) is None:
        raise ckpt.CheckpointError(
            f"--pretrained-checkpoint {pretrained} holds no checkpoint (no "
            f"{ckpt.TRACKER_FILENAME}), and " + (f"--load {c.load} neither" if c.load else
                                                 "no --load is given") +
            ": give the directory of the checkpoint to fine-tune from")
    log_once(logger, logging.INFO,
             f"{'--load ' + c.load if c.load else 'no --load'} holds no checkpoint: fine-tuning "
             f"from --pretrained-checkpoint {pretrained} (its weights only, as --finetune)")
    c.load, c.finetune = pretrained, True


def _check_fresh_start_over_save(config: Config) -> None:
    """A fine-tuning command rerun after a stop does not resume: a LoRA run resumes from
    --lora-load only (--load is its base), --finetune always starts at iteration 0 from --load.
    Its saves would then replace the stopped run's as the latest in --save: said, with the way
    to resume."""
    c, lora = config.checkpoint, config.lora
    if not c.save:
        return
    if lora.enabled:
        fresh, way = not lora.lora_load, f"add --lora-load {c.save}"
        what = "this LoRA run has no --lora-load: it trains new adapters from the base"
    else:
        fresh = c.finetune and c.load and os.path.realpath(c.load) != os.path.realpath(c.save)
        way = f"--load {c.save} without --finetune"
        what = "--finetune starts from --load's weights at iteration 0"
    saved = ckpt.read_tracker(c.save) if fresh else None
    if saved is not None:
        log_once(logger, logging.WARNING,
                 f"--save {c.save} holds a checkpoint (iteration {saved}) and {what}, and its "
                 f"saves become the latest there. To resume that checkpoint: {way}")
