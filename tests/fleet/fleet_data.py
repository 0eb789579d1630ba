"""Small learnable data sets and run folders for the fleet tests (8x8 images, 10 classes)."""

from __future__ import annotations

import numpy as np

from edgecl.fleet.config import FleetConfig
from edgecl.fleet.prepare import prepare_run
from edgecl.runtime.dataset import Dataset

SHAPE = (1, 8, 8)


def template_data(n: int, seed: int) -> Dataset:
    """n samples: a fixed random template per class plus noise (learnable in a few steps)."""
    templates = np.random.default_rng(1234).standard_normal((10, *SHAPE))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = (templates[y] + 0.5 * rng.standard_normal((n, *SHAPE))).astype(np.float32)
    return Dataset(f"templates-{seed}", x, y.astype(np.int64), 10)


def make_run(tmp_path, artifacts, n_train: int = 1500, **settings):
    """A prepared run folder of template data; settings go to FleetConfig (digits' lr)."""
    config = FleetConfig(**({"clients": 3, "rounds": 5, "data": "digits", "buffer": 50} | settings))
    return prepare_run(config, template_data(n_train, 0), template_data(300, 1), artifacts, tmp_path / "run",
                       "simulate")
