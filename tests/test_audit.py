"""The shortcut audit: each change does what it says to real image files, and the audit of a real (tiny)
checkpoint counts what moved, per class, into audit.json, audit.md and the model card."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from model.audit import CHANGES, _movement, add_frame, remove_frame, thumbnail
from model.card import model_card_markdown
from model.checkpoint import read_metadata
from model.images import field_of_view_box
from model.train import train_and_evaluate
from test_train import smoke_config
from conftest import make_lesion_image


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_data_shared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("audit_run")
    train_and_evaluate(smoke_config(synthetic_data_shared.ham_dir, workdir))
    return workdir


def test_the_thumbnail_round_trip_keeps_the_size_and_loses_the_detail():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    small = thumbnail(img)
    assert small.size == img.size
    detail = lambda a: np.abs(np.diff(np.asarray(a, float), axis=1)).mean()   # noqa: E731
    assert detail(small) < 0.5 * detail(img)


def test_a_frame_is_added_found_by_the_field_of_view_crop_and_removed_again():
    img = make_lesion_image("mel", 3, size=(200, 150))
    assert field_of_view_box(img) is None and remove_frame(img) is None      # nothing to remove
    framed = add_frame(img)
    a = np.asarray(framed)
    assert a[0, 0].max() == 0 and a[-1, -1].max() == 0                         # dark corners
    assert (a[75, 100] == np.asarray(img)[75, 100]).all()                     # the lesion untouched
    assert field_of_view_box(framed) is not None                              # a real frame to the predictor
    unframed = remove_frame(framed)
    corners = np.asarray(unframed)[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min() > 40 and unframed.size[0] == unframed.size[1] < 150


def test_colour_temperature_moves_red_against_blue():
    img = Image.new("RGB", (40, 40), (100, 100, 100))
    warm, cool = (np.asarray(CHANGES[k](img))[0, 0] for k in ("warmer", "cooler"))
    assert tuple(warm) == (110, 100, 90) and tuple(cool) == (90, 100, 110)


def test_movement_counts_flips_and_the_signed_malignant_change_per_true_class():
    base = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    moved = np.array([[0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 1, 0])
    m = _movement(base, moved, np.array([1]), labels, np.array([True, True, False]), ["nv", "mel"])
    assert m["all"] == {"n": 2, "flip_share": 0.5, "malignant_change": pytest.approx(0.2)}
    assert m["per_class"]["nv"] == {"n": 1, "flip_share": 1.0, "malignant_change": pytest.approx(0.4)}
    assert m["per_class"]["mel"]["flip_share"] == 0.0


@pytest.mark.slow
def test_audit_command_on_a_real_checkpoint_writes_tables_and_the_card(tiny_checkpoint, tmp_path, write_image):
    rows = []
    for k, dx in enumerate(["nv", "nv", "mel", "bkl"]):
        path = write_image(tmp_path / "set" / f"{dx}{k}.jpg", dx, 900 + k, size=(120, 90))
        if k == 0:   # one image with a dermatoscope's frame
            add_frame(Image.open(path).convert("RGB")).save(path)
        rows.append([path.name, dx])
    with open(tmp_path / "set" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "dx"], *rows])

    from model.__main__ import main
    assert main(["audit", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--record",
                 f"clinic={tmp_path / 'set' / 'labels.csv'}"]) == 0
    result = json.loads((tmp_path / "out" / "audit.json").read_text())
    clinic = result["sets"]["clinic"]
    assert clinic["n"] == 4 and set(clinic["changes"]) == set(CHANGES)
    assert clinic["changes"]["frame_removed"]["all"]["n"] == 1                # only the framed image
    assert clinic["changes"]["thumbnail_84px"]["all"]["n"] == 4
    assert {c: m["n"] for c, m in clinic["changes"]["jpeg_q30"]["per_class"].items()} == {"mel": 1, "bkl": 1, "nv": 2}
    for change in clinic["changes"].values():
        assert 0.0 <= change["all"]["flip_share"] <= 1.0
    md = (tmp_path / "out" / "audit.md").read_text()
    assert "| frame_removed | 1 |" in md
    card = model_card_markdown({**read_metadata(tiny_checkpoint), "checkpoint_path": str(tiny_checkpoint)})
    assert "### Shortcut audit" in card and "#### Shortcut audit: clinic (4 images" in card
