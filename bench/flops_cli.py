"""The `bench flops`, `bench devices` and `bench report` subcommands: argument parsing and printing only.

`edgecl.bench.bench_cli` calls `add_parsers(sub)`; each handler calls one library function
(`flops_report`, `devices_table`, `write_report`) and prints its typed result: a human table
by default, `--json` (and `--csv` for flops) for machines.
"""

from __future__ import annotations

import json

from edgecl.bench.latency_cli import add_model_flags, refuse_with_artifacts

DEFAULT_SHAPE = (1, 28, 28)  # of the built-in families here


def add_parsers(sub) -> None:
    """Add the three subcommands to a `bench` subparsers object."""
    p = sub.add_parser("flops", help="training FLOPs per step/epoch/run, per layer and phase (+ projected latency)")
    add_model_flags(p, "x".join(map(str, DEFAULT_SHAPE)))
    p.add_argument("--artifacts", metavar="DIR", help="an export: count its manifest's layer table (read only, no "
                   "torch needed; instead of --model)")
    p.add_argument("--batch", type=int, default=32, help="stream examples per step")
    p.add_argument("--replay", type=int, default=0, help="buffer examples added to each step (DER++: 2 x replay batch)")
    p.add_argument("--examples", type=int, default=12_000, help="stream examples per epoch before data removal")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task")
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.0, help="weight sparsity of the sparse layers (TDM)")
    p.add_argument("--grad-density", type=float, default=1.0, help="fraction of sparse layers' gradients kept (DGM)")
    p.add_argument("--data-removal", type=float, default=0.0, help="fraction of stream examples removed (DDR)")
    p.add_argument("--frozen", default="", help="comma-separated weight names of frozen layers")
    p.add_argument("--all-sparse", action="store_true", help="sparsify the first and last layer too")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--channel-density", type=float, default=None, metavar="D",
                   help="count a channel-structured graph (export structure='channel') with this share in (0, 1] "
                   "of every channel set active: the products of the narrowed tensors")
    p.add_argument("--channels", default=None, metavar="FILE",
                   help="instead, the active channels of a file: an engine state .npz (Engine.save, a checkpoint's "
                   "engine.npz) or JSON {set: [indices]}")
    p.add_argument("--device", help="a profile name (bench devices): add its PROJECTED roofline latency")
    p.add_argument("--profile", action="append", default=[], help="a user profile TOML file (repeatable)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=_flops)

    p = sub.add_parser("devices", help="device profiles: built-in boards (datasheet), the host (measured), yours")
    p.add_argument("--profile", action="append", default=[], help="a user profile TOML file (repeatable)")
    p.add_argument("--probe", action="store_true", help="measure the host again (else the cached measurement)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads of the host's matmul probe")
    p.add_argument("--cache", help="file keeping the host measurement (default ~/.cache/edgecl/host-profile.toml)")
    p.add_argument("--no-host", action="store_true", help="leave the host out (no probe)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_devices)

    p = sub.add_parser("report", help="a Markdown report with PNG plots from saved results")
    p.add_argument("--runs", help="a `bench run` folder (its runs/*.json); default results/fmnist-s2-e10 when no "
                   "--latency / --memory file is given")
    p.add_argument("--latency", action="append", default=[], help="`bench latency --json` output (repeatable)")
    p.add_argument("--memory", action="append", default=[], help="`bench memory --json` output (repeatable)")
    p.add_argument("--out", default="results/report", help="folder for report.md and the PNGs")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_report)


def _profiles(files, with_host: bool, cache=None, probe: bool = False, threads: int = 2):
    from edgecl.bench.devices_table import DEFAULT_HOST_CACHE, devices_table

    return devices_table(files, host=with_host, probe=probe, threads=threads,
                         cache=DEFAULT_HOST_CACHE if cache is None else cache)


def _flops(args) -> int:
    from edgecl.bench.flops_report import flops_report, format_table, to_csv
    from edgecl.runtime.flops import SparsityConfig
    from edgecl.runtime.optim import OptimizerConfig

    from edgecl.bench.subject import NUM_CLASSES, parse_shape, split_model_file

    refuse_with_artifacts(args)
    if args.profile and not args.device:
        raise ValueError(f"--profile {' '.join(args.profile)} without --device: a profile only matters for the "
                         "device whose latency is projected; accepted: --device NAME with it")
    model = args.model or "cnn"
    shape = parse_shape(args.input_shape) if args.input_shape is not None else (
        None if split_model_file(model) is not None else DEFAULT_SHAPE)  # a model file's input is required
    sparsity = SparsityConfig(args.sparsity, args.grad_density, args.data_removal,
                              tuple(n for n in args.frozen.split(",") if n), not args.all_sparse)
    device = None
    if args.device:
        device = _profiles(args.profile, with_host=args.device == "host").get(args.device)
    report = flops_report(model, shape, args.artifacts, sparsity, args.batch, args.replay, args.examples,
                          args.epochs, args.tasks, OptimizerConfig(args.optimizer, momentum=args.momentum), device,
                          NUM_CLASSES if args.classes is None else args.classes, args.channel_density, args.channels)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(format_table(report))
    return 0


def _devices(args) -> int:
    from edgecl.bench.devices_table import format_table

    if args.no_host and (args.probe or args.cache is not None):
        given = " and ".join(f for f, v in (("--probe", args.probe), ("--cache", args.cache)) if v)
        raise ValueError(f"{given} with --no-host: both are about the host's measurement, which --no-host leaves "
                         "out; accepted: one or the other")
    table = _profiles(args.profile, not args.no_host, args.cache, args.probe, args.threads)
    print(json.dumps(table.to_dict(), indent=2) if args.json else format_table(table))
    return 0


def _report(args) -> int:
    from edgecl.bench.report import write_report

    runs = args.runs or (None if args.latency or args.memory else "results/fmnist-s2-e10")
    result = write_report(args.out, runs=runs, latency=args.latency, memory=args.memory)
    print(json.dumps(result.to_dict(), indent=2) if args.json else f"wrote {result.markdown}\n" + "\n".join(
        f"wrote {p}" for p in result.plots))
    return 0

