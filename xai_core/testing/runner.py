"""Named checks, how they are run, and what a run reports (the shape of scikit-learn's kit).

A :class:`Check` is one named function. A check that cannot apply to what is tested carries the
reason (``skip``) and is never run; a check may also find out only while running that it cannot
apply, and raises :class:`SkipCheck` (``unittest.SkipTest``, which pytest reports as a skip).
:func:`run_checks` runs a list of checks against an ``expected_failures`` mapping and returns a
:class:`Report`; :func:`parametrize` makes one pytest parameter per check.
"""

from __future__ import annotations

import unittest
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xai_core.core.errors import ConformanceError

Status = Literal["passed", "failed", "skipped", "xfail", "xpass"]


class SkipCheck(unittest.SkipTest):
    """A check that cannot apply here; the message says why."""


@dataclass
class Check:
    """One named conformance check of one subject (an explainer, a metric, an adapter).

    Calling it runs it: it returns when the check passes, raises :class:`ConformanceError` (or the
    subject's own exception) when it fails, and :class:`SkipCheck` when it cannot apply.
    """

    name: str
    run: Callable[[], None]
    subject: str = ""
    skip: str | None = None  # why the check cannot apply, known before running it

    def __call__(self) -> None:
        if self.skip is not None:
            raise SkipCheck(self.skip)
        self.run()

    @property
    def id(self) -> str:
        """``subject-check``, the pytest id."""
        return f"{self.subject}-{self.name}" if self.subject else self.name


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    message: str = ""  # the failure, the skip reason, or the expected failure's reason


@dataclass
class Report:
    """What :func:`run_checks` found, check by check (``report["stateless"].status``)."""

    subject: str
    results: list[CheckResult] = field(default_factory=list)

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r}; the checks: {[r.name for r in self.results]}")

    def names(self, status: Status) -> list[str]:
        return [r.name for r in self.results if r.status == status]

    @property
    def ok(self) -> bool:
        """No failure and no unexpected pass."""
        return not self.names("failed") and not self.names("xpass")

    def __str__(self) -> str:
        lines = [f"{self.subject}:"]
        lines += [
            f"  {r.status:7} {r.name}" + (f": {r.message}" if r.message else "")
            for r in self.results
        ]
        return "\n".join(lines)


def _known(checks: list[Check], expected: Mapping[str, str], subject: str) -> None:
    names = {c.name for c in checks}
    unknown = sorted(set(expected) - names)
    if unknown:
        raise ConformanceError(
            f"expected_failures for {subject} names no check: {unknown}; the checks are "
            f"{sorted(names)}."
        )


def run_checks(
    checks: list[Check],
    subject: str,
    expected_failures: Mapping[str, str] | None = None,
    *,
    raise_on_failure: bool = True,
) -> Report:
    """Run every check; with ``raise_on_failure``, one :class:`ConformanceError` lists each
    failure and each check listed in ``expected_failures`` that passed (strict, like
    scikit-learn's ``xfail_strict``), after all ran."""
    expected = dict(expected_failures or {})
    _known(checks, expected, subject)
    report = Report(subject)
    for check in checks:
        try:
            check()
        except unittest.SkipTest as exc:
            report.results.append(CheckResult(check.name, "skipped", str(exc)))
            continue
        except Exception as exc:
            if check.name in expected:
                report.results.append(CheckResult(check.name, "xfail", expected[check.name]))
            else:
                report.results.append(
                    CheckResult(check.name, "failed", f"{type(exc).__name__}: {exc}")
                )
            continue
        if check.name in expected:
            why = f"listed as an expected failure ({expected[check.name]}) but it passed"
            report.results.append(CheckResult(check.name, "xpass", why))
        else:
            report.results.append(CheckResult(check.name, "passed"))
    if raise_on_failure and not report.ok:
        bad = [r for r in report.results if r.status in ("failed", "xpass")]
        raise ConformanceError(
            f"{subject} fails conformance:\n" + "\n".join(f"- {r.name}: {r.message}" for r in bad)
        )
    return report


def parametrize(
    checks: Iterable[Check],
    expected: Callable[[Check], Mapping[str, str]] = lambda check: {},
    argname: str = "check",
) -> Any:
    """``pytest.mark.parametrize(argname, ...)`` with one parameter per check, ``subject-check``
    ids, a skip mark with its reason for a check that cannot apply, and a strict xfail mark for
    an expected failure."""
    import pytest  # a test-time dependency only

    params = []
    for check in checks:
        marks = []
        reasons = expected(check)
        if check.skip is not None:
            marks.append(pytest.mark.skip(reason=check.skip))
        elif check.name in reasons:
            marks.append(pytest.mark.xfail(reason=reasons[check.name], strict=True))
        params.append(pytest.param(check, id=check.id, marks=marks))
    return pytest.mark.parametrize(argname, params)


def parametrize_entries(
    make_checks: Any,
    entries: list[Any],
    expected_failures: Mapping[str, str] | Any = None,
) -> Any:
    """The pytest parametrization of ``make_checks(subject, **keywords)`` for every entry."""
    checks, reasons = [], {}
    for entry in entries:
        subject, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        kwargs = dict(kwargs)
        own = expected_failures(subject) if callable(expected_failures) else expected_failures
        own = {**(own or {}), **kwargs.pop("expected_failures", {})}
        made = make_checks(subject, **kwargs)
        _known(made, own, made[0].subject if made else str(subject))
        for check in made:
            checks.append(check)
            reasons[id(check)] = own
    return parametrize(checks, lambda check: reasons[id(check)])
