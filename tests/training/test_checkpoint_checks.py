"""--load checked before any process group exists (training/checkpoint_checks.py): a damaged
checkpoint of either format, a tracker naming a missing iteration and a Hugging Face model
directory stop pretrain() with one line naming the file and the way out, with no process group
started; the intact checkpoints pass the same checks. So do the directories a run writes
(--save, --data-cache-path, --tensorboard-dir under a file: config/validate.py)."""

import re
import shutil

import pytest
import torch.distributed as dist

import pretrain_gpt
from megatron_ext.checkpoint import format as ckpt
from megatron_ext.config import parse_args
from megatron_ext.training import pretrain
from megatron_ext.training.checkpoint_checks import check_checkpoints
from tests.checkpoint.conftest import make_hf_model
from tests.launcher import launch
from tests.training.test_checkpointing import MODEL, _train

FORMATS = ("torch", "torch_dist")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of each format at iterations 1 and 2 (the tracker names 2)."""
    roots = {}
    for ckpt_format in FORMATS:
        root = tmp_path_factory.mktemp(ckpt_format)
        launch(_train, 1, MODEL + ["--ckpt-format", ckpt_format, "--save", str(root),
                                   "--save-interval", "1", "--train-iters", "2"], 1)
        roots[ckpt_format] = root
    return roots


def _pretrain_stops(argv, match, kind="checkpoint"):
    with pytest.raises(SystemExit) as stopped:
        pretrain(pretrain_gpt.forward_step, MODEL + argv)
    message = str(stopped.value.code)
    assert message.startswith(f"[rank 0] invalid {kind}: ") and "\n" not in message
    assert re.search(match, message), message
    assert not dist.is_initialized()


def _copy(saved, ckpt_format, tmp_path):
    root = tmp_path / ckpt_format
    shutil.copytree(saved[ckpt_format], root)
    return root


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("ckpt_format", FORMATS)
def test_intact_checkpoints_pass(saved, ckpt_format):
    check_checkpoints(parse_args(MODEL + ["--load", str(saved[ckpt_format]), "--save",
                                          str(saved[ckpt_format])], world_size=1))


def test_lora_run_saving_over_adapters_without_lora_load_is_warned(saved, tmp_path, caplog):
    """The same LoRA command rerun after a stop (no --lora-load: --load is the base) starts
    new adapters: said, with the flag that resumes, before their saves replace the old."""
    lora = ["--lora-target-modules", "linear_qkv", "--load", str(saved["torch"])]
    check_checkpoints(parse_args(MODEL + lora + ["--save", str(tmp_path)], world_size=1))
    assert "no --lora-load" not in caplog.text  # an empty --save: a first run
    check_checkpoints(parse_args(MODEL + lora + ["--save", str(saved["torch_dist"])],
                                 world_size=1))
    assert re.search(r"--save \S+ holds a checkpoint \(iteration 2\) and this LoRA run has no "
                     r"--lora-load: .* resume that checkpoint: add --lora-load \S+",
                     caplog.text), caplog.text
    caplog.clear()
    check_checkpoints(parse_args(MODEL + lora + ["--save", str(saved["torch_dist"]),
                                                 "--lora-load", str(saved["torch_dist"])],
                                 world_size=1))
    assert "no --lora-load" not in caplog.text


def test_finetune_over_a_checkpoint_in_save_is_warned(saved, caplog):
    """Full fine-tuning (--load PRETRAINED --finetune --save SFT) rerun after a stop starts at
    iteration 0 again: said, with the way to resume (Megatron-LM's --load SFT)."""
    argv = MODEL + ["--load", str(saved["torch"]), "--finetune"]
    check_checkpoints(parse_args(argv, world_size=1))  # no --save
    check_checkpoints(parse_args(argv + ["--save", str(saved["torch"])], world_size=1))
    assert "--finetune starts" not in caplog.text  # --save is --load: nothing to lose there
    check_checkpoints(parse_args(argv + ["--save", str(saved["torch_dist"])], world_size=1))
    assert re.search(r"--save \S+ holds a checkpoint \(iteration 2\) and --finetune starts "
                     r".* resume that checkpoint: --load \S+torch_dist\S* without --finetune",
                     caplog.text), caplog.text


def test_truncated_files_are_named(saved, tmp_path):
    root = _copy(saved, "torch", tmp_path)
    _truncate(root / "iter_0000002" / "mp_rank_00" / ckpt.RANK_FILENAME)
    _pretrain_stops(["--load", str(root)],
                    r"iter_0000002/mp_rank_00/model_optim_rng\.pt is truncated or unreadable")
    root = _copy(saved, "torch_dist", tmp_path)
    shard = sorted((root / "iter_0000002").glob("*.distcp"))[-1]
    size = shard.stat().st_size
    _truncate(shard)
    _pretrain_stops(["--load", str(root)],
                    rf"{shard.name} has {size // 2} bytes, its \.metadata needs {size}")


def test_torch_dist_without_its_format_marker_is_named(saved, tmp_path):
    """Without metadata.json (megatron-core's, written last) the loader would take the
    directory for a torch-format checkpoint and say it holds no mp_rank_* directories."""
    root = _copy(saved, "torch_dist", tmp_path)
    (root / "iter_0000002" / "metadata.json").unlink()
    _pretrain_stops(["--load", str(root)], r"iter_0000002 has a \.metadata but no metadata\.json"
                                           r", which megatron-core writes last")


def test_rank_file_missing_is_not_taken_for_another_layout(tmp_path):
    """A TP=2 torch checkpoint without its second rank's directory (copied in part): said so,
    not read as a TP=1 checkpoint to reshard."""
    root = tmp_path / "tp2"
    launch(_train, 2, MODEL + ["--ckpt-format", "torch", "--save", str(root), "--train-iters",
                               "1", "--tensor-model-parallel-size", "2"], 2)
    shutil.rmtree(root / "iter_0000001" / "mp_rank_01")
    with pytest.raises(ckpt.CheckpointError, match=r"saved at TP=2 PP=1 but 1 of its 2 rank "
                                                   r"files are missing, e.g. \S+/mp_rank_01/"):
        check_checkpoints(parse_args(MODEL + ["--load", str(root), "--tensor-model-parallel-size",
                                              "2"], world_size=2))


@pytest.mark.parametrize("ckpt_format", FORMATS)
def test_tracker_naming_a_missing_iteration(saved, tmp_path, ckpt_format):
    root = _copy(saved, ckpt_format, tmp_path)
    ckpt.write_tracker(root, 7)
    _pretrain_stops(["--load", str(root)], r"names iteration 7, but \S+/iter_0000007 does not "
                                           r"exist; the directory holds iter_0000001, iter_0000002")


def test_hugging_face_directories(tmp_path):
    """An HF model (transformers' save_pretrained) and a PEFT adapter directory (peft's)."""
    import peft
    from transformers import LlamaForCausalLM

    hf = make_hf_model(tmp_path / "hf")
    _pretrain_stops(["--load", str(hf)], r"Hugging Face model, not a Megatron checkpoint; "
                                         r"convert it first: python convert_ckpt.py")
    adapters = tmp_path / "peft"
    peft.get_peft_model(LlamaForCausalLM.from_pretrained(hf), peft.LoraConfig(
        r=4, target_modules=["q_proj"])).save_pretrained(adapters)
    _pretrain_stops(["--lora-target-modules", "linear_qkv", "--lora-load", str(adapters)],
                    r"--lora-load \S+/peft is a PEFT adapter directory, which training does not "
                    r"read; give --lora-load the Megatron checkpoint of the LoRA run")


@pytest.mark.parametrize("flag", ["--save", "--data-cache-path", "--tensorboard-dir"])
def test_output_directory_under_a_file(tmp_path, flag):
    (tmp_path / "file").write_text("")
    _pretrain_stops([flag, str(tmp_path / "file" / "out")],
                    rf"{flag} \S+/file/out: \S+/file is a file, not a directory", "arguments")
