"""Training: the loop (``Trainer``) and the ``pretrain`` entry point used by pretrain_gpt.py."""

import logging
import os
import sys

from megatron_ext.config import ConfigError, UnknownFlagsError, parse_args


def pretrain(forward_step, argv=None):
    """Parse flags, validate them before any process group exists, train, evaluate."""
    rank = int(os.environ.get("RANK", "0"))
    last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1
    # Progress from the last rank (which holds the loss, as in Megatron-LM); problems from all.
    logging.basicConfig(level=logging.INFO if rank == last_rank else logging.WARNING,
                        format="[%(asctime)s] %(message)s", stream=sys.stdout)
    try:
        config = parse_args(argv)
    except UnknownFlagsError as error:
        # The same on every rank: said once.
        sys.exit(f"[rank {rank}] invalid arguments: {error}" if rank == 0 else 2)
    except ConfigError as error:
        sys.exit(f"[rank {rank}] invalid arguments: {error}")
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(config, forward_step)
    try:
        trainer.train()
        eval_interval = config.logging.eval_interval
        if not (eval_interval and trainer.iteration % eval_interval == 0):
            trainer.evaluate(final=True)
    finally:
        trainer.close()
    return trainer
