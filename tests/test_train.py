"""Training end to end on real (tiny) image files: checkpoints, resume after a kill, data parallelism."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx
from PIL import Image

from model import checkpoint, report
from model.augment import AugmentConfig
from model.config import make_config
from model.errors import UserError
from model.networks import build
from model.predictor import Predictor
from model.preprocess import Normalisation
from model.train import train_and_evaluate
from model.train_step import make_ema_update, make_optimizer, make_train_step, mix_batch

REPO = Path(__file__).resolve().parents[1]


def smoke_config(data_dir, workdir, **overrides):
    # val_frac 0.34 holds out one of the three lesions of each synthetic class.
    return make_config("smoke", data=str(data_dir), workdir=str(workdir), val_frac=0.34, **overrides)


@pytest.fixture(scope="module")
def trained_run(synthetic_data_shared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(smoke_config(synthetic_data_shared.ham_dir, workdir))
    return workdir, result


@pytest.mark.slow
def test_run_writes_logs_plot_split_and_checkpoints(trained_run):
    workdir, result = trained_run
    for name in ("config.json", "split.csv", "log.jsonl", "learning_curves.png", "results.json"):
        assert (workdir / name).is_file(), name
    rows = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and r["train_img_per_s"] > 0 for r in rows)
    assert checkpoint.latest_step(workdir / "latest") == 2
    assert result["temperature"] > 0 and 0 <= result["ece_after"] <= 1


@pytest.mark.slow
def test_checkpoint_is_self_describing(trained_run):
    workdir, _ = trained_run
    meta = checkpoint.read_metadata(workdir)
    assert meta["arch"] == "simple_cnn" and meta["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert meta["image_size"] == 32 and meta["normalisation"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["training"]["data"]["split_file"].endswith("split.csv")
    assert "balanced_accuracy" in meta["metrics"]["val"] and meta["temperature"] > 0
    assert {"jax", "flax", "optax", "orbax-checkpoint"} <= set(meta["versions"])
    # The unusual-image gate keeps half the validation lesions as its reference and sets its threshold on
    # the other half; the features decode back to unit rows.
    gate = meta["ood"]
    reference = checkpoint.unpack_array(gate["reference"])
    assert reference.shape[0] == meta["metrics"]["val"]["n"] // 2
    assert np.allclose(np.linalg.norm(reference, axis=1), 1, atol=1e-2) and gate["threshold"] > 0
    assert 0 < gate["validation_pass_rate"] <= 1
    # The high-sensitivity operating point is fitted on validation and reported at its own threshold.
    point = meta["metrics"]["val"]["operating_point"]
    assert point["threshold"] == meta["operating_point"]["threshold"] and point["malignant_sensitivity"] >= 0.9


@pytest.mark.slow
def test_a_damaged_gate_reference_is_refused_at_load_with_what_to_do(trained_run, tmp_path):
    workdir, _ = trained_run
    copy = shutil.copytree(workdir / "best", tmp_path / "best")
    meta = checkpoint.read_metadata(copy)
    meta["ood"]["reference"]["float16_base64"] = meta["ood"]["reference"]["float16_base64"][:-8]  # cut short
    checkpoint.update_metadata(copy, meta)
    with pytest.raises(UserError, match="damaged.*python -m model calibrate"):
        Predictor.load(copy)


def _not_lesions(folder: Path, n: int, seed: int) -> Path:
    """Pictures no dermatoscope takes, written as PNGs: flat colours, stripes, checkerboards, colour noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        kind = i % 4
        if kind == 0:
            a = np.broadcast_to(colour, (64, 64, 3))
        elif kind == 1:
            a = np.where((((xx + yy) // rng.integers(3, 9)) % 2)[..., None] == 1, colour, 255 - colour)
        elif kind == 2:
            a = np.where(((xx // 8 + yy // 8) % 2)[..., None] == 1, colour, 0)
        else:
            a = rng.integers(0, 256, (64, 64, 3))
        Image.fromarray(np.ascontiguousarray(a, np.uint8)).save(folder / f"picture_{seed}_{i}.png")
    return folder


@pytest.mark.slow
def test_calibrate_learns_a_non_lesion_boundary_from_pictures_on_disk(trained_run, tmp_path):
    from model.evaluate import labelled_split
    workdir, _ = trained_run
    ckpt = shutil.copytree(workdir / "best", tmp_path / "best")
    pictures = _not_lesions(tmp_path / "not_lesions", 12, seed=0)
    (pictures / "broken.png").write_bytes(b"not a png")
    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val",
                   "--non_lesions", pictures)
    assert done.returncode == 0, done.stderr
    assert "non-lesion pictures: 12 read, 1 left out, e.g. " in done.stdout and "broken.png" in done.stdout
    gate = checkpoint.read_metadata(ckpt)["ood"]
    boundary = gate["non_lesion"]
    assert boundary["non_lesions"] == 12
    assert checkpoint.unpack_array(boundary["weights"]).shape == (checkpoint.unpack_array(gate["reference"]).shape[1],)

    # What it learned points the right way even for this 2-epoch toy network (tests/test_metrics.py checks
    # the boundary on features with a known answer): its pictures score above the validation lesions, and
    # every prediction is gated by it.
    p = Predictor.load(ckpt)
    _, lesions = p.forward_arrays(labelled_split(p, workdir / "split.csv", "val").images)
    _, fitted = p.forward_arrays(p.prepare(sorted(pictures.glob("picture_*.png"))))
    assert p.non_lesion_score(fitted).mean() > p.non_lesion_score(lesions).mean()
    assert np.median(p.non_lesion_score(lesions)) < boundary["threshold"]
    p.metadata["ood"]["non_lesion"]["threshold"] = -np.inf   # now every picture is on the non-lesion side
    assert p.analyse(sorted(pictures.glob("picture_*.png"))[:2])["unusual"].all()
    assert "learned from 12 known non-lesion pictures" in run_cli("info", "--checkpoint", ckpt).stdout

    # Recalibrating without the pictures removes the boundary, and says so.
    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val")
    assert done.returncode == 0 and "refitted only with `calibrate --non_lesions`" in done.stdout
    assert "non_lesion" not in checkpoint.read_metadata(ckpt)["ood"]


@pytest.mark.slow
def test_a_damaged_non_lesion_boundary_or_too_few_pictures_is_refused_with_what_to_do(trained_run, tmp_path):
    workdir, _ = trained_run
    ckpt = shutil.copytree(workdir / "best", tmp_path / "best")
    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val",
                   "--non_lesions", _not_lesions(tmp_path / "few", 3, seed=0))
    assert done.returncode != 0 and "3 readable pictures; a boundary needs at least 10" in done.stderr
    meta = checkpoint.read_metadata(ckpt)
    assert "non_lesion" not in meta["ood"]   # nothing was written
    meta["ood"]["non_lesion"] = {"weights": checkpoint.pack_array(np.ones(3)), "bias": 0.0, "threshold": 1.0,
                                 "non_lesions": 12}   # a boundary for other features
    checkpoint.update_metadata(ckpt, meta)
    with pytest.raises(UserError, match="non-lesion boundary .* is damaged.*--non_lesions"):
        Predictor.load(ckpt)


@pytest.mark.slow
def test_test_resolution_bench_scores_a_checkpoint_at_other_sizes(trained_run):
    workdir, _ = trained_run
    done = subprocess.run([sys.executable, "bench/experiments/test_resolution.py", "--checkpoint", str(workdir / "best"),
                           "--sizes", "32", "48", "--eval", f"{workdir / 'split.csv'}:val"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["size"] for r in rows] == [32, 48]
    at_training_size, larger = (r[f"{workdir / 'split.csv'}:val"] for r in rows)
    # At the training size it reproduces the validation the checkpoint was selected on.
    val = checkpoint.read_metadata(workdir)["metrics"]["val"]
    assert at_training_size["balanced_accuracy"] == pytest.approx(val["balanced_accuracy"], abs=1e-4)
    assert larger["ece"] != at_training_size["ece"]  # the larger input really went through the model


@pytest.mark.slow
def test_predictor_rebuilds_model_from_metadata_alone(trained_run, synthetic_data_shared):
    workdir, _ = trained_run
    predictor = Predictor.load(workdir / "best")
    images = sorted(synthetic_data_shared.ham_images.iterdir())[:3]
    probs = predictor.predict(images)
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert predictor.checkpoint_id.startswith(workdir.name)
    analysis = predictor.analyse(images)
    assert analysis["unusual"].shape == (3,) and np.all(analysis["entropy"] <= 1 + 1e-6)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "model", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow
def test_evaluate_and_predict_commands(trained_run, synthetic_data_shared, tmp_path):
    workdir, _ = trained_run
    labels = tmp_path / "labels.csv"
    rows = ["path,dx"]
    meta = (synthetic_data_shared.ham_csv).read_text().splitlines()[1:]
    for line in meta:
        _, image_id, dx, *_ = line.split(",")
        match = next(synthetic_data_shared.ham_images.glob(f"{image_id}.*"))
        rows.append(f"{os.path.relpath(match, tmp_path)},{dx}")
    rows = rows[:10]  # only akiec/bcc/bkl: the other classes must be reported absent, not fail
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    done = run_cli("evaluate", "--checkpoint", workdir, "--csv", labels, "--out", out, "--bootstrap", "50")
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "recall", "malignant_auc", "ece", "n"):
        assert key in result
    assert result["n"] == 9 and set(result["absent_classes"]) == {"df", "mel", "nv", "vasc"}
    for png in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    with open(out / "predictions.csv") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == 9 and {r["label"] for r in per_image} <= {"akiec", "bcc", "bkl"}
    probs = np.array([[float(r[c]) for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")] for r in per_image])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    predicted = np.array(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])[probs.argmax(axis=1)]
    assert list(predicted) == [r["prediction"] for r in per_image]
    assert np.mean(predicted == [r["label"] for r in per_image]) == pytest.approx(result["accuracy"], abs=1e-6)
    from model.evaluate import read_predictions  # the reader the bench scripts use gives the same table back
    paths, read_probs, classes, read_labels = read_predictions(out / "predictions.csv")
    assert classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] and paths == [r["path"] for r in per_image]
    np.testing.assert_array_equal(read_probs, probs)
    assert [classes[i] for i in read_labels] == [r["label"] for r in per_image]

    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    preds = tmp_path / "preds.csv"
    done = run_cli("predict", "--checkpoint", workdir, "--out", preds, synthetic_data_shared.ham_images, bad)
    assert done.returncode == 0, done.stderr
    lines = preds.read_text().splitlines()
    assert len(lines) == 1 + 28 + 1
    assert "not a readable image" in lines[-1] and lines[1].split(",")[-1] == ""


@pytest.mark.parametrize("args, expected", [
    (("evaluate", "--checkpoint", "no/such/dir", "--csv", "x.csv", "--out", "o"), "checkpoint folder not found"),
    (("predict", "--checkpoint", "no/such/dir", "--out", "p.csv", "x.jpg"), "checkpoint folder not found"),
])
@pytest.mark.slow
def test_bad_input_gives_one_clear_message(args, expected):
    done = run_cli(*args)
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_partial_checkpoint_is_refused_clearly(trained_run, tmp_path):
    workdir, _ = trained_run
    partial = tmp_path / "partial"
    (partial / "3").mkdir(parents=True)
    done = run_cli("info", "--checkpoint", partial)
    assert done.returncode == 2 and "partial" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(synthetic_data_shared, tmp_path):
    """SIGKILL a real `python train.py` after its first epoch checkpoint, then --resume it."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--recipe", "smoke", "--data", str(synthetic_data_shared.ham_dir),
           "--workdir", str(workdir), "--val_frac", "0.34", "--epochs", "6", "--no-pretrained", "--prior_tau", "0.5"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while checkpoint.latest_step(workdir / "latest") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_epochs = checkpoint.latest_step(workdir / "latest")
    assert done_epochs is not None and done_epochs < 6, "the run should be killed mid-way"

    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming after epoch {done_epochs}" in resumed.stdout
    epochs = [json.loads(line)["epoch"] for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert checkpoint.latest_step(workdir / "latest") == 6
    assert checkpoint.read_metadata(workdir)["prior_correction"]["tau"] == 0.5  # the run's settings, calibrated in


@pytest.mark.slow
def test_calibrate_command_refits_and_records_other_sources(trained_run, synthetic_data_shared, tmp_path):
    workdir, _ = trained_run
    ckpt = tmp_path / "best"
    shutil.copytree(workdir / "best", ckpt)
    before = checkpoint.read_metadata(ckpt)
    labels = tmp_path / "other.csv"
    images = sorted(synthetic_data_shared.ham_images.glob("*.jpg"))[:8]
    labels.write_text("path,dx\n" + "".join(f"{p},{dx}\n" for p, dx in zip(images, ["mel", "nv"] * 4)))
    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val",
                   "--external_eval", labels)
    assert done.returncode == 0, done.stderr
    after = checkpoint.read_metadata(ckpt)
    assert after["temperature"] == pytest.approx(before["temperature"])  # same validation, same fit
    other = after["metrics"]["external"][str(labels)]
    assert other["n"] == 8 and other["operating_point"]["threshold"] == after["operating_point"]["threshold"]
    assert json.loads(done.stdout)["external"][str(labels)]["n"] == 8

    # Several named validation parts form one set; each is a source for the operating point.
    split = workdir / "split.csv"
    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", f"first={split}:val", "--csv", f"second={split}:val")
    assert done.returncode == 0, done.stderr
    point = json.loads(done.stdout)["operating_point"]
    assert point["rule"] in ("pooled malignant", "per-source melanoma") and "per_source_melanoma_thresholds" in point
    assert checkpoint.read_metadata(ckpt)["metrics"]["val"]["n"] == 2 * before["metrics"]["val"]["n"]


@pytest.mark.slow
def test_prior_correction_is_stored_by_calibrate_and_used_by_every_prediction(trained_run, tmp_path):
    from model.evaluate import labelled_split
    workdir, _ = trained_run
    ckpt = tmp_path / "best"
    shutil.copytree(workdir / "best", ckpt)
    counts = checkpoint.read_metadata(ckpt)["training"]["data"]["train_class_counts"]
    plain = Predictor.load(ckpt)
    val = labelled_split(plain, workdir / "split.csv", "val")
    raw = plain.logits_from_arrays(val.images)

    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val",
                   "--prior_tau", "0.5")
    assert done.returncode == 0, done.stderr
    corrected = Predictor.load(ckpt)
    correction = corrected.metadata["prior_correction"]
    total = sum(counts.values())
    assert correction["tau"] == 0.5
    assert correction["prior"] == pytest.approx({c: n / total for c, n in counts.items()})
    log_prior = np.log([correction["prior"][c] for c in corrected.classes])
    np.testing.assert_allclose(corrected.decision_logits(raw), raw - 0.5 * log_prior, rtol=1e-6, atol=1e-6)
    # What every command and the app serve goes through it: the probabilities are those of the shifted logits.
    probs = corrected.predict(val.images)
    z = (raw - 0.5 * log_prior) / corrected.metadata["temperature"]
    np.testing.assert_allclose(probs, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    # The shift favours rare classes: no image leaves the rarest class, none joins the commonest.
    rarest, commonest = (corrected.classes.index(f(counts, key=counts.get)) for f in (min, max))
    before, after = raw.argmax(1), probs.argmax(1)
    assert (after[before == rarest] == rarest).all() and (before[after == commonest] == commonest).all()
    assert "Prior correction:" in run_cli("card", "--checkpoint", ckpt).stdout
    assert "Prior correction     logits minus 0.5 x log" in run_cli("info", "--checkpoint", ckpt).stdout

    done = run_cli("calibrate", "--checkpoint", ckpt, "--csv", workdir / "split.csv", "--split", "val",
                   "--prior_tau", "0")
    assert done.returncode == 0, done.stderr
    assert "prior_correction" not in checkpoint.read_metadata(ckpt)
    np.testing.assert_allclose(Predictor.load(ckpt).decision_logits(raw), raw)


@pytest.mark.slow
def test_prior_correction_without_training_counts_says_what_to_do(tmp_path):
    from test_app import make_tiny_checkpoint
    from model.calibration import prior_correction
    metadata = checkpoint.read_metadata(make_tiny_checkpoint(tmp_path / "tiny"))
    with pytest.raises(UserError, match="no training images for .*without --prior_tau"):
        prior_correction(metadata, metadata["classes"], 0.5)
    assert prior_correction(metadata, metadata["classes"], 0.0) is None
    with pytest.raises(UserError, match="from 0 .no correction. to 1"):
        prior_correction(metadata, metadata["classes"], -0.5)


def run_soup(*args):
    return subprocess.run([sys.executable, "bench/experiments/weight_soup.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_weight_soup_averages_every_weight_and_drops_what_described_one_member(tmp_path):
    from test_app import make_tiny_checkpoint
    from model.networks import WEIGHTS
    first = make_tiny_checkpoint(tmp_path / "first", seed=0)
    second_model, second_metadata = checkpoint.load_model(make_tiny_checkpoint(tmp_path / "seed1", seed=1))
    # Batch-norm statistics differ between members too: they must be averaged, not taken from one.
    nnx.update(second_model, jax.tree.map(lambda a: a + 1.0, nnx.state(second_model, nnx.BatchStat)))
    second_metadata["operating_point"] = {"threshold": 0.3}
    checkpoint.save(tmp_path / "second", 1, second_model, second_metadata)

    done = run_soup(first, tmp_path / "second", "--out", tmp_path / "soup")
    assert done.returncode == 0, done.stderr
    assert "calibrate" in done.stdout
    members = [nnx.state(checkpoint.load_model(p)[0], WEIGHTS) for p in (first, tmp_path / "second")]
    soup_model, metadata = checkpoint.load_model(tmp_path / "soup")
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *members)
    for got, want, one in zip(jax.tree.leaves(nnx.state(soup_model, WEIGHTS)), jax.tree.leaves(expected),
                              jax.tree.leaves(members[0])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(got, one) for got, one in zip(jax.tree.leaves(nnx.state(soup_model, nnx.BatchStat)),
                                                             jax.tree.leaves(nnx.state(members[0], nnx.BatchStat))))
    assert len(metadata["soup"]["members"]) == 2 and metadata["classes"] == second_metadata["classes"]
    assert "temperature" not in metadata and "operating_point" not in metadata  # refit by calibrate, not inherited
    assert Predictor.load(tmp_path / "soup").operating_threshold is None

    make_tiny_checkpoint(tmp_path / "other_size", size=48)
    refused = run_soup(first, tmp_path / "other_size", "--out", tmp_path / "no")
    assert refused.returncode != 0 and "image_size" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "no").exists()


DATA_PARALLEL_STEPS = """
import json, numpy as np, jax, jax.numpy as jnp
from model.networks import build
from model.augment import AugmentConfig
from model.preprocess import Normalisation
from model.train_step import make_optimizer, make_train_step, mix_batch, data_mesh, replicate, shard_batch
model = build("simple_cnn", 7, seed=0, dropout=0.0)
optimizer = make_optimizer(model, lr=1e-3, weight_decay=1e-4, total_steps=10, warmup_steps=1)
mesh = data_mesh()
replicate((model, optimizer), mesh)
step = make_train_step(aug=AugmentConfig(), norm=Normalisation(), num_classes=7, label_smoothing=0.1)
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
y = rng.integers(0, 7, 8).astype(np.int32)
model.train()
losses = []
for i in range(3):
    loss, _ = step(model, optimizer, *shard_batch(mesh, x, y), jnp.ones(7), jax.random.key(i))
    losses.append(float(loss))
# Mixing pairs each example with the batch reversed, across shards: the same mix as on one device.
mix = jax.jit(lambda k, *arrays: mix_batch(k, *arrays, mixup=0.2, cutmix=1.0))
batch = (rng.normal(size=(8, 32, 32, 3)).astype(np.float32), np.eye(7, dtype=np.float32)[y], rng.uniform(size=8))
mix_error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for i in range(8)
                for a, b in zip(mix(jax.random.key(i), *batch), mix(jax.random.key(i), *shard_batch(mesh, *batch))))
print(json.dumps({"devices": jax.device_count(), "batch_devices": len(loss.sharding.device_set), "losses": losses,
                  "mix_error": mix_error}))
"""


@pytest.mark.slow
def test_data_parallel_matches_one_device():
    """4 fake CPU devices (XLA_FLAGS) give the same losses as 1, step after step, and the same mixed batches."""
    results = {}
    for n in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", DATA_PARALLEL_STEPS], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results[4]["devices"] == 4 and results[1]["devices"] == 1
    np.testing.assert_allclose(results[4]["losses"], results[1]["losses"], rtol=1e-4)
    assert results[4]["mix_error"] < 1e-5


@pytest.mark.slow
def test_extra_train_skips_exact_copies_of_held_out_images(synthetic_data, tmp_path):
    # ISIC 2017 has identical images across its splits: training on a copy of a test image would leak.
    images = sorted(synthetic_data.ham_images.glob("*.jpg"))
    (tmp_path / "extra").mkdir()
    (tmp_path / "external").mkdir()
    for name, source in (("copy.jpg", images[0]), ("new.jpg", images[1])):
        (tmp_path / "extra" / name).write_bytes(source.read_bytes())
    (tmp_path / "external" / "test.jpg").write_bytes(images[0].read_bytes())
    (tmp_path / "extra" / "labels.csv").write_text("path,dx\ncopy.jpg,mel\nnew.jpg,nv\n")
    (tmp_path / "external" / "labels.csv").write_text("path,dx\ntest.jpg,mel\n")
    workdir = tmp_path / "run"
    result = train_and_evaluate(smoke_config(synthetic_data.ham_dir, workdir, epochs=1,
                                             extra_train=[str(tmp_path / "extra" / "labels.csv")],
                                             external_eval=[str(tmp_path / "external" / "labels.csv")]))
    data = checkpoint.read_metadata(workdir / "best")["training"]["data"]
    split = {Path(row["path"]).name: row["split"] for row in csv.DictReader(open(workdir / "split.csv"))}
    original_in_train = split[images[0].name] == "train"  # the source's own copy is dropped from training too
    assert data["dropped_duplicates"] == 1 + original_in_train
    n_split_train = sum(s == "train" for s in split.values())
    assert data["train_images"] == n_split_train - original_in_train + 1
    assert [s["name"] for s in data["sources"]] == ["ham", "extra"]
    assert list(result["external"]) == [str(tmp_path / "external" / "labels.csv")]


def _write_challenge_source(root: Path, write_image) -> Path:
    """An ISIC 2019-style source: one-hot ground truth, metadata with lesion ids, 3 lesions per class."""
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    truth, meta, k = [], [], 0
    for c, name in enumerate(classes[:7]):
        for lesion in range(3):
            for photo in range(2 if lesion == 0 else 1):
                k += 1
                image = f"ISIC_{9000000 + k}"
                write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg", name.lower().replace("ak", "akiec"),
                            5000 + k)
                truth.append([image, *("1.0" if j == c else "0.0" for j in range(len(classes)))])
                meta.append([image, "50", "back", f"BCN_{c}_{lesion}", "male"])
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *classes], *truth])
    with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], *meta])
    return root


@pytest.mark.slow
def test_several_sources_each_keep_their_lesions_and_a_validation_part(synthetic_data, tmp_path, write_image,
                                                                      capsys):
    bcn = _write_challenge_source(tmp_path / "bcn", write_image)
    workdir = tmp_path / "run"
    cfg = smoke_config(synthetic_data.ham_dir, workdir, epochs=1, sampling="sources_balanced")
    cfg.data = [str(synthetic_data.ham_dir), f"barcelona={bcn}"]
    assert cfg.class_weighting == "sqrt"
    train_and_evaluate(cfg)
    assert ("WARNING: --sampling sources_balanced already evens out the classes; --class_weighting sqrt "
            "weights the rare classes again") in capsys.readouterr().out
    data = checkpoint.read_metadata(workdir / "best")["training"]["data"]
    sources = {s["name"]: s for s in data["sources"]}
    assert set(sources) == {"ham", "barcelona"}
    assert all(s["val_images"] > 0 and s["train_images"] > 0 for s in sources.values())
    assert sources["barcelona"]["train_images"] + sources["barcelona"]["val_images"] == 28
    assert data["train_images"] == sum(s["train_images"] for s in sources.values())
    rows = list(csv.DictReader(open(workdir / "split.csv")))
    where = {}
    for row in rows:  # no lesion of either source crosses the split
        assert where.setdefault(row["group"], row["split"]) == row["split"]
    log = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["val_sources"]) == {"ham", "barcelona"}
    expected = np.mean([m["balanced_accuracy"] for m in log[0]["val_sources"].values()])
    assert log[0]["val_selection_score"] == pytest.approx(expected)


@pytest.mark.slow
def test_a_prior_correction_with_a_class_balanced_draw_is_refused_before_training(tmp_path):
    cfg = smoke_config(tmp_path / "no_data_needed", tmp_path / "run", sampling="balanced", prior_tau=0.5)
    with pytest.raises(UserError, match="--prior_tau 0.5 .* --sampling balanced evens out the classes"):
        train_and_evaluate(cfg)
    assert not (tmp_path / "run").exists()


def test_source_balanced_sampling_gives_each_source_an_equal_share():
    from model.train import epoch_order
    labels = np.array([0] * 900 + [1] * 100 + [0] * 50 + [2] * 50)
    sources = np.array(["big"] * 1000 + ["small"] * 100)
    order = epoch_order(np.random.default_rng(0), labels, "sources_balanced", sources)
    share_small = (sources[order] == "small").mean()
    assert 0.45 < share_small < 0.55
    big = order[sources[order] == "big"]
    assert 0.45 < (labels[big] == 1).mean() < 0.55  # classes balanced within a source
    with pytest.raises(UserError, match="sampling"):
        epoch_order(np.random.default_rng(0), labels, "by_colour", sources)


def test_malignancy_sampling_makes_half_of_every_source_malignant():
    from model.train import epoch_order
    # "big" has malignant classes 0 and 1 (1 rare) and benign 2; "small" has one malignant class in four
    labels = np.array([0] * 300 + [1] * 20 + [2] * 680 + [0] * 25 + [2] * 25 + [3] * 50)
    sources = np.array(["big"] * 1000 + ["small"] * 100)
    order = epoch_order(np.random.default_rng(0), labels, "sources_malignancy", sources, malignant=[0, 1])
    assert 0.45 < (sources[order] == "small").mean() < 0.55
    for name in ("big", "small"):
        drawn = labels[order[sources[order] == name]]
        assert 0.45 < np.isin(drawn, [0, 1]).mean() < 0.55, name
    big = labels[order[sources[order] == "big"]]
    assert 0.2 < (big == 1).mean() < 0.3          # each malignant class half of the malignant draws
    small = labels[order[sources[order] == "small"]]
    assert 0.2 < (small == 2).mean() < 0.3 and 0.2 < (small == 3).mean() < 0.3


@pytest.mark.slow
def test_benchmark_command_writes_table_json_and_plot(trained_run, synthetic_data_shared, tmp_path, capsys):
    from model.__main__ import main
    workdir, _ = trained_run
    out = tmp_path / "bench"
    assert main(["benchmark", "--checkpoint", str(workdir), "--out", str(out), "--bootstrap", "20", "--record",
                 f"val={workdir / 'split.csv'}:val", str(synthetic_data_shared.ham_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| val |" in printed and "| ham |" in printed
    result = json.loads((out / "benchmark.json").read_text())
    assert [s["name"] for s in result["sets"]] == ["val", "ham"]
    first = result["sets"][0]
    for key in ("n", "accuracy", "balanced_accuracy", "macro_auc", "malignant_auc", "recall",
                "melanoma_recall_sensitive", "specificity_sensitive", "ece"):
        assert key in first
    assert result["sets"][1]["n"] == synthetic_data_shared.n_ham
    assert (out / "benchmark.png").stat().st_size > 1000 and (out / "predictions_val.csv").is_file()
    stored = checkpoint.read_metadata(workdir)["metrics"]["benchmark"]["sets"]  # the numbers travel with the model
    assert [(s["name"], s["balanced_accuracy"]) for s in stored] == [(s["name"], s["balanced_accuracy"])
                                                                       for s in result["sets"]]


@pytest.mark.slow
def test_weight_average_warms_up_then_follows_its_decay():
    model = build("simple_cnn", 7, seed=0)
    average = nnx.clone(model)
    start = np.asarray(average.classifier.kernel[...])
    model.classifier.kernel[...] = model.classifier.kernel[...] + 1.0
    update_ema = make_ema_update(0.9)
    update_ema(average, model, 0)  # step 0: weight (1 + 0) / (10 + 0) = 0.1 on the old average
    np.testing.assert_allclose(average.classifier.kernel[...], 0.1 * start + 0.9 * (start + 1), rtol=1e-6)
    update_ema(average, model, 10_000)  # warmed up: the decay itself
    np.testing.assert_allclose(average.classifier.kernel[...], 0.9 * (0.1 * start + 0.9 * (start + 1))
                               + 0.1 * (start + 1), rtol=1e-6)


def logged_val_losses(data_dir, workdir, **overrides) -> list[float]:
    train_and_evaluate(smoke_config(data_dir, workdir, epochs=3, **overrides))
    return [json.loads(line)["val_loss"] for line in (workdir / "log.jsonl").read_text().splitlines()]


def interrupted_then_resumed(monkeypatch, data_dir, workdir, **overrides) -> list[float]:
    """Stop a 3-epoch run right after its epoch-2 checkpoint, resume it, return the logged validation losses."""
    plot = report.plot_learning_curves

    def interrupt_after_epoch_2(history, path):
        if len(history) == 2:
            raise KeyboardInterrupt
        plot(history, path)

    monkeypatch.setattr(report, "plot_learning_curves", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        logged_val_losses(data_dir, workdir, **overrides)
    monkeypatch.undo()
    return logged_val_losses(data_dir, workdir, resume=True, **overrides)


@pytest.mark.slow
def test_resumed_run_continues_the_dropout_stream(synthetic_data_shared, tmp_path, monkeypatch):
    """Dropout masks after a resume are the ones the uninterrupted run drew, so the runs agree exactly."""
    data = synthetic_data_shared.ham_dir
    whole = logged_val_losses(data, tmp_path / "whole", dropout=0.5)
    assert interrupted_then_resumed(monkeypatch, data, tmp_path / "resumed", dropout=0.5) == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_weight_average_is_what_is_evaluated_and_resumes_exactly(synthetic_data_shared, tmp_path, monkeypatch):
    """An --ema_decay run killed after epoch 2 and resumed logs the same validation as an uninterrupted one."""
    data = synthetic_data_shared.ham_dir
    whole = logged_val_losses(data, tmp_path / "whole", dropout=0.0, ema_decay=0.9)
    resumed = interrupted_then_resumed(monkeypatch, data, tmp_path / "resumed", dropout=0.0, ema_decay=0.9)
    assert resumed == pytest.approx(whole, rel=1e-5)
    # Without the average, the same run evaluates other weights.
    assert logged_val_losses(data, tmp_path / "plain", dropout=0.0)[-1] != pytest.approx(whole[-1], rel=1e-3)
    with pytest.raises(UserError, match="cannot resume.*--ema_decay"):  # that checkpoint holds no average
        logged_val_losses(data, tmp_path / "plain", dropout=0.0, ema_decay=0.9, resume=True)


def two_image_batch(size=(24, 32)):
    """Image 0 all zeros (class 0), image 1 all ones (class 1): a mixed pixel tells where it came from."""
    x = jnp.stack([jnp.zeros((*size, 3)), jnp.ones((*size, 3))])
    return x, jnp.eye(2), jnp.array([1.0, 3.0])


@pytest.mark.slow
def test_cutmix_pastes_one_box_and_mixes_labels_by_its_area():
    x, targets, weights = two_image_batch()
    areas = []
    for seed in range(20):
        mixed, mixed_targets, mixed_weights = mix_batch(jax.random.key(seed), x, targets, weights, cutmix=1.0)
        pasted = np.asarray(mixed[0, :, :, 0])
        assert set(np.unique(pasted)) <= {0.0, 1.0}  # whole pixels from one image or the other
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        if rows.size:  # one axis-aligned rectangle: every pixel of its bounding box is pasted
            assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and pasted.sum() == rows.size * cols.size
        share = pasted.mean()
        areas.append(share)
        np.testing.assert_allclose(mixed_targets[0], [1 - share, share], atol=1e-6)
        np.testing.assert_allclose(mixed_weights[0], (1 - share) * 1.0 + share * 3.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(mixed[1, :, :, 0]), 1 - pasted)  # the partner gets the same box
    assert 0.1 < np.mean(areas) < 0.9 and np.std(areas) > 0.05  # Beta(1, 1): box sizes vary widely


@pytest.mark.slow
def test_mixup_blends_whole_images_and_both_together_take_turns():
    x, targets, weights = two_image_batch()
    mixed, mixed_targets, _ = mix_batch(jax.random.key(0), x, targets, weights, mixup=0.4)
    share = float(mixed[0, 0, 0, 0])
    np.testing.assert_allclose(mixed[0], share, atol=1e-6)  # a uniform blend, no box
    np.testing.assert_allclose(mixed_targets[0], [1 - share, share], atol=1e-6)
    kinds = set()
    for seed in range(16):
        mixed, _, _ = mix_batch(jax.random.key(seed), x, targets, weights, mixup=0.4, cutmix=1.0)
        is_box = set(np.unique(np.asarray(mixed[0]))) <= {0.0, 1.0}
        kinds.add("cutmix" if is_box else "mixup")
    assert kinds == {"cutmix", "mixup"}
    step = make_train_step(aug=AugmentConfig(), norm=Normalisation(), num_classes=7, mixup=0.4, cutmix=1.0)
    model = build("simple_cnn", 7, seed=0)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=1e-4, total_steps=2, warmup_steps=1)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    loss, _ = step(model, optimizer, images, np.arange(4, dtype=np.int32), jnp.ones(7), jax.random.key(0))
    assert np.isfinite(float(loss))  # the jitted step compiles with both on
    same = mix_batch(jax.random.key(0), x, targets, weights)
    assert all(a is b for a, b in zip(same, (x, targets, weights)))  # both off: untouched


@pytest.mark.slow
def test_run_warns_on_a_tiny_validation_split_and_ends_with_a_summary(synthetic_data_shared, tmp_path, capsys):
    import shlex

    from model.__main__ import main
    workdir = tmp_path / "my run"       # a space: the printed commands quote their paths
    train_and_evaluate(smoke_config(synthetic_data_shared.ham_dir, workdir))
    out = capsys.readouterr().out
    # The warning comes before the first epoch: 28 images, one lesion per class held out.
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: "))
    assert out.index(warning) < out.index('{"epoch": 1')
    n_val = checkpoint.read_metadata(workdir)["training"]["data"]["val_images"]
    assert f"only {n_val} validation images (fewer than 20)" in warning and "will mean little" in warning
    # The end: where the best checkpoint is, its epoch's validation numbers, what to run next.
    rows = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_selection_score"])
    summary = out[out.index("Done. Best checkpoint: "):].splitlines()
    assert summary[0] == f"Done. Best checkpoint: {workdir / 'best'} (epoch {best['epoch']} of 2)."
    assert f"balanced accuracy {best['val_balanced_accuracy']:.3f}" in summary[1]
    assert f"macro AUC {best['val_macro_auc']:.3f}" in summary[1] and "ECE" in summary[1]
    commands = [line.strip() for line in summary if line.startswith("  python -m ")]
    assert [c.split()[2:4] for c in commands] == [["model", "evaluate"], ["model", "benchmark"], ["app", "--checkpoint"]]
    for command in commands[:2]:    # the suggested commands work as printed
        assert main(shlex.split(command)[3:]) == 0, command
    assert (workdir / "eval" / "metrics.json").is_file() and (workdir / "benchmark" / "benchmark.json").is_file()


@pytest.mark.slow
def test_one_class_data_or_a_failed_start_leaves_no_workdir(synthetic_data, tmp_path):
    for image in (synthetic_data.folders / "Cancer").iterdir():   # an empty class folder
        image.unlink()
    workdir = tmp_path / "one_class"
    with pytest.raises(UserError, match=r"only 1 class \(benign\) has training images"):
        train_and_evaluate(smoke_config(synthetic_data.folders, workdir, task="binary"))
    assert not workdir.exists()
    # Data that is not there, a batch larger than the data: nothing left behind either.
    with pytest.raises(UserError):
        train_and_evaluate(smoke_config(tmp_path / "no_such_data", tmp_path / "missing"))
    with pytest.raises(UserError, match="fewer than one batch"):
        train_and_evaluate(smoke_config(synthetic_data.ham_dir, tmp_path / "big_batch", batch_size=512))
    assert not (tmp_path / "missing").exists() and not (tmp_path / "big_batch").exists()
    # A workdir that was there before (another run's) is never removed, and gets no config.json.
    older = tmp_path / "older"
    older.mkdir()
    (older / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        train_and_evaluate(smoke_config(synthetic_data.folders, older, task="binary"))
    assert (older / "notes.txt").read_text() == "keep me" and not (older / "config.json").exists()


@pytest.mark.slow
def test_a_run_restarted_after_a_kill_overwrites_a_best_step_ahead_of_its_latest(tmp_path):
    """Killed between saving best/ and latest/, a run starts again from scratch: its first best/ save must
    replace the stale step of the same number, not fail on it."""
    metadata = {"arch": "simple_cnn", "arch_config": {}, "classes": ["nv", "mel"], "image_size": 32,
                "normalisation": Normalisation(mean=(0.5,) * 3, std=(0.5,) * 3).to_dict()}
    stale, fresh = build("simple_cnn", 2, seed=0), build("simple_cnn", 2, seed=1)
    checkpoint.save(tmp_path / "best", 1, stale, {**metadata, "run": "killed"})
    checkpoint.save(tmp_path / "best", 1, fresh, {**metadata, "run": "restarted"})
    model, saved = checkpoint.load_model(tmp_path / "best")
    assert saved["run"] == "restarted"
    x = jnp.ones((1, 32, 32, 3))
    fresh.eval()
    np.testing.assert_allclose(model(x), fresh(x), rtol=1e-6)


def test_unreadable_images_of_every_split_are_named_in_one_error(tmp_path, write_image):
    from model.images import UnreadableImages
    from model.train import prepare_data
    rows = ["path,dx,split"]
    for i in range(12):
        dx, split = ("mel", "nv")[i % 2], "val" if i >= 8 else "train"
        write_image(tmp_path / f"img{i}.jpg", dx, seed=i)
        rows.append(f"img{i}.jpg,{dx},{split}")
    for name, split in (("bad_train.jpg", "train"), ("bad_val.jpg", "val")):
        (tmp_path / name).write_bytes(b"\xff\xd8 truncated " + name.encode())   # not identical: kept apart
        rows.append(f"{name},nv,{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = make_config("smoke", data=f"{tmp_path / 'labels.csv'}:train,val", workdir=str(tmp_path / "run"))
    with pytest.raises(UnreadableImages) as caught:
        prepare_data(cfg, tmp_path / "run")
    assert "2 of 14 images could not be read" in str(caught.value)
    assert "bad_train.jpg" in str(caught.value) and "bad_val.jpg" in str(caught.value)
