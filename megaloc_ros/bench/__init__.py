"""`megaloc-ros bench encoder|map|verify`: benchmarks that print measured figures.

Each benchmark lives in its own module here (encoder.py, map.py, verify.py) and exposes
``add_arguments(parser)`` and ``main(args) -> int``; this file only dispatches.
"""
from __future__ import annotations

import importlib

BENCHES = {
    "encoder": ("megaloc_ros.bench.encoder", "encoder speed and descriptor agreement per runtime/precision"),
    "map": ("megaloc_ros.bench.map", "place-map add/search speed and memory per index kind"),
    "verify": ("megaloc_ros.bench.verify", "verifier speed and accuracy"),
    "qos": ("megaloc_ros.bench.qos", "camera image delivery across processes per QoS / transport"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for name, (module, help_) in BENCHES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_, description=help_))


def main(args) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).main(args) or 0)
