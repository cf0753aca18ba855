"""Bad input fails with an error naming the flag or file, before anything is written; a failed
conversion leaves no --save-dir."""

import json
import shutil

import pytest

from megatron_ext.checkpoint import convert as conv
from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.format import CheckpointError
from megatron_ext.checkpoint.hf_io import HfWriter
from tests.checkpoint.conftest import hf_state_dict, run_convert


def assert_nothing_written(save_dir):
    assert not save_dir.exists() or not any(save_dir.iterdir())
    assert not [p for p in save_dir.parent.iterdir() if p.name.startswith(f".{save_dir.name}.")]


def copy_hf(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def mg_tp2pp2(hf_llama, tmp_path_factory):
    return run_convert("hf", "mg", hf_llama, tmp_path_factory.mktemp("mg") / "tp2pp2",
                       "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)


def expect_error(match, *argv, save):
    with pytest.raises(CheckpointError, match=match):
        run_convert(*argv)
    assert_nothing_written(save)


def test_missing_inputs(hf_llama, tmp_path):
    save = tmp_path / "out"
    expect_error(r"--load-dir .*nope does not exist", "hf", "mg", tmp_path / "nope", save, save=save)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(r"--load-dir .*empty: no config.json", "hf", "mg", empty, save, save=save)
    expect_error(r"--load-dir .*empty: no latest_checkpointed_iteration.txt", "mg", "hf", empty, save,
                 save=save)

    broken = copy_hf(hf_llama, tmp_path / "broken")
    (broken / "model-00002-of-00003.safetensors").unlink()
    expect_error(r"model-00002-of-00003.safetensors is missing \(listed in .*index.json\)",
                 "hf", "mg", broken, save, save=save)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_llama / "config.json", no_weights)
    expect_error(r"no model.safetensors or model.safetensors.index.json", "hf", "mg", no_weights, save,
                 save=save)

    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(hf_llama / "config.json", partial)
    tensors = hf_state_dict(hf_llama)
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(partial / "model.safetensors"))
    expect_error(r"tensor\(s\) that config.json implies are missing.*layers.3.mlp.up_proj",
                 "hf", "mg", partial, save, save=save)

    expect_error(r"--tokenizer-model .*nope.model does not exist", "hf", "mg", hf_llama, save,
                 "--tokenizer-model", tmp_path / "nope.model", save=save)


def test_unknown_architecture_and_config_mismatch(hf_llama, tmp_path):
    save = tmp_path / "out"
    gpt2 = copy_hf(hf_llama, tmp_path / "gpt2")
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2",
                                                  "architectures": ["GPT2LMHeadModel"]}))
    expect_error(r"config.json: unknown architecture \(model_type 'gpt2'", "hf", "mg", gpt2, save, save=save)
    expect_error(r"--model-type-hf qwen2 expects model_type 'qwen2'.*'llama' model", "hf", "mg",
                 hf_llama, save, "--model-type-hf", "qwen2", save=save)

    wrong = copy_hf(hf_llama, tmp_path / "wrong")
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    expect_error(r"mlp.gate_proj.weight has shape \(160, 64\), config.json implies \(128, 64\)",
                 "hf", "mg", wrong, save, save=save)
    scaled = copy_hf(hf_llama, tmp_path / "scaled")
    (scaled / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}))
    expect_error(r"RoPE type 'yarn' is not supported", "hf", "mg", scaled, save, save=save)


@pytest.mark.parametrize("tp,pp,match", [
    (3, 1, r"--target-tensor-parallel-size 3 does not divide the 4 attention heads"),
    (4, 1, r"--target-tensor-parallel-size 4 does not divide the 2 query groups"),
    (1, 3, r"--target-pipeline-parallel-size 3 does not divide the 4 layers"),
    (0, 1, r"--target-tensor-parallel-size 0 must be >= 1"),
])
def test_target_layout_must_divide_the_model(hf_llama, mg_tp2pp2, tmp_path, tp, pp, match):
    save = tmp_path / "out"
    for load_type, load in (("hf", hf_llama), ("mg", mg_tp2pp2)):
        expect_error(match, load_type, "mg", load, save, "--target-tensor-parallel-size", tp,
                     "--target-pipeline-parallel-size", pp, save=save)


def test_flag_errors(hf_llama, mg_tp2pp2, tmp_path):
    save = tmp_path / "out"
    expect_error("nothing to convert", "hf", "hf", hf_llama, save, save=save)
    expect_error("--target-tensor-parallel-size applies to --save-model-type mg only", "mg", "hf",
                 mg_tp2pp2, save, "--target-tensor-parallel-size", 2, save=save)
    expect_error(r"--max-shard-size 'lots'", "mg", "hf", mg_tp2pp2, save, "--max-shard-size", "lots",
                 save=save)
    expect_error(r"the checkpoint has no QKV biases; use --model-type-hf llama2", "mg", "hf",
                 mg_tp2pp2, save, "--model-type-hf", "qwen2", save=save)
    save.mkdir()
    (save / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match=r"--save-dir .*out exists and is not empty"):
        run_convert("hf", "mg", hf_llama, save)
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    with pytest.raises(SystemExit):  # argparse: unknown --model-type-hf
        run_convert("hf", "mg", hf_llama, tmp_path / "x", "--model-type-hf", "gpt2")


def test_bad_megatron_inputs(mg_tp2pp2, tmp_path):
    save = tmp_path / "out"

    def clone(name):
        return copy_hf(mg_tp2pp2, tmp_path / name)

    corrupt = clone("corrupt")
    (corrupt / fmt.TRACKER_FILENAME).write_text("12abc\n")
    expect_error(r"checkpoint tracker .*corrupt/latest_checkpointed_iteration.txt is corrupt",
                 "mg", "hf", corrupt, save, save=save)

    dangling = clone("dangling")
    (dangling / fmt.TRACKER_FILENAME).write_text("5\n")
    expect_error(r"names iteration 5 but .*iter_0000005 does not exist", "mg", "mg", dangling, save,
                 save=save)

    missing = clone("missing")
    shutil.rmtree(missing / "iter_0000001" / "mp_rank_01_001")
    expect_error(r"rank directories .* do not match the args in the checkpoint \(TP 2, PP 2",
                 "mg", "hf", missing, save, save=save)

    truncated = clone("truncated")
    path = fmt.rank_file(truncated, 1, 1, 1, 2)
    path.write_bytes(path.read_bytes()[:1000])
    expect_error(r"checkpoint file .*mp_rank_01_001/model_optim_rng.pt is truncated or unreadable",
                 "mg", "mg", truncated, save, save=save)

    gone = clone("gone")
    fmt.rank_file(gone, 1, 0, 1, 2).unlink()
    expect_error(r"checkpoint file .*mp_rank_00_001/model_optim_rng.pt is missing", "mg", "hf",
                 gone, save, save=save)


@pytest.mark.parametrize("save_type", ["mg", "hf"])
def test_failure_midway_leaves_no_save_dir(hf_llama, mg_tp2pp2, tmp_path, monkeypatch, save_type):
    calls = []
    real_save, real_add = fmt.save_rank_file, HfWriter.add

    def failing_save(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(path, payload)

    def failing_add(self, name, tensor):
        calls.append(name)
        if "layers.2." in name:
            raise OSError("disk full (simulated)")
        real_add(self, name, tensor)

    monkeypatch.setattr(fmt, "save_rank_file", failing_save)
    monkeypatch.setattr(HfWriter, "add", failing_add)
    save = tmp_path / "out"
    load_type, load = ("hf", hf_llama) if save_type == "mg" else ("mg", mg_tp2pp2)
    argv = (load_type, save_type, load, save, "--target-pipeline-parallel-size",
            2 if save_type == "mg" else 1)
    with pytest.raises(OSError, match="simulated"):
        run_convert(*argv)
    assert calls and not save.exists()
    assert_nothing_written(save)
    # an empty --save-dir given by the user is left as it was
    save.mkdir()
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        run_convert(*argv)
    assert save.is_dir() and not any(save.iterdir())


def test_main_reports_errors(tmp_path, capsys):
    rc = conv.main(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
                    str(tmp_path / "nope"), "--save-dir", str(tmp_path / "out")])
    assert rc == 1
    assert "convert_ckpt.py: error: --load-dir" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hf_weights_are_an_error_naming_tensor_and_file(hf_llama, tmp_path, value):
    from safetensors.torch import load_file, save_file

    damaged = copy_hf(hf_llama, tmp_path / "damaged")
    index = json.loads((damaged / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.self_attn.k_proj.weight"
    file = damaged / index[name]
    tensors = load_file(str(file))
    tensors[name][3, 5] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    save = tmp_path / "out"
    expect_error(rf"{file}: tensor {name} holds 1 NaN/Inf value\(s\) of \d+; the file is "
                 "damaged", "hf", "mg", damaged, save, save=save)


def test_non_finite_megatron_weights_are_an_error_naming_tensor_and_rank_file(mg_tp2pp2, tmp_path):
    import torch

    damaged = copy_hf(mg_tp2pp2, tmp_path / "damaged")
    path = fmt.rank_file(damaged, 1, 1, 1, 2)
    payload = fmt.load_rank_file(path, mmap=False)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    payload["model"][name].view(-1)[7] = float("nan")
    torch.save(payload, path)
    save = tmp_path / "out"
    expect_error(rf"{path}: tensor {name} holds 1 NaN/Inf", "mg", "hf", damaged, save, save=save)
