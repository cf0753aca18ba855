"""Megatron-LM's ``--pretrained-checkpoint``: while ``--load`` holds no checkpoint the run is
``--load PRETRAINED --finetune`` (its weights, iteration 0, a fresh optimizer), loss for loss;
once it has saved to ``--load``, it resumes from there (iteration, optimizer), equal to the run
that never stopped."""

import logging

import pytest
import torch

from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import ConfigError
from megatron_ext.training import checkpoint_checks
from tests.launcher import launch
from tests.training.test_checkpoint_args import MODEL, RUN, _parse, _train


def test_pretrained_checkpoint_is_finetune_until_load_holds_one(tmp_path, caplog):
    pretrained = tmp_path / "pretrained"
    launch(_train, 1, MODEL + RUN + ["--ckpt-format", "torch", "--save", str(pretrained),
                                     "--save-interval", "6"], 1)
    assert ckpt.read_tracker(pretrained) == 6
    finetuned = launch(_train, 1, MODEL + RUN + ["--load", str(pretrained), "--finetune"], 1)[0]
    assert len(finetuned[0]) == 6  # from iteration 0
    load = tmp_path / "load"  # missing: no checkpoint yet
    flags = MODEL + RUN + ["--load", str(load), "--pretrained-checkpoint", str(pretrained),
                           "--save", str(load), "--save-interval", "3"]
    first = launch(_train, 1, flags + ["--exit-interval", "3"], 1)[0]
    assert first[0] == finetuned[0][:3]
    assert ckpt.read_tracker(load) == 3
    resumed = launch(_train, 1, flags, 1)[0]  # from --load: iteration 3, its optimizer state
    assert resumed[0] == finetuned[0][3:]
    for name, tensor in finetuned[1].items():
        assert torch.equal(resumed[1][name], tensor), name
    # Without --load too (Megatron-LM loads it whenever --load holds none), and its flags.
    config = _parse(RUN + ["--pretrained-checkpoint", str(pretrained), "--use-checkpoint-args"])
    assert config.model.num_layers == 3 and config.model.swiglu
    checkpoint_checks.check_checkpoints(config)
    assert (config.checkpoint.load, config.checkpoint.finetune) == (str(pretrained), True)
    # A first save to --load that did not finish: said, and the pretrained weights load.
    half = tmp_path / "half"
    (half / "iter_0000003").mkdir(parents=True)
    config = _parse(MODEL + RUN + ["--load", str(half), "--pretrained-checkpoint", str(pretrained)])
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        checkpoint_checks.check_checkpoints(config)
    assert f"no {ckpt.TRACKER_FILENAME} (a first save that did not finish?): fine-tuning from " \
           f"--pretrained-checkpoint {pretrained}" in caplog.text
    assert config.checkpoint.load == str(pretrained)


def test_a_pretrained_checkpoint_that_holds_none_is_named(tmp_path):
    config = _parse(MODEL + RUN + ["--load", str(tmp_path / "load"), "--pretrained-checkpoint",
                                   str(tmp_path / "nothing")])
    with pytest.raises(ckpt.CheckpointError, match=rf"--pretrained-checkpoint {tmp_path}/nothing "
                       rf"holds no checkpoint .*--load {tmp_path}/load neither"):
        checkpoint_checks.check_checkpoints(config)
    with pytest.raises(ConfigError, match="--pretrained-checkpoint .* drop one of them"):
        _parse(MODEL + RUN + ["--load", str(tmp_path), "--pretrained-checkpoint", str(tmp_path),
                              "--enable-hf2mg-convert"])
