"""`bench`: measurements (FLOPs, latency, memory) over library functions; grows issue by issue."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="edgecl measurements.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="median training-step latency of each engine vs torch eager")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet", "mobilenet"])
    p.add_argument("--input-shape", default="1x8x8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_step)
    return parser


def _step(args) -> int:
    import json

    from edgecl.bench.step_latency import format_table, step_latency

    shape = tuple(int(d) for d in args.input_shape.split("x"))
    result = step_latency(args.model, shape, args.batch, args.threads, args.repeats)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
