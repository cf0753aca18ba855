"""Megatron-LM's flags as its scripts write them: accepted with its meaning and value syntax,
then honoured, said to be a no-op, warned and disabled, or refused naming the way out; the
compatibility doc is generated from the same flag data and must be current."""

import os
import subprocess
import sys

import pytest

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.config.compat import SCRIPT_FLAGS, render
from megatron_ext.config.flags import known_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255 --mock-data").split()
# Added by the tokenizer work of issue 11 (another branch).
def _parse(extra, world_size=1):
    return parse_args(BASE + extra, world_size=world_size)


def test_committed_compat_doc_is_generated_from_the_flag_data():
    with open(os.path.join(ROOT, "docs", "megatron-compat.md")) as handle:
        assert handle.read() == render(), ("docs/megatron-compat.md is stale: run python -m "
                                           "megatron_ext.config.compat > docs/megatron-compat.md")


def test_every_flag_of_the_example_scripts_is_known():
    from megatron_ext.config import build_parser

    assert set(SCRIPT_FLAGS) - set(known_flags(build_parser())) == set()


def test_help_lists_flags_by_megatron_group_with_defaults():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for group in ("network size:", "learning rate:", "distributed:", "data and dataloader:",
                  "logging:", "transformer-engine:"):
        assert f"\n{group}\n" in out, group
    assert "Fraction of each head's dimensions that RoPE rotates. (default: 1.0)" in " ".join(
        out.split())


def test_script_quoting_and_value_syntax():
    config = _parse(["--split", "'99,1,0'", "--step-batch-size-schedule", "0:4", "2.4K:8",
                     "--train-samples", "40"])
    assert config.data.split == "99,1,0"
    # 2400 tokens / seq-length 16 = 150 samples: batch 4 until then, 40 samples = 10 steps.
    assert config.training.global_batch_size == 8 and config.training.train_iters == 10


def test_sample_based_schedule_is_derived_as_megatron_lm_does():
    t = _parse("--global-batch-size 8 --rampup-batch-size 4 4 8 --train-samples 48 "
               "--lr-warmup-fraction 0.25".split()).training
    # Ramp-up: 4, 4, 8 (16 samples in 3 steps), then (48 - 16) // 8 = 4 more.
    assert (t.train_iters, t.lr_decay_samples, t.lr_warmup_samples) == (7, 48, 12)
    t = _parse("--global-batch-size 8 --train-iters 5 --lr-decay-iters 4 "
               "--lr-warmup-iters 1".split()).training
    assert (t.train_samples, t.lr_decay_samples, t.lr_warmup_samples) == (40, 32, 8)


@pytest.mark.parametrize("extra, expected", [
    ("--train-iters 5 --train-samples 40", "--train-iters and --train-samples are exclusive"),
    ("--train-samples 40 --lr-decay-iters 4", "--lr-decay-iters with --train-samples"),
    ("--train-iters 5 --lr-warmup-samples 8", "--lr-warmup-samples with --train-iters"),
    ("--global-batch-size 8 --rampup-batch-size 3 4 8", "--rampup-batch-size 3 4 8"),
    ("--global-batch-size 8 --step-batch-size-schedule 16:4 0:8",
     "--global-batch-size 8 differs"),
    ("--micro-batch-size 4 --step-batch-size-schedule 0:4 1K:6",
     "--global-batch-size 6 is not divisible"),
    ("--overlap-param-gather --overlap-grad-reduce", "needs --use-distributed-optimizer"),
    ("--fp8-format hybrid --fp8-amax-history-len 1024", "--fp8-amax-history-len --fp8-format: "
     "FP8 needs Transformer Engine"),
    ("--num-experts 8 --moe-router-topk 2", "--moe-router-topk --num-experts: MoE is not "
     "supported yet"),
    ("--context-parallel-size 2 --cp-comm-type p2p", "--cp-comm-type p2p (ring attention) has "
     "no attention dropout: pass --attention-dropout 0 (now 0.1; Megatron-LM's default is 0.1)"),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p", "--cp-comm-type a2a+p2p needs "
     "--hierarchical-context-parallel-sizes A B: the all-to-all within groups of A adjacent CP "
     "ranks, the ring across B of them, A x B = --context-parallel-size 4"),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 2 "
     "1", "--hierarchical-context-parallel-sizes 2 1: a2a+p2p takes two sizes A B >= 1 (the "
     "all-to-all within groups of A, the ring across B) with A x B = --context-parallel-size 4"),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 2 "
     "1 2", "--hierarchical-context-parallel-sizes 2 1 2: a2a+p2p takes two sizes"),
    ("--context-parallel-size 4 --hierarchical-context-parallel-sizes 2 1",
     "--hierarchical-context-parallel-sizes 2 1: sizes >= 1 whose product is "
     "--context-parallel-size 4"),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 2 "
     "2 --attention-dropout 0.1", "--cp-comm-type a2a+p2p (ring attention) has no attention "
     "dropout: pass --attention-dropout 0 (now 0.1"),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 2 "
     "2 --attention-dropout 0 --group-query-attention --num-query-groups 1", "--cp-comm-type "
     "a2a+p2p splits the heads of each tensor-parallel rank over the CP ranks: "
     "--num-query-groups 1 / --tensor-model-parallel-size 1 = 1 is not divisible by the "
     "all-to-all size 2 (the first of --hierarchical-context-parallel-sizes 2 2); change them "
     "or use --cp-comm-type allgather"),
    ("--context-parallel-size 2 --cp-comm-type a2a allgather a2a", "--cp-comm-type has 3 "
     "values: give one, or one per layer (--num-layers 2)"),
    ("--context-parallel-size 2 --cp-comm-type a2a --group-query-attention --num-query-groups 1",
     "--cp-comm-type a2a splits the heads of each tensor-parallel rank over the CP ranks: "
     "--num-query-groups 1 / --tensor-model-parallel-size 1 = 1 is not divisible by "
     "--context-parallel-size 2; change them or use --cp-comm-type allgather"),
    ("--context-parallel-size 2 --tensor-model-parallel-size 2 --cp-comm-type allgather a2a "
     "--group-query-attention --num-query-groups 2", "--num-query-groups 2 / "
     "--tensor-model-parallel-size 2 = 1 is not divisible by --context-parallel-size 2"),
    ("--no-position-embedding", "use --position-embedding-type rope"),
    ("--multiple-validation-sets", "--multiple-validation-sets evaluates each "
     "--valid-data-path dataset on its own; give the validation datasets with"),
])
def test_refusals_are_one_line_with_the_way_out(extra, expected):
    with pytest.raises(ConfigError) as info:
        _parse(extra.split(), world_size=2 if "overlap" in extra else
               4 if "parallel-size" in extra else 1)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_context_parallel_checks_are_megatron_lms():
    """Megatron-LM checks --cp-comm-type's per-layer length only with CP (a script sweeping
    --context-parallel-size keeps its list at 1), and accepts hierarchical sizes for any
    scheme when their product is the CP size: so do we, saying the sub-groups are unused."""
    config = _parse("--cp-comm-type a2a allgather a2a".split())
    assert config.parallel.cp_comm_type == ["a2a", "allgather", "a2a"]
    config = _parse("--context-parallel-size 4 --cp-comm-type p2p --attention-dropout 0 "
                    "--hierarchical-context-parallel-sizes 2 2".split(), world_size=4)
    assert config.parallel.hierarchical_context_parallel_sizes == [2, 2]
    assert [n for n in config.notices if n.startswith("--hierarchical-context-parallel-sizes")
            ] == ["--hierarchical-context-parallel-sizes 2 2 without --cp-comm-type a2a+p2p: "
                  "megatron-core builds the CP sub-groups, no layer's scheme uses them"]


def test_adapted_flags_are_noted_once():
    config = _parse("--sequence-parallel --attention-backend unfused --use-mcore-models "
                    "--no-create-attention-mask-in-dataloader --grad-reduce-in-bf16".split())
    assert not config.parallel.sequence_parallel
    assert config.model.attention_backend == "sdpa"
    assert len(config.notices) == 5, config.notices
    assert config.notices[0].startswith("--sequence-parallel with --tensor-model-parallel-size 1")


def test_megatron_lm_dist_ckpt_flags_are_accepted_and_noted():
    """The dist-ckpt flags Megatron-LM's scripts pass (tuning, deprecated): each a no-op here,
    said once; --dist-ckpt-strictness is honoured (training/dist_checkpoint.py) and refuses the
    return_* values, which hand the mismatches to a caller the command line does not have."""
    flags = ["--ckpt-fully-parallel-save", "--no-ckpt-fully-parallel-save",
             "--ckpt-fully-parallel-load", "--ckpt-assume-constant-structure", "--use-dist-ckpt",
             "--auto-detect-ckpt-format"]
    config = _parse(flags + ["--dist-ckpt-format", "torch_dist",
                             "--dist-ckpt-strictness", "log_all"])
    noted = sorted(notice.split(":")[0] for notice in config.notices)
    assert noted == sorted(flags + ["--dist-ckpt-format"]), config.notices
    assert config.checkpoint.dist_ckpt_strictness == "log_all"
    with pytest.raises(SystemExit):
        _parse(["--dist-ckpt-strictness", "return_all"])
