"""`bench latency`, `bench memory`, `bench kernels`, `bench pair` and `bench online`: argument parsing and printing
over the library functions."""

from __future__ import annotations

import argparse
import json

from .fresh_process import ENGINES, MODEL_NAMES, parse_shape

ARTIFACTS_HELP = ("an export to bench as it is, on the engine its manifest names: read only, nothing exported, "
                  "no torch needed (instead of --model)")


def _engines(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(e.strip() for e in text.split(",") if e.strip())


def add_model_flags(p: argparse.ArgumentParser, default_shape: str = "1x8x8") -> None:
    """--model, --input-shape and --classes: a built-in family or the user's FILE.py:FUNCTION."""
    p.add_argument("--model", default=None, metavar="NAME|FILE.py:FUNCTION",
                   help=f"a built-in family ({', '.join(MODEL_NAMES)}; default cnn) or your own model: a Python "
                   "file and a function in it returning an nn.Module, called with no arguments (needs --input-shape)")
    p.add_argument("--input-shape", default=None, help=f"one sample, C x H x W (e.g. 3x32x32; default "
                   f"{default_shape} for a built-in family)")
    p.add_argument("--classes", type=int, default=None, help="logits width of the model (default 10)")


def refuse_with_artifacts(args) -> None:
    """--artifacts alone: refuse it with --model, --input-shape, --classes or --cache, naming them.

    Raises:
        ValueError: naming the flags given with --artifacts and what is accepted.
    """
    if getattr(args, "artifacts", None) is None:
        return
    given = [flag for flag, dest in (("--model", "model"), ("--input-shape", "input_shape"), ("--classes", "classes"),
                                     ("--cache", "cache")) if getattr(args, dest, None) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} with --artifacts {args.artifacts!r}: an export is benched as it is, "
                         "its manifest gives the model, its input, classes and engine, and nothing is exported or "
                         "cached; accepted: --artifacts alone, or --model with --input-shape, --classes, --cache")


def _common(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    p.add_argument("--engines", default=None, help="comma-separated, among " + ", ".join(ENGINES) +
                   " (default: all; with --artifacts: the export's own engine)")
    p.add_argument("--target", default="host", help="label of the machine measured")
    p.add_argument("--runtime-python", default=None,
                   help="interpreter for the runtime-only processes (e.g. .venv-stock-ort/bin/python)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifacts", default=None, metavar="DIR", help=ARTIFACTS_HELP)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep bench's exports of --model in DIR and reuse them next time (default: a temporary "
                   "folder); never an export of yours (that is --artifacts)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the result as JSON")
    out.add_argument("--csv", action="store_true", help="the rows as CSV")


def add_parsers(sub) -> None:
    """Add the `latency`, `memory`, `kernels`, `pair` and `online` subcommands to `bench`'s subparsers."""
    p = sub.add_parser("latency", help="training-step, inference and cold-start latency per engine vs torch eager")
    _common(p)
    p.add_argument("--repeats", type=int, default=50, help="timed calls per engine and phase")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--cold-starts", type=int, default=3, help="fresh processes per engine (0: none)")
    p.add_argument("--phases", default=None, help="comma-separated: train, infer, cold_start (default: all; with "
                   "channels: train,infer)")
    p.add_argument("--device", default=None, help="a device profile name: adds rows projected by the roofline")
    p.add_argument("--channel-density", default=None, metavar="D[,D...]",
                   help="shares in (0, 1] of every channel set, e.g. 1,0.75,0.5,0.25: a channel-structured export's "
                   "step per density (its largest channels by sum |w|) against the dense portable step, with the "
                   "counted FLOPs ratio (portable engine only)")
    p.add_argument("--channels", default=None, metavar="FILE",
                   help="active channels for one more such row: an engine state .npz (Engine.save, a checkpoint's "
                   "engine.npz) or JSON {set: [indices]}")
    p.set_defaults(func=_latency)

    p = sub.add_parser("memory", help="peak resident memory of a training run in a fresh process per engine")
    _common(p)
    p.add_argument("--steps", type=int, default=20, help="training steps of each run")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine (median peak)")
    p.add_argument("--device", default=None, metavar="serial:PORT",
                   help="measure the portable engine's process on the board whose agent listens on PORT")
    p.set_defaults(func=_memory)

    p = sub.add_parser("kernels", help="ONNX Runtime's profile of an engine's training step: kernel time per op type")
    add_model_flags(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--engines", default=None, help="comma-separated, among portable, ort-training (default: both; "
                   "with --artifacts: the export's own engine)")
    p.add_argument("--runtime-python", default=None,
                   help="interpreter of the profiled runtime-only processes (e.g. .venv-stock-ort/bin/python)")
    p.add_argument("--seed", type=int, default=0, help="the model's initial weights and the random batch")
    p.add_argument("--artifacts", default=None, metavar="DIR", help=ARTIFACTS_HELP)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep bench's exports of --model in DIR and reuse them next time (default: a temporary "
                   "folder); never an export of yours (that is --artifacts)")
    p.add_argument("--repeats", type=int, default=10, help="profiled training steps per engine")
    p.add_argument("--warmup", type=int, default=3, help="steps run first, left out of the figures")
    p.add_argument("--top", type=int, default=12, help="op types shown by share before \"other\"")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=_kernels)

    p = sub.add_parser("pair", help="two exports' training steps in one process, interleaved: the ratio B / A")
    p.add_argument("artifacts_a", metavar="A", help="an export (e.g. made by the code before a change)")
    p.add_argument("artifacts_b", metavar="B", help="an export of the same input shape and classes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both engines")
    p.add_argument("--pairs", type=int, default=20, help="timed pairs (the order swaps every pair)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each engine first")
    p.add_argument("--seed", type=int, default=0, help="the random batch")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=_pair)


    p = sub.add_parser("online", help="latency of one call of the online learner, learn(1), learn(8), predict(1), "
                       "per method")
    p.add_argument("--model", default=None, choices=MODEL_NAMES, help="a built-in family (default cnn), exported into "
                   "--cache in another process")
    p.add_argument("--input-shape", default=None, help="one sample, C x H x W (default 1x28x28, Fashion-MNIST's)")
    p.add_argument("--classes", type=int, default=None, help="logits width (default 10)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="an export to bench as it is (instead of --model)")
    p.add_argument("--cache", default=None, metavar="DIR", help="where --model's export is cached (default: out, as "
                   "edgecl run)")
    p.add_argument("--methods", default="finetune,er,derpp,sparcl-derpp",
                   help="comma-separated, among finetune, er, derpp, sparcl-er, sparcl-derpp")
    p.add_argument("--sparsity", type=float, default=0.75, help="SparCL's weight sparsity (sparcl-* methods)")
    p.add_argument("--learn-sizes", default="1,8", help="samples per timed learn call, comma-separated")
    p.add_argument("--predict-sizes", default="1", help="samples per timed predict call, comma-separated")
    p.add_argument("--buffer-bytes", default="8MiB", help="storage of each replay buffer")
    p.add_argument("--replay-batch", type=int, default=32)
    p.add_argument("--replay-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every learner")
    p.add_argument("--repeats", type=int, default=30, help="timed calls of each kind per method")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0, help="the model's initial weights, the learners and the inputs")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=_online)

def _shape(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else parse_shape(text)


def _latency(args) -> int:
    from .latency import LatencyConfig, format_table, measure_latency, to_csv

    refuse_with_artifacts(args)
    if args.csv and (args.channel_density is not None or args.channels is not None):
        given = "--channel-density" if args.channel_density is not None else "--channels"
        raise ValueError(f"--csv with {given}: the channel rows have columns of their own (vs dense, FLOPs vs "
                         "dense); accepted: the table (default) or --json")
    densities = None
    if args.channel_density is not None:
        from .channel_bench import parse_densities

        densities = parse_densities(args.channel_density)
    config = LatencyConfig(args.model, _shape(args.input_shape), args.batch, args.threads, args.repeats,
                           args.warmup, args.cold_starts, _engines(args.engines), _engines(args.phases),
                           args.target, args.device, args.seed, args.runtime_python, args.classes, args.artifacts,
                           densities, args.channels)
    result = measure_latency(config, args.cache)
    print(json.dumps(result.to_dict(), indent=2) if args.json else to_csv(result) if args.csv
          else format_table(result))
    return 0


def _memory(args) -> int:
    from .memory import MemoryConfig, format_table, measure_memory, to_csv

    refuse_with_artifacts(args)
    config = MemoryConfig(args.model, _shape(args.input_shape), args.batch, args.threads, args.steps,
                          args.repeats, _engines(args.engines), args.target, args.seed, args.runtime_python,
                          args.device, args.classes, args.artifacts)
    result = measure_memory(config, args.cache)
    print(json.dumps(result.to_dict(), indent=2) if args.json else to_csv(result) if args.csv
          else format_table(result))
    return 0


def _kernels(args) -> int:
    from edgecl.runtime.files import prepare_output, write_atomic

    from .kernels import KernelsConfig, check_top, format_table, measure_kernels
    from .subject import check_cache_dir

    refuse_with_artifacts(args)
    config = KernelsConfig(args.model, _shape(args.input_shape), args.batch, args.threads, args.repeats, args.warmup,
                           _engines(args.engines), args.seed, args.runtime_python, args.classes, args.artifacts)
    check_top(args.top)
    check_cache_dir(args.cache, config.subject)  # both before --json's folder is created
    if args.json:
        try:
            prepare_output(args.json)  # before the export and the runs
        except ValueError as e:
            raise ValueError(f"--json {e}") from None
    result = measure_kernels(config, args.cache)
    print(format_table(result, args.top))
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _pair(args) -> int:
    from .pair import format_pair, measure_pair

    result = measure_pair(args.artifacts_a, args.artifacts_b, batch=args.batch, threads=args.threads,
                          pairs=args.pairs, warmup=args.warmup, seed=args.seed)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_pair(result))
    return 0


def _sizes(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}; accepted: integers separated by commas, e.g. 1,8") from None


def _online(args) -> int:
    from .online_latency import OnlineLatencyConfig, format_table, measure_online_latency

    refuse_with_artifacts(args)
    config = OnlineLatencyConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                                 sparsity=args.sparsity, learn_sizes=_sizes("--learn-sizes", args.learn_sizes),
                                 predict_sizes=_sizes("--predict-sizes", args.predict_sizes),
                                 buffer_bytes=args.buffer_bytes, replay_batch=args.replay_batch,
                                 replay_steps=args.replay_steps, lr=args.lr, threads=args.threads,
                                 repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    if args.artifacts is not None:
        folder, model = args.artifacts, None
    else:
        from .export_cache import export_in_child
        from .subject import check_shape

        model = args.model or "cnn"
        shape = check_shape(model, parse_shape(args.input_shape or "1x28x28"))
        classes = 10 if args.classes is None else args.classes
        if classes < 2:
            raise ValueError(f"--classes {classes}; accepted: an integer >= 2")
        folder = export_in_child(model, shape, classes, [args.seed], args.cache or "out")[args.seed]
    result = measure_online_latency(folder, config, model)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0
