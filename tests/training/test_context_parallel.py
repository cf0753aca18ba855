"""Context parallelism trains what one process trains, in every layout it composes with.

Each sequence is split over the CP ranks (``--context-parallel-size``, ``--cp-comm-type
allgather``, ``a2a`` or ``p2p``, docs/context-parallel.md); the CP ranks of a DP replica read the same
micro-batch and the loss of each micro-batch is the mean over all its trained tokens. So the
loss curve, the trained token count, the gradient norm and the final weights must equal the
single-process run's up to float32 summation order, with and without document isolation.

The documents are short (1-40 tokens, arithmetic progressions: learnable) and sequences are 32
tokens, so at CP=4 (8 chunks of 4 tokens) documents shorter than a chunk, documents across
every chunk boundary and across CP ranks all occur. ``--eod-mask-loss`` with document isolation
masks each EOD label: the CP ranks of one micro-batch then train different token counts, which
is what the loss scaling (training/loss.py) is for. Micro-batch 2, global batch 8; a
validation batch at the last iteration and one after training (forward only).

The layout matrix runs in-process (tests/launcher.launch: four gloo ranks, one layout after the
other, to keep start-up costs low); from the command line, ``torchrun pretrain_gpt.py`` trains at
CP=2 with the distributed optimizer and checkpoints move between CP=2 and CP=1 in both formats:
torch_dist saved at CP=2 resumes at CP=1, torch saved at CP=1 resumes at CP=2, with the
losses the uninterrupted single process has.
"""

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron_ext.config import parse_args
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.training.trainer import Trainer
from tests.launcher import iteration_records, launch, torchrun

pytestmark = pytest.mark.usefixtures("tmp_cwd")  # dataset caches there

EOD = 299  # NullTokenizer --vocab-size 299
ITERS = 4
MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 32 "
    "--attention-dropout 0 --hidden-dropout 0 --tokenizer-type NullTokenizer --vocab-size 299 "
    "--split 90,10,0 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 1 "
    f"--clip-grad 1.0 --train-iters {ITERS} --log-interval 1 --eval-interval {ITERS} "
    "--eval-iters 1 "
    "--seed 7 --distributed-backend gloo"
).split()
MODES = {"causal": [], "varlen": ["--reset-position-ids", "--eod-mask-loss"]}
CP2 = ["--context-parallel-size", "2", "--cp-comm-type", "allgather"]
A2A = ["--context-parallel-size", "2", "--cp-comm-type", "a2a"]
# LoRA (tests/lora/) on the packed documents: the adapters alone train, at CP=2 x DP=2 too.
LORA = MODES["varlen"] + ("--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 "
                          "--lora-r 4 --lora-alpha 8 --lr 2e-2").split()
# Four ranks each; activation recomputation rides along with the pipeline layout.
LAYOUTS = {
    "cp4": ["--context-parallel-size", "4"],
    "cp2-tp2-sp": CP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "cp2-pp2-recompute": CP2 + ["--pipeline-model-parallel-size", "2",
                                "--recompute-granularity", "full", "--recompute-method",
                                "uniform"],
    "cp2-dp2-distopt": CP2 + ["--use-distributed-optimizer"],
    # Ulysses (2 query heads, 1 KV group per CP rank); per layer, mixed with allgather, over
    # two pipeline stages (each layer's scheme by its global number), the all-to-alls replayed
    # by recomputation.
    "a2a-cp2-dp2": A2A,
    "a2a-allgather-cp2-pp2-recompute": A2A + ["allgather", "allgather", "a2a",
                                              "--pipeline-model-parallel-size", "2",
                                              "--recompute-granularity", "full",
                                              "--recompute-method", "uniform"],
    # Ring attention over 4 CP ranks: the blocks pass three hops, validation (no grad) too.
    "p2p-cp4": ["--context-parallel-size", "4", "--cp-comm-type", "p2p"],
}
LOSS_RTOL = 1e-5  # float32 summation order gives ~1e-7
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 2e-5  # after 4 Adam steps of lr 1e-3 on O(0.02..1) weights
VOCAB = 300  # the padded vocabulary rows (384 at TP=1, 512 at TP=2) are left out
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("cp_data") / "ints_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(400):
            start, step, length = rng.integers(299), rng.integers(1, 7), rng.integers(1, 40)
            writer.add_document([int((start + step * k) % 299) for k in range(length)] + [EOD])
    return prefix


def _train_all(runs, world_size):
    """{name: (per-iteration (loss, tokens, grad norm), final TP1/PP1 weights on rank 0,
    validation loss after training)} of each (name, argv), trained one after the other on the
    same ranks."""
    results = {}
    for name, argv in runs:
        trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                          world_size=world_size)
        curve = [(s["lm loss"], s["trained_tokens"], s["grad_norm"]) for s in trainer.train()]
        results[name] = (curve, trainer.full_state_dict(), trainer.evaluate())
        trainer.close()
    return results


@pytest.fixture(scope="module")
def reference(shard):
    runs = [(mode, MODEL + ["--data-path", shard] + flags) for mode, flags in MODES.items()]
    return launch(_train_all, 1, runs + [("lora", MODEL + ["--data-path", shard] + LORA)], 1)[0]


@pytest.fixture(scope="module")
def layouts(shard):
    runs = [(f"{layout}-{mode}", MODEL + ["--data-path", shard] + flags + MODES[mode])
            for layout, flags in LAYOUTS.items() for mode in MODES]
    runs.append(("cp2-dp2-lora", MODEL + ["--data-path", shard] + CP2 + LORA))
    return launch(_train_all, 4, runs, 4)[0]  # rank 0 holds the gathered weights


def _assert_same_curve(curve, ref_curve):
    assert [tokens for _, tokens, _ in curve] == [tokens for _, tokens, _ in ref_curve]
    assert [loss for loss, _, _ in curve] == pytest.approx([l for l, _, _ in ref_curve],
                                                           rel=LOSS_RTOL)
    assert [g for _, _, g in curve] == pytest.approx([g for _, _, g in ref_curve],
                                                     rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_follows_the_single_process(reference, layouts, layout, mode):
    curve, final, valid = layouts[f"{layout}-{mode}"]
    ref_curve, ref_final, ref_valid = reference[mode]
    _assert_same_curve(curve, ref_curve)
    assert valid == pytest.approx(ref_valid, rel=LOSS_RTOL)  # forward-only, after training
    assert final.keys() == ref_final.keys()
    for name, tensor in ref_final.items():
        got = final[name]
        if name in _VOCAB_ROWS:
            got, tensor = got[:VOCAB], tensor[:VOCAB]
        torch.testing.assert_close(got, tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_lora_at_cp2_follows_the_single_process(reference, layouts):
    """LoRA at CP=2 x DP=2 on packed documents: the single-process LoRA run's curve, adapters
    and (bit-unchanged, frozen) base."""
    curve, final, valid = layouts["cp2-dp2-lora"]
    ref_curve, ref_final, ref_valid = reference["lora"]
    _assert_same_curve(curve, ref_curve)
    assert valid == pytest.approx(ref_valid, rel=LOSS_RTOL)
    adapters = [name for name in ref_final if ".lora_" in name]
    assert final.keys() == ref_final.keys() and adapters
    for name, tensor in ref_final.items():
        if ".lora_" in name:
            torch.testing.assert_close(final[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)
        else:
            assert torch.equal(final[name], tensor), name
    full = reference["varlen"][1]  # the comparison can fail: full training moves the base
    assert not torch.equal(full["output_layer.weight"], ref_final["output_layer.weight"])


def test_modes_differ(reference):
    """The comparison can fail: isolating documents changes the losses beyond the tolerance."""
    causal, varlen = ([loss for loss, _, _ in reference[m][0]] for m in ("causal", "varlen"))
    assert max(abs(a - b) / a for a, b in zip(causal, varlen)) > 50 * LOSS_RTOL, (causal, varlen)


def _cli(nproc, shard, flags):
    args = MODEL + ["--data-path", shard] + MODES["varlen"] + flags
    result = torchrun(nproc, args, RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = iteration_records(result.stdout, ITERS)
    return result.stdout, {it: (float(f["lm loss"]), float(f["grad norm"])) for it, f in records}


def test_cli_checkpoints_move_between_cp2_and_cp1(reference, shard, tmp_path):
    """torch_dist saved at CP=2 (distributed optimizer over its two CP ranks) resumes at CP=1;
    torch saved there resumes at CP=2; every logged iteration is the single process's."""
    ref = {i + 1: (loss, grad) for i, (loss, _, grad) in enumerate(reference["varlen"][0])}
    first, second = tmp_path / "cp2_dist", tmp_path / "cp1_torch"
    distopt = ["--use-distributed-optimizer"]
    stdout, run = _cli(2, shard, CP2 + distopt + ["--save", first, "--exit-interval", "2"])
    assert "TP 1 x PP 1 x CP 2 x DP 1" in stdout  # the start-up summary names the layout
    _, resumed = _cli(1, shard, distopt + ["--load", first, "--save", second, "--ckpt-format",
                                           "torch", "--exit-interval", "3"])
    _, back = _cli(2, shard, CP2 + distopt + ["--load", second])
    got = {**run, **resumed, **back}
    assert sorted(got) == list(range(1, ITERS + 1)), got  # each iteration logged once
    for it, (loss, grad) in got.items():
        assert loss == pytest.approx(ref[it][0], rel=LOSS_RTOL), it
        assert grad == pytest.approx(ref[it][1], abs=6e-4), it  # logged with 3 decimals
