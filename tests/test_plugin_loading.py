"""A plugin that leaves through a BaseException (sys.exit(), KeyboardInterrupt it raises itself,
GeneratorExit, an unprintable exception) is that plugin's failure: loading goes on with the
others and `xai plugins` lists it. Only a real Ctrl-C of the user propagates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import xai_core
from xai_core import Tags
from xai_core.core.registry import PluginWarning, Registry

XAI = str(Path(sys.executable).with_name("xai"))
HOSTILE = {
    "a_exit_import": ("import", "SystemExit: xai-hostile refuses to load"),
    "a_exit_hook": ("register_explainers", "SystemExit: 2"),
    "a_interrupt_import": ("import", "KeyboardInterrupt: raised by the plugin"),
    "a_generator_exit": ("import", "GeneratorExit: out of nowhere"),
    "a_bad_str": ("import", "Unprintable: <the exception's message could not be printed>"),
}


def test_base_exceptions_of_plugins_are_their_failures(hostile_site, site_registry, cnn, images):
    with pytest.warns(PluginWarning):
        registry = site_registry(hostile_site, block="xai-impostor")
        names = {i.name for i in registry.list_explainers()}
    # Everything loaded after the hostile plugins is there: the built-ins and the fine plugin.
    assert {"gradcam", "occlusion", "flat_after_hostile"} <= names
    assert "exits_after_registering" not in names  # the hook did not return: nothing kept
    failures = {f.plugin: f for f in registry.failures}
    for plugin, (stage, error) in HOSTILE.items():
        assert failures[plugin].stage == stage
        assert failures[plugin].error.startswith(error)
        assert failures[plugin].distribution == "xai-hostile"
    assert xai_core.explain(cnn, images, method="gradcam").maps.shape == (2, 16, 16)


def test_xai_plugins_lists_hostile_plugins_and_exits_zero(hostile_site):
    env = {**os.environ, "XAI_CORE_BLOCK_PLUGINS": "xai-impostor"}
    env["PYTHONPATH"] = os.pathsep.join([str(hostile_site), env.get("PYTHONPATH", "")])
    done = subprocess.run([XAI, "plugins", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    errors = {r["name"]: r for r in rows if r["status"] == "error"}
    assert set(HOSTILE) <= set(errors)
    assert errors["a_exit_import"]["plugin"] == "xai-hostile"
    ok = {r["name"] for r in rows if r["status"] == "ok"}
    assert {"gradcam", "flat_after_hostile", "deletion"} <= ok


class _Hook:
    """An in-process plugin whose registration hook raises whatever it is given."""

    def __init__(self, make) -> None:
        self.make = make

    @xai_core.hookimpl
    def register_explainers(self, register):
        raise self.make()


@pytest.mark.parametrize(
    "make",
    [lambda: SystemExit(3), KeyboardInterrupt, GeneratorExit, lambda: BaseException("odd")],
    ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"],
)
def test_base_exception_in_a_hook_is_recorded(make):
    registry = Registry(entry_points_group=None)
    with pytest.warns(PluginWarning):
        registry.register_plugin(_Hook(make), "raiser")
        assert registry.list_explainers() == []
    assert [f.stage for f in registry.failures] == ["register_explainers"]


def test_a_real_ctrl_c_still_interrupts():
    """A SIGINT that arrives while a plugin runs is the user's: it propagates."""

    class Slow:
        @xai_core.hookimpl
        def register_explainers(self, register):
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during the hook
            time.sleep(5)  # interrupted long before this ends

    registry = Registry(entry_points_group=None)
    registry.register_plugin(Slow(), "slow")
    with pytest.raises(KeyboardInterrupt):
        registry.list_explainers()
    assert registry.failures == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_ctrl_c_while_loading_leaves_nothing_half_loaded(monkeypatch):
    import xai_core.core.registry as module

    class Interrupted:
        """An entry point during whose import the user hits Ctrl-C."""

        name, dist = "b_interrupted", None  # after `attention`, before `gradcam`

        def load(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

    real, calls = module.entry_points, []

    def entry_points(**kwargs):
        calls.append(kwargs)
        found = list(real(**kwargs))
        return [*found, Interrupted()] if len(calls) == 1 else found

    monkeypatch.setattr(module, "entry_points", entry_points)
    registry = Registry()
    with pytest.raises(KeyboardInterrupt):
        registry.get_explainer("gradcam")
    assert registry.get_explainer("gradcam").distribution == "xai-gradcam"  # loaded afresh
    assert registry.failures == [] and len(calls) == 2


def test_a_broken_unsupported_reason_breaks_nothing_else(fresh_registry, cnn, images):
    class Fussy:
        name = "fussy"
        tags = Tags("local", "model-agnostic")

        @classmethod
        def unsupported_reason(cls, model):
            raise AttributeError("plugin bug in unsupported_reason")

        def explain(self, model, inputs, targets):
            raise NotImplementedError

    class Vague(Fussy):
        name = "vague"

        @classmethod
        def unsupported_reason(cls, model):
            return False  # neither a reason nor None

    class Plugin:
        @xai_core.hookimpl
        def register_explainers(self, register):
            register(Fussy)
            register(Vague)

    fresh_registry.register_plugin(Plugin(), "fussy-plugin")
    with pytest.warns(PluginWarning):
        runnable = {i.name for i in xai_core.list_explainers(model=cnn)}
    assert "gradcam" in runnable and not {"fussy", "vague"} & runnable
    result = xai_core.compare(cnn, images, methods=["fussy", "vague", "occlusion"], metrics=[])
    assert result.methods == ["occlusion"]
    assert "broken" in result.skipped_methods["fussy"] and "vague" in result.skipped_methods
    stages = {f.error.split(":")[0]: f.stage for f in fresh_registry.failures}
    assert stages == {"AttributeError": "unsupported_reason", "PluginError": "unsupported_reason"}
