"""convert_ckpt.py --lora-load: the merged HF model, and the PEFT adapters on the HF base, give
the logits of the trained megatron-core LoRA model (base + adapter branches, not merged)."""

import json
import warnings

import pytest
import torch

from megatron_ext.checkpoint.hf import ConversionError
from megatron_ext.checkpoint.lora import PEFT_CONFIG, PEFT_WEIGHTS
from megatron_ext.generation import cli as generation
from tests.checkpoint.conftest import run_convert
from tests.launcher import launch, torchrun
from tests.lora.conftest import LORA, MODEL, SEQ, TRAIN, VOCAB

LOGITS_ATOL = 1e-4  # float32, two implementations (fused vs separate q/k/v, merged vs not)


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _megatron_logits(state):
    """The LoRA model (adapters as separate branches) with the trained weights ``state``."""
    import megatron_ext.model.gpt as gpt
    from megatron_ext import platform
    from megatron_ext.config import parse_args
    from megatron_ext.parallel import ParallelTopology

    config = parse_args(MODEL + TRAIN + LORA, world_size=1)
    topology = ParallelTopology.from_config(config.parallel, 1)
    topology.initialize()
    platform.manual_seed(1)  # the RNG tracker attention uses
    model = gpt.build_model(config, VOCAB).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)[..., :VOCAB]
    topology.destroy()
    return logits


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager").eval()


def _logits(model):
    with torch.no_grad():
        return model(_tokens()).logits


@pytest.fixture(scope="module")
def exports(reference, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_export")
    run_convert("mg", "hf", base, out / "base_hf")
    run_convert("mg", "hf", base, out / "merged_hf", "--lora-load", reference["save"])
    run_convert("mg", "hf", base, out / "peft", "--lora-load", reference["save"],
                "--save-lora-to-hf", "--lora-r", 4, "--lora-alpha", 8)
    return out


@pytest.fixture(scope="module")
def lora_logits(reference):
    return launch(_megatron_logits, 1, reference["final"])[0]


def test_merged_hf_model_gives_the_lora_models_logits(exports, lora_logits):
    merged, base = _logits(_hf_model(exports / "merged_hf")), _logits(_hf_model(exports / "base_hf"))
    torch.testing.assert_close(merged, lora_logits, rtol=0, atol=LOGITS_ATOL)
    assert (base - lora_logits).abs().max() > 100 * LOGITS_ATOL  # the adapters matter


def test_peft_adapters_on_the_hf_base_give_the_lora_models_logits(exports, lora_logits):
    peft = pytest.importorskip("peft")
    config = json.loads((exports / "peft" / PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert (exports / "peft" / PEFT_WEIGHTS).is_file()
    model = peft.PeftModel.from_pretrained(_hf_model(exports / "base_hf"), exports / "peft")
    loaded = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(loaded) == 4 * 7 * 2  # 4 layers x 7 HF modules x (A, B)
    torch.testing.assert_close(_logits(model), lora_logits, rtol=0, atol=LOGITS_ATOL)


def test_convert_checks_the_adapters(reference, base, tmp_path):
    with pytest.raises(ConversionError, match="--lora-r 8: .* was trained with 4"):
        run_convert("mg", "hf", base, tmp_path / "x", "--lora-load", reference["save"],
                    "--lora-r", 8)
    with pytest.raises(ConversionError, match="is a LoRA checkpoint .* pass it as --lora-load"):
        run_convert("mg", "hf", reference["save"], tmp_path / "y", "--lora-load", base)
    with pytest.raises(ConversionError, match="holds no LoRA adapters"):
        run_convert("mg", "hf", base, tmp_path / "z", "--lora-load", base)


def test_generate_gpt_checks_the_adapters(reference, base):
    """generate_gpt.py with adapters as --load, or a --lora-* flag unlike theirs: one line
    naming the way, not the adapters' TP as a world-size error or megatron-core's shape
    mismatch."""
    common = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
              "--max-new-tokens", "1", "--prompt", "1 2"]
    with pytest.raises(RuntimeError, match=r"--load .* is a LoRA checkpoint \(adapters only\): "
                       r"pass it as --lora-load, and its base model \(.*base\) as --load"):
        launch(generation.main, 1, ["--load", str(reference["save"])] + common)
    for flag, value, saved in [("--lora-r", "8", "4"),
                               ("--lora-target-modules", "linear_qkv", " ".join(LORA[1:5]))]:
        with pytest.raises(RuntimeError, match=f"{flag} {value}: .* was trained with {saved}; "
                           f"leave the flag out"):
            launch(generation.main, 1, ["--load", str(base), "--lora-load",
                                        str(reference["save"]), flag, value] + common)


def test_generate_gpt_with_lora_load_equals_the_merged_model(reference, base, exports):
    """generate_gpt.py --load BASE --lora-load ADAPTERS at TP=2 (LoRA flags from the adapter
    checkpoint) writes transformers' greedy continuation of the merged HF model."""
    prompt, eod, new = [1, 2, 3, 4, 5], VOCAB - 1, 8
    out = _hf_model(exports / "merged_hf").generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=new, eos_token_id=eod,
        pad_token_id=0)[0, len(prompt):].tolist()
    expected = " ".join(str(t) for t in out if t != eod)
    assert expected  # something to compare
    result = torchrun(2, ["--load", base, "--lora-load", reference["save"],
                          "--tensor-model-parallel-size", 2, "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", eod, "--max-new-tokens", new,
                          "--prompt", " ".join(map(str, prompt))], 600, script="generate_gpt.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [expected]
