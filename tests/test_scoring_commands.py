"""`python -m model evaluate` and `predict` with the bundled checkpoint on small sets written to disk: what
evaluate skips is reported (or refused with --strict), a 7-class model scores malignant-vs-benign folders, and
predict says per image whether it is unusual and above the sensitive threshold."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "checkpoints" / "default"


@pytest.fixture(scope="module", autouse=True)
def bundled_checkpoint():
    if checkpoint.latest_step(DEFAULT / "best") is None and checkpoint.latest_step(DEFAULT) is None:
        pytest.skip("checkpoints/default is not bundled in this checkout")


def run_model(command, *args):
    return subprocess.run([sys.executable, "-m", "model", command, "--checkpoint", str(DEFAULT), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def evaluate(*args):
    return run_model("evaluate", "--bootstrap", "20", *args)


@pytest.fixture
def flawed_csv(tmp_path, write_image):
    """Eight readable lesions plus one row of each flaw a downloaded label file has."""
    rows = ["path,dx"]
    for i, dx in enumerate(["mel", "nv", "bkl", "bcc", "mel", "nv", "akiec", "nv"]):
        write_image(tmp_path / "images" / f"ok_{i}.jpg", dx, seed=i)
        rows.append(f"images/ok_{i}.jpg,{dx}")
    write_image(tmp_path / "images" / "foo_lesion.jpg", "nv", seed=20)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    write_image(tmp_path / "images" / "invasive.jpg", "akiec", seed=21)
    rows += ["images/foo_lesion.jpg,foo", "images/gone.jpg,mel", "images/broken.jpg,nv", "images/invasive.jpg,scc"]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def test_evaluate_reports_every_skipped_row_and_scores_the_rest(flawed_csv, tmp_path):
    out = tmp_path / "eval"
    done = evaluate("--csv", flawed_csv, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert result["n"] == 9   # the eight, and the scc lesion counted as akiec
    skipped = "\n".join(result["skipped"])
    for named in ("foo (1)", "foo_lesion.jpg", "gone.jpg", "broken.jpg", "could not be read", "scc", "akiec"):
        assert named in skipped, named
        assert named in done.stdout, named
    report = (out / "report.md").read_text()
    assert "## Skipped or changed while reading" in report and "gone.jpg" in report
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + 9
    assert "balanced accuracy" in done.stdout and ".0000000" not in done.stdout   # 3 decimals, not raw JSON


def test_evaluate_strict_stops_and_names_what_it_would_skip(flawed_csv, tmp_path):
    done = evaluate("--csv", flawed_csv, "--out", tmp_path / "eval", "--strict")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for named in ("--strict", "foo", "gone.jpg", "scc"):
        assert named in done.stderr, named
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_seven_class_model_scores_cancer_folders_by_malignancy(tmp_path, write_image):
    for i in range(6):
        write_image(tmp_path / "set" / "Cancer" / f"c{i}.jpg", "mel", seed=i)
        write_image(tmp_path / "set" / "Non_Cancer" / f"n{i}.jpg", "nv", seed=10 + i)
    out = tmp_path / "eval"
    done = evaluate("--csv", tmp_path / "set", "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert result["n"] == 12 and "malignant probability" in result["scored_by"]
    assert 0.0 <= result["malignant_auc"] <= 1.0
    point = result["operating_point"]
    assert point["threshold"] > 0 and {"malignant_sensitivity", "malignant_specificity"} <= set(point)
    assert "at the sensitive threshold" in done.stdout and "malignant AUC" in done.stdout
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "path,label,prediction,malignant_probability,benign,malignant"


def test_predict_writes_the_gate_and_threshold_per_image_and_a_summary(tmp_path, write_image):
    from PIL import Image, ImageDraw
    for i, dx in enumerate(["mel", "nv", "bkl"]):
        write_image(tmp_path / "in" / f"lesion_{i}.jpg", dx, seed=i, size=(320, 240))
    page = Image.new("RGB", (400, 300), "white")
    for row in range(12):
        ImageDraw.Draw(page).text((10, 10 + 22 * row), "Minutes of the meeting, item %d: budget" % row, fill="black")
    page.save(tmp_path / "in" / "textpage.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    done = run_model("predict", "--out", out, tmp_path / "in")
    assert done.returncode == 0, done.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {"unusual", "unusual_because", "above_sensitive_threshold", "error"} <= set(rows[0])
    read = [r for r in rows if not r["error"]]
    assert len(read) == 4 and len(rows) == 5
    threshold = checkpoint.read_metadata(DEFAULT)["operating_point"]["threshold"]
    for r in read:
        assert r["unusual"] in ("true", "false")
        assert (r["unusual"] == "true") == bool(r["unusual_because"])
        assert r["above_sensitive_threshold"] == str(float(r["malignant_probability"]) >= threshold).lower()
    unusual = sum(r["unusual"] == "true" for r in read)
    flagged = sum(r["unusual"] == "false" and r["above_sensitive_threshold"] == "true" for r in read)
    assert "4 images predicted" in done.stdout
    assert f"unusual (unlike the lesions the model knows; their probabilities mean little): {unusual}" in done.stdout
    assert f"and not unusual: {flagged}" in done.stdout and "could not be read: 1" in done.stdout
