"""Roofline projection: hand-computed literal cases, monotonicity, and the 'projected' label."""

from __future__ import annotations

import pytest

from edgecl.devices.profiles import DeviceProfile, Figure, builtin_profiles
from edgecl.devices.roofline import (PHASES, RooflineProjection, layer_bytes, optimizer_state_slots,
                                     project_latency)
from edgecl.runtime.flops import SparsityConfig, training_flops, training_run_flops
from edgecl.runtime.optim import OptimizerConfig

TABLE = [  # Linear 8 -> 4 (bias) then Linear 4 -> 2 (no bias)
    {"weight": "0.weight", "bias": "0.bias", "weight_shape": [4, 8], "macs_per_sample": 32, "in_elements": 8,
     "out_elements": 4, "needs_input_grad": False},
    {"weight": "1.weight", "bias": None, "weight_shape": [2, 4], "macs_per_sample": 8, "in_elements": 4,
     "out_elements": 2, "needs_input_grad": True},
]


def profile(peak_gflops=1.0, bandwidth_gbps=1.0) -> DeviceProfile:
    d = Figure(1, "datasheet", "test")
    return DeviceProfile("toy", "toy", "aarch64", "cpu", d, d, Figure(peak_gflops, "datasheet", "test"),
                         Figure(bandwidth_gbps, "datasheet", "test"))


def test_literal_projection_one_step():
    flops = training_run_flops(TABLE, batch=10, examples_per_epoch=10).step  # 10 samples, 1 step
    p = project_latency(TABLE, flops, profile(1.0, 1.0))  # 1 GFLOP/s, 1 GB/s: 1 FLOP = 1 byte = 1 ns
    assert p.source == "projected" and (p.samples, p.steps) == (10, 1)
    l0, l1 = p.layers
    # forward of layer 0: 640 FLOPs; bytes 4 * (36 params + 10 * (8 + 4)) = 624 -> compute bound, 640 ns
    assert (l0.forward.flops, l0.forward.bytes, l0.forward.bound) == (640, 624, "compute")
    assert l0.forward.ms == pytest.approx(640e-6)
    assert l0.input_grad.ms == 0.0 and l0.input_grad.bound == "none"  # first layer: no input gradient
    # SGD update: 2 FLOPs x 36 entries = 72; bytes 4 * 36 * 3 (w, g read, w written) = 432 -> memory bound
    assert (l0.optimizer.flops, l0.optimizer.bytes, l0.optimizer.bound) == (72, 432, "memory")
    assert l0.optimizer.ms == pytest.approx(432e-6)
    # layer 1 input-gradient: 160 FLOPs, bytes 4 * (8 weights + 10 * 6) = 272 -> memory bound
    assert (l1.input_grad.flops, l1.input_grad.bytes, l1.input_grad.bound) == (160, 272, "memory")
    assert p.total_ms == pytest.approx(sum(getattr(layer, ph).ms for layer in p.layers for ph in PHASES))
    assert p.per_step_ms == p.total_ms
    d = p.to_dict()
    assert d["source"] == "projected" and d["layers"][0]["forward"]["bound"] == "compute"


def test_optimizer_state_traffic():
    assert [optimizer_state_slots(o) for o in (OptimizerConfig(), OptimizerConfig(momentum=0.9),
                                               OptimizerConfig("adamw"))] == [0, 1, 2]
    assert layer_bytes(TABLE[0], 1, 1, slots=2)["optimizer"] == 4 * 36 * 7
    with pytest.raises(KeyError, match="in_elements"):
        layer_bytes({"weight": "w", "weight_shape": [2, 2]}, 1, 1, 0)


def test_a_projection_is_never_labelled_measured():
    with pytest.raises(ValueError, match="source='measured'; accepted: 'projected'"):
        RooflineProjection("toy", 1.0, 1.0, 1, 1, (), source="measured")


def test_faster_roofs_and_sparser_work_never_project_slower():
    step = training_run_flops(TABLE, batch=32, examples_per_epoch=32).step
    base = project_latency(TABLE, step, profile(1.0, 1.0)).total_ms
    assert project_latency(TABLE, step, profile(2.0, 1.0)).total_ms <= base
    assert project_latency(TABLE, step, profile(1.0, 2.0)).total_ms <= base
    sparse = training_run_flops(TABLE, SparsityConfig(0.5, 0.2, dense_first_last=False), batch=32,
                                examples_per_epoch=32).step
    assert project_latency(TABLE, sparse, profile()).total_ms <= base
    # never below either roof alone
    p = project_latency(TABLE, step, profile(1.0, 1.0))
    assert p.total_ms >= step.total / 1e9 * 1e3 - 1e-12


def test_builtin_boards_project_in_order():
    step = training_run_flops(TABLE, batch=32, examples_per_epoch=32).step
    boards = builtin_profiles()
    pi4 = project_latency(TABLE, step, boards["raspberry-pi-4"]).total_ms
    pi5 = project_latency(TABLE, step, boards["raspberry-pi-5"]).total_ms
    assert 0 < pi5 < pi4


def test_bad_input():
    with pytest.raises(ValueError, match="steps=0"):
        project_latency(TABLE, training_flops(TABLE, 10), profile())  # a breakdown without optimizer steps
    step = training_run_flops(TABLE, batch=4, examples_per_epoch=4).step
    with pytest.raises(ValueError, match="do not match"):
        project_latency(TABLE[:1], step, profile())
    with pytest.raises(ValueError, match="accepted: a DeviceProfile"):
        project_latency(TABLE, step, "raspberry-pi-4")
    with pytest.raises(ValueError, match="phase='backward'"):
        project_latency(TABLE, step, profile()).phase_ms("backward")


def test_devices_import_and_project_without_torch_or_bench():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgecl.devices.profiles import builtin_profiles\n"
            "from edgecl.devices.roofline import project_latency\n"
            "from edgecl.runtime.flops import training_run_flops\n"
            f"table = {TABLE!r}\n"
            "p = project_latency(table, training_run_flops(table, batch=4, examples_per_epoch=4).step,"
            " builtin_profiles()['raspberry-pi-5'])\n"
            "assert p.total_ms > 0 and p.source == 'projected'\n"
            "bad = [m for m in sys.modules if m.startswith(('edgecl.bench', 'edgecl.exporters')) or m == 'torch' and sys.modules[m]]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
