"""Adapts megatron-core to a machine without CUDA (CPU tensors, gloo process groups).

megatron-core assumes a CUDA device in a handful of places; the training path itself is
device-agnostic. Every adaptation lives here, is applied only when CUDA is unavailable, and is
checked against the megatron-core series it was written for. On a GPU nothing here runs and
megatron-core is used unchanged.

1. Namespace shim: the megatron-core modules below allocate buffers with ``device="cuda"`` or
   ``torch.cuda.current_device()`` and call ``torch.cuda.synchronize()``; their module-global
   ``torch`` is replaced by a proxy that maps those to the CPU. Other modules see real torch.
2. Tensor-type checks: the optimizer, distributed optimizer and grad clipping accept only
   ``torch.cuda.*Tensor`` parameters, and the tied-embedding setup moves the weight with
   ``.cuda()``, as the --fp16 loss scaler its loaded scale; these functions run with CPU
   tensors reporting their CUDA type names and ``.cuda()`` a no-op, for the duration of the
   call only.
3. RNG tracker: the tensor-parallel RNG tracker (used by attention dropout and by activation
   recomputation) keeps CUDA generator states; on CPU it keeps CPU generator states.
4. Distributed checkpoints (``--ckpt-format torch_dist``): see ``_DIST_CKPT_MODULES``.
5. Streams (0.19+): DDP's grad sync waits on ``torch.cuda.current_stream()`` for CUDA-graph
   events; on CPU there are no events, and the shim's ``current_stream()`` waits for none.
6. triton (0.18+): ``import megatron.core`` imports triton (MoE/inference kernels that never
   run here), and torch then sees a triton and imports its compiler modules, so no small
   stand-in can take its place: install triton (about 290 MB; CPU machines too) with
   megatron-core 0.18+. GPU images have it; CI installs it only into its 0.19.2 environment.
7. KV cache (``megatron_ext.generation``): megatron-core's attention allocates the static
   inference context's key/value buffers on ``torch.cuda.current_device()``; the shim (1.) on
   ``megatron.core.transformer.attention`` puts them on the CPU (checked on 0.16.1 only).
8. Optimizer state on any device: saving or loading a distributed optimizer that drives
   torch's Adam (no Apex/TE) needs ``torch_adam_state_allocated``, loading it also
   ``torch_adam_steps_kept``; resuming with ``--decoupled-lr`` on 0.16-0.18
   needs ``mark_decoupled_lr_groups``, and such a checkpoint on 0.19
   ``unmark_saved_decoupled_lr_groups``.

Supported: megatron-core 0.16 through 0.19 (``SUPPORTED``). Adaptations 1-3, 5 and 6 were
checked on 0.16.1, 0.17.1, 0.18.2 and 0.19.2 (parallel equivalence, varlen and checkpoint
tests pass on each; /work/shared/notes/megatron-core-findings.md); CI runs that subset on
0.19.2.
"""

import contextlib
import functools
import importlib
import multiprocessing
import os
import random
import types

import torch
from packaging.version import Version

SUPPORTED = (Version("0.16.0"), Version("0.20.0"))  # [lowest, first unsupported)

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


def cuda_available() -> bool:
    """CUDA is used when present, unless MEGATRON_EXT_DEVICE=cpu (the CPU test suite on a GPU
    machine: forked gloo ranks cannot share one GPU)."""
    return torch.cuda.is_available() and os.environ.get("MEGATRON_EXT_DEVICE") != "cpu"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


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


def _check_version(what: str) -> None:
    import megatron.core

    version = Version(megatron.core.__version__)
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise RuntimeError(
            f"megatron_ext.platform adapts megatron-core {SUPPORTED[0]}..<{SUPPORTED[1]} {what}; "
            f"found {version}. Install megatron-core>=0.16,<0.20 or check the adaptations."
        )


def apply() -> None:
    """Install the CPU adaptations (idempotent; a no-op when CUDA is available)."""
    global _applied
    if _applied or cuda_available():
        return
    _check_version("to CPU")
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


def manual_seed(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's model-parallel RNG tracker (CPU or CUDA)."""
    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def torch_adam_state_allocated(optimizers) -> None:
    """Give every parameter of the megatron-core ``DistributedOptimizer``s that drive torch's
    Adam (no Apex/TE) the Adam state torch allocates at its first step, where it has none yet:
    before any step, and with --fp16 after steps the loss scaler skipped (the first dozens).
    Both save formats and the torch_dist load read it: ``state_dict()`` asserts one ``step``
    over all parameters (0.16.1-0.19.2), ``get_parameter_state_dp_zero`` reads ``exp_avg``.
    The zeros are what torch's Adam would start from (``step`` a float32 scalar), so training
    goes on as without them; a load overwrites them. On Apex/TE it changes nothing."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in optimizers:
        adam = opt.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.zeros(()),
                                         "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def torch_adam_steps_kept(optimizers):
    """Load the state of megatron-core ``DistributedOptimizer``s that drive torch's Adam (no
    Apex/TE) inside this context; on Apex/TE it changes nothing.

    Both checkpoint formats copy the loaded shards in with
    ``DistributedOptimizer._set_main_param_and_optimizer_states``, which copies into every key
    of the Adam state, ``step`` included, from shards that have no ``step``: a KeyError. The
    copy here keeps each parameter's own ``step`` (set from the param groups by
    ``load_state_dict``), without autograd (the fp32 main params are views of leaf
    parameters). ``load_state_dict`` also hands every parameter one shared ``step`` tensor,
    which Adam would then increment once per parameter: each gets its own copy afterwards.
    The same code in megatron-core 0.16.1 and 0.19.2 (``distrib_optimizer.py``); this runs on
    GPUs too, where ``apply`` checks no version, hence the check here."""
    from megatron.core.optimizer import distrib_optimizer

    optimizers = [] if distrib_optimizer.HAVE_APEX_OR_TE else list(optimizers)
    if optimizers:
        _check_version("with torch's Adam")
    for opt in optimizers:
        def set_states(model_param, tensors, opt=opt,
                       original=opt._set_main_param_and_optimizer_states):
            step = opt._get_main_param_and_optimizer_states(model_param).get("step")
            with torch.no_grad():
                original(model_param, tensors if step is None else dict(tensors, step=step))

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in optimizers:
            del opt._set_main_param_and_optimizer_states  # the class's method again
            for entry in opt.optimizer.state.values():
                if "step" in entry:
                    entry["step"] = entry["step"].clone()


def mark_decoupled_lr_groups(optimizer, lr, decoupled_lr) -> None:
    """megatron-core 0.16-0.18 match saved param groups to live ones by (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr) but leave is_decoupled_lr False on the group that
    ``--decoupled-lr`` creates, so a resume loads its state into the wrong group (or fails):
    mark it. 0.19 adds max_lr and min_lr to that key (``param_group_identifier_keys``) and tells
    the groups apart as Megatron-LM's checkpoints leave them; there nothing is marked, so
    such checkpoints load, and ``unmark_saved_decoupled_lr_groups`` lets a --decoupled-lr
    checkpoint saved on 0.16-0.18 load there too."""
    if decoupled_lr is None or _groups_keyed_by_max_lr():
        return
    for group in optimizer.param_groups:
        group["is_decoupled_lr"] = group.get("max_lr") == decoupled_lr != lr


def unmark_saved_decoupled_lr_groups(saved_groups) -> None:
    """The param groups of a checkpoint, before megatron-core 0.19+ loads them: one saved on
    0.16-0.18 with --decoupled-lr carries ``is_decoupled_lr`` True on the group that
    ``mark_decoupled_lr_groups`` marked, and 0.19, whose groups all keep megatron-core's False
    (told apart by max_lr instead), finds no group for it ("Could not find parameter group with
    key ..."). Unmarked, it matches its group by max_lr. On 0.16-0.18 nothing changes: there the
    marks are the ones this run's groups carry. (0.16-0.18 read 0.19's torch_dist checkpoints,
    which have no common.pt, through checkpoint/dist_format.py.)"""
    if not _groups_keyed_by_max_lr():
        return
    for group in saved_groups:
        if group.get("is_decoupled_lr"):
            group["is_decoupled_lr"] = False


def _groups_keyed_by_max_lr() -> bool:
    """megatron-core 0.19+: saved param groups are matched to live ones by max_lr (and min_lr,
    start_wd, ...), besides 0.16-0.18's wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr."""
    from megatron.core.optimizer import optimizer as core_optimizer

    return "max_lr" in core_optimizer.param_group_identifier_keys


def async_save_options() -> dict:
    """megatron-core 0.19 writes --async-save checkpoints with NVIDIA's nvidia-resiliency-ext by
    default (``async_strategy="nvrx"``) and fails at the first save without it; its own writer,
    the only one 0.16-0.18 have, is ``"mcore"`` (Megatron-LM 0.19 picks one with
    --async-strategy). Older releases take no such argument."""
    import inspect

    from megatron.core import dist_checkpointing

    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        return {}
    return {"async_strategy": "mcore"}
