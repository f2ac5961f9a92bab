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
        :class:`~xai_core.Explainer` protocol is refused and reported as a plugin failure. A
        name a built-in distribution registers stays the built-in's (your class is refused);
        two third-party plugins registering one name make it unusable until one is removed, and
        the error names both distributions. Nothing is kept if the hook raises. What
        ``explain`` returns is checked against the result contract on every call
        (:mod:`xai_core.contract`).
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

    :param cli: a :class:`typer.Typer` application of your own; call ``@cli.command()`` (or
        ``cli.add_typer(...)``) on it. Called once, when ``xai`` starts; the core then adds your
        commands to ``xai`` one by one. A name ``xai`` already has (a built-in command such as
        ``plugins``, or another plugin's) is refused and listed by ``xai plugins`` as a failure;
        if the hook raises, none of its commands is added.
    """


# -- called for every model passed to explain() / compare() ----------------------------------


@hookspec(firstresult=True)
def adapt_model(model: Any, options: dict[str, Any]) -> ModelAdapter | None:
    """Turn a model object the core does not know into a :class:`~xai_core.ModelAdapter`.

    Return ``None`` for objects you do not handle. Plugins are asked only for objects the core
    does not adapt itself (anything but a ``torch.nn.Module``, an ONNX model or a
    ``ModelAdapter``), in pluggy's order; the first ``ModelAdapter`` returned wins. To adapt a
    PyTorch module differently, users pass your adapter instance as the model. Raise an
    :class:`~xai_core.errors.XaiError` for a model you recognise but cannot use: it is shown if no
    other plugin adapts the model. Any other exception, or a result that is not a
    ``ModelAdapter``, is recorded as your plugin's failure and the next plugin is asked. The
    first line of your implementation's docstring is shown by ``xai plugins``.

    :param model: whatever the user passed as ``model``.
    :param options: adapter options given by the user (e.g. ``providers`` for ONNX).
    """
