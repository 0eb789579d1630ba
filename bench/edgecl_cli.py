"""`edgecl`: the user's command. Each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from edgecl.bench.fresh_process import MODEL_NAMES


def _export(args) -> int:
    from edgecl.bench.fresh_process import check_shape, parse_shape

    # every flag checked before torch is imported and anything is built or written
    try:
        shape = check_shape(args.model, parse_shape(args.input_shape))
    except ValueError as e:
        raise ValueError(f"--input-shape {args.input_shape!r}: {e}") from None
    if args.classes < 2:
        raise ValueError(f"--classes {args.classes}; accepted: an integer >= 2")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed {args.seed}; accepted: an integer in [0, 2**64 - 1]")

    import torch

    from edgecl.exporters import build_model, export

    model = build_model(args.model, shape, args.classes, seed=args.seed)
    result = export(model, torch.zeros(2, *shape), args.out, engine=args.engine,
                    masks="weights" if args.masks else None)
    if args.json:
        print(json.dumps(result.manifest.to_dict(), indent=2))
    else:
        k = result.manifest.num_classes
        print(f"wrote {result.folder} ({result.manifest.engine}); head: {k} classes, labels 0..{k - 1} (fixed at "
              "export: for classes still to come, export with a larger --classes)")
        for name, entry in result.manifest.files.items():
            print(f"  {name:<24} {entry.bytes:>10,} B  sha256 {entry.sha256[:16]}")
    return 0


def _train(args) -> int:
    from edgecl.bench.quickstart import format_result, train_from_artifacts

    result = train_from_artifacts(args.artifacts, args.data, args.steps, args.batch, args.lr, args.seed)
    print(json.dumps(dataclasses.asdict(result)) if args.json else format_result(result))
    return 0


def run_job_config(args):
    """The JobConfig `edgecl run` ARGS asks for, every flag checked, also against the others, before any work.

    Also what `bench run` checks each cell's arguments with before starting any.

    Raises:
        ValueError: a bad value (the config's message; `main` names the flag) or contradictory flags.
    """
    from edgecl.bench.cl_run import DATA_DEFAULTS, JobConfig
    from edgecl.devices.cli import learner_flags

    learner_flags(args)
    defaults = DATA_DEFAULTS[args.data]
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.lr = defaults["lr"] if args.lr is None else args.lr
    return JobConfig(data=args.data, scenario=args.scenario, model=args.model, engine=args.engine, method=args.method,
                     sparsity=None if args.dense else args.sparsity, tdm=not args.no_tdm, dgm=not args.no_dgm,
                     ddr=not args.no_ddr, structure=args.structure, width=args.width, pad_to=args.pad_to,
                     train_per_task=args.train_per_task, test_per_task=args.test_per_task, buffer=args.buffer,
                     budget=args.budget, epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed, threads=args.threads,
                     checkpoint_every=args.checkpoint_every, nudge_ulp=args.nudge_ulp, latent_split=args.latent_split,
                     freeze_after=args.freeze_after)


def _run(args) -> int:
    from edgecl.bench.cl_run import format_result, plot_formats, plot_result, run_job
    from edgecl.runtime.files import check_output_dir, prepare_output, write_atomic

    job = run_job_config(args)  # every flag, before the export
    # and before training: a bad output path found after a long run would lose the run
    check_output_dir(args.out, "out")
    if args.checkpoint is not None:
        check_output_dir(args.checkpoint, "checkpoint")
    if args.json:
        prepare_output(args.json)
    if args.plot:
        prepare_output(args.plot, plot_formats())
    from edgecl.bench.cl_process import TrainingProcessError

    try:
        result, plan, memory_plan = run_job(job, args.out, args.checkpoint, progress=not args.quiet)
    except TrainingProcessError as e:
        print(f"edgecl run: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = (f"the checkpoints in {args.checkpoint!r} stay: the same command resumes from the last"
                  if args.checkpoint is not None else "without --checkpoint the run starts over")
        print(f"edgecl run: interrupted; {resume}", file=sys.stderr)
        return 130
    print(format_result(result))
    if memory_plan is not None and result.peak_rss_bytes:
        process = result.config["process"]
        where = (f"the training process {result.peak_rss_bytes:,} B (runtime-only: Python, numpy and ONNX Runtime "
                 f"included, no torch; the export ran in the host process, peak {process['host_peak_rss_bytes']:,} B)"
                 if process["training"] == "runtime-only" else
                 f"the whole process {result.peak_rss_bytes:,} B (Python, numpy, ONNX Runtime and torch included: "
                 "training ran in the host process, where the export did)")
        print(f"memory plan total {memory_plan.total_bytes:,} B of budget {memory_plan.budget_bytes:,} B "
              f"(buffer {memory_plan.replay_capacity} examples); measured peak RSS of {where}")
    if args.json:
        write_atomic(args.json, json.dumps({**result.to_dict(), "budget_plan": plan}, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_result(result, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecl", description="On-device continual learning runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="main job: continual learning (default SparCL-DER++ 0.75 on Split Digits)")
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--scenario", default="split", choices=["split", "permuted"],
                   help="split: 5 tasks of 2 classes (class-IL and task-IL); permuted: 5 pixel permutations "
                   "(domain-IL)")
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--engine", default="portable", choices=["portable", "ort-training", "torch"])
    p.add_argument("--method", default="derpp", choices=["finetune", "joint", "er", "derpp"])
    p.add_argument("--sparsity", type=float, default=None, help="SparCL weight sparsity (default 0.75)")
    p.add_argument("--dense", action="store_true", help="no SparCL: the dense strategy (no --sparsity)")
    p.add_argument("--no-tdm", action="store_true", help="ablation: fixed mask, no task-aware updates")
    p.add_argument("--no-dgm", action="store_true", help="ablation: dense gradients")
    p.add_argument("--no-ddr", action="store_true", help="ablation: keep all data")
    p.add_argument("--structure", default="weight", choices=["weight", "channel"],
                   help="SparCL's masks on weight entries (the paper's) or on whole output channels, computed on "
                        "narrower tensors (portable engine); --sparsity is then the share of channels pruned")
    p.add_argument("--pad-to", type=int, default=None, metavar="SIZE",
                   help="zero-pad the images to SIZE x SIZE (e.g. 32: Fashion-MNIST for the CIFAR-layout resnet18)")
    p.add_argument("--train-per-task", type=int, default=None, metavar="N",
                   help="a shorter run: N random training examples of each task (default: all)")
    p.add_argument("--test-per-task", type=int, default=None, metavar="N", help="and N test examples of each task")
    p.add_argument("--width", type=int, default=None, help="the model's width (cnn, cnn-s2, resnet, resnet18, "
                                                           "mobilenet; default: the family's)")
    p.add_argument("--latent-split", default=None, metavar="POINT",
                   help="latent replay: freeze the layers up to POINT (a child of an nn.Sequential, e.g. 4 for "
                        "cnn-s2's second conv block; stem or layers.<i> for resnet/resnet18) after --freeze-after "
                        "tasks; the buffer then holds their outputs (dense strategies, portable engine)")
    p.add_argument("--freeze-after", type=int, default=1, metavar="N",
                   help="with --latent-split: the task after which the prefix freezes (default 1)")
    p.add_argument("--buffer", type=int, default=None, help="replay buffer size in examples (default 500, or "
                   "what the --budget leaves)")
    p.add_argument("--budget", default=None, help="memory budget in bytes, e.g. 2MiB, 500KiB")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 20 on digits, 5 on "
                   "fashion-mnist)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.1 on digits, whose tasks "
                   "have 9 batches an epoch; 0.03 on fashion-mnist, SparCL's value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="folder to checkpoint into and resume from")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: task ends)")
    p.add_argument("--nudge-ulp", action="store_true",
                   help="diagnostic: move one stem weight by one float32 ulp before training, to see how far "
                   "rounding alone moves the run's end (bench drift)")
    p.add_argument("--out", default="out", help="folder for artifacts (default: out)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every metric as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the accuracy matrix and accuracy over time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

    p = sub.add_parser("export", help="export a model family to training artifacts (host, needs torch)")
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--engine", default="portable", choices=["portable", "ort-training"])
    p.add_argument("--input-shape", default="1x8x8", help="one sample, CxHxW (default 1x8x8)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--masks", action="store_true", help="mask every Conv2d/Linear weight (for sparse training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write: new, empty, or an earlier export (replaced whole); "
                   "a folder holding anything else is refused")
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

    from edgecl.devices.cli import add_device_parser

    add_device_parser(sub, format_run=_format_run)
    from edgecl.bench.fleet_cli import add_fleet_parser

    add_fleet_parser(sub)
    return parser


def _format_run(result) -> str:
    from edgecl.bench.cl_run import format_result

    return format_result(result)


def main(argv=None) -> int:
    from edgecl.bench.flags import command_options, name_flags

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, PermissionError) as e:
        print(f"edgecl {args.command}: error: {name_flags(str(e), command_options(parser, args))}", file=sys.stderr)
        return 2
    except Exception as e:
        from edgecl.runtime.errors import EdgeclError

        if isinstance(e, EdgeclError):
            print(f"edgecl {args.command}: error: {name_flags(str(e), command_options(parser, args))}",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
