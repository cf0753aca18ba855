"""torch_dist checkpoints (megatron-core dist_checkpointing, ``--ckpt-format torch_dist``).

Resumed in another TP/PP/DP layout, the loss curve and final weights are the uninterrupted
run's (float32 rounding), optimizer state included; in the same layout, bit for bit. A save
killed before it completes leaves the previous checkpoint the latest. Checkpoints interchange
with megatron-core's own GPTModel (local layer spec) saved and loaded by megatron-core alone.
"""

import argparse
import os

import pytest
import torch

import pretrain_gpt
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import parse_args
from megatron_ext.training import logs
from megatron_ext.training.metrics import parse_log
from megatron_ext.training.trainer import Trainer
from tests.launcher import exit_code_in_fork, free_port, launch
from tests.training.test_checkpointing import _train, _train_with_weights

BASE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 16 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 127 --lr 1e-3 --lr-warmup-iters 2 "
    "--lr-decay-style cosine --lr-decay-iters 6 --train-iters 6 --micro-batch-size 2 "
    "--global-batch-size 8 --log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 11 "
    "--ckpt-format torch_dist"
).split()
DROPOUT = "--attention-dropout 0.1 --hidden-dropout 0.1".split()
# Across layouts: no dropout (RNG streams are per TP/PP rank). The default padding differs
# (128 rows at TP 1, 256 at TP 2): a resumed run pads as its checkpoint did.
RESHARD = BASE + "--attention-dropout 0 --hidden-dropout 0".split()
TP2PP2 = "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"


@pytest.fixture(scope="module")
def single_process():
    """The uninterrupted single-process run: (losses, final full state dict). Data parallelism
    and TP do not change the initial weights; PP does (each stage seeds its own layers)."""
    losses, _, final = launch(_train_with_weights, 1, RESHARD, 1)[0]
    return losses, final


def _assert_close(losses, expected, final, expected_final):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    assert final.keys() == expected_final.keys()
    for name, tensor in expected_final.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("saved_ws,saved,resumed_ws,resumed", [
    (1, "", 4, TP2PP2),
    (4, TP2PP2, 1, ""),
    (2, "--use-distributed-optimizer", 1, "--use-distributed-optimizer"),
    # The other kind of optimizer (training/optimizer_switch.py), at the same and another DP.
    (2, "--use-distributed-optimizer", 1, ""),
    (2, "--use-distributed-optimizer", 2, ""),
    (1, "", 2, "--use-distributed-optimizer"),
    # With --bf16 the fp32 main copies are carried over too (bf16 weights alone would not do).
    (2, "--bf16 --use-distributed-optimizer", 1, "--bf16"),
    (1, "--bf16", 2, "--bf16 --use-distributed-optimizer"),
    # --fp16 and its loss scaler, at one DP: DP1 and DP2 sum the gradients in another order,
    # which the fp16 weights can round apart.
    (2, "--fp16 --initial-loss-scale 1024", 2,
     "--fp16 --initial-loss-scale 1024 --use-distributed-optimizer"),
], ids=["tp1pp1-to-tp2pp2", "tp2pp2-to-tp1pp1", "dp2-to-dp1-distributed-optimizer",
        "dp2-distributed-to-dp1-plain", "dp2-distributed-to-dp2-plain",
        "dp1-plain-to-dp2-distributed", "dp2-distributed-to-dp1-plain-bf16",
        "dp1-plain-to-dp2-distributed-bf16", "dp2-plain-to-dp2-distributed-fp16"])
def test_resume_in_another_layout(tmp_path, single_process, saved_ws, saved, resumed_ws, resumed):
    """Stopped at 3 in one layout, resumed in another == uninterrupted in the first."""
    reference = single_process
    if "pipeline" in saved or {"--bf16", "--fp16"} & set(saved.split()):
        reference = launch(_train_with_weights, saved_ws, RESHARD + saved.split(), saved_ws)[0][::2]
    first = launch(_train, saved_ws, RESHARD + saved.split() + [
        "--save", str(tmp_path), "--exit-interval", "3"], saved_ws)[-1]
    argv = RESHARD + resumed.split() + ["--load", str(tmp_path)]
    rest, _, final = launch(_train_with_weights, resumed_ws, argv, resumed_ws)[0]
    _assert_close(first + rest, reference[0], final, reference[1])
    if "--use-distributed-optimizer" in saved + resumed:
        # The restored Adam moments matter: without them the curve leaves the reference.
        fresh = launch(_train, resumed_ws, argv + ["--no-load-optim"], resumed_ws)[-1]
        assert abs(fresh[1] - reference[0][4]) > 1e-3 * abs(reference[0][4])


# --fp16 at this loss scale skips iterations 1-4: the save at 3 finds torch's Adam without state
# (platform.torch_adam_state_allocated), the resumed run steps at 5 and 6. Both formats.
FP16_SKIPPING = "--fp16 --initial-loss-scale 5e6 --use-distributed-optimizer"


@pytest.mark.parametrize("world_size,flags", [
    (1, ""),
    (4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer"),
    (2, FP16_SKIPPING),
    (2, FP16_SKIPPING + " --ckpt-format torch"),
], ids=["dp1", "pp2-distributed", "dp2-fp16-distributed-skipped", "dp2-fp16-skipped-torch"])
def test_resume_is_bit_identical(tmp_path, world_size, flags):
    """Same layout, dropout on: stopped at 3 and resumed == uninterrupted, bit for bit."""
    argv = BASE + DROPOUT + flags.split()
    full = launch(_train_with_weights, world_size, argv, world_size)[0]
    first = launch(_train, world_size, argv + ["--save", str(tmp_path), "--save-interval", "3",
                                               "--exit-interval", "3"], world_size)[-1]
    if "--ckpt-format torch" not in flags:
        assert (tmp_path / "iter_0000003" / "metadata.json").is_file()
        assert (tmp_path / "iter_0000003" / "common.pt").is_file()
    resumed = launch(_train_with_weights, world_size, argv + ["--load", str(tmp_path)], world_size)[0]
    assert first + resumed[0] == full[0]
    assert any(not torch.equal(full[1][name], t) for name, t in full[2].items())  # it trained
    for name, tensor in full[2].items():
        assert torch.equal(resumed[2][name], tensor), name


def _train_and_die_in_second_save(argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import psutil
    from megatron.core.dist_checkpointing import serialization

    real_save_config, calls = serialization.save_config, []

    def save_config_then_die(*args, **kwargs):
        # megatron-core writes metadata.json once every shard is on disk: the second
        # checkpoint is all there but this one file, when the job is killed (with its writers).
        calls.append(1)
        if len(calls) == 2:
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os._exit(9)
        return real_save_config(*args, **kwargs)

    serialization.save_config = save_config_then_die
    _train(argv, 1)


def test_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    argv = BASE + ["--save", str(tmp_path), "--save-interval", "2"]
    assert exit_code_in_fork(_train_and_die_in_second_save, argv) == 9
    assert ckpt.read_tracker(tmp_path) == 2
    assert not (tmp_path / "iter_0000004").exists()
    assert list(tmp_path.glob(".iter_0000004.*"))  # the half-written one, under its temp name
    # Resumed from 2 with --save again: the stale temp directory of 4 is replaced.
    resumed = launch(_train, 1, argv + ["--load", str(tmp_path)], 1)[0]
    assert len(resumed) == 4  # iterations 3..6
    assert ckpt.read_tracker(tmp_path) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004", "iter_0000006", ckpt.TRACKER_FILENAME]


def test_the_other_format_is_recognised_and_loaded(tmp_path):
    """--load reads whichever format the checkpoint is in, whatever --ckpt-format says."""
    for saved, loading in (("torch", "torch_dist"), ("torch_dist", "torch")):
        root = tmp_path / saved
        argv = BASE + DROPOUT
        _, _, weights = launch(_train_with_weights, 1, argv + [
            "--ckpt-format", saved, "--save", str(root), "--exit-interval", "2"], 1)[0]
        losses, loaded, _ = launch(_train_with_weights, 1, argv + [
            "--ckpt-format", loading, "--load", str(root)], 1)[0]
        assert len(losses) == 4
        for name, tensor in weights.items():
            assert torch.equal(loaded[name], tensor), name


def _write_shard(prefix, count):
    """``count`` documents of 21 uint16 tokens, written beside ``prefix`` and renamed onto it
    (a run that has the old files mapped keeps reading them)."""
    import numpy as np
    from megatron_ext.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix + ".new", np.uint16) as writer:
        for doc in np.random.default_rng(count).integers(1, 126, (count, 20)):
            writer.add_document(list(doc) + [127])  # NullTokenizer(127)'s EOD
    for suffix in (".bin", ".idx"):
        os.replace(prefix + ".new" + suffix, prefix + suffix)


@pytest.mark.parametrize("ckpt_format, relative", [("torch_dist", False), ("torch", False),
                                                    ("torch_dist", True)])
def test_a_shard_rewritten_since_the_save_is_named_on_resume(tmp_path, capfd, monkeypatch,
                                                             ckpt_format, relative):
    """The resumed run reads other samples than the saved run would have: it says which shard
    changed (and not when none did), also where the saved run named it by a relative path."""
    prefix = str(tmp_path / "A_text_document")

    def write(count):
        _write_shard(prefix, count)

    write(300)
    argv = [a for a in BASE if a != "--mock-data"] + [
        "--data-path", prefix, "--split", "100,0,0", "--ckpt-format", ckpt_format]
    saving = argv
    if relative:
        monkeypatch.chdir(tmp_path)
        saving = [os.path.basename(a) if a == prefix else a for a in argv]
    launch(_train, 1, saving + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "2"], 1)
    resume = argv + ["--load", str(tmp_path / "ckpt"), "--train-iters", "3"]
    capfd.readouterr()
    launch(_learning_rates, 1, resume, 1)  # with the log set up as pretrain's
    assert "the shard changed" not in "".join(capfd.readouterr())
    write(250)
    launch(_learning_rates, 1, resume, 1)
    log = "".join(capfd.readouterr())
    # 21 uint16 tokens a document: .bin 300 x 42 bytes then, 250 x 42 now.
    assert f"{prefix}: the shard changed since" in log and "12600/" in log and "10500/" in log


def _train_rewriting_the_shard(argv, world_size, prefix):
    """_train, the shard rewritten once the run has started on it (at its first step)."""
    def forward_step(*args, **kwargs):
        if not rewritten:
            rewritten.append(_write_shard(prefix, 250))
        return pretrain_gpt.forward_step(*args, **kwargs)

    rewritten = []
    trainer = Trainer(parse_args(argv, world_size=world_size), forward_step,
                      world_size=world_size)
    trainer.train()
    trainer.close()


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_checkpoint_records_the_shards_the_run_started_on(tmp_path, capfd, ckpt_format):
    """A shard rewritten mid-run: the checkpoint records the sizes the run was started on (it
    trains on the files it opened), so a resume on the new files says so."""
    prefix = str(tmp_path / "A_text_document")
    _write_shard(prefix, 300)
    argv = [a for a in BASE if a != "--mock-data"] + [
        "--data-path", prefix, "--split", "100,0,0", "--ckpt-format", ckpt_format]
    launch(_train_rewriting_the_shard, 1,
           argv + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "2"], 1, prefix)
    capfd.readouterr()
    launch(_learning_rates, 1, argv + ["--load", str(tmp_path / "ckpt"), "--train-iters", "3"], 1)
    log = "".join(capfd.readouterr())
    assert f"{prefix}: the shard changed since" in log and "12600/" in log and "10500/" in log


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_other_data_flags_on_resume_are_named(tmp_path, capfd, ckpt_format):
    """Another blend, --split, --seq-length or --seed gives the resumed run other samples than
    the saved run's (Megatron-LM resumes so without a word): the log names the flag with both
    values, and says nothing when the flags are the saved ones."""
    import numpy as np
    from megatron_ext.data.indexed import IndexedDatasetWriter

    prefixes = [str(tmp_path / f"{name}_text_document") for name in "AB"]
    for seed, prefix in enumerate(prefixes):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for doc in np.random.default_rng(seed).integers(1, 126, (200, 20)):
                writer.add_document(list(doc) + [127])  # NullTokenizer(127)'s EOD
    argv = [a for a in BASE if a != "--mock-data"] + [
        "--data-path", *prefixes, "--split", "100,0,0", "--ckpt-format", ckpt_format]
    launch(_train, 1, argv + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "2"], 1)
    resume = argv + ["--load", str(tmp_path / "ckpt"), "--train-iters", "3"]
    changes = {
        "--seed (the datasets' shuffle): 11 when": ["--seed", "12"],
        "--split: '100,0,0' when": ["--split", "99,1,0"],
        "--seq-length: 16 when": ["--seq-length", "8"],
        "the datasets and weights": ["--data-path", "0.7", prefixes[0], "0.3", prefixes[1]],
    }
    for named, flags in [(None, [])] + list(changes.items()):
        capfd.readouterr()
        launch(_learning_rates, 1, resume + flags, 1)
        log = "".join(capfd.readouterr())
        warned = [name for name in changes if name in log]
        assert warned == ([named] if named else []), (flags, log[-2000:])
        assert (named is None) == ("training continues over other samples" not in log)


def test_no_load_optim_restarts_the_schedule_and_says_so(tmp_path, capfd):
    """As Megatron-LM's: the optimizer and its LR schedule start afresh (the LRs of a run from
    scratch) while iterations and data continue; the resume's log line says so. megatron-core's
    default strictness lets the unread optimizer state be; raise_all (Megatron-LM's
    --dist-ckpt-strictness) makes it an error."""
    launch(_train, 1, BASE + ["--save", str(tmp_path), "--exit-interval", "2"], 1)
    capfd.readouterr()
    argv = BASE + ["--load", str(tmp_path), "--no-load-optim"]
    rates = launch(_learning_rates, 1, argv, 1)[0]
    assert "not loaded: optimizer state and LR schedule (--no-load-optim" in capfd.readouterr().out
    assert rates == launch(_learning_rates, 1, BASE, 1)[0][:4]
    with pytest.raises(RuntimeError, match=r"optimizer"):
        launch(_train, 1, argv + ["--dist-ckpt-strictness", "raise_all"], 1)


def _learning_rates(argv, world_size):
    logs.setup()  # as pretrain: the warnings reach stdout
    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    rates = [step["lr"] for step in trainer.train()]
    trainer.close()
    return rates


def test_another_global_batch_size_on_resume_needs_a_schedule_choice(tmp_path):
    """The schedule counts samples. Resumed at sample 16 with --global-batch-size 16 the decay
    is 96 samples, not the checkpoint's 48: an error naming the flags, as in Megatron-LM. With
    --use-checkpoint-opt_param-scheduler the LR follows the checkpoint's schedule (that of
    batches of 8), with --override-opt_param-scheduler this run's: the uninterrupted runs' LRs
    at the same consumed samples."""
    launch(_train, 1, BASE + ["--save", str(tmp_path), "--exit-interval", "2"], 1)
    resumed = BASE + ["--load", str(tmp_path), "--global-batch-size", "16"]
    with pytest.raises(RuntimeError, match=r"another learning-rate schedule: .*decay samples .*"
                                           r"48 in the checkpoint, 96 in this run.*"
                                           r"--override-opt_param-scheduler"):
        launch(_learning_rates, 1, resumed, 1)
    kept = launch(_learning_rates, 1, resumed + ["--use-checkpoint-opt_param-scheduler"], 1)[0]
    by_8 = launch(_learning_rates, 1, BASE + ["--train-iters", "10"], 1)[0]  # steps of 8
    assert kept == by_8[3::2]  # samples 32, 48, 64, 80
    overridden = launch(_learning_rates, 1, resumed + ["--override-opt_param-scheduler"], 1)[0]
    by_16 = launch(_learning_rates, 1, BASE + ["--global-batch-size", "16"], 1)[0]
    assert overridden == by_16[1:5]


def test_a_checkpoint_that_does_not_fit_names_the_flag(tmp_path):
    launch(_train, 1, BASE + ["--save", str(tmp_path), "--train-iters", "1"], 1)
    with pytest.raises(RuntimeError, match=r"--hidden-size 32 in the checkpoint, --hidden-size 64"):
        launch(_train, 1, BASE + ["--load", str(tmp_path), "--hidden-size", "64"], 1)


def _train_saving_as_megatron_lm_by_default(argv, world_size):
    """Saves the distributed optimizer's state as Megatron-LM does without
    --dist-ckpt-optim-fully-reshardable: 'dp_reshardable', its internal flat buffers."""
    from megatron_ext.training import dist_checkpoint

    metadata = dist_checkpoint._metadata
    dist_checkpoint._metadata = lambda trainer: metadata(trainer, "dp_reshardable")
    return _train(argv, world_size)


def test_a_dp_reshardable_optimizer_state_loads_into_the_distributed_optimizer_only(tmp_path):
    distributed = BASE + ["--use-distributed-optimizer"]
    launch(_train_saving_as_megatron_lm_by_default, 2, distributed + [
        "--save", str(tmp_path), "--train-iters", "1"], 2)
    with pytest.raises(RuntimeError, match=r"as 'dp_reshardable' \(Megatron-LM without "
                                           r"--dist-ckpt-optim-fully-reshardable\).*Resume once "
                                           r"with --use-distributed-optimizer.*--no-load-optim"):
        launch(_train, 2, BASE + ["--load", str(tmp_path)], 2)
    assert len(launch(_train, 2, distributed + ["--load", str(tmp_path)], 2)[0]) == 5


def test_vocabulary_rows_that_do_not_split_over_tp_name_the_re_pad(tmp_path):
    """127 rows (NullTokenizer: 126 + EOD, unpadded) cannot be cut in 2: no padding of this
    run matches them."""
    unpadded = BASE + ["--vocab-size", "126", "--make-vocab-size-divisible-by", "1"]
    launch(_train, 1, unpadded + ["--save", str(tmp_path), "--train-iters", "1"], 1)
    with pytest.raises(RuntimeError, match=r"padded vocabulary is 127 rows.*re-pad the checkpoint "
                                           r"with convert_ckpt.py .*--target-tensor-parallel-size 2"):
        launch(_train, 2, unpadded + ["--load", str(tmp_path), "--tensor-model-parallel-size", "2"], 2)


# -- megatron-core's own model and dist_checkpointing, without our code ------------------------

VOCAB_ROWS = 128  # 127 padded as megatron-core's GPTModel gets it


def _mcore_model():
    """megatron-core's GPTModel with its local layer spec, shaped as BASE."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB_ROWS, max_sequence_length=16, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def _megatron_lm_args():
    """The model-defining part of Megatron-LM's saved ``args`` for that model."""
    return argparse.Namespace(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=8, seq_length=16,
        max_position_embeddings=16, position_embedding_type="rope", rotary_base=10000,
        normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False,
        vocab_size=127, padded_vocab_size=VOCAB_ROWS, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        consumed_train_samples=56, consumed_valid_samples=0, ckpt_format="torch_dist")


def _mcore_init():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import platform

    platform.apply()  # megatron-core's CPU adaptations; no model or checkpoint code of ours
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    platform.manual_seed(5)


def _mcore_save(root):
    from megatron.core import dist_checkpointing

    _mcore_init()
    model = _mcore_model()
    directory = root / "iter_0000007"
    directory.mkdir(parents=True)
    dist_checkpointing.save({
        "model": model.sharded_state_dict(), "args": _megatron_lm_args(),
        "checkpoint_version": 3.0, "iteration": 7, "num_floating_point_operations_so_far": 0,
    }, str(directory))
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _mcore_load(directory):
    from megatron.core import dist_checkpointing

    _mcore_init()
    model = _mcore_model()
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(state["model"])
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _loaded_weights(argv, world_size):
    from megatron_ext.config import parse_args
    from megatron_ext.training.trainer import Trainer
    import pretrain_gpt
    from megatron_ext.training import logs

    logs.setup()  # as pretrain: the warnings reach stdout
    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    weights = trainer.full_state_dict()
    state = (trainer.iteration, trainer.consumed_samples)
    trainer.close()
    return weights, state


def test_megatron_core_checkpoint_loads_here_and_ours_loads_there(tmp_path):
    # Megatron-LM's way (megatron-core's model and save) -> our trainer, at TP=2.
    expected = launch(_mcore_save, 1, tmp_path / "mcore")[0]
    argv = BASE + ["--load", str(tmp_path / "mcore"), "--no-load-optim", "--no-load-rng",
                   "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64",
                   "--train-iters", "7", "--lr-decay-iters", "7"]
    weights, state = launch(_loaded_weights, 2, argv, 2)[0]
    assert state == (7, 56)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    # Ours, saved at TP=1 x PP=2 -> megatron-core's model and load.
    ours = tmp_path / "ours"
    _, _, saved = launch(_train_with_weights, 2, BASE + [
        "--pipeline-model-parallel-size", "2", "--train-iters", "2", "--save", str(ours)], 2)[0]
    loaded = launch(_mcore_load, 1, ours / "iter_0000002")[0]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_resume_in_another_layout_from_the_command_line(tmp_path):
    """torchrun pretrain_gpt.py: saved asynchronously at TP=2, resumed at PP=2 with the
    distributed optimizer."""
    from tests.training.test_launch import RUN_TIMEOUT_S, TINY, _torchrun

    argv = TINY + ["--global-batch-size", "4", "--train-iters", "4", "--log-interval", "1",
                   "--eval-interval", "1000", "--eval-iters", "0", "--ckpt-format", "torch_dist"]
    first = _torchrun(2, argv + ["--tensor-model-parallel-size", "2", "--save", str(tmp_path),
                                 "--save-interval", "2", "--exit-interval", "2", "--async-save"],
                      RUN_TIMEOUT_S)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ckpt.read_tracker(tmp_path) == 2
    assert (tmp_path / "iter_0000002" / "metadata.json").is_file()
    resumed = _torchrun(2, argv + ["--pipeline-model-parallel-size", "2", "--load", str(tmp_path),
                                   "--use-distributed-optimizer"], RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "(torch_dist, saved at TP=2 PP=1) at iteration 2" in resumed.stdout, resumed.stdout
    assert "without --use-distributed-optimizer: its optimizer state goes into this run's " \
           "distributed optimizer" in resumed.stdout, resumed.stdout
    # megatron-core's calls of torch's deprecated checkpoint API: filtered (training/logs.py).
    assert "FutureWarning" not in resumed.stdout + resumed.stderr, resumed.stderr
    logged, _ = parse_log(resumed.stdout)
    assert [r["iteration"] for r in logged] == ["3", "4"], resumed.stdout
    assert logged[0]["consumed samples"] == "12", logged[0]
