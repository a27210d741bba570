"""Evaluation metrics: discrimination, calibration, bootstrap CIs and subgroups.

Built on scikit-learn (`sklearn.metrics`: confusion matrix, ROC curve, ROC AUC, balanced
accuracy) and SciPy (softmax). What is still written here has a measured reason, given
where it is: the vectorised bootstrap core, the reliability bins / ECE, the NLL's clipping
and the temperature search. tests/test_metrics.py checks each against scikit-learn / SciPy
on the real predictions file in tests/data/.

Conventions used throughout:
- `probs` is an (n, K) array of class probabilities, `labels` an (n,) array of int class
  indices into `classes` (the task's class codes, in logit order).
- A class with no example in `labels` is *absent*: its recall and AUC are undefined, it
  is left out of the balanced accuracy and macro AUC, and it is listed in
  `absent_classes` (reported, never an error).
- Functions returning scalars return NaN when undefined (checked here, before scikit-learn,
  whose own handling of single-class input differs between versions and warns);
  `classification_metrics` and `subgroup_metrics` return plain JSON-serialisable Python
  values with NaN as None.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import scipy.special
import sklearn.metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from model.classes import malignant_indices

ECE_BINS = 15
MALIGNANT_THRESHOLD = 0.5
AGE_BANDS = ("0-29", "30-44", "45-59", "60-74", "75+")
UNKNOWN = "unknown"


# --------------------------------------------------------------------------- basics


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature` (float64, numerically stable)."""
    return scipy.special.softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


def _as_inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (n, K) and labels (n,); got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]})")
    return probs, labels


def to_jsonable(obj):
    """Recursively turn numpy scalars/arrays into Python values, NaN/inf into None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(K, K) int counts; rows are true classes, columns predicted classes (scikit-learn's)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if labels.size == 0:  # scikit-learn refuses empty input
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes)).astype(np.int64)


def negative_log_likelihood(probs, labels, eps: float = 1e-12) -> float:
    """Mean -log p(true class), probabilities clipped at `eps`.

    Kept rather than `sklearn.metrics.log_loss`: that clips at machine epsilon (2.2e-16), so
    a true-class probability of 0 scores 36.0 there and 27.6 (-log 1e-12) here, and
    scikit-learn releases differ on rows that do not sum to 1 (CSV rounding). Without such
    rows the two agree (the tests check it on the real predictions file).
    """
    probs, labels = _as_inputs(probs, labels)
    if labels.size == 0:
        return float("nan")
    p = probs[np.arange(labels.size), labels]
    return float(-np.mean(np.log(np.clip(p, eps, 1.0))))


# --------------------------------------------------------------------------- AUC / ROC


def _both_classes(positives: np.ndarray) -> bool:
    return bool(positives.any() and (~positives).any())


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve of `scores` for the boolean `positives` (scikit-learn's
    `roc_auc_score`).

    Equals P(score of a random positive > score of a random negative), ties counting 1/2.
    NaN when there is no positive or no negative.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if not _both_classes(positives):
        return float("nan")
    return float(skm.roc_auc_score(positives, scores))


def roc_curve(scores, positives) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for predicting positive when score >= threshold (scikit-learn's
    `roc_curve` with every threshold kept).

    Thresholds are the distinct scores in decreasing order, preceded by +inf so the
    curve starts at (0, 0) and ends at (1, 1). tpr is NaN without positives and fpr
    NaN without negatives.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.size == 0:  # scikit-learn refuses empty input
        return np.full(1, np.nan), np.full(1, np.nan), np.full(1, np.inf)
    with warnings.catch_warnings():  # NaN tpr / fpr for a missing class is our convention too
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = skm.roc_curve(positives, scores, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


# --------------------------------------------------------------------------- metric functions
# Each takes (probs, labels) and returns a float; `.batched(probs, labels, idx)` evaluates
# it on many resamples at once (idx: (B, n) row indices), used by `bootstrap_ci`.
#
# The batched versions are our own vectorised code, kept because scoring resamples one by one
# with scikit-learn is 50-150x slower. Measured with 1000 resamples on this 2-core CPU, under
# load (a training job on both cores), vectorised vs a loop of sklearn calls:
#   ISIC 2017 test predictions (n=600, K=7): balanced accuracy 0.020 s vs 2.9 s,
#     macro AUC 0.17 s vs 19.8 s, malignant AUC 0.029 s vs 4.2 s;
#   synthetic n=1500, K=7: balanced accuracy 0.037 s vs 2.6 s, macro AUC 0.51 s vs 61.8 s,
#     malignant AUC 0.084 s vs 4.3 s
# (an evaluation computes all three: ~0.2 s vs ~27 s on the ISIC test set). The intervals
# were equal to 1e-16. tests/test_metrics.py checks the batched values against scikit-learn
# resample by resample on the real predictions file.


def _weighted_auc(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for each row of `weights` (B, n): sample multiplicities.

    Ties between a positive and a negative count one half. NaN where a row has no
    positive or no negative weight. Scores are sorted once and shared by all rows,
    which is what makes the bootstrap fast.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    pos = positives[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups (ascending score)
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w, starts, axis=1) - wp
    neg_below = np.cumsum(wn, axis=1) - wn
    n_pos = wp.sum(axis=1)
    n_neg = wn.sum(axis=1)
    num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = num / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _present_recall(preds: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(B, K) recall per resample and class, NaN for classes absent from the resample."""
    b = np.arange(labels.shape[0])[:, None] * k
    total = np.bincount((b + labels).ravel(), minlength=labels.shape[0] * k).reshape(-1, k)
    hits = np.bincount((b + labels).ravel(), weights=(preds == labels).ravel(),
                       minlength=labels.shape[0] * k).reshape(-1, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / total, np.nan)


def _nanmean(values) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    count = np.sum(~np.isnan(x), axis=1)
    total = np.nansum(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def balanced_accuracy(probs, labels) -> float:
    """Mean recall over the classes present in `labels` (argmax prediction; scikit-learn's
    `balanced_accuracy_score`, which leaves out classes predicted but absent from `labels`)."""
    probs, labels = _as_inputs(probs, labels)
    if labels.size == 0:
        return float("nan")
    with warnings.catch_warnings():  # an absent class predicted, or a single class: expected here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(skm.balanced_accuracy_score(labels, probs.argmax(axis=1)))


def _balanced_accuracy_batched(probs, labels, idx):
    preds = probs.argmax(axis=1)
    return _nanmean_rows(_present_recall(preds[idx], labels[idx], probs.shape[1]))


balanced_accuracy.batched = _balanced_accuracy_batched


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) multiplicity of each sample in each resample."""
    b = np.arange(idx.shape[0])[:, None] * n
    return np.bincount((b + idx).ravel(), minlength=idx.shape[0] * n).reshape(-1, n).astype(np.float64)


def _class_aucs_batched(probs, labels, idx) -> np.ndarray:
    """(B, K) one-vs-rest AUC per resample and class (NaN where undefined)."""
    w = _counts(idx, labels.size)
    return np.stack([_weighted_auc(probs[:, k], labels == k, w) for k in range(probs.shape[1])], axis=1)


def macro_auc(probs, labels) -> float:
    """Mean one-vs-rest AUC over the classes present in `labels` (those whose AUC is defined)."""
    probs, labels = _as_inputs(probs, labels)
    return _nanmean([roc_auc(probs[:, k], labels == k) for k in np.unique(labels)])


def _macro_auc_batched(probs, labels, idx):
    return _nanmean_rows(_class_aucs_batched(probs, labels, idx))


macro_auc.batched = _macro_auc_batched


def malignant_split(probs, labels, classes, malignant=None) -> tuple[np.ndarray, np.ndarray] | None:
    """(summed malignant probability, label is malignant) per image; None when no class or every
    class is malignant (the task asks no malignant-vs-benign question)."""
    mal = resolve_malignant(classes, malignant)
    if not mal or len(mal) == len(list(classes)):
        return None
    return np.asarray(probs, dtype=np.float64)[:, mal].sum(axis=1), np.isin(labels, mal)


def resolve_malignant(classes, malignant=None) -> list[int]:
    """Malignant class indices: `malignant` (indices or codes) or classes.malignant_indices."""
    if malignant is None:
        return malignant_indices(classes)
    classes = list(classes)
    return sorted({classes.index(m) if isinstance(m, str) else int(m) for m in malignant})


def malignant_auc_fn(classes, malignant=None) -> Callable:
    """A (probs, labels) -> malignant-vs-benign AUC metric, with `.batched` for bootstrap."""
    mal = resolve_malignant(classes, malignant)

    def fn(probs, labels):
        probs, labels = _as_inputs(probs, labels)
        return roc_auc(probs[:, mal].sum(axis=1), np.isin(labels, mal))

    def batched(probs, labels, idx):
        return _weighted_auc(probs[:, mal].sum(axis=1), np.isin(labels, mal), _counts(idx, labels.size))

    fn.batched = batched
    return fn


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(probs, labels, metric_fn: Callable, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `metric_fn(probs, labels)`.

    Resamples rows with replacement `n` times. If `metric_fn` has a `.batched(probs,
    labels, idx)` attribute (as `balanced_accuracy`, `macro_auc` and
    `malignant_auc_fn(...)` do) all resamples are scored in a few vectorised passes;
    otherwise `metric_fn` is called once per resample. Resamples where the metric is
    undefined (NaN) are dropped; (nan, nan) if none is defined or there is no data.

    The draws and the interval are those of `scipy.stats.bootstrap(..., method="percentile")`
    with the same generator (the tests check the two agree on the real predictions file), but
    SciPy's interval is NaN as soon as one resample is undefined (e.g. a small subgroup
    resample without a malignant case), where ours drops that resample; hence this loop.
    """
    probs, labels = _as_inputs(probs, labels)
    m = labels.size
    if m == 0 or n <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    batched = getattr(metric_fn, "batched", None)
    values = []
    chunk = max(1, min(n, 2_000_000 // m))  # bound the (chunk, m) index arrays
    done = 0
    while done < n:
        b = min(chunk, n - done)
        idx = rng.integers(0, m, size=(b, m))
        if batched is not None:
            values.append(np.asarray(batched(probs, labels, idx), dtype=np.float64))
        else:
            values.append(np.array([metric_fn(probs[i], labels[i]) for i in idx], dtype=np.float64))
        done += b
    v = np.concatenate(values)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --------------------------------------------------------------------------- calibration


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> dict:
    """Per-bin data for a reliability diagram, binning the max probability.

    Bins are equal-width on [0, 1] (a confidence of exactly 1 goes in the last bin).
    Returns numpy arrays `edges` (n_bins + 1), `confidence` and `accuracy` (mean per bin,
    NaN where empty), `count` (ints), and the float `ece`.

    Kept rather than `sklearn.calibration.calibration_curve`, which has no counts and no ECE,
    drops empty bins, and puts a confidence on a bin edge in the lower bin ((a, b] bins: 0.6
    falls in bin 8 of 15 there, bin 9 here), so it would change the ECE of rounded
    probabilities. Away from the edges the per-bin means are equal (tested on real predictions).
    """
    probs, labels = _as_inputs(probs, labels)
    conf = probs.max(axis=1) if labels.size else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64) if labels.size else np.zeros(0)
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, acc_sum / count, np.nan)
    ece = float(np.abs(acc_sum - conf_sum).sum() / labels.size) if labels.size else float("nan")
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "confidence": mean_conf,
            "accuracy": mean_acc, "count": count, "ece": ece}


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width max-prob bins of (bin share) * |accuracy - confidence|."""
    return reliability_bins(probs, labels, n_bins)["ece"]


def fit_temperature(logits, labels, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature T in [lo, hi] minimising the NLL of softmax(logits / T).

    A 1-D search on log T: a coarse grid, then golden-section refinement inside the
    bracket around the best grid point (the NLL is unimodal in log T). Returns 1.0
    when there is no data.

    Kept rather than `scipy.optimize.minimize_scalar(method="bounded")` on log T: measured on
    the real predictions file and six random sets, SciPy's temperature differed by up to
    2.4e-6 (xatol 1e-8; 4.0e-6 with xatol 1e-5), above the 1e-6 we allow for a change of
    method, and on a flat NLL (all-zero logits) SciPy returns T = 20.0 where this returns 0.058.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.size == 0:
        return 1.0
    logits = logits - logits.max(axis=1, keepdims=True)
    true = logits[np.arange(labels.size), labels]

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        return float(np.mean(lse - true / math.exp(log_t)))

    grid = np.linspace(math.log(lo), math.log(hi), 41)
    vals = [nll(g) for g in grid]
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


# --------------------------------------------------------------------------- summaries


def _binary_rates(score: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of `score >= threshold`; NaN where undefined."""
    flagged = score >= threshold
    sens = float(flagged[positives].mean()) if positives.any() else float("nan")
    spec = float((~flagged[~positives]).mean()) if (~positives).any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(score, positives, target: float) -> float:
    """The highest threshold at which `score >= threshold` still flags `target` of the positives."""
    ranked = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(positives, bool)])[::-1]
    if ranked.size == 0:
        return float("nan")
    return float(ranked[int(np.ceil(target * ranked.size)) - 1])


def operating_point(probs, labels, classes, threshold: float, malignant=None) -> dict | None:
    """What flagging `malignant score >= threshold` catches: malignant sensitivity and specificity,
    and the share of melanomas flagged (None when the task has no malignant/benign split)."""
    split = malignant_split(probs, labels, classes, malignant)
    if split is None:
        return None
    score, positives = split
    sens, spec = _binary_rates(score, positives, threshold)
    point = {"threshold": float(threshold), "malignant_sensitivity": sens, "malignant_specificity": spec}
    if "mel" in classes:
        melanoma = labels == list(classes).index("mel")
        point["melanoma_flagged"] = float((score[melanoma] >= threshold).mean()) if melanoma.any() else float("nan")
    return point


def _malignant_block(probs, labels, classes, malignant) -> dict:
    """malignant_auc / sensitivity / specificity (None when the task has no such split)."""
    split = malignant_split(probs, labels, classes, malignant)
    if split is None:
        return {"malignant_auc": None, "malignant_sensitivity": None, "malignant_specificity": None}
    score, positives = split
    sens, spec = _binary_rates(score, positives, MALIGNANT_THRESHOLD)
    return {"malignant_auc": roc_auc(score, positives), "malignant_sensitivity": sens,
            "malignant_specificity": spec, "malignant_n": int(positives.sum()),
            "benign_n": int((~positives).sum())}


def classification_metrics(probs, labels, classes, *, malignant=None, n_bootstrap: int = 1000,
                           seed: int = 0, alpha: float = 0.05, operating_threshold: float | None = None) -> dict:
    """All headline metrics for one evaluation, JSON-ready (NaN -> None).

    `malignant`: indices or codes of the malignant classes (default:
    `classes.malignant_indices(classes)`). `n_bootstrap` resamples for the CIs
    (0 disables them). Keys: n, accuracy, balanced_accuracy(_ci), macro_auc(_ci),
    recall / auc (present classes), specificity / precision (where defined), support
    (all classes), absent_classes, melanoma_sensitivity (when "mel" is a class),
    malignant_auc(_ci) / malignant_sensitivity / malignant_specificity (summed
    malignant probability >= 0.5), malignant_threshold, ece, nll, confusion, and with
    `operating_threshold` (a checkpoint's high-sensitivity threshold) an `operating_point` entry.
    """
    probs, labels = _as_inputs(probs, labels)
    classes = list(classes)
    k = len(classes)
    if probs.shape[1] != k:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {k} classes")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, k)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    n = int(labels.size)
    present = [i for i in range(k) if support[i] > 0]

    recall, specificity, precision, auc = {}, {}, {}, {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        negatives = n - support[i]
        if support[i]:
            recall[c] = tp / support[i]
            auc[c] = roc_auc(probs[:, i], labels == i)
        if negatives:
            specificity[c] = (negatives - (predicted[i] - tp)) / negatives
        if predicted[i]:
            precision[c] = tp / predicted[i]

    out = {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "balanced_accuracy": balanced_accuracy(probs, labels),
        "macro_auc": _nanmean([auc[classes[i]] for i in present]),
        "recall": recall,
        "specificity": specificity,
        "precision": precision,
        "auc": auc,
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "absent_classes": [c for i, c in enumerate(classes) if support[i] == 0],
    }
    if "mel" in classes:
        out["melanoma_sensitivity"] = recall.get("mel", float("nan"))
    out.update(_malignant_block(probs, labels, classes, malignant))
    out["malignant_threshold"] = MALIGNANT_THRESHOLD
    if operating_threshold is not None:
        out["operating_point"] = operating_point(probs, labels, classes, operating_threshold, malignant)
    if n_bootstrap > 0 and n:
        kw = dict(n=n_bootstrap, seed=seed, alpha=alpha)
        out["balanced_accuracy_ci"] = list(bootstrap_ci(probs, labels, balanced_accuracy, **kw))
        out["macro_auc_ci"] = list(bootstrap_ci(probs, labels, macro_auc, **kw))
        if out["malignant_auc"] is not None:
            out["malignant_auc_ci"] = list(bootstrap_ci(probs, labels, malignant_auc_fn(classes, malignant), **kw))
        out["ci_level"] = 1 - alpha
        out["bootstrap_n"] = n_bootstrap
    out["ece"] = expected_calibration_error(probs, labels)
    out["nll"] = negative_log_likelihood(probs, labels)
    out["confusion"] = cm.tolist()
    return to_jsonable(out)


# --------------------------------------------------------------------------- subgroups


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", "unknown", "na", "n/a")


def _group_key(value) -> str:
    if _is_missing(value):
        return UNKNOWN
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def age_band(age) -> str:
    """'0-29' / '30-44' / '45-59' / '60-74' / '75+', or 'unknown' for missing or invalid ages."""
    if _is_missing(age) or isinstance(age, bool):
        return UNKNOWN
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(a) or a < 0:
        return UNKNOWN
    for upper, band in zip((30, 45, 60, 75), AGE_BANDS):
        if a < upper:
            return band
    return AGE_BANDS[-1]


def _ordered_keys(keys: np.ndarray) -> list[str]:
    """Age bands in age order, other values by decreasing count; "unknown" always last."""
    found = set(keys.tolist())
    if found - {UNKNOWN} <= set(AGE_BANDS):
        rank = {b: i for i, b in enumerate(AGE_BANDS)}
        return sorted(found, key=lambda s: (s == UNKNOWN, rank.get(s, 0)))
    return sorted(found, key=lambda s: (s == UNKNOWN, -int(np.sum(keys == s)), s))


def subgroup_metrics(probs, labels, classes, groups: Mapping[str, Iterable], *,
                     malignant=None) -> dict:
    """Metrics per value of each grouping: {grouping: {value: {...}}}.

    `groups` maps a grouping name (e.g. "sex", "age_band", "localization") to one value
    per sample; missing values (None, NaN, "", "unknown") become "unknown". Each cell
    has n, accuracy, balanced_accuracy (over classes present in the cell), and the
    malignant-vs-benign auc / sensitivity / specificity where defined (else None).
    Values are ordered by decreasing n (age bands by age), "unknown" last.
    """
    probs, labels = _as_inputs(probs, labels)
    classes = list(classes)
    out = {}
    for name, values in groups.items():
        values = list(values)
        if len(values) != labels.size:
            raise ValueError(f"group {name!r} has {len(values)} values for {labels.size} samples")
        keys = np.array([_group_key(v) for v in values], dtype=object)
        cells = {}
        for key in _ordered_keys(keys):
            mask = keys == key
            p, y = probs[mask], labels[mask]
            cell = {"n": int(mask.sum()),
                    "accuracy": float(np.mean(p.argmax(axis=1) == y)),
                    "balanced_accuracy": balanced_accuracy(p, y)}
            mal = _malignant_block(p, y, classes, malignant)
            cell.update({k: mal[k] for k in ("malignant_auc", "malignant_sensitivity", "malignant_specificity")})
            cells[key] = cell
        out[name] = cells
    return to_jsonable(out)
