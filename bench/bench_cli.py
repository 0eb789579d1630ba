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

    p = sub.add_parser("drift", help="final ACC of two engines from the same seed, next to one ulp of float32 noise")
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--method", default="derpp", choices=["finetune", "joint", "er", "derpp"])
    p.add_argument("--sparsity", type=float, default=None, help="SparCL weight sparsity (default 0.75)")
    p.add_argument("--dense", action="store_true", help="no SparCL (no --sparsity)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the data set's, as edgecl run)")
    p.add_argument("--buffer", type=int, default=None, help="replay examples (default 500; er and derpp only)")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--engine-a", default="portable", choices=["portable", "ort-training", "torch"])
    p.add_argument("--engine-b", default="torch", choices=["portable", "ort-training", "torch"])
    p.add_argument("--out", default="out", help="where exports are cached")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=_drift)

    from edgecl.bench.flops_cli import add_parsers as add_flops_devices_report  # flops, devices, report

    add_flops_devices_report(sub)

    from edgecl.bench.latency_cli import add_parsers as add_latency_memory  # latency, memory, kernels, pair

    add_latency_memory(sub)
    return parser


def _matrix(args) -> int:
    from edgecl.bench.matrix import markdown_table, run_matrix, summarize

    run_matrix(args.strategies.split(","), seeds_flag(args.seeds), args.out, args.data, args.epochs, args.buffer,
               args.workers, model=args.model)
    print(markdown_table(summarize(args.out)))
    return 0


def _drift(args) -> int:
    import json

    from edgecl.bench.cl_run import DATA_DEFAULTS, JobConfig
    from edgecl.bench.drift import format_table, measure_drift
    from edgecl.runtime.files import prepare_output, write_atomic

    from edgecl.devices.cli import learner_flags

    learner_flags(args)
    seeds = seeds_flag(args.seeds)
    defaults = DATA_DEFAULTS[args.data]
    job = JobConfig(data=args.data, model=args.model, engine=args.engine_a, method=args.method,
                    sparsity=None if args.dense else args.sparsity, buffer=args.buffer,
                    epochs=defaults["epochs"] if args.epochs is None else args.epochs, lr=defaults["lr"], threads=1)
    if args.json:
        prepare_output(args.json)  # before minutes of runs
    result = measure_drift(job, seeds, args.engine_b, args.out)
    print(format_table(result))
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
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

    from edgecl.bench.fresh_process import parse_shape

    result = step_latency(args.model, parse_shape(args.input_shape), args.batch, args.threads, args.repeats)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def seeds_flag(text: str) -> list[int]:
    """--seeds "0,1,2" as integers; RunConfig checks their range.

    Raises:
        ValueError: naming --seeds, the text and what is accepted.
    """
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}; accepted: integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed; accepted: distinct integers, e.g. 0,1,2")
    return seeds


def main(argv=None) -> int:
    from edgecl.bench.flags import command_options, name_flags
    from edgecl.runtime.errors import EdgeclError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    # EdgeclError: e.g. no agent on a serial port; FileNotFoundError: e.g. no run JSON in a folder; KeyError: a
    # missing key of a file read (its name is the message)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError, PermissionError, EdgeclError) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"bench {args.command}: error: {name_flags(message, command_options(parser, args))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
