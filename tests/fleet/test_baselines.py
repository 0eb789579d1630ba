"""The references of the fleet table: devices learning alone, and one model on all the data."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgecl.fleet.baselines import centralised_joint, local_only  # noqa: E402
from tests.fleet.fleet_data import make_run  # noqa: E402
from tests.fleet.test_simulation import positions, stream_lengths  # noqa: E402


@pytest.fixture
def cnn(exported):
    return exported("cnn")[1]


def test_local_only_learns_every_stream_alone_and_sends_nothing(tmp_path, cnn):
    run_dir = make_run(tmp_path, cnn, clients=2, rounds=5, n_train=600)
    rounds = []
    result = local_only(run_dir, on_round=lambda r, row: rounds.append(r))
    assert rounds == [1, 2, 3, 4, 5]
    matrix = np.array(result["acc_matrix"])
    assert matrix.shape == (5, 5) and np.isfinite(matrix).all() and result["forgetting"] is not None
    assert len(result["acc_per_device"]) == 2 and result["acc"] == pytest.approx(np.mean(result["acc_per_device"]))
    assert result["bytes_sent_per_round"] == [0] * 5
    assert positions(run_dir) == stream_lengths(run_dir)


def test_centralised_joint_trains_one_model_on_all_the_data(tmp_path, cnn):
    run_dir = make_run(tmp_path, cnn, clients=2, rounds=5, n_train=600, epochs=3)
    result = centralised_joint(run_dir)
    assert result["forgetting"] is None and result["acc_matrix"] is None
    assert result["acc"] > 0.5  # 10 template classes, well above chance (0.1)
    assert not (run_dir / "joint-state").exists()
