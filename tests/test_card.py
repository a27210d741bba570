"""The model card (model/card.py): rendered from checkpoint metadata alone, old and new.

One renderer serves the app's Model tab, `python -m model card` and docs/MODEL_CARD.md; these
tests read the bundled checkpoint's real metadata (the facts checked are read from it, so a
re-bundled model passes too; the committed one predates multi-source training, as does the
trimmed copy in the second test) and a multi-source run's metadata as `model/train.py` records it.
"""
from pathlib import Path

import pytest

from model.card import model_card_markdown

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "checkpoints" / "default"
HAM = {"akiec": 273, "bcc": 438, "bkl": 925, "df": 97, "mel": 936, "nv": 5696, "vasc": 113}
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _counts(scale: float) -> dict:
    return {c: max(1, int(n * scale)) for c, n in HAM.items()}


def multisource_metadata() -> dict:
    """What a `--recipe multisource` run writes into best/ (model/train.py), trimmed to what the card reads."""
    sources = [
        {"name": "ham10000", "spec": "../shared/data/ham10000", "train_images": 8478, "val_images": 1537,
         "train_class_counts": HAM, "val_class_counts": _counts(0.18)},
        {"name": "isic2017", "spec": "../shared/data/isic2017/labels.csv:train,val", "train_images": 1997,
         "val_images": 150, "train_class_counts": {**dict.fromkeys(CLASSES, 0), "mel": 374, "nv": 1372, "bkl": 251},
         "val_class_counts": {**dict.fromkeys(CLASSES, 0), "mel": 30, "nv": 78, "bkl": 42}},
        {"name": "isic2019_bcn", "spec": "../shared/data/isic2019_bcn", "train_images": 10312, "val_images": 1819,
         "train_class_counts": _counts(1.1), "val_class_counts": _counts(0.2)},
    ]
    per_source = {
        "ham10000": {"n": 1537, "balanced_accuracy": 0.7311, "macro_auc": 0.951, "malignant_auc": 0.912,
                     "recall": {"mel": 0.55}},
        "isic2017": {"n": 150, "balanced_accuracy": 0.4876, "macro_auc": 0.77, "malignant_auc": 0.7123,
                     "recall": {"mel": 0.4}},
        "isic2019_bcn": {"n": 1819, "balanced_accuracy": 0.6654, "macro_auc": 0.93, "malignant_auc": 0.8841,
                         "recall": {"mel": 0.61}},
    }
    return {
        "format": "lesionlens-checkpoint/1", "arch": "efficientnet_lite0", "arch_config": {"dropout": 0.2},
        "classes": CLASSES, "task": "ham7", "image_size": 128, "resize": "fov", "tta": True,
        "temperature": 0.83, "checkpoint_id": "ms_fov@4:0123456789",
        "training": {
            "config": {"data": [s["spec"] for s in sources], "resize": "fov", "epochs": 4, "image_size": 128,
                       "sampling": "uniform", "class_weighting": "sqrt"},
            "data": {"source": [s["spec"] for s in sources], "extra_train": [], "dropped_duplicates": 3,
                     "task": "ham7", "sources": sources, "train_images": 20787, "val_images": 3506,
                     "train_class_counts": _counts(2.4), "val_class_counts": _counts(0.4),
                     "split_file": "runs/ms_fov/split.csv", "val_frac": 0.15, "split_seed": 0}},
        "licence": "Trained on HAM10000 (CC BY-NC-SA 4.0): non-commercial use only.",
        "metrics": {
            "epoch": 4,
            "val": {"n": 3506, "accuracy": 0.8, "balanced_accuracy": 0.7012, "balanced_accuracy_ci": [0.68, 0.72],
                    "macro_auc": 0.94, "malignant_auc": 0.9},
            "val_sources": per_source,
            "external": {"../shared/data/isic2017/labels.csv:test": {
                "n": 600, "balanced_accuracy": 0.55, "malignant_auc": 0.7777, "malignant_auc_ci": [0.74, 0.81],
                "recall": {"mel": 0.41}}},
            # as `python -m model benchmark --record` stores it (model/benchmark.py set_row + spec)
            "benchmark": {"tta": None, "sets": [
                {"name": "ph2", "spec": "ph2=../shared/data/ph2", "n": 200, "accuracy": 0.7,
                 "balanced_accuracy": 0.6543, "balanced_accuracy_ci": [0.6, 0.7], "macro_auc": 0.81,
                 "malignant_auc": 0.8812, "malignant_auc_ci": [0.83, 0.93], "recall": {"mel": 0.6},
                 "melanoma_recall_sensitive": 0.925, "specificity_sensitive": 0.61, "ece": 0.05},
                {"name": "isic2017_test", "spec": "isic2017_test=../shared/data/isic2017/labels.csv:test",
                 "n": 600, "accuracy": 0.6, "balanced_accuracy": 0.55, "macro_auc": 0.8, "malignant_auc": 0.7777,
                 "recall": {"mel": 0.41}, "melanoma_recall_sensitive": 0.7, "specificity_sensitive": 0.6,
                 "ece": 0.1}]}},
    }


def _bundled_metadata() -> dict:
    from model import checkpoint
    if checkpoint.latest_step(DEFAULT / "best") is None and checkpoint.latest_step(DEFAULT) is None:
        pytest.skip("checkpoints/default is not bundled in this checkout")
    return checkpoint.read_metadata(DEFAULT)


def test_card_of_the_bundled_checkpoint_renders_from_its_metadata():
    """Whatever model is bundled (the facts are read from its metadata, not written here)."""
    metadata = _bundled_metadata()
    card = model_card_markdown(metadata)
    size, resize = metadata["image_size"], metadata.get("resize", "squash")
    assert card.startswith("## Model card")
    assert f"`{metadata['arch']}`" in card and f"{size}×{size} px ({resize} resize)" in card
    val = metadata["metrics"]["val"]
    ci = val["balanced_accuracy_ci"]
    assert f"| balanced accuracy | {val['balanced_accuracy']:.3f} ({ci[0]:.3f}–{ci[1]:.3f}) |" in card
    data = metadata["training"]["data"]
    assert f"- **images**: {data['train_images']:,} training, {data['val_images']:,} validation" in card
    for spec, m in metadata["metrics"].get("external", {}).items():
        assert f"| {spec} | {m['n']} | {m['balanced_accuracy']:.3f} | {m['malignant_auc']:.3f}" in card
    for s in data.get("sources", []):                      # a multi-source model, once bundled
        assert f"| {s['name']} | `{s['spec']}` | {s['train_images']:,} | {s['val_images']:,} |" in card
    for name, m in metadata["metrics"].get("val_sources", {}).items():
        assert f"| {name} | {m['n']} | {m['balanced_accuracy']:.3f}" in card
    assert ("### Validation by source" in card) == bool(metadata["metrics"].get("val_sources"))
    assert ("### Benchmark" in card) == bool(metadata["metrics"].get("benchmark"))
    assert "**Sensitive threshold**" in card and "### Subgroups (validation)" in card
    assert "AK and SCC both mapped to akiec" in card
    assert "CC BY-NC-SA 4.0" in card and "non-commercial" in card and "not a medical" in card


def test_card_of_an_old_checkpoint_without_per_source_keys():
    """checkpoints/default as committed before multi-source training: no `sources`, `val_sources`."""
    metadata = _bundled_metadata()
    metadata["training"]["data"].pop("sources", None)
    for key in ("val_sources", "benchmark"):
        metadata["metrics"].pop(key, None)
    card = model_card_markdown(metadata)
    assert "### Training data" in card and "### Validation metrics" in card and "### Other sources" in card
    assert "### Validation by source" not in card and "### Benchmark" not in card
    assert "trained on HAM10000" in card or "trained on ham10000" in card


def test_card_of_a_multisource_run_shows_sources_fov_and_per_source_validation():
    card = model_card_markdown(multisource_metadata())
    assert "**Checkpoint:** `ms_fov@4:0123456789`" in card
    # the field-of-view crop, said in words
    assert "(fov resize)" in card and "dark round field of view is detected and cropped" in card
    # every source with its counts
    assert "trained on ham10000, isic2017, isic2019_bcn (20,787 training images)" in card
    assert "| ham10000 | `../shared/data/ham10000` | 8,478 | 1,537 | akiec 273, bcc 438," in card
    assert "| isic2017 | `../shared/data/isic2017/labels.csv:train,val` | 1,997 | 150 |" in card
    assert "| isic2019_bcn | `../shared/data/isic2019_bcn` | 10,312 | 1,819 |" in card
    assert "- **images**: 20,787 training, 3,506 validation (all sources)" in card
    assert "**dropped**: 3 training images identical" in card
    # pooled and per-source validation, and the source never trained on
    assert "all sources' validation parts pooled" in card
    assert "### Validation by source" in card
    assert "| isic2017 | 150 | 0.488 | 0.770 | 0.712 | 0.400 |" in card
    assert "| isic2019_bcn | 1819 | 0.665 |" in card
    assert "| ../shared/data/isic2017/labels.csv:test | 600 | 0.550 | 0.778 (0.740–0.810) | 0.410 | – |" in card
    assert ("`../shared/data/isic2017/labels.csv:test`: never trained on, but a held-out part of a "
            "training source") in card
    # the benchmark table `benchmark --record` stores
    assert "### Benchmark" in card
    assert ("| ph2 | `ph2=../shared/data/ph2` | 200 | 0.654 (0.600–0.700) | 0.810 | 0.881 (0.830–0.930) | "
            "0.050 | 0.925 | 0.610 |") in card
    assert "`isic2017_test=../shared/data/isic2017/labels.csv:test`: never trained on, but a held-out part" in card
    # label mapping and licences of every source
    assert "AK and SCC both mapped to akiec" in card
    assert "HAM10000 (Tschandl" in card and "BCN_20000 (Combalia" in card and "ISIC 2017 (Codella" in card
    assert "**CC BY-NC 4.0**" in card and "non-commercial" in card
    assert "ISIC 2019 (" not in card                        # BCN_20000 is named, not repeated as ISIC 2019


def test_card_names_the_sources_whose_melanomas_the_sensitive_threshold_does_not_protect():
    metadata = multisource_metadata()
    metadata["operating_point"] = {"target_sensitivity": 0.9, "rule": "per-source melanoma", "threshold": 0.202,
                                   "per_source_melanoma_thresholds": {"ham10000": 0.202, "isic2017": 0.098}}
    metadata["metrics"]["val"]["operating_point"] = {"threshold": 0.202, "malignant_sensitivity": 0.93,
                                                     "malignant_specificity": 0.6, "melanoma_flagged": 0.9}
    card = model_card_markdown(metadata)
    assert ("(malignant probability ≥ 0.202, chosen on validation for 90% sensitivity of the malignant lesions and "
            "of each source's melanomas; fewer of the melanomas of isic2017: a threshold low enough for them flags "
            "more than half of some source's benign lesions)") in card
    metadata["operating_point"].update(rule="pooled malignant",
                                       per_source_melanoma_thresholds={"a": 0.1, "b": 0.15, "c": 0.2, "d": 0.3})
    assert ("chosen on validation for 90% sensitivity of the malignant lesions; fewer of the melanomas of a, b "
            "and c: a threshold") in model_card_markdown(metadata)


def test_card_of_minimal_metadata_still_renders():
    card = model_card_markdown({"arch": "simple_cnn", "classes": ["benign", "malignant"], "image_size": 32,
                                "training": {"data": {"source": "somewhere/Skin_Data"}}})
    assert "| `malignant` | Malignant |" in card and "somewhere/Skin_Data" in card
    assert "akiec" not in card and "non-commercial" in card and "### Validation" not in card


def test_card_command_writes_the_same_markdown(tmp_path, capsys):
    from model.__main__ import main
    card = model_card_markdown(_bundled_metadata())
    out = tmp_path / "card.md"
    assert main(["card", "--checkpoint", str(DEFAULT), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!-- Generated") and f"**Checkpoint:** `{DEFAULT}`" in text
    assert card[card.index("### Classes"):] in text
    capsys.readouterr()
    assert main(["card", "--checkpoint", str(DEFAULT)]) == 0
    assert card[card.index("### Classes"):] in capsys.readouterr().out
    assert main(["card", "--checkpoint", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "default"])
def test_info_prints_a_short_summary_and_the_full_json_on_request(which, tmp_path, capsys):
    import json

    from model.__main__ import main
    from model.checkpoint import read_metadata
    if which == "tiny":
        from test_app import make_tiny_checkpoint
        path = make_tiny_checkpoint(tmp_path / "tiny")
    elif not (DEFAULT / "best").exists():
        pytest.skip("checkpoints/default is not bundled in this checkout")
    else:
        path = DEFAULT
    metadata = read_metadata(path)
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(path)]) == 0
    summary = capsys.readouterr().out
    assert len(summary.splitlines()) < 100
    assert "class_means" not in summary and "[[" not in summary   # no statistics arrays
    assert metadata["arch"] in summary and ", ".join(metadata["classes"]) in summary
    size = metadata["image_size"]
    assert f"{size}x{size} px, resize {metadata['resize']}" in summary
    assert "Temperature" in summary and metadata["licence"] in summary and "--json" in summary
    if which == "default":   # the real checkpoint: its headline numbers, read from its metadata
        val = metadata["metrics"]["val"]
        assert f"balanced accuracy {val['balanced_accuracy']:.3f}" in summary
        assert f">= {metadata['operating_point']['threshold']:.3f}" in summary
        assert "Unusual-image gate" in summary and "jax " in summary
        for spec, m in (metadata["metrics"].get("external") or {}).items():
            assert f"{spec}: n {m['n']}: balanced accuracy {m['balanced_accuracy']:.3f}" in summary
        data = metadata["training"]["data"]
        for source in data.get("sources") or [{"train_images": data["train_images"]}]:
            assert f"{source['train_images']} training" in summary
    else:
        assert "none (not calibrated)" in summary and "random weights for tests" in summary
    assert main(["info", "--checkpoint", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metadata


def test_card_compares_the_served_tta_with_the_plain_view():
    metadata = multisource_metadata()
    metadata["tta"] = True
    bench = metadata["metrics"]["benchmark"]
    bench["tta"] = True
    plain = [{**row, "balanced_accuracy": row["balanced_accuracy"] - 0.03, "malignant_auc": 0.8}
             for row in bench["sets"]]
    assert "### Test-time augmentation" not in model_card_markdown(metadata)   # one table only: nothing to compare
    metadata["metrics"]["benchmark_plain"] = {"tta": False, "sets": plain}
    card = model_card_markdown(metadata)
    assert "### Test-time augmentation" in card and "serve the 8 dihedral views" in card
    assert "docs/notebook/experiment-record.md" not in card.split("### Test-time augmentation")[1].split("###")[0]
    assert "| ph2 | 0.654 | 0.624 | 0.881 | 0.800 |" in card
    assert "| isic2017_test | 0.550 | 0.520 | 0.778 | 0.800 |" in card
    metadata["tta"] = False
    assert "serve the plain view only" in model_card_markdown(metadata)


def test_card_names_the_overlay_method_with_its_scores_and_time():
    metadata = multisource_metadata()
    s = lambda mean: {"mean": mean, "ci95": 0.02}  # noqa: E731
    metadata["saliency"] = {
        "default": "layercam", "reason": "best insertion - deletion", "n_images": 200, "n_faithfulness": 100,
        "scores": {"centred Gaussian": {"energy_in_mask": s(0.641), "pointing": s(0.945)},
                   "layercam": {"energy_in_mask": s(0.752), "pointing": s(0.96), "randomisation_spearman": s(0.11),
                                "deletion_auc": s(0.45), "insertion_auc": s(0.70), "single_map_ms": 61.4}}}
    card = model_card_markdown(metadata)
    assert "The overlay shows **layercam**" in card and "on 200 HAM10000 validation images" in card
    assert "| **layercam** | 0.752 | 0.960 | 0.110 | 0.450 | 0.700 | 61 |" in card
    assert "| centred Gaussian | 0.641 | 0.945 | – | – | – | – |" in card
    metadata["tta"] = True
    assert "the mean of the 8 views' maps" in model_card_markdown(metadata)
    metadata["tta"] = False
    assert "8 views' maps" not in model_card_markdown(metadata)
