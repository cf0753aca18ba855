"""Fine-tuning from a pretraining checkpoint: ``--load CKPT --finetune --is-instruction-dataset``
starts from the checkpoint's weights at iteration 0 and trains on the answers only."""

import json

import pytest
import torch

import pretrain_gpt
from megatron_ext.config import parse_args
from megatron_ext.data.instruct.pipeline import preprocess_instructions
from megatron_ext.training.trainer import Trainer
from tests.launcher import launch

MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights "
    "--attention-dropout 0 --hidden-dropout 0 --seq-length 48 --make-vocab-size-divisible-by 64 "
    "--lr 1e-2 --log-interval 1 --eval-interval 1000 --eval-iters 0 --seed 5 "
    "--micro-batch-size 2 --global-batch-size 4 --tokenizer-type HuggingFaceTokenizer"
).split()


def _train(argv):
    trainer = Trainer(parse_args(argv, world_size=1), pretrain_gpt.forward_step, world_size=1)
    start = (trainer.iteration, trainer.full_state_dict())
    samples = [trainer.train_ds[i] for i in range(4)] if trainer.config.data.data_path else None
    history = trainer.train()
    final = trainer.full_state_dict()
    trainer.close()
    return start, history, final, samples


@pytest.fixture(scope="module")
def instruction_data(tmp_path_factory, char_tokenizer_dir):
    directory = tmp_path_factory.mktemp("finetune")
    records = [{"instruction": f"say {w}", "output": w * 3} for w in ("ab", "cd", "efg", "h") * 4]
    path = directory / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess_instructions([str(path)], str(directory / "sft"), "HuggingFaceTokenizer",
                            char_tokenizer_dir, handler_name="AlpacaStyleInstructionHandler",
                            prompt_type="llama3", pack=True, seq_length=48, log_interval=0)
    return str(directory / "sft")


def test_finetune_loads_the_weights_and_trains_on_the_answers(tmp_path, char_tokenizer_dir,
                                                              instruction_data):
    ckpt = str(tmp_path / "ckpt")
    pretrain = MODEL + ["--tokenizer-model", char_tokenizer_dir, "--mock-data", "--train-iters",
                        "2", "--save", ckpt]
    _, _, pretrained, _ = launch(_train, 1, pretrain)[0]

    finetune = MODEL + ["--tokenizer-model", char_tokenizer_dir, "--load", ckpt, "--finetune",
                        "--is-instruction-dataset", "--data-path", instruction_data,
                        "--split", "100,0,0", "--train-iters", "4", "--calculate-per-token-loss"]
    (iteration, start), history, final, samples = launch(_train, 1, finetune)[0]
    assert iteration == 0 and [s["iteration"] for s in history] == [1, 2, 3, 4]
    for name, tensor in pretrained.items():
        torch.testing.assert_close(start[name], tensor, rtol=0, atol=0, msg=name)
    # "trained tokens" of the first step: the answer tokens of its global batch
    assert history[0]["trained_tokens"] == int(sum(s["loss_mask"].sum() for s in samples))
    losses = [s["lm loss"] for s in history]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(final[n], pretrained[n]) for n in pretrained)
