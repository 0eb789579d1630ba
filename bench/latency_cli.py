"""`bench latency` and `bench memory`: argument parsing and printing over the library functions."""

from __future__ import annotations

import argparse
import json

from .fresh_process import ENGINES, MODEL_NAMES, parse_shape


def _engines(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cnn", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--input-shape", default="1x8x8", help="one sample, C x H x W (e.g. 1x28x28)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, among " + ", ".join(ENGINES))
    p.add_argument("--target", default="host", help="label of the machine measured")
    p.add_argument("--runtime-python", default=None,
                   help="interpreter for the runtime-only processes (e.g. .venv-stock-ort/bin/python)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="keep the exports in DIR and reuse them next time (default: a temporary folder)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the result as JSON")
    out.add_argument("--csv", action="store_true", help="the rows as CSV")


def add_parsers(sub) -> None:
    """Add the `latency` and `memory` subcommands to `bench`'s subparsers."""
    p = sub.add_parser("latency", help="training-step, inference and cold-start latency per engine vs torch eager")
    _common(p)
    p.add_argument("--repeats", type=int, default=50, help="timed calls per engine and phase")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--cold-starts", type=int, default=3, help="fresh processes per engine (0: none)")
    p.add_argument("--phases", default="train,infer,cold_start", help="comma-separated: train, infer, cold_start")
    p.add_argument("--device", default=None, help="a device profile name: adds rows projected by the roofline")
    p.set_defaults(func=_latency)

    p = sub.add_parser("memory", help="peak resident memory of a training run in a fresh process per engine")
    _common(p)
    p.add_argument("--steps", type=int, default=20, help="training steps of each run")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine (median peak)")
    p.add_argument("--device", default=None, metavar="serial:PORT",
                   help="measure the portable engine's process on the board whose agent listens on PORT")
    p.set_defaults(func=_memory)


def _latency(args) -> int:
    from .latency import LatencyConfig, format_table, measure_latency, to_csv

    config = LatencyConfig(args.model, parse_shape(args.input_shape), args.batch, args.threads, args.repeats,
                           args.warmup, args.cold_starts, _engines(args.engines), _engines(args.phases),
                           args.target, args.device, args.seed, args.runtime_python)
    result = measure_latency(config, args.artifacts)
    print(json.dumps(result.to_dict(), indent=2) if args.json else to_csv(result) if args.csv
          else format_table(result))
    return 0


def _memory(args) -> int:
    from .memory import MemoryConfig, format_table, measure_memory, to_csv

    config = MemoryConfig(args.model, parse_shape(args.input_shape), args.batch, args.threads, args.steps,
                          args.repeats, _engines(args.engines), args.target, args.seed, args.runtime_python,
                          args.device)
    result = measure_memory(config, args.artifacts)
    print(json.dumps(result.to_dict(), indent=2) if args.json else to_csv(result) if args.csv
          else format_table(result))
    return 0
