"""Pretrain a GPT (Llama-style) model with megatron-core: the batch, forward and loss hooks.

    torchrun --nproc_per_node N pretrain_gpt.py <Megatron-LM flags>

See examples/ for complete launch scripts.
"""

from functools import partial

import torch

from megatron_ext import platform
from megatron_ext.config import Config


def get_batch(config: Config, eod: int, data_iterator) -> dict:
    """The next micro-batch on this rank's device; packed (THD) when documents are isolated;
    this rank's chunks of every row with context parallelism."""
    batch = {k: v.to(platform.device(), non_blocking=True) for k, v in next(data_iterator).items()}
    batch["packed_seq_params"] = None
    if config.varlen:
        from megatron_ext.training import packing

        seq_lengths = batch.pop("seq_lengths", None)
        if seq_lengths is not None:
            # Boundaries from the data (instruction samples: conversations, then the padding as
            # a segment of its own); each row's lengths add up to s, zeros fill the rest.
            seq_lengths = seq_lengths.flatten()
            batch["packed_seq_params"] = packing.packed_seq_params_from_actual_seq_len(
                packing.cumulative_seq_len(seq_lengths[seq_lengths > 0]))
        else:
            batch["packed_seq_params"] = packing.packed_seq_params(batch["tokens"], eod)
    if config.parallel.context_parallel_size > 1:
        from megatron.core import parallel_state

        from megatron_ext.model.context_parallel import shard_batch

        # Rows stay rows ([b, s / CP]); the params carry the documents and the CP layout
        # (a2a+p2p: the layout over the hierarchical sub-groups too).
        hierarchical = (tuple(parallel_state.get_hierarchical_context_parallel_groups())
                        if config.parallel.hierarchical_context_parallel_sizes else None)
        local, params = shard_batch(batch, batch["packed_seq_params"],
                                    parallel_state.get_context_parallel_group(), hierarchical)
        batch = dict(local, packed_seq_params=params)
    elif config.varlen:
        # megatron-core's THD path takes one row: flatten (b, s) in that order; the document
        # boundaries in packed_seq_params keep rows (and documents) apart.
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = batch[key].reshape(1, -1)
    return batch


def loss_func(per_token_loss: bool, loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed per-token loss and its token count (scaled over CP ranks: training/loss.py)."""
    from megatron_ext.training.loss import masked_loss

    return masked_loss(loss_mask, output_tensor, per_token_loss)


def forward_step(config: Config, eod: int, data_iterator, model):
    batch = get_batch(config, eod, data_iterator)
    output_tensor = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
        packed_seq_params=batch["packed_seq_params"],
    )
    if "task_scale" in batch:  # multi-task instruction data: megatron_ext/training/multitask.py
        from megatron_ext.training import multitask

        return output_tensor, partial(multitask.loss_func, batch["task_ids"],
                                      batch["loss_mask"], batch["loss_weight"],
                                      batch["task_scale"])
    return output_tensor, partial(loss_func, config.training.calculate_per_token_loss,
                                  batch["loss_mask"])


def main(argv=None):
    from megatron_ext.training import pretrain

    pretrain(forward_step, argv)


if __name__ == "__main__":
    main()
