"""Adapts megatron-core to a machine without CUDA (CPU tensors, gloo process groups).

megatron-core assumes a CUDA device in a handful of places; the training path itself is
device-agnostic. Every adaptation lives in this package, is applied only when CUDA is unavailable, and is
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
4. Distributed checkpoints (``--ckpt-format torch_dist``): see ``cpu._DIST_CKPT_MODULES``.
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

Modules, one concern each: ``device`` (the device, the supported releases, seeding), ``cpu``
(1-5 and 7, installed by ``apply``), ``checkpoint`` (8, and --async-save's writer on 0.19).

Supported: megatron-core 0.16 through 0.19 (``device.SUPPORTED``). Adaptations 1-3, 5 and 6 were
checked on 0.16.1, 0.17.1, 0.18.2 and 0.19.2 (parallel equivalence, varlen and checkpoint
tests pass on each; /work/shared/notes/megatron-core-findings.md); CI runs that subset on
0.19.2.
"""

from megatron_ext.platform.checkpoint import (async_save_options, mark_decoupled_lr_groups,
                                              torch_adam_state_allocated, torch_adam_steps_kept,
                                              unmark_saved_decoupled_lr_groups)
from megatron_ext.platform.cpu import apply
from megatron_ext.platform.device import cuda_available, default_backend, device, manual_seed

__all__ = ["apply", "async_save_options", "cuda_available", "default_backend", "device",
           "manual_seed", "mark_decoupled_lr_groups", "torch_adam_state_allocated",
           "torch_adam_steps_kept", "unmark_saved_decoupled_lr_groups"]
