"""One seed, one model, one loss curve: every parallel layout reproduces one process, from the CLI.

Everything runs as a user runs it: ``preprocess_data.py`` builds the shards,
``torchrun ... pretrain_gpt.py`` trains with real flags, the logged lm loss and grad norm are
read back from stdout, the final weights are gathered from the saved checkpoint (its TP shards
and PP stages merged into one state dict), ``convert_ckpt.py`` reshards checkpoints and converts
a ``transformers`` model. The vocabulary (NullTokenizer --vocab-size 299: 300 ids) is padded to
384 rows at TP=1 and 512 at TP=2 and TP=4, so the padding differs between layouts; the
documents are short (3-40 ids), so --reset-position-ids cuts every sample into several.
"""

import json
import random
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.sharding import merge_state_dicts
from tests.checkpoint.conftest import make_hf_model
from tests.launcher import ROOT, iteration_records, torchrun

VOCAB = 300  # NullTokenizer --vocab-size 299: ids 0..298 and EOD 299
ITERS = 3
MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 8 --group-query-attention "
    "--num-query-groups 4 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 32 "
    "--attention-dropout 0 --hidden-dropout 0 --tokenizer-type NullTokenizer --vocab-size 299 "
    "--split 100,0,0 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 1 "
    "--lr-decay-style constant --weight-decay 0.1 --log-interval 1 --eval-interval 0 "
    "--eval-iters 0 --distributed-backend gloo --ckpt-format torch"
).split()  # Megatron-LM's per-rank files: merged here and resharded by convert_ckpt.py
SEED = ["--seed", "7"]
RUN_TIMEOUT_S = 600
# Loss: relative (the bound; float32 summation order gives ~1e-7). Grad norm: as logged
# (4 decimals). Weights: absolute, after 3 Adam steps of lr 1e-3 on O(0.01..1) weights.
LOSS_RTOL = 1e-5
GRAD_NORM_ATOL = 2e-4
WEIGHT_ATOL = 2e-5

VARLEN = {"causal": [], "varlen": ["--reset-position-ids"]}
# Each layout runs once, in one attention mode; each parallel dimension (DP, TP, SP, PP) runs
# in both modes across the layouts. Varlen at TP+SP and PP is also proven per document and
# gradient by gradient in tests/model/test_varlen_model.py.
LAYOUTS = {
    "dp2": (2, "", "causal"),
    "tp2": (2, "--tensor-model-parallel-size 2", "causal"),
    "tp2-sp": (2, "--tensor-model-parallel-size 2 --sequence-parallel", "causal"),
    "pp4": (4, "--pipeline-model-parallel-size 4", "causal"),
    "pp2": (2, "--pipeline-model-parallel-size 2", "varlen"),
    "tp2-pp2-sp": (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--sequence-parallel", "varlen"),
    "dp2-tp2-distopt": (4, "--tensor-model-parallel-size 2 --use-distributed-optimizer",
                        "varlen"),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Short arithmetic-progression documents (learnable), through preprocess_data.py."""
    directory = tmp_path_factory.mktemp("repro_data")
    rng = random.Random(0)
    with open(directory / "corpus.jsonl", "w") as f:
        for _ in range(400):
            start, step, length = rng.randrange(299), rng.randrange(1, 7), rng.randrange(3, 40)
            ids = " ".join(str((start + step * k) % 299) for k in range(length))
            f.write(json.dumps({"text": ids}) + "\n")
    prefix = directory / "ints"
    subprocess.run(
        [sys.executable, "preprocess_data.py", "--input", str(directory / "corpus.jsonl"),
         "--output-prefix", str(prefix), "--tokenizer-type", "NullTokenizer", "--vocab-size",
         "299", "--append-eod", "--workers", "1"],
        cwd=ROOT, check=True, capture_output=True, text=True)
    return f"{prefix}_text_document"


def train(nproc, flags, shards, save=None):
    """[(lm loss, grad norm)] per iteration, and the merged final weights when ``save``."""
    args = MODEL + ["--data-path", shards, "--train-iters", str(ITERS)] + list(flags)
    if save is not None:
        args += ["--save", str(save)]
    result = torchrun(nproc, args, RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = iteration_records(result.stdout, ITERS)
    assert [it for it, _ in records] == list(range(1, ITERS + 1)), result.stdout[-3000:]
    curve = [(float(f["lm loss"]), float(f["grad norm"])) for _, f in records]
    return curve, (merged_weights(save) if save is not None else None)


def merged_weights(root):
    """The checkpoint's TP shards and PP stages as one TP1/PP1 state dict."""
    iteration = fmt.read_tracker(root)
    args = None
    for pp in (1, 2, 4):
        path = fmt.rank_file(root, iteration, 0, 0, pp)
        if path.exists():
            args = fmt.load_rank_file(path)["args"]
            break
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    shards = {(t, p): fmt.load_rank_file(fmt.rank_file(root, iteration, t, p, pp))["model"]
              for t in range(tp) for p in range(pp)}
    return merge_state_dicts(shards, num_layers=args.num_layers, swiglu=args.swiglu,
                             tied_embeddings=not args.untie_embeddings_and_output_weights)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The single-process run of each attention mode, trained once."""
    cache = {}

    def get(mode):
        if mode not in cache:
            save = tmp_path_factory.mktemp(f"ref_{mode}")
            cache[mode] = train(1, SEED + VARLEN[mode], shards, save) + (save,)
        return cache[mode]

    return get


def assert_same_curve(curve, ref_curve):
    assert [loss for loss, _ in curve] == pytest.approx([loss for loss, _ in ref_curve],
                                                        rel=LOSS_RTOL)
    assert [norm for _, norm in curve] == pytest.approx([norm for _, norm in ref_curve],
                                                        abs=GRAD_NORM_ATOL)


def assert_same_weights(weights, ref_weights):
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        tensor = weights[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            # Padded rows (384 at TP=1, 512 at TP=2) start at zero, get no gradient and no
            # weight decay: bit-unchanged after training.
            assert torch.count_nonzero(tensor[VOCAB:]) == 0, name
            assert torch.count_nonzero(ref[VOCAB:]) == 0, name
            tensor, ref = tensor[:VOCAB], ref[:VOCAB]
        torch.testing.assert_close(tensor, ref, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fresh_start_same_seed_matches_single_process(reference, shards, tmp_path, layout):
    nproc, flags, mode = LAYOUTS[layout]
    ref_curve, ref_weights, _ = reference(mode)
    curve, weights = train(nproc, SEED + VARLEN[mode] + flags.split(), shards, tmp_path / "ckpt")
    assert_same_curve(curve, ref_curve)
    assert_same_weights(weights, ref_weights)


def test_the_comparisons_can_fail(reference):
    """The control: the two references (same seed and data, documents isolated or not) fail
    both comparisons above."""
    causal, varlen = reference("causal"), reference("varlen")
    with pytest.raises(AssertionError):
        assert_same_curve(varlen[0], causal[0])
    with pytest.raises(AssertionError):
        assert_same_weights(varlen[1], causal[1])


def convert(*args):
    subprocess.run([sys.executable, "convert_ckpt.py", "--model-type", "GPT", *map(str, args)],
                   cwd=ROOT, check=True, capture_output=True, text=True)


def test_resharded_checkpoint_with_default_padding_gives_the_same_curve(reference, shards,
                                                                         tmp_path):
    """The single-process checkpoint (384 vocabulary rows) resharded to TP=2 (512 rows,
    --make-vocab-size-divisible-by 128 as default) trains on alike (resharding to TP=4, 512
    rows too, is bit-exact: tests/checkpoint/test_convert.py)."""
    ckpt = reference("causal")[2]
    finetune = ["--finetune"] + SEED
    ref_curve, _ = train(1, finetune + ["--load", ckpt], shards)
    out = tmp_path / "tp2"
    convert("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", ckpt,
            "--save-dir", out, "--target-tensor-parallel-size", 2,
            "--target-pipeline-parallel-size", 1)
    curve, _ = train(2, finetune + ["--load", out, "--tensor-model-parallel-size", 2], shards)
    assert_same_curve(curve, ref_curve)


def test_converted_hf_llama_loss_equals_transformers_loss(shards, tmp_path):
    """A transformers Llama (vocabulary 300) converted at TP=2 x PP=2 (512 rows): the lm loss
    of its first training batch (logged before the update) is transformers' loss on the same
    tokens, with --eod-mask-loss."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.config import parse_args
    from megatron_ext.training import data

    hf_dir = make_hf_model(tmp_path / "hf", vocab=VOCAB, seed=5)
    mg_dir = tmp_path / "mg"
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_dir,
            "--save-dir", mg_dir, "--target-tensor-parallel-size", 2,
            "--target-pipeline-parallel-size", 2)
    flags = ("--num-layers 4 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4 "
             "--group-query-attention --num-query-groups 2 --seq-length 32 "
             "--max-position-embeddings 2048 --position-embedding-type rope --rotary-base 50000 "
             "--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
             "--untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 "
             "--tokenizer-type NullTokenizer --vocab-size 299 --eod-mask-loss --split 100,0,0 "
             "--micro-batch-size 2 --global-batch-size 4 --train-iters 1 --lr 1e-4 "
             "--log-interval 1 --eval-interval 0 --eval-iters 0 --seed 3 "
             "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2").split()
    flags += ["--data-path", shards, "--load", str(mg_dir), "--finetune"]
    result = torchrun(4, flags, RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = float(iteration_records(result.stdout, 1)[0][1]["lm loss"])

    # The same first global batch (4 samples), built as the trainer builds it.
    config = parse_args(flags, world_size=4)
    train_ds = data.build_datasets(config, VOCAB - 1, VOCAB, [4, 0, 0])[0]
    samples = [train_ds[i] for i in range(4)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).double()
    assert 0 < mask.sum() < mask.numel()  # --eod-mask-loss masked some tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                     attn_implementation="eager")
    with torch.no_grad():
        logits = model(tokens).logits.double()

    def loss(logits):
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                      reduction="none")
        return float((per_token * mask).sum() / mask.sum())

    assert ours == pytest.approx(loss(logits), rel=LOSS_RTOL)
    # The control: 212 zero logits of padded rows in the softmax would have shown.
    padded = torch.nn.functional.pad(logits, (0, 512 - VOCAB))
    assert loss(padded) != pytest.approx(loss(logits), rel=100 * LOSS_RTOL)
