"""Packed instruction training equals training the conversations one by one.

Conversations are preprocessed twice by preprocess_data.py (packed into samples of
``--seq-length + 1`` tokens, and one per document). The reference takes every conversation
alone through a plain model (batch 1, no padding, plain causal attention, positions from 0),
sums its per-token loss over the assistant tokens and divides by their count: the loss and
gradient of per-token averaging. The runs under test go through the product path: ``Trainer``
+ ``pretrain_gpt.forward_step`` + megatron-core's schedule, one global batch that holds every
packed sample once; their loss and gradients (``main_grad`` after megatron-core's
``finalize_model_grads``, TP shards and PP stages merged back) must equal the reference, on one
process, with TP=2 + SP, PP=2, DP=2 and CP=2 (gloo), all from the same initial weights.
"""

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

import pretrain_gpt
from megatron_ext.checkpoint.sharding import merge_state_dicts
from megatron_ext.config import parse_args
from megatron_ext.data.indexed import IndexedDatasetReader
from megatron_ext.data.instruct.pipeline import output_prefixes
from megatron_ext.data.cli import main as preprocess_main
from megatron_ext.training import data as training_data
from megatron_ext.training.trainer import Trainer
from megatron_ext.parallel import ParallelTopology
from tests.launcher import launch
from tests.sft.reference import conversation_loss, single_process_model

pytestmark = pytest.mark.usefixtures("tmp_cwd")  # dataset caches there

SEQ = 128
PACKED_ROWS = 8  # the global batch: every packed sample once
NUM_LAYERS = 2
MODEL = (
    f"--num-layers {NUM_LAYERS} --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 "
    "--hidden-dropout 0 --make-vocab-size-divisible-by 64 --attention-backend sdpa "
    f"--seq-length {SEQ} --lr 1e-3 --train-iters 1 --log-interval 1 --eval-interval 1000 "
    "--eval-iters 0 --split 100,0,0 --seed 11 --is-instruction-dataset --calculate-per-token-loss"
).split()
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-6  # gradients are up to ~0.4; float32 differences ~1e-7


def _records(count, seed=3):
    rng = random.Random(seed)
    words = lambda: rng.choice("abcdefgh") + "".join(  # noqa: E731
        rng.choice("abcdefgh ") for _ in range(rng.randint(0, 5)))
    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": "hi"}] if rng.random() < 0.3 else []
        for _ in range(2 if rng.random() < 0.3 else 1):
            messages += [{"role": "user", "content": words()},
                         {"role": "assistant", "content": words()}]
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory, char_tokenizer_dir):
    directory = tmp_path_factory.mktemp("packed_training")
    path = directory / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(31)))
    common = ["--input", str(path), "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", char_tokenizer_dir, "--handler-name",
              "OpenAIStyleInstructionHandler", "--prompt-type", "mftcoder",
              "--seq-length", str(SEQ), "--log-interval", "0"]
    preprocess_main(common + ["--output-prefix", str(directory / "packed"), "--pack"])
    preprocess_main(common + ["--output-prefix", str(directory / "single")])
    ids, mask = (IndexedDatasetReader(p) for p in output_prefixes(str(directory / "single")))
    conversations = [(ids.document(i).astype(np.int64), mask.document(i).astype(np.int64))
                     for i in range(ids.num_documents)]
    packed = IndexedDatasetReader(output_prefixes(str(directory / "packed"))[0])
    assert packed.num_documents == PACKED_ROWS, "the records no longer pack into 8 samples"
    assert len(packed) - PACKED_ROWS <= len(conversations) <= len(packed)  # + padding sequences
    argv = MODEL + ["--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", char_tokenizer_dir]
    return dict(argv=argv, packed=str(directory / "packed"), single=str(directory / "single"),
                conversations=conversations)


def _gathered_grads(trainer):
    """main_grad of every parameter, TP/PP shards merged (TP1/PP1 names), on global rank 0."""
    topo = trainer.topology
    local = []
    if topo.dp_rank == 0:
        local = [((topo.tp_rank, topo.pp_rank, stage),
                  {name: p.main_grad.detach().clone()
                   for name, p in chunk.module.named_parameters()})
                 for stage, chunk in enumerate(trainer.model)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None
    return merge_state_dicts(dict(entry for g in gathered for entry in g),
                             **trainer._shard_args())


def _one_global_batch(argv, world_size, init_state_dict):
    """Forward and backward over one global batch through the Trainer's schedule."""
    config = parse_args(argv, world_size=world_size)
    trainer = Trainer(config, pretrain_gpt.forward_step, world_size=world_size,
                      init_state_dict=init_state_dict)
    initial = trainer.full_state_dict()
    t, topo = config.training, trainer.topology
    assert len(trainer.train_ds) == t.global_batch_size
    iterator = training_data.per_chunk(len(trainer.model), lambda: training_data.data_iterator(
        trainer.train_ds, 0, t.micro_batch_size, topo.dp_rank, topo.data_parallel))
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
        chunk.train()
    loss, tokens = trainer._forward_backward(iterator, forward_only=False)
    per_task = {} if trainer.multitask is None else {  # multi-task data (test_multitask.py)
        name: (trainer.task_totals[0, i] / trainer.task_totals[1, i]).item()
        for i, name in enumerate(trainer.multitask.names) if trainer.task_totals[1, i]}
    grads = _gathered_grads(trainer)
    trainer.close()
    return loss, tokens, grads, initial, per_task


def _one_by_one(argv, conversations, state):
    """The reference: each conversation alone, plain causal attention, per-token average."""
    model = single_process_model(argv, state)
    total, count = torch.zeros(()), 0
    for ids, mask in conversations:
        loss, tokens = conversation_loss(model, ids, mask)
        total, count = total + loss, count + tokens
    total.backward()
    grads = {name: p.grad / count for name, p in model.named_parameters()}
    # Control: the packed rows without their boundaries (plain causal over each row).
    model.zero_grad(set_to_none=True)
    unbounded = _unbounded(model, argv)
    ParallelTopology.destroy()
    return (total / count).item(), count, grads, unbounded


def _unbounded(model, argv):
    prefix = argv[argv.index("--data-path") + 1]
    ids, mask = (IndexedDatasetReader(p) for p in output_prefixes(prefix))
    total, count = torch.zeros(()), 0
    for i in range(ids.num_documents):
        row = torch.from_numpy(ids.document(i).astype(np.int64))
        row_mask = torch.from_numpy(mask.document(i).astype(np.float32))
        loss = model(row[:-1][None], torch.arange(SEQ)[None], None, labels=row[1:][None])
        total = total + (loss[0] * row_mask[1:]).sum()
        count += int(row_mask[1:].sum())
    total.backward()
    return (total / count).item(), {name: p.grad / count for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single(data):
    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "2",
                           "--global-batch-size", str(PACKED_ROWS)]
    return launch(_one_global_batch, 1, argv, 1, None)[0]


@pytest.fixture(scope="module")
def reference(data, single):
    argv = data["argv"] + ["--data-path", data["packed"]]
    return launch(_one_by_one, 1, argv, data["conversations"], single[3])[0]


def _assert_same(run, reference):
    loss, tokens, grads = run[:3]
    ref_loss, ref_tokens, ref_grads = reference[:3]
    assert tokens == ref_tokens
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=GRAD_ATOL, msg=name)


def test_packed_batch_equals_conversations_one_by_one(single, reference):
    _assert_same(single, reference)
    # The comparison can fail: without the boundaries, conversations attend to each other.
    unbounded_loss, unbounded_grads = reference[3]
    assert abs(unbounded_loss - reference[0]) > 20 * LOSS_RTOL * reference[0]
    assert max((unbounded_grads[n] - g).abs().max() for n, g in reference[2].items()) \
        > 100 * GRAD_ATOL


def test_unpacked_dataset_with_one_conversation_per_sample(data, single, reference):
    """Without --pack each sample is one conversation plus padding (its own segment)."""
    n = len(data["conversations"])
    argv = data["argv"] + ["--data-path", data["single"], "--micro-batch-size", "1",
                           "--global-batch-size", str(n)]
    _assert_same(launch(_one_global_batch, 1, argv, 1, single[3])[0], reference)


TOPOLOGIES = {
    "tp2-sp": (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    "pp2": (2, "--pipeline-model-parallel-size 2"),
    "dp2": (2, ""),
    # Each packed row split over two CP ranks: conversations cross the chunk boundaries.
    "cp2": (2, "--context-parallel-size 2"),
    "tp2-pp2-sp": (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--sequence-parallel"),
}


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_parallel_packed_batch_equals_one_by_one(data, single, reference, name):
    world_size, flags = TOPOLOGIES[name]
    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "2",
                           "--global-batch-size", str(PACKED_ROWS)] + flags.split()
    _assert_same(launch(_one_global_batch, world_size, argv, world_size, single[3])[0], reference)
