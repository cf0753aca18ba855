"""Megatron-LM training flags keep their numbers: per-micro-batch vs per-token loss averaging
against a direct computation; overlapped gradient reduce / parameter gather, and the
sample-based schedule, against the runs without them; bf16 gradient reduction within bf16
rounding of the fp32 reduction; a SIGTERM under --exit-signal-handler saves and stops, and the
resume continues the uninterrupted run's curve."""

import os
import signal

import pytest
import torch
import torch.distributed as dist

import pretrain_gpt
from megatron_ext.config import parse_args
from megatron_ext.training import data
from megatron_ext.training.trainer import Trainer
from tests.launcher import launch
from tests.training.test_checkpointing import _train, _train_with_weights

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--attention-dropout 0 --hidden-dropout 0 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 127 --lr 1e-3 --log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 5"
).split()


def _grads_and_references(argv, world_size):
    """(main_grad of every parameter after one global batch, the gradients of Megatron-LM's
    two averages computed directly from the samples of that batch)."""
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size)
    module = trainer.model[0].module
    params = [p for p in module.parameters() if p.requires_grad]
    gbs = config.training.global_batch_size

    def sums_and_counts():  # the first global batch: samples 0 .. gbs-1
        sums, counts = [], []
        for index in range(gbs):
            sample = trainer.train_ds[index]
            loss = module(sample["tokens"][None], sample["position_ids"][None], None,
                          labels=sample["labels"][None])
            mask = sample["loss_mask"][None].float()
            sums.append((loss.float() * mask).sum())
            counts.append(mask.sum())
        return sums, counts

    # A fresh forward per average: megatron-core's cross entropy works in place on the logits.
    sums, counts = sums_and_counts()
    references = {"per_token": torch.autograd.grad(sum(sums) / sum(counts), params)}
    sums, counts = sums_and_counts()
    references["per_micro_batch"] = torch.autograd.grad(
        sum(s / c for s, c in zip(sums, counts)) / gbs, params)
    iterator = data.data_iterator(trainer.train_ds, 0, config.training.micro_batch_size,
                                  trainer.topology.dp_rank, trainer.topology.data_parallel)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer._forward_backward(iterator, forward_only=False)
    grads = [p.main_grad.detach().clone() for p in params]
    trainer.close()
    return grads, {k: [g.detach() for g in v] for k, v in references.items()}


@pytest.mark.parametrize("per_token", [False, True])
def test_loss_averaging_follows_calculate_per_token_loss(per_token):
    # 2 DP ranks x 2 micro-batches of one sample; EODs masked, so samples have different
    # token counts and the two averages differ.
    argv = TINY + "--micro-batch-size 1 --global-batch-size 4 --eod-mask-loss".split()
    if per_token:
        argv.append("--calculate-per-token-loss")
    for grads, references in launch(_grads_and_references, 2, argv, 2):
        expected = references["per_token" if per_token else "per_micro_batch"]
        other = references["per_micro_batch" if per_token else "per_token"]
        assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, other))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


BATCH = "--micro-batch-size 2 --global-batch-size 8 --lr-decay-style cosine".split()


def _run(world_size, flags):
    losses, _, final = launch(_train_with_weights, world_size, TINY + BATCH + flags.split(),
                              world_size)[0]
    return losses, final


def _assert_same(run, reference, rtol=0.0, atol=0.0):
    assert run[0] == pytest.approx(reference[0], rel=rtol, abs=atol)
    for name, tensor in reference[1].items():
        torch.testing.assert_close(run[1][name], tensor, rtol=rtol, atol=atol, msg=name)


def test_overlapped_grad_reduce_and_param_gather_keep_the_run():
    base = "--use-distributed-optimizer --train-iters 4"
    reference = _run(2, base)
    _assert_same(_run(2, base + " --overlap-grad-reduce --overlap-param-gather"), reference,
                 rtol=1e-6, atol=1e-7)


def test_sample_based_schedule_equals_the_iteration_based_one():
    reference = _run(1, "--train-iters 5 --lr-decay-iters 4 --lr-warmup-iters 2")
    _assert_same(_run(1, "--train-samples 40 --lr-decay-samples 32 --lr-warmup-samples 16"),
                 reference)


def test_grad_reduce_in_bf16_stays_within_bf16_rounding():
    base = "--bf16 --train-iters 3"
    reference = _run(2, base)
    run = _run(2, base + " --grad-reduce-in-bf16")
    # bf16 keeps 8 bits of mantissa: relative rounding 2^-8 per reduced gradient.
    assert run[0] == pytest.approx(reference[0], rel=2 ** -7)


def _model_flags_and_exit_duration(argv, save):
    config = parse_args(argv + ["--save", save], world_size=1)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=1)
    module = trainer.model[0].module
    norm = module.decoder.layers[0].input_layernorm
    x = torch.randn(3, 32)
    # Megatron-LM's 1p norm with weight w is the plain norm with weight 1 + w.
    with torch.no_grad():
        initial = norm.weight.clone()
        norm.weight.normal_()
        plain = torch.nn.RMSNorm(32, eps=norm.eps)
        plain.weight.copy_(norm.weight + 1)
        same_output = torch.allclose(norm(x), plain(x))
    rotary_dims = 2 * module.rotary_pos_emb.inv_freq.numel()
    with torch.no_grad():
        norm.weight.copy_(initial)
    # --exit-duration-in-mins 1, one minute already spent: save and stop after the first step.
    trainer.exits.start_time -= 61
    steps = len(trainer.train())
    trainer.close()
    return bool((initial == 0).all()), same_output, rotary_dims, steps


def test_rotary_percent_layernorm_1p_and_exit_duration(tmp_path):
    argv = TINY + ("--micro-batch-size 2 --train-iters 5 --apply-layernorm-1p "
                   "--rotary-percent 0.5 --exit-duration-in-mins 1").split()
    zero_init, same_output, rotary_dims, steps = launch(_model_flags_and_exit_duration, 1, argv,
                                                        str(tmp_path))[0]
    assert zero_init and same_output
    assert rotary_dims == 8 // 2  # head size 32 / 4 = 8, half of it rotated
    assert steps == 1
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def _terminated_on_rank_1(argv, world_size):
    """Trains after a real SIGTERM to rank 1 alone (a scheduler's, during the first step):
    (losses, whether the run stopped early)."""
    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    losses = [step["lm loss"] for step in trainer.train()]
    exited = trainer.exited
    trainer.close()
    return losses, exited


def test_sigterm_with_exit_signal_handler_saves_exits_and_resumes(tmp_path):
    """Megatron-LM's --exit-signal-handler: the signal to one rank stops every rank after the
    iteration, with a checkpoint of it; the resumed curve is the uninterrupted one."""
    argv = TINY + "--micro-batch-size 2 --global-batch-size 4 --train-iters 3".split()
    uninterrupted = launch(_train, 2, argv, 2)[0]
    stopped = launch(_terminated_on_rank_1, 2, argv + ["--save", str(tmp_path),
                                                      "--exit-signal-handler"], 2)
    assert [(len(losses), exited) for losses, exited in stopped] == [(1, True), (1, True)]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    resumed = launch(_train, 2, argv + ["--load", str(tmp_path)], 2)[0]
    assert stopped[0][0] + resumed == uninterrupted
