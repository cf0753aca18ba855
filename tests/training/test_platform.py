"""CPU adaptations of megatron-core (``megatron_ext.platform``) on a machine without CUDA.

1. ``torch.Tensor.type``/``.cuda`` report CUDA only inside the wrapped megatron-core calls and
   are the originals again afterwards, also when the call raises.
2. The tensor-parallel RNG tracker keeps CPU generator states: ``fork()`` draws from the named
   stream (reproducible from its seed) and leaves the default CPU stream as it was.
3. Activation recomputation replays dropout exactly: gradients with ``--recompute-granularity
   full`` equal those without it (the RNG state saved at forward is restored for the recompute).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext import platform
from megatron_ext.platform import cpu as platform_cpu
from tests.launcher import launch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the adaptations are installed only without CUDA")

ORIGINAL_TYPE = torch._C.TensorBase.type  # what torch.Tensor.type resolves to untouched
ORIGINAL_CUDA = torch._C.TensorBase.cuda


@pytest.fixture(scope="module", autouse=True)
def applied():
    platform.apply()


@pytest.fixture
def rng_guard():
    """Tests here move the default CPU RNG; leave it as found for the rest of the session."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _assert_originals():
    assert torch.Tensor.type is ORIGINAL_TYPE
    assert torch.Tensor.cuda is ORIGINAL_CUDA
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):  # no CUDA in this torch build
        x.cuda()


# -- 1. tensor type names --------------------------------------------------------------------


def test_type_and_cuda_are_originals_outside_wrapped_calls():
    _assert_originals()


def test_wrapped_megatron_call_sees_cuda_names_and_restores_them():
    from megatron.core.optimizer import clip_grads

    # megatron-core asserts param.grad.type() == 'torch.cuda.FloatTensor' in this function.
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)  # norm 6
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    _assert_originals()


def test_originals_are_restored_when_the_wrapped_call_raises():
    from megatron.core.optimizer import clip_grads

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    param.grad = torch.ones(4, dtype=torch.float64)  # 'torch.cuda.DoubleTensor': assertion
    with pytest.raises(AssertionError):
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=2.0)
    _assert_originals()


def test_nested_wrapped_calls_keep_cuda_names_until_the_outer_returns():
    seen = {}

    class Probe:
        def inner(self, fail=False):
            x = torch.zeros(1)
            seen["inner"] = (x.type(), x.cuda() is x)
            if fail:
                raise ValueError("inner failure")

        def outer(self, fail=False):
            try:
                self.inner(fail)
            finally:
                seen["after_inner"] = torch.zeros(1).type()

        def convert(self):
            converted = torch.zeros(1).type(torch.float64)  # a conversion, not a name
            return converted.dtype, converted.device.type

    platform_cpu._with_cuda_tensor_names(Probe, "inner")
    platform_cpu._with_cuda_tensor_names(Probe, "outer")
    Probe().outer()
    assert seen == {"inner": ("torch.cuda.FloatTensor", True),
                    "after_inner": "torch.cuda.FloatTensor"}
    _assert_originals()
    with pytest.raises(ValueError, match="inner failure"):
        Probe().outer(fail=True)
    assert seen["after_inner"] == "torch.cuda.FloatTensor"
    _assert_originals()
    # .type(dtype) still converts inside (only the name query is changed).
    platform_cpu._with_cuda_tensor_names(Probe, "convert")
    assert Probe().convert() == (torch.float64, "cpu")


# -- 2. RNG tracker --------------------------------------------------------------------------


def _dropout_masks(n_draws, size=256):
    return [F.dropout(torch.ones(size), p=0.5, training=True) != 0 for _ in range(n_draws)]


def _fresh_tracker(seed):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed)
    return tracker


def test_tracker_fork_is_reproducible_and_restores_default_rng(rng_guard):
    # Reference: the CPU generator seeded with the tracker's seed.
    torch.manual_seed(4321)
    expected = _dropout_masks(2)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    tracker = _fresh_tracker(4321)
    assert torch.equal(torch.get_rng_state(), before)  # add() leaves the default stream alone
    with tracker.fork():
        first = _dropout_masks(1)[0]
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():  # the named stream continues where it stopped
        second = _dropout_masks(1)[0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    assert not torch.equal(first, second)

    # Same seed, same masks (reproducible dropout), whatever the default stream did meanwhile.
    torch.rand(1000)
    tracker = _fresh_tracker(4321)
    with tracker.fork():
        assert torch.equal(_dropout_masks(1)[0], expected[0])


def test_default_stream_is_unaffected_by_forks(rng_guard):
    torch.manual_seed(5)
    reference = torch.rand(8)
    torch.manual_seed(5)
    tracker = _fresh_tracker(77)
    with tracker.fork():
        torch.rand(100)
    assert torch.equal(torch.rand(8), reference)


def test_fork_restores_default_rng_after_an_exception(rng_guard):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    tracker = _fresh_tracker(9)
    with pytest.raises(ZeroDivisionError):
        with tracker.fork():
            torch.rand(10)
            1 / 0
    assert torch.equal(torch.get_rng_state(), before)
    # The tracker's stream advanced by the draws made before the exception.
    torch.manual_seed(9)
    torch.rand(10)
    expected = torch.rand(4)
    with tracker.fork():
        assert torch.equal(torch.rand(4), expected)


def test_model_parallel_seed_gives_tp_ranks_distinct_streams(rng_guard):
    from megatron.core import tensor_parallel

    masks = {}
    for tp_rank in (0, 1):
        tensor_parallel.model_parallel_cuda_manual_seed(100, tp_rank=tp_rank, ep_rank=0,
                                                        etp_rank=0)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            masks[tp_rank] = _dropout_masks(1)[0]
    # Megatron's rule: the model-parallel stream of TP rank r is seeded with seed + 2718 + r.
    for tp_rank in (0, 1):
        torch.manual_seed(100 + 2718 + tp_rank)
        assert torch.equal(masks[tp_rank], _dropout_masks(1)[0])
    assert not torch.equal(masks[0], masks[1])


# -- 3. activation recomputation -------------------------------------------------------------

MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--attention-dropout 0.2 --hidden-dropout 0.2 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 255"
).split()
RECOMPUTE = "--recompute-granularity full --recompute-method uniform".split()
# Recomputation runs the same operations on the same inputs with the same masks; only the
# backward's accumulation order can differ, at float32 rounding level.
GRAD_ATOL = 1e-6


def _gradients_with_and_without_recompute():
    from megatron.core import tensor_parallel

    from megatron_ext.config import parse_args
    from megatron_ext.model.gpt import build_model
    from megatron_ext.parallel import ParallelTopology

    plain_cfg, recompute_cfg = parse_args(MODEL, world_size=1), parse_args(MODEL + RECOMPUTE,
                                                                          world_size=1)
    topology = ParallelTopology.from_config(plain_cfg.parallel, 1)
    topology.initialize()
    platform.manual_seed(1)
    plain = build_model(plain_cfg, 256)
    recompute = build_model(recompute_cfg, 256)
    recompute.load_state_dict(plain.state_dict())

    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 255, (2, 16), generator=gen)
    labels = torch.randint(0, 255, (2, 16), generator=gen)
    position_ids = torch.arange(16).expand(2, 16)

    def run(model, seed):
        layer_calls = []
        hooks = [layer.register_forward_hook(lambda *_: layer_calls.append(1))
                 for layer in model.decoder.layers]
        platform.manual_seed(seed)  # default stream and tracker streams
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(tokens, position_ids, None, labels=labels).sum()
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return loss.item(), grads, len(layer_calls)

    results = {
        "plain": run(plain, 10),
        "recompute": run(recompute, 10),
        "plain-other-seed": run(plain, 11),
    }
    # Control: break the restore of the tracker states (attention dropout) for the recompute.
    tracker_cls = type(tensor_parallel.get_cuda_rng_tracker())
    set_states = tracker_cls.set_states
    tracker_cls.set_states = lambda self, states: None
    try:
        results["recompute-no-restore"] = run(recompute, 10)
    finally:
        tracker_cls.set_states = set_states
    topology.destroy()
    return results


@pytest.fixture(scope="module")
def recompute_results():
    return launch(_gradients_with_and_without_recompute, 1)[0]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_recomputation_gives_the_same_gradients(recompute_results):
    loss, grads, calls = recompute_results["plain"]
    rc_loss, rc_grads, rc_calls = recompute_results["recompute"]
    assert calls == 2 and rc_calls == 4  # each layer ran again in the backward: recomputed
    assert len(grads) > 10
    assert rc_loss == pytest.approx(loss, rel=1e-6)
    assert _max_diff(grads, rc_grads) <= GRAD_ATOL


def test_the_gradient_comparison_can_fail(recompute_results):
    """Dropout matters at this tolerance: another seed, or recomputing attention dropout with
    the wrong RNG state, changes the gradients far beyond GRAD_ATOL."""
    _, grads, _ = recompute_results["plain"]
    _, other, _ = recompute_results["plain-other-seed"]
    _, broken, _ = recompute_results["recompute-no-restore"]
    assert _max_diff(grads, other) > 100 * GRAD_ATOL
    assert _max_diff(grads, broken) > 100 * GRAD_ATOL
