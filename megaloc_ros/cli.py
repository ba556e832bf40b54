"""The `megaloc-ros` command line.

Each subcommand lives in the module that owns the idea and exposes
``add_arguments(parser)`` and ``main(args) -> int``; this file only dispatches, and imports a
module only when its command runs (so `megaloc-ros --help` stays fast and ROS-free).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megaloc_ros.errors import MegalocError

# name -> (module, one-line help)
COMMANDS = {
    "export": ("megaloc_ros.encoding.export", "export MegaLoc (or the offline backbone) to ONNX and check it"),
    "bench": ("megaloc_ros.bench", "benchmarks: `bench encoder`, `bench map`, `bench verify`"),
    "make-bag": ("megaloc_ros.io.bag", "write a rosbag2 (sqlite3 or mcap) from an image folder"),
    "eval": ("megaloc_ros.eval_cli", "replay a rosbag2 and score loop closures against ground truth"),
    "run": ("megaloc_ros.ros.runner", "start the ROS 2 nodes in one process (what the launch file starts)"),
    "demo": ("megaloc_ros.demo", "the end-to-end demo on the shipped rtabmap sequence"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaloc-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == argv_command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except MegalocError as exc:  # bad input: one clear line, no traceback
        print(f"megaloc-ros {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
