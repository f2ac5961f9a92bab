"""The shortcut audit: the demo's marker is found, hand-built shortcuts are boxed to the pixel
wherever they are, spread attribution and explained attribution are not flagged, and streaming,
files, the report and the command line agree."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import xai_core
from xai_core.cli.app import build_app
from xai_core.core.errors import InputError, OptionError
from xai_core.demo import data, load_model
from xai_core.report.audit import audit_report, draw_boxes
from xai_core.workflows.audit import AuditResult

SIZE = 32
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
OCCLUSION = {"window": 2, "stride": 2, "chunk_size": 1024}  # exact: each 2x2 block on its own


class BoxModel(nn.Module):
    """Class ``k`` scores the mean brightness inside ``boxes[k]`` (``None``: the whole image).

    Occlusion then puts a class's attribution exactly inside its box: a shortcut at a known
    place, of a known size, by construction.
    """

    def __init__(self, boxes: list[tuple[int, int, int, int] | None], bias: float = 0.0) -> None:
        super().__init__()
        regions = torch.zeros(len(boxes), SIZE, SIZE)
        for k, box in enumerate(boxes):
            if box is None:
                regions[k] = 1
            else:
                left, top, right, bottom = box
                regions[k, top:bottom, left:right] = 1
        self.register_buffer("regions", regions / regions.sum(dim=(1, 2), keepdim=True))
        self.register_buffer("bias", torch.tensor([0.0] + [bias] * (len(boxes) - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1)
        return torch.einsum("nhw,khw->nk", grey, self.regions) + self.bias


def box_images(n: int, box: tuple[int, int, int, int], seed: int = 0):
    """Grey noise in [0.2, 0.6]; odd images (class 1) are brighter inside ``box``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.4 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    y = torch.arange(n) % 2
    left, top, right, bottom = box
    x[y == 1, :, top:bottom, left:right] += 0.4
    return x, y


def overlaps(box, other) -> bool:
    return box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]


def marker_box(batch: data.DemoBatch) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) around every marker pixel of the batch."""
    rows = torch.nonzero(batch.markers.any(dim=0).any(dim=1)).flatten()
    cols = torch.nonzero(batch.markers.any(dim=0).any(dim=0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# -- the demo: a model that learned the marker, and one trained where it meant nothing ------------


N_DEMO = 150  # 50 per class: enough for the consistency counts, quick on two CPU cores


@pytest.fixture(scope="module")
def shortcut_xrays() -> data.DemoBatch:
    return data.make_xrays(N_DEMO, seed=2026, shortcut=True)  # the marker goes with disease


@pytest.fixture(scope="module")
def unmarked_xrays() -> data.DemoBatch:
    return data.make_xrays(N_DEMO, seed=2026, shortcut=True, marker="none")  # same patients


@functools.cache
def demo_model(name: str) -> nn.Module:
    return load_model(name)  # the audit restores the model's state: one copy serves every test


def marker_effect(name: str, marked: data.DemoBatch, unmarked: data.DemoBatch) -> float:
    """How much the marker raises the labelled class's logit in sick patients who carry it."""
    model = demo_model(name)
    with torch.no_grad():
        change = model(data.preprocess(marked.images)) - model(data.preprocess(unmarked.images))
    sick = marked.markers.flatten(1).any(dim=1) & (marked.labels > 0)
    return float(change[sick].gather(1, marked.labels[sick, None]).mean())


def audit_demo(name: str, batch: data.DemoBatch, with_masks: bool) -> AuditResult:
    x = data.preprocess(batch.images)
    source = (x, batch.labels, batch.masks) if with_masks else (x, batch.labels)
    return xai_core.audit(demo_model(name), source, class_names=data.XRAY_CLASSES)


@pytest.mark.parametrize("with_masks", [False, True], ids=["no-masks", "lesion-masks"])
def test_the_marker_is_flagged_for_the_shortcut_model(
    shortcut_xrays, unmarked_xrays, with_masks
) -> None:
    batch = shortcut_xrays
    assert marker_effect("cnn_shortcut", batch, unmarked_xrays) > 1.0  # it uses the marker
    result = audit_demo("cnn_shortcut", batch, with_masks)
    marker = marker_box(batch)
    assert result.flags, result.summary()
    for flag in result.flags:
        assert flag.class_name in ("nodule", "opacity")  # the classes the marker went with
        assert overlaps(flag.box, marker), (flag.box, marker)
        assert flag.box[2] <= 32 and flag.box[3] <= 32  # in the top-left quarter of 64 x 64
        assert flag.images >= 0.9 * flag.class_images  # nearly every sick image: consistent
        assert flag.reference == ("masks" if with_masks else "uniform")


@pytest.mark.parametrize("with_masks", [False, True], ids=["no-masks", "lesion-masks"])
def test_nothing_is_flagged_for_the_model_trained_on_clean_data(
    shortcut_xrays, unmarked_xrays, with_masks
) -> None:
    """The demo's clean CNN was trained with the marker on a random half of the patients, so it
    learned to ignore it: on the same marked images, the audit must find nothing."""
    batch = shortcut_xrays
    assert abs(marker_effect("cnn", batch, unmarked_xrays)) < 0.5  # it ignores the marker
    result = audit_demo("cnn", batch, with_masks)
    assert result.flags == [], result.summary()
    assert result.counts == [N_DEMO // 3] * 3


# -- boxes in pixel coordinates, wherever and however large the shortcut is ----------------------


@pytest.mark.parametrize(
    "box",
    [(0, 0, 6, 6), (14, 12, 20, 18), (28, 0, 32, 32), (4, 26, 28, 30)],
    ids=["corner", "centre", "right-border", "text-band"],
)
def test_flags_are_boxes_in_pixel_coordinates_wherever_the_shortcut_is(box) -> None:
    x, y = box_images(16, box)
    result = xai_core.audit(BoxModel([None, box]), (x, y), method="occlusion", options=OCCLUSION)
    assert len(result.flags) == 1, result.summary()
    (flag,) = result.flags
    area = (box[2] - box[0]) * (box[3] - box[1]) / SIZE**2
    assert (flag.class_index, flag.box, flag.images, flag.class_images) == (1, box, 8, 8)
    assert flag.share == pytest.approx(1.0)
    assert flag.area == pytest.approx(area)
    assert flag.unexplained == pytest.approx(1.0 - area)  # minus the uniform share of the box
    assert flag.other_classes_share == pytest.approx(area, rel=0.2)  # class 0 is spread


def test_no_flags_when_attribution_is_spread_by_construction() -> None:
    x, y = box_images(16, (0, 0, 0, 0))  # noise only
    for reference in ("uniform", "classes"):
        spread = BoxModel([None, None], bias=-0.01)
        result = xai_core.audit(
            spread, (x, y), method="occlusion", options=OCCLUSION, reference=reference
        )
        assert result.flags == [], result.summary()
    # Grad-CAM of a 1x1 convolution: each map is the image itself, here noise, spread evenly.
    conv = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0), conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [2.0]])), head.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    result = xai_core.audit(model, (x, y), method="gradcam", options={"layer": "0"})
    assert result.flags == [], result.summary()
    assert result.share.amax() * SIZE**2 < 2  # nowhere more than twice a uniform share


def test_masks_that_cover_the_region_explain_it() -> None:
    box = (14, 12, 20, 18)
    x, y = box_images(16, box)
    model = BoxModel([None, box])
    on_box = torch.zeros(16, SIZE, SIZE, dtype=torch.bool)
    on_box[y == 1, 12:18, 14:20] = True
    result = xai_core.audit(model, (x, y, on_box), method="occlusion", options=OCCLUSION)
    assert result.flags == [], result.summary()
    assert result.references == ["uniform", "masks"]  # class 0 has no masks: uniform
    elsewhere = on_box.roll(14, dims=2)  # the evidence is said to lie elsewhere
    result = xai_core.audit(model, (x, y, elsewhere), method="occlusion", options=OCCLUSION)
    assert [(f.box, f.reference) for f in result.flags] == [(box, "masks")]
    assert result.flags[0].unexplained == pytest.approx(1.0)


def test_comparing_with_other_classes_discounts_what_every_class_looks_at() -> None:
    box = (0, 0, 6, 6)
    x, y = box_images(16, box)
    both = BoxModel([box, box], bias=-0.01)
    uniform = xai_core.audit(both, (x, y), method="occlusion", options=OCCLUSION)
    assert [(f.class_index, f.box) for f in uniform.flags] == [(0, box), (1, box)]
    assert all(f.other_classes_share == pytest.approx(1.0) for f in uniform.flags)
    classes = xai_core.audit(
        both, (x, y), method="occlusion", options=OCCLUSION, reference="classes"
    )
    assert classes.flags == []


# -- streaming, files, report, command line -----------------------------------------------------


def test_streaming_a_dataloader_equals_one_big_batch() -> None:
    box = (4, 26, 28, 30)
    x, y = box_images(16, box)
    model = BoxModel([None, box])
    whole = xai_core.audit(model, (x, y), method="occlusion", options=OCCLUSION, batch_size=100)
    seen: list[tuple[int, int | None]] = []
    streamed = xai_core.audit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=5),
        method="occlusion",
        options=OCCLUSION,
        progress=lambda done, total, what: what.endswith("images") and seen.append((done, total)),
    )
    assert seen == [(5, 16), (10, 16), (15, 16), (16, 16)]
    assert [f.box for f in streamed.flags] == [f.box for f in whole.flags] == [box]
    for name in ("mean", "std", "share", "unexplained", "mean_image"):
        torch.testing.assert_close(getattr(streamed, name), getattr(whole, name))


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_explained_on_the_models_device(device) -> None:
    box = (14, 12, 20, 18)
    x, y = box_images(16, box)  # on the CPU: the stream moves each batch
    model = BoxModel([None, box]).to(device)
    seen: set[str] = set()
    model.register_forward_pre_hook(lambda module, args: seen.add(args[0].device.type))
    result = xai_core.audit(model, (x, y), method="occlusion", options=OCCLUSION, batch_size=6)
    assert seen == {torch.device(device).type}
    assert [f.box for f in result.flags] == [box]
    assert result.share.device.type == "cpu"  # results come back to the host


def test_the_command_line_audits_a_folder_and_writes_a_report(tmp_path) -> None:
    box = (14, 12, 20, 18)
    x, _ = box_images(16, box)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(x[:, 0]):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"cxr_{i:02d}.png")
    model = tmp_path / "box.pt"
    scripted = torch.jit.trace(BoxModel([None, box], bias=-0.1), x[:1])
    torch.jit.save(scripted, str(model))
    out = tmp_path / "audit"
    args = ["audit", str(model), str(folder), "-m", "occlusion", "--out", str(out)]
    args += ["-O", "window=2", "-O", "stride=2", "-O", "chunk_size=1024", "--fail-on-flags"]
    ran = CliRunner().invoke(build_app(), args, catch_exceptions=False)
    assert ran.exit_code == 1, ran.output  # flagged, and asked to fail on flags
    saved = json.loads((out / "audit.json").read_text())
    assert [f["box"] for f in saved["flags"]] == [list(box)]
    assert saved["settings"]["group_by"] == "auto" and saved["images"] == 16
    assert "Flagged regions" in (out / "report.html").read_text()

    # Masks saying the evidence lies in the box explain it: nothing left to flag.
    masks = tmp_path / "masks"
    masks.mkdir()
    outline = np.zeros((SIZE, SIZE), dtype=np.uint8)
    outline[box[1] : box[3], box[0] : box[2]] = 255
    for i in range(1, 16, 2):  # the bright-box images; the others have no mask file
        Image.fromarray(outline).save(masks / f"cxr_{i:02d}.png")
    ran = CliRunner().invoke(build_app(), [*args, "--masks", str(masks)], catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    saved = json.loads((out / "audit.json").read_text())
    assert saved["flags"] == [] and saved["classes"][1]["reference"] == "masks"


def test_the_report_shows_the_class_maps_with_the_boxes_drawn() -> None:
    box = (0, 0, 6, 6)
    x, y = box_images(16, box)
    result = xai_core.audit(
        BoxModel([None, box]),
        (x, y),
        method="occlusion",
        options=OCCLUSION,
        class_names=["clear", "<marked>"],
    )
    assert isinstance(result, AuditResult)
    page = audit_report(result).render()
    assert page.count("<img") == 8  # four panels per class
    assert "&lt;marked&gt;" in page and "<marked>" not in page  # names are escaped
    assert str(box) in page
    json.dumps(result.to_dict())  # JSON-ready


def test_draw_boxes_outlines_in_place_and_keeps_the_inside() -> None:
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    out = draw_boxes(image, [(2, 3, 7, 9)], colour=(255, 0, 0))
    outline = np.zeros((10, 10), dtype=bool)
    outline[3, 2:7] = outline[8, 2:7] = outline[3:9, 2] = outline[3:9, 6] = True
    assert (out[..., 0] == 255).tolist() == outline.tolist()
    assert not image.any()  # the input is not modified


def test_mistakes_are_typed_errors() -> None:
    x, y = box_images(8, (0, 0, 6, 6))
    model = BoxModel([None, (0, 0, 6, 6)])
    run = {"method": "occlusion", "options": OCCLUSION}
    with pytest.raises(OptionError, match="one class"):
        xai_core.audit(model, (x, y), group_by="all", **run)
    with pytest.raises(OptionError, match="Did you mean 'masks'"):
        xai_core.audit(model, (x, y), reference="mask", **run)
    with pytest.raises(OptionError, match="needs masks"):
        xai_core.audit(model, (x, y), reference="masks", **run)
    with pytest.raises(OptionError, match="min_share"):
        xai_core.audit(model, (x, y), min_share=0, **run)
    with pytest.raises(InputError, match="labels"):
        xai_core.audit(model, (x, y[:3]), **run)
    with pytest.raises(InputError, match="2D images"):
        xai_core.audit(model, x[:, :, None], **run)
    with pytest.raises(OptionError, match="class names"):
        xai_core.audit(model, (x, y), class_names=["one"], **run)
    few = xai_core.audit(model, (x, y), min_images=5, **run)
    assert set(few.skipped_classes) == {"0", "1"} and few.flags == []
