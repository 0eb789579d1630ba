"""The main job for now: export a small CNN on the host, train it on the device side without torch.

`train_from_artifacts` imports only edgecl.runtime (numpy + onnxruntime); `main_job` runs
it in a fresh process where torch is unimportable, exactly as on a board.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Losses per step, held-out accuracy before and after, wall time in seconds."""

    engine: str
    losses: list
    accuracy_before: float
    accuracy_after: float
    wall_s: float
    torch_loaded: bool


def train_from_artifacts(artifact_dir, data_file=None, steps: int = 300, batch_size: int = 32, lr: float = 0.05,
                         seed: int = 0, progress: bool = True) -> TrainResult:
    """Train the exported model on 80 % of a data set for `steps` SGD steps; test on the rest.

    Args:
        data_file: an `.npz` with x, y (see edgecl.runtime.data.load_npz); None: the digits.
    Raises:
        ValueError: a bad count, seed or lr, a batch larger than the training part, or data that
            does not fit the artifacts (sample shape, class count); before any training step.
    """
    from tqdm import tqdm

    from edgecl.runtime import OptimizerConfig, open_engine
    from edgecl.runtime.data import load_digits, load_npz
    from edgecl.runtime.loop import MAX_SEED

    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; accepted: an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}; accepted: an integer >= 0 and <= 2**64 - 1")
    optimizer = OptimizerConfig("sgd", lr=lr, momentum=0.9)
    data = load_digits() if data_file is None else load_npz(data_file)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.x))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    if batch_size > len(train):
        raise ValueError(f"batch_size={batch_size} is more than the {len(train)} training examples (80 % of "
                         f"{len(order)}); accepted: batch_size <= {len(train)}")
    engine = open_engine(artifact_dir, optimizer, threads=2)
    shape, k = tuple(engine.manifest.input_shape), engine.manifest.num_classes
    if data.x.shape[1:] != shape or data.num_classes > k or len(test) == 0:
        raise ValueError(f"data {data.name!r}: {len(order)} samples of shape {data.x.shape[1:]} in {data.num_classes} "
                         f"classes; accepted for these artifacts: samples of shape {shape}, at most {k} classes, "
                         "and at least 2 samples (80 % train, 20 % test)")

    def accuracy() -> float:
        return float((engine.evaluate(data.x[test]).argmax(1) == data.y[test]).mean())

    before = accuracy()
    start = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc=f"training ({engine.name} engine)", unit="step", disable=not progress, mininterval=0.5)
    for _ in bar:
        idx = rng.choice(train, batch_size, replace=False)
        losses.append(engine.step(data.x[idx], data.y[idx]))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    wall = time.perf_counter() - start
    loaded = any(m == "torch" and sys.modules[m] is not None for m in sys.modules)
    return TrainResult(engine.name, losses, before, accuracy(), wall, loaded)


_CHILD = """
import sys, json, dataclasses
sys.modules["torch"] = None  # the device side: torch is unimportable
from edgecl.bench.quickstart import train_from_artifacts
r = train_from_artifacts(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                         int(sys.argv[6]))
print("RESULT " + json.dumps(dataclasses.asdict(r)))
"""


def main_job(out_dir="out", model: str = "cnn", steps: int = 300, batch_size: int = 32, lr: float = 0.05,
             seed: int = 0) -> TrainResult:
    """Export `model` for the portable engine (host), then train it in a torch-free process."""
    from edgecl.exporters import build_model, export
    from edgecl.runtime.data import load_digits, save_npz

    artifact_dir = Path(out_dir) / f"{model}-portable"
    print(f"exporting {model} to {artifact_dir} (host side, torch) ...", flush=True)
    import torch

    export(build_model(model, (1, 8, 8), 10, seed=seed), torch.zeros(2, 1, 8, 8), artifact_dir, masks="weights")
    data_file = Path(out_dir) / "digits.npz"
    save_npz(load_digits(), data_file)  # what a board receives: arrays, not scikit-learn
    print("training in a fresh process without torch (device side) ...", flush=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(artifact_dir), str(data_file), str(steps),
                           str(batch_size), str(lr), str(seed)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the device-side process failed with exit code {proc.returncode}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return TrainResult(**json.loads(line[len("RESULT "):]))


def format_result(r: TrainResult, every: int = 10) -> str:
    """A human table: loss every `every` steps, then accuracy and timing."""
    rows = ["step  loss", "----  ------"]
    rows += [f"{i + 1:>4}  {r.losses[i]:.4f}" for i in range(0, len(r.losses), every)]
    if (len(r.losses) - 1) % every:
        rows.append(f"{len(r.losses):>4}  {r.losses[-1]:.4f}")
    rows += ["", f"engine            {r.engine}", f"torch imported    {'yes' if r.torch_loaded else 'no'}",
             f"test accuracy     {r.accuracy_before:.3f} -> {r.accuracy_after:.3f}",
             f"training time     {r.wall_s:.2f} s ({1000 * r.wall_s / len(r.losses):.2f} ms/step)"]
    return "\n".join(rows)
