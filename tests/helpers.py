"""Shared fixtures: exported artifacts are cached per test session (exports take seconds).

Where torch is absent (the emulated-ARM job), the artifacts come from a folder exported
beforehand on the host: `python -m tests.helpers export-fixtures DIR` writes every entry of
FIXTURES there, and EDGECL_TEST_ARTIFACTS=DIR (read by the test harness only, never by the
library) makes the `exported` fixture load from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pytest

IN_SHAPE = (1, 8, 8)
FAMILIES = ("mlp", "cnn", "cnn-s2", "resnet", "mobilenet")


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the parity measure of the README)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def rel_norm(a, b) -> float:
    """||a - b|| / ||b||: the measure for weights after many steps, where float32 rounding
    differences between two correct implementations compound step to step."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def perturb_batchnorm(model, seed: int = 0):
    """Move BatchNorm affine parameters and running statistics off their init values.

    At init (gamma 1, beta 0) a BN layer followed by ReLU and another BN is exactly
    scale-invariant, so its gamma gradient is mathematically 0 and what any two
    implementations return is rounding noise; parity is measured on weights where the
    gradient means something.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def make_model(name: str, seed: int = 0, **kwargs):
    from edgecl.exporters.models import build_model

    return perturb_batchnorm(build_model(name, in_shape=IN_SHAPE, num_classes=10, seed=seed, **kwargs), seed)


ARTIFACTS_ENV = "EDGECL_TEST_ARTIFACTS"
# How many times slower than native this test run is (the emulated-ARM job sets 10): tests with
# fixed timeouts multiply them by it. Read by the test harness only.
TIME_SCALE = float(os.environ.get("EDGECL_TEST_TIME_SCALE", "1"))

# Every artifact the tests that run without torch ask `exported` for:
# (name, engine, masks, trainable), as `fixture_key` normalises them.
FIXTURES = (
    ("mlp", "portable", "weights", None),
    ("cnn", "portable", "weights", None),
    ("resnet", "portable", "weights", None),  # BatchNorm: tests/runtime/test_engine_*.py
)


def fixture_key(name: str, engine: str = "portable", masks="weights", trainable=None) -> tuple:
    """The cache key of one export: masks and trainable as hashable, order-free where order is free."""
    return (name, engine, masks if isinstance(masks, (str, type(None))) else tuple(masks),
            None if trainable is None else tuple(sorted(trainable)))


def fixture_dirname(key: tuple) -> str:
    """Folder name of an exported fixture inside an EDGECL_TEST_ARTIFACTS folder."""
    name, engine, masks, trainable = key
    masks = "none" if masks is None else masks if isinstance(masks, str) else "+".join(masks)
    trainable = "all" if trainable is None else "+".join(trainable)
    return f"{name}--{engine}--{masks}--{trainable}"


def export_fixture(key: tuple, folder: Path):
    """Export the model of `key` into folder / "art" (needs torch); returns the torch model."""
    import torch

    from edgecl.exporters import export

    name, engine, masks, trainable = key
    model = make_model(name)
    export(model, torch.randn(4, *IN_SHAPE), folder / "art", engine=engine, masks=masks,
           trainable=None if trainable is None else list(trainable))
    return model


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, engine, masks="weights", trainable=None) -> (model, artifact folder), cached.

    With EDGECL_TEST_ARTIFACTS set, the folder comes from there and model is None (tests that
    need the torch model are marked `torch`); a key missing there fails, naming FIXTURES.
    """
    prebuilt = os.environ.get(ARTIFACTS_ENV)
    if prebuilt:
        def load(name: str, engine: str = "portable", masks="weights", trainable=None):
            key = fixture_key(name, engine, masks, trainable)
            folder = Path(prebuilt) / fixture_dirname(key) / "art"
            if not (folder / "manifest.json").is_file():
                pytest.fail(f"{ARTIFACTS_ENV}={prebuilt} has no artifact {key} ({folder}): "
                            "add it to tests.helpers.FIXTURES, or mark the test `torch`")
            return None, folder

        return load

    pytest.importorskip("torch", reason="exporting needs torch (host side)")
    cache = {}

    def get(name: str, engine: str = "portable", masks="weights", trainable=None):
        key = fixture_key(name, engine, masks, trainable)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{name}-{engine}")
            cache[key] = (export_fixture(key, folder), folder / "art")
        return cache[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def batch(rng, n=32, k=10):
    x = rng.standard_normal((n, *IN_SHAPE), dtype=np.float32)
    y = rng.integers(0, k, n)
    return x, y


def main(argv=None) -> int:
    """`python -m tests.helpers export-fixtures DIR`: export every FIXTURES entry into DIR."""
    parser = argparse.ArgumentParser(prog="python -m tests.helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("export-fixtures", help="export the artifacts the torch-free tests need")
    cmd.add_argument("dir", type=Path, help=f"output folder, then given to the tests as {ARTIFACTS_ENV}")
    args = parser.parse_args(argv)
    for key in FIXTURES:
        folder = args.dir / fixture_dirname(key)
        export_fixture(key, folder)
        print(f"{folder / 'art'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a run."""


class DyingLearner:
    """Mixed into a Learner (`dying(Learner)`): raises Killed at the start of step `die_at_step`."""

    die_at_step: int | None = None

    def observe(self, x, y, indices=None):
        if self.step == self.die_at_step:
            raise Killed
        return super().observe(x, y, indices)


def dying(learner_cls):
    """`learner_cls` that dies at `die_at_step` (a subclass with DyingLearner in front)."""
    return type(f"Dying{learner_cls.__name__}", (DyingLearner, learner_cls), {})
