"""`python train.py --help` and `--list_recipes`: every flag described, with its default and choices."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import RECIPE_PURPOSES, RECIPES, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # each test starts train.py


def _train_py(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})


def _flag_help(help_text: str) -> dict[str, str]:
    """{flag: its description} from argparse's option listing."""
    options = help_text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options)
    out = {}
    for entry in entries:
        head, _, rest = entry.strip().partition("\n")
        flag = head.split()[0].rstrip(",") if head else ""
        # the description starts on the flag's line when it fits, else on the next
        first_line = head[len(head.split("  ")[0]):]
        out[flag] = " ".join((first_line + " " + rest).split())
    return out


def test_help_describes_every_flag_with_default_and_choices():
    done = _train_py("--recipe", "multisource", "--help")
    assert done.returncode == 0, done.stderr
    flags = _flag_help(done.stdout)
    for f in dataclasses.fields(TrainConfig):
        text = flags.get(f"--{f.name}", "")
        assert f.metadata["help"].split()[0] in text, (f.name, text)
        assert "from recipe multisource)" in text, (f.name, text)
    assert "(default: 160, from recipe multisource)" in flags["--image_size"]     # the recipe's value
    assert "(default: none, from recipe multisource)" in flags["--class_weighting"]
    for flag, choices in {"--task": "ham7, binary", "--resize": "squash, center, fov",
                          "--sampling": "uniform, balanced, sources, sources_balanced, sources_malignancy",
                          "--class_weighting": "none, sqrt, inverse",
                          "--dtype": "float32, bfloat16"}.items():
        assert f"[{choices}]" in flags[flag], flag
    assert "efficientnet_lite0" in flags["--arch"] and "resnet50" in flags["--arch"]
    assert "--list_recipes" in flags and "--recipe" in flags
    bad = _train_py("--resize", "stretch")                     # choices are enforced
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_list_recipes_names_every_recipe_with_its_purpose():
    from model.config import recipe_of
    done = _train_py("--list_recipes")
    assert done.returncode == 0, done.stderr
    assert set(RECIPE_PURPOSES) == set(RECIPES) and len(RECIPES) <= 3   # one per purpose
    assert recipe_of([]) == "multisource"                               # a bare `python train.py`: the bundled
    lines = done.stdout.splitlines()
    for name in RECIPES:
        assert any(line.split()[:1] == [name] and RECIPE_PURPOSES[name] in line for line in lines), name
