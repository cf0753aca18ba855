"""Round trips: HF -> Megatron -> HF is bit-exact and loadable; tp/pp resharding is lossless."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.args import check_compatible, model_args_namespace
from megatron_ext.checkpoint.sharding import merge_state_dicts
from tests.checkpoint.conftest import VOCAB, hf_state_dict, run_convert

ROOT = Path(__file__).resolve().parents[2]


def load_megatron(root):
    """{(tp, pp): model state dict}, the args and the iteration of a Megatron checkpoint."""
    iteration = fmt.read_tracker(root)
    first = fmt.load_rank_file(fmt.rank_file(root, iteration, 0, 0, 1)) \
        if fmt.rank_file(root, iteration, 0, 0, 1).exists() \
        else fmt.load_rank_file(fmt.rank_file(root, iteration, 0, 0, 2))
    args = first["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    shards = {(t, p): fmt.load_rank_file(fmt.rank_file(root, iteration, t, p, pp))["model"]
              for t in range(tp) for p in range(pp)}
    return shards, args, iteration


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_hf_to_megatron_layout_and_args(hf_llama, tmp_path):
    out = run_convert("hf", "mg", hf_llama, tmp_path / "mg", "--target-tensor-parallel-size", 2,
                      "--target-pipeline-parallel-size", 2, "--model-type-hf", "llama2")
    assert (out / fmt.TRACKER_FILENAME).read_text().strip() == "1"
    names = sorted(p.name for p in (out / "iter_0000001").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    payload = fmt.load_rank_file(fmt.rank_file(out, 1, 1, 1, 2))
    assert payload["checkpoint_version"] == 3.0 and payload["iteration"] == 1
    args = payload["args"]
    expected = dict(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                    group_query_attention=True, num_query_groups=2, kv_channels=16,
                    position_embedding_type="rope", rotary_base=50000, normalization="RMSNorm",
                    norm_epsilon=1e-6, swiglu=True, untie_embeddings_and_output_weights=True,
                    add_bias_linear=False, disable_bias_linear=True, add_qkv_bias=False,
                    tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                    make_vocab_size_divisible_by=128, padded_vocab_size=256, vocab_size=VOCAB,
                    params_dtype=torch.float32, bf16=False, fp16=False, hf_model_type="llama2")
    assert {k: getattr(args, k) for k in expected} == expected
    model = payload["model"]  # last stage, TP rank 1
    assert sorted(n for n in model if "layers" not in n) == \
        ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert model["output_layer.weight"].shape == (128, 64)
    assert model["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (64 // 2 * 2, 64)
    # padding rows of the vocabulary are zero
    first = fmt.load_rank_file(fmt.rank_file(out, 1, 1, 0, 2))["model"]
    assert torch.count_nonzero(first["embedding.word_embeddings.weight"][VOCAB - 128:]) == 0


@pytest.mark.parametrize("model_fixture", ["hf_llama", "hf_qwen2"])
def test_megatron_to_hf_round_trip_is_exact(model_fixture, request, tmp_path):
    hf_dir = request.getfixturevalue(model_fixture)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.model").write_bytes(b"\x00sentencepiece-ish\x01")
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    (tokenizer / "unrelated.txt").write_text("not copied")

    mg = run_convert("hf", "mg", hf_dir, tmp_path / "mg", "--target-tensor-parallel-size", 2,
                     "--target-pipeline-parallel-size", 2)
    back = run_convert("mg", "hf", mg, tmp_path / "hf", "--tokenizer-model", tokenizer / "tokenizer.model",
                       "--max-shard-size", "200KB")
    assert_same_tensors(hf_state_dict(back), hf_state_dict(hf_dir))
    assert (back / "model.safetensors.index.json").exists()  # sharded at 200KB
    assert (back / "tokenizer.model").read_bytes() == (tokenizer / "tokenizer.model").read_bytes()
    assert (back / "tokenizer_config.json").exists() and not (back / "unrelated.txt").exists()

    original = json.loads((hf_dir / "config.json").read_text())
    written = json.loads((back / "config.json").read_text())
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert written[key] == original[key], key

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert b.config.rope_parameters["rope_theta"] == 50000.0
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_resharding_round_trips(hf_llama_8h, tmp_path):
    """tp2pp2 -> tp1pp4 -> tp4pp1 -> tp1pp1 equals HF -> tp1pp1 directly, bit for bit."""
    def mg(src, name, tp, pp, load="mg"):
        return run_convert(load, "mg", src, tmp_path / name, "--target-tensor-parallel-size", tp,
                           "--target-pipeline-parallel-size", pp)

    a = mg(hf_llama_8h, "tp2pp2", 2, 2, load="hf")
    b = mg(a, "tp1pp4", 1, 4)
    c = mg(b, "tp4pp1", 4, 1)
    d = mg(c, "tp1pp1", 1, 1)
    direct = mg(hf_llama_8h, "direct", 1, 1, load="hf")

    (d_shards, d_args, d_it), (e_shards, e_args, _) = load_megatron(d), load_megatron(direct)
    assert list(d_shards) == [(0, 0)] and d_it == 1
    assert_same_tensors(d_shards[(0, 0)], e_shards[(0, 0)])
    assert vars(d_args) == vars(e_args)

    shards_c, args_c, _ = load_megatron(c)
    assert len(shards_c) == 4 and args_c.padded_vocab_size == 512
    assert shards_c[(3, 0)]["embedding.word_embeddings.weight"].shape == (128, 64)
    shards_b, args_b, _ = load_megatron(b)
    assert len(shards_b) == 4 and all(len([n for n in s if ".layers." in n]) == 6
                                      for s in shards_b.values())
    # every intermediate layout merges to the same full model (vocab padding aside)
    for shards, args in ((shards_b, args_b), (shards_c, args_c)):
        full = merge_state_dicts(shards, num_layers=4, swiglu=True, tied_embeddings=False)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full[name] = full[name][:256]
        assert_same_tensors(full, e_shards[(0, 0)])


def test_params_dtype_and_tied_pipeline_copy(hf_llama_tied, tmp_path):
    out = run_convert("hf", "mg", hf_llama_tied, tmp_path / "mg", "--target-pipeline-parallel-size", 2,
                      "--params-dtype", "bf16", "--make-vocab-size-divisible-by", 64)
    shards, args, _ = load_megatron(out)
    assert args.bf16 and args.params_dtype == torch.bfloat16 and args.padded_vocab_size == 256
    assert not args.untie_embeddings_and_output_weights
    assert all(t.dtype == torch.bfloat16 for s in shards.values() for t in s.values())
    # the tied embedding's copy on the last stage equals the embedding
    assert torch.equal(shards[(0, 1)]["output_layer.weight"], shards[(0, 0)]["embedding.word_embeddings.weight"])
    assert "output_layer.weight" not in shards[(0, 0)]
    back = run_convert("mg", "hf", out, tmp_path / "hf")
    written = json.loads((back / "config.json").read_text())
    assert written["tie_word_embeddings"] is True and written["dtype"] == "bfloat16"
    original = hf_state_dict(hf_llama_tied)
    restored = hf_state_dict(back)
    assert sorted(restored) == sorted(original)  # no lm_head when tied
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor.to(torch.bfloat16)), name


def test_cli_entry_point(hf_llama_tied, tmp_path):
    out = tmp_path / "mg"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "convert_ckpt.py"), "--model-type", "GPT", "--load-model-type", "hf",
         "--save-model-type", "mg", "--load-dir", str(hf_llama_tied), "--save-dir", str(out),
         "--target-tensor-parallel-size", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4/8" in proc.stderr and "100%" in proc.stderr  # progress over layers x TP ranks
    assert fmt.read_tracker(out) == 1
    proc = subprocess.run(
        [sys.executable, str(ROOT / "convert_ckpt.py"), "--load-model-type", "mg", "--save-model-type",
         "hf", "--load-dir", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--load-dir" in proc.stderr and "does not exist" in proc.stderr


def test_transformers_4_style_config(hf_llama_tied, tmp_path):
    """Hub configs from transformers 4.x: rope_theta at the top level, torch_dtype."""
    src = tmp_path / "hf4"
    src.mkdir()
    for file in hf_llama_tied.iterdir():
        (src / file.name).write_bytes(file.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.pop("dtype")
    cfg.update(rope_theta=50000.0, rope_scaling=None, torch_dtype="float32")
    (src / "config.json").write_text(json.dumps(cfg))
    mg = run_convert("hf", "mg", src, tmp_path / "mg")
    shards, args, _ = load_megatron(mg)
    assert args.rotary_base == 50000 and not args.use_rope_scaling
    back = run_convert("mg", "hf", mg, tmp_path / "hf")
    written = json.loads((back / "config.json").read_text())
    assert written["rope_theta"] == 50000.0 and written["torch_dtype"] == "float32"
    assert_same_tensors(hf_state_dict(back), hf_state_dict(src))


def test_training_checkpoint_to_hf(hf_llama, tmp_path):
    """A checkpoint whose args come from a training run (no HF metadata) converts to HF: the
    config is rebuilt from Megatron's flags alone."""
    from megatron_ext.config import parse_args
    from tests.checkpoint.test_logits import model_argv

    mg = run_convert("hf", "mg", hf_llama, tmp_path / "mg", "--target-tensor-parallel-size", 2,
                     "--target-pipeline-parallel-size", 2)
    config = parse_args(model_argv(2, 2, tied=False), world_size=4)
    args = model_args_namespace(config, VOCAB)
    for tp in range(2):
        for pp in range(2):
            path = fmt.rank_file(mg, 1, tp, pp, 2)
            payload = fmt.load_rank_file(path, mmap=False)
            check_compatible(payload["args"], config, VOCAB, path)  # converted args fit the run
            payload["args"] = args
            fmt.save_rank_file(path, payload)
    back = run_convert("mg", "hf", mg, tmp_path / "hf")
    assert_same_tensors(hf_state_dict(back), hf_state_dict(hf_llama))
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert b.config.rope_parameters["rope_theta"] == 50000.0
    assert b.config.rms_norm_eps == 1e-6 and b.config.head_dim == 16
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)
