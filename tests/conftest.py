"""Shared test fixtures.

Sections: paths to the real data (skipped when absent) | synthetic datasets written to tmp_path.
Add new fixtures under a section header; keep helpers private (leading underscore).
"""
from __future__ import annotations

import atexit
import csv
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from model import runtime
from model.classes import HAM_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole run, set before JAX is imported and inherited by
# every `train.py` / app subprocess: most tests compile the same small models, and the second compile
# of a program becomes a read. A fresh folder per run, so no test depends on an earlier run's cache, removed
# when the run ends (one given in the environment is the caller's, and stays).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lesionlens-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# `train.py` and app subprocesses start with the huge-page malloc settings their entry points would
# otherwise restart themselves to get (model/runtime.py): the same code path, one start-up fewer.
os.environ.setdefault("GLIBC_TUNABLES", runtime.TUNABLES)
# Real dermoscopy data lives outside the repo (see ../shared/data/README.md); absent on fresh machines.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- real data (may skip)

def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (real data is only on development machines; "
                    "see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder `../shared/data` next to the repo; skips when absent."""
    return _require(SHARED_DATA, "shared data folder")


@pytest.fixture(scope="session")
def ham10000(shared_data) -> Path:
    """HAM10000 folder (HAM10000_metadata.csv, images/, masks/); skips when absent."""
    return _require(shared_data / "ham10000" / "HAM10000_metadata.csv", "HAM10000 metadata").parent


@pytest.fixture(scope="session")
def peer_script() -> Path:
    """The PyTorch peer `../shared/bench/peer_torch.py`; skips when absent."""
    return _require(SHARED_DATA.parent / "bench" / "peer_torch.py", "the PyTorch peer")


@pytest.fixture(scope="session")
def isic2017(shared_data) -> Path:
    """ISIC 2017 folder (labels.csv with path,split,...,dx); skips when absent."""
    return _require(shared_data / "isic2017" / "labels.csv", "ISIC 2017 labels.csv").parent


# --------------------------------------------------------------------------- synthetic data

# One blob colour per class, so a tiny model can learn the synthetic set.
_CLASS_RGB = {"akiec": (200, 60, 60), "bcc": (220, 140, 160), "bkl": (120, 80, 40), "df": (150, 110, 90),
              "mel": (40, 20, 20), "nv": (110, 70, 50), "vasc": (170, 20, 60),
              "benign": (110, 70, 50), "malignant": (40, 20, 20)}


def make_lesion_image(dx: str, seed: int, size=(64, 48)) -> Image.Image:
    """A skin-toned RGB image with a noisy blob coloured by class; distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([225, 180, 160]) + rng.integers(-15, 16, 3)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = w // 2 + int(rng.integers(-w // 8, w // 8 + 1)), h // 2 + int(rng.integers(-h // 8, h // 8 + 1))
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=_CLASS_RGB.get(dx, (90, 90, 90)))
    return img


def save_lesion_image(path, dx: str = "nv", seed: int = 0, size=(64, 48)) -> Path:
    """Save a synthetic lesion image; the format follows the suffix (.jpg/.jpeg/.png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_lesion_image(dx, seed, size).save(path)
    return path


@pytest.fixture
def write_image():
    """`write_image(path, dx="nv", seed=0, size=(64, 48))` -> path (see save_lesion_image)."""
    return save_lesion_image


def write_synthetic_data(tmp_path: Path) -> SimpleNamespace:
    """A tiny, clean dataset written as real files, in two layouts:

    - `ham_dir`: HAM layout, `ham_csv` (= ham_dir/synthetic_metadata.csv with lesion_id, image_id,
      dx, dx_type, age, sex, localization) + `ham_dir/images/ISIC_*.jpg|png` + `ham_dir/masks/`;
      4 images per HAM class, in 3 lesions per class (the first lesion has 2 photos).
    - `folders`: folder-per-class `Skin_Data/Cancer/*.jpg` and `Skin_Data/Non_Cancer/*.png`, 6 each.
    `counts` maps dx -> images in the HAM layout.
    """
    ham_dir = tmp_path / "ham"
    rows, seed = [], 0
    for dx in HAM_CLASSES:
        for k in range(4):
            seed += 1
            image_id = f"ISIC_{seed:07d}"
            suffix = ".png" if k == 3 else ".jpg"
            save_lesion_image(ham_dir / "images" / f"{image_id}{suffix}", dx, seed)
            lesion = f"HAM_{dx}_{max(k - 1, 0)}"
            rows.append([lesion, image_id, dx, "histo", str(30 + seed), ("male", "female")[seed % 2], "back"])
    (ham_dir / "masks").mkdir()
    Image.new("L", (64, 48), 255).save(ham_dir / "masks" / "ISIC_0000001_segmentation.png")
    ham_csv = ham_dir / "synthetic_metadata.csv"
    with open(ham_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(rows)

    folders = tmp_path / "Skin_Data"
    for k in range(6):
        save_lesion_image(folders / "Cancer" / f"c{k}.jpg", "malignant", 100 + k)
        save_lesion_image(folders / "Non_Cancer" / f"n{k}.png", "benign", 200 + k)

    return SimpleNamespace(root=tmp_path, ham_dir=ham_dir, ham_csv=ham_csv, ham_images=ham_dir / "images",
                           folders=folders, counts={dx: 4 for dx in HAM_CLASSES}, n_ham=len(rows), n_folders=12)


@pytest.fixture
def synthetic_data(tmp_path) -> SimpleNamespace:
    return write_synthetic_data(tmp_path)


@pytest.fixture(scope="session")
def synthetic_data_shared(tmp_path_factory) -> SimpleNamespace:
    """The same files, written once per session: for read-only use by slow tests."""
    return write_synthetic_data(tmp_path_factory.mktemp("synthetic"))
