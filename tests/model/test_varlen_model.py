"""Packed documents through our GPTModel give what each document gives when trained alone.

The reference runs every document by itself as a batch-1 sequence (plain causal attention,
positions from 0) and sums; it is built from the lengths the samples were made of, not from
``megatron_ext.training.packing``. The packed run uses ``packed_seq_params`` and
``reset_position_ids`` on ``tokens.reshape(1, b * s)``. Compared: per-token logits and loss,
and the gradient of the summed per-token loss with respect to every parameter. Single process
(micro-batch 1 and 2, with and without activation recomputation), TP=2 + SP and PP=2 on gloo.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.checkpoint.sharding import merge_state_dicts, shard_state_dict
from megatron_ext.config import parse_args
from megatron_ext.training.packing import actual_seq_len, packed_seq_params, reset_position_ids
from megatron_ext.model.attention import CoreAttention
from megatron_ext.model.attention_backends import AttentionBackendError
from megatron_ext.model.gpt import build_model
from megatron_ext.parallel import ParallelTopology
from tests.launcher import launch

VOCAB = 128  # padded to 128 for TP=1 and TP=2 alike (--make-vocab-size-divisible-by 64)
EOD = VOCAB - 1
NUM_LAYERS = 2
SEED = 1234

MODEL_ARGS = (
    f"--num-layers {NUM_LAYERS} --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 "
    f"--hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB - 1} "
    "--make-vocab-size-divisible-by 64 --attention-backend sdpa --reset-position-ids "
    "--calculate-per-token-loss"  # the references average the loss over all tokens
).split()

# Document lengths per row; a row's last document ends without an EOD when its entry is
# negative (a tail). Length-1 documents after an EOD are the "empty document between two EODs".
ROWS_MBS1 = [[6, 1, 1, 9, 11, -4]]
ROWS_MBS2 = [[5, 1, 7, 1, -10], [9, 6, 7, 1, 1]]  # row 1 ends exactly on an EOD
ROWS_MBS2_B = [[3, 13, 1, 7], [1, 2, 3, -18]]


def _sample(rows, seed):
    """tokens, labels [b, s] and the document lengths in (b, s) order."""
    g = torch.Generator().manual_seed(seed)
    tokens, lengths = [], []
    for row in rows:
        pieces = []
        for n in row:
            doc = torch.randint(0, EOD, (abs(n),), generator=g)
            if n > 0:
                doc[-1] = EOD
            pieces.append(doc)
            lengths.append(abs(n))
        tokens.append(torch.cat(pieces))
    tokens = torch.stack(tokens)
    labels = torch.randint(0, EOD, tokens.shape, generator=g)
    assert actual_seq_len(tokens, EOD).tolist() == np.cumsum(lengths).tolist()
    return {"tokens": tokens, "labels": labels, "lengths": lengths}


def _argv(sample, *extra):
    b, s = sample["tokens"].shape
    return MODEL_ARGS + ["--seq-length", str(s), "--micro-batch-size", str(b), *extra]


def _setup(argv, state=None):
    """Initialize this rank (torchrun env from the launcher) and build its model chunk."""
    world = int(os.environ["WORLD_SIZE"])
    config = parse_args(argv, world_size=world)
    topo = ParallelTopology.from_config(config.parallel, world)
    topo.initialize()
    platform.manual_seed(SEED)
    model = build_model(config, VOCAB)
    if state is not None:
        shard = shard_state_dict(
            state, num_layers=NUM_LAYERS, swiglu=True, tied_embeddings=False,
            tp_rank=topo.tp_rank, tp_size=topo.tensor_parallel,
            pp_rank=topo.pp_rank, pp_size=topo.pipeline_parallel, vocab_rows=VOCAB,
        )
        result = model.load_state_dict(shard, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(k.endswith("._extra_state") for k in result.missing_keys), result.missing_keys
    model.train()
    return topo, model


def _numpy(tensors):
    return {k: v.detach().float().numpy().copy() for k, v in tensors.items()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed_inputs(sample):
    tokens, labels = sample["tokens"], sample["labels"]
    flat = lambda x: x.reshape(1, -1)  # noqa: E731 (b, s) order
    return (flat(tokens), flat(reset_position_ids(tokens, EOD)), flat(labels),
            packed_seq_params(tokens, EOD))


def _forward_packed(model, sample, varlen=True):
    tokens, position_ids, labels, params = _packed_inputs(sample)
    if not varlen:  # no reset flags: plain causal over the packed row
        position_ids, params = torch.arange(tokens.size(1)).unsqueeze(0), None
    loss = model(tokens, position_ids, None, labels=labels, packed_seq_params=params)
    with torch.no_grad():
        logits = model(tokens, position_ids, None, packed_seq_params=params)
    return loss.reshape(-1), logits.reshape(-1, logits.size(-1))


def _forward_per_document(model, sample):
    tokens, labels = sample["tokens"].reshape(-1), sample["labels"].reshape(-1)
    losses, logits, start = [], [], 0
    for n in sample["lengths"]:
        doc, doc_labels = tokens[start:start + n][None], labels[start:start + n][None]
        position_ids = torch.arange(n)[None]
        loss = model(doc, position_ids, None, labels=doc_labels)
        loss.sum().backward()  # gradients accumulate over documents
        losses.append(loss.detach().reshape(-1))
        with torch.no_grad():
            logits.append(model(doc, position_ids, None)[0])
        start += n
    return torch.cat(losses), torch.cat(logits)


def _single(argv, samples, mode, state=None):
    """One process: per-token losses, logits and summed-loss gradients over ``samples``."""
    _, model = _setup(argv, state)
    calls = []
    for module in model.modules():
        if isinstance(module, CoreAttention):
            module.register_forward_hook(lambda *_: calls.append(1))
    losses, logits = [], []
    for sample in samples:
        if mode == "per_document":
            loss, logit = _forward_per_document(model, sample)
        else:
            loss, logit = _forward_packed(model, sample, varlen=mode == "packed")
            loss.sum().backward()
        losses.append(loss.detach())
        logits.append(logit)
    out = {"loss": torch.cat(losses), "logits": torch.cat(logits)}
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return _numpy(out), _numpy(_grads(model)), _numpy(state), len(calls)


def _run_single(argv, samples, mode, state=None, with_calls=False):
    [(out, grads, state, calls)] = launch(_single, 1, argv, samples, mode, state)
    state = {k: torch.from_numpy(v) for k, v in state.items()}
    return (out, grads, state, calls) if with_calls else (out, grads, state)


def _assert_same(actual, expected, what, rtol=1e-4, atol=1e-5):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def mbs2():
    """Two packed micro-batches of 2 x 24 and the single-process references over both."""
    samples = [_sample(ROWS_MBS2, 1), _sample(ROWS_MBS2_B, 2)]
    argv = _argv(samples[0])
    per_doc, per_doc_grads, state = _run_single(argv, samples, "per_document")
    packed, packed_grads, _, calls = _run_single(argv, samples, "packed", state, with_calls=True)
    return dict(samples=samples, argv=argv, state=state, per_doc=(per_doc, per_doc_grads),
                packed=(packed, packed_grads), attention_calls=calls)


def test_micro_batch_1_packed_equals_each_document_alone_and_unflagged_differs():
    samples = [_sample(ROWS_MBS1, 0)]
    argv = _argv(samples[0])
    ref, ref_grads, state = _run_single(argv, samples, "per_document")
    out, grads, _ = _run_single(argv, samples, "packed", state)
    _assert_same(out, ref, "logits/loss")
    _assert_same(grads, ref_grads, "grad")
    # Without the flag (plain causal over the packed row) the same sample must differ.
    unflagged, unflagged_grads, _ = _run_single(argv, samples, "unflagged", state)
    assert np.abs(unflagged["loss"] - ref["loss"]).max() > 1e-2
    assert max(np.abs(unflagged_grads[n] - ref_grads[n]).max() for n in ref_grads) > 1e-3


def test_micro_batch_2_packed_equals_each_document_alone(mbs2):
    (out, grads), (ref, ref_grads) = mbs2["packed"], mbs2["per_doc"]
    _assert_same(out, ref, "logits/loss")
    _assert_same(grads, ref_grads, "grad")


def test_full_recomputation_gives_the_same_result(mbs2):
    argv = mbs2["argv"] + "--recompute-granularity full --recompute-method uniform".split()
    out, grads, _, calls = _run_single(argv, mbs2["samples"], "packed", mbs2["state"], True)
    # Each micro-batch: a loss forward (recomputed in backward) and a no-grad logits forward.
    samples, plain_calls = len(mbs2["samples"]), mbs2["attention_calls"]
    assert plain_calls == samples * 2 * NUM_LAYERS
    assert calls == plain_calls + samples * NUM_LAYERS, "recomputation did not run"
    _assert_same(out, mbs2["packed"][0], "logits/loss", rtol=1e-6, atol=1e-7)
    _assert_same(grads, mbs2["packed"][1], "grad", rtol=1e-6, atol=1e-7)


def test_attention_dropout_is_replayed_by_recomputation(mbs2):
    argv = [a if a != "0" or prev != "--attention-dropout" else "0.3"
            for prev, a in zip([None] + mbs2["argv"], mbs2["argv"])]
    assert "0.3" in argv
    plain, plain_grads, _ = _run_single(argv, mbs2["samples"], "packed", mbs2["state"])
    recompute = argv + "--recompute-granularity full --recompute-method uniform".split()
    out, grads, _ = _run_single(recompute, mbs2["samples"], "packed", mbs2["state"])
    assert np.abs(plain["loss"] - mbs2["packed"][0]["loss"]).max() > 1e-3, "dropout inactive"
    _assert_same(out, plain, "logits/loss", rtol=1e-6, atol=1e-7)
    _assert_same(grads, plain_grads, "grad", rtol=1e-6, atol=1e-7)


def _tensor_parallel(argv, samples, state):
    from megatron.core import parallel_state

    topo, model = _setup(argv, state)
    losses = []
    for sample in samples:
        tokens, position_ids, labels, params = _packed_inputs(sample)
        loss = model(tokens, position_ids, None, labels=labels, packed_seq_params=params)
        loss.sum().backward()
        losses.append(loss.detach().reshape(-1))
    # What finalize_model_grads does for SP: sum the norm grads of the sequence slices.
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
    return (topo.tp_rank, topo.pp_rank), _numpy({"loss": torch.cat(losses)}), _numpy(_grads(model))


def _merged(results):
    shards = {coords: {k: torch.from_numpy(v) for k, v in grads.items()}
              for coords, _, grads in results}
    full = merge_state_dicts(shards, num_layers=NUM_LAYERS, swiglu=True, tied_embeddings=False)
    return {k: v.numpy() for k, v in full.items()}


def test_tensor_parallel_2_with_sequence_parallel(mbs2):
    argv = mbs2["argv"] + "--tensor-model-parallel-size 2 --sequence-parallel".split()
    results = launch(_tensor_parallel, 2, argv, mbs2["samples"], mbs2["state"])
    ref, ref_grads = mbs2["per_doc"]
    for _, out, _ in results:
        np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-4, atol=1e-5)
    _assert_same(_merged(results), ref_grads, "grad")


def _pipeline_parallel(argv, samples, state):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    topo, model = _setup(argv, state)

    def forward_step(data_iterator, model):
        # Every stage derives the document boundaries from the tokens of its micro-batch.
        tokens, position_ids, labels, params = _packed_inputs(next(data_iterator))
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=params)

        def loss_func(loss):
            total = loss.sum()
            count = torch.tensor(loss.numel(), dtype=torch.int)
            return total, count, {"loss": loss.detach().reshape(-1)}

        return output, loss_func

    b, s = samples[0]["tokens"].shape
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(samples), model=[model],
        num_microbatches=len(samples), seq_length=b * s, micro_batch_size=1,
    )
    loss = torch.cat([r["loss"] for r in reduced]) if reduced else torch.zeros(0)
    return (topo.tp_rank, topo.pp_rank), _numpy({"loss": loss}), _numpy(_grads(model))


def test_pipeline_parallel_2_with_the_megatron_schedule(mbs2):
    argv = mbs2["argv"] + ["--pipeline-model-parallel-size", "2"]
    results = launch(_pipeline_parallel, 2, argv, mbs2["samples"], mbs2["state"])
    packed, packed_grads = mbs2["packed"]
    last = results[-1][1]
    np.testing.assert_allclose(last["loss"], packed["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last["loss"], mbs2["per_doc"][0]["loss"], rtol=1e-4, atol=1e-5)
    _assert_same(_merged(results), packed_grads, "grad", rtol=1e-5, atol=1e-6)


def _build_forced(argv):
    try:
        _setup(argv)
    except AttentionBackendError as error:
        return str(error)
    return None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's errors")
def test_build_model_honours_the_attention_backend_flag():
    argv = _argv(_sample(ROWS_MBS1, 0))
    argv[argv.index("sdpa")] = "torch"
    [message] = launch(_build_forced, 1, argv)
    assert message is not None and message.startswith("--attention-backend torch:")
