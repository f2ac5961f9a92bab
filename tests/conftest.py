"""Shared fixtures: tiny models, isolated registries, test plugin distributions."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import xai_core
from xai_core.testing import tiny_cnn

DATA = Path(__file__).parent / "data"


@pytest.fixture
def cnn() -> nn.Module:
    return tiny_cnn()


@pytest.fixture
def cnn3d() -> nn.Module:
    return tiny_cnn(dims=3, channels=1)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def fresh_registry():
    """The global registry, rebuilt before and after the test (in-process plugins vanish)."""
    xai_core.reset_registry()
    yield xai_core.get_registry()
    xai_core.reset_registry()


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True
    )


def build_copy(name: str, tmp: Path) -> Path:
    """Copy a test plugin out of the repo first, so building it leaves nothing in the tree."""
    target = tmp / name
    shutil.copytree(DATA / name, target)
    return target


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder with the broken, clashing and third-party test plugins pip-installed into it."""
    tmp = tmp_path_factory.mktemp("plugins")
    site = tmp / "site"
    sources = [
        str(build_copy(n, tmp))
        for n in ("xai-sobel", "xai-broken-import", "xai-broken-hook", "xai-clash")
    ]
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(site), *sources)
    return site


@pytest.fixture(scope="session")
def hostile_site(tmp_path_factory) -> Path:
    """xai-hostile and xai-impostor (plugins that misbehave, tests/data), pip-installed here."""
    tmp = tmp_path_factory.mktemp("hostile")
    site = tmp / "site"
    sources = [str(build_copy(n, tmp)) for n in ("xai-hostile", "xai-impostor")]
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(site), *sources)
    return site


@pytest.fixture
def site_registry(monkeypatch):
    """Make the global registry load the plugins installed in a site folder (and reset it)."""

    def make(site: Path, *, block: str = "") -> xai_core.Registry:
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
        monkeypatch.setenv("XAI_CORE_BLOCK_PLUGINS", block)
        xai_core.reset_registry()
        return xai_core.get_registry()

    yield make
    xai_core.reset_registry()
