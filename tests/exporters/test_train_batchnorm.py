"""The portable step graph's training-mode BatchNorm against torch's, in eager torch (no export)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecl.exporters.train_batchnorm import TrainBatchNorm2d
from tests.helpers import perturb_batchnorm, rel_err


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (3, 2, 1, 2)], ids=["6x4x5x5", "3x2x1x2"])
def test_closed_form_backward_and_running_statistics_match_torch(affine, shape):
    torch.manual_seed(0)
    bn = perturb_batchnorm(nn.Sequential(nn.BatchNorm2d(shape[1], affine=affine, momentum=0.3)))[0].train()
    ours = TrainBatchNorm2d(bn)  # shares bn's parameters; reads its running statistics before bn updates them
    x = (3.0 + 2.0 * torch.randn(shape, dtype=torch.float64)).float().requires_grad_(True)
    dy = torch.randn(shape)
    y = ours(x)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    grads = torch.autograd.grad(y, list(bn.parameters()), dy) if affine else ()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = bn(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy, retain_graph=True)
    grads_ref = torch.autograd.grad(y_ref, list(bn.parameters()), dy) if affine else ()
    assert rel_err(y.detach(), y_ref.detach()) <= 1e-5
    assert rel_err(dx, dx_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-5
    new_mean, new_var = ours.new_stats  # torch's update: unbiased batch variance, momentum 0.3
    assert rel_err(new_mean.detach(), bn.running_mean) <= 1e-6
    assert rel_err(new_var.detach(), bn.running_var) <= 1e-6



def test_step_graph_batch_statistics_match_torch_with_and_without_affine(tmp_path):
    # ONNX Runtime may write a training-mode BatchNormalization's running outputs into its inputs
    # 3 and 4 and share equal constants between inputs: with zeros for the input mean and variance
    # the batch mean came out as the variance, and with the absent bias's zeros the output shifted.
    import numpy as np

    from edgecl.exporters import export
    from edgecl.exporters.reference import TorchEngine
    from edgecl.runtime import OptimizerConfig, open_engine

    torch.manual_seed(0)
    model = perturb_batchnorm(nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                                            nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)))
    export(model, torch.randn(4, 2, 5, 5), tmp_path / "a")
    sgd = OptimizerConfig("sgd", lr=0.05)
    eng, ref = open_engine(tmp_path / "a", sgd), TorchEngine.from_artifacts(model, tmp_path / "a", sgd)
    x = np.random.default_rng(0).standard_normal((6, 2, 5, 5)).astype(np.float32) + 2.0
    y = np.arange(6)
    (loss, grads), (ref_loss, ref_grads) = eng.loss_and_grads(x, y), ref.loss_and_grads(x, y)
    assert rel_err(loss, ref_loss) <= 1e-5
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) <= 1e-4, k
    for k, b in ref.buffers().items():
        assert rel_err(eng.buffers()[k], b) <= 1e-5, k
