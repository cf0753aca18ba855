"""HF -> Megatron conversions give the same logits as transformers, through megatron-core's
pipeline schedule on 4 gloo ranks (TP x PP x DP = 4)."""

import warnings

import numpy as np
import torch

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.args import check_compatible
from tests.checkpoint.conftest import SEQ, VOCAB, run_convert
from tests.launcher import launch

WORLD = 4
BATCH = 2


def model_argv(tp, pp, *, tied, seq=SEQ):
    argv = (f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp} "
            f"--num-layers 4 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4 "
            f"--group-query-attention --num-query-groups 2 --seq-length {seq} "
            f"--max-position-embeddings 2048 --position-embedding-type rope --rotary-base 50000 "
            f"--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
            f"--attention-dropout 0 --hidden-dropout 0 --micro-batch-size {BATCH} "
            f"--mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB}").split()
    if not tied:
        argv.append("--untie-embeddings-and-output-weights")
    return argv


def tokens_batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def hf_logits(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens_batch()).logits.numpy()


def _rank_logits(cases):
    """On each rank: for every case build our model, load its shard, run the schedule forward."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_ext.model.gpt as gpt
    from megatron_ext import platform
    from megatron_ext.config import parse_args
    from megatron_ext.parallel import ParallelTopology

    results = []
    for ckpt, tp, pp, tied, qkv_bias, *flags in cases:  # flags: more of the model's, a list
        argv = (model_argv(tp, pp, tied=tied) + (["--add-qkv-bias"] if qkv_bias else [])
                + (flags[0] if flags else []))
        config = parse_args(argv, world_size=WORLD)
        topology = ParallelTopology.from_config(config.parallel, WORLD)
        topology.initialize()
        platform.manual_seed(1)
        model = gpt.build_model(config, VOCAB)
        model.eval()
        iteration = fmt.read_tracker(ckpt)
        path = fmt.rank_file(ckpt, iteration, topology.tp_rank, topology.pp_rank, pp)
        payload = fmt.load_rank_file(path)
        check_compatible(payload["args"], config, VOCAB, path)
        fmt.load_model_state_dict(model, payload["model"], path)

        tokens = tokens_batch()
        positions = torch.arange(SEQ).expand(BATCH, SEQ)

        def forward_step(data_iterator, chunk):
            batch_tokens, batch_positions = next(data_iterator)
            return chunk(batch_tokens, batch_positions, None), None  # no loss: keep the logits

        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([(tokens, positions)]),
                model=[model], num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH,
                forward_only=True)
        logits = None
        if parallel_state.is_pipeline_last_stage():
            local = out[0]  # [b, s, padded_vocab / tp]
            full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
            logits = full[..., :VOCAB].numpy()
        results.append(logits)
        topology.destroy()
    return results


def test_hf_to_megatron_logits_match_transformers(hf_llama, hf_llama_tied, hf_qwen2, tmp_path):
    cases = [  # (checkpoint, tp, pp, tied, qkv bias)
        (hf_llama, 2, 2, False, False),       # untied GQA, TP x PP
        (hf_llama_tied, 2, 1, True, False),   # tied, TP only (x DP 2)
        (hf_qwen2, 2, 2, True, True),         # tied across stages, QKV biases
    ]
    rank_cases, expected = [], []
    for i, (hf_dir, tp, pp, tied, bias) in enumerate(cases):
        out = tmp_path / f"mg{i}"
        run_convert("hf", "mg", hf_dir, out, "--target-tensor-parallel-size", tp,
                    "--target-pipeline-parallel-size", pp)
        rank_cases.append((out, tp, pp, tied, bias))
        expected.append(hf_logits(hf_dir))
    per_rank = launch(_rank_logits, WORLD, rank_cases)
    for i, (hf_dir, tp, pp, tied, bias) in enumerate(cases):
        got = [r[i] for r in per_rank if r[i] is not None]
        assert len(got) == WORLD // pp  # every last-stage rank (all TP and DP ranks)
        scale = np.abs(expected[i]).max()
        assert scale > 1.0, "logits too small for a meaningful comparison"
        for logits in got:
            np.testing.assert_allclose(logits, expected[i], atol=1e-4, rtol=0,
                                       err_msg=f"case {i}: {hf_dir.name} tp{tp} pp{pp}")
