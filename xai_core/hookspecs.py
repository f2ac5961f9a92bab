"""Every hook a plugin can implement, in one place.

A plugin is a module (or object) that the ``xai_core`` entry-point group points to and that
implements some of these hooks with the :data:`hookimpl` marker::

    # pyproject.toml
    [project.entry-points.xai_core]
    my_method = "my_package.plugin"

    # my_package/plugin.py
    import xai_core

    @xai_core.hookimpl
    def register_explainers(register):
        register(MyExplainer)

An implementation may accept fewer arguments than its spec names, so specs can grow new
arguments without breaking plugins. Each plugin's implementation is called on its own, inside a
guard: one plugin raising never stops the others (see :mod:`xai_core.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from xai_core.adapters.base import ModelAdapter

PROJECT = "xai_core"  # the pluggy project name and the entry-point group

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- called once, when the registry first loads plugins --------------------------------------


@hookspec
def register_explainers(register: Callable[[type], None]) -> None:
    """Register explainer classes by calling ``register(ExplainerClass)`` once per class.

    :param register: records the class under its ``name`` together with the distribution and
        version of the plugin that called it. A class that breaks the
        :class:`~xai_core.Explainer` protocol is refused and reported as a plugin failure; two
        plugins registering one name make that name unusable until one is removed, and the
        error names both distributions.
    """


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register metric classes by calling ``register(MetricClass)`` once per class.

    :param register: same contract as in :func:`register_explainers`; a metric class has a
        ``name`` attribute.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add sub-commands to the ``xai`` command line.

    :param cli: the root :class:`typer.Typer` application; call ``@cli.command()`` on your
        functions. Called once, when ``xai`` starts.
    """


# -- called for every model passed to explain() / compare() ----------------------------------


@hookspec(firstresult=True)
def adapt_model(model: Any, options: dict[str, Any]) -> ModelAdapter | None:
    """Turn a model object the core does not know into a :class:`~xai_core.ModelAdapter`.

    Return ``None`` for objects you do not handle. The first non-``None`` result wins; plugins
    are asked before the built-in PyTorch and ONNX adapters, so a plugin can also override how
    those are adapted.

    :param model: whatever the user passed as ``model``.
    :param options: adapter options given by the user (e.g. ``providers`` for ONNX).
    """
