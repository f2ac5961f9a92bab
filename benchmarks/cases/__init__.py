"""The benchmark's cases, one module per case family.

A case module exposes ``ORDER`` (where its cases come in ``--list`` and in the tables) and
``cases(cfg) -> list[Case]``; :func:`discover` finds every such module in this folder, so a new
family is a new file here and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from harness import Case, Config


def discover(cfg: Config) -> list[Case]:
    """Every case of every case module here, the modules in the order of their ``ORDER``."""
    modules = [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_")
    ]
    modules = [m for m in modules if hasattr(m, "cases")]
    return [case for m in sorted(modules, key=lambda m: m.ORDER) for case in m.cases(cfg)]
