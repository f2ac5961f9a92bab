"""Loading timm state_dicts and Hugging Face folders from the CLI, offline and without pickles."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xai_core.core.errors import MissingDependencyError, ModelError
from xai_core.io.models import load_model

from .files import write_png

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

XAI = str(Path(sys.executable).with_name("xai"))
LABELS = {0: "normal", 1: "nodule", 2: "effusion"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A folder with a timm state_dict (.pth and .safetensors), a Hugging Face ViT folder with a
    preprocessor config, a ConvNeXt folder with a pytorch_model.bin, and two PNGs."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    net = timm.create_model("test_convnext", pretrained=False, num_classes=3).eval()
    torch.save(net.state_dict(), root / "convnext.pth")
    save_file(net.state_dict(), str(root / "convnext.safetensors"))
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    transformers.ViTForImageClassification(config).save_pretrained(root / "vit")
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(root / "vit")
    convnext = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2
        )
    )
    (root / "convnext_bin").mkdir()
    convnext.config.to_json_file(root / "convnext_bin" / "config.json")
    torch.save(convnext.state_dict(), root / "convnext_bin" / "pytorch_model.bin")
    (root / "imgs").mkdir()
    for i in range(2):
        write_png(root / "imgs" / f"x{i}.png", seed=i, size=40)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("weights", ["convnext.pth", "convnext.safetensors"])
def test_timm_state_dict_loads_offline_with_its_data_config(zoo, weights, no_network):
    model, info = load_model(str(zoo / weights), arch="timm:test_convnext")
    torch.manual_seed(0)
    reference = timm.create_model("test_convnext", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert info["kind"] == "timm" and info["num_classes"] == 3  # read from the weights
    assert info["preprocess"] == {
        "channels": 3,
        "size": [160, 160],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


def test_hugging_face_folder_loads_offline_with_labels_and_preprocessing(
    zoo, no_network, monkeypatch
):
    import huggingface_hub.constants

    auto = transformers.AutoModelForImageClassification
    original, seen = auto.from_pretrained, {}

    def spy(*args, **kwargs):
        seen["env"] = os.environ.get("HF_HUB_OFFLINE")
        seen["hub"] = huggingface_hub.constants.HF_HUB_OFFLINE
        seen["kwargs"] = kwargs
        return original(*args, **kwargs)

    monkeypatch.setattr(auto, "from_pretrained", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, info = load_model(str(zoo / "vit"))
    assert seen["env"] == "1" and seen["hub"] is True  # offline while loading
    assert seen["kwargs"]["local_files_only"] and not seen["kwargs"]["trust_remote_code"]
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after loading
    reference = transformers.ViTForImageClassification.from_pretrained(zoo / "vit").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits)
    assert info["kind"] == "huggingface" and info["class_names"] == list(LABELS.values())
    assert info["preprocess"] == {
        "channels": 3,
        "size": [32, 32],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }


def test_pytorch_model_bin_is_read_as_weights_only(zoo, no_network, tmp_path):
    model, info = load_model(str(zoo / "convnext_bin"))
    state = torch.load(zoo / "convnext_bin" / "pytorch_model.bin", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert info["num_classes"] == 2 and "preprocess" in info
    # A pickle with Python objects in place of the weights is refused, not run.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((zoo / "convnext_bin" / "config.json").read_text())
    torch.save({"weights": Path("x")}, bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match="Refused"):
        load_model(str(bad))


def test_loading_errors_are_typed_and_clear(zoo, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="Did you mean 'test_convnext'"):
        load_model(str(zoo / "convnext.pth"), arch="timm:test_convnxt")
    with pytest.raises(ModelError, match="check that --arch is right"):
        load_model(str(zoo / "convnext.pth"), arch="timm:test_vit")
    with pytest.raises(ModelError, match="do not fit timm's test_vit"):
        load_model(str(zoo / "convnext.pth"), arch="timm:test_vit", num_classes=3)
    with pytest.raises(ModelError, match="do not fit timm's test_convnext"):
        load_model(str(zoo / "convnext.pth"), arch="timm:test_convnext", num_classes=5)
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text((zoo / "vit" / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="does not match the 3 labels"):
        load_model(str(zoo / "vit"), num_classes=4)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "my_net", "auto_map": {"AutoConfig": "my_net.MyConfig"}})
    )
    (remote / "my_net.py").write_text("raise SystemExit('remote code ran')\n")
    (remote / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="Cannot load the Hugging Face model"):
        load_model(str(remote))  # custom code is never imported
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"xai-core\[timm\]"):
        load_model(str(zoo / "convnext.pth"), arch="timm:test_convnext")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"xai-core\[hf\]"):
        load_model(str(zoo / "vit"))


def run_cli(cwd: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)  # the loader must switch offline mode on by itself
    done = subprocess.run(
        [XAI, "explain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("model", "extra", "size", "names"),
    [
        ("zoo/convnext.pth", ["--arch", "timm:test_convnext"], (160, 160), None),
        ("zoo/vit", [], (32, 32), list(LABELS.values())),
    ],
)
def test_real_cli_explains_with_relative_paths_from_another_folder(
    zoo, tmp_path, model, extra, size, names
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "zoo").symlink_to(zoo)
    run_cli(work, model, "zoo/imgs", *extra, "--method", "gradcam", "--out", "out")
    for key in ("x0.png", "x1.png"):
        folder = work / "out" / key
        maps = np.load(folder / "maps_gradcam.npy")
        assert maps.shape == (1, *size) and np.isfinite(maps).all()  # the model's own size
        result = json.loads((folder / "result_gradcam.json").read_text())
        if names:
            assert result["target_names"][0][0] in names
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert sorted(summary["done"]) == ["x0.png", "x1.png"] and summary["failed"] == {}
