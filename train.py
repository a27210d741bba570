"""Train a skin-lesion classifier.

    python train.py                                   # the bundled recipe (multisource) on ../shared/data
    python train.py --recipe smoke --data DIR --workdir runs/try
    python train.py --workdir runs/default --resume   # continue an interrupted run
    python train.py --list_recipes                    # the recipes and what each is for
    python train.py --coordinator_address HOST:PORT --num_processes 2 --process_id 0   # on several hosts
    python train.py --recipe smoke --help             # every flag, with smoke's values

Every TrainConfig field is a flag (see --help); the run writes config.json, split.csv, log.jsonl,
learning_curves.png, latest/ (resume) and best/ (the checkpoint to evaluate and serve) in --workdir.
"""
import argparse
import sys
import traceback

from model.config import add_arguments, add_distributed_arguments, from_arguments, recipe_of
from model.distributed import initialize, leave
from model.errors import UserError


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter),
                           recipe=recipe_of(sys.argv[1:] if argv is None else argv))
    args = add_distributed_arguments(parser).parse_args(argv)
    try:
        initialize(args.coordinator_address, args.num_processes, args.process_id)
        from model.train import train_and_evaluate
        train_and_evaluate(from_arguments(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return leave(2)
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; continue with --resume", file=sys.stderr)
        return leave(130)
    except Exception as e:   # noqa: BLE001 (printed as Python would; `leave` then stops the other processes)
        traceback.print_exc()
        return leave(1, e)
    return 0


if __name__ == "__main__":
    from model.runtime import use_huge_pages
    use_huge_pages()   # XLA:CPU's buffers on huge pages: restarts this process once (model/runtime.py)
    sys.exit(main())
