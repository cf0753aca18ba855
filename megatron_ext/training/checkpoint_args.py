"""Flags read from the checkpoint in ``--load``: its saved ``args`` (``read_checkpoint``, for
generation too) and Megatron-LM's ``--use-checkpoint-args`` for training.

``--use-checkpoint-args`` follows Megatron-LM's ``load_args_from_checkpoint`` (core_v0.16 to
0.19): the sizes (``IF_NOT_GIVEN``) are taken where the command line leaves them out, the shape
of the model (``FORCED``) even over the command line, the tokenizer (unless
``--no-use-tokenizer-model-from-checkpoint-args``) too, with its other files (``--vocab-file``
...) where not given (Megatron-LM leaves them to the command line), and the TP/PP layout only
with ``--use-mp-args-from-checkpoint-args``. Everything else stays the run's (Megatron-LM takes
neither ``--norm-epsilon`` nor ``--use-rope-scaling``, say: ``check_compatible`` names a
difference when the checkpoint is loaded). Its MoE, Mamba, MTP and hybrid args are not taken:
those models are not supported here. It runs on the parsed flags, before validation and before
any process group, after the checks of the files of ``--load`` (checkpoint_checks.py).
"""

from pathlib import Path
from typing import List

from megatron_ext.checkpoint import format as ckpt
from megatron_ext.checkpoint.args import fill_flags, fill_tokenizer_flags
from megatron_ext.checkpoint.dist_format import is_dist_checkpoint
from megatron_ext.config import ConfigError
from megatron_ext.training import checkpoint_checks, dist_checkpoint

IF_NOT_GIVEN = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length",
                "num_attention_heads", "kv_channels", "max_position_embeddings")
FORCED = ("num_query_groups", "group_query_attention", "position_embedding_type",
          "rotary_base", "rotary_percent", "disable_bias_linear", "add_qkv_bias", "swiglu",
          "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization",
          "attention_dropout", "hidden_dropout", "tiktoken_pattern")
TOKENIZER = ("tokenizer_model", "tokenizer_type")
LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
          "expert_model_parallel_size")
# Megatron-LM takes neither uneven-split flag; here the split is part of the layout taken (at
# the saved PP, a torch-format checkpoint loads at its own split only).
LAYOUT_IF_NOT_GIVEN = ("num_layers_per_virtual_pipeline_stage",
                       "num_virtual_stages_per_pipeline_rank",
                       "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")


def read_checkpoint(load_dir):
    """(iteration, format, saved args) of the latest checkpoint in ``load_dir``."""
    iteration = ckpt.read_tracker(load_dir)
    if iteration is None:
        raise ckpt.CheckpointError(f"--load {load_dir}: no {ckpt.TRACKER_FILENAME} there, so no "
                                   f"checkpoint to read")
    directory = ckpt.iteration_dir(load_dir, iteration)
    if is_dist_checkpoint(directory):
        return iteration, dist_checkpoint.FORMAT, dist_checkpoint.saved_args(directory)
    files = sorted(directory.glob("mp_rank_*/" + ckpt.RANK_FILENAME))
    if not files:
        raise ckpt.CheckpointError(f"{directory} holds neither a torch_dist checkpoint nor "
                                   f"mp_rank_*/{ckpt.RANK_FILENAME} files")
    return iteration, "torch", ckpt.load_rank_file(files[0]).get("args")


def take_checkpoint_args(args) -> List[str]:
    """With ``--use-checkpoint-args``, set the parsed flags ``args`` from the checkpoints in
    ``--pretrained-checkpoint`` and ``--load`` as Megatron-LM does; the notices to log (what
    was taken, what was replaced). A damaged checkpoint is a ConfigError naming the flag,
    raised on every rank alike."""
    if not args.use_checkpoint_args:
        return []
    try:
        return _take(args)
    except ckpt.CheckpointError as error:
        raise ConfigError(f"--use-checkpoint-args: {error}") from None


def _take(args) -> List[str]:
    if not args.load and not args.pretrained_checkpoint:
        raise ConfigError("--use-checkpoint-args takes the model flags from the checkpoint in "
                          "--load (or --pretrained-checkpoint): give --load CHECKPOINT_DIR")
    if args.enable_hf2mg_convert:
        raise ConfigError("--use-checkpoint-args reads a Megatron checkpoint's args; with "
                          "--enable-hf2mg-convert, --load is a Hugging Face model (its "
                          "config.json gives the model): drop one of them")
    # Megatron-LM reads --pretrained-checkpoint's args, then --load's over them.
    notices, taken = [], False
    for flag, root in (("--pretrained-checkpoint", args.pretrained_checkpoint),
                       ("--load", args.load)):
        if root:
            read, said = _take_from(args, flag, root)
            notices, taken = notices + said, taken or read
    if not taken:  # Megatron-LM: "using provided arguments"
        notices.append("--use-checkpoint-args: no checkpoint to read; the model flags of the "
                       "command line are used")
    return notices


def _take_from(args, flag: str, root):
    """Whether the checkpoint in ``root`` (given as ``flag``) gave flags, and the notices."""
    checkpoint_checks.check_load_dir(root, flag)
    if ckpt.read_tracker(Path(root)) is None:
        return False, [f"--use-checkpoint-args: {flag} {root} holds no checkpoint yet"]
    iteration, _, saved = read_checkpoint(root)
    directory = ckpt.iteration_dir(root, iteration)
    if saved is None:
        return False, [f"--use-checkpoint-args: {directory} saved no args"]
    names, forced = IF_NOT_GIVEN, FORCED
    if args.use_mp_args_from_checkpoint_args:
        names, forced = names + LAYOUT_IF_NOT_GIVEN, forced + LAYOUT
    replaced = fill_flags(args, saved, names, forced)
    if args.use_tokenizer_model_from_checkpoint_args is not False:
        replaced += fill_tokenizer_flags(
            args, saved, TOKENIZER, " with --no-use-tokenizer-model-from-checkpoint-args")
    notices = [f"--use-checkpoint-args: --{name.replace('_', '-')} {taken} from {directory} "
               f"replaces the command line's {given}" for name, given, taken in replaced]
    return True, notices + [f"--use-checkpoint-args: the model flags come from {directory}'s args"]
