"""`edgecl`: the user's command. Each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _export(args) -> int:
    import torch

    from edgecl.exporters import build_model, export

    shape = tuple(int(d) for d in args.input_shape.split("x"))
    model = build_model(args.model, shape, args.classes, seed=args.seed)
    result = export(model, torch.zeros(2, *shape), args.out, engine=args.engine,
                    masks="weights" if args.masks else None)
    if args.json:
        print(json.dumps(result.manifest.to_dict(), indent=2))
    else:
        print(f"wrote {result.folder} ({result.manifest.engine})")
        for name, entry in result.manifest.files.items():
            print(f"  {name:<24} {entry.bytes:>10,} B  sha256 {entry.sha256[:16]}")
    return 0


def _train(args) -> int:
    from edgecl.bench.quickstart import format_result, train_from_artifacts

    result = train_from_artifacts(args.artifacts, args.data, args.steps, args.batch, args.lr, args.seed)
    print(json.dumps(dataclasses.asdict(result)) if args.json else format_result(result))
    return 0


def _run(args) -> int:
    from edgecl.bench.quickstart import format_result, main_job

    result = main_job(args.out, args.model, args.steps, args.batch, args.lr, args.seed)
    print(json.dumps(dataclasses.asdict(result)) if args.json else format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecl", description="On-device continual learning runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="main job: export a small CNN, train it without torch, print the losses")
    p.add_argument("--out", default="out", help="folder for artifacts (default: out)")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet", "mobilenet"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)

    p = sub.add_parser("export", help="export a model family to training artifacts (host, needs torch)")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet", "mobilenet"])
    p.add_argument("--engine", default="portable", choices=["portable", "ort-training"])
    p.add_argument("--input-shape", default="1x8x8", help="one sample, CxHxW (default 1x8x8)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--masks", action="store_true", help="mask every Conv2d/Linear weight (for sparse training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_export)

    p = sub.add_parser("train", help="train exported artifacts on the digits (device side, no torch)")
    p.add_argument("artifacts")
    p.add_argument("--data", default=None, help=".npz with x (N,C,H,W) and y (N,); default: the digits")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"edgecl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from edgecl.runtime.errors import EdgeclError

        if isinstance(e, EdgeclError):
            print(f"edgecl {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
