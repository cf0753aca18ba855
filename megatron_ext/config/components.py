"""The whole configuration: one dataclass per component, and the error every check raises."""

from dataclasses import dataclass, field
from typing import FrozenSet, List

from megatron_ext.config.checkpoint import CheckpointConfig
from megatron_ext.config.data import DataConfig
from megatron_ext.config.logs import LoggingConfig
from megatron_ext.config.lora import LoraConfig
from megatron_ext.config.mindspeed import MindSpeedConfig
from megatron_ext.config.model import ModelConfig
from megatron_ext.config.parallel import ParallelConfig
from megatron_ext.config.training import TrainingConfig

# In --help order (Megatron-LM's groups follow the fields' own group names).
COMPONENTS = {"model": ModelConfig, "training": TrainingConfig, "parallel": ParallelConfig,
              "data": DataConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig,
              "lora": LoraConfig, "mindspeed": MindSpeedConfig}


class ConfigError(ValueError):
    """A flag value (or combination) that cannot work; the message names the flag to change."""


def require(condition: bool, message: str) -> None:
    """The checks' one form: ``message`` names the flag to change."""
    if not condition:
        raise ConfigError(message)


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default: 4h, or 2/3 of it rounded down to a multiple of 64 for SwiGLU."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


@dataclass
class Config:
    parallel: ParallelConfig
    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    mindspeed: MindSpeedConfig = field(default_factory=MindSpeedConfig)
    # Field names given on the command line (Megatron-LM's exclusivity rules need them).
    given: FrozenSet[str] = frozenset()
    # What validate decided about accepted-but-not-honoured flags: said once, by rank 0.
    notices: List[str] = field(default_factory=list)

    @property
    def varlen(self) -> bool:
        """Packed documents attend only to themselves (MindSpeed-LLM's reading of both flags);
        instruction data always packs its conversations that way."""
        return (self.data.reset_position_ids or self.data.reset_attention_mask
                or self.data.is_instruction_dataset)
