"""Our GPTModel under context parallelism gives the single-process logits, loss and gradients.

The micro-batch goes through ``pretrain_gpt.get_batch`` (the training hook: packing, then
``shard_batch``) on every rank. The reference is the same model and weights at CP=1 (its packed
path is itself checked against each document alone in test_varlen_model.py); the CP ranks'
per-token outputs are put back at their global columns, and their gradients are summed over
the CP group (what the data-parallel reduce over DP x CP does in training).
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.checkpoint.sharding import shard_state_dict
from megatron_ext.config import parse_args
from megatron_ext.model.context_parallel import local_columns
from megatron_ext.model.gpt import build_model
from megatron_ext.training.packing import reset_position_ids
from pretrain_gpt import get_batch
from tests.launcher import launch
from tests.model.test_varlen_model import (EOD, MODEL_ARGS, ROWS_MBS2, SEED, VOCAB, _merged,
                                           _sample, _setup)

PLAIN_ARGS = [a for a in MODEL_ARGS if a != "--reset-position-ids"]


def _setup_cp(argv, cp, state):
    """This rank's config and model at ``--context-parallel-size cp`` with the weights
    ``state``. The CP groups are made here (ParallelTopology's part of the feature lives in
    the training side); the model gets the CP size through its config, as from the flag."""
    from megatron.core import parallel_state

    world = int(os.environ["WORLD_SIZE"])
    config = parse_args(argv, world_size=world)
    if cp == 1:
        return config, _setup(argv, state)[1]
    config.parallel.context_parallel_size = cp
    p = config.parallel
    platform.apply()
    dist.init_process_group("gloo", world_size=world, rank=int(os.environ["RANK"]))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size, context_parallel_size=cp,
        hierarchical_context_parallel_sizes=p.hierarchical_context_parallel_sizes)
    platform.manual_seed(SEED)
    model = build_model(config, VOCAB)
    model.load_state_dict(shard_state_dict(
        state, num_layers=2, swiglu=True, tied_embeddings=False,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=p.tensor_model_parallel_size,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=p.pipeline_model_parallel_size, vocab_rows=VOCAB), strict=False)
    model.train()
    return config, model


def _raw_batch(config, sample):
    """The global micro-batch as the data loader yields it."""
    tokens = sample["tokens"]
    b, s = tokens.shape
    position_ids = (reset_position_ids(tokens, EOD) if config.varlen
                    else torch.arange(s).expand(b, s))
    return {"tokens": tokens, "labels": sample["labels"], "loss_mask": torch.ones(b, s),
            "position_ids": position_ids}


def _grads_over_cp(model, config):
    """Gradients summed over the CP group (and the sequence-sliced norms over TP with SP, as
    finalize_model_grads does)."""
    from megatron.core import parallel_state

    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        dist.all_reduce(grads[name], group=parallel_state.get_context_parallel_group())
        if config.parallel.sequence_parallel and getattr(param, "sequence_parallel", False):
            dist.all_reduce(grads[name], group=parallel_state.get_tensor_model_parallel_group())
    return {k: v.numpy() for k, v in grads.items()}


def _rank(argv, sample, cp, state):
    """(coords, columns, loss [b, s / CP], logits, grads summed over CP, state) on this rank."""
    from megatron.core import parallel_state

    config, model = _setup_cp(argv, cp, state)
    b, s = sample["tokens"].shape
    batch = get_batch(config, EOD, iter([_raw_batch(config, sample)]))
    args = (batch["tokens"], batch["position_ids"], None)
    loss = model(*args, labels=batch["labels"], packed_seq_params=batch["packed_seq_params"])
    loss.sum().backward()
    with torch.no_grad():
        logits = model(*args, packed_seq_params=batch["packed_seq_params"])
    grads = _grads_over_cp(model, config) if cp > 1 else {
        n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    columns = (local_columns(s, cp, parallel_state.get_context_parallel_rank()) if cp > 1
               else torch.arange(s))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}
    coords = (parallel_state.get_tensor_model_parallel_rank(), 0)
    return (coords, columns, loss.detach().reshape(b, -1), logits.reshape(b, len(columns), -1),
            grads, state)


def _assemble(results, s):
    """Per-token loss [b, s] and logits [b, s, V] of the CP ranks of TP rank 0."""
    parts = [r for r in results if r[0][0] == 0]
    b, _, vocab = parts[0][3].shape
    loss, logits = torch.zeros(b, s), torch.zeros(b, s, vocab)
    for _, columns, part_loss, part_logits, _, _ in parts:
        loss[:, columns], logits[:, columns] = part_loss, part_logits
    return loss, logits


@pytest.fixture(scope="module")
def references():
    """Per flag set: (argv, sample, the CP=1 result)."""
    sample = _sample(ROWS_MBS2, 1)
    b, s = sample["tokens"].shape
    refs = {}
    for name, args in (("documents", MODEL_ARGS), ("plain-causal", PLAIN_ARGS)):
        argv = args + ["--seq-length", str(s), "--micro-batch-size", str(b)]
        [ref] = launch(_rank, 1, argv, sample, 1, None)
        refs[name] = argv, sample, ref
    return refs


def _check(results, ref, s, grads):
    loss, logits = _assemble(results, s)
    _, _, ref_loss, ref_logits, ref_grads, _ = ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    if logits.size(-1) == ref_logits.size(-1):  # TP=1: the whole vocabulary
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    _check_grads(grads, ref_grads)


def _check_grads(grads, ref_grads):
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


RECOMPUTE = "--recompute-granularity full --recompute-method uniform".split()


@pytest.mark.parametrize("flags, extra", [("documents", []), ("plain-causal", []),
                                          ("documents", RECOMPUTE)],
                         ids=["documents", "plain-causal", "documents-recompute"])
def test_cp2_gives_the_single_process_loss_logits_and_gradients(references, flags, extra):
    argv, sample, ref = references[flags]
    # Recomputation replays the forward, K/V all-gather included, in the backward pass.
    results = launch(_rank, 2, argv + extra, sample, 2, ref[5])
    _check(results, ref, sample["tokens"].size(1), results[0][4])
    # The two CP ranks computed different halves: the test sees the assembly, not a copy.
    assert not torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("flags, comm", [("documents", ["a2a"]), ("plain-causal", ["a2a"]),
                                         ("documents", ["a2a", "allgather"])],
                         ids=["documents", "plain-causal", "documents-per-layer"])
def test_cp2_all_to_all_gives_the_single_process_loss_logits_and_gradients(references, flags,
                                                                         comm):
    """--cp-comm-type a2a (Ulysses), alone and mixed with allgather per layer (2 layers)."""
    argv, sample, ref = references[flags]
    results = launch(_rank, 2, argv + ["--cp-comm-type", *comm], sample, 2, ref[5])
    _check(results, ref, sample["tokens"].size(1), results[0][4])


@pytest.mark.parametrize("comm", ["allgather", "p2p"])
def test_cp2_with_tp2_and_sequence_parallel(references, comm):
    """p2p: each TP rank's 2 heads / 1 KV group go around its own CP ring."""
    argv, sample, ref = references["documents"]
    argv = argv + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                   "--cp-comm-type", comm]
    results = launch(_rank, 4, argv, sample, 2, ref[5])
    merged = _merged([(coords, None, grads) for coords, _, _, _, grads, _ in results])
    _check(results, ref, sample["tokens"].size(1), merged)


def test_cp2_all_to_all_with_tp2_and_sequence_parallel(references):
    """a2a splits each TP rank's heads over CP: 8 heads / 4 KV groups, 2 / 1 per (TP, CP) rank."""
    argv, sample, _ = references["documents"]
    argv = argv + "--num-attention-heads 8 --num-query-groups 4 --cp-comm-type a2a".split()
    [ref] = launch(_rank, 1, argv, sample, 1, None)
    results = launch(_rank, 4, argv + "--tensor-model-parallel-size 2 --sequence-parallel".split(),
                     sample, 2, ref[5])
    merged = _merged([(coords, None, grads) for coords, _, _, _, grads, _ in results])
    _check(results, ref, sample["tokens"].size(1), merged)


def _pipeline_rank(argv, sample, state):
    """PP=2 x CP=2 through megatron-core's schedule: (coords, summed loss, grads over CP)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config, model = _setup_cp(argv, 2, state)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    raw = _raw_batch(config, sample)
    b, s = sample["tokens"].shape

    def forward_step(data_iterator, model):
        batch = get_batch(config, EOD, data_iterator)  # on every stage
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=batch["packed_seq_params"])
        return output, lambda loss: (loss.sum(), torch.tensor(loss.numel(), dtype=torch.int),
                                     {"loss": loss.detach().sum().reshape(1)})

    # The rows and the global sequence length: megatron-core divides it by CP for the
    # [s / CP, b, h] activations the stages exchange.
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([raw]), model=[model],
        num_microbatches=1, seq_length=s, micro_batch_size=b)
    grads = _grads_over_cp(model, config)
    loss = reduced[0]["loss"] if reduced else torch.zeros(1)
    dist.all_reduce(loss, group=parallel_state.get_context_parallel_group())
    return (0, pp_rank), float(loss), grads


def test_cp2_with_pp2_through_the_megatron_schedule(references):
    argv, sample, ref = references["documents"]
    results = launch(_pipeline_rank, 4, argv + ["--pipeline-model-parallel-size", "2"], sample,
                     ref[5])
    np.testing.assert_allclose(results[-1][1], float(ref[2].sum()), rtol=1e-5)
    _check_grads(_merged(results), ref[4])


@pytest.mark.parametrize("flags, comm, extra", [
    ("documents", ["p2p"], []), ("plain-causal", ["p2p"], []), ("documents", ["p2p"], RECOMPUTE),
    ("documents", ["p2p"], ["--recompute-granularity", "selective"]),
    ("documents", ["p2p", "allgather"], [])],
    ids=["documents", "plain-causal", "documents-recompute", "documents-recompute-selective",
         "documents-per-layer"])
def test_cp2_ring_gives_the_single_process_loss_logits_and_gradients(references, flags, comm,
                                                                     extra):
    """--cp-comm-type p2p (ring attention), alone, under full and selective (core attention)
    recomputation (the ring replays in the backward pass) and mixed with allgather per layer
    (2 layers)."""
    argv, sample, ref = references[flags]
    results = launch(_rank, 2, argv + ["--cp-comm-type", *comm] + extra, sample, 2, ref[5])
    _check(results, ref, sample["tokens"].size(1), results[0][4])


@pytest.mark.parametrize("flags, comm", [("documents", ["a2a+p2p"]),
                                         ("plain-causal", ["a2a+p2p"]),
                                         ("documents", ["a2a+p2p", "p2p"])],
                         ids=["documents", "plain-causal", "documents-per-layer"])
def test_cp4_hierarchical_gives_the_single_process_loss_logits_and_gradients(references, flags,
                                                                             comm):
    """--cp-comm-type a2a+p2p at CP=4 = 2 x 2 (GQA 4 heads / 2 groups: 2 / 1 per all-to-all
    rank), 24 tokens per row in chunks of 3: documents cross the inner and the outer groups'
    columns; get_batch takes the hierarchical groups from parallel_state. Per layer with p2p:
    the two rings (over the outer groups, over the whole CP group) in one model."""
    argv, sample, ref = references[flags]
    argv = argv + ["--context-parallel-size", "4", "--cp-comm-type", *comm,
                   "--hierarchical-context-parallel-sizes", "2", "2"]
    results = launch(_rank, 4, argv, sample, 4, ref[5])
    _check(results, ref, sample["tokens"].size(1), results[0][4])


def test_cp2_ring_and_allgather_with_pp2_through_the_megatron_schedule(references):
    """PP=2 x CP=2, stage 0's layer p2p and stage 1's allgather (--cp-comm-type per layer)."""
    argv, sample, ref = references["documents"]
    argv = argv + "--pipeline-model-parallel-size 2 --cp-comm-type p2p allgather".split()
    results = launch(_pipeline_rank, 4, argv, sample, ref[5])
    np.testing.assert_allclose(results[-1][1], float(ref[2].sum()), rtol=1e-5)
    _check_grads(_merged(results), ref[4])
