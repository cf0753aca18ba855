"""Typed configuration built from Megatron-LM flag names, validated in one place.

Each component (model, training, parallel, data, logging, checkpoint) is a dataclass whose
fields declare their flags (``flags.flag``: help, argparse details, Megatron-LM status);
``parse_args`` builds them from argparse and ``validate`` checks them together (and against the
world size) so that a bad flag is reported on every rank, naming the flag, before any process
group exists. ``python -m megatron_ext.config.compat`` writes docs/megatron-compat.md from the
same data.
"""

import argparse
import logging
import os
from dataclasses import fields
from typing import Callable, List, Optional

from megatron_ext.config.checkpoint import CheckpointConfig
from megatron_ext.config.components import (COMPONENTS, Config, ConfigError,
                                            default_ffn_hidden_size)
from megatron_ext.config.data import DataConfig
from megatron_ext.config.flags import build_parser_from, describe_unknown
from megatron_ext.config.logs import LoggingConfig
from megatron_ext.config.model import ModelConfig
from megatron_ext.config.parallel import ParallelConfig
from megatron_ext.config.training import TrainingConfig
from megatron_ext.config.validate import validate

__all__ = ["Config", "ConfigError", "UnknownFlagsError", "build_parser", "parse_args",
           "validate", "default_ffn_hidden_size", "config_from_namespace", "CheckpointConfig",
           "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig", "TrainingConfig"]

logger = logging.getLogger("megatron_ext")


class UnknownFlagsError(ConfigError):
    """Flags no component declares; reported once (rank 0), with the closest known flags."""


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    return build_parser_from(COMPONENTS.values(), extra_args_provider)


def config_from_namespace(args: argparse.Namespace) -> Config:
    given = set()

    def make(cls):
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name)
            if value is not None:  # None: not given, the dataclass default applies
                values[f.name] = value
                given.add(f.name)
        return cls(**values)

    parts = {name: make(cls) for name, cls in COMPONENTS.items()}
    return Config(**parts, given=frozenset(given))


def parse_args(argv=None, world_size: Optional[int] = None,
               prepare: Optional[Callable[[argparse.Namespace], List[str]]] = None) -> Config:
    """Parse Megatron-style flags into a validated ``Config`` (world size from torchrun's env);
    rank 0 logs what validate noted about accepted flags that are not honoured as such.
    ``prepare`` may set flags on the parsed ones first (``--use-checkpoint-args``: training's
    ``checkpoint_args.take_checkpoint_args``) and returns its notices."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UnknownFlagsError(describe_unknown(parser, unknown))
    notices = prepare(args) if prepare else []
    config = config_from_namespace(args)
    config.notices.extend(notices)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        for notice in config.notices:
            logger.warning(notice)
    return config
