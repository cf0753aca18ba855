"""A base model (a random HF Llama converted to Megatron) and the single-process LoRA run on it
that the other layouts, the resume and the exports are compared with."""

import pytest

from tests.checkpoint.conftest import make_hf_model, run_convert

VOCAB = 250  # the HF model's; NullTokenizer --vocab-size 249 adds EOD
SEQ = 16
ITERS = 4
MODEL = (
    f"--num-layers 4 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4 "
    f"--group-query-attention --num-query-groups 2 --seq-length {SEQ} "
    f"--max-position-embeddings 2048 --position-embedding-type rope --rotary-base 50000 "
    f"--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
    f"--untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 "
    f"--mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB - 1}"
).split()
TRAIN = (
    f"--micro-batch-size 2 --global-batch-size 8 --lr 2e-2 --lr-warmup-iters 1 "
    f"--lr-decay-style constant --train-iters {ITERS} --log-interval 1 --eval-interval 0 "
    f"--eval-iters 0 --seed 7 --distributed-backend gloo"
).split()
LORA = ("--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 --lora-r 4 "
        "--lora-alpha 8").split()


def lora_run(argv, world_size):
    """(losses, full state dict before and after training, the start-up summary) of a run."""
    import pretrain_gpt
    from megatron_ext.config import parse_args
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    initial = trainer.full_state_dict()
    losses = [step["lm loss"] for step in trainer.train()]
    final = trainer.full_state_dict()
    summary = trainer.summary_lines
    trainer.close()
    return losses, initial, final, summary


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("lora") / "hf_base")


@pytest.fixture(scope="session")
def base(hf_base, tmp_path_factory):
    """The base as a Megatron checkpoint (torch_dist: it loads at any TP/PP)."""
    out = tmp_path_factory.mktemp("lora") / "base"
    run_convert("hf", "mg", hf_base, out, "--ckpt-format", "torch_dist")
    return out


@pytest.fixture(scope="session")
def reference(base, tmp_path_factory):
    """The single-process LoRA run from ``base``; its adapters saved (torch_dist) in ``save`` at
    iterations 2 and 4."""
    from tests.launcher import launch

    save = tmp_path_factory.mktemp("lora") / "adapters"
    argv = MODEL + TRAIN + LORA + ["--load", str(base), "--save", str(save),
                                  "--save-interval", "2"]
    losses, initial, final, summary = launch(lora_run, 1, argv, 1)[0]
    return dict(losses=losses, initial=initial, final=final, summary=summary, save=save,
                base=base)
