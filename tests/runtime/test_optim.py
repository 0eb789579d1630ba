"""The numpy optimizers follow torch.optim's update formulas."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.runtime.optim import NumpyOptimizer, OptimizerConfig

pytestmark = pytest.mark.torch  # the reference is torch.optim

CONFIGS = [
    OptimizerConfig("sgd", lr=0.1),
    OptimizerConfig("sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01),
    OptimizerConfig("adamw", lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
]


def _torch_optimizer(config, params):
    import torch

    if config.kind.value == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, dampening=config.dampening,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind.value}-{c.momentum}-{c.nesterov}-{c.eps}")
def test_numpy_optimizer_matches_torch(config):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((50, 20)).astype(np.float32)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = _torch_optimizer(config, [p])
    params = {"w": w0.copy()}
    mine = NumpyOptimizer(config)
    for _ in range(30):
        g = (rng.standard_normal(w0.shape) * rng.choice([1e-6, 1.0])).astype(np.float32)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        mine.step(params, {"w": g})
    np.testing.assert_allclose(params["w"], p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_state_round_trips():
    config = OptimizerConfig("adamw", lr=1e-2)
    rng = np.random.default_rng(1)
    a, b = NumpyOptimizer(config), NumpyOptimizer(config)
    pa = {"w": rng.standard_normal(10).astype(np.float32)}
    pb = {"w": pa["w"].copy()}
    g = rng.standard_normal(10).astype(np.float32)
    a.step(pa, {"w": g})
    b.load_state_arrays(a.state_arrays())
    pb["w"] = pa["w"].copy()
    a.step(pa, {"w": g})
    b.step(pb, {"w": g})
    assert np.array_equal(pa["w"], pb["w"])


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "rmsprop"}, "optimizer kind 'rmsprop' is unknown; accepted: sgd, adamw"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"momentum": 1.5}, "momentum=1.5"),
    ({"nesterov": True}, "nesterov=True needs momentum"),
    ({"betas": (0.9, 1.0)}, "betas="),
    ({"lr": 1e39}, "lr=1e.39; accepted: a finite number in .0, 100."),  # a run's lr: at most MAX_LR
    ({"lr": "0.1"}, "lr='0.1'; accepted"),
    ({"momentum": "0.9"}, "momentum='0.9'; accepted: 0 <= momentum < 1"),
    ({"dampening": 2.0}, "dampening=2.0; accepted: 0 <= dampening <= 1"),
    ({"eps": float("inf")}, "eps=inf; accepted: a finite number > 0"),
    ({"betas": (0.9,)}, "betas=(0.9,); accepted: two numbers"),
])
def test_bad_optimizer_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OptimizerConfig(**kwargs)
