"""An app that keeps learning on the device: labelled samples arrive a few at a time, it predicts each
before it learns it, saves as it goes, and after a kill (even SIGKILL) picks up where its last save left.

Needs only the runtime (numpy + onnxruntime, no torch):

    python examples/stream_app.py ARTIFACTS STATE STREAM.npz [--method derpp] [--sparsity 0.75] [--budget 8MiB]

ARTIFACTS: a folder exported on the host, e.g.
    edgecl export --model cnn --input-shape 1x8x8 --classes 10 --masks --out artifacts
STREAM.npz: `x` float32 (N, *input shape) and `y` integer (N,) in arrival order (here a file; in an app,
    a camera, a sensor, a user's corrections). STATE: the learner's folder; delete it to start anew.

It prints, every --report samples, the online (test-then-train) accuracy over the samples of that window:
each is predicted before the model learns it, the measure of a stream learner.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from edgecl.runtime import open_learner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts")
    p.add_argument("state")
    p.add_argument("stream", help=".npz with x float32 (N, ...) and y integer (N,)")
    p.add_argument("--method", default="derpp", choices=("finetune", "er", "derpp"))
    p.add_argument("--sparsity", type=float, default=None, help="SparCL weight sparsity (default: dense)")
    p.add_argument("--budget", default="8MiB", help="memory budget, e.g. 8MiB")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1 suits 8x8 digits)")
    p.add_argument("--replay-steps", type=int, default=1, help="replay-only steps after each learn step")
    p.add_argument("--save-every", type=int, default=20, help="learn calls between saves")
    p.add_argument("--report", type=int, default=200, help="samples between accuracy lines")
    p.add_argument("--seed", type=int, default=0, help="seed of the learner and of the group sizes")
    p.add_argument("--inference-model", default=None, help="write the learned model here at the end (.onnx)")
    args = p.parse_args(argv)

    with np.load(args.stream) as f:
        x, y = f["x"], f["y"]
    with open_learner(args.artifacts, args.state, method=args.method, sparsity=args.sparsity, budget=args.budget,
                      lr=args.lr, replay_steps=args.replay_steps if args.method != "finetune" else 0,
                      seed=args.seed) as learner:
        start = learner.samples_seen
        print(f"state {args.state}: {start} of {len(x)} samples learned before; buffer of "
              f"{learner.buffer.capacity if learner.buffer is not None else 0} examples", flush=True)
        # samples arrive 1 to 8 at a time; the sizes are drawn from the seed, so a restarted app
        # sees the same groups after `start`
        sizes = np.random.default_rng(args.seed).integers(1, 9, len(x))
        cuts = np.concatenate([[0], np.cumsum(sizes)])
        cuts = [int(c) for c in cuts[cuts < len(x)]] + [len(x)]
        hits = total = calls = 0
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if lo < start:
                continue
            hits += int((learner.predict(x[lo:hi]) == y[lo:hi]).sum())  # test, then train
            total += hi - lo
            learner.learn(x[lo:hi], y[lo:hi])
            calls += 1
            if calls % args.save_every == 0:
                learner.save()
            if total >= args.report:
                print(f"samples {learner.samples_seen:>6}/{len(x)}  online accuracy {hits / total:.3f} "
                      f"(last {total})", flush=True)
                hits = total = 0
        learner.save()
        seen = (learner.predict(x) == y).mean()  # after the stream: how much of every class it still knows
        print(f"samples {learner.samples_seen:>6}/{len(x)}  accuracy now over all {len(x)} samples {seen:.3f}", flush=True)
        if args.inference_model:
            print(f"wrote {learner.export_inference(args.inference_model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
