"""Every supported layer, in each variant the README lists, matches torch through the step graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecl.exporters import export
from edgecl.exporters.reference import TorchEngine
from edgecl.runtime import OptimizerConfig, UnsupportedModelError, open_engine
from tests.helpers import perturb_batchnorm, rel_err

SGD = OptimizerConfig("sgd", lr=0.05, momentum=0.9)


def _conv_variants():  # stride, padding, dilation, groups, depthwise, bias on/off
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 10),
    )


def _pools():  # overlapping max pool with padding, average pools, BatchNorm, adaptive pool
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # a bias before BN has gradient 0
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU6(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 10),
    )


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 9, 10))

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + x)


class _InplaceResidual(nn.Module):  # in-place ops trace to aten.add_ / aten.div_, which ONNX cannot express
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 9, 10))

    def forward(self, x):
        out = self.a(x) * 1.5
        out += x
        out.div_(2)
        return self.head(torch.relu(out))


ENGINES = ["portable", pytest.param("ort-training", marks=pytest.mark.ort_training)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("make", [_conv_variants, _pools, _Residual, _InplaceResidual],
                         ids=["conv", "pool-bn-dropout", "residual", "inplace-residual"])
def test_layer_gradients_and_steps_match_torch(tmp_path, make, engine):
    torch.manual_seed(0)
    model = perturb_batchnorm(make())
    export(model, torch.randn(4, 2, 9, 9), tmp_path / "a", engine=engine, masks="weights")
    eng = open_engine(tmp_path / "a", SGD)
    ref = TorchEngine.from_artifacts(model, tmp_path / "a", SGD)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.standard_normal((6, 2, 9, 9), dtype=np.float32)
        y = rng.integers(0, 10, 6)
        loss, grads = eng.loss_and_grads(x, y)
        ref_loss, ref_grads = ref.loss_and_grads(x, y)
        assert rel_err(loss, ref_loss) <= 1e-4
        for k in ref_grads:
            assert rel_err(grads[k], ref_grads[k]) <= 1e-4, k
        eng.apply_gradients(grads)
        ref.apply_gradients(ref_grads)
    assert rel_err(eng.evaluate(x), ref.evaluate(x)) <= 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_is_off_unless_asked_and_random_when_asked(tmp_path, engine):
    from edgecl.exporters.models import build_model

    model = build_model("mlp", dropout=0.5)
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8), dtype=np.float32)
    y = np.arange(16) % 10
    export(model, torch.randn(4, 1, 8, 8), tmp_path / "off", engine=engine)
    off = open_engine(tmp_path / "off")
    assert off.loss_and_grads(x, y)[0] == off.loss_and_grads(x, y)[0]
    export(model, torch.randn(4, 1, 8, 8), tmp_path / "on", engine=engine, dropout=True)
    on = open_engine(tmp_path / "on")
    losses = {on.loss_and_grads(x, y)[0] for _ in range(4)}
    assert len(losses) > 1
    assert np.allclose(on.evaluate(x), off.evaluate(x), atol=1e-6)  # inference never drops


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.GELU())

    def forward(self, x):
        return self.body(x)


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return torch.sigmoid(self.fc(x.flatten(1)))


@pytest.mark.parametrize("engine", ["portable", "ort-training"])
def test_unsupported_layer_fails_before_any_file_is_written(tmp_path, engine):
    with pytest.raises(UnsupportedModelError, match=r"'body\.2'.*GELU"):
        export(_Gelu(), torch.randn(2, 1, 8, 8), tmp_path / "a", engine=engine)
    assert not any(tmp_path.iterdir())


def test_unsupported_op_names_op_and_module_path(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"aten\.sigmoid.*'<model>'"):
        export(_Sigmoid(), torch.randn(2, 1, 8, 8), tmp_path / "a")
    assert not any(tmp_path.iterdir())


def test_bad_export_arguments(tmp_path):
    from edgecl.exporters.models import build_model

    m = build_model("mlp")
    with pytest.raises(ValueError, match="engine='tflite'"):
        export(m, torch.randn(2, 1, 8, 8), tmp_path / "a", engine="tflite")
    with pytest.raises(KeyError, match="no such parameter"):
        export(m, torch.randn(2, 1, 8, 8), tmp_path / "a", masks=["nope.weight"])
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        export(m, torch.randn(2, 1, 8, 8), tmp_path / "a", masks={"1.weight": np.full((128, 64), 0.5)})
    with pytest.raises(KeyError, match="not parameters"):
        export(m, torch.randn(2, 1, 8, 8), tmp_path / "a", trainable=["nope"])
    assert not any(tmp_path.iterdir())


# Run in a child process: before average pools were rewritten for the ort-training graph, ORT's
# AveragePoolGrad took its output shape from the graph, batch dimension 0, and the step died of SIGFPE.
AVG_POOL_SCRIPT = """
import json, sys
import numpy as np, torch
from torch import nn
import torch.nn.functional as F
from edgecl.exporters import export
from edgecl.exporters.reference import TorchEngine
from edgecl.runtime import OptimizerConfig, open_engine

class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 3, stride=2, padding=1, count_include_pad=False).flatten(1)

pools = {"k2": lambda: nn.AvgPool2d(2), "k3-s1-p1": lambda: nn.AvgPool2d(3, stride=1, padding=1),
         "k3-s2-p1-exclude-pad": lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
         "k2x3-s1x2": lambda: nn.AvgPool2d((2, 3), stride=(1, 2))}
out = {}
for name, size in [("smallest", 2), *((n, 5) for n in pools), ("functional", 5)]:
    torch.manual_seed(0)
    if name == "functional":
        model = Functional()
    else:
        pool = pools.get(name, lambda: nn.AvgPool2d(2))()
        with torch.no_grad():
            width = pool(torch.zeros(1, 2, size, size)).numel()
        layers = [nn.Conv2d(1, 2, 1, bias=False), pool, nn.Flatten()]
        model = nn.Sequential(*layers) if width == 2 else nn.Sequential(*layers, nn.Linear(width, 3))
    folder = f"{sys.argv[1]}/{name}"
    export(model, torch.randn(2, 1, size, size), folder, engine="ort-training")
    sgd = OptimizerConfig("sgd", lr=0.1)
    eng, ref = open_engine(folder, sgd), TorchEngine.from_artifacts(model, folder, sgd)
    x = np.random.default_rng(0).standard_normal((5, 1, size, size)).astype(np.float32)
    y = np.arange(5) % eng.manifest.num_classes
    errs = []
    for _ in range(3):
        (loss, grads), (ref_loss, ref_grads) = eng.loss_and_grads(x, y), ref.loss_and_grads(x, y)
        errs.append(abs(loss - ref_loss) / abs(ref_loss))
        errs += [float(np.abs(grads[k] - ref_grads[k]).max() / np.abs(ref_grads[k]).max()) for k in ref_grads]
        eng.apply_gradients(grads)
        ref.apply_gradients(ref_grads)
    out[name] = max(errs)
print(json.dumps(out))
"""


@pytest.mark.ort_training
def test_ort_training_trains_a_layer_before_an_average_pool(tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", AVG_POOL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"smallest", "k2", "k3-s1-p1", "k3-s2-p1-exclude-pad", "k2x3-s1x2", "functional"}
    assert max(errors.values()) <= 1e-4, errors
