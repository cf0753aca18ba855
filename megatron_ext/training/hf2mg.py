"""``--enable-hf2mg-convert`` (MindSpeed-LLM's): ``--load`` names a Hugging Face model, converted
at start-up, once, into ``{load}/megatron_cache_tp{TP}pp{PP}ep1`` (MindSpeed-LLM's place),
which then is ``--load``; a later run with the same layout reuses it, if it was converted from
the same files: the cache records its source (config.json's digest, the weight files' names,
sizes and mtimes, the conversion's options) in ``hf_source.json``, and another model copied into
``--load`` (or other options) is converted again, said in the log, never reused silently.

The conversion is convert_ckpt.py's (``--load-model-type hf --save-model-type mg``, written to
a staged directory and renamed, so a cache is whole or absent; a stale one is renamed away
first). Rank 0 converts (with ``--no-shared-storage``: local rank 0 of each node); every rank
then learns every converter's outcome from one ``all_gather_object``, so a failed conversion
stops all ranks with its error and none waits for a checkpoint that will not come. That wait
runs in a gloo group of its own with a long timeout: converting a 70B model takes longer than
--distributed-timeout-minutes, and a converter that dies takes the launcher's other workers
down with it.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

from megatron_ext.checkpoint import convert
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import Config, ConfigError
from megatron_ext.config.mindspeed import HF_MODEL_TYPES
from megatron_ext.training.checkpoint_checks import HF_CONFIG, HF_WEIGHTS

logger = logging.getLogger(__name__)

CONVERSION_TIMEOUT = timedelta(hours=6)
SOURCE_RECORD = "hf_source.json"  # in the cache: what it was converted from


def cache_dir(config: Config) -> str:
    p = config.parallel
    return os.path.join(config.checkpoint.load, f"megatron_cache_tp{p.tensor_model_parallel_size}"
                        f"pp{p.pipeline_model_parallel_size}ep1")


def _options(config: Config) -> list:
    p, ms = config.parallel, config.mindspeed
    argv = ["--load-model-type", "hf", "--save-model-type", "mg",
            "--target-tensor-parallel-size", str(p.tensor_model_parallel_size),
            "--target-pipeline-parallel-size", str(p.pipeline_model_parallel_size),
            "--make-vocab-size-divisible-by", str(config.model.make_vocab_size_divisible_by)]
    for flag, value in (("--target-decoder-first-pipeline-num-layers",
                         p.decoder_first_pipeline_num_layers),
                        ("--target-decoder-last-pipeline-num-layers",
                         p.decoder_last_pipeline_num_layers),
                        ("--target-num-virtual-stages-per-pipeline-rank",
                         p.num_virtual_stages_per_pipeline_rank)):
        if value is not None:  # the run's uneven split, its chunks (the cache's record holds it)
            argv += [flag, str(value)]
    if ms.model_type_hf is not None:
        argv += ["--model-type-hf", HF_MODEL_TYPES[ms.model_type_hf]]
    return argv


def source_record(load: str, options: list) -> dict:
    """What a conversion of the HF model in ``load`` depends on: config.json's content, the
    weight files (a copy of another model changes their sizes or mtimes) and the options."""
    root = Path(load)
    weights = sorted({path for pattern in HF_WEIGHTS for path in root.glob(pattern)})
    return {"config.json": hashlib.sha256((root / HF_CONFIG).read_bytes()).hexdigest(),
            "weights": [[path.name, path.stat().st_size, path.stat().st_mtime_ns]
                        for path in weights],
            "options": options}


def _staleness(target: str, record: dict):
    """Why the cache in ``target`` is not a conversion of ``record``'s source; None if it is."""
    path = Path(target) / SOURCE_RECORD
    if not path.is_file():
        return f"it has no {SOURCE_RECORD} (made before caches recorded their source)"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"its {path} is unreadable ({exc})"
    what = {"config.json": "config.json changed", "weights": "the weight files changed "
            "(names, sizes or mtimes)", "options": "the conversion options changed"}
    changed = [why for key, why in what.items() if saved.get(key) != record[key]]
    return "; ".join(changed) or None


def _convert(config: Config, target: str) -> None:
    load = config.checkpoint.load
    options = _options(config)
    record = source_record(load, options)
    if ckpt.read_tracker(target) is not None:
        stale = _staleness(target, record)
        if stale is None:
            logger.info(f"--enable-hf2mg-convert: reusing the converted {target}")
            return
        logger.warning(f"--enable-hf2mg-convert: {target} is not a conversion of the model now "
                       f"in {load}: {stale}; converting it again")
    # Converted and recorded in a staging directory beside the cache, then renamed into place:
    # a cache is whole, with its record, or absent (a stale one is renamed away first).
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.converting-", dir=load))
    try:
        fresh = staging / "cache"
        convert.convert(options + ["--load-dir", load, "--save-dir", str(fresh)])
        (fresh / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if os.path.exists(target):
            os.replace(target, staging / "stale")
        os.replace(fresh, target)
        ckpt.fsync_dir(Path(load))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.warning(f"--enable-hf2mg-convert: converted {load} into {target}")


def convert_hf_load(config: Config) -> None:
    """Convert ``--load`` (collective: every rank calls it) and point ``--load`` at the result."""
    target = cache_dir(config)
    converts = (int(os.environ.get("LOCAL_RANK", "0")) == 0 if config.mindspeed.no_shared_storage
                else torch.distributed.get_rank() == 0)
    error = None
    if converts:
        try:
            _convert(config, target)
        except ckpt.CheckpointError as exc:
            error = f"--enable-hf2mg-convert: converting {config.checkpoint.load} failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - told to every rank, which all stop with it
            error = (f"--enable-hf2mg-convert: converting {config.checkpoint.load} failed: "
                     f"{type(exc).__name__}: {exc}")
    outcomes = [None] * torch.distributed.get_world_size()
    group = torch.distributed.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
    try:
        torch.distributed.all_gather_object(outcomes, error, group=group)
    finally:
        torch.distributed.destroy_process_group(group)
    failed = [e for e in outcomes if e]
    if failed:
        raise ConfigError(failed[0])
    config.checkpoint.load = target
