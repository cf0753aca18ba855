"""Checkpoints of the interleaved (virtual) pipeline schedule: a torch_dist checkpoint saved with
model chunks loads at any layout and the other way round (its layers are numbered globally),
and resuming in the same layout is bit-identical; the torch format keeps Megatron-LM's
``model0``, ``model1``, ... entries per rank file."""

import pytest
import torch

from megatron_ext.checkpoint import format as ckpt
from tests.launcher import launch
from tests.training.test_checkpointing import _train, _train_with_weights
from tests.training.test_dist_checkpoint import BASE, DROPOUT, _assert_close

FOUR_LAYERS = [("4" if i and BASE[i - 1] == "--num-layers" else a) for i, a in enumerate(BASE)]
RESHARD = FOUR_LAYERS + "--attention-dropout 0 --hidden-dropout 0".split()
VPP2 = "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"
TORCH = ["--ckpt-format", "torch"]


@pytest.fixture(scope="module")
def single_process():
    losses, _, final = launch(_train_with_weights, 1, RESHARD, 1)[0]
    return losses, final


@pytest.mark.parametrize("saved_ws,saved,resumed_ws,resumed", [
    (2, VPP2, 1, ""),
    (1, "", 2, VPP2),
    (2, VPP2 + " --use-distributed-optimizer", 4,
     "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
], ids=["pp2vpp2-to-1", "1-to-pp2vpp2", "pp2vpp2-distributed-to-tp2pp2"])
def test_dist_checkpoint_resumes_in_another_layout(tmp_path, single_process, saved_ws, saved,
                                                   resumed_ws, resumed):
    """Stopped at 3 in one layout, resumed in the other: the loaded weights are the saved ones
    bit for bit, and the curve and final weights are the uninterrupted single process's."""
    first, _, at_save = launch(_train_with_weights, saved_ws, RESHARD + saved.split() + [
        "--save", str(tmp_path), "--exit-interval", "3"], saved_ws)[0]
    rest, loaded, final = launch(_train_with_weights, resumed_ws, RESHARD + resumed.split()
                                 + ["--load", str(tmp_path)], resumed_ws)[0]
    assert loaded.keys() == at_save.keys()
    for name, tensor in at_save.items():
        assert torch.equal(loaded[name], tensor), name
    _assert_close(first + rest, single_process[0], final, single_process[1])


@pytest.mark.parametrize("fmt", [[], TORCH, TORCH + ["--use-distributed-optimizer"]],
                         ids=["torch_dist", "torch", "torch-distributed-optimizer"])
def test_resume_at_the_same_interleaved_layout_is_bit_identical(tmp_path, fmt):
    """Dropout on, so the RNG states matter too."""
    argv = FOUR_LAYERS + DROPOUT + VPP2.split() + fmt
    full = launch(_train_with_weights, 2, argv, 2)[0]
    first = launch(_train, 2, argv + ["--save", str(tmp_path), "--exit-interval", "3"], 2)[-1]
    resumed = launch(_train_with_weights, 2, argv + ["--load", str(tmp_path)], 2)[0]
    assert first + resumed[0] == full[0]
    for name, tensor in full[2].items():
        assert torch.equal(resumed[2][name], tensor), name
    if fmt:
        # Megatron-LM's layout: one rank file per stage, a model entry per chunk.
        payload = ckpt.load_rank_file(ckpt.rank_file(tmp_path, 3, 0, 1, 2))
        assert "model" not in payload and {"model0", "model1"} <= payload.keys()
        assert any(k.startswith("decoder.layers.0.") for k in payload["model1"])
        assert "output_layer.weight" in payload["model1"]
        assert "output_layer.weight" not in payload["model0"]


def test_convert_ckpt_reads_and_writes_interleaved_torch_checkpoints(tmp_path):
    """convert_ckpt.py merges a PP2 x VPP2 torch checkpoint into the weights the training run
    held (bit for bit), and splits them back into the same rank files; a resume at that layout
    loads them."""
    from tests.checkpoint.conftest import run_convert

    saved = tmp_path / "vpp"
    argv = RESHARD + VPP2.split() + TORCH
    _, _, held = launch(_train_with_weights, 2, argv + ["--save", str(saved),
                                                       "--exit-interval", "2"], 2)[0]
    merged = run_convert("mg", "mg", saved, tmp_path / "tp1pp1")
    model = ckpt.load_rank_file(ckpt.rank_file(merged, 2, 0, 0, 1))["model"]
    assert model.keys() == held.keys()
    for name, tensor in held.items():
        assert torch.equal(model[name], tensor), name
    back = run_convert("mg", "mg", merged, tmp_path / "back", "--target-pipeline-parallel-size",
                       2, "--target-num-virtual-stages-per-pipeline-rank", 2)
    for stage in range(2):
        original = ckpt.load_rank_file(ckpt.rank_file(saved, 2, 0, stage, 2))
        converted = ckpt.load_rank_file(ckpt.rank_file(back, 2, 0, stage, 2))
        for key in ("model0", "model1"):
            assert converted[key].keys() == original[key].keys()
            for name, tensor in original[key].items():
                if torch.is_tensor(tensor) and not name.endswith("_extra_state"):
                    assert torch.equal(converted[key][name], tensor), (stage, key, name)
    _, loaded, _ = launch(_train_with_weights, 2, argv + ["--load", str(back), "--finetune"],
                          2)[0]
    for name, tensor in held.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_torch_checkpoint_of_other_model_chunks_names_the_flag(tmp_path):
    """The torch format keeps its rank files' chunks: another chunk count is refused before
    any weight loads, naming the flag (torch_dist loads at any)."""
    argv = RESHARD + "--pipeline-model-parallel-size 2".split() + TORCH
    launch(_train, 2, argv + VPP2.split()[2:] + ["--save", str(tmp_path), "--exit-interval",
                                                 "1"], 2)
    with pytest.raises(Exception, match="num-virtual-stages-per-pipeline-rank"):
        launch(_train, 2, argv + ["--load", str(tmp_path)], 2)
