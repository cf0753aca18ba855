"""Save/resume in Megatron's legacy layout (--ckpt-format torch): exact resume, atomic saves,
clear errors on mismatch. The torch_dist format: test_dist_checkpoint.py."""

import os

import pytest
import torch

import pretrain_gpt
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import parse_args
from megatron_ext.training.trainer import Trainer
from tests.launcher import exit_code_in_fork, launch, pretrain_records

MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 16 "
    "--attention-dropout 0.1 --hidden-dropout 0.1 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 127 --lr 1e-3 --lr-warmup-iters 2 --lr-decay-style cosine --lr-decay-iters 6 "
    "--train-iters 6 "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 1 --eval-interval 1000 "
    "--eval-iters 0 --seed 11 --ckpt-format torch"
).split()


def _train(argv, world_size):
    return _train_with_weights(argv, world_size)[0]


def _train_with_weights(argv, world_size):
    """(losses, initial full state dict, final full state dict); the dicts on rank 0 only."""
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    initial = trainer.full_state_dict()
    losses = [step["lm loss"] for step in trainer.train()]
    final = trainer.full_state_dict()
    trainer.close()
    return losses, initial, final


@pytest.mark.parametrize("world_size,flags", [
    (1, ""),
    (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    (4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer"),
])
def test_resume_is_bit_identical(tmp_path, world_size, flags):
    """Stopped at iteration 3 (--exit-interval) and resumed == uninterrupted, loss for loss
    (dropout on, so the RNG states matter too)."""
    argv = MODEL + flags.split()
    full = launch(_train_with_weights, world_size, argv, world_size)
    save = ["--save", str(tmp_path), "--save-interval", "3"]
    first = launch(_train, world_size, argv + save + ["--exit-interval", "3"], world_size)[-1]
    assert ckpt.read_tracker(tmp_path) == 3
    resumed = launch(_train_with_weights, world_size, argv + ["--load", str(tmp_path)], world_size)
    # Exact equality: same data order, RNG and optimizer state.
    assert first + resumed[-1][0] == full[-1][0]
    for name, tensor in full[0][2].items():
        assert torch.equal(resumed[0][2][name], tensor), name
    assert ckpt.read_tracker(tmp_path) == 3  # no --save in the resumed run


def test_layout_and_save_total_limit(tmp_path):
    argv = MODEL + ["--save", str(tmp_path), "--save-interval", "2", "--save-total-limit", "2",
                    "--pipeline-model-parallel-size", "2"]
    launch(_train, 2, argv, 2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    for pp in range(2):
        payload = ckpt.load_rank_file(tmp_path / "iter_0000006" / f"mp_rank_00_{pp:03d}"
                                      / "model_optim_rng.pt")
        assert payload["iteration"] == 6 and payload["args"].num_layers == 2
        assert payload["consumed_samples"] == 48


def _train_and_die_in_second_save(argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from tests.launcher import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    torch.set_num_threads(1)  # as tests/launcher.py: no OpenMP pool inherited across the fork
    real_save, calls = torch.save, []

    def save_then_die(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "model" in obj:  # a model_optim_rng.pt payload
            calls.append(obj["iteration"])
        if len(calls) == 2:  # the second checkpoint: half a file, then the process is killed
            handle.write(b"PK\x03\x04 half a zip")
            handle.flush()
            os._exit(9)
        return real_save(obj, handle, *args, **kwargs)

    torch.save = save_then_die
    _train(argv, 1)


def test_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    argv = MODEL + ["--save", str(tmp_path), "--save-interval", "2"]
    assert exit_code_in_fork(_train_and_die_in_second_save, argv) == 9
    assert ckpt.read_tracker(tmp_path) == 2
    assert not (tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt").exists()
    resumed = launch(_train, 1, MODEL + ["--load", str(tmp_path)], 1)[0]
    assert len(resumed) == 4  # iterations 3..6 from the complete checkpoint at 2


def _train_and_die_before_second_distrib_optim(argv):
    """As above, killed in the second save once model_optim_rng.pt is written in full and
    distrib_optim.pt is not yet."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from tests.launcher import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    torch.set_num_threads(1)
    real_save, calls = torch.save, []

    def save_or_die(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "states" in obj:  # a distrib_optim.pt payload
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)
        return real_save(obj, handle, *args, **kwargs)

    torch.save = save_or_die
    _train(argv, 1)


def test_killed_save_leaves_no_iteration_directory_without_its_optimizer(tmp_path):
    """The rank file alone looks like a checkpoint (to convert_ckpt.py, or a tracker pointed
    at it): a save is published by renaming its staging directory once every file is there,
    and the next save deletes what a killed one left."""
    argv = MODEL + ["--use-distributed-optimizer", "--save", str(tmp_path), "--save-interval", "2"]
    assert exit_code_in_fork(_train_and_die_before_second_distrib_optim, argv) == 9
    assert ckpt.read_tracker(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002"]
    staged = tmp_path / ".iter_0000004.incomplete" / "mp_rank_00"
    assert (staged / "model_optim_rng.pt").is_file() and not (staged / "distrib_optim.pt").exists()
    resumed = launch(_train, 1, argv + ["--load", str(tmp_path)], 1)[0]
    assert len(resumed) == 4  # iterations 3..6 from the complete checkpoint at 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004", "iter_0000006", ckpt.TRACKER_FILENAME]
    assert (tmp_path / "iter_0000004" / "mp_rank_00" / "distrib_optim.pt").is_file()


def test_an_iteration_without_its_distrib_optim_is_named_incomplete(tmp_path):
    """One left by an older save, or copied in part: not taken for the plain optimizer's."""
    argv = MODEL + ["--use-distributed-optimizer", "--save", str(tmp_path), "--exit-interval", "2"]
    launch(_train, 1, argv, 1)
    missing = tmp_path / "iter_0000002" / "mp_rank_00" / "distrib_optim.pt"
    missing.unlink()
    message = launch(_load_error, 1, MODEL + ["--use-distributed-optimizer", "--load",
                                          str(tmp_path)], 1)[0]
    assert f"{missing} is missing: it is incomplete" in message, message


def _load_error(argv, world_size) -> str:
    """This rank's CheckpointError on loading (every rank's, unlike launch's first failure)."""
    try:
        _train(argv, world_size)
    except ckpt.CheckpointError as error:
        return str(error)
    return "loaded"


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    launch(_train, 1, MODEL + ["--save", str(tmp_path), "--train-iters", "1"], 1)
    # Rank 0, which finds a file of its own, says what rank 1 (which finds none) says: the
    # layout and the converter command for this one, not the vocabulary padding TP brings.
    errors = launch(_load_error, 2, MODEL + ["--load", str(tmp_path),
                                             "--tensor-model-parallel-size", "2"], 2)
    assert errors[0] == errors[1], errors
    assert "saved with TP=1 PP=1" in errors[0] and "padded" not in errors[0]
    assert ("convert_ckpt.py --load-model-type mg --save-model-type mg "
            "--target-tensor-parallel-size 2 --target-pipeline-parallel-size 1") in errors[0]
    assert "--ckpt-format torch_dist" in errors[0]  # the way that keeps the optimizer state
    with pytest.raises(RuntimeError, match=r"hidden"):
        launch(_train, 1, MODEL + ["--load", str(tmp_path), "--hidden-size", "64"], 1)
    rank_file = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=r"model_optim_rng.pt is truncated or unreadable"):
        launch(_train, 1, MODEL + ["--load", str(tmp_path)], 1)


@pytest.mark.parametrize("saved,resumed", [("--use-distributed-optimizer", ""),
                                           ("", "--use-distributed-optimizer")])
def test_switching_the_distributed_optimizer_names_the_way_out(tmp_path, saved, resumed):
    """Its state (distrib_optim.pt) and the plain optimizer's do not load into each other:
    one error naming the flag and the torch_dist way, not megatron-core's KeyError;
    --no-load-optim resumes."""
    launch(_train, 1, MODEL + ["--save", str(tmp_path), "--train-iters", "1"] + saved.split(), 1)
    argv = MODEL + ["--load", str(tmp_path)] + resumed.split()
    side = "with" if saved else "without"
    with pytest.raises(RuntimeError, match=rf"saved {side} --use-distributed-optimizer.*"
                                           r"pass --no-load-optim.*--ckpt-format torch_dist"):
        launch(_train, 1, argv, 1)
    assert len(launch(_train, 1, argv + ["--no-load-optim"], 1)[0]) == 5  # iterations 2..6


def test_finetune_loads_weights_only(tmp_path):
    argv = MODEL + ["--save", str(tmp_path), "--exit-interval", "2"]
    _, _, saved = launch(_train_with_weights, 1, argv, 1)[0]
    losses, loaded, _ = launch(_train_with_weights, 1,
                               MODEL + ["--load", str(tmp_path), "--finetune"], 1)[0]
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    assert len(losses) == 6  # iteration counter and data restart at 0


def test_resumed_validation_continues_where_it_stopped(tmp_path):
    """2 data-parallel ranks through ``pretrain`` (in-process ranks; the same from torchrun:
    test_megatron_script.py): stopped at 3 and resumed == uninterrupted, validation line for
    validation line (the resumed run's evaluations continue the validation split where the
    stopped run's left off, as Megatron-LM's consumed_valid_samples), and the evaluation at
    the last iteration is the final one, not repeated."""
    from tests.training.test_launch import TINY

    argv = TINY + ["--global-batch-size", "8", "--train-iters", "6", "--log-interval", "1",
                   "--eval-interval", "2", "--eval-iters", "2"]

    def run(*flags):
        return launch(pretrain_records, 2, argv + list(flags))[-1][1]

    full = run()
    assert [(r["iteration"], r["split"]) for r in full] == [
        ("2", "validation"), ("4", "validation"), ("6", "validation"), ("6", "test")]
    assert len({r["lm loss value"] for r in full[:3]}) == 3
    stopped = run("--save", str(tmp_path), "--save-interval", "3", "--exit-interval", "3")
    resumed = run("--load", str(tmp_path))
    assert stopped + resumed == full


def _learning_rates(argv, world_size):
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    rates = [step["lr"] for step in trainer.train()]
    trainer.close()
    return rates


def _group_rates(argv, world_size):
    """The learning rate of every parameter group after the run's last step."""
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    trainer.train()
    rates = sorted(group["lr"] for group in trainer.optimizer.param_groups)
    trainer.close()
    return rates


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_resume_with_another_schedule_needs_a_choice(tmp_path, ckpt_format):
    """As Megatron-LM: a schedule flag that differs from the checkpoint's (here --lr) is an
    error naming it, not ignored (megatron-core's scheduler would keep the checkpoint's);
    --override-opt_param-scheduler follows this run's flags (the learning rates of an
    uninterrupted run with them), --use-checkpoint-opt_param-scheduler the checkpoint's."""
    argv = MODEL + ["--ckpt-format", ckpt_format]
    launch(_train, 1, argv + ["--save", str(tmp_path), "--exit-interval", "3"], 1)
    faster = argv + ["--load", str(tmp_path), "--lr", "2e-3"]
    with pytest.raises(RuntimeError, match=r"another learning-rate schedule: --lr: 0\.001 in the "
                                           r"checkpoint, 0\.002 in this run\. Pass --override"):
        launch(_learning_rates, 1, faster, 1)
    with pytest.raises(RuntimeError, match="exclusive"):
        launch(_learning_rates, 1, faster + ["--override-opt_param-scheduler",
                                             "--use-checkpoint-opt-param-scheduler"], 1)
    for flag, reference in (("--override-opt_param-scheduler", ["--lr", "2e-3"]),
                            ("--use-checkpoint-opt_param-scheduler", [])):
        resumed = launch(_learning_rates, 1, faster + [flag], 1)[0]
        uninterrupted = launch(_learning_rates, 1, argv + reference, 1)[0]
        assert resumed == uninterrupted[3:], flag
    assert len(set(uninterrupted[3:])) == 3  # the rates change: the comparison can fail


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_resume_in_another_precision(tmp_path, ckpt_format):
    """An fp32 checkpoint resumed with --bf16: its optimizer state (no fp32 main copies) does
    not fit, and the error says so and names --no-load-optim (megatron-core's KeyError
    otherwise); with it the weights load, rounded to bf16."""
    argv = MODEL + ["--ckpt-format", ckpt_format]
    _, _, saved = launch(_train_with_weights, 1, argv + ["--save", str(tmp_path),
                                                          "--exit-interval", "2"], 1)[0]
    resume = argv + ["--load", str(tmp_path), "--bf16"]
    with pytest.raises(RuntimeError, match=r"saved with fp32 \(no --bf16/--fp16\), this run has "
                                           r"--bf16: .* pass --no-load-optim"):
        launch(_train, 1, resume, 1)
    losses, loaded, _ = launch(_train_with_weights, 1, resume + ["--no-load-optim"], 1)[0]
    assert len(losses) == 4
    for name, tensor in saved.items():
        assert torch.equal(loaded[name].float(), tensor.to(torch.bfloat16).float()), name


def test_resume_with_another_decoupled_lr_needs_a_choice(tmp_path):
    """The rates megatron-core keeps per parameter group: another --decoupled-lr is an error too;
    --override-opt_param-scheduler follows it (an uninterrupted run's rates with it)."""
    argv = MODEL + ["--decoupled-lr", "2e-3"]
    launch(_train, 1, argv + ["--save", str(tmp_path), "--exit-interval", "3"], 1)
    other = MODEL + ["--decoupled-lr", "3e-3"]
    with pytest.raises(RuntimeError, match=r"other rates for a parameter group \(--decoupled-lr"
                                           r"/--decoupled-min-lr\): max_lr 0\.002.* in the "
                                           r"checkpoint, max_lr 0\.003"):
        launch(_learning_rates, 1, other + ["--load", str(tmp_path)], 1)
    # Iteration 5 of the decay over 6: the rates still tell 3e-3 from 2e-3.
    resumed = launch(_group_rates, 1, other + ["--load", str(tmp_path), "--train-iters", "5",
                                                "--override-opt_param-scheduler"], 1)[0]
    assert resumed == launch(_group_rates, 1, other + ["--train-iters", "5"], 1)[0]
    assert resumed != launch(_group_rates, 1, argv + ["--train-iters", "5"], 1)[0]


def test_a_resharded_checkpoint_resumes_the_data_where_it_stopped(tmp_path):
    """convert_ckpt.py to another TP keeps the iteration and the consumed samples (as
    Megatron-LM's converter, which reads and writes them in ``args``): the weights-only resume
    goes on with the samples the uninterrupted run takes next, so its first loss is that run's
    (dropout off; TP1 vs TP2 in float32 rounding)."""
    from megatron_ext.checkpoint.convert import convert

    argv = MODEL + ["--attention-dropout", "0", "--hidden-dropout", "0"]
    full = launch(_train, 1, argv, 1)[0]
    launch(_train, 1, argv + ["--save", str(tmp_path / "tp1"), "--exit-interval", "3"], 1)
    convert(["--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "mg",
             "--target-tensor-parallel-size", "2", "--load-dir", str(tmp_path / "tp1"),
             "--save-dir", str(tmp_path / "tp2")])
    resumed = launch(_train, 2, argv + ["--load", str(tmp_path / "tp2"), "--no-load-optim",
                                        "--no-load-rng", "--tensor-model-parallel-size", "2"], 2)[0]
    assert len(resumed) == 3
    assert resumed[0] == pytest.approx(full[3], rel=1e-5)
