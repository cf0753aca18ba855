"""MindSpeed-LLM's flags as its dense Llama-family scripts write them: every one is accepted and
honoured, said once to have no effect, or refused in one line naming the way out, as
docs/megatron-compat.md says (the status in the flag data); the mapped ones act as theirs."""

import pytest

from megatron_ext.checkpoint.args import padded_vocab_size
from megatron_ext.checkpoint.format import TRACKER_FILENAME
from megatron_ext.config import ConfigError, build_parser, parse_args
from megatron_ext.config.compat import (MINDSPEED_PREPROCESS_FLAGS, MINDSPEED_SCRIPT_FLAGS,
                                        _flag_data)
from megatron_ext.config.flags import NO_OP, REFUSED, WARNED, known_flags
from megatron_ext.config.validate_compat import check_padded_vocab_size
from megatron_ext.data.cli import build_parser as preprocess_parser
from megatron_ext.data.cli import main as preprocess_main

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255").split()
MOCK = ["--mock-data"]
INSTRUCTION = ["--is-instruction-dataset", "--data-path", "sft"]
# The values their scripts give (sizes aside); nccl needs a GPU here, gloo is the way out.
VALUES = {
    "--adam-beta1": "0.9", "--adam-beta2": "0.95", "--attention-dropout": "0.0",
    "--ckpt-format": "torch", "--clip-grad": "1.0", "--context-parallel-algo": "megatron_cp_algo",
    "--context-parallel-size": "2", "--data-path": "enwiki_text_document",
    "--distributed-backend": "gloo", "--eval-interval": "1000", "--eval-iters": "0",
    "--ffn-hidden-size": "13824", "--global-batch-size": "8",
    "--handler-name": "GeneralPretrainHandler", "--hidden-dropout": "0.0", "--hidden-size": "64",
    "--high-freq-factor": "4.0", "--init-method-std": "0.01", "--initial-loss-scale": "4096",
    "--load": "ckpt", "--log-interval": "1", "--lora-alpha": "16", "--lora-r": "8",
    "--lora-target-modules": "linear_qkv", "--low-freq-factor": "1.0", "--lr": "1.25e-6",
    "--lr-decay-style": "cosine", "--lr-warmup-fraction": "0.01",
    "--make-vocab-size-divisible-by": "1", "--max-position-embeddings": "4096",
    "--micro-batch-size": "1", "--min-lr": "1e-8", "--model-type-hf": "llama2",
    "--norm-epsilon": "1e-5", "--normalization": "RMSNorm", "--num-attention-heads": "8",
    # An even list: their qwen25 script's --num-layers-per-virtual-pipeline-stage takes no
    # uneven split (Megatron-LM's rule; the uneven mapping: test_refusals_name_the_way_out).
    "--num-layer-list": "2,2", "--num-layers": "4",
    "--num-layers-per-virtual-pipeline-stage": "1", "--num-query-groups": "2",
    "--original-max-position-embeddings": "8192", "--padded-vocab-size": "152064",
    "--pipeline-model-parallel-size": "2", "--position-embedding-type": "rope",
    "--prompt-type": "qwen", "--recompute-activation-function-num-layers": "16",
    "--recompute-granularity": "full", "--recompute-method": "block",
    "--recompute-num-layers": "1", "--rope-scaling-factor": "8.0", "--rope-scaling-type": "llama3",
    "--rotary-base": "500000", "--rotary-percent": "1.0", "--save": "out",
    "--save-interval": "2000", "--seed": "42", "--seq-length": "32", "--split": "949,50,1",
    "--stage": "sft", "--tensor-model-parallel-size": "2", "--tokenizer-name-or-path": "tok",
    "--tokenizer-type": "PretrainedFromHF", "--train-iters": "5", "--transformer-impl": "local",
    "--vocab-size": "128256", "--weight-decay": "1e-1", "--local-rank": "0",
}
# What a flag needs beside it (as in their scripts).
CONTEXT = {
    "--num-layer-list": ["--num-layers", "4", "--pipeline-model-parallel-size", "2"],
    "--num-layers-per-virtual-pipeline-stage": ["--num-layers", "4",
                                                "--pipeline-model-parallel-size", "2",
                                                "--global-batch-size", "8"],
    "--num-query-groups": ["--group-query-attention"],
    "--group-query-attention": ["--num-query-groups", "2"],
    "--overlap-param-gather": ["--use-distributed-optimizer", "--overlap-grad-reduce"],
    "--recompute-method": ["--recompute-granularity", "full"],
    "--recompute-num-layers": ["--recompute-granularity", "full", "--recompute-method", "block"],
    "--recompute-granularity": ["--recompute-method", "block"],
    "--save-interval": ["--save", "out"],
    "--high-freq-factor": ["--rope-scaling-type", "llama3"],
    "--low-freq-factor": ["--rope-scaling-type", "llama3"],
    "--original-max-position-embeddings": ["--rope-scaling-type", "llama3"],
    "--tokenizer-type": ["--tokenizer-name-or-path", "tok"],
    "--enable-hf2mg-convert": ["--load", "{hf}"],
}
WORLD = {"--context-parallel-size": 2, "--tensor-model-parallel-size": 2,
         "--pipeline-model-parallel-size": 2, "--num-layer-list": 2,
         "--num-layers-per-virtual-pipeline-stage": 2}


def _hf_dir(path):
    """What --enable-hf2mg-convert checks --load for (the conversion itself runs at start-up)."""
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return str(path)


def _argv(flag, hf_dir=""):
    data = [] if flag == "--data-path" else (
        INSTRUCTION if flag in ("--stage", "--no-shuffle", "--is-instruction-dataset") else MOCK)
    value = [VALUES[flag]] if flag in VALUES else []
    context = [hf_dir if a == "{hf}" else a for a in CONTEXT.get(flag, [])]
    return BASE + data + context + [flag] + value


def _said(config, flag):
    return [n for n in config.notices if n.split(":")[0].split()[0] == flag]


def test_every_flag_of_their_scripts_is_known():
    assert set(MINDSPEED_SCRIPT_FLAGS) - set(known_flags(build_parser())) == set()
    assert set(MINDSPEED_PREPROCESS_FLAGS) - set(known_flags(preprocess_parser())) == set()


@pytest.mark.parametrize("flag", sorted(MINDSPEED_SCRIPT_FLAGS))
def test_each_flag_is_treated_as_documented(flag, tmp_path):
    status = _flag_data()[flag][1].metadata.get("status")
    world = WORLD.get(flag, 1)
    argv = _argv(flag, _hf_dir(tmp_path))
    if status == REFUSED:
        with pytest.raises(ConfigError) as info:
            parse_args(argv, world_size=world)
        assert flag in str(info.value) and "\n" not in str(info.value)
        return
    config = parse_args(argv, world_size=world)
    if status in (NO_OP, WARNED):
        assert len(_said(config, flag)) == 1, (flag, config.notices)


@pytest.mark.parametrize("script", sorted({s for scripts in MINDSPEED_SCRIPT_FLAGS.values()
                                           for s in scripts}))
def test_each_script_parses_as_a_whole(script, tmp_path):
    """All the flags of a script column together (their values, sizes shrunk), but the refused
    ones: accepted, each no-op said once."""
    flags = sorted(f for f, scripts in MINDSPEED_SCRIPT_FLAGS.items() if script in scripts)
    status = {f: _flag_data()[f][1].metadata.get("status") for f in flags}
    argv, world = [], 1
    for flag in flags:
        if status[flag] == REFUSED:
            continue
        value = VALUES.get(flag)
        if flag == "--load" and "--enable-hf2mg-convert" in flags:
            value = _hf_dir(tmp_path)
        argv += [flag] + ([value] if value is not None else [])
        world *= WORLD.get(flag, 1) if value == VALUES.get(flag) else 1
    config = parse_args(argv, world_size=world)
    for flag in flags:
        # --sequence-parallel is warned about with TP 1 only (TP is 2 here).
        if status[flag] in (NO_OP, WARNED) and flag != "--sequence-parallel":
            assert len(_said(config, flag)) == 1, (flag, config.notices)


def test_their_packed_fine_tuning_flags_are_accepted_and_said_once():
    """--pack --neat-pack --reset-attention-mask of their packed fine-tuning scripts (tune_*
    _pack): packed instruction shards always attend per conversation here."""
    config = parse_args(BASE + INSTRUCTION + ["--stage", "sft", "--pack", "--neat-pack",
                                              "--reset-attention-mask"], world_size=1)
    for flag in ("--pack", "--neat-pack"):
        assert len(_said(config, flag)) == 1, (flag, config.notices)


def test_flash_attention_and_rope_scaling_map_onto_ours():
    config = parse_args(BASE + MOCK + ["--use-flash-attn"])
    assert config.model.attention_backend == "auto"
    assert any(n.startswith("--use-flash-attn") for n in config.notices)
    config = parse_args(BASE + MOCK + ["--use-flash-attn", "--attention-backend", "sdpa"])
    assert config.model.attention_backend == "sdpa"
    config = parse_args(BASE + MOCK + "--rope-scaling-type llama3 --rope-scaling-factor 8.0 "
                        "--low-freq-factor 1.0 --high-freq-factor 4.0 "
                        "--original-max-position-embeddings 8192".split())
    assert config.model.use_rope_scaling and config.model.rope_scaling_factor == 8.0
    config = parse_args(BASE + MOCK + ["--use-rotary-position-embeddings"])
    assert config.model.position_embedding_type == "rope"
    config = parse_args(BASE + MOCK + ["--transformer-impl", "transformer_engine"])
    assert config.model.transformer_impl == "transformer_engine"
    assert _said(config, "--transformer-impl")[0].startswith(
        "--transformer-impl transformer_engine: runs as local")


@pytest.mark.parametrize("extra, expected", [
    ("--rope-scaling-type llama3 --high-freq-factor 2", "--high-freq-factor 2: megatron-core's"),
    ("--rope-scaling-type yarn", "only llama3"),
    ("--low-freq-factor 1", "add --rope-scaling-type llama3"),
    ("--stage dpo", "--stage dpo: DPO and the RL stages are not supported"),
    ("--stage sft", "add --is-instruction-dataset"),
    ("--no-shuffle", "always shuffles"),
    ("--tensor-model-parallel-size 2 --padded-vocab-size 255", "not divisible by"),
    ("--num-layers 4 --pipeline-model-parallel-size 2 --num-layer-list 0,4",
     "--num-layer-list 0,4: megatron-core gives only the first and the last stage"),
    ("--num-layers 4 --pipeline-model-parallel-size 2 --num-layer-list 1,3 "
     "--decoder-last-pipeline-num-layers 3", "both split the pipeline"),
])
def test_refusals_name_the_way_out(extra, expected):
    with pytest.raises(ConfigError) as info:
        parse_args(BASE + MOCK + extra.split(), world_size=2)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("extra, scheme", [
    ("--context-parallel-algo ulysses_cp_algo", ["a2a"]),
    ("--context-parallel-algo megatron_cp_algo --attention-dropout 0", ["p2p"]),
    ("--context-parallel-algo megatron_cp_algo", ["allgather"]),  # dropout 0.1: no ring
    ("--context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2 --attention-dropout 0",
     ["a2a+p2p"]),
    ("--context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2", ["allgather"]),
    ("--context-parallel-algo hybrid_adaptive_cp_algo", ["allgather"]),
    ("--context-parallel-algo ulysses_cp_algo --cp-comm-type allgather", ["allgather"]),
    ("--context-parallel-algo hybrid_cp_algo --cp-comm-type a2a", ["a2a"]),
])
def test_context_parallel_algo_runs_as_our_cp_comm_type(extra, scheme):
    """Ulysses is our a2a, Megatron's ring our p2p, the hybrid (Ulysses within groups of
    --ulysses-degree-in-cp, the ring across them) our a2a+p2p, the rings allgather with
    attention dropout (which they lack), the other hybrid allgather; an explicit
    --cp-comm-type wins."""
    config = parse_args(BASE + MOCK + ["--context-parallel-size", "4"] + extra.split(),
                        world_size=4)
    assert config.parallel.cp_comm_type == scheme
    # hybrid_cp_algo's groups are megatron-core's hierarchical CP groups [U, CP / U].
    assert config.parallel.hierarchical_context_parallel_sizes == (
        [2, 2] if scheme == ["a2a+p2p"] else None)
    [said] = _said(config, "--context-parallel-algo")
    assert f"--cp-comm-type {scheme[0]}" in said


@pytest.mark.parametrize("extra, expected", [
    ("--context-parallel-size 4 --context-parallel-algo hybrid_cp_algo", "--context-parallel-algo "
     "hybrid_cp_algo needs --ulysses-degree-in-cp U (the all-to-all within groups of U CP ranks, "
     "the ring across --context-parallel-size 4 / U of them)"),
    ("--context-parallel-size 4 --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 3",
     "--ulysses-degree-in-cp 3 does not divide --context-parallel-size 4"),
    ("--context-parallel-size 4 --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2 "
     "--hierarchical-context-parallel-sizes 4 1", "--hierarchical-context-parallel-sizes 4 1 "
     "differs from --context-parallel-algo hybrid_cp_algo's 2 2 (--ulysses-degree-in-cp 2)"),
    ("--context-parallel-size 4 --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 4 "
     "--attention-dropout 0 --group-query-attention --num-query-groups 2", "--cp-comm-type "
     "a2a+p2p (--context-parallel-algo hybrid_cp_algo) splits the heads of each tensor-parallel "
     "rank over the CP ranks: --num-query-groups 2 / --tensor-model-parallel-size 1 = 2 is not "
     "divisible by the all-to-all size 4"),
])
def test_hybrid_cp_algo_refusals_name_the_flag(extra, expected):
    with pytest.raises(ConfigError) as info:
        parse_args(BASE + MOCK + extra.split(), world_size=4)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_ulysses_degree_is_checked_only_with_hybrid_cp_and_context_parallelism():
    """As MindSpeed-LLM: without CP a script's degree is not checked; without hybrid_cp_algo
    it has no effect, said once."""
    config = parse_args(BASE + MOCK + "--context-parallel-algo hybrid_cp_algo "
                        "--ulysses-degree-in-cp 8 --attention-dropout 0".split())
    assert config.parallel.hierarchical_context_parallel_sizes == [1, 1]
    config = parse_args(BASE + MOCK + ["--ulysses-degree-in-cp", "2"])
    assert _said(config, "--ulysses-degree-in-cp") == [
        "--ulysses-degree-in-cp 2: no effect without --context-parallel-algo hybrid_cp_algo"]


def test_ulysses_needs_heads_divisible_by_cp_and_names_the_way_out():
    with pytest.raises(ConfigError) as info:
        parse_args(BASE + MOCK + "--context-parallel-size 2 --context-parallel-algo "
                   "ulysses_cp_algo --group-query-attention --num-query-groups 1".split(),
                   world_size=2)
    assert ("--cp-comm-type a2a (--context-parallel-algo ulysses_cp_algo) splits the heads"
            in str(info.value) and "use --cp-comm-type allgather" in str(info.value))


def test_hf2mg_convert_needs_a_hugging_face_model_in_load(tmp_path):
    argv = BASE + MOCK + ["--enable-hf2mg-convert", "--load", str(tmp_path)]
    with pytest.raises(ConfigError, match="holds no config.json with"):
        parse_args(argv)
    _hf_dir(tmp_path)
    parse_args(argv + ["--exit-on-missing-checkpoint"])  # the conversion will be there


def test_padded_vocab_size_gives_exactly_those_rows():
    config = parse_args(BASE + MOCK + "--tensor-model-parallel-size 2 --padded-vocab-size 300 "
                        "--make-vocab-size-divisible-by 1".split(), world_size=2)
    m = config.model
    assert padded_vocab_size(255, m.make_vocab_size_divisible_by, 2) == 300
    assert padded_vocab_size(300, m.make_vocab_size_divisible_by, 2) == 300
    check_padded_vocab_size(config, 300)
    with pytest.raises(ConfigError, match="--padded-vocab-size 300 is smaller"):
        check_padded_vocab_size(config, 301)


def test_uneven_layer_list_is_megatron_lms_first_and_last_stage_flags():
    """MindSpeed-LLM's list as megatron-core's split: first/last differ, the middle even."""
    argv = BASE + MOCK + "--num-layers 8 --pipeline-model-parallel-size 4".split()
    for listed, first, last in (("1,3,3,1", 1, 1), ("1,2,2,3", 1, 3), ("5,1,1,1", 5, None),
                                ("2,2,2,2", None, None)):
        p = parse_args(argv + ["--num-layer-list", listed], world_size=4).parallel
        assert (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) \
            == (first, last), listed
    with pytest.raises(ConfigError, match="--num-layer-list 1,3,2,2: megatron-core gives only"):
        parse_args(argv + ["--num-layer-list", "1,3,2,2"], world_size=4)


def test_even_layer_list_and_torch_distributed_launch_local_rank_are_accepted():
    config = parse_args(BASE + MOCK + "--pipeline-model-parallel-size 2 --num-layer-list 1,1 "
                        "--local-rank=1".split(), world_size=2)
    assert config.parallel.local_rank == 1
    assert parse_args(BASE + MOCK + ["--local_rank=0"]).parallel.local_rank == 0


def test_exit_on_missing_checkpoint(tmp_path):
    argv = BASE + MOCK + ["--exit-on-missing-checkpoint", "--load", str(tmp_path)]
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        parse_args(argv)
    (tmp_path / TRACKER_FILENAME).write_text("3")
    parse_args(argv)


def test_their_pretrain_handler_writes_what_no_handler_writes(tmp_path, capsys):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": "second document"}\n')
    common = ["--input", str(corpus), "--tokenizer-type", "ByteTokenizer", "--json-keys", "text",
              "--append-eod", "--workers", "1", "--log-interval", "1000"]
    preprocess_main(common + ["--output-prefix", str(tmp_path / "plain")])
    preprocess_main(common + ["--output-prefix", str(tmp_path / "ms"), "--handler-name",
                              "GeneralPretrainHandler", "--overwrite-cache",
                              "--tokenizer-not-use-fast"])
    assert "--overwrite-cache (MindSpeed-LLM's) has no effect" in capsys.readouterr().err
    for suffix in (".bin", ".idx"):
        plain = (tmp_path / f"plain_text_document{suffix}").read_bytes()
        assert plain and plain == (tmp_path / f"ms_text_document{suffix}").read_bytes()
