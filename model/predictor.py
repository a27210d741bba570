"""Predictor: load a checkpoint once, then predict, calibrate and explain batches of images.

    p = Predictor.load("checkpoints/default")
    probs = p.predict(["lesion.jpg"])           # calibrated probabilities, (B, K)
    heat = p.explain("lesion.jpg", "gradcam")   # (S, S) map in [0, 1]

The app, `evaluate`, `predict` and the training loop's validation all go through this one class.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from . import checkpoint, clinical, saliency
from .classes import full_name, malignant_indices
from .errors import UserError
from .images import load_image, square_box, to_square
from .render import place_in_frame
from .preprocess import Normalisation, preprocess
from .views import TTA_VIEWS, all_views, mean_over_views

EVAL_BATCH = 64   # images through the network per call, test-time views included: bounds memory


# The model travels as nnx.split's (graphdef, state) into plain jax.jit functions: nnx.jit walks the
# whole module graph in Python on every call, 20-25 ms for EfficientNet-Lite0 on this CPU, more than
# a 128-px image's forward pass itself (bench/profile_step.py).

@partial(jax.jit, static_argnames=("norm", "tta"))
def forward(graphdef, state, images_u8, norm: Normalisation, tta: bool):
    """(logits, pooled features) for a uint8 batch; with tta, averaged over the 8 dihedral views."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    feats = model.features(all_views(x) if tta else x)
    logits, pooled = model.head(feats), feats.mean(axis=(1, 2)).astype(jnp.float32)
    return (mean_over_views(logits), mean_over_views(pooled)) if tta else (logits, pooled)


@partial(jax.jit, static_argnames=("norm", "tta", "method"))
def forward_and_explain(graphdef, state, images_u8, norm: Normalisation, tta: bool, logit_shift, method: str):
    """`forward`'s (logits, pooled) and, from the same pass, each image's `method` map (a class-activation
    map, saliency.CAM_METHODS) of its top class, scaled to [0, 1] at the input size.

    The top class is that of the averaged logits plus `logit_shift` (the clinical fusion's offset;
    the temperature never changes the order), and with tta the map is the mean of the 8 views' maps,
    so the map explains the very prediction returned."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    top_class = lambda logits: jnp.argmax(logits + logit_shift, axis=-1)  # noqa: E731
    cam, logits, pooled, _ = saliency.cam_and_logits(model, x, top_class, method, tta)
    return logits, pooled, saliency.unit_maps(cam, x.shape[1:3])


@partial(jax.jit, static_argnames=("norm", "method", "tta"))
def explain_cam(graphdef, state, images_u8, norm: Normalisation, class_index, method: str, tta: bool):
    """The `method` map (saliency.CAM_METHODS) of `class_index` (one per image) for a uint8 batch,
    scaled to [0, 1] at the input size: what saliency.explain gives, without nnx.jit's per-call walk."""
    model = nnx.merge(graphdef, state)
    x = preprocess(images_u8, norm)
    return saliency.unit_maps(saliency.cam_and_logits(model, x, class_index, method, tta)[0], x.shape[1:3])


def views(tta: bool) -> int:
    return TTA_VIEWS if tta else 1


def images_per_call(tta: bool) -> int:
    return EVAL_BATCH // views(tta)


def bucket(n: int, limit: int) -> int:
    """The batch size a batch of n <= limit is padded to: the next power of two, so that a few
    compiled programs serve every size at most twice the work."""
    return min(limit, 1 << max(0, n - 1).bit_length())


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` with zero rows (black images) appended up to `size` (their outputs are cut off)."""
    pad = size - len(rows)
    return np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)]) if pad else rows


def in_calls(call, per_call: int, *arrays) -> list[np.ndarray]:
    """`call(*chunks)` on `per_call` rows of `arrays` at a time, each chunk padded to its `bucket`;
    each output cut back to the real rows and concatenated."""
    outputs = []
    for start in range(0, len(arrays[0]), per_call):
        chunks = [np.asarray(a[start:start + per_call]) for a in arrays]
        n = len(chunks[0])
        outputs.append([np.asarray(o)[:n] for o in call(*(padded(c, bucket(n, per_call)) for c in chunks))])
    return [np.concatenate(parts) for parts in zip(*outputs)]


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


class Predictor:
    """Serves the weights `model` has when the predictor is made (switched to eval mode): after
    training changes them, make a new one."""

    def __init__(self, model, metadata: dict):
        self.model = model
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.metadata = metadata
        self.classes = list(metadata["classes"])
        self.class_names = [full_name(c) for c in self.classes]
        self.image_size = int(metadata["image_size"])
        self.resize = metadata.get("resize", "squash")
        self.norm = Normalisation.from_dict(metadata["normalisation"])
        self.checkpoint_id = metadata.get("checkpoint_id", "unsaved")
        if self.has_distance_gate:   # decoded now: a damaged gate is refused at load, not at an upload
            self._check_gate(metadata["ood"])

    @staticmethod
    def _check_gate(gate: dict) -> None:
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

    @property
    def tta(self) -> bool:
        """Whether predictions (and their class-activation maps) average the 8 dihedral views."""
        return bool(self.metadata.get("tta", False))

    @property
    def views_per_image(self) -> int:
        """Network passes per image: 8 with test-time augmentation (the dihedral views), else 1."""
        return views(self.tta)

    @property
    def uses_clinical(self) -> bool:
        """True when the checkpoint fuses age, sex and body site with the image (model/clinical.py)."""
        return bool(self.metadata.get("clinical_fusion"))

    @property
    def has_distance_gate(self) -> bool:
        """Whether images far from the reference validation lesions are flagged (a checkpoint calibrated
        before the gate had a reference, or never calibrated, flags only near-uniform predictions)."""
        return "reference" in (self.metadata.get("ood") or {})

    @classmethod
    def load(cls, path) -> "Predictor":
        model, metadata = checkpoint.load_model(path)
        return cls(model, metadata)

    # --- inputs ---
    def prepare(self, images) -> np.ndarray:
        """PIL images, arrays (H, W, 3) or paths -> uint8 (B, S, S, 3) in the checkpoint's view."""
        out = np.empty((len(images), self.image_size, self.image_size, 3), np.uint8)
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray) and image.shape == out.shape[1:] and image.dtype == np.uint8:
                out[i] = image
            else:
                out[i] = to_square(load_image(image), self.image_size, self.resize)
        return out

    # --- predictions ---
    def forward_arrays(self, images_u8: np.ndarray, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) logits and pooled features for prepared uint8 images, in batches."""
        tta = self.tta if tta is None else bool(tta)
        logits, pooled = in_calls(lambda u8: forward(self.graphdef, self.state, u8, self.norm, tta),
                                  images_per_call(tta), images_u8)
        return logits, pooled

    def logits_from_arrays(self, images_u8, tta=None) -> np.ndarray:
        return self.forward_arrays(images_u8, tta)[0]

    def decision_logits(self, logits: np.ndarray, people=None) -> np.ndarray:
        """The network's logits as the checkpoint decides with them: shifted by age/sex/site where it
        fuses them (`people`: objects with .age/.sex/.site, data.Record, one per row, or None when
        nothing is known) and by its prior correction where it has one (model/calibration.py)."""
        if self.uses_clinical:
            features = (clinical.encode(people) if people is not None
                        else np.tile(clinical.encode_one(), (len(logits), 1)))
            logits = clinical.fuse(logits, features, self.metadata["clinical_fusion"])
        correction = self.metadata.get("prior_correction")
        if correction:
            log_prior = np.log([correction["prior"][c] for c in self.classes])
            logits = logits - np.float32(correction["tau"]) * log_prior.astype(np.float32)
        return logits

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax with the temperature fitted on validation (1.0 until calibrated)."""
        z = logits / float(self.metadata.get("temperature", 1.0))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, images, tta=None, people=None) -> np.ndarray:
        return self.probabilities(self.decision_logits(self.logits_from_arrays(self.prepare(images), tta), people))

    def malignant_probability(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, malignant_indices(self.classes)].sum(axis=1)

    @property
    def operating_threshold(self) -> float | None:
        """Malignant probability at or above which the model flagged OPERATING_SENSITIVITY of the
        malignant validation lesions (model/calibration.py); None before calibration."""
        return (self.metadata.get("operating_point") or {}).get("threshold")

    # --- "does this look like what the model was trained on?" ---
    def ood_score(self, pooled: np.ndarray) -> np.ndarray:
        """`reference_distance` to the checkpoint's unusual-image gate; higher is more unusual."""
        return reference_distance(pooled, self.metadata.get("ood") or {})

    def normalised_entropy(self, probs: np.ndarray) -> np.ndarray:
        """Predictive entropy in [0, 1] (1 = uniform over the classes)."""
        return -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1) / np.log(len(self.classes))

    def non_lesion_score(self, pooled: np.ndarray) -> np.ndarray:
        """`non_lesion_score` of the checkpoint's unusual-image gate; higher is less like a lesion."""
        return non_lesion_score(pooled, self.metadata.get("ood") or {})

    def unusual_checks(self, ood: np.ndarray, entropy: np.ndarray, non_lesion: np.ndarray) -> dict:
        """The gate's three checks by name, each True where the image fails it: far from the reference lesions,
        on the non-lesion side of the learned boundary, a near-uniform prediction. A check the checkpoint was
        not calibrated with fails nothing."""
        gate = self.metadata.get("ood", {})
        return {"far_from_lesions": ood > gate.get("threshold", np.inf),
                "unlike_a_lesion": non_lesion > (gate.get("non_lesion") or {}).get("threshold", np.inf),
                "near_uniform": entropy > gate.get("entropy_threshold", np.inf)}

    @staticmethod
    def flag_unusual(checks: dict) -> np.ndarray:
        """True where the image fails any of `unusual_checks`."""
        return np.logical_or.reduce(list(checks.values()))

    def analyse(self, images, people=None, tta: bool | None = None) -> dict:
        """Everything the app shows for a batch: probabilities, malignancy, OOD score, the unusual-image flag and
        the checks each image failed (`unusual_checks`' names), entropy."""
        logits, pooled = self.forward_arrays(self.prepare(images), tta)
        return self._summary(logits, pooled, people)

    def analyse_and_explain(self, images, people=None) -> dict:
        """`analyse`, plus "heat": each image's map of its top class by `default_method`, (B, S, S) in
        [0, 1]. Class-activation maps come from the prediction's own forward pass, one jitted call per
        `images_per_call` images (padded to a `bucket` size); other methods take a pass of their own."""
        images = self.prepare(images)
        if self.default_method not in saliency.CAM_METHODS:
            out = self.analyse(images, people)
            top = out["probs"].argmax(axis=1)
            out["heat"] = np.stack([self.explain(image, class_index=int(c)) for image, c in zip(images, top)])
            return out
        shift = self.decision_logits(np.zeros((len(images), len(self.classes)), np.float32), people)
        logits, pooled, heat = in_calls(
            lambda u8, s: forward_and_explain(self.graphdef, self.state, u8, self.norm, self.tta, s,
                                              self.default_method),
            images_per_call(self.tta), images, shift)
        out = self._summary(logits, pooled, people)
        out["heat"] = heat.astype(np.float32)
        return out

    def _summary(self, logits, pooled, people) -> dict:
        probs = self.probabilities(self.decision_logits(logits, people))
        ood = self.ood_score(pooled)
        entropy = self.normalised_entropy(probs)
        checks = self.unusual_checks(ood, entropy, self.non_lesion_score(pooled))
        return {"probs": probs, "malignant": self.malignant_probability(probs), "ood_score": ood,
                "unusual": self.flag_unusual(checks), "entropy": entropy,
                "unusual_because": [[name for name, fails in checks.items() if fails[i]] for i in range(len(probs))]}

    # --- explanations ---
    @property
    def default_method(self) -> str:
        """The saliency method chosen for this checkpoint by the rule in docs/notebook/experiment-record.md (stored in
        its metadata by bench/saliency_faithfulness.py --record); Grad-CAM where none was chosen."""
        return (self.metadata.get("saliency") or {}).get("default", "gradcam")

    def explain(self, image, method: str | None = None, class_index: int | None = None, frame: str = "model",
                **kwargs) -> np.ndarray:
        """Saliency map in [0, 1] for one image, for `class_index` (default: the top class), by
        `method` (default: `default_method`). Class-activation maps explain the prediction as served:
        with test-time augmentation, the mean of the 8 views' maps; the other methods the plain view.

        frame="model": (S, S), the model's square view. frame="image": (H, W) on the image's own
        pixels, through the crop and resize `prepare` made (0 outside a field-of-view crop).
        """
        if frame not in ("model", "image"):
            raise ValueError(f"frame must be 'model' or 'image', not {frame!r}")
        images = self.prepare([image])
        method = method or self.default_method
        fast = method in saliency.CAM_METHODS and not kwargs   # the default and the chat's CAMs: jitted paths
        if fast and class_index is None:   # the top class and its map from one pass, as the app's first reply
            shift = self.decision_logits(np.zeros((1, len(self.classes)), np.float32))
            heat = np.asarray(forward_and_explain(self.graphdef, self.state, images, self.norm, self.tta, shift,
                                                  method)[2])[0]
        else:
            ci = jnp.asarray([int(self.predict(images).argmax()) if class_index is None else class_index], jnp.int32)
            heat = (np.asarray(explain_cam(self.graphdef, self.state, images, self.norm, ci, method, self.tta))[0]
                    if fast else
                    saliency.explain(self.model, preprocess(jnp.asarray(images), self.norm), ci, method=method,
                                     **kwargs)[0])
        return self.to_image_frame(heat, image) if frame == "image" else heat

    def to_image_frame(self, heat: np.ndarray, image, out_size=None) -> np.ndarray:
        """A model-view map (S, S) on `image`'s own pixels (H, W), or at `out_size` (W, H)."""
        img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
        return place_in_frame(heat, square_box(img, self.resize), img.size, out_size)
