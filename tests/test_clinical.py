"""Clinical metadata fusion: encoding with missing values, fitting, and the end-to-end option."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from model import clinical
from model.config import make_config
from model.data import load_dataset
from model.predictor import Predictor
from model.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def person(age=None, sex=None, site=None):
    return SimpleNamespace(age=age, sex=sex, site=site)


def test_encoding_marks_missing_and_unknown_values():
    full = clinical.encode_one(55, "Male", "back")
    assert full[clinical.FEATURES.index("age/100")] == pytest.approx(0.55)
    assert full[clinical.FEATURES.index("sex male")] == 1 and full[clinical.FEATURES.index("site back")] == 1
    assert full[[clinical.FEATURES.index(f) for f in ("age missing", "sex missing", "site missing")]].sum() == 0

    # HAM10000's "unknown", an empty CSV cell, a nonsense age and an unlisted site all count as missing.
    for age, sex, site in [(None, "unknown", "unknown"), ("", "", ""), (-3, "other", "moon"), ("n/a", None, None)]:
        x = clinical.encode_one(age, sex, site)
        assert x[clinical.FEATURES.index("age/100")] == 0
        for flag in ("age missing", "sex missing", "site missing"):
            assert x[clinical.FEATURES.index(flag)] == 1, (age, sex, site, flag)
    assert clinical.encode([]).shape == (0, len(clinical.FEATURES))


def test_fit_learns_what_the_image_cannot_see():
    # Image logits carry no information; the class is the person's sex. Fusion must find it.
    rng = np.random.default_rng(0)
    sexes = rng.choice(["female", "male"], 400)
    labels = (sexes == "male").astype(np.int32)
    features = clinical.encode([person(40, s, "back") for s in sexes])
    logits = rng.normal(0, 0.1, (400, 2)).astype(np.float32)
    fusion = clinical.fit_fusion(logits, features, labels, np.ones(2, np.float32))
    fused = clinical.fuse(logits, features, fusion)
    assert (fused.argmax(1) == labels).mean() > 0.95
    assert (logits.argmax(1) == labels).mean() < 0.65
    # Stored as plain JSON numbers in checkpoint metadata.
    assert json.loads(json.dumps(fusion))["features"] == list(clinical.FEATURES)


def test_no_fusion_is_the_identity_and_foreign_fusions_are_refused():
    logits = np.ones((3, 7), np.float32)
    assert clinical.fuse(logits, clinical.encode([person()] * 3), None) is logits
    foreign = {"features": ["bmi"], "weights": [[0.0] * 7], "bias": [0.0] * 7}
    with pytest.raises(ValueError, match="refit"):
        clinical.fuse(logits, np.zeros((3, 1), np.float32), foreign)


@pytest.mark.slow
def test_training_with_clinical_fusion_stores_and_uses_it(synthetic_data, tmp_path):
    cfg = make_config("smoke", data=str(synthetic_data.ham_dir), workdir=str(tmp_path / "run"), val_frac=0.34,
                      clinical_fusion=True)
    result = train_and_evaluate(cfg)
    assert set(result["image_only_val"]) == {"balanced_accuracy", "macro_auc", "malignant_auc"}
    predictor = Predictor.load(tmp_path / "run")
    assert predictor.uses_clinical
    assert predictor.metadata["clinical_fusion"]["features"] == list(clinical.FEATURES)

    records = load_dataset(str(synthetic_data.ham_dir)).records[:4]
    images = predictor.prepare([r.path for r in records])
    logits = predictor.logits_from_arrays(images)
    known = predictor.decision_logits(logits, records)
    unknown = predictor.decision_logits(logits)  # nothing known: the "missing" shift, not the image alone
    assert not np.allclose(known, logits) and not np.allclose(unknown, known)
    np.testing.assert_allclose(predictor.predict(images, people=records), predictor.probabilities(known), atol=1e-5)


@pytest.mark.slow
def test_fuse_command_reports_with_and_without(synthetic_data, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(make_config("smoke", data=str(synthetic_data.ham_dir), workdir=str(workdir), val_frac=0.34))
    assert not Predictor.load(workdir).uses_clinical
    done = subprocess.run([sys.executable, "-m", "model", "fuse", "--checkpoint", str(workdir / "best"),
                           "--csv", str(workdir / "split.csv")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert set(report) == {"image_only", "with_clinical"}
    assert Predictor.load(workdir).uses_clinical
