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

    p = sub.add_parser("stream", help="the online learner on a class-incremental stream, each sample seen once: "
                       "final accuracy and wall time per method")
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--methods", default="finetune,er,derpp,sparcl-derpp",
                   help="comma-separated, among finetune, er, derpp, sparcl-er, sparcl-derpp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--group", default="1-8", metavar="LO-HI", help="samples per learn call, uniform in LO..HI")
    p.add_argument("--sparsity", type=float, default=0.75, help="SparCL's weight sparsity (sparcl-* methods)")
    p.add_argument("--buffer-bytes", default="8MiB", help="storage of each replay buffer (e.g. 8MiB)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: the data set's, as edgecl run)")
    p.add_argument("--batch", type=int, default=32, help="most stream samples in one step (a larger group is split)")
    p.add_argument("--replay-batch", type=int, default=32, help="buffer examples per step (DER++ draws two batches)")
    p.add_argument("--replay-steps", type=int, default=0, help="replay-only steps after each stream step")
    p.add_argument("--tdm-every", type=int, default=250, help="steps between SparCL's mask updates")
    p.add_argument("--class-order", default="natural", choices=["natural", "seeded"])
    p.add_argument("--train-per-class", type=int, default=None, help="a fixed random subset per class (default: all)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every learner")
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES, help="the family exported (edgecl run's default)")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="your export, for every seed (nothing exported, no torch); instead of --model")
    p.add_argument("--out", default="out", help="where exports are cached (as edgecl run)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="accuracy after each task per method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_stream)

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


def _stream(args) -> int:
    import json

    from edgecl.bench.stream_report import format_table, plot_stream
    from edgecl.bench.stream_run import DATA_SHAPES, StreamConfig, run_stream
    from edgecl.runtime.files import prepare_output, write_atomic

    config = StreamConfig(data=args.data, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                          seeds=tuple(seeds_flag(args.seeds)), group=group_flag(args.group), sparsity=args.sparsity,
                          buffer_bytes=args.buffer_bytes, lr=args.lr, batch_size=args.batch,
                          replay_batch=args.replay_batch, replay_steps=args.replay_steps, tdm_every=args.tdm_every,
                          class_order=args.class_order, train_per_class=args.train_per_class, threads=args.threads,
                          model=args.model)
    for flag, path, suffixes in (("--json", args.json, None), ("--plot", args.plot, (".png",))):
        if path:
            try:
                prepare_output(path, suffixes)  # before minutes of runs
            except ValueError as e:
                raise ValueError(f"{flag} {e}") from None
    if args.artifacts is not None:
        artifacts = args.artifacts
    else:
        from edgecl.bench.export_cache import export_in_child

        artifacts = export_in_child(config.model, DATA_SHAPES[config.data], 10, config.seeds, args.out)
    result = run_stream(config, artifacts, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_stream(result, args.plot)}")
    return 0


def group_flag(text: str) -> tuple[int, int]:
    """--group "1-8" (or "4": always 4) as (lo, hi); StreamConfig checks the range.

    Raises:
        ValueError: naming --group, the text and what is accepted.
    """
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ValueError(f"--group {text!r}; accepted: LO-HI or N, positive integers, e.g. 1-8")
    return (parts[0], parts[-1])


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
