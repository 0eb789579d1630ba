"""Shared fixtures: exported artifacts are cached per test session (exports take seconds)."""

from __future__ import annotations

import numpy as np
import pytest

IN_SHAPE = (1, 8, 8)
FAMILIES = ("mlp", "cnn", "resnet", "mobilenet")


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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, engine, masks="weights", trainable=None) -> (model, artifact folder), cached."""
    torch = pytest.importorskip("torch", reason="exporting needs torch (host side)")
    from edgecl.exporters import export

    cache = {}

    def get(name: str, engine: str = "portable", masks="weights", trainable=None):
        key = (name, engine, masks if isinstance(masks, (str, type(None))) else tuple(masks),
               None if trainable is None else tuple(sorted(trainable)))
        if key not in cache:
            model = make_model(name)
            folder = tmp_path_factory.mktemp(f"{name}-{engine}")
            export(model, torch.randn(4, *IN_SHAPE), folder / "art", engine=engine, masks=masks, trainable=trainable)
            cache[key] = (model, folder / "art")
        return cache[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def batch(rng, n=32, k=10):
    x = rng.standard_normal((n, *IN_SHAPE), dtype=np.float32)
    y = rng.integers(0, k, n)
    return x, y
