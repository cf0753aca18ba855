"""The checks of flags that other frameworks' launch scripts pass (MindSpeed-LLM's, and the
Megatron-LM flags only those scripts use): each is mapped onto ours, said once as a no-op, or
refused naming the way out (their statuses are in config/mindspeed.py and the doc)."""

import os
from dataclasses import fields

from megatron_ext.checkpoint.format import TRACKER_FILENAME
from megatron_ext.config.checkpoint import CheckpointConfig
from megatron_ext.config.components import Config, ConfigError, require
from megatron_ext.config.flags import NO_OP, WARNED, flag_name
from megatron_ext.config.mindspeed import CP_ALGO_NOTES, LLAMA3_ROPE, MindSpeedConfig
from megatron_ext.config.model import ModelConfig
from megatron_ext.config.parallel import CP_A2A, CP_A2A_P2P, CP_ALLGATHER, CP_P2P, CP_RINGS


def validate_compat(config: Config) -> None:
    _say_no_ops(config)
    _attention(config)
    _positions(config)
    _vocabulary(config)
    _fine_tuning(config)
    _layout(config)
    _checkpoint(config)


def _say_no_ops(config: Config) -> None:
    """One notice per accepted flag that changes nothing here, with why (its note)."""
    megatron = {"attention_softmax_in_fp32", "gradient_accumulation_fusion", "save_optim",
                "save_rng"}
    candidates = list(fields(MindSpeedConfig)) + [
        f for cls in (ModelConfig, CheckpointConfig) for f in fields(cls) if f.name in megatron]
    for f in candidates:
        status = f.metadata.get("status")
        if f.name in config.given and status in (NO_OP, WARNED):
            what = "no effect" if status == NO_OP else "not honoured"
            config.notices.append(f"{flag_name(f)}: {what} ({f.metadata['note']})")


def _attention(config: Config) -> None:
    m, ms, given = config.model, config.mindspeed, config.given
    if ms.use_flash_attn:
        if "attention_backend" in given:
            config.notices.append(f"--use-flash-attn with --attention-backend "
                                  f"{m.attention_backend}: the --attention-backend runs")
        else:
            m.attention_backend = "auto"
            config.notices.append("--use-flash-attn (MindSpeed-LLM's) runs as our "
                                  "--attention-backend auto: flash-attn where it can run here, "
                                  "else the exact torch varlen or SDPA kernel (the start-up "
                                  "summary names it)")
    if m.transformer_impl == "transformer_engine" and "transformer_impl" in given:
        config.notices.append("--transformer-impl transformer_engine: runs as local "
                              "(megatron-core's own layers; Transformer Engine is not wired yet)")
    _context_parallel_algo(config)


def _context_parallel_algo(config: Config) -> None:
    m, ms, p, given = config.model, config.mindspeed, config.parallel, config.given
    algo = ms.context_parallel_algo
    if ms.ulysses_degree_in_cp is not None and algo != "hybrid_cp_algo":
        config.notices.append(f"--ulysses-degree-in-cp {ms.ulysses_degree_in_cp}: no effect "
                              "without --context-parallel-algo hybrid_cp_algo")
    if algo is None:
        return
    if "cp_comm_type" in given:
        config.notices.append(f"--context-parallel-algo {algo} with --cp-comm-type "
                              f"{' '.join(p.cp_comm_type)}: the --cp-comm-type runs")
        return
    scheme = {"ulysses_cp_algo": CP_A2A, "megatron_cp_algo": CP_P2P,
              "hybrid_cp_algo": CP_A2A_P2P}.get(algo, CP_ALLGATHER)
    why = CP_ALGO_NOTES[scheme]
    sizes = _ulysses_and_ring(config) if scheme == CP_A2A_P2P else None
    if scheme in CP_RINGS and m.attention_dropout > 0:
        # Our rings have no attention dropout; allgather gives their numbers with it.
        why = (f"{CP_ALGO_NOTES[CP_ALLGATHER]}; not {scheme}, whose ring has no attention "
               f"dropout (--attention-dropout {m.attention_dropout})")
        scheme = CP_ALLGATHER
    p.cp_comm_type = [scheme]
    if scheme == CP_A2A_P2P:
        p.hierarchical_context_parallel_sizes = sizes
        why = f"{why}: --hierarchical-context-parallel-sizes {sizes[0]} {sizes[1]}"
    config.notices.append(f"--context-parallel-algo {algo}: runs as --cp-comm-type "
                          f"{scheme} ({why})")


def _ulysses_and_ring(config: Config) -> list:
    """hybrid_cp_algo's groups as megatron-core's hierarchical CP sizes: MindSpeed puts each
    Ulysses group on U adjacent CP ranks and each ring on every U-th one, which is the order of
    --hierarchical-context-parallel-sizes U CP/U. MindSpeed-LLM checks the degree only with CP
    (and refuses U = CP, a ring of one, which runs here as a2a would)."""
    p, cp = config.parallel, config.parallel.context_parallel_size
    ulysses = config.mindspeed.ulysses_degree_in_cp if cp > 1 else 1
    require(ulysses is not None,
             f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp U (the "
             f"all-to-all within groups of U CP ranks, the ring across --context-parallel-size "
             f"{cp} / U of them)")
    require(ulysses >= 1 and cp % ulysses == 0,
             f"--ulysses-degree-in-cp {ulysses} does not divide --context-parallel-size {cp}")
    sizes = [ulysses, cp // ulysses]
    require(p.hierarchical_context_parallel_sizes in (None, sizes),
             f"--hierarchical-context-parallel-sizes "
             f"{' '.join(map(str, p.hierarchical_context_parallel_sizes or ()))} differs from "
             f"--context-parallel-algo hybrid_cp_algo's {sizes[0]} {sizes[1]} "
             f"(--ulysses-degree-in-cp {ulysses}): drop one")
    return sizes


def _positions(config: Config) -> None:
    m, ms = config.model, config.mindspeed
    if m.use_rotary_position_embeddings:
        require("position_embedding_type" not in config.given
                 or m.position_embedding_type == "rope",
                 f"--use-rotary-position-embeddings with --position-embedding-type "
                 f"{m.position_embedding_type}: pick one")
        m.position_embedding_type = "rope"
    factors = {name: getattr(ms, name) for name in LLAMA3_ROPE if getattr(ms, name) is not None}
    if ms.rope_scaling_type is None:
        require(not factors or m.use_rope_scaling,
                 f"--{next(iter(factors), '').replace('_', '-')} is a Llama 3.1 RoPE scaling "
                 "factor: add --rope-scaling-type llama3 (or drop it)")
    else:
        require(ms.rope_scaling_type == "llama3",
                 f"--rope-scaling-type {ms.rope_scaling_type}: only llama3 (megatron-core's "
                 "Llama 3.1 scaling) is supported; drop it to train without RoPE scaling")
        m.use_rope_scaling = True
    for name, value in factors.items():
        require(value == LLAMA3_ROPE[name],
                 f"--{name.replace('_', '-')} {value:g}: megatron-core's Llama 3.1 scaling "
                 f"fixes it at {LLAMA3_ROPE[name]:g}; pass {LLAMA3_ROPE[name]:g} or drop it")


def _vocabulary(config: Config) -> None:
    m, ms, tp = config.model, config.mindspeed, config.parallel.tensor_model_parallel_size
    if ms.padded_vocab_size is None:
        return
    rows = ms.padded_vocab_size
    require(rows > 0 and rows % tp == 0, f"--padded-vocab-size {rows} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if "make_vocab_size_divisible_by" in config.given:
        config.notices.append(f"--make-vocab-size-divisible-by {m.make_vocab_size_divisible_by}: "
                              f"replaced by --padded-vocab-size {rows} (MindSpeed-LLM's rule)")
    # One multiple of (rows / TP) x TP holds any vocabulary up to rows: exactly rows rows.
    m.make_vocab_size_divisible_by = rows // tp


def check_padded_vocab_size(config: Config, vocab_size: int) -> None:
    """--padded-vocab-size must hold the tokenizer's vocabulary (known once it is built)."""
    rows = config.mindspeed.padded_vocab_size
    require(rows is None or vocab_size <= rows,
             f"--padded-vocab-size {rows} is smaller than the tokenizer's {vocab_size} tokens; "
             f"raise it (or drop it to pad by --make-vocab-size-divisible-by)")


def _fine_tuning(config: Config) -> None:
    ms, instruction = config.mindspeed, config.data.is_instruction_dataset
    if ms.stage is not None:
        require(ms.stage == "sft", f"--stage {ms.stage}: DPO and the RL stages are not "
                 "supported; fine-tune with --stage sft (instruction data) or drop --stage to "
                 "pretrain")
        require(instruction, "--stage sft trains on instruction shards: add "
                 "--is-instruction-dataset (with --data-path from preprocess_data.py "
                 "--handler-name ...)")
    require(not ms.no_shuffle or instruction, "--no-shuffle: megatron-core's pretraining "
             "dataset always shuffles (by --seed, reproducibly); drop it, or use it with "
             "--is-instruction-dataset")


def _layout(config: Config) -> None:
    ms, p, m = config.mindspeed, config.parallel, config.model
    if ms.num_layer_list is None:
        return
    pp = p.pipeline_model_parallel_size
    try:
        layers = [int(n) for n in ms.num_layer_list.split(",")]
    except ValueError:
        raise ConfigError(f"--num-layer-list {ms.num_layer_list!r}: expected numbers like "
                          "4,4,4,4") from None
    require(len(layers) == pp and sum(layers) == m.num_layers,
             f"--num-layer-list {ms.num_layer_list}: needs {pp} stages (one per "
             f"--pipeline-model-parallel-size) adding up to --num-layers {m.num_layers}")
    given = [f for f in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")
             if getattr(p, f) is not None]
    require(not given, f"--num-layer-list {ms.num_layer_list} and "
             f"--{given[0].replace('_', '-') if given else ''}: both split the pipeline; "
             f"give one of them")
    if len(set(layers)) == 1:
        config.notices.append(f"--num-layer-list {ms.num_layer_list}: even stages, as without it")
        return
    # megatron-core splits unevenly by the first and last stage only (the stages between share
    # the rest evenly): a list whose middle stages differ is not expressible.
    require(len(set(layers[1:-1])) <= 1 and min(layers) > 0,
             f"--num-layer-list {ms.num_layer_list}: megatron-core gives only the first and the "
             f"last stage their own number of layers, the stages between equal ones (e.g. "
             f"3,4,4,5), and every stage one at least; change the list or drop it (even split)")
    middle = layers[1] if pp > 2 else None
    p.decoder_first_pipeline_num_layers = layers[0] if layers[0] != middle else None
    p.decoder_last_pipeline_num_layers = layers[-1] if layers[-1] != middle else None
    config.notices.append(f"--num-layer-list {ms.num_layer_list}: as " + " ".join(
        f"--decoder-{which}-pipeline-num-layers {value}" for which, value in
        (("first", p.decoder_first_pipeline_num_layers),
         ("last", p.decoder_last_pipeline_num_layers)) if value is not None))


def _checkpoint(config: Config) -> None:
    c, ms = config.checkpoint, config.mindspeed
    require(not (c.pretrained_checkpoint and ms.enable_hf2mg_convert),
            "--pretrained-checkpoint gives a Megatron checkpoint to fine-tune from, "
            "--enable-hf2mg-convert a Hugging Face model in --load: drop one of them")
    # With --enable-hf2mg-convert, --load becomes the conversion (always there once started);
    # with --pretrained-checkpoint, a --load without a checkpoint loads that one instead.
    if c.exit_on_missing_checkpoint and c.load and not ms.enable_hf2mg_convert \
            and not c.pretrained_checkpoint:
        require(os.path.isfile(os.path.join(c.load, TRACKER_FILENAME)),
                 f"--exit-on-missing-checkpoint: --load {c.load} holds no checkpoint (no "
                 f"{TRACKER_FILENAME}); fix --load or drop the flag to start from scratch")
    if ms.model_type_hf is not None and not ms.enable_hf2mg_convert:
        config.notices.append(f"--model-type-hf {ms.model_type_hf}: no effect without "
                              "--enable-hf2mg-convert")
    if ms.enable_hf2mg_convert:
        load = c.load or ""
        files = os.listdir(load) if os.path.isdir(load) else []
        require("config.json" in files and any(
            f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
            for f in files), f"--enable-hf2mg-convert converts the Hugging Face model in --load: "
            f"{load or '(no --load)'} holds no config.json with *.safetensors weights; give "
            "--load HF_MODEL_DIR (convert_ckpt.py --load-model-type hf converts one by hand)")
