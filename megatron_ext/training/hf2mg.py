"""``--enable-hf2mg-convert`` (MindSpeed-LLM's): ``--load`` names a Hugging Face model, converted
at start-up, once, into ``{load}/megatron_cache_tp{TP}pp{PP}ep1`` (MindSpeed-LLM's place),
which then is ``--load``; a later run with the same layout reuses it.

The conversion is convert_ckpt.py's (``--load-model-type hf --save-model-type mg``, written to
a staged directory and renamed, so a cache is whole or absent). Rank 0 converts (with
``--no-shared-storage``: local rank 0 of each node); every rank then learns every converter's
outcome from one ``all_gather_object``, so a failed conversion stops all ranks with its error
and none waits for a checkpoint that will not come. That wait runs in a gloo group of its own
with a long timeout: converting a 70B model takes longer than --distributed-timeout-minutes,
and a converter that dies takes the launcher's other workers down with it.
"""

import logging
import os
from datetime import timedelta

import torch

from megatron_ext.checkpoint import convert
from megatron_ext.checkpoint.format import CheckpointError, read_tracker
from megatron_ext.config import Config, ConfigError
from megatron_ext.config.mindspeed import HF_MODEL_TYPES

logger = logging.getLogger(__name__)

CONVERSION_TIMEOUT = timedelta(hours=6)


def cache_dir(config: Config) -> str:
    p = config.parallel
    return os.path.join(config.checkpoint.load, f"megatron_cache_tp{p.tensor_model_parallel_size}"
                        f"pp{p.pipeline_model_parallel_size}ep1")


def _convert(config: Config, target: str) -> None:
    if read_tracker(target) is not None:
        logger.info(f"--enable-hf2mg-convert: reusing the converted {target}")
        return
    p, ms = config.parallel, config.mindspeed
    argv = ["--load-model-type", "hf", "--save-model-type", "mg",
            "--load-dir", config.checkpoint.load, "--save-dir", target,
            "--target-tensor-parallel-size", str(p.tensor_model_parallel_size),
            "--target-pipeline-parallel-size", str(p.pipeline_model_parallel_size),
            "--make-vocab-size-divisible-by", str(config.model.make_vocab_size_divisible_by)]
    if ms.model_type_hf is not None:
        argv += ["--model-type-hf", HF_MODEL_TYPES[ms.model_type_hf]]
    convert.convert(argv)
    logger.warning(f"--enable-hf2mg-convert: converted {config.checkpoint.load} into {target}")


def convert_hf_load(config: Config) -> None:
    """Convert ``--load`` (collective: every rank calls it) and point ``--load`` at the result."""
    target = cache_dir(config)
    converts = (int(os.environ.get("LOCAL_RANK", "0")) == 0 if config.mindspeed.no_shared_storage
                else torch.distributed.get_rank() == 0)
    error = None
    if converts:
        try:
            _convert(config, target)
        except CheckpointError as exc:
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
