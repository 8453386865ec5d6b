"""The ``cellflow`` command: what a user needs outside Snakemake."""

from __future__ import annotations

import argparse
import sys

from cellflow.config import ConfigError, dataset_configs, load_config


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    for dataset in dataset_configs(config).values():
        root = f", root {dataset.root}" if dataset.root else ""
        print(f"{dataset.name}: {dataset.kind}, {len(dataset.classes)} classes, "
              f"{dataset.resolution} px{root}")
    print(f"{path}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file against the schema")
    check.add_argument("config", help="path to a YAML config, e.g. config/paper.yaml")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
