"""The start-up summary against the model itself: parameter counts against a single-process
model's parameters, the memory estimate against what is measured on CPU.

Measured, per rank, after one training step: the storage behind the model's parameters
(weights), behind their ``main_grad`` (megatron-core DDP's gradient buffer) and behind the
optimizer's state and fp32 main weights, each storage counted once; and, for activations, the
storages autograd saves for backward during one micro-batch's forward
(``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. These are exact sizes of
what training keeps alive, unlike RSS, which mixes in the allocator and the libraries; the
estimate ignores megatron-core's bucket padding, hence ``summary.MARGIN``.
"""

import pytest
import torch

import pretrain_gpt
from megatron_ext.config import parse_args
from megatron_ext.training import data, summary
from megatron_ext.training.trainer import Trainer
from tests.launcher import launch

MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --seq-length 32 --attention-dropout 0 --hidden-dropout 0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --lr 1e-3 --train-iters 1 "
    "--log-interval 1 --eval-interval 1000 --eval-iters 0 --micro-batch-size 2"
).split()
UNTIED = ["--untie-embeddings-and-output-weights"]
LORA = UNTIED + ("--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 "
                 "--lora-r 8").split()
# The single-process model each layout is compared with.
MODELS = {"untied": UNTIED, "tied": [], "lora": LORA}


def _storage_bytes(tensors, exclude=()) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _saved_activation_bytes(trainer) -> int:
    module = trainer.model[0]
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = []
    iterator = data.data_iterator(trainer.train_ds, 0, trainer.config.training.micro_batch_size,
                                  trainer.topology.dp_rank, trainer.topology.data_parallel)

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, loss_func = trainer.forward_step(iterator, module)
        loss_func(output)[0].backward()
    return _storage_bytes(saved, exclude=params)


def _run(argv, world_size):
    trainer = Trainer(parse_args(argv, world_size=world_size), pretrain_gpt.forward_step,
                      world_size=world_size)
    params = list(trainer.model[0].module.parameters())
    activations = (_saved_activation_bytes(trainer)
                   if trainer.config.parallel.pipeline_model_parallel_size == 1 else None)
    trainer.train()
    weights = _storage_bytes(params)
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    state = [t for opt in optimizers for entry in opt.optimizer.state.values()
             for t in entry.values() if torch.is_tensor(t)]
    main_weights = [p for opt in optimizers for group in opt.optimizer.param_groups
                    for p in group["params"]]
    measured = {
        "weights": weights,
        "gradients": _storage_bytes(p.main_grad for p in params if p.requires_grad),
        # fp32 main weights that are views of the model's (fp32 training) are not extra memory.
        "optimizer": _storage_bytes(state + main_weights,
                                    exclude={p.untyped_storage().data_ptr() for p in params}),
        "activations": activations,
    }
    named = list(trainer.model[0].module.named_parameters())
    result = dict(local=sum(p.numel() for p in params), counts=trainer.parameter_counts,
                  trainable=sum(p.numel() for p in params if p.requires_grad),
                  embedding=sum(p.numel() for n, p in named if n.startswith("embedding.")),
                  output_layer=sum(p.numel() for n, p in named if n.startswith("output_layer.")),
                  lines=trainer.summary_lines, measured=measured, stage=trainer.topology.pp_rank,
                  dp=trainer.topology.data_parallel, vocab=trainer.vocab_size)
    trainer.close()
    return result


@pytest.fixture(scope="module")
def single():
    return {name: launch(_run, 1, MODEL + flags, 1)[0] for name, flags in MODELS.items()}


def _total(counts):
    return sum(r.unique for r in counts if r.dp == 0 and r.cp == 0)


@pytest.mark.parametrize("world_size, flags, model", [
    (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel "
        "--global-batch-size 4", "tied"),
    (4, "--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --bf16 "
        "--global-batch-size 4", "untied"),
    # 1/CP of the tokens and the gathered K/V; the optimizer sharded over DP x CP.
    (2, "--context-parallel-size 2 --use-distributed-optimizer", "untied"),
    # a2a: no gathered K/V (the heads' rows replace the local q/k/v, same size).
    (2, "--context-parallel-size 2 --cp-comm-type a2a", "untied"),
    # LoRA: the adapters' gradients and Adam state; activations estimated as the full model's.
    (2, "--tensor-model-parallel-size 2 --sequence-parallel --global-batch-size 4", "lora"),
])
def test_parameter_counts_and_memory_match_the_model(single, world_size, flags, model):
    argv = MODEL + MODELS[model] + flags.split()
    results = launch(_run, world_size, argv, world_size)
    reference = single[model]
    # The single process holds the whole model: its parameters (a tied output layer is the
    # embedding itself) are the model's count.
    assert reference["local"] == _total(reference["counts"])
    for result in results:
        counts = result["counts"]
        assert _total(counts) == reference["local"]
        for part in ("embedding", "output_layer"):
            assert sum(getattr(r, part) for r in counts
                       if r.dp == 0 and r.cp == 0) == reference[part], part
        assert [r.local for r in counts] == [r["local"] for r in results]
        assert f"parameters {summary._n(reference['local'])} ({reference['local']})" in \
            "\n".join(result["lines"])
    config = parse_args(argv, world_size=world_size)
    for result in results + [reference]:
        run_config = config if result is not reference else parse_args(
            MODEL + MODELS[model], world_size=1)
        estimate = summary.state_bytes(run_config, result["local"], result["dp"],
                                       result["trainable"])
        if result["measured"]["activations"] is not None:
            estimate["activations"] = summary.activation_bytes(run_config, result["vocab"],
                                                               result["stage"])
        for kind, value in estimate.items():
            measured = result["measured"][kind]
            assert abs(value - measured) <= summary.MARGIN * measured, (kind, value, measured)


def _precision(argv):
    trainer = Trainer(parse_args(argv, world_size=1), pretrain_gpt.forward_step, world_size=1)
    line = next(line for line in trainer.summary_lines if line.startswith("precision"))
    grads = {p.main_grad.dtype for p in trainer.model[0].module.parameters()}
    trainer.close()
    return line, grads


@pytest.mark.parametrize("flags", [[], ["--bf16"], ["--bf16", "--grad-reduce-in-bf16"]])
def test_precision_line_names_the_gradient_buffers_dtype(flags):
    """The dtype the summary says gradients are reduced in is megatron-core DDP's buffer's."""
    line, grads = launch(_precision, 1, MODEL + flags)[0]
    assert len(grads) == 1, grads
    said = "bf16" if grads == {torch.bfloat16} else "fp32" if grads == {torch.float32} else None
    assert line.endswith(f"gradients reduced in {said}"), (line, grads)
