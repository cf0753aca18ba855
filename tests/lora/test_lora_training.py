"""LoRA training follows one process in every layout, trains the adapters alone and resumes
exactly; its checkpoints hold the adapters and name their base.

The reference is the single-process LoRA run (conftest.py); TP=2 with sequence parallelism runs
from the command line (torchrun pretrain_gpt.py), PP=2 x DP=2 with the distributed optimizer on
in-process ranks.
"""

import shutil

import pytest
import torch
from torch.distributed import checkpoint as dcp

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.sharding import merge_state_dicts
from megatron_ext.config import ConfigError, parse_args
from megatron_ext.generation import cli as generation
from megatron_ext.model.lora import is_adapter, merge_into
from tests.launcher import iteration_records, launch, torchrun
from tests.checkpoint.conftest import hf_state_dict, run_convert
from tests.lora.conftest import ITERS, LORA, MODEL, TRAIN, VOCAB, lora_run

LOSS_RTOL = 1e-5
# Adam (lr 2e-2) turns float32 summation-order differences of near-zero gradients into update
# differences of up to ~1e-5 after 4 steps; a sharding error moves whole rows by ~1e-2.
ADAPTER_ATOL = 5e-5


def _adapters(state):
    return {k: v for k, v in state.items() if is_adapter(k)}


def _assert_base_unchanged(state, reference):
    """The weights the single-process run loaded from the base, bit for bit."""
    weights = {k: v for k, v in reference["initial"].items() if not is_adapter(k)}
    frozen = {k: v for k, v in state.items() if not is_adapter(k)}
    assert frozen.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(frozen[name], tensor), name


def _assert_adapters_close(got, want):
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=ADAPTER_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_single_process_trains_the_adapters_alone(reference, hf_base):
    """The base (the HF model's weights) is bit-unchanged, every adapter moved (B from zero),
    the loss went down, and the summary reports the adapters and their Adam state (two fp32
    moments each)."""
    embedding = hf_state_dict(hf_base)["model.embed_tokens.weight"]
    assert torch.equal(reference["initial"]["embedding.word_embeddings.weight"][:VOCAB], embedding)
    _assert_base_unchanged(reference["final"], reference)
    initial, final = _adapters(reference["initial"]), _adapters(reference["final"])
    assert len(final) == 4 * 4 * 2  # 4 layers x 4 targets x (A, B)
    for name, tensor in initial.items():
        if ".lora_B." in name:
            assert torch.count_nonzero(tensor) == 0, name
        assert not torch.equal(final[name], tensor), name
    assert reference["losses"][-1] < reference["losses"][0]
    trainable = sum(t.numel() for t in final.values())
    line = next(line for line in reference["summary"] if line.startswith("trainable"))
    assert f"({trainable}) of" in line and f"({8 * trainable} bytes)" in line


def test_tp2_sequence_parallel_from_the_command_line(reference, base, tmp_path):
    """torchrun pretrain_gpt.py at TP=2 + SP: the loss curve and the adapters of one process; the
    torch-format checkpoint holds the adapters alone (each rank its shard) and names its base;
    convert_ckpt.py merges it into the base at another layout; generate_gpt.py at another layout
    says how to load it."""
    save = tmp_path / "tp2"
    args = MODEL + TRAIN + LORA + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--load", base, "--save", save, "--ckpt-format", "torch"]
    result = torchrun(2, args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(r["lm loss"]) for _, r in iteration_records(result.stdout, ITERS)]
    assert losses == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    shards, metadata = {}, None
    for tp in range(2):
        payload = fmt.load_rank_file(fmt.rank_file(save, ITERS, tp, 0, 1))
        assert all(is_adapter(k) for k in payload["model"]), "base weights saved"
        shards[(tp, 0)] = payload["model"]
        metadata = payload["lora"]
    merged = merge_state_dicts(shards, num_layers=4, swiglu=True, tied_embeddings=False)
    _assert_adapters_close(merged, _adapters(reference["final"]))
    assert metadata["base_load"] == str(base) and metadata["base_iteration"] == 1
    assert (metadata["lora_r"], metadata["lora_alpha"]) == (4, 8)
    # convert_ckpt.py merges these TP=2 adapters into the base, written at TP=1 x PP=2.
    out = tmp_path / "merged"
    run_convert("mg", "mg", base, out, "--lora-load", save,
                "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 2)
    written = merge_state_dicts(
        {(0, pp): fmt.load_rank_file(fmt.rank_file(out, fmt.read_tracker(out), 0, pp, 2))["model"]
         for pp in range(2)}, num_layers=4, swiglu=True, tied_embeddings=False)
    base_weights = {k: v for k, v in reference["initial"].items() if not is_adapter(k)}
    expected = merge_into(base_weights, merged, 8 / 4)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(expected["decoder.layers.0.mlp.linear_fc2.weight"],
                           base_weights["decoder.layers.0.mlp.linear_fc2.weight"])
    # Generation at TP=1 cannot load them (torch format): the error names the layout and ways.
    with pytest.raises(RuntimeError, match=r"saved at TP=2 PP=1, this run has TP=1 PP=1; "
                                           r"launch with --tensor-model-parallel-size 2"):
        launch(generation.main, 1, ["--load", str(base), "--lora-load", str(save),
                                    "--tensor-model-parallel-size", "1", "--tokenizer-type",
                                    "NullTokenizer", "--vocab-size", str(VOCAB - 1),
                                    "--max-new-tokens", "1", "--prompt", "1 2"])


def test_pp2_dp2_distributed_optimizer(reference, base):
    """PP=2 x DP=2 with the distributed optimizer: the same curve and adapters, the base
    bit-unchanged on every stage."""
    argv = MODEL + TRAIN + LORA + ["--pipeline-model-parallel-size", "2",
                                   "--use-distributed-optimizer", "--load", str(base)]
    losses, _, final, _ = launch(lora_run, 4, argv, 4)[0]
    assert losses == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    _assert_base_unchanged(final, reference)
    _assert_adapters_close(_adapters(final), _adapters(reference["final"]))


def test_uneven_pp2(reference, base):
    """PP=2 with 1 layer on the first stage and 3 on the last: the adapters (named by their
    global layer) train as in one process, the base bit-unchanged."""
    argv = MODEL + TRAIN + LORA + ["--pipeline-model-parallel-size", "2",
                                   "--decoder-first-pipeline-num-layers", "1", "--load", str(base)]
    losses, _, final, _ = launch(lora_run, 2, argv, 2)[0]
    assert losses == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    _assert_base_unchanged(final, reference)
    _assert_adapters_close(_adapters(final), _adapters(reference["final"]))


def test_torch_dist_checkpoint_holds_the_adapters_alone(reference):
    keys = dcp.FileSystemReader(str(fmt.iteration_dir(reference["save"], ITERS))) \
        .read_metadata().state_dict_metadata
    tensors = [k for k in keys if not k.startswith(("rng_state", "optimizer.state.step"))]
    assert tensors and all(".lora_" in k for k in tensors), tensors


@pytest.mark.parametrize("ckpt_format,extra,world", [
    ("torch_dist", [], 1),
    ("torch", ["--use-distributed-optimizer"], 2),
])
def test_resume_with_lora_load_is_exact(reference, base, tmp_path, ckpt_format, extra, world):
    """Resumed from the iteration-2 checkpoint of a 4-iteration run (--save-interval 2) with
    --load BASE --lora-load: that run's last losses and adapters, bit for bit."""
    flags = MODEL + TRAIN + LORA + ["--load", str(base), "--ckpt-format", ckpt_format] + extra
    if world == 1:
        whole, saved = reference, reference["save"]
    else:
        saved = tmp_path / "whole"
        whole = dict(zip(("losses", "initial", "final"), launch(
            lora_run, world, flags + ["--save", str(saved), "--save-interval", "2"], world)[0]))
    resume = tmp_path / "resume"  # the iteration-2 checkpoint alone
    shutil.copytree(fmt.iteration_dir(saved, 2), fmt.iteration_dir(resume, 2))
    fmt.write_tracker(resume, 2)
    losses, _, final, _ = launch(lora_run, world, flags + ["--lora-load", str(resume)], world)[0]
    assert losses == whole["losses"][2:]
    for name, tensor in whole["final"].items():
        assert torch.equal(final[name], tensor), name
    if ckpt_format == "torch":
        # Its adapters load at TP=1 PP=1 only (torch_dist reshards): the error names the way.
        with pytest.raises(RuntimeError, match=r"saved with TP=1 PP=1 .* --ckpt-format torch_dist"):
            launch(lora_run, 2, flags + ["--lora-load", str(resume),
                                         "--tensor-model-parallel-size", "2"], 2)


def test_flag_errors_name_the_flag():
    base = MODEL + TRAIN
    cases = [(["--lora-target-modules", "q_proj"], "--lora-target-modules q_proj"),
             (["--lora-load", "x"], "--lora-load needs --lora-target-modules"),
             (LORA + ["--lora-r", "0"], "--lora-r 0"),
             (LORA + ["--qlora"], "--qlora: QLoRA"),
             (LORA + ["--load", "ckpt", "--save", "ckpt/"],
              r"--save ckpt/ is the --load directory \(the LoRA base\)")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_args(base + extra, world_size=1)


def test_lora_load_checks_the_checkpoint(reference, base):
    """A different --lora-r than the adapters', or adapters passed as --load, stop with the
    flag to change."""
    argv = MODEL + TRAIN + LORA
    with pytest.raises(RuntimeError, match="trained with --lora-r 4, this run has 8"):
        launch(lora_run, 1, argv + ["--lora-r", "8", "--load", str(base), "--lora-load",
                                    str(reference["save"])], 1)
    with pytest.raises(RuntimeError, match="pass it as --lora-load"):
        launch(lora_run, 1, argv + ["--load", str(reference["save"])], 1)
    with pytest.raises(RuntimeError, match="trained with --lora-target-modules linear_qkv "
                       "linear_proj linear_fc1 linear_fc2, this run has linear_qkv; use the same"):
        launch(lora_run, 1, argv + ["--lora-target-modules", "linear_qkv", "--load", str(base),
                                    "--lora-load", str(reference["save"])], 1)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_lora_checkpoint_as_load_without_lora_flags_says_how(reference, base, tmp_path,
                                                             ckpt_format):
    """Adapters given as --load to a run without --lora-* flags: an error naming the flags
    they were trained with and the two ways on (resume as LoRA, or merge), not megatron-core's
    state-dict mismatch (torch_dist) or missing keys (torch)."""
    adapters = reference["save"]
    if ckpt_format == "torch":
        adapters = tmp_path / "torch"
        launch(lora_run, 1, MODEL + TRAIN + LORA + [
            "--load", str(base), "--ckpt-format", "torch", "--save", str(adapters),
            "--train-iters", "2"], 1)
    with pytest.raises(RuntimeError, match=r"--load: .* is a LoRA checkpoint .*trained with "
                       r"--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 "
                       r"--lora-r 4 --lora-alpha 8.* --lora-load .*convert_ckpt.py"):
        launch(lora_run, 1, MODEL + TRAIN + ["--load", str(adapters)], 1)


def test_full_recomputation_trains_the_adapters(reference):
    """Checkpointed layers behind a frozen embedding: the adapters inside still get their
    gradients (the same run, bit for bit)."""
    argv = MODEL + TRAIN + LORA + ["--load", str(reference["base"]), "--recompute-granularity",
                                   "full", "--recompute-method", "uniform",
                                   "--recompute-num-layers", "1"]
    losses, _, final, _ = launch(lora_run, 1, argv, 1)[0]
    assert losses == reference["losses"]
    for name, tensor in _adapters(reference["final"]).items():
        assert torch.equal(final[name], tensor), name


def test_bf16_weights_only_load_keeps_the_loaded_adapters(base, tmp_path):
    """--bf16 --lora-load --finetune (torch format): the optimizer's fp32 main copies follow the
    loaded adapters (else the first step writes the fresh ones back); lr 0 keeps them."""
    save = str(tmp_path / "bf16")
    flags = MODEL + TRAIN + LORA + ["--bf16", "--ckpt-format", "torch", "--load", str(base)]
    saved = launch(lora_run, 1, flags + ["--save", save, "--train-iters", "2"], 1)[0][2]
    after = launch(lora_run, 1, flags + ["--lora-load", save, "--finetune", "--train-iters", "1",
                                         "--lr", "0", "--lr-warmup-iters", "0"], 1)[0][2]
    for name, tensor in _adapters(saved).items():
        assert torch.equal(after[name], tensor), name


def test_torch_dist_adapters_resume_in_another_layout(reference, base, tmp_path):
    """Adapters saved at TP=2 (torch_dist) resume at TP=1 x PP=2 (the base from --load
    resharded too): the uninterrupted TP=2 run's last losses and adapters, within float32
    rounding (RNG states are per TP/PP rank; there is no dropout to draw)."""
    save = tmp_path / "tp2"
    flags = MODEL + TRAIN + LORA + ["--load", str(base)]
    whole = launch(lora_run, 2, flags + ["--tensor-model-parallel-size", "2", "--save",
                                         str(save), "--save-interval", "2"], 2)[0]
    resume = tmp_path / "resume"  # the iteration-2 checkpoint alone
    shutil.copytree(fmt.iteration_dir(save, 2), fmt.iteration_dir(resume, 2))
    fmt.write_tracker(resume, 2)
    losses, _, final, _ = launch(lora_run, 2, flags + [
        "--pipeline-model-parallel-size", "2", "--lora-load", str(resume)], 2)[0]
    assert losses == pytest.approx(whole[0][2:], rel=LOSS_RTOL)
    _assert_adapters_close(_adapters(final), _adapters(whole[2]))

