"""Uneven pipeline stages (--decoder-first/last-pipeline-num-layers) offline: our split is
megatron-core's, and convert_ckpt.py reads and writes checkpoints split so, checked against
transformers' logits and the HF weights themselves. Training at such a layout:
tests/training/test_uneven_pipeline.py."""

import numpy as np
import pytest
import torch
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.sharding import split_problem, stage_layers
from megatron_ext.checkpoint.sources import ConversionError
from tests.checkpoint.conftest import hf_state_dict, run_convert
from tests.checkpoint.test_convert import assert_same_tensors
from tests.checkpoint.test_logits import WORLD, _rank_logits, hf_logits
from tests.launcher import launch

UNEVEN = ["--decoder-first-pipeline-num-layers", "1"]  # 4 layers over PP 2: 1 + 3


def _layouts():
    for layers in (4, 6, 7, 8):
        for pp in (2, 3, 4):
            for first in (None, 1, 2, 3):
                for last in (None, 1, 2, 3):
                    for vp in (1, 2, 3):
                        if split_problem(layers, pp, first, last, vp_size=vp) is None:
                            yield layers, pp, first, last, vp


def test_stage_layers_is_megatron_cores_split():
    """Every split validate accepts is the one megatron-core builds (offset, layer count), for
    each model chunk of the interleaved schedule too."""
    layouts = list(_layouts())
    assert len(layouts) > 20 and any(f or l for _, _, f, l, _ in layouts)
    assert any(vp > 1 and (f or l) for _, _, f, l, vp in layouts)
    for layers, pp, first, last, vp in layouts:
        config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last,
                                   virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
        chunks = [(rank, stage) for stage in range(vp) for rank in range(pp)]
        got = [stage_layers(layers, rank, pp, first, last, stage, vp) for rank, stage in chunks]
        stages = [dict(pp_rank=rank, vp_stage=stage if vp > 1 else None)
                  for rank, stage in chunks]
        core = [range(get_transformer_layer_offset(config, **at),
                      get_transformer_layer_offset(config, **at)
                      + get_num_layers_to_build(config, **at)) for at in stages]
        assert got == core, (layers, pp, first, last, vp)
        # In schedule order (chunk 0 of every stage, then chunk 1 ...) the layers follow on.
        assert [i for r in got for i in r] == list(range(layers))


@pytest.mark.parametrize("first, last, expected", [
    (2, 3, "must add up to the 4 layers"),
    (0, None, "at least one layer"),
    (None, 4, "would hold 0"),
])
def test_a_split_that_does_not_fit_names_the_target_flag(hf_llama, tmp_path, first, last,
                                                         expected):
    extra = ["--target-pipeline-parallel-size", 2]
    extra += ["--target-decoder-first-pipeline-num-layers", first] if first is not None else []
    extra += ["--target-decoder-last-pipeline-num-layers", last] if last is not None else []
    with pytest.raises(ConversionError, match=f"--target-decoder-.*{expected}"):
        run_convert("hf", "mg", hf_llama, tmp_path / "mg", *extra)
    assert not (tmp_path / "mg").exists()


def test_uneven_checkpoint_converts_to_pp1_and_hf_and_computes_transformers_logits(
        hf_llama, tmp_path):
    uneven = run_convert("hf", "mg", hf_llama, tmp_path / "uneven",
                         "--target-pipeline-parallel-size", 2,
                         "--target-decoder-first-pipeline-num-layers", 1)
    layers = [sorted({k.split(".")[2] for k in fmt.load_rank_file(
        fmt.rank_file(uneven, 1, 0, pp, 2))["model"] if k.startswith("decoder.layers.")})
        for pp in range(2)]
    assert layers == [["0"], ["0", "1", "2"]]  # stage 1 holds global layers 1-3 as 0-2
    args = fmt.load_rank_file(fmt.rank_file(uneven, 1, 0, 0, 2))["args"]
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) \
        == (1, None)
    # Our model at that split (megatron-core's schedule, 2 stages x DP 2) gives transformers'
    # logits; an even-split model is refused by the saved args.
    per_rank = launch(_rank_logits, WORLD, [(uneven, 1, 2, False, False, UNEVEN)])
    expected = hf_logits(hf_llama)
    got = [r[0] for r in per_rank if r[0] is not None]
    assert len(got) == 2 and np.abs(expected).max() > 1.0
    for logits in got:
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    # -> PP1: the very tensors of a direct conversion; -> HF: the HF weights themselves.
    pp1 = run_convert("mg", "mg", uneven, tmp_path / "pp1")
    direct = run_convert("hf", "mg", hf_llama, tmp_path / "direct")
    load = lambda root: fmt.load_rank_file(fmt.rank_file(root, 1, 0, 0, 1))["model"]  # noqa: E731
    a, b = load(pp1), load(direct)
    assert_same_tensors({k: v for k, v in a.items() if torch.is_tensor(v)},
                        {k: v for k, v in b.items() if torch.is_tensor(v)})
    assert fmt.load_rank_file(fmt.rank_file(pp1, 1, 0, 0, 1))["args"] \
        .decoder_first_pipeline_num_layers is None
    back = run_convert("mg", "hf", uneven, tmp_path / "hf")
    assert_same_tensors(hf_state_dict(back), hf_state_dict(hf_llama))
