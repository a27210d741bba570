"""Post-training calibration on validation, stored in the checkpoint's metadata.

- temperature scaling (Guo et al. 2017): probabilities that mean what they say;
- an unusual-image gate: the cosine distance of an image's pooled features to its OOD_NEIGHBOURS-th
  nearest reference validation lesion (Sun et al. 2022; the reference drawn evenly from the sources),
  with a threshold that OOD_PASS_RATE of the other validation lesions pass (the app warns about the
  rest). Distances to class means failed for models trained on source-balanced draws: noise and a
  text page landed near the means (docs/notebook/experiment-record.md). Given known non-lesion
  pictures, also a linear lesion / non-lesion boundary: a gate that knows only lesions passed textures,
  grey pages and a cat (docs/notebook/experiment-record.md);
- a high-sensitivity operating point: the malignant-probability threshold at which
  OPERATING_SENSITIVITY of malignant validation lesions are flagged, because the arg-max
  misses many melanomas and users should see what a sensitive cut-off costs in specificity.
  With several validation sources it is lowered, where needed and as far as specificity allows,
  until it also flags that share of each source's melanomas: one clinic's melanomas can score
  lower than another's, and a pooled threshold would under-flag them (docs/notebook/experiment-record.md, sessions
  10 and 19);
- optionally, a prior correction (logit adjustment, Menon et al. 2021): the decision logits are
  the network's minus tau * log(training class frequency), so the arg-max stops favouring the
  common classes (tau = 0.5 turns sqrt class weights into inverse ones; docs/notebook/experiment-record.md);
- per-subgroup metrics (sex, age band, body site) so users see where the model is weaker;
- optionally, the clinical-metadata fusion (model/clinical.py), fitted on the training split
  before the temperature so that the temperature calibrates the fused prediction.
"""
import numpy as np
from sklearn.linear_model import LogisticRegression

from . import checkpoint, clinical, metrics
from .errors import UserError
from .pipeline import balances_classes
from .gate import flag_unusual, unit_rows

OOD_PASS_RATE = 0.985  # per gate (distance, entropy); together >= 95% of validation lesions pass
OOD_REFERENCE_SIZE = 1024  # validation lesions kept as the gate's reference: 2.6 MB of float16 at 1,280 features
OOD_NEIGHBOURS = 10
NON_LESION_PASS_RATE = 0.995  # of each source's held-out validation lesions, on top of the two gates above
OPERATING_SENSITIVITY = 0.9
MIN_SOURCE_MELANOMAS = 10     # fewer give a threshold that one lesion moves
MIN_SPECIFICITY = 0.5         # pooled and per source: a lower threshold flags too many benign lesions


def unusual_image_gate(pooled: np.ndarray, sources=None, seed: int = 0) -> tuple[dict, np.ndarray]:
    """The gate's reference (a seeded draw of at most OOD_REFERENCE_SIZE validation lesions, at most half
    of them, L2-normalised) and the mask of the lesions left out of it, on which its threshold is set:
    scored against a reference they are part of, lesions would look more usual than new ones do.
    With `sources` (one name per lesion) each source gets an equal quota (at most half of its own), so a
    small source is not drowned by a large one (docs/notebook/experiment-record.md)."""
    if len(pooled) < 2:
        return {}, np.ones(len(pooled), bool)
    rng = np.random.default_rng(seed)
    sources = np.zeros(len(pooled)) if sources is None else np.asarray(sources)
    names = list(dict.fromkeys(sources.tolist()))
    quota = OOD_REFERENCE_SIZE // len(names)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(sources == name))[:min(quota, (sources == name).sum() // 2)]
                             for name in names])
    if not len(chosen):   # no source has two lesions
        return {}, np.ones(len(pooled), bool)
    held_out = np.ones(len(pooled), bool)
    held_out[chosen] = False
    reference = unit_rows(pooled[chosen])
    return {"neighbours": min(OOD_NEIGHBOURS, len(chosen)), "reference": checkpoint.pack_array(reference)}, held_out


def non_lesion_boundary(reference: np.ndarray, non_lesions: np.ndarray) -> dict:
    """Logistic regression between the gate's reference lesions (unit rows) and the pooled features of
    known non-lesion pictures, the two classes weighted equally; its decision value is
    `predictor.non_lesion_score`. Its threshold is set by `calibrate`."""
    x = np.vstack([reference, unit_rows(non_lesions)])
    y = np.r_[np.zeros(len(reference)), np.ones(len(non_lesions))]
    fit = LogisticRegression(class_weight="balanced", max_iter=5000).fit(x, y)
    return {"weights": checkpoint.pack_array(fit.coef_[0]), "bias": float(fit.intercept_[0]),
            "non_lesions": len(non_lesions)}


def highest_source_quantile(score: np.ndarray, sources, q: float) -> float:
    """The highest of the sources' own q-quantiles of `score`: at least q of each source lies at or below it,
    so the source the model knows least is not the one a threshold costs most (docs/notebook/experiment-record.md)."""
    sources = np.zeros(len(score)) if sources is None else np.asarray(sources)
    return max(float(np.quantile(score[sources == name], q)) for name in dict.fromkeys(sources.tolist()))


def subgroups(records) -> dict:
    return {"sex": [r.sex for r in records],
            "age_band": [metrics.age_band(r.age) for r in records],
            "body_site": [r.site for r in records]}


def sensitive_threshold(probs, labels, classes, sources=None) -> tuple[float | None, dict]:
    """The operating threshold and how it was chosen (`operating_point` metadata, less the threshold).

    Pooled: flags OPERATING_SENSITIVITY of malignant validation lesions. With `sources` (one name
    per image), lowered towards the threshold that flags that share of each source's melanomas (where
    it has MIN_SOURCE_MELANOMAS), as far as the pooled specificity and each source's own stay at least
    MIN_SPECIFICITY. Sources whose stored per-source threshold lies below the chosen one are those it
    could not protect (the model card names them)."""
    split = metrics.malignant_split(probs, labels, classes)
    if split is None or not split[1].any():
        return None, {}
    score, malignant = split
    pooled = metrics.threshold_for_sensitivity(score, malignant, OPERATING_SENSITIVITY)
    rule = {"target_sensitivity": OPERATING_SENSITIVITY, "rule": "pooled malignant"}
    if sources is None or "mel" not in classes:
        return pooled, rule
    melanoma = labels == list(classes).index("mel")
    sources = np.asarray(sources)
    names = list(dict.fromkeys(sources.tolist()))
    per_source = {str(name): metrics.threshold_for_sensitivity(score[sources == name], melanoma[sources == name],
                                                               OPERATING_SENSITIVITY)
                  for name in names if (melanoma & (sources == name)).sum() >= MIN_SOURCE_MELANOMAS}
    benign_sets = [~malignant] + [~malignant & (sources == name) for name in names]

    def affordable(threshold):
        return all((score[benign] < threshold).mean() >= MIN_SPECIFICITY for benign in benign_sets if benign.any())

    # Specificity only rises with the threshold, so the first affordable candidate is the lowest one.
    chosen = next((t for t in sorted(per_source.values()) if t < pooled and affordable(t)), pooled)
    rule["per_source_melanoma_thresholds"] = per_source
    if chosen < pooled:
        rule["rule"] = "per-source melanoma"
    return chosen, rule


def check_prior_tau(tau: float, sampling: str) -> None:
    """Refuse a prior correction that cannot mean anything: before training (train.py) and at calibration."""
    if tau < 0:
        raise UserError(f"--prior_tau {tau:g} would favour the common classes further; use a value from 0 "
                        "(no correction) to 1 (the balanced rule for a model trained without class weights).")
    if tau and balances_classes(sampling):
        raise UserError(f"--prior_tau {tau:g} corrects for the training class frequency, but --sampling {sampling} "
                        "evens out the classes, so the model does not learn that frequency; train or calibrate "
                        "without --prior_tau.")


def prior_correction(metadata: dict, classes, tau: float) -> dict | None:
    """The `prior_correction` metadata for `tau` (None for 0): the prior is the pooled training
    class frequency that the checkpoint's training metadata records."""
    check_prior_tau(tau, metadata.get("training", {}).get("config", {}).get("sampling", "uniform"))
    if not tau:
        return None
    counts = metadata.get("training", {}).get("data", {}).get("train_class_counts") or {}
    missing = [c for c in classes if not counts.get(c)]
    if missing:
        raise UserError(f"the checkpoint's metadata gives no training images for {', '.join(missing)}, so it has "
                        "no prior to correct; calibrate it without --prior_tau.")
    total = sum(counts[c] for c in classes)
    return {"tau": float(tau), "prior": {c: counts[c] / total for c in classes}}


def calibrate(predictor, val, classes, sources=None, prior_tau: float | None = None,
              non_lesions: np.ndarray | None = None) -> dict:
    """Fit temperature, operating point and OOD gate on the validation split; write them into the checkpoint.

    `sources` names each validation image's source, for the per-source melanoma operating point.
    `prior_tau` sets the prior correction the rest is fitted after (0 removes it; None keeps the
    checkpoint's own). `non_lesions` (prepared uint8 pictures that are not skin lesions) adds the gate's
    lesion / non-lesion boundary."""
    if prior_tau is not None:
        predictor.metadata.pop("prior_correction", None)
        correction = prior_correction(predictor.metadata, classes, prior_tau)
        if correction:
            predictor.metadata["prior_correction"] = correction
    image_logits, pooled = predictor.forward_arrays(val.images)
    logits = predictor.decision_logits(image_logits, val.records)
    before = metrics.classification_metrics(metrics.softmax(logits), val.labels, list(classes), n_bootstrap=0)
    temperature = metrics.fit_temperature(logits, val.labels)
    probs = metrics.softmax(logits, temperature)
    threshold, rule = sensitive_threshold(probs, val.labels, classes, sources)
    after = metrics.classification_metrics(probs, val.labels, list(classes), n_bootstrap=1000,
                                           operating_threshold=threshold)
    after["subgroups"] = metrics.subgroup_metrics(probs, val.labels, list(classes), subgroups(val.records))
    after["temperature"] = temperature
    after["ece_before_temperature"] = before["ece"]

    ood, held_out = unusual_image_gate(pooled, sources)
    predictor.metadata["ood"] = ood
    # Scored through the predictor: the threshold sees the float16 reference that will serve.
    distance, entropy = predictor.ood_score(pooled[held_out]), predictor.normalised_entropy(probs)
    if ood:
        ood["threshold"] = float(np.quantile(distance, OOD_PASS_RATE))
    if ood and non_lesions is not None and len(non_lesions):
        ood["non_lesion"] = non_lesion_boundary(checkpoint.unpack_array(ood["reference"]),
                                                predictor.forward_arrays(non_lesions)[1])
        ood["non_lesion"]["threshold"] = highest_source_quantile(
            predictor.non_lesion_score(pooled[held_out]), None if sources is None else np.asarray(sources)[held_out],
            NON_LESION_PASS_RATE)
    # The distance alone misses images that land among lesions' features (flat colour, text) for some
    # models: those get near-uniform predictions, so a high-entropy gate catches them. Each gate keeps
    # OOD_PASS_RATE of validation lesions, so together at least 95% pass.
    ood["entropy_threshold"] = float(np.quantile(entropy, OOD_PASS_RATE))
    ood["validation_pass_rate"] = float(np.mean(~flag_unusual(predictor.unusual_checks(
        distance, entropy[held_out], predictor.non_lesion_score(pooled[held_out])))))

    predictor.metadata.update(temperature=temperature, ood=ood)
    if threshold is not None:
        predictor.metadata["operating_point"] = {**rule, "threshold": threshold}
    predictor.metadata["metrics"] = {**predictor.metadata.get("metrics", {}), "val": metrics.to_jsonable(after)}
    checkpoint.update_metadata(predictor.metadata["checkpoint_path"], predictor.metadata)
    result = {"val": after, "temperature": temperature, "ece_before": before["ece"], "ece_after": after["ece"]}
    if predictor.uses_clinical:  # what the fusion adds, from the same forward pass
        image_only = metrics.classification_metrics(metrics.softmax(image_logits), val.labels, list(classes),
                                                    n_bootstrap=0)
        result["image_only_val"] = {k: image_only[k] for k in ("balanced_accuracy", "macro_auc", "malignant_auc")}
    return result


def fit_clinical_fusion(predictor, train, class_weights: np.ndarray) -> dict:
    """Fit age/sex/site fusion on the training split's image logits (plain view) into `predictor.metadata`.

    `calibrate` must follow: the temperature and the entropy gate have to see the fused logits,
    and it is what writes the metadata to the checkpoint.
    """
    predictor.metadata.pop("clinical_fusion", None)  # fit on the image model's own logits
    logits = predictor.logits_from_arrays(train.images, tta=False)
    fusion = clinical.fit_fusion(logits, clinical.encode(train.records), train.labels, class_weights)
    predictor.metadata["clinical_fusion"] = fusion
    return fusion
