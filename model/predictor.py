"""Predictor: load a checkpoint once, then predict, calibrate and explain batches of images.

    p = Predictor.load("checkpoints/default")
    probs = p.predict(["lesion.jpg"])           # calibrated probabilities, (B, K)
    heat = p.explain("lesion.jpg", "gradcam")   # (S, S) map in [0, 1]

The app, `evaluate`, `predict` and the training loop's validation all go through this one class. It puts
together four rooms, each in its own place: the runtime (jitted passes in padded batches, model/inference.py),
the decision (clinical fusion, prior correction, temperature: below, fitted by model/calibration.py), the
unusual-image gate (model/gate.py) and the explanations (model/saliency.py, placed on the image's pixels
by model/render.py).
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from scipy.special import softmax

from . import checkpoint, clinical, gate, saliency
from .classes import full_name, malignant_indices
from .images import load_image, square_box, to_square
from .inference import explain_cam, forward, forward_and_explain, images_per_call, in_calls, views
from .preprocess import Normalisation, preprocess
from .render import place_in_frame


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
            gate.check_gate(metadata["ood"])

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
        return self.prepare_with_boxes(images)[0]

    def prepare_with_boxes(self, images) -> tuple[np.ndarray, list]:
        """`prepare`, and the region of each image it resized (`images.square_box`; None for an image that was
        already in the model's view): what `to_image_frame` needs to put a map back, found once."""
        out = np.empty((len(images), self.image_size, self.image_size, 3), np.uint8)
        boxes = []
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray) and image.shape == out.shape[1:] and image.dtype == np.uint8:
                out[i], box = image, None
            else:
                image = load_image(image)
                box = square_box(image, self.resize)
                out[i] = to_square(image, self.image_size, self.resize, box=box)
            boxes.append(box)
        return out, boxes

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
        return softmax(np.asarray(logits) / float(self.metadata.get("temperature", 1.0)), axis=1)

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
    @property
    def gate(self) -> dict:
        return self.metadata.get("ood") or {}

    def ood_score(self, pooled: np.ndarray) -> np.ndarray:
        """`gate.reference_distance` to the checkpoint's reference lesions; higher is more unusual."""
        return gate.reference_distance(pooled, self.gate)

    def normalised_entropy(self, probs: np.ndarray) -> np.ndarray:
        return gate.normalised_entropy(probs)

    def non_lesion_score(self, pooled: np.ndarray) -> np.ndarray:
        """`gate.non_lesion_score` of the checkpoint's boundary; higher is less like a lesion."""
        return gate.non_lesion_score(pooled, self.gate)

    def unusual_checks(self, ood: np.ndarray, entropy: np.ndarray, non_lesion: np.ndarray) -> dict:
        return gate.unusual_checks(self.gate, ood, entropy, non_lesion)

    def analyse(self, images, people=None, tta: bool | None = None) -> dict:
        """Everything the app shows for a batch: probabilities, malignancy, OOD score, the unusual-image flag and
        the checks each image failed (`unusual_checks`' names), entropy."""
        logits, pooled = self.forward_arrays(self.prepare(images), tta)
        return self._summary(logits, pooled, people)

    def analyse_and_explain(self, images: np.ndarray, people=None) -> dict:
        """`analyse` of prepared images (uint8 (B, S, S, 3), `prepare`'s), plus "heat": each image's map of its
        top class by `default_method`, (B, S, S) in [0, 1]. Class-activation maps come from the prediction's own
        forward pass, one jitted call per `images_per_call` images (padded to a `bucket` size); other methods
        take a pass of their own."""
        if images.shape[1:] != (self.image_size, self.image_size, 3) or images.dtype != np.uint8:
            raise ValueError(f"analyse_and_explain takes prepare()'s uint8 (B, {self.image_size}, "
                             f"{self.image_size}, 3) arrays, not {images.dtype} {images.shape}")
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
                "unusual": gate.flag_unusual(checks), "entropy": entropy,
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

    def to_image_frame(self, heat: np.ndarray, image, out_size=None, box=None) -> np.ndarray:
        """A model-view map (S, S) on `image`'s own pixels (H, W), or at `out_size` (W, H); `box`: the region
        `prepare_with_boxes` resized, when known (else found again)."""
        img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
        return place_in_frame(heat, square_box(img, self.resize) if box is None else box, img.size, out_size)
