"""One config drives a training run; named recipes are committed so every result can be reproduced.

`python train.py --recipe NAME --epochs 3 ...`: any field below can be overridden by a flag of
the same name (see `python train.py --help`).
"""
import argparse
import dataclasses
import json
from dataclasses import dataclass, field

SHARED_DATA = "../shared/data"


# Allowed values of the string fields that take one of a few (argparse enforces them on flags).
TASK_CHOICES = ("ham7", "binary")                              # model.classes.TASKS
RESIZE_CHOICES = ("squash", "center", "fov")                   # model.images.MODES
CLASS_WEIGHTING_CHOICES = ("none", "sqrt", "inverse")          # model.train_step
SAMPLING_CHOICES = ("uniform", "balanced", "sources", "sources_balanced", "sources_malignancy")  # model.pipeline
DTYPE_CHOICES = ("float32", "bfloat16")


def _option(default, help: str, choices=None):
    """A TrainConfig field with its `--help` line (and allowed values) beside it: the one place
    each setting is described."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # --- data ---
    data: list = _option(
        [f"{SHARED_DATA}/ham10000"],
        "a training source, split by its own lesions with a validation part of its own: an ISIC "
        "metadata or challenge folder/CSV, class folders, or a path,dx CSV; \"NAME=PATH[:split,split]\"; "
        "repeat the flag for several sources")
    task: str = _option("ham7", "ham7 (the 7 HAM10000 classes) or binary (malignant vs benign)",
                        TASK_CHOICES)
    extra_train: list = _option([], "a labelled set used for training only, \"CSV[:split,split]\"; "
                                    "repeatable")
    external_eval: list = _option([], "a labelled set never used for selection, reported at the end; "
                                      "repeatable")
    val_frac: float = _option(0.15, "fraction of lesions held out for validation, stratified by class")
    split_seed: int = _option(0, "random seed of the train/validation split")
    split_file: str = _option("", "reuse an existing split CSV instead of making one")
    train_fraction: float = _option(1.0, "train on this fraction of each source's training lesions (all images of "
                                         "a lesion together); < 1 makes cheap proxy runs (python -m model loso --proxy)")
    image_size: int = _option(160, "side of the square model input, in pixels")
    resize: str = _option("squash", "how an image becomes square: squash the full frame (as ISIC 2017 "
                                    "did), center crop, or fov: crop to the dermatoscope's round field "
                                    "of view, then squash", RESIZE_CHOICES)
    color_constancy: bool = _option(False, "Shades-of-Gray colour constancy before normalisation")
    # --- model ---
    arch: str = _option("efficientnet_lite0", "network architecture (model.networks.ARCHITECTURES)")
    pretrained: bool = _option(True, "ImageNet initialisation where the arch has it")
    dropout: float = _option(0.2, "dropout rate before the classifier head")
    clinical_fusion: bool = _option(False, "also fit age/sex/site fusion after training "
                                           "(model/clinical.py)")
    # --- optimisation ---
    epochs: int = _option(8, "passes over the training set")
    batch_size: int = _option(48, "images per training step")
    lr: float = _option(1e-3, "peak learning rate of the warmup + cosine schedule")
    warmup_epochs: float = _option(0.5, "epochs of linear learning-rate warmup")
    weight_decay: float = _option(1e-4, "decoupled weight decay (AdamW)")
    body_lr_mult: float = _option(1.0, "< 1 slows the pretrained body relative to the new head")
    label_smoothing: float = _option(0.1, "label smoothing of the cross-entropy targets")
    class_weighting: str = _option("sqrt", "loss weight per class: none, sqrt (inverse square root of "
                                           "the frequency) or inverse (inverse frequency)",
                                   CLASS_WEIGHTING_CHOICES)
    prior_tau: float = _option(0.0, "calibrate with a prior correction: decide with logits minus prior_tau x "
                                    "log(training class frequency); 0.5 turns sqrt class weights into inverse")
    sampling: str = _option("uniform", "batch sampling: uniform, balanced (each class equally often), "
                                       "sources (each source equally often), sources_balanced (both) or "
                                       "sources_malignancy (each source, then its malignant and benign "
                                       "lesions, then their classes equally often)", SAMPLING_CHOICES)
    mixup: float = _option(0.0, "Beta(a, a) mixup strength; 0 turns it off")
    cutmix: float = _option(0.0, "Beta(a, a) CutMix strength (a box pasted from another image); "
                                 "0: off")
    ema_decay: float = _option(0.0, "> 0 selects, saves and serves an exponential moving average of "
                                    "the weights (e.g. 0.995 ~ the last 200 steps); 0: off")
    crop_scale_min: float = _option(0.5, "smallest random crop, as a fraction of the image area "
                                         "(1 turns cropping off)")
    color_jitter: float = _option(0.2, "strength of random brightness, contrast, saturation and hue "
                                       "changes; 0: off")
    hair_aug: float = _option(0.0, "probability of drawing random hairs over a training image")
    vignette_aug: float = _option(0.0, "probability of a dark circular dermatoscope border")
    low_res_aug: float = _option(0.0, "probability of shrinking a training image to 84 px and back "
                                      "(BCN_20000's thumbnail size), so blur stops marking a source")
    dtype: str = _option("float32", "compute type; bfloat16 for accelerators: compute in bf16, "
                                    "params in f32", DTYPE_CHOICES)
    tta: bool = _option(True, "8-view dihedral test-time augmentation at evaluation")
    seed: int = _option(0, "random seed of initialisation, augmentation and batch order")
    # --- run ---
    workdir: str = _option("runs/default", "output folder: config, split, log, curves, checkpoints")
    resume: bool = _option(False, "continue from <workdir>/latest after an interruption")
    max_steps_per_epoch: int = _option(0, "> 0 shortens epochs (smoke tests, debugging)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# One recipe per purpose. The first bundled model (HAM10000 only, commit 6dc7077) is remade with flags, not a
# recipe: docs/RESULTS.md gives the command; experiments are flags on top of `multisource`.
_MULTISOURCE = dict(data=[f"{SHARED_DATA}/ham10000", f"{SHARED_DATA}/isic2017/labels.csv:train,val",
                          f"{SHARED_DATA}/isic2019_bcn"],
                    split_file="data/splits/ham10000_val15_seed0.csv",
                    external_eval=[f"{SHARED_DATA}/isic2017/labels.csv:test"],
                    image_size=160, epochs=5, batch_size=48, lr=1e-3, resize="fov",
                    color_constancy=True, crop_scale_min=0.4, color_jitter=0.2,
                    sampling="sources_malignancy", class_weighting="none", tta=True)

RECIPES = {
    # Several sources (HAM10000, ISIC 2017 train/val, BCN_20000), each with its own lesion-grouped
    # validation part; the dermatoscope's field of view cropped out of its black frame; sources and
    # malignancy drawn evenly, no class weights. 160 px for 5 epochs: about 1 h alone on 2 CPU cores.
    # The bundled model's recipe: its numbers, its leave-one-source-out table and every lever tried on it
    # are in docs/RESULTS.md.
    "multisource": _MULTISOURCE,
    # The same with room to learn on an accelerator: 224 px, 30 epochs, bfloat16 compute.
    "multisource_accelerator": {**_MULTISOURCE, "image_size": 224, "epochs": 30, "batch_size": 64,
                                "dtype": "bfloat16"},
    # A few steps on tiny images: the same code path as a real run, for tests and debugging.
    "smoke": dict(arch="simple_cnn", pretrained=False, image_size=32, epochs=2, batch_size=8,
                  max_steps_per_epoch=3, tta=False, warmup_epochs=0.0),
}
DEFAULT_RECIPE = "multisource"   # what a bare `python train.py` trains


def make_config(recipe: str = DEFAULT_RECIPE, **overrides) -> TrainConfig:
    if recipe not in RECIPES:
        from .errors import UserError
        raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    settings = {**RECIPES[recipe], **overrides}
    if isinstance(settings.get("data"), str):  # one source given as a plain path
        settings["data"] = [settings["data"]]
    return TrainConfig(**settings)


# What each recipe is for, one line each (`--list_recipes`); the measurements are in the comments above.
RECIPE_PURPOSES = {
    "multisource": "the bundled model: HAM10000 + ISIC 2017 + BCN_20000, field-of-view crop, 160 px, 5 epochs "
                   "(~1 h on 2 idle CPU cores)",
    "multisource_accelerator": "the bundled recipe at 224 px for 30 epochs in bfloat16, for a GPU or TPU "
                               "(not yet run: no accelerator was at hand)",
    "smoke": "a few steps on tiny images: the real code path, for tests and debugging (seconds)",
}


def recipe_list() -> str:
    """Every recipe, what it is for, and the settings it changes from TrainConfig's defaults."""
    width = max(map(len, RECIPES))
    lines = []
    for name, settings in RECIPES.items():
        lines.append(f"{name:<{width}}  {RECIPE_PURPOSES.get(name, '')}")
        changed = ", ".join(f"{k}={v}" for k, v in settings.items()
                            if getattr(TrainConfig(), k) != v)
        lines.append(f"{'':<{width}}  ({changed or 'TrainConfig defaults'})")
    return "\n".join(lines)


class _ListRecipes(argparse.Action):
    """`--list_recipes`: print the recipes and exit, like --help."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print every recipe with what it is for, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(recipe_list())
        parser.exit()


def _choices(f: dataclasses.Field):
    if f.name == "arch":   # the registry is the list; imported here so config stays light to import
        from .networks import ARCHITECTURES
        return tuple(ARCHITECTURES)
    return f.metadata.get("choices")


def recipe_of(argv) -> str:
    """The --recipe in `argv` (the default recipe when absent or unknown): whose defaults --help shows."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=DEFAULT_RECIPE)
    recipe = pre.parse_known_args(argv)[0].recipe
    return recipe if recipe in RECIPES else DEFAULT_RECIPE


def add_arguments(parser, recipe: str = DEFAULT_RECIPE):
    """One flag per TrainConfig field (`--epochs 3`, `--no-tta`), described by the field's help;
    `--help` shows `recipe`'s value of each (a flag left out keeps the --recipe value)."""
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                        help="named recipe the flags override (default: %(default)s; "
                             "see --list_recipes)")
    parser.add_argument("--list_recipes", action=_ListRecipes)
    defaults = make_config(recipe)
    for f in dataclasses.fields(TrainConfig):
        flag, choices = f"--{f.name}", _choices(f)
        value = getattr(defaults, f.name)
        shown = (" ".join(value) or "none") if isinstance(value, list) else (repr(value) if value == "" else value)
        help_text = f.metadata["help"]
        if choices:
            help_text += f" [{', '.join(choices)}]"
        # '%' would start an argparse format; the field texts use it literally.
        help_text = f"{help_text} (default: {shown}, from recipe {recipe})".replace("%", "%%")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif f.type is list or f.type == "list":
            parser.add_argument(flag, action="append", default=None, metavar="SPEC", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=None, choices=choices,
                                metavar=f.name.upper() if choices else None, help=help_text)
    return parser


def add_distributed_arguments(parser):
    """How this process joins a run on several processes or hosts (`jax.distributed.initialize`'s
    arguments). Not TrainConfig fields: they say where a process runs, not what is trained."""
    group = parser.add_argument_group(
        "several processes or hosts (docs/TRAINING.md); none given: one process, or the SLURM, Open MPI, "
        "Cloud TPU or Kubernetes job's own settings")
    group.add_argument("--coordinator_address", metavar="HOST:PORT", default=None,
                       help="process 0's host and a free port, the same for every process")
    group.add_argument("--num_processes", type=int, default=None, help="how many processes the run has")
    group.add_argument("--process_id", type=int, default=None,
                       help="this process's number, 0 to num_processes - 1; process 0 writes the logs")
    return parser


def from_arguments(args) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    return make_config(args.recipe, **overrides)
