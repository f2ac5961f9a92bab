"""Options checked against their annotations, before an explainer does any work.

An explainer's options are the keyword-only parameters of its ``explain``; their type hints are
the contract. :func:`check_option_values` reads them with ``typing.get_type_hints`` and refuses
a value that does not fit with an :class:`~xai_core.core.errors.OptionTypeError` (wrong type)
or an :class:`~xai_core.core.errors.OptionError` (out of range, not one of the choices), naming
the method, the option, the value and what was expected. Understood annotations:

* ``bool`` (only ``True``/``False``, not ``1`` or ``"no"``), ``int`` (not a bool), ``float``
  (an int is fine; NaN and infinities are not), ``str``, ``None``;
* ``Literal["a", "b"]`` (one of the choices), ``X | Y`` / ``Optional[X]``;
* ``Sequence[X]``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``Mapping[K, V]``,
  ``dict[K, V]``; ``Callable[...]``; any class (``nn.Module``: ``isinstance``); ``Any``;
* ``Annotated[float, Range(0, 1, max_inclusive=False)]``: a number within bounds.

An annotation the checker does not understand (a type variable, a forward reference it cannot
resolve, a non-runtime protocol) lets every value through: third-party explainers keep working,
and still check what they must themselves.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import numbers
import types
import typing
import weakref
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from xai_core.core.errors import OptionError, OptionTypeError, did_you_mean


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option, declared in its annotation:
    ``Annotated[float, Range(0, 1, max_inclusive=False)]`` is ``0 <= value < 1``."""

    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True

    def contains(self, value: float) -> bool:
        low = self.min is None or value > self.min or (self.min_inclusive and value == self.min)
        high = self.max is None or value < self.max or (self.max_inclusive and value == self.max)
        return low and high

    def __str__(self) -> str:
        low = high = None
        if self.min is not None:
            low = (">= " if self.min_inclusive else "> ") + f"{self.min:g}"
        if self.max is not None:
            high = ("<= " if self.max_inclusive else "< ") + f"{self.max:g}"
        if low and high:
            left, right = "[("[not self.min_inclusive], "])"[not self.max_inclusive]
            return f"in {left}{self.min:g}, {self.max:g}{right}"
        return low or high or "any number"


PositiveInt = Annotated[int, Range(1)]  # counts and sizes: 1, 2, ...

# The outcome of checking one value against one annotation.
_OK = "ok"
_UNKNOWN = "unknown"


@dataclass(frozen=True)
class _Mismatch:
    expected: str  # what the annotation wants, in words
    in_range: bool = False  # the type fitted but a bound or a choice did not


_Verdict = str | _Mismatch

_SEQUENCES = {  # annotation -> what a value must be (a tuple option takes a list, e.g. JSON's)
    list: list,
    tuple: collections.abc.Sequence,
    collections.abc.Sequence: collections.abc.Sequence,
    typing.Sequence: collections.abc.Sequence,
}
_MAPPINGS = {dict, collections.abc.Mapping, typing.Mapping}
_NOT_SEQUENCES = (str, bytes, bytearray, memoryview)


def describe(hint: Any) -> str:
    """An annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin is Annotated:
        ranges = [str(m) for m in hint.__metadata__ if isinstance(m, Range)]
        return describe(args[0]) + (f" {ranges[0]}" if ranges else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in _SEQUENCES:
        inner = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        if inner is not None:
            return f"a sequence of ({describe(inner)})"
        return f"a tuple ({', '.join(describe(a) for a in args)})" if args else "a sequence"
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}" if args else "a mapping"
    if origin is collections.abc.Callable or hint in (collections.abc.Callable, typing.Callable):
        return "a callable"
    return getattr(hint, "__name__", repr(hint))


def _check(value: Any, hint: Any) -> _Verdict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return _OK
    if hint is None or hint is type(None):
        return _OK if value is None else _Mismatch("None")
    if origin is Annotated:
        verdict = _check(value, args[0])
        if verdict != _OK:
            return verdict
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        for meta in hint.__metadata__:
            if isinstance(meta, Range) and number and not meta.contains(value):
                return _Mismatch(describe(hint), in_range=True)
        return _OK
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return _OK
        fits = any(isinstance(value, type(a)) for a in args)
        return _Mismatch(describe(hint), in_range=fits)
    if origin in (Union, types.UnionType):
        verdicts = [_check(value, a) for a in args]
        if _OK in verdicts:
            return _OK
        near = [v for v in verdicts if isinstance(v, _Mismatch) and v.in_range]
        if near:
            return near[0]
        if _UNKNOWN in verdicts:
            return _UNKNOWN
        return _Mismatch(describe(hint))
    if hint is bool:
        return _OK if isinstance(value, bool) else _Mismatch("a bool (True or False)")
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return _OK if ok else _Mismatch("an int")
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return _Mismatch("a finite number", in_range=True)
        return _OK if ok else _Mismatch("a number")
    if hint is str:
        return _OK if isinstance(value, str) else _Mismatch("a str")
    if origin in _SEQUENCES or hint in _SEQUENCES:
        kind = _SEQUENCES[origin or hint]
        if not isinstance(value, kind) or isinstance(value, _NOT_SEQUENCES):
            return _Mismatch(describe(hint))
        if not args:
            return _OK
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            items = [(v, args[0]) for v in value]
        elif len(args) != len(value):
            return _Mismatch(describe(hint))
        else:
            items = list(zip(value, args, strict=True))
        return _all(items, describe(hint))
    if origin in _MAPPINGS or hint in _MAPPINGS:
        if not isinstance(value, collections.abc.Mapping):
            return _Mismatch(describe(hint))
        if not args:
            return _OK
        pairs = [(k, args[0]) for k in value] + [(v, args[1]) for v in value.values()]
        return _all(pairs, describe(hint))
    if origin is collections.abc.Callable or hint in (collections.abc.Callable, typing.Callable):
        return _OK if callable(value) else _Mismatch("a callable")
    if isinstance(hint, type) and origin is None:
        try:
            return _OK if isinstance(value, hint) else _Mismatch(describe(hint))
        except TypeError:  # e.g. a Protocol that is not runtime-checkable
            return _UNKNOWN
    return _UNKNOWN


def _all(items: list[tuple[Any, Any]], expected: str) -> _Verdict:
    """Every ``(value, hint)`` pair fits: the first mismatch decides, an unknown lets through."""
    unknown = False
    for v, h in items:
        verdict = _check(v, h)
        if isinstance(verdict, _Mismatch):
            return _Mismatch(expected, verdict.in_range)
        unknown = unknown or verdict == _UNKNOWN
    return _UNKNOWN if unknown else _OK


_hints: weakref.WeakKeyDictionary[type, dict[str, tuple[Any, Any]]] = weakref.WeakKeyDictionary()


def option_hints(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{option: (type hint, default)}`` of ``cls.explain``'s keyword-only parameters.

    A hint that cannot be resolved (a name only imported under ``TYPE_CHECKING``) is ``Any``.
    """
    cached = _hints.get(cls)
    if cached is not None:
        return cached
    function = cls.explain
    params = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    try:
        resolved = typing.get_type_hints(function, include_extras=True)
    except Exception:  # one unresolvable name: resolve the others one by one
        resolved = {}
        namespace = getattr(inspect.getmodule(function), "__dict__", {})
        for p in params:
            try:
                resolved[p.name] = typing.get_type_hints(
                    _Single(p.annotation), namespace, include_extras=True
                )["x"]
            except Exception:
                continue
    hints = {p.name: (resolved.get(p.name, Any), p.default) for p in params}
    _hints[cls] = hints
    return hints


class _Single:
    """An object whose only annotation is ``x``, to resolve one string annotation."""

    def __init__(self, annotation: Any) -> None:
        self.__annotations__ = {"x": annotation}


def check_option_values(method: str, cls: type, options: dict[str, Any]) -> None:
    """Raise a typed error for the first option whose value does not fit its annotation."""
    hints = option_hints(cls)
    for name, value in options.items():
        if name not in hints:
            continue  # unknown names are UnknownOptionError's business
        hint, default = hints[name]
        if value is default:
            continue  # the explainer's own default is always acceptable
        verdict = _check(value, hint)
        if isinstance(verdict, _Mismatch):
            error = OptionError if verdict.in_range else OptionTypeError
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            whole = describe(hint)
            takes = f" (it takes {whole})" if whole != verdict.expected else ""
            close = did_you_mean(value, _choices(hint)) if isinstance(value, str) else ""
            raise error(
                f"The option {name!r} of method {method!r} must be {verdict.expected}; got "
                f"{shown} ({type(value).__name__}){takes}.{close}"
            )


def _choices(hint: Any) -> list[str]:
    """Every string of every ``Literal`` inside ``hint`` (for 'did you mean')."""
    if typing.get_origin(hint) is Literal:
        return [a for a in typing.get_args(hint) if isinstance(a, str)]
    return [c for a in typing.get_args(hint) for c in _choices(a)]
