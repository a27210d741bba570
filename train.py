"""Train a skin-lesion classifier.

    python train.py                                   # the default recipe on ../shared/data/ham10000
    python train.py --recipe smoke --data DIR --workdir runs/try
    python train.py --workdir runs/default --resume   # continue an interrupted run
    python train.py --list_recipes                    # the recipes and what each is for
    python train.py --recipe quick --help             # every flag, with quick's values

Every TrainConfig field is a flag (see --help); the run writes config.json, split.csv, log.jsonl,
learning_curves.png, latest/ (resume) and best/ (the checkpoint to evaluate and serve) in --workdir.
"""
import argparse
import sys

from model.config import add_arguments, from_arguments, recipe_of
from model.errors import UserError


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter),
                           recipe=recipe_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    try:
        from model.train import train_and_evaluate
        train_and_evaluate(from_arguments(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
