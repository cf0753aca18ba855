"""The independent reference of the instruction tests: one process, plain causal attention over
one conversation at a time, with the weights of the run under test."""

import torch

from megatron_ext.config import parse_args


def single_process_model(argv, state) -> torch.nn.Module:
    """Our GPTModel for ``argv`` on one process, holding ``state``, in training mode."""
    from megatron_ext import platform
    from megatron_ext.model.gpt import build_model
    from megatron_ext.parallel import ParallelTopology
    from megatron_ext.tokenizer import build_tokenizer

    config = parse_args(argv, world_size=1)
    ParallelTopology.from_config(config.parallel, 1).initialize()
    platform.manual_seed(0)
    d = config.data
    # The tokenizer's vocabulary, as the Trainer's: the padded rows do not count in the loss.
    model = build_model(config, build_tokenizer(d.tokenizer_type, d.tokenizer_model,
                                                d.vocab_size).vocab_size)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    return model.train()


def conversation_loss(model, ids, mask):
    """(summed loss over the trained tokens, their count) of one conversation alone."""
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask).float()
    tokens, labels = ids[:-1][None], ids[1:][None]
    loss = model(tokens, torch.arange(tokens.size(1))[None], None, labels=labels)
    return (loss[0] * mask[1:]).sum(), int(mask[1:].sum())
