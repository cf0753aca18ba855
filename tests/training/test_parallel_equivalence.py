"""Parallel runs compute what a single process computes (in-process ranks, for the details).

The full layout matrix, from the command line, is in test_reproducibility.py. Here: the initial
weights of a fresh start are bit-identical in every layout; gradient accumulation; tied
embeddings split across stages; hidden dropout under TP. Loss curves and final weights (TP
shards and PP stages gathered back into one state dict) must match the single-process run up
to float32 summation-order differences; the padded vocabulary rows stay zero.
"""

import pytest
import torch

from tests.launcher import launch
# (losses, initial full state dict, final full state dict)
from tests.training.test_checkpointing import _train_with_weights as _train

MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 32 "
    "--attention-dropout 0 --hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 299 --lr 1e-3 --lr-warmup-iters 1 --clip-grad 1.0 --train-iters 4 "
    "--log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 7"
).split()
BATCH = "--micro-batch-size 2 --global-batch-size 8".split()

# Loss: relative; weights: absolute, after 4 Adam steps of lr 1e-3 on O(0.02..1) weights.
LOSS_RTOL = 2e-5
WEIGHT_ATOL = 2e-5
VOCAB = 300  # NullTokenizer --vocab-size 299: 384 rows at TP=1, 512 at TP=2
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


@pytest.fixture(scope="module")
def reference():
    return launch(_train, 1, MODEL + BATCH, 1)[0]


def _assert_same_run(reference, run):
    ref_losses, _, ref_final = reference
    losses, _, final = run
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert final.keys() == ref_final.keys()
    for name, tensor in ref_final.items():
        got = final[name]
        if name in _VOCAB_ROWS:
            assert torch.count_nonzero(got[VOCAB:]) == 0, name  # padded rows: still zero
            got, tensor = got[:VOCAB], tensor[:VOCAB]
        torch.testing.assert_close(got, tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("world_size,flags", [
    (2, "--pipeline-model-parallel-size 2"),
    (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"),
])
def test_initial_weights_are_the_same_in_every_layout(reference, world_size, flags):
    """Each parameter is drawn from (seed, its full-model name): bit-identical to one process,
    and layers differ from each other (no stage repeats another's draws)."""
    argv = MODEL + BATCH + flags.split() + ["--train-iters", "2"]
    initial = launch(_train, world_size, argv, world_size)[0][1]
    ref_initial = reference[1]
    assert initial.keys() == ref_initial.keys()
    for name, tensor in ref_initial.items():
        got = initial[name]
        if name in _VOCAB_ROWS:
            assert torch.count_nonzero(got[VOCAB:]) == 0 and torch.count_nonzero(tensor[VOCAB:]) == 0
            got, tensor = got[:VOCAB], tensor[:VOCAB]
        assert torch.equal(got, tensor), name
    layer = "decoder.layers.{}.self_attention.linear_qkv.weight"
    assert not torch.equal(initial[layer.format(0)], initial[layer.format(2)])


def test_gradient_accumulation_matches_one_big_micro_batch(reference):
    """8 micro-batches of 1 (accumulated) == 4 of 2 == the reference's global batch of 8."""
    argv = MODEL + "--micro-batch-size 1 --global-batch-size 8".split()
    run = launch(_train, 1, argv, 1)[0]
    _assert_same_run(reference, run)


def test_the_comparison_can_fail(reference):
    """Another --seed gives another run: the seed is honoured and the tolerances above are
    meaningful."""
    argv = _with(MODEL, "--seed", "8") + BATCH
    losses, _, final = launch(_train, 1, argv, 1)[0]
    assert losses != pytest.approx(reference[0], rel=LOSS_RTOL)


TIED = [flag for flag in MODEL if flag != "--untie-embeddings-and-output-weights"]


@pytest.fixture(scope="module")
def reference_tied():
    return launch(_train, 1, TIED + BATCH, 1)[0]


@pytest.mark.parametrize("world_size,flags", [
    (2, "--pipeline-model-parallel-size 2"),
    (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"),
])
def test_tied_embeddings_across_stages_match_single_process(reference_tied, world_size, flags):
    """The embedding on the first stage and its copy in the last stage's output layer start
    alike and get the summed gradient of both uses, as the single process's one shared weight
    does; their padded rows (zero gradient, decoupled weight decay of zero) stay zero."""
    run = launch(_train, world_size, TIED + BATCH + flags.split(), world_size)[0]
    _assert_same_run(reference_tied, run)


def test_hidden_dropout_under_tensor_parallelism_matches_single_process(reference):
    """Hidden dropout (residual branches, embedding) draws from the default generator, seeded
    alike on every TP rank and drawing full [s, b, h] masks without sequence parallelism: the
    same masks as one process (the layouts that keep this are listed in the README)."""
    argv = _with(MODEL, "--hidden-dropout", "0.2") + BATCH
    ref = launch(_train, 1, argv, 1)[0]
    assert ref[0] != pytest.approx(reference[0], rel=LOSS_RTOL)  # dropout is on
    run = launch(_train, 2, argv + ["--tensor-model-parallel-size", "2"], 2)[0]
    _assert_same_run(ref, run)


def _with(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv
