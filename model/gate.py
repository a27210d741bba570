"""The unusual-image gate: does an image look like the lesions the model was checked on?

Three checks on an image's pooled features and prediction (their thresholds and reference are fitted by
model/calibration.py and stored in the checkpoint's metadata["ood"]): far from the reference validation
lesions, on the non-lesion side of a learned boundary, a near-uniform prediction.
"""
import numpy as np

from . import checkpoint
from .errors import UserError


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (an all-zero row stays zero): the gate compares directions of pooled features."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def reference_distance(pooled: np.ndarray, gate: dict) -> np.ndarray:
    """Cosine distance of pooled features to the k-th nearest of the gate's reference validation lesions
    (model/calibration.py): 0 where the gate has no reference (a checkpoint calibrated before it had one)."""
    if "reference" not in gate:
        return np.zeros(len(pooled))
    reference = checkpoint.unpack_array(gate["reference"])
    unit = unit_rows(pooled)
    k = int(gate["neighbours"])
    # einsum, not `@`: a BLAS matmul here wakes OpenBLAS's threads, whose spinning then slows the next
    # XLA forward pass on a 2-core CPU by ~30 ms per request (bench/bench_app.py, docs/notebook/experiment-record.md).
    similarity = np.einsum("bd,nd->bn", unit, reference)
    return 1 - np.partition(similarity, -k, axis=1)[:, -k]


def non_lesion_score(pooled: np.ndarray, gate: dict) -> np.ndarray:
    """The decision value of the gate's lesion / non-lesion boundary (model/calibration.py) on L2-normalised
    pooled features, higher for pictures like its known non-lesions: -inf where the gate has none."""
    boundary = gate.get("non_lesion")
    if not boundary:
        return np.full(len(pooled), -np.inf)
    return np.einsum("bd,d->b", unit_rows(pooled), checkpoint.unpack_array(boundary["weights"])) + float(boundary["bias"])


def check_gate(gate: dict) -> None:
    """UserError when the gate's non-lesion boundary does not fit its reference (a damaged checkpoint)."""
    features = checkpoint.unpack_array(gate["reference"]).shape[1]
    boundary = gate.get("non_lesion")
    if not boundary:
        return
    try:
        fits = checkpoint.unpack_array(boundary["weights"]).shape == (features,) and np.isfinite(
            [float(boundary["bias"]), float(boundary["threshold"])]).all()
    except (KeyError, TypeError, ValueError):
        fits = False
    if not fits:
        raise UserError("the unusual-image gate's non-lesion boundary in the checkpoint's metadata is damaged; "
                        "recalibrate the checkpoint with `python -m model calibrate --non_lesions FOLDER`, "
                        "or copy it again.")


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in [0, 1] (1 = uniform over the classes)."""
    return -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1) / np.log(probs.shape[1])


def unusual_checks(gate: dict, ood: np.ndarray, entropy: np.ndarray, non_lesion: np.ndarray) -> dict:
    """The gate's three checks by name, each True where the image fails it: far from the reference lesions,
    on the non-lesion side of the learned boundary, a near-uniform prediction. A check the checkpoint was
    not calibrated with fails nothing."""
    return {"far_from_lesions": ood > gate.get("threshold", np.inf),
            "unlike_a_lesion": non_lesion > (gate.get("non_lesion") or {}).get("threshold", np.inf),
            "near_uniform": entropy > gate.get("entropy_threshold", np.inf)}


def flag_unusual(checks: dict) -> np.ndarray:
    """True where the image fails any of `unusual_checks`."""
    return np.logical_or.reduce(list(checks.values()))
