"""The interleaved (virtual) pipeline schedule computes what one process computes: model chunks
per pipeline rank (--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-
rank) run by megatron-core's interleaved 1F1B schedule start from the single process's weights,
give its losses, its gradients and its final weights; bad layouts are refused naming the flag.
Checkpoints of such runs: test_interleaved_checkpoints.py."""

import pytest
import torch
import torch.distributed as dist

import pretrain_gpt
from megatron_ext.checkpoint.sharding import merge_state_dicts
from megatron_ext.config import ConfigError, parse_args
from megatron_ext.training.trainer import Trainer
from tests.launcher import launch
from tests.training.test_parallel_equivalence import (BATCH, LOSS_RTOL, MODEL, TIED, VOCAB,
                                                      WEIGHT_ATOL, _VOCAB_ROWS)

VPP2 = "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1".split()


def _train_with_grads(argv, world_size):
    """(losses, grad norms, initial, final weights, last step's gradients, model chunks per
    rank); the state dicts full (TP1/PP1 names) on rank 0 only."""
    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    initial = trainer.full_state_dict()
    history = trainer.train()
    final = trainer.full_state_dict()
    # The last step's gradients stay in DDP's main_grad buffers until the next step.
    topo, local = trainer.topology, []
    if topo.dp_rank == 0:
        local = [((topo.tp_rank, topo.pp_rank, stage),
                  {name: param.main_grad.detach().cpu().clone()
                   for name, param in chunk.module.named_parameters()})
                 for stage, chunk in enumerate(trainer.model)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    grads = (merge_state_dicts(dict(entry for g in gathered for entry in g),
                               **trainer._shard_args()) if dist.get_rank() == 0 else None)
    chunks = len(trainer.model)
    trainer.close()
    return ([s["lm loss"] for s in history], [s["grad_norm"] for s in history], initial, final,
            grads, chunks)


def _assert_same(reference, run):
    ref_losses, ref_norms, ref_initial, ref_final, ref_grads, _ = reference
    losses, norms, initial, final, grads, _ = run
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    for name, tensor in ref_initial.items():  # layout-invariant initialization: bit-identical
        assert torch.equal(initial[name][:VOCAB], tensor[:VOCAB]), name
    assert final.keys() == ref_final.keys() and grads.keys() == ref_grads.keys()
    for name in ref_final:
        rows = slice(0, VOCAB) if name in _VOCAB_ROWS else slice(None)
        torch.testing.assert_close(final[name][rows], ref_final[name][rows], rtol=0,
                                   atol=WEIGHT_ATOL, msg=name)
        torch.testing.assert_close(grads[name][rows], ref_grads[name][rows], rtol=1e-4,
                                   atol=1e-6, msg=name)


@pytest.mark.parametrize("model, world_size, flags", [
    (MODEL, 2, VPP2),
    # Tied embeddings (chunk 0 of stage 0 and the last chunk of stage 1 share the gradient),
    # TP inside the chunks, the other flag.
    (TIED, 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
              "--num-virtual-stages-per-pipeline-rank 2 --sequence-parallel".split()),
    # Data parallel with the gradient all-reduce overlapped, each chunk's started by the
    # schedule (grad_sync_func); all-reduced, the last step's gradients are whole on each rank.
    (MODEL, 4, VPP2 + ["--overlap-grad-reduce"]),
])
def test_interleaved_schedule_matches_single_process(model, world_size, flags):
    reference = launch(_train_with_grads, 1, model + BATCH, 1)[0]
    runs = launch(_train_with_grads, world_size, model + BATCH + flags, world_size)
    assert [run[-1] for run in runs] == [2] * world_size  # two model chunks on every rank
    _assert_same(reference, runs[0])
    # The comparison can fail: gradients of another seed differ beyond the tolerances.
    other = launch(_train_with_grads, 1, _with(model, "--seed", "8") + BATCH, 1)[0]
    with pytest.raises(AssertionError):
        _assert_same(reference, other)


def _with(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize("flags, world_size, message", [
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3", 2,
     "--num-layers-per-virtual-pipeline-stage 3: the 2 layers of each pipeline stage"),
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 3", 2,
     "--num-virtual-stages-per-pipeline-rank 3: pipeline stage 0 holds 2 layers"),
    ("--num-virtual-stages-per-pipeline-rank 2", 1,
     "needs --pipeline-model-parallel-size > 1"),
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--num-layers-per-virtual-pipeline-stage 1", 2, "give one of them"),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
     "--decoder-first-pipeline-num-layers 1", 2, "--num-virtual-stages-per-pipeline-rank instead"),
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--no-overlap-p2p-communication", 2, "needs --pipeline-model-parallel-size > 2"),
    # 8 / (2 x DP 1) = 4 micro-batches: groups of 3 leave a last group of 1 < PP 2.
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--microbatch-group-size-per-virtual-pipeline-stage 3", 2, "leave a last group of 1"),
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--global-batch-size 2", 2, "between --pipeline-model-parallel-size 2 and the "),
])
def test_a_layout_the_schedule_cannot_run_names_the_flag(flags, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parse_args(MODEL + BATCH + flags.split(), world_size=world_size)


def test_interleaved_flags_without_virtual_stages_are_said_to_do_nothing():
    config = parse_args(MODEL + BATCH + "--pipeline-model-parallel-size 2 "
                        "--no-overlap-p2p-communication "
                        "--microbatch-group-size-per-virtual-pipeline-stage 2".split(),
                        world_size=2)
    said = [n for n in config.notices if "no effect without the interleaved schedule" in n]
    assert len(said) == 2 and config.parallel.virtual_stages == 1
