"""Training: the loop (``Trainer``) and the ``pretrain`` entry point used by pretrain_gpt.py."""

import os
import sys

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.training import logs


def pretrain(forward_step, argv=None):
    """Parse flags, validate them before any process group exists, train, evaluate."""
    try:
        config = parse_args(argv)
    except ConfigError as error:
        sys.exit(f"[rank {os.environ.get('RANK', '0')}] invalid arguments: {error}")
    # Before megatron-core is imported: its optional-dependency warnings fire at import time.
    logs.setup(config.logging.verbose)
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(config, forward_step)
    try:
        trainer.train()
        eval_interval = config.logging.eval_interval
        if not (eval_interval and trainer.iteration % eval_interval == 0):
            trainer.evaluate()
    finally:
        trainer.close()
    return trainer
