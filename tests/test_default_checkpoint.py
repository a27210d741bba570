"""The bundled model: present, small, self-describing, and warns about non-dermoscopy images."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import checkpoint
from model.predictor import Predictor

pytestmark = pytest.mark.slow   # launches apps, trains or loads real models: `make test`, not `make test-fast`

DEFAULT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def predictor():
    if checkpoint.latest_step(DEFAULT / "best") is None and checkpoint.latest_step(DEFAULT) is None:
        pytest.skip("checkpoints/default is not bundled in this checkout")
    return Predictor.load(DEFAULT)


def test_bundled_checkpoint_is_small_and_describes_itself(predictor):
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size < 30 * 2 ** 20
    meta = predictor.metadata
    assert meta["arch"] == "efficientnet_lite0" and len(meta["classes"]) == 7
    val = meta["metrics"]["val"]
    assert 0 < val["balanced_accuracy"] <= 1 and len(val["balanced_accuracy_ci"]) == 2
    assert 0 < meta["temperature"] < 10 and np.isfinite(meta["ood"]["threshold"])
    assert meta["licence"].lower().count("non-commercial")
    # How it transfers to another source travels with it (and shows on the app's model card).
    isic_test = meta["metrics"]["external"]["../shared/data/isic2017/labels.csv:test"]
    assert isic_test["n"] == 600 and 0.5 < isic_test["malignant_auc"] <= 1
    # The sensitive threshold: 90% of malignant validation lesions at or above it, reported elsewhere too.
    assert val["operating_point"]["malignant_sensitivity"] >= 0.9
    assert isic_test["operating_point"]["threshold"] == meta["operating_point"]["threshold"] == predictor.operating_threshold
    assert set(val["subgroups"]) == {"sex", "age_band", "body_site"}


def test_model_card_shows_subgroups_and_other_sources(predictor):
    from app.model_card import model_card_markdown
    card = model_card_markdown(predictor)
    for heading in ("### Validation metrics", "### Subgroups (validation)", "### Other sources", "### Licence"):
        assert heading in card
    assert "| body site | face |" in card and "isic2017/labels.csv:test | 600 |" in card
    assert "**Sensitive threshold**" in card


def synthetic_non_lesions(size=224):
    """Things people drop by mistake: flat colour, noise, stripes, a document-like page, a blue sky."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    page = np.full((size, size, 3), 245, np.uint8)
    page[::12, 20:-20] = 30  # lines of "text"
    sky = np.stack([90 + yy * 0.3, 150 + yy * 0.2, 235 + 0 * yy], -1).astype(np.uint8)
    return [np.full((size, size, 3), (40, 200, 60), np.uint8),
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            (((xx // 16 + yy // 16) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1),
            page, sky]


def photographs_not_lesions() -> list[Path]:
    """Real pictures people could drop by mistake, shipped with the libraries we depend on: a temple,
    a flower, a portrait, a product photo, a logo, and a chart (the bundled model's learning curves)."""
    import matplotlib
    import sklearn.datasets

    scikit = Path(sklearn.datasets.__file__).parent / "images"
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    return [scikit / "china.jpg", scikit / "flower.jpg", sample_data / "grace_hopper.jpg",
            sample_data / "Minduka_Present_Blue_Pack.png", sample_data / "logo2.png",
            DEFAULT / "learning_curves.png"]


def test_non_dermoscopy_images_are_flagged_and_lesions_pass(predictor):
    # The gate's boundary learned from other non-lesion pictures (OpenCV's samples), none of these:
    # without it the gate passed one of each set (docs/notebook/experiment-record.md).
    assert predictor.metadata["ood"]["non_lesion"]["non_lesions"] >= 10   # calibrate's minimum
    synthetic = predictor.analyse([Image.fromarray(a) for a in synthetic_non_lesions()])
    assert synthetic["unusual"].all(), synthetic["unusual"]
    photos = predictor.analyse([Image.open(p).convert("RGB") for p in photographs_not_lesions()])
    assert photos["unusual"].all(), photos["unusual"]
    # Each flag names the checks that raised it (the app's warning says them in words).
    because = synthetic["unusual_because"] + photos["unusual_because"]
    assert all(because) and {name for names in because for name in names} <= {
        "far_from_lesions", "unlike_a_lesion", "near_uniform"}
    samples = sorted(p for p in SAMPLES.glob("*.jpg"))
    assert samples, "bundled sample images are missing"
    passed = ~predictor.analyse(samples)["unusual"]
    assert passed.sum() >= len(samples) - 1, passed
