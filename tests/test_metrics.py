"""Known-answer tests for model.metrics and model.report."""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import checkpoint, metrics as M  # noqa: E402
from model.classes import BINARY_CLASSES, HAM_CLASSES  # noqa: E402

HAM = list(HAM_CLASSES)


def _sample_labels(rng, probs):
    """One label per row drawn from `probs` (inverse-CDF sampling)."""
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def _synthetic(n=1500, k=7, signal=1.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += signal
    return M.softmax(logits), labels


# --------------------------------------------------------------------------- AUC / ROC


def test_roc_auc_hand_computed():
    # pos {0.35, 0.8}, neg {0.1, 0.4}: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count 1/2: pos {0.5, 0.9} vs neg {0.5, 0.2}: 0.5 + 1 + 1 + 1 = 3.5 / 4
    assert M.roc_auc([0.5, 0.9, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert M.roc_auc([0.3, 0.3, 0.3], [1, 0, 0]) == pytest.approx(0.5)


def test_roc_auc_perfect_inverted_random_and_absent():
    s = np.arange(10.0)
    assert M.roc_auc(s, s >= 5) == 1.0
    assert M.roc_auc(s, s < 5) == 0.0
    rng = np.random.default_rng(0)
    assert M.roc_auc(rng.random(20000), rng.random(20000) < 0.3) == pytest.approx(0.5, abs=0.02)
    assert math.isnan(M.roc_auc([0.1, 0.2], [0, 0]))
    assert math.isnan(M.roc_auc([0.1, 0.2], [1, 1]))


def test_roc_auc_matches_pairwise_brute_force():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 8, 200) / 8.0  # many ties
    pos = rng.random(200) < 0.4
    a, b = s[pos][:, None], s[~pos][None, :]
    assert M.roc_auc(s, pos) == pytest.approx(((a > b) + 0.5 * (a == b)).mean())


def test_roc_curve_hand_computed_and_area_matches_auc():
    fpr, tpr, thr = M.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf and list(thr[1:]) == [0.8, 0.4, 0.35, 0.1]
    rng = np.random.default_rng(2)
    s = rng.integers(0, 20, 300).astype(float)
    pos = rng.random(300) < 0.5
    fpr, tpr, _ = M.roc_curve(s, pos)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(s, pos))


# --------------------------------------------------------------------------- classification_metrics


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 3, 4, 5, 6] * 3)
    probs = np.eye(7)[labels] * 0.94 + 0.01
    m = M.classification_metrics(probs, labels, HAM, n_bootstrap=50)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_auc"] == 1.0
    assert m["melanoma_sensitivity"] == 1.0
    assert m["malignant_auc"] == 1.0
    assert m["malignant_sensitivity"] == 1.0 and m["malignant_specificity"] == 1.0
    assert m["confusion"] == (np.eye(7, dtype=int) * 3).tolist()
    assert m["absent_classes"] == []
    assert m["balanced_accuracy_ci"] == [1.0, 1.0]
    assert m["nll"] == pytest.approx(-math.log(0.95))


def test_random_predictions_near_chance():
    rng = np.random.default_rng(3)
    n = 6000
    probs = rng.dirichlet(np.ones(7), n)
    labels = rng.integers(0, 7, n)
    m = M.classification_metrics(probs, labels, HAM, n_bootstrap=0)
    assert m["balanced_accuracy"] == pytest.approx(1 / 7, abs=0.03)
    assert m["macro_auc"] == pytest.approx(0.5, abs=0.03)
    assert m["malignant_auc"] == pytest.approx(0.5, abs=0.03)
    assert "balanced_accuracy_ci" not in m


def test_balanced_accuracy_with_absent_class_hand_computed():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 0, 1, 1])  # class "c" absent
    preds = np.array([0, 0, 0, 1, 1, 2])  # recall a = 3/4, b = 1/2; predicts c once
    probs = np.eye(3)[preds] * 0.7 + 0.1
    m = M.classification_metrics(probs, labels, classes, n_bootstrap=20)
    assert m["absent_classes"] == ["c"]
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert set(m["recall"]) == {"a", "b"} and set(m["auc"]) == {"a", "b"}
    assert m["support"] == {"a": 4, "b": 2, "c": 0}
    assert m["specificity"]["c"] == pytest.approx(5 / 6)  # one false "c" among 6 negatives
    assert m["specificity"]["a"] == pytest.approx(1.0)  # b-cases never called a
    assert m["precision"]["b"] == pytest.approx(1 / 2)
    assert m["confusion"] == [[3, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert "melanoma_sensitivity" not in m  # no "mel" class in this task
    assert m["malignant_auc"] is None  # nothing malignant in these toy classes


def test_melanoma_absent_is_none_and_json_has_no_nan():
    labels = np.array([0, 1, 2, 3, 5, 6, 5, 5])  # no mel (index 4)
    probs, _ = _synthetic(n=8, seed=4)
    m = M.classification_metrics(probs, labels, HAM, n_bootstrap=30)
    assert m["melanoma_sensitivity"] is None
    assert "mel" in m["absent_classes"]
    text = json.dumps(m, allow_nan=False)  # raises on NaN / inf
    assert json.loads(text) == m


def test_binary_task_malignant_metrics_threshold():
    classes = list(BINARY_CLASSES)  # benign, malignant
    p_mal = np.array([0.9, 0.6, 0.4, 0.2, 0.55, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    probs = np.stack([1 - p_mal, p_mal], axis=1)
    m = M.classification_metrics(probs, labels, classes, n_bootstrap=50)
    assert m["malignant_sensitivity"] == pytest.approx(2 / 3)  # 0.9, 0.6 >= 0.5; 0.4 missed
    assert m["malignant_specificity"] == pytest.approx(2 / 3)  # 0.55 false alarm
    # pos {.9,.6,.4} vs neg {.2,.55,.1}: losses only .4<.55 -> 8/9
    assert m["malignant_auc"] == pytest.approx(8 / 9)
    assert m["auc"]["malignant"] == pytest.approx(8 / 9)
    lo, hi = m["malignant_auc_ci"]
    assert lo <= 8 / 9 <= hi


def test_malignant_sums_probabilities_over_malignant_classes():
    # akiec, bcc, mel are malignant; 0.2 + 0.2 + 0.2 = 0.6 >= 0.5 even though nv is argmax
    row = np.array([0.2, 0.2, 0.0, 0.0, 0.2, 0.4, 0.0])
    probs = np.stack([row, row])
    m = M.classification_metrics(probs, [4, 5], HAM, n_bootstrap=0)
    assert m["malignant_sensitivity"] == 1.0 and m["malignant_specificity"] == 0.0
    assert m["melanoma_sensitivity"] == 0.0


# --------------------------------------------------------------------------- calibration


def _two_clinics(low_scores):
    """Clinic "a": 20 melanomas scoring 0.9, 20 nevi at 0.05; clinic "b": 20 melanomas at `low_scores`,
    20 nevi at 0.02. The malignant score is the mel probability (column 4 of HAM's order)."""
    mel, nv = HAM.index("mel"), HAM.index("nv")
    scores = np.concatenate([np.full(20, 0.9), np.full(20, 0.05), low_scores, np.full(20, 0.02)])
    probs = np.zeros((80, len(HAM)))
    probs[:, mel], probs[:, nv] = scores, 1 - scores
    labels = np.array([mel] * 20 + [nv] * 20 + [mel] * 20 + [nv] * 20)
    return probs, labels, np.repeat(["a", "b"], 40)


def test_operating_point_flags_each_sources_melanomas_not_just_the_pooled_ones():
    from model.calibration import sensitive_threshold
    probs, labels, sources = _two_clinics(np.linspace(0.3, 0.6, 20))
    pooled, rule = sensitive_threshold(probs, labels, HAM)
    assert rule["rule"] == "pooled malignant"
    flagged_b = lambda t: (probs[40:60, HAM.index("mel")] >= t).mean()  # noqa: E731
    assert flagged_b(pooled) < 0.9   # clinic b's melanomas lose out to clinic a's
    threshold, rule = sensitive_threshold(probs, labels, HAM, sources)
    assert rule["rule"] == "per-source melanoma" and threshold < pooled and flagged_b(threshold) >= 0.9
    assert set(rule["per_source_melanoma_thresholds"]) == {"a", "b"}


def test_operating_point_keeps_the_pooled_threshold_when_per_source_would_flag_most_benign_lesions():
    from model.calibration import sensitive_threshold
    # clinic b's melanomas score below its own nevi: flagging 90% of them flags every nevus too
    probs, labels, sources = _two_clinics(np.linspace(0.0, 0.01, 20))
    pooled, _ = sensitive_threshold(probs, labels, HAM)
    threshold, rule = sensitive_threshold(probs, labels, HAM, sources)
    assert threshold == pooled and rule["rule"] == "pooled malignant"
    assert rule["per_source_melanoma_thresholds"]["b"] < pooled  # computed, then refused


def test_non_lesion_boundary_scores_pictures_like_its_non_lesions_above_lesions():
    from model import checkpoint
    from model.calibration import non_lesion_boundary
    from model.gate import non_lesion_score
    # Features along two directions: lesions near e0, known non-lesions near e1 (at any length: scored as unit rows).
    rng = np.random.default_rng(0)
    def around(axis, n, scale=1.0):
        x = rng.normal(0, 0.15, (n, 16))
        x[:, axis] += 1
        return scale * x
    lesions = around(0, 60)
    reference = lesions / np.linalg.norm(lesions, axis=1, keepdims=True)
    boundary = non_lesion_boundary(reference, around(1, 20, scale=7.0))
    assert boundary["non_lesions"] == 20 and checkpoint.unpack_array(boundary["weights"]).shape == (16,)
    gate = {"non_lesion": boundary}
    new_lesions, new_pictures = non_lesion_score(around(0, 50), gate), non_lesion_score(around(1, 50, 0.3), gate)
    assert new_lesions.max() < 0 < new_pictures.min()   # the decision value's sign is the side
    assert (non_lesion_score(around(0, 3), {}) == -np.inf).all()   # no boundary: nothing is on its far side


def test_a_per_source_quantile_threshold_lets_each_source_pass():
    from model.calibration import highest_source_quantile
    # Source b (few lesions) scores higher than a: a pooled quantile would fail most of b.
    score = np.r_[np.linspace(0, 1, 200), np.linspace(2, 3, 10)]
    sources = np.repeat(["a", "b"], [200, 10])
    assert np.quantile(score, 0.95) < 2
    threshold = highest_source_quantile(score, sources, 0.95)
    for name in ("a", "b"):
        assert (score[sources == name] <= threshold).mean() >= 0.9
    assert highest_source_quantile(score, None, 0.95) == pytest.approx(np.quantile(score, 0.95))


def _add_clinic(probs, labels, sources, name, melanoma_scores, nevus_scores):
    mel, nv = HAM.index("mel"), HAM.index("nv")
    scores = np.concatenate([melanoma_scores, nevus_scores])
    extra = np.zeros((len(scores), len(HAM)))
    extra[:, mel], extra[:, nv] = scores, 1 - scores
    return (np.concatenate([probs, extra]),
            np.concatenate([labels, [mel] * len(melanoma_scores) + [nv] * len(nevus_scores)]),
            np.concatenate([sources, [name] * len(scores)]))


def test_operating_point_protects_the_sources_it_can_afford_when_one_would_cost_too_much():
    from model.calibration import sensitive_threshold
    # b's melanomas need ~0.33 (affordable); two of c's ten score below its nevi: flagging 9 flags them all
    probs, labels, sources = _two_clinics(np.linspace(0.3, 0.6, 20))
    probs, labels, sources = _add_clinic(probs, labels, sources, "c", np.r_[np.full(8, 0.9), 0.0, 0.0],
                                         np.full(20, 0.02))
    pooled, _ = sensitive_threshold(probs, labels, HAM)
    threshold, rule = sensitive_threshold(probs, labels, HAM, sources)
    assert threshold < pooled
    assert rule["rule"] == "per-source melanoma" and rule["per_source_melanoma_thresholds"]["c"] < threshold
    assert threshold == rule["per_source_melanoma_thresholds"]["b"]
    assert (probs[40:60, HAM.index("mel")] >= threshold).mean() >= 0.9


def test_operating_point_refuses_a_threshold_that_flags_most_of_one_sources_benign_lesions():
    from model.calibration import sensitive_threshold
    # c's melanomas need ~0.18, which keeps the pooled specificity high but flags 3 in 4 of c's own nevi
    probs, labels, sources = _two_clinics(np.linspace(0.3, 0.6, 20))
    probs, labels, sources = _add_clinic(probs, labels, sources, "c", np.linspace(0.1, 0.9, 20),
                                         np.r_[np.full(15, 0.2), np.full(5, 0.02)])
    nevi = probs[labels == HAM.index("nv"), HAM.index("mel")]
    assert (nevi < 0.1).mean() >= 0.75     # the pooled specificity alone would allow it
    pooled, _ = sensitive_threshold(probs, labels, HAM)
    threshold, rule = sensitive_threshold(probs, labels, HAM, sources)
    assert rule["per_source_melanoma_thresholds"]["c"] < 0.2
    assert threshold == pooled > 0.2


def test_unusual_image_gate_flags_features_among_no_lesions_even_at_their_mean():
    from model.calibration import OOD_PASS_RATE, unusual_image_gate
    from model.gate import reference_distance

    # Lesions' features on a ring: their mean, the ring's centre, is near none of them (where a
    # class-mean distance scored noise and text pages as usual, docs/notebook/experiment-record.md).
    def lesions(n, seed):
        rng = np.random.default_rng(seed)
        angle = rng.uniform(0, 2 * np.pi, n)
        x = np.zeros((n, 8))
        x[:, 0], x[:, 1], x[:, 2] = 1.0, 0.5 * np.cos(angle), 0.5 * np.sin(angle)
        return x + rng.normal(0, 0.01, x.shape)

    val = lesions(3000, 0)
    gate, held_out = unusual_image_gate(val)
    reference = checkpoint.unpack_array(gate["reference"])
    assert reference.shape == (1024, 8) and held_out.sum() == 3000 - 1024
    assert np.allclose(np.linalg.norm(reference, axis=1), 1, atol=1e-3)
    threshold = np.quantile(reference_distance(val[held_out], gate), OOD_PASS_RATE)
    assert (reference_distance(lesions(500, 1), gate) <= threshold).mean() >= 0.95   # new lesions pass
    centre, elsewhere = val.mean(0, keepdims=True), np.random.default_rng(2).normal(size=(20, 8))
    assert (reference_distance(centre, gate) > 3 * threshold).all()
    assert (reference_distance(elsewhere, gate) > threshold).all()
    assert (reference_distance(elsewhere, {}) == 0).all()    # no reference, no distance gate
    assert unusual_image_gate(val[:1])[0] == {}              # nothing to split


def test_unusual_image_gate_draws_its_reference_evenly_from_the_sources():
    from model.calibration import OOD_REFERENCE_SIZE, unusual_image_gate
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2100, 8))
    sources = np.array(["big"] * 2000 + ["small"] * 100)
    gate, held_out = unusual_image_gate(features, sources)
    quota = OOD_REFERENCE_SIZE // 2
    # the small source gives half its lesions (its cap), the big one its quota, not 95% of the reference
    assert (~held_out[sources == "small"]).sum() == 50 and (~held_out[sources == "big"]).sum() == quota
    assert checkpoint.unpack_array(gate["reference"]).shape == (quota + 50, 8)
    assert unusual_image_gate(features[:3], ["a", "b", "c"])[0] == {}    # no source has two lesions


def test_prior_correction_refuses_a_model_trained_on_a_class_balanced_draw():
    from model.calibration import prior_correction
    from model.errors import UserError
    counts = {c: n for c, n in zip(HAM, (300, 500, 1000, 100, 1000, 6000, 100))}
    metadata = {"training": {"data": {"train_class_counts": counts}, "config": {"sampling": "uniform"}}}
    assert prior_correction(metadata, HAM, 0.5)["prior"]["nv"] == pytest.approx(6000 / 9000)
    metadata["training"]["config"]["sampling"] = "sources_malignancy"
    with pytest.raises(UserError, match="--sampling sources_malignancy.*without --prior_tau"):
        prior_correction(metadata, HAM, 0.5)
    assert prior_correction(metadata, HAM, 0) is None          # removing a correction is always allowed


def test_ece_perfectly_calibrated_is_near_zero_and_overconfident_is_not():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(40000, 5))
    probs = M.softmax(logits)
    labels = _sample_labels(rng, probs)  # labels drawn from the predicted distribution
    assert M.expected_calibration_error(probs, labels) < 0.015
    assert M.expected_calibration_error(M.softmax(logits * 3), labels) > 0.1


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins: {0.9, 0.9} acc 0.5 -> |0.5-0.9|*2; {0.6} acc 1 -> 0.4; {0.7} acc 1 -> 0.3
    assert M.expected_calibration_error(probs, labels) == pytest.approx((0.8 + 0.4 + 0.3) / 4)


def test_reliability_bins_structure():
    probs, labels = _synthetic(n=500, seed=6)
    rel = M.reliability_bins(probs, labels, n_bins=10)
    assert rel["edges"].shape == (11,) and rel["count"].sum() == 500
    filled = rel["count"] > 0
    assert np.all(np.isnan(rel["accuracy"][~filled]))
    assert np.all((rel["confidence"][filled] >= rel["edges"][:-1][filled]) &
                  (rel["confidence"][filled] <= rel["edges"][1:][filled]))
    ones = np.array([[1.0, 0.0]])
    assert M.reliability_bins(ones, [0], n_bins=15)["count"][-1] == 1  # p == 1 in last bin


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(7)
    true_logits = rng.normal(scale=2.0, size=(20000, 7))
    labels = _sample_labels(rng, M.softmax(true_logits))
    for t in (0.5, 2.5):
        fitted = M.fit_temperature(true_logits * t, labels)  # model logits scaled by t
        assert fitted == pytest.approx(t, rel=0.1)
    assert 0.05 <= M.fit_temperature(np.zeros((10, 3)), np.zeros(10, int)) <= 20


def test_softmax():
    p = M.softmax([[1000.0, 1000.0, -1000.0]])
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(M.softmax([[0.0, math.log(3)]], temperature=1.0), [[0.25, 0.75]])
    np.testing.assert_allclose(M.softmax([[0.0, 2 * math.log(3)]], temperature=2.0), [[0.25, 0.75]])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n in (200, 3000):
        probs, labels = _synthetic(n=n, seed=8)
        point = M.balanced_accuracy(probs, labels)
        lo, hi = M.bootstrap_ci(probs, labels, M.balanced_accuracy, n=500, seed=0)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 15x data -> ~3.9x narrower


def test_bootstrap_batched_matches_plain_loop_and_is_seeded():
    probs, labels = _synthetic(n=150, k=4, seed=9)
    probs = probs.round(2)  # ties exercise the tie handling
    for fn in (M.balanced_accuracy, M.macro_auc):
        fast = M.bootstrap_ci(probs, labels, fn, n=100, seed=4)
        slow = M.bootstrap_ci(probs, labels, lambda p, y, fn=fn: fn(p, y), n=100, seed=4)
        assert fast == pytest.approx(slow)
    assert M.bootstrap_ci(probs, labels, M.macro_auc, n=50, seed=1) == \
        M.bootstrap_ci(probs, labels, M.macro_auc, n=50, seed=1)


def test_bootstrap_is_fast():
    probs, labels = _synthetic(n=1500, seed=10)
    start = time.perf_counter()
    M.bootstrap_ci(probs, labels, M.balanced_accuracy, n=1000)
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- subgroups


@pytest.mark.parametrize("age, band", [(0, "0-29"), (29.9, "0-29"), (30, "30-44"), (44, "30-44"),
                                       (45, "45-59"), (60, "60-74"), (74, "60-74"), (75, "75+"),
                                       (90.0, "75+"), ("50", "45-59"), (None, "unknown"),
                                       (float("nan"), "unknown"), ("", "unknown"),
                                       ("abc", "unknown"), (-1, "unknown")])
def test_age_band(age, band):
    assert M.age_band(age) == band


def test_subgroup_metrics_with_missing_values():
    labels = np.array([4, 5, 4, 5, 1, 2, 4, 5])
    preds = np.array([4, 5, 5, 5, 1, 2, 4, 4])
    probs = np.eye(7)[preds] * 0.93 + 0.01
    sex = ["male", "male", "female", "female", None, float("nan"), "male", ""]
    ages = [25, 50, None, 80, 40, 41, 62, "unknown"]
    sub = M.subgroup_metrics(probs, labels, HAM, {"sex": sex, "age_band": [M.age_band(a) for a in ages]})
    assert list(sub["sex"]) == ["male", "female", "unknown"]  # by size, unknown last
    male = sub["sex"]["male"]
    assert male["n"] == 3 and male["accuracy"] == pytest.approx(1.0)
    assert male["malignant_auc"] == pytest.approx(1.0)
    female = sub["sex"]["female"]  # mel called nv: recall mel 0, nv 1
    assert female["balanced_accuracy"] == pytest.approx(0.5) and female["malignant_sensitivity"] == 0.0
    unknown = sub["sex"]["unknown"]  # bcc ok, bkl ok, nv -> mel
    assert unknown["n"] == 3 and unknown["accuracy"] == pytest.approx(2 / 3)
    assert sub["age_band"]["75+"]["malignant_auc"] is None  # only benign there: undefined
    assert sub["age_band"]["unknown"]["n"] == 2
    json.dumps(sub, allow_nan=False)


def test_subgroup_length_mismatch_raises():
    probs, labels = _synthetic(n=10)
    with pytest.raises(ValueError):
        M.subgroup_metrics(probs, labels, HAM, {"sex": ["m"] * 9})


# --------------------------------------------------------------------------- report


def test_write_report_files_images_and_json(tmp_path):
    from PIL import Image

    from model.report import plot_learning_curves, write_report

    probs, labels = _synthetic(n=300, seed=11)
    labels[labels == 3] = 5  # make "df" absent
    m = M.classification_metrics(probs, labels, HAM, n_bootstrap=100)
    rng = np.random.default_rng(0)
    m["subgroups"] = M.subgroup_metrics(probs, labels, HAM, {
        "sex": rng.choice(["male", "female", None], 300).tolist(),
        "age_band": [M.age_band(a) for a in rng.choice([20, 50, 70, np.nan], 300)]})
    m["temperature"] = 1.3
    paths = write_report(tmp_path / "out", m, probs, labels, HAM, title="Test run",
                         extra_sections={"Notes": "Synthetic data."})
    names = {p.name for p in paths}
    assert names == {"metrics.json", "report.md", "confusion_matrix.png", "roc_curves.png", "reliability.png"}
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    raw = (tmp_path / "out" / "metrics.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    loaded = json.loads(raw)
    assert loaded["absent_classes"] == ["df"] and loaded["auc"].get("df") is None
    md = (tmp_path / "out" / "report.md").read_text()
    for needle in ("# Test run", "Melanoma", "Dermatofibroma", "Absent classes", "Malignant vs benign",
                   "ECE", "Subgroups", "### sex", "unknown", "Synthetic data.", "reliability.png", "1.300"):
        assert needle in md, needle

    lc = plot_learning_curves([
        {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5, "val_loss": 1.3, "val_accuracy": None},
        {"epoch": 2, "train_loss": 0.9, "train_accuracy": 0.6, "train_balanced_accuracy": 0.4,
         "val_loss": 1.1, "val_accuracy": 0.55, "val_balanced_accuracy": 0.45},
    ], tmp_path / "curves" / "learning_curves.png")
    with Image.open(lc) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_write_report_binary_task(tmp_path):
    from PIL import Image

    from model.report import write_report

    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, 200)
    p_mal = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 200), 0, 1)
    probs = np.stack([1 - p_mal, p_mal], axis=1)
    m = M.classification_metrics(probs, labels, BINARY_CLASSES, n_bootstrap=50)
    paths = write_report(tmp_path, m, probs, labels, BINARY_CLASSES, title="Binary")
    assert len(paths) == 5
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
    assert "Malignant vs benign" in (tmp_path / "report.md").read_text()


def test_threshold_for_sensitivity_flags_the_target_share_of_positives():
    rng = np.random.default_rng(0)
    score = rng.random(200)
    positives = rng.random(200) < 0.3
    for target in (0.5, 0.9, 1.0):
        t = M.threshold_for_sensitivity(score, positives, target)
        flagged = score >= t
        assert flagged[positives].mean() >= target
        # The highest such threshold: one notch higher misses the target.
        assert (score[positives] > t).mean() < target
    assert math.isnan(M.threshold_for_sensitivity(score, np.zeros(200, bool), 0.9))


def test_operating_point_counts_sensitivity_specificity_and_melanomas():
    classes = list(HAM_CLASSES)
    mel, nv, bcc = classes.index("mel"), classes.index("nv"), classes.index("bcc")
    probs = np.full((4, 7), 0.0)
    probs[0, mel] = 0.3; probs[0, nv] = 0.7   # melanoma, malignant score 0.3
    probs[1, bcc] = 0.9; probs[1, nv] = 0.1   # bcc, 0.9
    probs[2, mel] = 0.25; probs[2, nv] = 0.75  # naevus, 0.25
    probs[3, nv] = 1.0                          # naevus, 0.0
    labels = np.array([mel, bcc, nv, nv])
    point = M.operating_point(probs, labels, classes, 0.2)
    assert point == {"threshold": 0.2, "malignant_sensitivity": 1.0, "malignant_specificity": 0.5,
                     "melanoma_flagged": 1.0}
    assert M.operating_point(probs, labels, classes, 0.5)["melanoma_flagged"] == 0.0
    out = M.classification_metrics(probs, labels, classes, n_bootstrap=0, operating_threshold=0.2)
    assert out["operating_point"]["malignant_specificity"] == 0.5
    assert "operating_point" not in M.classification_metrics(probs, labels, classes, n_bootstrap=0)


@pytest.mark.slow
def test_prior_correction_bench_on_prediction_files(tmp_path):
    """bench/experiments/prior_correction.py reads a split file and evaluate's predictions.csv from disk."""
    import subprocess
    split = tmp_path / "split.csv"
    split.write_text("path,split,dx\n" + "".join(f"t{i}.jpg,train,{'mel' if i < 2 else 'nv'}\n" for i in range(10))
                     + "v0.jpg,val,mel\n")
    predictions = tmp_path / "predictions.csv"
    # Melanomas score 0.4 (below nv's 0.6): the plain arg-max misses them all; dividing by the
    # training prior (mel 0.2, nv 0.8) recovers them without losing the confident naevi.
    predictions.write_text("path,label,prediction,malignant_probability,mel,nv\n"
                           "a.jpg,mel,nv,0.4,0.4,0.6\nb.jpg,mel,nv,0.4,0.4,0.6\n"
                           "c.jpg,nv,nv,0.1,0.1,0.9\nd.jpg,nv,nv,0.1,0.1,0.9\n")
    script = Path(__file__).resolve().parents[1] / "bench" / "experiments" / "prior_correction.py"
    out = subprocess.run([sys.executable, str(script), str(split), str(predictions)],
                         capture_output=True, text=True, check=True).stdout
    assert "tau 0.0: 0.5000" in out and "tau 1.0: 1.0000" in out


def _write_predictions(path, rows):
    path.write_text("path,label,prediction,malignant_probability,mel,nv\n"
                    + "".join(f"{name},{label},x,{mel},{mel},{1 - mel}\n" for name, label, mel in rows))
    return path


@pytest.mark.slow
def test_ensemble_bench_averages_members(tmp_path):
    """bench/experiments/ensemble.py: each member misses a different melanoma; their mean finds both."""
    import subprocess
    nv = [("c.jpg", "nv", 0.1), ("d.jpg", "nv", 0.1)]
    first = _write_predictions(tmp_path / "a.csv", [("a.jpg", "mel", 0.9), ("b.jpg", "mel", 0.45), *nv])
    second = _write_predictions(tmp_path / "b.csv", [("a.jpg", "mel", 0.45), ("b.jpg", "mel", 0.9), *nv])
    script = Path(__file__).resolve().parents[1] / "bench" / "experiments" / "ensemble.py"
    out = subprocess.run([sys.executable, str(script), str(first), str(second)],
                         capture_output=True, text=True, check=True).stdout
    members, ensemble = out.split("ensemble of 2")
    assert members.count("balanced acc 0.7500") == 2
    assert "balanced acc 1.0000" in ensemble

    other_images = _write_predictions(tmp_path / "c.csv", [("z.jpg", "mel", 0.9), ("b.jpg", "mel", 0.45), *nv])
    refused = subprocess.run([sys.executable, str(script), str(first), str(other_images)],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "not the same images" in refused.stderr


def test_peer_cuda_only_moves_the_peer_to_a_device(peer_script):
    """bench/peer_cuda.py: every edit matches the peer once, and the patched peer still compiles."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import peer_cuda
    finally:
        sys.path.pop(0)
    source = peer_script.read_text()
    patched = peer_cuda.patched_source(source)
    compile(patched, str(peer_script), "exec")
    assert all(new in patched for _, new in peer_cuda.EDITS)
    # Only device placement changed: removing ".to(DEVICE)" and ".cpu()" gives the peer back.
    assert patched.replace(".to(DEVICE)", "").replace(".cpu()", "").replace(
        "(weight / weight.mean())", "weight / weight.mean()") == source
    with pytest.raises(SystemExit, match="has changed"):
        peer_cuda.patched_source(source.replace("net = make_net()\n", "net = build()\n"))


# --------------------------------------------------------------------------- against scikit-learn / SciPy
# The bundled model's predictions on the 600 ISIC 2017 test images (tests/data/; the official ISIC
# scorer is checked in test_official_scorer.py).

REAL_PREDICTIONS = Path(__file__).parent / "data" / "predictions_isic2017_test_default.csv"


@pytest.fixture(scope="module")
def real():
    from model.evaluate import read_predictions

    _, probs, classes, labels = read_predictions(REAL_PREDICTIONS)
    return probs, labels, list(classes)


@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_equal_sklearn_on_real_predictions(real):
    from sklearn import metrics as skm
    from sklearn.calibration import calibration_curve

    probs, labels, classes = real
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    m = M.classification_metrics(probs, labels, classes, n_bootstrap=0)
    assert m["confusion"] == skm.confusion_matrix(labels, preds, labels=range(len(classes))).tolist()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds), abs=1e-12)
    recall = skm.recall_score(labels, preds, labels=present, average=None)
    precision = skm.precision_score(labels, preds, labels=present, average=None, zero_division=np.nan)
    aucs = [skm.roc_auc_score(labels == k, probs[:, k]) for k in present]
    for j, k in enumerate(present):
        c = classes[k]
        assert m["recall"][c] == pytest.approx(recall[j], abs=1e-12)
        assert m["auc"][c] == pytest.approx(aucs[j], abs=1e-12)
        if not np.isnan(precision[j]):
            assert m["precision"][c] == pytest.approx(precision[j], abs=1e-12)
        fpr, tpr, thr = M.roc_curve(probs[:, k], labels == k)
        ref = skm.roc_curve(labels == k, probs[:, k], drop_intermediate=False)
        for ours, theirs in zip((fpr, tpr, thr), ref):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert set(m["auc"]) == {classes[k] for k in present}
    assert m["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    malignant = M.resolve_malignant(classes)
    assert m["malignant_auc"] == pytest.approx(
        skm.roc_auc_score(np.isin(labels, malignant), probs[:, malignant].sum(axis=1)), abs=1e-12)
    # Rows of the CSV sum to 1 only to 2e-6, which some scikit-learn releases renormalise.
    assert m["nll"] == pytest.approx(skm.log_loss(labels, probs, labels=range(len(classes))), abs=1e-5)
    # Reliability bins: no confidence here lies on a bin edge, where calibration_curve's (a, b] bins
    # would differ from our [a, b) ones; its bins are the non-empty ones.
    rel = M.reliability_bins(probs, labels)
    filled = rel["count"] > 0
    accuracy, confidence = calibration_curve(preds == labels, probs.max(axis=1), n_bins=M.ECE_BINS)
    np.testing.assert_allclose(rel["accuracy"][filled], accuracy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rel["confidence"][filled], confidence, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_vectorised_bootstrap_equals_sklearn_per_resample_on_real_predictions(real):
    """The hand-written batched metrics (kept for speed) against scikit-learn, resample by resample."""
    from sklearn import metrics as skm

    probs, labels, classes = real
    malignant = M.resolve_malignant(classes)
    idx = np.random.default_rng(0).integers(0, labels.size, size=(25, labels.size))
    idx[0, :100] = idx[0, 0]  # one image drawn 100 times
    ba = M.balanced_accuracy.batched(probs, labels, idx)
    ma = M.macro_auc.batched(probs, labels, idx)
    mal = M.malignant_auc_fn(classes).batched(probs, labels, idx)
    for b, rows in enumerate(idx):
        p, y = probs[rows], labels[rows]
        assert ba[b] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(axis=1)), abs=1e-12)
        assert ma[b] == pytest.approx(np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in np.unique(y)]), abs=1e-12)
        assert mal[b] == pytest.approx(skm.roc_auc_score(np.isin(y, malignant), p[:, malignant].sum(axis=1)), abs=1e-12)


def test_bootstrap_ci_equals_scipy_percentile_bootstrap_on_real_predictions(real):
    """Same draws and percentiles as scipy.stats.bootstrap; ours only differs by dropping undefined resamples."""
    import inspect

    import scipy.stats

    probs, labels, classes = real
    seed_kw = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"
    for fn in (M.balanced_accuracy, M.macro_auc, M.malignant_auc_fn(classes)):
        ours = M.bootstrap_ci(probs, labels, fn, n=1000, seed=0)
        res = scipy.stats.bootstrap((np.arange(labels.size),), lambda i, axis=-1, fn=fn: fn.batched(probs, labels, i),
                                    vectorized=True, n_resamples=1000, method="percentile", confidence_level=0.95,
                                    **{seed_kw: np.random.default_rng(0)})
        assert ours == pytest.approx(tuple(res.confidence_interval), abs=1e-12)


def test_single_class_and_empty_inputs_stay_nan_without_warnings():
    import warnings

    probs, _ = _synthetic(n=20, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = np.full(20, 4)
        assert math.isnan(M.roc_auc(probs[:, 4], labels == 4))
        fpr, tpr, _ = M.roc_curve(probs[:, 4], labels == 4)
        assert np.all(np.isnan(fpr)) and not np.any(np.isnan(tpr))
        assert math.isnan(M.macro_auc(probs, labels))  # the one present class has no negatives
        assert M.balanced_accuracy(np.eye(7)[labels], labels) == 1.0
        assert M.balanced_accuracy(probs, labels) == np.mean(probs.argmax(axis=1) == 4)
        empty = np.zeros((0, 7))
        assert math.isnan(M.balanced_accuracy(empty, [])) and math.isnan(M.macro_auc(empty, []))
        assert M.confusion_matrix([], [], 7).shape == (7, 7)
        fpr, tpr, thr = M.roc_curve([], [])
        assert np.isnan(fpr).all() and np.isnan(tpr).all() and list(thr) == [np.inf]
