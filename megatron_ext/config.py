"""Typed configuration built from Megatron-LM flag names, validated in one place.

Every component gets its own dataclass; ``parse_args`` builds them from argparse and
``validate`` checks them together (and against the world size) so that a bad flag is reported
on every rank, naming the flag, before any process group exists.
"""

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch

from megatron_ext import platform


DATA_CACHE_DIR = "data_cache"


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default: 4h, or 2/3 of it rounded down to a multiple of 64 for SwiGLU."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


class ConfigError(ValueError):
    """A flag value (or combination) that cannot work; the message names the flag to change."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    distributed_backend: Optional[str] = None  # None: nccl with a GPU, gloo without


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 4
    group_query_attention: bool = False
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    untie_embeddings_and_output_weights: bool = False
    disable_bias_linear: bool = False
    add_qkv_bias: bool = False
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    attention_backend: str = "auto"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    bf16: bool = False
    fp16: bool = False

    @property
    def params_dtype(self):
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    train_iters: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    initial_loss_scale: float = 2.0**32
    seed: int = 1234
    exit_interval: Optional[int] = None


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    # GPT2BPETokenizer's files and TikTokenizer's layout (megatron_ext/tokenizer/).
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tiktoken_pattern: Optional[str] = None
    tiktoken_num_special_tokens: int = 1000
    tokenizer_special_tokens: Optional[List[str]] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mock_data: bool = False
    # Dataset index caches (megatron-core's GPTDataset/BlendedDataset .npy files). Default
    # (validate): DATA_CACHE_DIR under --save, else under .cache/ in the working directory;
    # never megatron-core's default of a folder beside each shard prefix.
    data_cache_path: Optional[str] = None
    # Fine-tuning on instruction shards (PREFIX_input_ids/loss_mask_document): see
    # megatron_ext/training/sft_dataset.py and docs/finetune.md.
    is_instruction_dataset: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    tensorboard_dir: Optional[str] = None
    # Every rank logs at INFO and library warnings/INFO dumps are shown unfiltered
    # (megatron_ext/training/logs.py).
    verbose: bool = False
    # XTuner's chat hook: the model's answers to these prompts at each evaluation
    # (megatron_ext/generation/eval_prompts.py).
    eval_prompts: Optional[str] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    save_total_limit: Optional[int] = None
    # Megatron-LM's default: megatron-core dist_checkpointing, resumable at any TP/PP/DP
    # (training/dist_checkpoint.py); "torch" is the per-rank model_optim_rng.pt layout.
    ckpt_format: str = "torch_dist"
    async_save: bool = False
    # Accepted as Megatron-LM's; torch_dist always saves the distributed optimizer that way.
    dist_ckpt_optim_fully_reshardable: bool = False


@dataclass
class Config:
    parallel: ParallelConfig
    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig

    @property
    def varlen(self) -> bool:
        """Packed documents attend only to themselves (MindSpeed-LLM's reading of both flags);
        instruction data always packs its conversations that way."""
        return (self.data.reset_position_ids or self.data.reset_attention_mask
                or self.data.is_instruction_dataset)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, **overrides) -> None:
    group = parser.add_argument_group(title)
    for f in fields(cls):
        # None means "not given": the dataclass default applies (see config_from_namespace).
        kwargs = dict(dest=f.name, default=None)
        kwargs.update(overrides.get(f.name, {}))
        aliases = kwargs.pop("aliases", ())
        if f.type in (bool, "bool"):
            kwargs.setdefault("action", "store_true")
        elif "type" not in kwargs and "nargs" not in kwargs:
            kwargs["type"] = _scalar_type(f.type)
        group.add_argument(_flag(f.name), *aliases, **kwargs)


def _scalar_type(annotation):
    for typ in (int, float):
        if annotation in (typ, Optional[typ]):
            return typ
    return str


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Megatron-style GPT pretraining on megatron-core", allow_abbrev=False
    )
    _add_dataclass_flags(
        parser, ParallelConfig, "parallelism",
        distributed_backend={"choices": ["nccl", "gloo"]},
    )
    _add_dataclass_flags(
        parser, ModelConfig, "model",
        position_embedding_type={"choices": ["rope", "learned_absolute"]},
        normalization={"choices": ["RMSNorm", "LayerNorm"]},
        attention_backend={"choices": ["auto", "flash", "te", "torch", "sdpa"]},
        recompute_granularity={"choices": ["full", "selective"]},
        recompute_method={"choices": ["uniform", "block"]},
    )
    _add_dataclass_flags(
        parser, TrainingConfig, "training",
        lr_decay_style={"choices": ["constant", "linear", "cosine"]},
    )
    _add_dataclass_flags(
        parser, DataConfig, "data", data_path={"nargs": "+"},
        tokenizer_model={"aliases": ("--tokenizer-name-or-path",)},
        tiktoken_pattern={"choices": ["v1", "v2"]},
        tokenizer_special_tokens={"nargs": "+", "aliases": ("--tiktoken-special-tokens",)},
    )
    _add_dataclass_flags(parser, LoggingConfig, "logging and evaluation")
    _add_dataclass_flags(parser, CheckpointConfig, "checkpointing",
                         ckpt_format={"choices": ["torch", "torch_dist"]})
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def config_from_namespace(args: argparse.Namespace) -> Config:
    def make(cls):
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name)
            if value is not None:
                values[f.name] = value
        return cls(**values)

    return Config(
        parallel=make(ParallelConfig),
        model=make(ModelConfig),
        training=make(TrainingConfig),
        data=make(DataConfig),
        logging=make(LoggingConfig),
        checkpoint=make(CheckpointConfig),
    )


def parse_args(argv=None, world_size: Optional[int] = None) -> Config:
    """Parse Megatron-style flags into a validated ``Config`` (world size from torchrun's env)."""
    args = build_parser().parse_args(argv)
    config = config_from_namespace(args)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config, world_size: int) -> None:
    """Check every flag and fill derived defaults (Megatron's rules), naming the flag to change."""
    p, m, t, d = config.parallel, config.model, config.training, config.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and "
             "--pipeline-model-parallel-size must be >= 1")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp}; change them or --nproc-per-node")
    dp = world_size // (tp * pp)
    _require(p.distributed_backend != "nccl" or platform.cuda_available(),
             "--distributed-backend nccl needs a CUDA device; use gloo (the default on CPU)")
    _require(p.distributed_backend != "gloo" or not platform.cuda_available(),
             "--distributed-backend gloo cannot reduce-scatter CUDA tensors (sequence parallelism, "
             "the distributed optimizer); use nccl (the default with a GPU)")
    _require(not p.sequence_parallel or tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1")

    _require(m.num_attention_heads % tp == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if m.group_query_attention:
        _require(m.num_query_groups is not None,
                 "--group-query-attention needs --num-query-groups")
    else:
        _require(m.num_query_groups is None,
                 "--num-query-groups needs --group-query-attention")
        m.num_query_groups = m.num_attention_heads
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by "
             f"--num-query-groups {m.num_query_groups}")
    _require(m.num_query_groups % tp == 0,
             f"--num-query-groups {m.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    _require(m.num_layers % pp == 0,
             f"--num-layers {m.num_layers} is not divisible by "
             f"--pipeline-model-parallel-size {pp}")
    if m.kv_channels is None:
        _require(m.hidden_size % m.num_attention_heads == 0,
                 f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                 f"{m.num_attention_heads}; set --kv-channels")
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = default_ffn_hidden_size(m.hidden_size, m.swiglu)
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    _require(m.position_embedding_type == "rope" or m.seq_length <= m.max_position_embeddings,
             f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
             f"{m.max_position_embeddings}")
    _require(not (m.bf16 and m.fp16), "--bf16 and --fp16 are exclusive; pick one")
    if m.recompute_granularity == "full":
        _require(m.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform|block")
        if m.recompute_num_layers is None:
            m.recompute_num_layers = 1

    _require(t.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    _require(t.train_iters >= 1, f"--train-iters {t.train_iters}: must be >= 1")
    logs = config.logging
    _require(logs.log_interval >= 1, f"--log-interval {logs.log_interval}: must be >= 1")
    _require(logs.eval_interval >= 0 and logs.eval_iters >= 0,
             "--eval-interval and --eval-iters must be >= 0 (0: no evaluation)")
    _require(logs.eval_prompts is None or os.path.isfile(logs.eval_prompts),
             f"--eval-prompts {logs.eval_prompts}: no such file (one prompt per line, or JSONL "
             f'with "prompt")')
    _require(logs.eval_prompts is None or logs.eval_interval > 0,
             "--eval-prompts answers at each evaluation: set --eval-interval > 0")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"--global-batch-size {t.global_batch_size} is not divisible by "
             f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
    _require(not (t.lr_warmup_fraction is not None and t.lr_warmup_iters),
             "--lr-warmup-fraction and --lr-warmup-iters are exclusive; pick one")
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters
    warmup = (t.lr_warmup_fraction * t.lr_decay_iters if t.lr_warmup_fraction is not None
              else t.lr_warmup_iters)
    _require(warmup < t.lr_decay_iters,
             f"the warmup ({warmup} iterations from --lr-warmup-iters/--lr-warmup-fraction) must "
             f"be shorter than --lr-decay-iters {t.lr_decay_iters} (default: --train-iters)")
    _require(t.min_lr <= t.lr, f"--min-lr {t.min_lr} is above --lr {t.lr}")

    if d.is_instruction_dataset:
        _require(not d.mock_data, "--is-instruction-dataset reads instruction shards from "
                 "--data-path PREFIX (preprocess_data.py --handler-name ...); it cannot be used "
                 "with --mock-data")
        _require(bool(d.data_path), "--is-instruction-dataset needs --data-path PREFIX (the "
                 "--output-prefix of preprocess_data.py --handler-name ...)")
        _require(not d.eod_mask_loss, "--eod-mask-loss cannot be used with "
                 "--is-instruction-dataset: the loss mask comes from the data (assistant turns "
                 "and their end tokens)")
    if p.sequence_parallel:
        # SP splits each micro-batch's sequence over TP ranks; packed (varlen) micro-batches are
        # one row of micro-batch x seq-length tokens.
        if config.varlen:
            _require((t.micro_batch_size * m.seq_length) % tp == 0,
                     f"--sequence-parallel with packed documents splits --micro-batch-size "
                     f"{t.micro_batch_size} x --seq-length {m.seq_length} tokens over "
                     f"--tensor-model-parallel-size {tp}: make it divisible")
        else:
            _require(m.seq_length % tp == 0,
                     f"--sequence-parallel splits --seq-length {m.seq_length} over "
                     f"--tensor-model-parallel-size {tp}: make it divisible")
    _require(bool(d.data_path) != d.mock_data,
             "give exactly one of --data-path PREFIX... and --mock-data")
    if d.data_path and len(d.data_path) > 1:
        _require(len(d.data_path) % 2 == 0,
                 "--data-path with several datasets takes weight/prefix pairs: 0.3 A 0.7 B")
        for weight in d.data_path[0::2]:
            try:
                float(weight)
            except ValueError:
                raise ConfigError(
                    f"--data-path: {weight!r} is not a weight; use 0.3 A 0.7 B") from None
            # megatron-core's BlendedDataset asserts every weight > 0.
            _require(float(weight) > 0, f"--data-path: weight {weight} must be > 0")
    split = d.split.replace("/", ",").split(",")
    _require(all(s.strip().replace(".", "", 1).isdigit() for s in split) and len(split) <= 3,
             f"--split {d.split!r}: expected up to three numbers like 949,50,1")
    # megatron-core divides by the sum (0,0,0 is a ZeroDivisionError there) and returns no
    # training dataset for a zero first part (a TypeError at the first batch).
    _require(float(split[0]) > 0 or t.train_iters == 0,
             f"--split {d.split!r}: the training split (first number) is empty")
    _require(d.tokenizer_type is not None, "--tokenizer-type is required")
    if d.tokenizer_type == "NullTokenizer":
        _require(d.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    elif d.tokenizer_type == "GPT2BPETokenizer":
        _require(d.vocab_file is not None and d.merge_file is not None,
                 "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    else:
        _require(d.tokenizer_type == "ByteTokenizer" or d.tokenizer_model is not None,
                 f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")

    c = config.checkpoint
    if d.data_cache_path is None and not d.mock_data:
        # One cache folder beside the run: shards stay read-only and can be shared.
        d.data_cache_path = os.path.join(c.save or ".cache", DATA_CACHE_DIR)
    _require(c.save_interval is None or c.save is not None, "--save-interval needs --save DIR")
    _require(c.save_total_limit is None or c.save_total_limit >= 1,
             "--save-total-limit must be >= 1")
    _require(not c.async_save or c.ckpt_format == "torch_dist",
             "--async-save needs --ckpt-format torch_dist (the torch format saves synchronously)")


