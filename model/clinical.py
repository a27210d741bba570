"""Clinical metadata fusion: age, sex and body site joined with what the image model sees.

Late fusion, fitted after the image model is trained (`python -m model fuse`, or
`train.py --clinical_fusion`): the fused logits are

    image_logits + encode(age, sex, site) @ weights + bias

i.e. a linear layer over [image features, clinical features] whose image block is the trained
classifier, kept frozen. The image model, its saliency maps and its image-only predictions are
unchanged; the fusion is a few hundred numbers stored in the checkpoint's metadata.

Missing values are first-class: each field has a "missing" indicator, so an image with no
metadata (ISIC 2017 test, the app by default) gets the shift learned for unknown age/sex/site.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

# HAM10000's `localization` values; anything else counts as missing.
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
         "lower extremity", "neck", "scalp", "trunk", "upper extremity")
SEXES = ("female", "male")
FEATURES = ("age/100", "age missing", *(f"sex {s}" for s in SEXES), "sex missing",
            *(f"site {s}" for s in SITES), "site missing")


def _age(value) -> float | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) and 0 <= age <= 120 else None


def encode_one(age=None, sex=None, site=None) -> np.ndarray:
    """One person's clinical feature vector (len(FEATURES),); unknown values set the missing flags."""
    x = np.zeros(len(FEATURES), np.float32)
    a = _age(age)
    x[0], x[1] = (a / 100.0, 0.0) if a is not None else (0.0, 1.0)
    sex = str(sex).strip().lower() if sex is not None else ""
    x[2 + SEXES.index(sex) if sex in SEXES else 4] = 1.0
    site = str(site).strip().lower() if site is not None else ""
    x[5 + SITES.index(site) if site in SITES else 5 + len(SITES)] = 1.0
    return x


def encode(records) -> np.ndarray:
    """(N, len(FEATURES)) for objects with .age, .sex and .site (data.Record)."""
    rows = [encode_one(r.age, r.sex, r.site) for r in records]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)), np.float32)


def fuse(logits: np.ndarray, clinical: np.ndarray, fusion: dict | None) -> np.ndarray:
    """Image logits shifted by the clinical features; unchanged when the checkpoint has no fusion."""
    if not fusion:
        return logits
    if list(fusion["features"]) != list(FEATURES):
        raise ValueError("checkpoint's clinical fusion was fitted on other features; refit it with `python -m model fuse`")
    return logits + clinical @ np.asarray(fusion["weights"], np.float32) + np.asarray(fusion["bias"], np.float32)


def fit_fusion(logits: np.ndarray, clinical: np.ndarray, labels: np.ndarray, class_weights: np.ndarray,
               *, l2: float = 1e-3, steps: int = 500, lr: float = 0.05) -> dict:
    """Weights and bias minimising class-weighted cross-entropy of the fused logits (image block frozen)."""
    logits = jnp.asarray(logits, jnp.float32)
    clinical = jnp.asarray(clinical, jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[1])
    w = jnp.asarray(class_weights, jnp.float32)[labels]
    params = {"weights": jnp.zeros((clinical.shape[1], logits.shape[1])), "bias": jnp.zeros(logits.shape[1])}

    def loss(p):
        z = logits + clinical @ p["weights"] + p["bias"]
        ce = jnp.sum(optax.softmax_cross_entropy(z, onehot) * w) / jnp.sum(w)
        return ce + l2 * jnp.sum(p["weights"] ** 2)

    tx = optax.adam(lr)

    def step(carry, _):
        p, state = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return {"features": list(FEATURES),
            "weights": np.round(np.asarray(params["weights"]), 5).tolist(),
            "bias": np.round(np.asarray(params["bias"]), 5).tolist(),
            "train_loss": float(values[-1])}
