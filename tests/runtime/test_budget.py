"""The memory planner: exact arithmetic on a literal manifest, fit properties, refusals, sizes, RSS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.runtime.budget import (
    MemoryPlan,
    _proc_status_bytes,
    current_rss_bytes,
    optimizer_slots,
    parse_bytes,
    peak_rss_bytes,
    plan_memory,
)
from edgecl.runtime.buffer import bytes_per_example
from edgecl.runtime.errors import ArtifactError
from edgecl.runtime.manifest import Manifest, TensorSpec
from edgecl.runtime.memory import MachineMemory
from edgecl.runtime.optim import OptimizerConfig

ADAMW = OptimizerConfig("adamw", lr=1e-3)
MOMENTUM = OptimizerConfig("sgd", momentum=0.9)


def literal_manifest(extra=None) -> Manifest:
    """Conv 4x1x3x3 (masked) + bias, BatchNorm affine (bias frozen) + statistics, linear 10x64 (masked) + bias."""
    params = (
        TensorSpec("conv.weight", (4, 1, 3, 3), masked=True),  # 36 floats, 144 B
        TensorSpec("conv.bias", (4,)),  # 16 B
        TensorSpec("bn.weight", (4,)),  # 16 B
        TensorSpec("bn.bias", (4,), trainable=False),  # 16 B, frozen: no gradient, no optimizer state
        TensorSpec("fc.weight", (10, 64), masked=True),  # 640 floats, 2560 B
        TensorSpec("fc.bias", (10,)),  # 40 B
    )
    buffers = (TensorSpec("bn.running_mean", (4,), trainable=False),
               TensorSpec("bn.running_var", (4,), trainable=False))
    if extra is None:
        extra = {"activation_bytes_per_sample": 1000}
    return Manifest(engine="portable", input_shape=(1, 8, 8), num_classes=10, parameters=params,
                    buffers=buffers, extra=extra)


# --- exact arithmetic ----------------------------------------------------------------

def test_plan_arithmetic_on_a_literal_manifest():
    plan = plan_memory(literal_manifest(), 100_000, batch_size=32, optimizer=ADAMW, replay_batch_size=16)
    assert plan.parameters_bytes == 144 + 16 + 16 + 16 + 2560 + 40 == 2792
    assert plan.gradients_bytes == 2792 - 16 == 2776
    assert plan.optimizer_bytes == 2 * 2776 == 5552
    assert plan.masks_bytes == (36 + 640) * 4 == 2704
    assert plan.batchnorm_bytes == 8 * 4 == 32
    assert plan.activations_bytes == 1000 * (32 + 16) == 48_000
    assert plan.model_bytes == 2792 + 2776 + 5552 + 2704 + 32 == 13_856
    assert plan.replay_example_bytes == 4 * 64 + 8 + 4 * 10 + 2 == 306
    assert plan.replay_capacity == (100_000 - 13_856 - 48_000) // 306 == 124
    assert plan.replay_bytes == 124 * 306 == 37_944
    assert plan.total_bytes == 13_856 + 48_000 + 37_944 == 99_800
    assert plan.unused_bytes == 200


@pytest.mark.parametrize("optimizer, slots", [
    ("sgd", 0), (OptimizerConfig("sgd"), 0), (MOMENTUM, 1), ("adamw", 2), (ADAMW, 2),
])
def test_optimizer_state_slots(optimizer, slots):
    assert optimizer_slots(optimizer) == slots
    plan = plan_memory(literal_manifest(), "1MiB", batch_size=8, optimizer=optimizer)
    assert plan.optimizer_bytes == slots * 2776
    assert plan.activations_bytes == 8000


def test_er_buffer_without_logits_holds_more_examples():
    with_logits = plan_memory(literal_manifest(), 100_000, 32, "sgd", replay_batch_size=16)
    without = plan_memory(literal_manifest(), 100_000, 32, "sgd", replay_batch_size=16, store_logits=False)
    left = 100_000 - (2792 + 2776 + 2704 + 32 + 48_000)
    assert with_logits.replay_capacity == left // 306
    assert without.replay_example_bytes == 266 and without.replay_capacity == left // 266


def test_budget_string_is_parsed():
    assert plan_memory(literal_manifest(), "4MiB", 32, "sgd").budget_bytes == 4 * 1024**2


def test_table_and_dict():
    plan = plan_memory(literal_manifest(), 100_000, 32, ADAMW, replay_batch_size=16)
    table = plan.table()
    assert "100 000 B (97.66 KiB)" in table.splitlines()[0]
    for needle in ("parameters", "2 792 B", "optimizer state", "5 552 B", "activations (32 + 16 examples)",
                   "48 000 B (46.88 KiB)", "replay buffer (124 x 306 B)", "37 944 B", "total", "99 800 B", "unused"):
        assert needle in table, needle
    d = plan.to_dict()
    assert d["replay_capacity"] == 124 and d["total_bytes"] == 99_800 and d["unused_bytes"] == 200
    assert MemoryPlan.from_dict(d) == plan


def test_memory_plan_validates_itself():
    fields = dict(budget_bytes=100, batch_size=1, replay_batch_size=0, parameters_bytes=10, gradients_bytes=10,
                  optimizer_bytes=0, masks_bytes=0, batchnorm_bytes=0, activations_bytes=10,
                  replay_example_bytes=7, replay_capacity=10)
    assert MemoryPlan(**fields).unused_bytes == 0
    with pytest.raises(ValueError, match="add up to 107 bytes, over budget_bytes=100"):
        MemoryPlan(**fields | {"replay_capacity": 11})
    with pytest.raises(ValueError, match="MemoryPlan.masks_bytes=-1; accepted: an integer >= 0"):
        MemoryPlan(**fields | {"masks_bytes": -1})


# --- fit properties ---------------------------------------------------------------------

specs = st.lists(
    st.tuples(st.lists(st.integers(1, 12), min_size=1, max_size=3), st.booleans(), st.booleans(),
              st.sampled_from(["float32", "float16", "float64"])),
    min_size=1, max_size=5,
)


@st.composite
def runs(draw):
    params = tuple(TensorSpec(f"p{i}", tuple(shape), dtype=dtype, trainable=trainable, masked=masked)
                   for i, (shape, trainable, masked, dtype) in enumerate(draw(specs)))
    buffers = tuple(TensorSpec(f"b{i}", (n,), trainable=False) for i, n in enumerate(draw(st.lists(st.integers(1, 9),
                                                                                                 max_size=3))))
    manifest = Manifest(engine="portable", input_shape=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))),
                        num_classes=draw(st.integers(1, 12)), parameters=params, buffers=buffers,
                        extra={"activation_bytes_per_sample": draw(st.integers(0, 5000))})
    return dict(manifest=manifest, batch_size=draw(st.integers(1, 64)), replay_batch_size=draw(st.integers(0, 64)),
                optimizer=draw(st.sampled_from(["sgd", MOMENTUM, "adamw"])), store_logits=draw(st.booleans()))


def minimum_bytes(run) -> int:
    """The smallest budget the planner accepts, found by halving (independent of the planner's own sum)."""
    low, high = 0, 1 << 40
    while low < high:
        mid = (low + high) // 2
        try:
            plan_memory(budget_bytes=mid, **run)
            high = mid
        except ValueError:
            low = mid + 1
    return low


@settings(max_examples=150, deadline=None)
@given(run=runs(), extra_bytes=st.integers(0, 10**7))
def test_plan_fits_the_budget_and_the_buffer_is_as_large_as_fits(run, extra_bytes):
    minimum = minimum_bytes(run)
    plan = plan_memory(budget_bytes=minimum + extra_bytes, **run)
    example = bytes_per_example(run["manifest"].input_shape, run["manifest"].num_classes, run["store_logits"])
    assert plan.replay_example_bytes == example
    assert plan.total_bytes <= plan.budget_bytes
    assert plan.total_bytes + example > plan.budget_bytes  # one more example would not fit
    assert plan.replay_capacity >= run["replay_batch_size"]  # a replay batch can always be drawn
    parts = (plan.parameters_bytes + plan.gradients_bytes + plan.optimizer_bytes + plan.masks_bytes
             + plan.batchnorm_bytes + plan.activations_bytes + plan.replay_capacity * example)
    assert plan.total_bytes == parts
    if minimum > 0:
        with pytest.raises(ValueError, match=f"needs at least {minimum} bytes"):
            plan_memory(budget_bytes=minimum - 1, **run)


# --- refusals -------------------------------------------------------------------------

def test_too_small_budget_names_the_bytes_needed_and_the_breakdown():
    # AdamW, batch 32 + 16: model 13 856 + activations 48 000 + one replay batch 16 x 306 = 66 752.
    plan_memory(literal_manifest(), 66_752, 32, ADAMW, replay_batch_size=16)
    with pytest.raises(ValueError) as info:
        plan_memory(literal_manifest(), 66_751, 32, ADAMW, replay_batch_size=16)
    message = str(info.value)
    assert "a budget of 66751 bytes" in message and "needs at least 66752 bytes" in message
    for needle in ("parameters", "2 792 B", "gradients", "2 776 B", "optimizer", "5 552 B", "masks", "2 704 B",
                   "batchnorm", "32 B", "activations", "48 000 B", "one replay batch (16 x 306 B)", "4 896 B"):
        assert needle in message, needle


def test_without_replay_the_minimum_is_model_plus_activations():
    plan = plan_memory(literal_manifest(), 13_856 + 8000, 8, ADAMW)
    assert plan.replay_capacity == 0 and plan.unused_bytes == 0
    with pytest.raises(ValueError, match="needs at least 21856 bytes"):
        plan_memory(literal_manifest(), 13_856 + 7999, 8, ADAMW)


def test_missing_activation_size_asks_for_a_new_export():
    with pytest.raises(ArtifactError, match=r"no extra\['activation_bytes_per_sample'\].*export the model again"):
        plan_memory(literal_manifest(extra={}), "1MiB", 8, "sgd")
    with pytest.raises(ArtifactError, match=r"= -5; accepted: an integer >= 0"):
        plan_memory(literal_manifest(extra={"activation_bytes_per_sample": -5}), "1MiB", 8, "sgd")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0; accepted: an integer >= 1"),
    (dict(replay_batch_size=-1), "replay_batch_size=-1; accepted: an integer >= 0"),
    (dict(optimizer="adam"), "optimizer kind 'adam' is unknown; accepted: sgd, adamw"),
    (dict(budget_bytes="lots"), "size 'lots' is not understood"),
])
def test_argument_errors(kwargs, message):
    args = dict(manifest=literal_manifest(), budget_bytes="1MiB", batch_size=8, optimizer="sgd") | kwargs
    with pytest.raises(ValueError, match=message):
        plan_memory(**args)


# --- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("512KiB", 512 * 1024), ("4MiB", 4 * 1024**2), ("1.5GiB", 1_610_612_736), ("1000000", 1_000_000),
    ("10MB", 10_000_000), ("1kb", 1000), ("2 GB", 2 * 10**9), (" 7B ", 7), ("0", 0), ("1TiB", 1 << 40),
    ("0.5KiB", 512), ("1.3KiB", 1331), (".5MiB", 524_288), ("1.0", 1), (4096, 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text, message", [
    ("-1", "'-1' is negative"), ("-4MiB", "is negative"), (-3, "size -3 is negative"),
    ("", "not understood"), ("abc", "not understood"), ("12XB", "'12XB' is not understood"),
    ("4M", "'K', 'M', 'G' are ambiguous: write KiB or KB"), ("1e6", "not understood"), ("nan", "not understood"),
    ("1.5", "fraction of a byte"), ("4 MiB extra", "not understood"), (1.5, "is a float"), (True, "is a bool"),
    (None, "is a NoneType"),
])
def test_parse_bytes_refuses(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_bytes(text)
    assert "accepted" in str(info.value)


# --- measured memory --------------------------------------------------------------------

def test_proc_status_parsing(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   100000 kB\nThreads:\t1\n")
    assert _proc_status_bytes("VmHWM", status) == 123456 * 1024
    assert _proc_status_bytes("VmRSS", status) == 100000 * 1024
    assert _proc_status_bytes("VmSwap", status) is None
    assert _proc_status_bytes("VmHWM", tmp_path / "absent") is None


def test_rss_is_measured_and_peak_follows_an_allocation():
    import numpy as np

    before = peak_rss_bytes()
    assert before is not None and before > 1 << 20
    block = np.ones(64 * 1024**2 // 8)  # 64 MiB, touched
    after = peak_rss_bytes()
    current = current_rss_bytes()
    assert after >= before
    if current is not None:  # Linux
        assert after >= current >= block.nbytes


# --- the machine's memory ------------------------------------------------------------------------


def test_machine_memory_reads_meminfo_and_a_cgroup_limit(tmp_path):
    from edgecl.runtime.memory import machine_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n")
    assert machine_memory(meminfo, tmp_path / "no-cgroup") == MachineMemory(16384 * 1024, 8192 * 1024)
    (tmp_path / "memory.max").write_text("4194304\n")
    (tmp_path / "memory.current").write_text("1048576\n")
    assert machine_memory(meminfo, tmp_path) == MachineMemory(4194304, 3145728)  # a container's limit caps both
    (tmp_path / "memory.max").write_text("max\n")
    assert machine_memory(meminfo, tmp_path) == MachineMemory(16384 * 1024, 8192 * 1024)


def test_machine_memory_of_this_machine_is_known_and_consistent():
    from edgecl.runtime.memory import machine_memory

    memory = machine_memory()
    assert memory.total_bytes > 0 and 0 <= memory.available_bytes <= memory.total_bytes


def test_check_fits_names_the_request_its_bytes_the_machine_and_what_is_accepted():
    from edgecl.runtime.memory import check_fits

    memory = MachineMemory(total_bytes=8 * 2**30, available_bytes=2**30)
    check_fits("buffer=1000 examples", 1000 * 306, "buffer", 306, "examples", memory)  # fits: nothing raised
    with pytest.raises(ValueError, match=r"^buffer=10000000 examples is 3,060,000,000 B \(2.85 GiB\), more than "
                                         r"this machine has: 1.00 GiB available of 8.00 GiB total; accepted: "
                                         r"buffer <= 3,508,960 examples$"):
        check_fits("buffer=10000000 examples", 10**7 * 306, "buffer", 306, "examples", memory)
    with pytest.raises(ValueError, match=r"budget='2GiB' is 2,147,483,648 B .*accepted: budget <= 1,073,741,824 B "
                                         r"\(1.00 GiB\)$"):
        check_fits("budget='2GiB'", 2 * 2**30, "budget", memory=memory)
    check_fits("anything", 10**30, "x", memory=MachineMemory(None, None))  # unknown memory: nothing to check against
