"""Training at uneven pipeline stages (--decoder-first/last-pipeline-num-layers, megatron-core's
num_layers_in_first/last_pipeline_stage): PP 2 with 1 layer on the first stage and 3 on the
last computes what one process computes; its checkpoints resume at PP 1 (torch_dist) and at
their own split (torch), and convert to PP 1 as the 1-process run saves. Offline split and
conversions: tests/checkpoint/test_uneven_pipeline.py."""

import pytest
import torch

from megatron_ext.checkpoint import format as ckpt
from tests.checkpoint.conftest import run_convert
from tests.launcher import launch
from tests.training.test_checkpointing import _load_error
from tests.training.test_checkpointing import _train_with_weights as _train
from tests.training.test_parallel_equivalence import (BATCH, MODEL, WEIGHT_ATOL,
                                                      _assert_same_run)

UNEVEN = ("--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1 "
          "--decoder-last-pipeline-num-layers 3").split()
ARGV = MODEL + BATCH


@pytest.fixture(scope="module")
def reference():
    return launch(_train, 1, ARGV, 1)[0]


def test_uneven_pp2_computes_what_one_process_computes(reference):
    """Same initial weights bit for bit, losses and weights after 4 steps (the gradients) to
    float32 summation order; the stages hold 1 and 3 layers."""
    run = launch(_train, 2, ARGV + UNEVEN, 2)[0]
    assert all(torch.equal(run[1][name], tensor) for name, tensor in reference[1].items())
    _assert_same_run(reference, run)


def _stage_layers(root, iteration, pp_rank):
    model = ckpt.load_rank_file(ckpt.rank_file(root, iteration, 0, pp_rank, 2))["model"]
    return len({k.split(".")[2] for k in model if k.startswith("decoder.layers.")})


def test_torch_dist_save_at_uneven_pp2_resumes_at_pp1(reference, tmp_path):
    save = ["--save", str(tmp_path), "--save-interval", "2", "--ckpt-format", "torch_dist"]
    launch(_train, 2, ARGV + UNEVEN + save + ["--exit-interval", "2"], 2)
    assert ckpt.read_tracker(tmp_path) == 2
    resumed = launch(_train, 1, ARGV + ["--load", str(tmp_path), "--ckpt-format",
                                        "torch_dist"], 1)[0]
    assert resumed[0] == pytest.approx(reference[0][2:], rel=2e-5)
    for name, tensor in reference[2].items():
        torch.testing.assert_close(resumed[2][name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_torch_save_at_uneven_pp2_resumes_and_converts_to_the_1_process_save(reference,
                                                                          tmp_path):
    uneven, single = tmp_path / "uneven", tmp_path / "single"
    save = ["--save-interval", "2", "--ckpt-format", "torch"]
    launch(_train, 2, ARGV + UNEVEN + save + ["--save", str(uneven), "--exit-interval", "2"], 2)
    assert [_stage_layers(uneven, 2, pp) for pp in range(2)] == [1, 3]
    # At its own split: the uninterrupted run, optimizer state and all.
    resumed = launch(_train, 2, ARGV + UNEVEN + ["--load", str(uneven), "--ckpt-format",
                                                 "torch"], 2)[0]
    assert resumed[0] == pytest.approx(reference[0][2:], rel=2e-5)
    # At the even split of the same PP: refused, naming the flag (not a state-dict error).
    errors = launch(_load_error, 2, ARGV + ["--pipeline-model-parallel-size", "2", "--load",
                                            str(uneven), "--ckpt-format", "torch"], 2)
    assert all("the checkpoint's stages hold [1, 3] layers, this run's [2, 2] "
               "(--decoder-first/last-pipeline-num-layers" in e for e in errors), errors
    # -> PP 1 with convert_ckpt.py: the weights the 1-process run saves at that iteration.
    launch(_train, 1, ARGV + save + ["--save", str(single), "--exit-interval", "2"], 1)
    pp1 = run_convert("mg", "mg", uneven, tmp_path / "pp1")
    got, want = (ckpt.load_rank_file(ckpt.rank_file(root, 2, 0, 0, 1))["model"]
                 for root in (pp1, single))
    want = {k: v for k, v in want.items() if torch.is_tensor(v) and "_extra_state" not in k}
    assert sorted(k for k, v in got.items() if torch.is_tensor(v) and "_extra_state" not in k) \
        == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_enable_hf2mg_convert_converts_to_the_runs_split(tmp_path):
    """--enable-hf2mg-convert's conversion (hf2mg's options to convert_ckpt.py) at the run's
    uneven split: the cache loads at that layout."""
    from megatron_ext.checkpoint.convert import convert
    from megatron_ext.config import parse_args
    from megatron_ext.training.hf2mg import _options
    from tests.checkpoint.conftest import make_hf_model

    hf = make_hf_model(tmp_path / "hf")
    config = parse_args(("--num-layers 4 --hidden-size 64 --num-attention-heads 4 "
                         "--tokenizer-type NullTokenizer --vocab-size 250 --mock-data "
                         f"--enable-hf2mg-convert --load {hf}").split() + UNEVEN, world_size=2)
    out = convert(_options(config) + ["--load-dir", str(hf), "--save-dir", str(tmp_path / "mg")])
    assert [_stage_layers(out, 1, pp) for pp in range(2)] == [1, 3]


@pytest.mark.parametrize("flags, expected", [
    ("--account-for-embedding-in-pipeline-split", "--account-for-embedding-in-pipeline-split: "
     "not supported; give the first stage one layer less with --decoder-first-pipeline-num-"
     "layers"),
    ("--account-for-loss-in-pipeline-split", "--decoder-last-pipeline-num-layers instead"),
    ("--decoder-first-pipeline-num-layers 1 --num-virtual-stages-per-pipeline-rank 2",
     "pipeline stage 0 holds 1 layers, which do not split into 2 equal model chunks"),
    ("--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 3",
     "the 2 stages must add up to the 4 layers"),
])
def test_layouts_not_supported_are_refused_by_flag(flags, expected):
    from megatron_ext.config import ConfigError, parse_args

    argv = ARGV + ["--pipeline-model-parallel-size", "2"] + flags.split()
    with pytest.raises(ConfigError, match=expected):
        parse_args(argv, world_size=2)
