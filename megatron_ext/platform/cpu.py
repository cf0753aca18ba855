"""Adaptations 1-5 and 7 of the package docstring: megatron-core on a machine without CUDA.
``apply`` installs them (once; a no-op when CUDA is available)."""

import contextlib
import functools
import importlib
import multiprocessing
import types

import torch

from megatron_ext.platform.device import check_version, cuda_available

_SHIMMED_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.attention",
)

# -- Distributed checkpoints (--ckpt-format torch_dist; training/dist_checkpoint.py) ---------
# megatron-core 0.16's ``dist_checkpointing`` writes on CPU once these see the CPU as their
# device: the async file writer calls ``torch.cuda.synchronize()`` after staging tensors to the
# host (``filesystem_async``); the save planner and finalizer all-reduce/broadcast flags in
# ``device="cuda"`` / ``torch.cuda.current_device()`` tensors (``state_dict_saver``); the async
# queue checks its workers with ``torch.cuda.current_device()`` tensors, synchronizes and sets
# the worker's device (``async_utils``). The distributed optimizer's ``fully_reshardable`` state
# is all-gathered over DP ranks by ``get_parameter_state_dp_zero`` (its default, non-gloo path),
# which moves each shard with ``.cuda()``: it runs with ``.cuda()`` a no-op (2. above). The
# writer's results queue lives in a multiprocessing manager that megatron-core *spawns* (a
# fresh interpreter, safe beside a CUDA context): it imports torch to unpickle the first write
# results, some 10 s per process on a loaded 2-core machine; without CUDA it is forked. Kept apart from the list above so that the
# megatron-core version guard and this list can change independently.
_DIST_CKPT_MODULES = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

_applied = False


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside shimmed megatron-core modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs):
        pass

    empty_cache = synchronize
    set_device = synchronize  # the async checkpoint writer's worker picks its "GPU"

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return _CpuStream()


class _CpuStream:
    """CPU work is synchronous: there is nothing to wait for."""

    def wait_event(self, _event):
        pass

    def wait_stream(self, _stream):
        pass

    def synchronize(self):
        pass


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside shimmed megatron-core modules."""

    cuda = _CpuCuda()

    def __init__(self):
        super().__init__("torch")
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_tensor_names():
    if getattr(torch.Tensor.type, "_megatron_ext_cpu", False):  # already inside a wrapped call
        yield
        return
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    def cuda(self, *_args, **_kwargs):
        return self

    type_._megatron_ext_cpu = True
    torch.Tensor.type, torch.Tensor.cuda = type_, cuda
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _with_cuda_tensor_names(owner, name: str) -> None:
    raw = owner.__dict__[name]
    is_classmethod = isinstance(raw, classmethod)
    fn = raw.__func__ if is_classmethod else raw

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_tensor_names():
            return fn(*args, **kwargs)

    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


class CpuRNGStatesTracker:
    """Mixin body for megatron-core's ``CudaRNGStatesTracker`` keeping CPU generator states."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        current = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(current)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        current = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(current)


def _forked_write_results_queue(mp_mode=None):
    """megatron-core's ``(_)get_write_results_queue`` (``mp_mode``, 0.17+: 'spawn'), forked."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    return filesystem_async._results_queue


def apply() -> None:
    """Install the CPU adaptations (idempotent; a no-op when CUDA is available)."""
    global _applied
    if _applied or cuda_available():
        return
    check_version("to CPU")
    proxy = _CpuTorch()
    for module_name in _SHIMMED_MODULES + _DIST_CKPT_MODULES:
        importlib.import_module(module_name).torch = proxy

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, grad_scaler, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random

    for owner, name in (
        (DistributedOptimizer, "_build_model_and_main_param_groups"),
        (DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (LanguageModule, "setup_embeddings_and_output_layer"),
        # --fp16 resume: the loaded loss scale is moved with .cuda() (0.16.1 and 0.19.2).
        (grad_scaler.DynamicGradScaler, "load_state_dict"),
    ):
        _with_cuda_tensor_names(owner, name)
    _with_cuda_tensor_names(clip_grads, "clip_grad_by_total_norm_fp32")
    # optimizer.py imported the function by name before the wrap.
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32

    # Activation recomputation saves and restores the "CUDA" RNG state around the recomputed
    # forward; on CPU that is the CPU generator.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    random.CudaRNGStatesTracker.add = CpuRNGStatesTracker.add
    random.CudaRNGStatesTracker.fork = CpuRNGStatesTracker.fork

    # Distributed checkpoints (see _DIST_CKPT_MODULES).
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _with_cuda_tensor_names(DistributedOptimizer, "get_parameter_state_dp_zero")
    # 0.16's name, and 0.17+'s (a spawned manager there would also outlive a killed rank: the
    # forked one dies with it, training/__init__.py).
    name = ("_get_write_results_queue" if hasattr(filesystem_async, "_get_write_results_queue")
            else "get_write_results_queue")
    setattr(filesystem_async, name, _forked_write_results_queue)
    _applied = True
