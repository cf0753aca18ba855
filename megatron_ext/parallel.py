"""The parallel topology: one object that validates, initializes and describes TP/PP/SP/CP/DP.

megatron-core's rank order is TP, CP, DP, PP (TP fastest): the CP ranks of one sequence are
neighbours after TP. Data parallelism is what is left: world = TP x PP x CP x DP. The CP ranks
of a DP replica read the same micro-batches (``dp_rank`` excludes CP) and split each sequence;
gradients are reduced over DP x CP (megatron-core's DDP), checkpoints are written once per
DP x CP group (``dp_cp_rank`` 0), so CP is no part of a checkpoint's layout.
"""

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
    context_parallel: int = 1
    # --hierarchical-context-parallel-sizes (a2a+p2p): megatron-core's CP sub-groups.
    hierarchical_context_parallel: tuple = ()
    # Model chunks per pipeline rank (megatron-core's interleaved schedule when > 1).
    virtual_pipeline: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel
                                   * self.context_parallel)

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> "ParallelTopology":
        # Divisibility was already checked by config.validate, before any process group exists.
        return cls(
            world_size=world_size,
            tensor_parallel=config.tensor_model_parallel_size,
            pipeline_parallel=config.pipeline_model_parallel_size,
            sequence_parallel=config.sequence_parallel,
            context_parallel=config.context_parallel_size,
            hierarchical_context_parallel=tuple(config.hierarchical_context_parallel_sizes or ()),
            virtual_pipeline=config.virtual_stages,
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
            virtual_pipeline_model_parallel_size=(self.virtual_pipeline
                                                  if self.virtual_pipeline > 1 else None),
            context_parallel_size=self.context_parallel,
            hierarchical_context_parallel_sizes=list(self.hierarchical_context_parallel) or None,
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

    @property
    def cp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_rank()

    @property
    def dp_cp_rank(self) -> int:
        """Rank in the DP x CP group: over it gradients are reduced and the distributed
        optimizer shards its state; 0 writes what a checkpoint holds once per (TP, PP) rank."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank(with_context_parallel=True)
