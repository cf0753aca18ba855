"""The parallel topology: one object that validates, initializes and describes TP/PP/SP/DP."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelTopology:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    sequence_parallel: bool

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> "ParallelTopology":
        # Divisibility was already checked by config.validate, before any process group exists.
        return cls(
            world_size=world_size,
            tensor_parallel=config.tensor_model_parallel_size,
            pipeline_parallel=config.pipeline_model_parallel_size,
            sequence_parallel=config.sequence_parallel,
        )

    def initialize(self, backend: str | None = None, timeout_minutes: int = 10) -> None:
        """Create the default process group (from torchrun's env) and megatron-core's groups."""
        from megatron.core import parallel_state

        platform.apply()
        backend = backend or platform.default_backend()
        if not dist.is_initialized():
            if platform.cuda_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(
                backend=backend,
                world_size=self.world_size,
                rank=int(os.environ.get("RANK", "0")),
                timeout=datetime.timedelta(minutes=timeout_minutes),
            )
        if dist.get_world_size() != self.world_size:
            raise ConfigError(
                f"the process group has {dist.get_world_size()} ranks but the topology expects "
                f"{self.world_size}"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel,
        )

    @staticmethod
    def destroy() -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()

    # Coordinates of this rank, from megatron-core's groups.
    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()
