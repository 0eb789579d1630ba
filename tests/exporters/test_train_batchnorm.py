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
