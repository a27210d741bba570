"""Leave-one-source-out on three tiny sources written to disk: every fold, the table, resume after a kill."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import checkpoint
from model.config import make_config
from model.errors import UserError
from model.loso import fold_config, markdown, table
from test_train import _write_challenge_source

REPO = Path(__file__).resolve().parents[1]


def _write_three_class_source(root: Path, write_image) -> Path:
    """An ISIC 2017-like labelled CSV (path, split, dx) with only nv, mel and bkl, in train/val/test."""
    rows = []
    for c, dx in enumerate(("nv", "mel", "bkl")):
        for k, split in enumerate(("train", "train", "train", "val", "test")):
            name = f"images/{dx}_{k}.jpg"
            write_image(root / name, dx, 7000 + 10 * c + k)
            rows.append([name, split, dx])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "dx"], *rows])
    return root / "labels.csv"


@pytest.fixture
def three_sources(synthetic_data, tmp_path, write_image) -> list[str]:
    bcn = _write_challenge_source(tmp_path / "bcn", write_image)
    clinic = _write_three_class_source(tmp_path / "clinic", write_image)
    return [f"ham={synthetic_data.ham_dir}", f"bcn={bcn}", f"clinic={clinic}:train,val"]


def loso_cmd(sources, out, *extra):
    data = [arg for spec in sources for arg in ("--data", spec)]
    return [sys.executable, "-m", "model", "loso", "--recipe", "smoke", *data, "--val_frac", "0.34", "--out", str(out),
            *extra]


def test_a_fold_trains_on_the_other_sources_and_is_scored_on_all_of_the_held_out_one(three_sources, tmp_path):
    cfg = make_config("smoke", data=three_sources)
    fold = fold_config(cfg, "clinic", tmp_path)
    assert fold.data == three_sources[:2]
    assert fold.external_eval == [three_sources[2].rsplit(":", 1)[0]]   # its train, val and test images
    assert Path(fold.workdir) == tmp_path / "clinic" and not fold.resume
    with pytest.raises(UserError, match="at least two --data sources"):
        table(make_config("smoke", data=three_sources[:1]), tmp_path)


def test_the_proxy_sets_its_sizes_under_the_flags_given(three_sources, tmp_path):
    from model.__main__ import main
    data = [arg for spec in three_sources for arg in ("--data", spec)]
    assert main(["loso", "--recipe", "smoke", *data, "--proxy", "--epochs", "5", "--table_only",
                 "--out", str(tmp_path)]) == 0
    recipe = json.loads((tmp_path / "loso.json").read_text())["recipe"]
    assert (recipe["image_size"], recipe["train_fraction"], recipe["epochs"]) == (96, 0.3, 5)


@pytest.mark.slow
def test_loso_runs_every_fold_resumes_after_a_kill_and_writes_one_table(three_sources, tmp_path):
    out = tmp_path / "loso"
    cmd = loso_cmd(three_sources, out, "--epochs", "6")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while checkpoint.latest_step(out / "bcn" / "latest") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "ham" / "results.json").exists() and not (out / "bcn" / "results.json").exists()

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "fold 1/3: ham held out: done already" in resumed.stdout
    assert "fold 2/3: bcn held out: resuming" in resumed.stdout
    assert "Resuming after epoch" in resumed.stdout
    result = json.loads((out / "loso.json").read_text())
    assert (result["finished"], result["of"]) == (3, 3)
    folds = result["folds"]
    assert folds["ham"]["trained_on"] == ["bcn", "clinic"]
    assert folds["ham"]["n"] == 28 and folds["bcn"]["n"] == 28
    assert folds["clinic"]["n"] == 15                                 # train, val and test rows together
    assert set(folds["clinic"]["absent_classes"]) == {"akiec", "bcc", "df", "vasc"}
    assert set(folds["clinic"]["recall"]) == {"nv", "mel", "bkl"}     # absent classes are not scored as zero
    assert set(folds["clinic"]["in_source_val"]) == {"ham", "bcn"}
    mean = sum(f["balanced_accuracy"] for f in folds.values()) / 3
    assert result["mean"]["balanced_accuracy"] == pytest.approx(mean)
    md = (out / "loso.md").read_text()
    assert "3 of 3 folds finished" in md and "| clinic | 15 |" in md and "absent" in md


@pytest.mark.slow
def test_one_fold_per_process_then_the_table_joins_them(three_sources, tmp_path):
    out = tmp_path / "loso"
    one = subprocess.run(loso_cmd(three_sources, out, "--fold", "clinic"), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    result = json.loads((out / "loso.json").read_text())
    assert result["finished"] == 1 and result["folds"]["ham"] is None and result["folds"]["clinic"]["n"] == 15
    assert "| ham | not finished |" in markdown(result)

    # The fold's own checkpoint as a reference: scored only where it never trained.
    from model.__main__ import main
    data = [arg for spec in three_sources for arg in ("--data", spec)]
    assert main(["loso", "--recipe", "smoke", *data, "--val_frac", "0.34", "--out", str(out), "--table_only",
                 "--reference", str(out / "clinic")]) == 0
    rows = json.loads((out / "loso.json").read_text())["references"][0]["rows"]
    assert rows["ham"] == rows["bcn"] == "trained on it"
    assert rows["clinic"]["n"] == 15 and set(rows["clinic"]["recall"]) == {"nv", "mel", "bkl"}
    assert "| ham | trained on it |" in (out / "loso.md").read_text()
    with pytest.raises(UserError, match=r"clinic holds a fold trained with other settings \(epochs: 2 there, 3 now"):
        table(make_config("smoke", data=three_sources, val_frac=0.34, epochs=3), out)
    bad = subprocess.run(loso_cmd(three_sources, out, "--fold", "paris"), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "--fold paris: not a source of this recipe" in bad.stderr
