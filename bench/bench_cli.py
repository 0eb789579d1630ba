"""`bench`: measurements (FLOPs, latency, memory) over library functions; grows issue by issue."""

from __future__ import annotations

import argparse
import sys

from edgecl.bench.fresh_process import MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="edgecl measurements.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="median training-step latency of each engine vs torch eager")
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--input-shape", default="1x8x8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_step)

    p = sub.add_parser("run", help="a matrix of continual-learning runs (strategies x seeds), resumable")
    p.add_argument("--strategies", default="finetune,er,derpp,sparcl-er-0.75,sparcl-derpp-0.75,sparcl-er-0.90,"
                   "sparcl-derpp-0.90", help="comma-separated names (see edgecl.bench.matrix.STRATEGIES)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", default="fashion-mnist", choices=["digits", "fashion-mnist"])
    p.add_argument("--model", default="cnn-s2", choices=MODEL_NAMES)
    p.add_argument("--epochs", type=int, default=10, help="epochs per task")
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--out", default="results/fmnist-s2-e10", help="defaults: the README's table")
    p.set_defaults(func=_matrix)

    p = sub.add_parser("summary", help="mean and spread over seeds of a `bench run` folder, as Markdown or JSON")
    p.add_argument("out", nargs="?", default="results/fmnist-s2-e10")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_summary)

    from edgecl.bench.flops_cli import add_parsers as add_flops_devices_report  # flops, devices, report

    add_flops_devices_report(sub)

    from edgecl.bench.latency_cli import add_parsers as add_latency_memory  # latency, memory

    add_latency_memory(sub)
    return parser


def _matrix(args) -> int:
    from edgecl.bench.matrix import markdown_table, run_matrix, summarize

    run_matrix(args.strategies.split(","), [int(s) for s in args.seeds.split(",")], args.out, args.data,
               args.epochs, args.buffer, args.workers, model=args.model)
    print(markdown_table(summarize(args.out)))
    return 0


def _summary(args) -> int:
    import json

    from edgecl.bench.matrix import markdown_table, summarize

    rows = summarize(args.out)
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    return 0


def _step(args) -> int:
    import json

    from edgecl.bench.step_latency import format_table, step_latency

    shape = tuple(int(d) for d in args.input_shape.split("x"))
    result = step_latency(args.model, shape, args.batch, args.threads, args.repeats)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def main(argv=None) -> int:
    from edgecl.runtime.errors import EdgeclError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, EdgeclError) as e:  # EdgeclError: e.g. no agent on a serial port
        print(f"bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
