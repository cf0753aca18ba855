"""TP/PP/SP/DP runs compute what a single process computes.

Every run starts from the same weights (the single-process model's initial state dict, sharded
for each rank), reads the same global batches and takes the same optimizer steps; the loss
curves and the final weights (TP shards and PP stages gathered back into one state dict) must
match the single-process run up to float32 summation-order differences.
"""

import pytest
import torch

import pretrain_gpt
from megatron_ext.config import parse_args
from megatron_ext.training.trainer import Trainer
from tests.launcher import launch

MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 32 "
    "--attention-dropout 0 --hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 255 --lr 1e-3 --lr-warmup-iters 1 --clip-grad 1.0 --train-iters 4 "
    "--log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 7"
).split()
BATCH = "--micro-batch-size 2 --global-batch-size 8".split()

# Loss: relative; weights: absolute, after 4 Adam steps of lr 1e-3 on O(0.02..1) weights.
LOSS_RTOL = 2e-5
WEIGHT_ATOL = 2e-5


def _train(argv, world_size, init_state_dict):
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size,
                      init_state_dict=init_state_dict)
    initial = trainer.full_state_dict()
    losses = [step["lm loss"] for step in trainer.train()]
    final = trainer.full_state_dict()
    trainer.close()
    return losses, initial, final


@pytest.fixture(scope="module")
def reference():
    losses, initial, final = launch(_train, 1, MODEL + BATCH, 1, None)[0]
    return losses, initial, final


def _assert_same_run(reference, run):
    ref_losses, _, ref_final = reference
    losses, _, final = run
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert final.keys() == ref_final.keys()
    for name, tensor in ref_final.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


TOPOLOGIES = {
    "dp2": (2, ""),
    "tp2": (2, "--tensor-model-parallel-size 2"),
    "tp2-sp": (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    "pp2": (2, "--pipeline-model-parallel-size 2"),
    "pp4": (4, "--pipeline-model-parallel-size 4"),
    "tp2-pp2-sp": (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--sequence-parallel"),
    "dp2-tp2-distopt": (4, "--tensor-model-parallel-size 2 --use-distributed-optimizer"),
}


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_parallel_run_matches_single_process(reference, name):
    world_size, flags = TOPOLOGIES[name]
    run = launch(_train, world_size, MODEL + BATCH + flags.split(), world_size, reference[1])[0]
    _assert_same_run(reference, run)


def test_gradient_accumulation_matches_one_big_micro_batch(reference):
    """8 micro-batches of 1 (accumulated) == 4 of 2 == the reference's global batch of 8."""
    argv = MODEL + "--micro-batch-size 1 --global-batch-size 8".split()
    run = launch(_train, 1, argv, 1, reference[1])[0]
    _assert_same_run(reference, run)


def test_the_comparison_can_fail(reference):
    """A different global batch gives a different run: the tolerances above are meaningful."""
    argv = MODEL + "--micro-batch-size 2 --global-batch-size 4".split()
    losses, _, final = launch(_train, 1, argv, 1, reference[1])[0]
    assert losses != pytest.approx(reference[0], rel=LOSS_RTOL)


TIED = [flag for flag in MODEL if flag != "--untie-embeddings-and-output-weights"]


@pytest.fixture(scope="module")
def reference_tied():
    return launch(_train, 1, TIED + BATCH, 1, None)[0]


@pytest.mark.parametrize("world_size,flags", [
    (2, "--pipeline-model-parallel-size 2"),
    (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"),
])
def test_tied_embeddings_across_stages_match_single_process(reference_tied, world_size, flags):
    """The embedding on the first stage and its copy in the last stage's output layer get the
    summed gradient of both uses, as the single process's one shared weight does."""
    run = launch(_train, world_size, TIED + BATCH + flags.split(), world_size,
                 reference_tied[1])[0]
    _assert_same_run(reference_tied, run)


def test_each_pipeline_stage_initializes_its_own_layers():
    """Without given weights, stages draw different layers (Megatron-LM's seed + 100 x stage),
    not the same draws for every stage."""
    _, initial, _ = launch(_train, 2, MODEL + BATCH + ["--pipeline-model-parallel-size", "2",
                                                       "--train-iters", "2"], 2, None)[0]
    name = "decoder.layers.{}.self_attention.linear_qkv.weight"
    assert not torch.equal(initial[name.format(0)], initial[name.format(2)])
