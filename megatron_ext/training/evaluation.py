"""Evaluation during and after training: the mean per-token loss of ``--eval-iters`` global
batches of the validation split (each evaluation continuing where the last one stopped, across
a resume too: ``trainer.consumed_valid_samples``) or of the test split (from its start), one
loss per validation dataset with ``--multiple-validation-sets``; a validation also answers
``--eval-prompts``. The batches run through the trainer's schedule, forward only."""

import contextlib
import functools
import gc

import torch

from megatron_ext.training import data


def eval_samples(config) -> list:
    """The samples the validation and test datasets must hold: validation batches advance from
    one evaluation to the next (as in Megatron-LM), the test split is read once."""
    t, l = config.training, config.logging
    evals = (t.train_iters // l.eval_interval + 1) * l.eval_iters if l.eval_interval else 0
    return [evals * t.global_batch_size, l.eval_iters * t.global_batch_size]


def eval_prompts(config, tokenizer):
    """The ``--eval-prompts`` a validation answers (generation/eval_prompts.py), or None."""
    if not config.logging.eval_prompts:
        return None
    from megatron_ext.generation.eval_prompts import EvalPrompts

    m = config.model
    return EvalPrompts(config.logging.eval_prompts, tokenizer,
                       m.max_position_embeddings if m.position_embedding_type == "learned_absolute"
                       else None)


@torch.no_grad()
def evaluate(trainer, split: str = "valid", final: bool = False):
    """The loss of ``split`` (``valid`` or ``test``), logged; with ``--multiple-validation-sets``
    a list, one per validation dataset; None without data or ``--eval-iters``."""
    if split == "valid" and trainer.eval_prompts is not None:
        trainer.eval_prompts.run(trainer.model[0].module, trainer.iteration, trainer.metrics)
    dataset = trainer.valid_ds if split == "valid" else trainer.test_ds
    if dataset is None or not trainer.config.logging.eval_iters:
        return None
    t, topo, d = trainer.config.training, trainer.topology, trainer.config.data
    if split == "test":
        return _evaluate_batches(trainer, data.per_chunk(len(trainer.model), functools.partial(
            data.cyclic_iterator, dataset, t.micro_batch_size, topo.dp_rank, topo.data_parallel,
            num_workers=d.num_workers)), split, final)
    datasets = dataset if d.multiple_validation_sets else [dataset]
    if trainer.valid_iterators is None:
        trainer.valid_iterators = [data.per_chunk(len(trainer.model), functools.partial(
            data.cyclic_iterator, ds, t.micro_batch_size, topo.dp_rank, topo.data_parallel,
            trainer.consumed_valid_samples, d.num_workers)) for ds in datasets]
    # Megatron-LM's labels: validation-0, validation-1 ... or --validation-set-names.
    suffixes = ([f"-{name}" for name in d.validation_set_names or range(len(datasets))]
                if d.multiple_validation_sets else [""])
    losses = [_evaluate_batches(trainer, iterator, split, final, suffix)
              for iterator, suffix in zip(trainer.valid_iterators, suffixes)]
    # Every dataset reads as many batches: one count is the position in each.
    trainer.consumed_valid_samples += trainer.config.logging.eval_iters * t.global_batch_size
    return losses if d.multiple_validation_sets else losses[0]


@contextlib.contextmanager
def eval_mode(trainer):
    """The model chunks in eval mode with the parameters of the last step in place (also for
    CoBa's measurements, coba.py), back to training after."""
    trainer.sync_params()
    for chunk in trainer.model:
        chunk.eval()
    yield
    for chunk in trainer.model:
        chunk.train()
    trainer.resume_param_overlap()


def _evaluate_batches(trainer, iterator, split: str, final: bool, suffix: str = "") -> float:
    """The loss of ``--eval-iters`` global batches of ``iterator``, logged."""
    manual_gc = trainer.config.training.manual_gc
    if manual_gc:
        gc.collect()
    loss_sum, tokens, task_totals = 0.0, 0, None
    with eval_mode(trainer):
        for _ in range(trainer.config.logging.eval_iters):
            loss, count = trainer._forward_backward(iterator, forward_only=True)
            loss_sum, tokens = loss_sum + loss * count, tokens + count
            if trainer.task_totals is not None:
                task_totals = trainer.task_totals + (0 if task_totals is None else task_totals)
    if manual_gc:
        gc.collect()
    loss = loss_sum / max(tokens, 1)
    trainer.metrics.log_eval(trainer.iteration, loss, split, final, task_totals, suffix)
    return loss
