"""Explanations under real-world calling conditions: threads, grad modes, non-finite scores."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import xai_core
from xai_core.core.errors import NonFiniteScoresError, TargetError, TargetTypeError
from xai_core.demo.models import DemoViT
from xai_core.testing import tiny_cnn
from xai_core.torch.capture import preserved_state, session_lock

from .test_state import assert_same, snapshot

# method -> (model kind, options); each runs on a model it supports.
CASES = {
    "gradcam": ("cnn", {"layer": "3"}),
    "cam": ("cnn", {}),
    "occlusion": ("cnn", {"window": 4, "stride": 4}),
    "attention": ("vit", {}),
    "grad_rollout": ("vit", {}),
}


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return DemoViT(classes=3, channels=3, image_size=8, patch=2, dim=8, depth=2, heads=2)


def make(kind: str) -> nn.Module:
    """A model in the middle of training: train mode, a frozen layer, accumulated grads."""
    model = tiny_cnn() if kind == "cnn" else tiny_vit()
    params = list(model.parameters())
    model.train()
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 0.25)
    return model


def batch(kind: str, n: int = 2) -> torch.Tensor:
    size = 16 if kind == "cnn" else 8
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


# -- item 5: threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CASES))
def test_threads_on_one_model_give_single_threaded_maps_and_restore_it(method):
    kind, options = CASES[method]
    model, x = make(kind), batch(kind)
    before = snapshot(model)
    expected = xai_core.explain(model, x, method=method, **options).raw[0]
    threads, calls = 4, 3

    def work(_: int) -> list[torch.Tensor]:
        return [xai_core.explain(model, x, method=method, **options).raw[0] for _ in range(calls)]

    with ThreadPoolExecutor(threads) as pool:
        results = [m for maps in pool.map(work, range(threads), timeout=60) for m in maps]
    assert len(results) == threads * calls
    for maps in results:
        torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    assert_same(before, snapshot(model))
    assert model.training and not next(iter(model.parameters())).requires_grad


def test_sessions_on_different_models_run_in_parallel():
    """Thread A holds a session on model A while thread B runs a whole explanation of model B."""
    a, b = tiny_cnn(seed=1), tiny_cnn(seed=2)
    inside, done = threading.Event(), threading.Event()

    def hold_a() -> None:
        with preserved_state(a):
            inside.set()
            assert done.wait(timeout=30), "the session on model B waited for model A's"

    holder = threading.Thread(target=hold_a)
    holder.start()
    assert inside.wait(timeout=30)
    worker = threading.Thread(
        target=lambda: (xai_core.explain(b, batch("cnn"), method="cam"), done.set())
    )
    worker.start()
    worker.join(timeout=30)
    holder.join(timeout=30)
    assert done.is_set() and not holder.is_alive() and not worker.is_alive()


@contextmanager
def session_in_another_thread(model):
    """Hold a session on ``model`` in a second thread until the block ends."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with preserved_state(model):
            inside.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(timeout=30)
        yield
    finally:
        release.set()
        holder.join(timeout=30)


def test_a_session_on_one_model_waits_for_the_other_threads_session():
    model = tiny_cnn()
    lock = session_lock(model)
    with session_in_another_thread(model):
        assert not lock.acquire(timeout=0.2)  # another thread's session is open on this model
    assert lock.acquire(timeout=5)
    lock.release()


def test_the_same_thread_may_reenter_a_session_on_its_model():
    """An explainer (or a metric) that calls explain() on the model it is explaining."""
    model, x = make("cnn"), batch("cnn")
    before = snapshot(model)
    result: list = []

    def nested() -> None:
        with preserved_state(model):
            assert not model.training
            result.append(xai_core.explain(model, x, method="gradcam", layer="3"))
            assert not model.training  # the inner session restored the outer one's state

    thread = threading.Thread(target=nested)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "re-entering a session on the same thread deadlocked"
    assert len(result) == 1
    assert_same(before, snapshot(model))


# -- item 6: grad modes -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_tensor"])
@pytest.mark.parametrize("method", list(CASES))
def test_every_grad_mode_gives_the_same_maps(method, mode):
    kind, options = CASES[method]
    model, x = make(kind), batch(kind)
    before = snapshot(model)
    expected = xai_core.explain(model, x, method=method, **options).raw[0]
    if mode == "no_grad":
        with torch.no_grad():
            got = xai_core.explain(model, x, method=method, **options).raw[0]
    elif mode == "inference_mode":
        with torch.inference_mode():
            got = xai_core.explain(model, x, method=method, **options).raw[0]
    else:
        with torch.inference_mode():
            frozen = x.clone()
        assert frozen.is_inference()
        got = xai_core.explain(model, frozen, method=method, **options).raw[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert_same(before, snapshot(model))


def test_the_callers_grad_mode_is_left_alone():
    model, x = tiny_cnn(), batch("cnn")
    with torch.no_grad():
        xai_core.explain(model, x, method="gradcam")
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        xai_core.explain(model, x, method="gradcam")
        assert torch.is_inference_mode_enabled()


# -- item 7: non-finite scores ----------------------------------------------------------------

# Every built-in method, with the options that send it down each of its paths.
ALL_METHODS = [
    ("gradcam", "cnn", {}),
    ("cam", "cnn", {}),
    ("occlusion", "cnn", {"incremental": False}),
    ("occlusion", "cnn", {"incremental": "exact"}),
    ("occlusion", "cnn", {"incremental": "approximate"}),
    ("aggregate", "cnn", {}),
    ("global-occlusion", "cnn", {}),
    ("attention", "vit", {}),
    ("rollout", "vit", {}),
    ("grad_rollout", "vit", {}),
]


def poisoned(kind: str, value: float, sample: int | None = None) -> nn.Module:
    """A model whose classifier bias is ``value``: its scores are NaN or infinite."""
    model = (tiny_cnn() if kind == "cnn" else tiny_vit()).eval()
    head = model[-1] if kind == "cnn" else model.head
    with torch.no_grad():
        head.bias.fill_(value)
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(("method", "kind", "options"), ALL_METHODS)
def test_nan_or_infinite_scores_are_a_typed_error(method, kind, options, value):
    model, x = poisoned(kind, value), batch(kind)
    before = snapshot(model)
    with pytest.raises(NonFiniteScoresError, match=r"for [12] of [12] sample\(s\).*inputs' scale"):
        xai_core.explain(model, x, method=method, **options)
    after = snapshot(model)
    assert before.pop("training") == after.pop("training")
    torch.testing.assert_close(after, before, equal_nan=True, rtol=0, atol=0)


def test_the_error_counts_the_samples_with_non_finite_scores():
    model = tiny_cnn().eval()
    x = batch("cnn", 3)
    x[1] = 1e30  # finite, but its features times the weight below exceed float32's range
    with torch.no_grad():
        model[-1].weight[0, 0] = 1e20
    with pytest.raises(NonFiniteScoresError, match=r"for 1 of 3 sample\(s\) \(sample 1\)"):
        xai_core.explain(model, x, method="gradcam")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradcam", {}),
        ("cam", {}),
        ("occlusion", {}),
        ("occlusion", {"incremental": "exact"}),
        ("occlusion", {"incremental": "approximate"}),
        ("occlusion", {"incremental": False}),
        ("aggregate", {}),
        ("global-occlusion", {}),
    ],
)
def test_inputs_scaled_by_1e30_overflow_inside_a_real_conv_net(method, options):
    """ConvNeXt's LayerNorm squares its 1e30 inputs: inf, then NaN scores."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1e30
    with pytest.raises(NonFiniteScoresError, match="inputs' scale and normalisation"):
        xai_core.explain(model, x, method=method, **options)


@pytest.mark.parametrize("method", ["attention", "rollout", "grad_rollout", "gradcam"])
def test_inputs_scaled_by_1e30_overflow_inside_a_vision_transformer(method):
    with pytest.raises(NonFiniteScoresError):
        xai_core.explain(tiny_vit().eval(), batch("vit") * 1e30, method=method)


# -- item 8: targets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        (2**63, TargetError, "64-bit"),
        (-(2**63) - 1, TargetError, "64-bit"),
        ([2**63, 1], TargetError, "64-bit"),
        ([[1], [2**64]], TargetError, "64-bit"),
        (torch.tensor([1, 2], device="meta"), TargetTypeError, "meta"),
        (b"\x01\x02", TargetTypeError, "bytes"),
        (bytearray(b"\x01\x02"), TargetTypeError, "bytes"),
        (memoryview(b"\x01\x02"), TargetTypeError, "bytes"),
        ([b"\x01", b"\x02"], TargetTypeError, "integer class indices"),
    ],
)
def test_unusable_targets_are_refused_before_the_model_runs(spec, error, words):
    model, calls = counted(tiny_cnn())
    with pytest.raises(error, match=words):
        xai_core.explain(model, batch("cnn"), method="occlusion", targets=spec)
    assert calls == []


@pytest.mark.parametrize(
    ("method", "kind"), [("gradcam", "cnn"), ("gradcam", "vit"), ("grad_rollout", "vit")]
)
@pytest.mark.parametrize(
    "target", [lambda s: s[:, 1].detach(), lambda s: s.detach().sum(1), lambda s: s[:, 0].data]
)
def test_a_callable_target_detached_from_the_graph_is_refused(method, kind, target):
    with pytest.raises(TargetError, match="detached from the model's outputs"):
        xai_core.explain(make(kind), batch(kind), method=method, targets=target)


def test_a_callable_target_may_be_detached_for_methods_without_gradients():
    model, x = tiny_cnn(), batch("cnn")
    got = xai_core.explain(model, x, method="occlusion", targets=lambda s: s[:, 1].detach())
    want = xai_core.explain(model, x, method="occlusion", targets=1)
    torch.testing.assert_close(got.raw[0], want.raw[0])


def counted(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """``model`` with a forward pre-hook that records every forward call."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return model, calls


@pytest.mark.parametrize(
    ("kind", "gradient_method", "other"),
    [("cnn", "gradcam", "cam"), ("vit", "grad_rollout", "rollout")],
)
def test_a_model_built_under_inference_mode_gets_a_typed_error_from_gradient_methods(
    kind, gradient_method, other
):
    """Its parameters are inference tensors: autograd can never record them."""
    with torch.inference_mode():
        model = tiny_cnn() if kind == "cnn" else tiny_vit()
    x = batch(kind)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(xai_core.core.errors.CapabilityError, match="inference_mode"):
        xai_core.explain(model, x, method=gradient_method)
    assert [p.requires_grad for p in model.parameters()] == before
    for method in (other, "occlusion"):  # no gradients needed: they just work
        xai_core.explain(model, x, method=method)
    assert [p.requires_grad for p in model.parameters()] == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_process_forked_during_another_threads_session_can_explain_the_model():
    model = tiny_cnn()
    with session_in_another_thread(model):
        pid = os.fork()
        if pid == 0:  # the child: the holder thread does not exist here
            ok = session_lock(model).acquire(timeout=5)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child inherited a lock held forever"
