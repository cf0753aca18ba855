"""``--use-checkpoint-args``: a resumed run that gives no model flags takes them from the
checkpoint and equals the uninterrupted run, loss for loss and weight for weight; which flags it
takes, and over which command-line values, follows Megatron-LM's load_args_from_checkpoint."""

import os

import pytest
import torch

import pretrain_gpt
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import ConfigError, parse_args
from megatron_ext.training.checkpoint_args import take_checkpoint_args
from megatron_ext.training.trainer import Trainer
from tests.checkpoint.conftest import make_tokenizer_json
from tests.launcher import launch

# Every value off its default, so that a flag not taken over would change the run (or fail the
# checkpoint's compatibility check).
MODEL = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 48 --num-attention-heads 4 "
         "--group-query-attention --num-query-groups 2 --swiglu --normalization RMSNorm "
         "--position-embedding-type rope --rotary-base 500 --disable-bias-linear "
         "--untie-embeddings-and-output-weights --seq-length 16 --attention-dropout 0.2 "
         "--hidden-dropout 0.3").split()
RUN = ("--mock-data --tokenizer-type NullTokenizer --vocab-size 127 --lr 1e-3 "
       "--lr-warmup-iters 2 --train-iters 6 --micro-batch-size 2 --global-batch-size 8 "
       "--log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 5").split()


def _parse(argv, world_size=1):
    return parse_args(argv, world_size=world_size, prepare=take_checkpoint_args)


def _train(argv, world_size):
    """(losses, final full state dict on rank 0, the model config) of a run."""
    config = _parse(argv, world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    losses = [step["lm loss"] for step in trainer.train()]
    final = trainer.full_state_dict()
    trainer.close()
    return losses, final, config.model, config.parallel.tensor_model_parallel_size


@pytest.mark.parametrize("world_size, layout, resume_flags", [
    (1, "--ckpt-format torch", []),
    # The layout too, from a torch_dist checkpoint, with --use-mp-args-from-checkpoint-args.
    (2, "--ckpt-format torch_dist --tensor-model-parallel-size 2",
     ["--ckpt-format", "torch_dist", "--use-mp-args-from-checkpoint-args"]),
    # An uneven pipeline split is part of the layout taken.
    (2, "--ckpt-format torch --num-layers 4 --pipeline-model-parallel-size 2 "
        "--decoder-first-pipeline-num-layers 1",
     ["--ckpt-format", "torch", "--use-mp-args-from-checkpoint-args"]),
])
def test_resume_without_model_flags_equals_the_continuous_run(tmp_path, world_size, layout,
                                                                resume_flags):
    argv = MODEL + RUN + layout.split()
    full = launch(_train, world_size, argv, world_size)[0]
    save = ["--save", str(tmp_path), "--save-interval", "3", "--exit-interval", "3"]
    first = launch(_train, world_size, argv + save, world_size)[0]
    assert ckpt.read_tracker(tmp_path) == 3
    resumed = launch(_train, world_size, RUN + resume_flags + [
        "--load", str(tmp_path), "--use-checkpoint-args"], world_size)[0]
    assert resumed[2] == full[2] and resumed[3] == full[3]  # the same model config and TP
    assert first[0] + resumed[0] == full[0]
    for name, tensor in full[1].items():
        assert torch.equal(resumed[1][name], tensor), name


def _saved(tmp_path):
    """A torch-format checkpoint of MODEL after one step."""
    argv = MODEL + RUN + ["--ckpt-format", "torch", "--save", str(tmp_path), "--save-interval",
                          "1", "--exit-interval", "1"]
    launch(_train, 1, argv, 1)
    return str(tmp_path)


def test_which_flags_are_taken_over_which_command_line_values(tmp_path):
    """As Megatron-LM: the sizes only where not given (--num-layers 2 stays), the layer shape
    and dropout even over the command line (--normalization LayerNorm, --hidden-dropout 0 are
    replaced, and said so), the rest stays the run's (--norm-epsilon)."""
    load = _saved(tmp_path)
    config = _parse(RUN + ["--load", load, "--use-checkpoint-args", "--num-layers", "2",
                           "--normalization", "LayerNorm", "--hidden-dropout", "0",
                           "--norm-epsilon", "1e-6"])
    m = config.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.seq_length) == (2, 32, 48, 16)
    assert (m.normalization, m.hidden_dropout, m.attention_dropout) == ("RMSNorm", 0.3, 0.2)
    assert (m.num_query_groups, m.rotary_base, m.swiglu, m.norm_epsilon) == (2, 500, True, 1e-6)
    replaced = [n for n in config.notices if "replaces the command line's" in n]
    assert len(replaced) == 2 and "--normalization RMSNorm" in replaced[0], config.notices
    # Without the flag nothing is taken: the defaults apply.
    assert _parse(RUN + ["--load", load]).model.num_layers == 2


def test_use_checkpoint_args_errors_and_fresh_start(tmp_path):
    with pytest.raises(ConfigError, match="--use-checkpoint-args .* give --load"):
        _parse(RUN + ["--use-checkpoint-args"])
    # An empty --load starts from scratch in Megatron-LM too: the command line's flags, said.
    config = _parse(MODEL + RUN + ["--load", str(tmp_path), "--use-checkpoint-args"])
    assert config.model.num_layers == 3
    assert any("holds no checkpoint yet" in n for n in config.notices)
    load = _saved(tmp_path / "ckpt")
    rank_file = next((tmp_path / "ckpt").glob(f"iter_*/mp_rank_*/{ckpt.RANK_FILENAME}"))
    rank_file.write_bytes(rank_file.read_bytes()[:-100])  # truncated: its zip directory is gone
    with pytest.raises(ConfigError, match=rf"--use-checkpoint-args: checkpoint file {rank_file} "
                                          r"is truncated"):
        _parse(RUN + ["--load", load, "--use-checkpoint-args"])


def test_the_tokenizer_comes_from_the_checkpoint_too(tmp_path):
    """Checkpoints save the tokenizer flags (Megatron-LM's names): a resume without any equals
    the continuous run; as in Megatron-LM they replace the command line's unless
    --no-use-tokenizer-model-from-checkpoint-args; a tokenizer file gone is named."""
    tok = make_tokenizer_json(tmp_path / "tok" / "tokenizer.json", 127)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok)]
    run = " ".join(RUN).replace("--tokenizer-type NullTokenizer --vocab-size 127", "").split()
    argv = MODEL + run + flags + ["--ckpt-format", "torch"]
    full = launch(_train, 1, argv, 1)[0]
    load = tmp_path / "ckpt"
    first = launch(_train, 1, argv + ["--save", str(load), "--save-interval", "3",
                                      "--exit-interval", "3"], 1)[0]
    resume = run + ["--load", str(load), "--use-checkpoint-args"]
    resumed = launch(_train, 1, resume, 1)[0]
    assert first[0] + resumed[0] == full[0]
    for name, tensor in full[1].items():
        assert torch.equal(resumed[1][name], tensor), name
    other = make_tokenizer_json(tmp_path / "other.json", 127)
    config = _parse(resume + ["--tokenizer-model", str(other)])
    assert config.data.tokenizer_model == str(tok)
    assert any(f"--tokenizer-model {tok} from" in n for n in config.notices), config.notices
    same = _parse(resume + ["--tokenizer-model", os.path.relpath(tok)])  # the same file
    assert not any("replaces" in n for n in same.notices), same.notices
    kept = resume + ["--no-use-tokenizer-model-from-checkpoint-args"]
    assert _parse(kept + flags[:3] + [str(other)]).data.tokenizer_model == str(other)
    with pytest.raises(ConfigError, match="--tokenizer-type is required"):
        _parse(kept)
    tok.parent.rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=rf"--tokenizer-model {tok}, which does not exist here: "
                       r"pass --tokenizer-model PATH with --no-use-tokenizer-model-from-"):
        _parse(resume)
