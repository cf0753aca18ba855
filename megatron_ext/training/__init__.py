"""Training: the loop (``Trainer``) and the ``pretrain`` entry point used by pretrain_gpt.py."""

import logging
import os
import sys

from megatron_ext.config import ConfigError, parse_args


def pretrain(forward_step, argv=None):
    """Parse flags, validate them before any process group exists, train, evaluate."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stdout)
    try:
        config = parse_args(argv)
    except ConfigError as error:
        rank = os.environ.get("RANK", "0")
        sys.exit(f"[rank {rank}] invalid arguments: {error}")
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(config, forward_step)
    try:
        trainer.train()
        trainer.evaluate()
    finally:
        trainer.close()
    return trainer
