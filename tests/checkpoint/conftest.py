"""Tiny random Hugging Face Llama-family models (no hub) and a converter helper."""

import warnings
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint import convert as conv

VOCAB = 250
SEQ = 16


def make_hf_model(path: Path, *, arch: str = "llama", tied: bool = False, seed: int = 0,
                  max_shard_size=None, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB) -> Path:
    """4 layers, hidden 64, 4 heads, 2 KV heads (GQA), vocab 250, float32; weights drawn with a
    larger scale than HF's init (and norms away from 1) so that logits checks mean something."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=50000.0)
    config, cls = ((LlamaConfig(**common), LlamaForCausalLM) if arch == "llama"
                   else (Qwen2Config(**common), Qwen2ForCausalLM))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def make_tokenizer_json(path: Path, vocab: int = VOCAB) -> Path:
    """A word-level tokenizer.json of exactly ``vocab`` ids: words w0..w{vocab-2} (w0 also
    the unknown word) and <|endoftext|> (EOD) last; it decodes to the words spaced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def hf_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def run_convert(load_type, save_type, load, save, *extra):
    argv = ["--model-type", "GPT", "--load-model-type", load_type, "--save-model-type", save_type,
            "--load-dir", str(load), "--save-dir", str(save), *map(str, extra)]
    return conv.convert(argv)


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """Untied GQA Llama, saved sharded (several safetensors files + index)."""
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama", max_shard_size="300KB")


@pytest.fixture(scope="session")
def hf_llama_tied(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama_tied", tied=True, seed=1)


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory):
    """Tied Qwen2 (QKV biases)."""
    return make_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", arch="qwen2", tied=True, seed=2)


@pytest.fixture(scope="session")
def hf_llama_8h(tmp_path_factory):
    """8 heads, 4 KV heads: divisible by TP 4."""
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama_8h", heads=8, kv_heads=4, seed=3)
