"""The pipeline's checks, part of ``validate``: --num-layers over the stages (evenly, or with
--decoder-first/last-pipeline-num-layers) and over the model chunks of the interleaved schedule
(--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank), with
Megatron-LM's rules (megatron/training/arguments.py) and megatron-core's schedule checks
(forward_backward_pipelining_with_interleaving), named by flag before any process group."""

from megatron_ext.checkpoint.sharding import split_problem
from megatron_ext.config.components import Config, require
from megatron_ext.config.schedule import BatchSizeSchedule, parse_step_schedule

_LAYERS_FLAG = "--num-layers-per-virtual-pipeline-stage"
_STAGES_FLAG = "--num-virtual-stages-per-pipeline-rank"
_GROUP_FLAG = "--microbatch-group-size-per-virtual-pipeline-stage"


def validate_pipeline(config: Config, dp: int) -> None:
    p, layers = config.parallel, config.model.num_layers
    pp = p.pipeline_model_parallel_size
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    problem = split_problem(layers, pp, first, last)
    require(problem is None, f"--num-layers {layers}: {problem}")
    vp = _virtual_stages(config)
    flag = _STAGES_FLAG if p.num_layers_per_virtual_pipeline_stage is None else _LAYERS_FLAG
    problem = split_problem(layers, pp, first, last, vp_size=vp, vp_flag=flag)
    require(problem is None, f"--num-layers {layers}: {problem}")
    # One flag holds the chunks from here on (Megatron-LM's virtual_pipeline_model_parallel_size,
    # None for one chunk), the one saved args take back (training/checkpoint_args.py).
    p.num_virtual_stages_per_pipeline_rank = vp if vp > 1 else None
    p.num_layers_per_virtual_pipeline_stage = None
    if vp == 1:
        for name, what in (("overlap_p2p_comm", "--no-overlap-p2p-communication"),
                           ("microbatch_group_size_per_virtual_pipeline_stage", _GROUP_FLAG)):
            if name in config.given:
                config.notices.append(f"{what}: no effect without the interleaved schedule "
                                      f"({_LAYERS_FLAG} or {_STAGES_FLAG})")
        p.overlap_p2p_comm = False  # Megatron-LM's: the plain 1F1B schedule does not overlap
        p.microbatch_group_size_per_virtual_pipeline_stage = None
        return
    require(config.logging.eval_prompts is None,
            f"--eval-prompts with {flag}: decoding runs one model chunk per pipeline stage; "
            "drop --eval-prompts and run generate_gpt.py on a checkpoint")
    # Without overlap, megatron-core batches the sends and receives of a step: with two stages
    # both directions would go between the same two ranks in one batch.
    require(p.overlap_p2p_comm or pp > 2,
            f"{flag} with --no-overlap-p2p-communication needs --pipeline-model-parallel-size "
            f"> 2 (now {pp}); drop --no-overlap-p2p-communication")
    _validate_microbatch_groups(config, dp, pp)


def _virtual_stages(config: Config) -> int:
    p, layers = config.parallel, config.model.num_layers
    pp = p.pipeline_model_parallel_size
    per_chunk = p.num_layers_per_virtual_pipeline_stage
    chunks = p.num_virtual_stages_per_pipeline_rank
    if per_chunk is None and chunks is None:
        return 1
    require(per_chunk is None or chunks is None,
            f"{_LAYERS_FLAG} and {_STAGES_FLAG} both set the model chunks; give one of them")
    require(pp > 1, f"{_LAYERS_FLAG if chunks is None else _STAGES_FLAG}: the interleaved "
            f"schedule needs --pipeline-model-parallel-size > 1 (now {pp})")
    if chunks is not None:
        require(chunks >= 1, f"{_STAGES_FLAG} {chunks}: must be >= 1")
        return chunks
    require(per_chunk >= 1, f"{_LAYERS_FLAG} {per_chunk}: must be >= 1")
    uneven = [f for f in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")
              if getattr(p, f) is not None]
    require(not uneven, f"{_LAYERS_FLAG} with --{(uneven or ['x'])[0].replace('_', '-')}: give "
            f"the chunks per stage with {_STAGES_FLAG} instead (as Megatron-LM)")
    per_stage = layers // pp
    require(per_stage % per_chunk == 0,
            f"{_LAYERS_FLAG} {per_chunk}: the {per_stage} layers of each pipeline stage "
            f"(--num-layers {layers} / --pipeline-model-parallel-size {pp}) are not a multiple")
    return per_stage // per_chunk


def _validate_microbatch_groups(config: Config, dp: int, pp: int) -> None:
    """megatron-core's interleaved schedule runs micro-batches in groups of G (default PP) per
    model chunk: G in [PP, M] and the last group empty or at least PP, for every micro-batch
    count M of the run (a batch-size ramp-up has several)."""
    p, t = config.parallel, config.training
    group = p.microbatch_group_size_per_virtual_pipeline_stage or pp
    given = p.microbatch_group_size_per_virtual_pipeline_stage is not None
    steps = (parse_step_schedule(t.step_batch_size_schedule, config.model.seq_length)
             if t.step_batch_size_schedule else None)
    for size in BatchSizeSchedule(t.global_batch_size, t.rampup_batch_size, steps).sizes():
        micro = size // (t.micro_batch_size * dp)
        where = (f"--global-batch-size {size} / (--micro-batch-size {t.micro_batch_size} x "
                 f"data-parallel size {dp}) = {micro} micro-batches")
        group_text = (f"{_GROUP_FLAG} {group}" if given else
                      f"{group} (--pipeline-model-parallel-size, the default of {_GROUP_FLAG})")
        require(pp <= group <= micro,
                f"the interleaved schedule runs micro-batches in groups of {group_text} per "
                f"model chunk, between --pipeline-model-parallel-size {pp} and the {where}; "
                f"raise --global-batch-size or change {_GROUP_FLAG}")
        require(not 0 < micro % group < pp,
                f"the interleaved schedule's micro-batch groups of {group_text}: the {where} "
                f"leave a last group of {micro % group}, fewer than --pipeline-model-parallel-"
                f"size {pp}; make the micro-batches a multiple of {group} (or of a size giving "
                f"a last group of {pp} or more)")
