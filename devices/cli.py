"""`edgecl device ping|push|train|eval|bench --port PORT`: the host's commands for a board's agent.

Each subcommand opens the port, shakes hands, calls one method of `edgecl.devices.host.Device`
and prints its typed result (a table, or JSON with --json). `add_device_parser` plugs the group
into the `edgecl` command; the run table comes from the caller (`format_run`), since the bench
package that draws it sits above this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from edgecl.runtime.files import prepare_output, write_atomic

DATA_HELP = ("digits (loaded on the host, pushed once as digits-s<seed>), npz:PATH (a host .npz with x, y; pushed), "
             "board:SPEC (a data set on the board, e.g. board:npz:/data/x.npz), or the name of pushed data")


def _connect(args):
    from .host import connect

    return connect(args.port, args.baud, args.ack_timeout, args.retries, args.timeout)


def _artifact(board, name: str | None) -> str:
    """The artifact named, or the only one on the board."""
    if name:
        return name
    have = board.capabilities()["artifacts"]
    if len(have) != 1:
        raise ValueError(f"the board holds artifacts {have or 'none'}; name one with --artifact "
                         "(push one with `edgecl device push FOLDER`)")
    return have[0]


def _data_spec(board, args):
    from .host import ensure_data
    from .jobs import DataSpec

    where = ensure_data(board, args.data, args.seed, progress=not args.json)
    return DataSpec(**where, scenario=args.scenario, tasks=args.tasks, classes_per_task=args.classes_per_task,
                    seed=args.seed)


def _ping(args) -> int:
    with _connect(args) as board:
        hello = board.hello()
        caps = board.capabilities()
    if args.json:
        print(json.dumps({"hello": dataclasses.asdict(hello), "capabilities": caps}, indent=2))
        return 0
    mib = lambda n: "n/a" if n is None else f"{n / 2**20:,.0f} MiB"  # noqa: E731
    print(f"agent edgecl {hello.agent} (protocol {hello.protocol}) on {hello.machine}, "
          f"round trip {hello.round_trip_ms:.1f} ms (measured)")
    rows = [("machine", f"{caps['machine']} {caps['system']}, {caps['cpus']} CPUs"),
            ("python / numpy", f"{caps['python']} / {caps['numpy']}"),
            ("onnxruntime", f"{caps['onnxruntime']} ({', '.join(caps['providers'])})"),
            ("engines", ", ".join(caps["engines"]) or "none"),
            ("memory", f"{mib(caps['mem_available_bytes'])} available of {mib(caps['mem_total_bytes'])}"),
            ("disk free", mib(caps["disk_free_bytes"])),
            ("artifacts", ", ".join(caps["artifacts"]) or "none"), ("data", ", ".join(caps["data"]) or "none"),
            ("runs", ", ".join(caps["runs"]) or "none")]
    print("\n".join(f"  {k:<16}{v}" for k, v in rows))
    return 0


def _push(args) -> int:
    results = []
    with _connect(args) as board:
        results.append(board.push(args.artifacts, "artifact", args.name, args.chunk_bytes))
        if args.data:
            from .host import ensure_data

            ensure_data(board, args.data, args.seed, force=True)
    for r in results:
        if args.json:
            print(json.dumps(dataclasses.asdict(r)))
        else:
            print(f"pushed {r.kind} {r.name!r}: {r.files} files, {r.bytes:,} B in {r.seconds:.1f} s "
                  f"({r.retransmits} frames resent), sha256 checked on the board: {r.board_path}")
    return 0


def _check_split_flags(args) -> None:
    """The split flags, checked before the port is opened (where the data is, only the board says)."""
    from .jobs import DataSpec

    DataSpec(board_path=args.data, scenario=args.scenario, tasks=args.tasks, classes_per_task=args.classes_per_task)


def _train(args, format_run) -> int:
    from edgecl.runtime.job import LearnerSpec

    from .jobs import TrainSpec

    learner = dict(method=args.method, sparsity=None if args.dense else args.sparsity, tdm=not args.no_tdm,
                   dgm=not args.no_dgm, ddr=not args.no_ddr, buffer=args.buffer, budget=args.budget,
                   epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed, threads=args.threads,
                   checkpoint_every=args.checkpoint_every)
    LearnerSpec(**learner)  # every learner flag, before the port is opened and data is pushed
    _check_split_flags(args)
    if args.json:
        prepare_output(args.json)  # before the board trains, not after
    with _connect(args) as board:
        artifact = _artifact(board, args.artifact)
        data = _data_spec(board, args)
        fields = dict(artifact=artifact, data=data, **learner)
        run = args.run or "run-" + hashlib.sha256(json.dumps(
            {k: dataclasses.asdict(v) if k == "data" else v for k, v in fields.items() if k != "threads"},
            sort_keys=True).encode()).hexdigest()[:10]
        spec = TrainSpec(run=run, **fields)
        if not args.quiet:
            print(f"training run {run!r} on the board: {spec.strategy().label}, {data.tasks} tasks x "
                  f"{spec.epochs} epochs", flush=True)

        def progress(msg: dict) -> None:
            if not args.quiet:
                print(f"  step {msg['step']:>6}  loss {msg['loss']:.4f}", flush=True)

        result = board.train(spec, progress, restart=args.restart)
        fetched = board.fetch_checkpoint(run, Path(args.fetch) / run) if args.fetch else None
    print(format_run(result) if format_run else json.dumps(result.to_dict(), indent=2))
    if fetched is not None:
        print(f"checkpoint {fetched.checkpoint} copied to {fetched.path} (sha256 checked)")
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _eval(args) -> int:
    _check_split_flags(args)
    with _connect(args) as board:
        artifact = _artifact(board, args.artifact)
        result = board.evaluate(artifact, _data_spec(board, args), args.run, args.threads)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    print(f"accuracy on the board ({artifact}, weights: {result.source}), %")
    print(f"{'task':<6}{'class-IL':>10}{'task-IL':>10}")
    for t, (c, k) in enumerate(zip(result.class_il, result.task_il)):
        print(f"{t + 1:<6}{100 * c:>10.2f}{100 * k:>10.2f}")
    return 0


def _bench(args) -> int:
    with _connect(args) as board:
        artifact = _artifact(board, args.artifact)
        r = board.bench(artifact, args.batch, args.steps, args.warmup, args.threads)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"latency measured on the board ({r.machine}): {r.engine} engine, {artifact}, batch {r.batch}, "
              f"{r.threads} threads, {r.steps} calls each\n"
              f"  training step  median {r.median_ms:8.3f} ms   IQR {r.iqr_ms:.3f} ms\n"
              f"  inference      median {r.infer_median_ms:8.3f} ms   IQR {r.infer_iqr_ms:.3f} ms")
    return 0


def add_device_parser(sub, format_run=None) -> argparse.ArgumentParser:
    """Add `device` and its subcommands to an argparse subparsers object."""
    device = sub.add_parser("device", help="talk to a board running edgecl-agent over a serial link")
    dsub = device.add_subparsers(dest="device_command", required=True)

    def common(p):
        p.add_argument("--port", required=True, help="pyserial URL: /dev/ttyUSB0, /dev/ttyACM0, socket://HOST:PORT")
        p.add_argument("--baud", type=int, default=115200)
        p.add_argument("--ack-timeout", type=float, default=2.0, help="seconds before a frame is resent")
        p.add_argument("--retries", type=int, default=5, help="resends of a frame before giving up")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds of silence before a request is "
                       "given up (the agent sends a heartbeat every second while busy)")
        return p

    def data(p, seed=True):
        p.add_argument("--data", default="digits", help=DATA_HELP)
        p.add_argument("--scenario", default="split", choices=["split", "permuted"])
        p.add_argument("--tasks", type=int, default=5, help="tasks to train (Split Digits: 2 classes each)")
        p.add_argument("--classes-per-task", type=int, default=2)
        if seed:
            p.add_argument("--seed", type=int, default=0)

    p = common(dsub.add_parser("ping", help="handshake and the board's capabilities"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_ping)

    p = common(dsub.add_parser("push", help="send an artifact folder (from `edgecl export`), optionally data"))
    p.add_argument("artifacts")
    p.add_argument("--name", default=None, help="name on the board (default: the folder's name)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the data's train/test split")
    p.add_argument("--chunk-bytes", type=int, default=4096)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_push)

    p = common(dsub.add_parser("train", help="continual learning on the board (resumes a run with the same "
                                             "settings)"))
    p.add_argument("--artifact", default=None, help="artifact on the board (default: the only one)")
    data(p)
    p.add_argument("--run", default=None, help="run id (default: derived from the settings, so a repeat resumes)")
    p.add_argument("--restart", action="store_true", help="drop the run's checkpoints on the board first")
    p.add_argument("--method", default="derpp", choices=["finetune", "joint", "er", "derpp"])
    p.add_argument("--sparsity", type=float, default=None, help="SparCL weight sparsity (default 0.75)")
    p.add_argument("--dense", action="store_true")
    p.add_argument("--no-tdm", action="store_true")
    p.add_argument("--no-dgm", action="store_true")
    p.add_argument("--no-ddr", action="store_true")
    p.add_argument("--buffer", type=int, default=None, help="replay examples (default 500, or what --budget leaves)")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 4MiB")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: task ends)")
    p.add_argument("--fetch", default=None, metavar="DIR", help="copy the run's checkpoint to DIR/<run>")
    p.add_argument("--json", default=None, metavar="FILE", help="write every metric as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=lambda args: _train(learner_flags(args), format_run))

    p = common(dsub.add_parser("eval", help="accuracy per task on the board (artifact or a run's checkpoint)"))
    p.add_argument("--artifact", default=None)
    data(p)
    p.add_argument("--run", default=None, help="evaluate this run's latest checkpoint (default: the artifact)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = common(dsub.add_parser("bench", help="training-step latency measured on the board"))
    p.add_argument("--artifact", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
    return device


REPLAY_METHODS = ("er", "derpp")


def learner_flags(args, sparsity: float = 0.75, buffer: int = 500):
    """Refuse learner flags that another flag makes meaningless, then fill the defaults that depend on others.

    Shared by `edgecl run`, `edgecl device train` and `bench drift`: their parsers leave --sparsity
    and --buffer at None so that a value given explicitly is told from the default.

    Raises:
        ValueError: --sparsity with --dense, an ablation (--no-tdm, --no-dgm, --no-ddr) with --dense,
            or --buffer or --sparsity with a method that replays nothing (finetune, joint), naming
            both flags. Without --sparsity, finetune and joint train dense (they are the bounds).
    """
    if args.dense and args.sparsity is not None:
        raise ValueError(f"--sparsity {args.sparsity} with --dense: a dense run has no sparsity; accepted: one of "
                         "the two (--sparsity alone runs SparCL)")
    ablations = [f"--no-{part}" for part in ("tdm", "dgm", "ddr") if getattr(args, f"no_{part}", False)]
    if args.dense and ablations:
        raise ValueError(f"{', '.join(ablations)} with --dense: TDM, DGM and DDR are parts of SparCL, which a dense "
                         "run does not use; accepted: the ablation flags without --dense")
    if args.method not in REPLAY_METHODS and getattr(args, "buffer", None) is not None:
        raise ValueError(f"--buffer {args.buffer} with --method {args.method}: {args.method} replays nothing, so it "
                         f"has no buffer; accepted: --buffer with --method {' or '.join(REPLAY_METHODS)}")
    if args.method not in REPLAY_METHODS and args.sparsity is not None:
        raise ValueError(f"--sparsity {args.sparsity} with --method {args.method}: SparCL runs on "
                         f"{' or '.join(REPLAY_METHODS)}; accepted: --method {args.method} alone (it trains dense)")
    if not args.dense and args.sparsity is None and args.method in REPLAY_METHODS:
        args.sparsity = sparsity  # finetune and joint are the dense bounds: no default sparsity
    if args.method in REPLAY_METHODS and args.buffer is None and getattr(args, "budget", None) is None:
        args.buffer = buffer
    return args


def main(argv=None) -> int:
    """`python -m edgecl.devices.cli device ...` without the bench package (JSON result, no table)."""
    parser = argparse.ArgumentParser(prog="edgecl")
    add_device_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
