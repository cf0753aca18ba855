"""The server tests' model: a small HF Llama and its torch_dist conversion, made once."""

import warnings

import pytest
import torch

from tests.checkpoint.conftest import make_hf_model, run_convert


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(HF model dir, the same model converted to torch_dist: loads at TP 1 and 2)."""
    root = tmp_path_factory.mktemp("server")
    hf = make_hf_model(root / "hf")
    run_convert("hf", "mg", hf, root / "mg", "--ckpt-format", "torch_dist")
    return hf, root / "mg"


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32,
                                                    attn_implementation="eager").eval()


