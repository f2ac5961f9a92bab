"""Options are checked against their annotations before any work (xai_core/core/options.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import pytest
import torch
from torch import nn

import xai_core
from xai_core.core.errors import OptionError, OptionTypeError, XaiError
from xai_core.core.options import Range, check_option_values, option_hints
from xai_core.core.tags import Tags
from xai_core.testing import tiny_cnn

if TYPE_CHECKING:
    from xai_core.onnx.adapter import OnnxAdapter  # never imported at run time

T = TypeVar("T")


def counted() -> tuple[nn.Module, list[int]]:
    """A tiny CNN that records every forward call: no call means no work was done."""
    model, calls = tiny_cnn(), []
    model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return model, calls


def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class _Everything:
    """An explainer whose options use every kind of annotation the checker understands."""

    name = "everything"
    tags = Tags("local", "model-agnostic")

    def explain(
        self,
        model,
        inputs,
        targets,
        *,
        flag: bool = False,
        count: int = 1,
        ratio: Annotated[float, Range(0, 1, max_inclusive=False)] = 0.5,
        size: Annotated[int, Range(1, 10)] | None = None,
        name: str = "x",
        mode: Literal["a", "b"] = "a",
        sizes: Sequence[Annotated[int, Range(1)]] = (1,),
        pair: tuple[int, str] = (1, "a"),
        settings: Mapping[str, float] | None = None,
        hook: Callable[[int], object] | None = None,
        layer: str | nn.Module | None = None,
        anything: Any = None,
        bounded_any: Annotated[Any, Range(0, 1)] = 0,
        sloppy: int = None,  # noqa: RUF013 (a default outside the annotation is accepted)
        generic: T | None = None,
        unresolved: OnnxAdapter | None = None,
    ):
        raise AssertionError("never reached in these tests")


GOOD = {
    "flag": [True, False],
    "count": [0, -3, 2**70],
    "ratio": [0, 0.0, 0.999, 1e-300],
    "size": [1, 10, None],
    "name": ["", "abc"],
    "mode": ["a", "b"],
    "sizes": [[1, 2], (3,), []],
    "pair": [(2, "b"), [2, "b"]],
    "settings": [{"a": 1, "b": 0.5}, None, {}],
    "hook": [print, lambda i: i, None],
    "layer": ["features.0", nn.ReLU(), None],
    "anything": [object(), "x", None],
    "bounded_any": ["x", None, 0.5],  # a range applies to numbers only
    "sloppy": [None, 3],
    "generic": [object(), 3],
    "unresolved": [object(), 3],  # cannot be resolved: passed through for the plugin to check
}
BAD_TYPE = {
    "flag": [1, 0, "no", "yes", "true", None, 1.0],
    "count": [True, 1.0, "3", None],
    "ratio": ["0.5", True, None, [0.5]],
    "size": [2.0, "3", True],
    "name": [3, None, b"x"],
    "sizes": [1, "12", [1, "2"], [True]],
    "pair": [(1,), (1, 2), "ab", (1, "a", 2)],
    "settings": [[("a", 1.0)], {"a": "1"}, {1: 1.0}],
    "hook": [3, "print"],
    "layer": [3, [nn.ReLU()]],
    "sloppy": ["3", 3.0],
}
BAD_VALUE = {
    "ratio": [1, 1.0, -0.1, float("nan"), float("inf")],
    "size": [0, 11],
    "mode": ["c", "A"],
    "sizes": [[0], [1, -1]],
    "bounded_any": [2, -1.5],
}


@pytest.mark.parametrize(("option", "value"), [(k, v) for k, vs in GOOD.items() for v in vs])
def test_values_that_fit_pass(option, value):
    check_option_values("everything", _Everything, {option: value})


@pytest.mark.parametrize(("option", "value"), [(k, v) for k, vs in BAD_TYPE.items() for v in vs])
def test_values_of_the_wrong_type_are_an_option_type_error(option, value):
    with pytest.raises(OptionTypeError, match=rf"option '{option}' of method 'everything' must"):
        check_option_values("everything", _Everything, {option: value})


@pytest.mark.parametrize(("option", "value"), [(k, v) for k, vs in BAD_VALUE.items() for v in vs])
def test_values_out_of_range_are_an_option_error(option, value):
    with pytest.raises(OptionError, match=rf"option '{option}' of method 'everything' must") as e:
        check_option_values("everything", _Everything, {option: value})
    assert not isinstance(e.value, TypeError)  # the type was right: a ValueError


def test_ranges_and_choices_are_said_in_words():
    with pytest.raises(OptionError, match=r"must be float in \[0, 1\); got 1.0"):
        check_option_values("everything", _Everything, {"ratio": 1.0})
    with pytest.raises(OptionError, match="one of 'a', 'b'; got 'c'"):
        check_option_values("everything", _Everything, {"mode": "c"})
    assert str(Range(1)) == ">= 1" and str(Range(0, 100, min_inclusive=False)) == "in (0, 100]"


def test_unresolvable_annotations_do_not_hide_the_others():
    hints = option_hints(_Everything)
    assert hints["unresolved"][0] is Any  # OnnxAdapter exists only under TYPE_CHECKING
    assert hints["flag"] == (bool, False)


# -- through explain(), before any work -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "error", "words"),
    [
        ("rollout", {"discard_ratio": "0.5"}, OptionTypeError, "'discard_ratio' .* a number"),
        ("rollout", {"discard_ratio": 1.0}, OptionError, r"in \[0, 1\)"),
        ("attention", {"class_token": "yes"}, OptionTypeError, "'class_token' .* bool or int"),
        ("gradcam", {"relu": "no"}, OptionTypeError, "'relu' .* a bool"),
        ("gradcam", {"relu": 0}, OptionTypeError, "'relu' .* a bool"),
        ("gradcam", {"variant": "gradcm"}, OptionError, "Did you mean 'gradcam'"),
        ("occlusion", {"baseline": "blur", "sigma": 1e6}, OptionError, r"'sigma' .* \(0, 100\]"),
        ("occlusion", {"baseline": "blur", "sigma": 1e300}, OptionError, r"\(0, 100\]"),
        ("occlusion", {"baseline": "blur", "sigma": (2, 1e6)}, OptionError, r"\(0, 100\]"),
        ("occlusion", {"window": 0}, OptionError, "'window' .* int >= 1"),
        ("occlusion", {"stride": 2.5}, OptionTypeError, "'stride'"),
        ("occlusion", {"incremental": "yes"}, OptionError, "'auto', 'exact', 'approximate'"),
        ("global-occlusion", {"sigma": 1e6}, OptionError, r"\(0, 100\]"),
        ("aggregate", {"local_options": {"relu": "no"}}, OptionTypeError, "'relu' .* a bool"),
    ],
)
def test_bad_options_are_refused_before_the_model_runs(method, options, error, words):
    model, calls = counted()
    with pytest.raises(error, match=words):
        xai_core.explain(model, images(), method=method, **options)
    assert calls == []


@pytest.mark.parametrize("method", [None, 3, ["gradcam"], b"gradcam"])
def test_method_must_be_a_name(method):
    model, calls = counted()
    with pytest.raises(OptionTypeError, match="method must be the name"):
        xai_core.explain(model, images(), method=method)
    assert calls == []


def _builtin_options() -> list[tuple[str, str]]:
    return [(i.name, o) for i in xai_core.list_explainers() for o in i.options]


def test_every_builtin_option_is_annotated_in_a_way_the_checker_understands():
    """The property below only means something if no built-in option is passed through."""
    from xai_core.core.options import _UNKNOWN, _check

    for info in xai_core.list_explainers():
        for option, (hint, _) in option_hints(info.cls).items():
            assert _check(object(), hint) != _UNKNOWN, (info.name, option, hint)


@pytest.mark.parametrize("wrong", [object(), [object()], b"\x00"], ids=["object", "list", "bytes"])
@pytest.mark.parametrize(("method", "option"), _builtin_options())
def test_every_builtin_option_refuses_a_wrong_type_before_the_model_runs(method, option, wrong):
    model, calls = counted()
    with pytest.raises(XaiError, match=f"'{option}'") as e:
        xai_core.explain(model, images(), method=method, **{option: wrong})
    assert isinstance(e.value, OptionTypeError), e.value
    assert calls == []


def test_a_third_party_explainer_with_unknown_annotations_still_runs(fresh_registry):
    class Loose:
        name = "loose"
        tags = Tags("local", "model-agnostic")

        def explain(
            self,
            model,
            inputs,
            targets,
            *,
            scale: T = 1,
            level: Missing = 2,  # noqa: F821 (a name nobody defines: it cannot be resolved)
        ):
            scores = model.forward(inputs)
            k = targets.resolve(scores).count
            shape = (inputs.shape[0], k, *inputs.shape[2:])
            return xai_core.Attribution(maps=torch.full(shape, float(scale)), scores=scores)

    class Plugin:
        @xai_core.hookimpl
        def register_explainers(self, register):
            register(Loose)

    fresh_registry.register_plugin(Plugin(), "loose-plugin")
    exp = xai_core.explain(tiny_cnn(), images(), method="loose", scale="3", level=object())
    assert float(exp.raw[0].max()) == 3.0


def test_compare_checks_every_methods_options_before_any_forward_pass():
    model, calls = counted()
    with pytest.raises(OptionError, match=r"'sigma' of method 'occlusion' .* \(0, 100\]"):
        xai_core.compare(
            model,
            images(),
            methods=["gradcam", "occlusion"],
            metrics=[],
            options={"occlusion": {"baseline": "blur", "sigma": 1e6}},
        )
    assert calls == []
