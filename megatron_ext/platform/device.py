"""The device megatron_ext runs on, the megatron-core releases its adaptations were written
for (``SUPPORTED``), and seeding (see the package docstring)."""

import os
import random

import torch
from packaging.version import Version

SUPPORTED = (Version("0.16.0"), Version("0.20.0"))  # [lowest, first unsupported)


def cuda_available() -> bool:
    """CUDA is used when present, unless MEGATRON_EXT_DEVICE=cpu (the CPU test suite on a GPU
    machine: forked gloo ranks cannot share one GPU)."""
    return torch.cuda.is_available() and os.environ.get("MEGATRON_EXT_DEVICE") != "cpu"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def check_version(what: str) -> None:
    import megatron.core

    version = Version(megatron.core.__version__)
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise RuntimeError(
            f"megatron_ext.platform adapts megatron-core {SUPPORTED[0]}..<{SUPPORTED[1]} {what}; "
            f"found {version}. Install megatron-core>=0.16,<0.20 or check the adaptations."
        )


def manual_seed(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's model-parallel RNG tracker (CPU or CUDA)."""
    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
