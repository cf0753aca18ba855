"""16-bit training through megatron-core's mixed-precision optimizer (fp32 main weights)."""

import math

import pytest

from tests.launcher import launch
from tests.training.test_checkpointing import MODEL, _train


@pytest.mark.parametrize("world_size,flags", [
    (1, "--bf16"),
    (2, "--bf16 --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer"),
    (1, "--fp16 --initial-loss-scale 4096"),
])
def test_16_bit_training_learns(world_size, flags):
    argv = MODEL + ["--lr", "1e-2", "--train-iters", "8", "--lr-decay-iters", "8"] + flags.split()
    losses = launch(_train, world_size, argv, world_size)[-1]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.05
