"""End to end: an agent process behind a pseudo-terminal; the host pushes an exported model and the
digits, trains two tasks of Split Digits on it, and reads back the metrics of the same run done
in-process. Then evaluation, step latency, the checkpoint, a restart mid-training, and the CLI."""

from __future__ import annotations

import signal
import subprocess

import numpy as np
import pytest

from edgecl.devices.host import Device
from edgecl.devices.jobs import DataSpec, TrainSpec
from edgecl.devices.link import AgentError, Link, LinkError
from edgecl.runtime import OptimizerConfig, ReplayBuffer, RunConfig, load_checkpoint, open_engine, run_scenario
from edgecl.runtime.strategies import Learner, Method, SparCLConfig, StrategyConfig
from tests.devices.relay import Relay, agent_command
from tests.devices.test_faults import _hello_when_up
from tests.helpers import TIME_SCALE

pytest.importorskip("sklearn", reason="the host loads the digits with scikit-learn")

ACK_S, RETRIES, SEED, EPOCHS, BUFFER = 0.3, 4, 0, 2, 200
# Seconds of silence before a request fails; emulated, the agent opens the engine TIME_SCALE times slower.
REPLY_S = 5 * TIME_SCALE


class Board:
    """An agent subprocess on a relay, restartable."""

    def __init__(self, workdir):
        self.relay, self.workdir, self.proc = Relay(), workdir, None
        self.log = workdir.parent / "agent.log"

    def start(self) -> None:
        with open(self.log, "a") as log:
            # --progress 0: a PROGRESS after every step, so what the host hears does not hang on how
            # fast the board trains (natively the 36 steps take a few tenths of a second, about
            # agent_command's 0.2 s interval: at times no PROGRESS came at all).
            command = agent_command(self.relay.agent_path, self.workdir, ACK_S, RETRIES) + ["--progress", "0"]
            self.proc = subprocess.Popen(command, stderr=log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def device(self) -> Device:
        device = Device(Link.open(self.relay.host_path, ack_timeout=ACK_S, retries=RETRIES), reply_timeout=REPLY_S)
        _hello_when_up(device)
        return device


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    b = Board(tmp_path_factory.mktemp("board") / "work")
    b.start()
    yield b
    if b.proc.poll() is None:
        b.kill()
    b.relay.close()


@pytest.fixture(scope="module")
def digits():
    from edgecl.runtime.data import load_digits
    from edgecl.runtime.scenarios import split_scenario, train_test_split

    train, test = train_test_split(load_digits(), 0.2, SEED)
    return train, test, split_scenario(train, test, 2, classes_per_task=2)


@pytest.fixture(scope="module")
def pushed(board, exported, digits):
    _, art = exported("mlp")
    with board.device() as device:
        device.push(art, "artifact", "mlp")
        device.push_data(digits[0], digits[1], "digits-s0")
    return art


@pytest.fixture(scope="module")
def reference(pushed, digits):
    """The same run in this process: SparCL-DER++ 0.75 on the first two tasks of Split Digits."""
    engine = open_engine(pushed, OptimizerConfig("sgd", lr=0.1), threads=1)
    scenario = digits[2]
    strategy = StrategyConfig(Method.DERPP, replay_batch=32, sparcl=SparCLConfig(0.75))
    buffer = ReplayBuffer(BUFFER, scenario.input_shape, scenario.num_classes, np.random.default_rng([SEED, 1]),
                          store_logits=True)
    learner = Learner(engine, strategy, buffer, np.random.default_rng(SEED))
    result = run_scenario(scenario, learner, RunConfig(EPOCHS, 32, SEED), progress=False)
    return result, engine.state_arrays()


def spec(run: str, **kw) -> TrainSpec:
    fields = dict(run=run, artifact="mlp", data=DataSpec("digits-s0", tasks=2, classes_per_task=2, seed=SEED),
                  method="derpp", sparsity=0.75, buffer=BUFFER, epochs=EPOCHS, lr=0.1, seed=SEED, threads=1)
    return TrainSpec(**{**fields, **kw})


def same_metrics(a, b) -> None:
    np.testing.assert_allclose(a.acc_matrix, b.acc_matrix, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.task_il_matrix, b.task_il_matrix, rtol=0, atol=1e-6)
    assert (a.steps, a.train_flops, a.dense_train_flops) == (b.steps, b.train_flops, b.dense_train_flops)
    assert abs(a.acc - b.acc) <= 1e-6 and abs(a.bwt - b.bwt) <= 1e-6 and abs(a.fwt - b.fwt) <= 1e-6


def test_train_on_the_board_matches_the_run_in_process(board, pushed, reference, tmp_path):
    progress = []
    with board.device() as device:
        caps = device.capabilities()
        assert "portable" in caps["engines"] and caps["artifacts"] == ["mlp"] and "digits-s0" in caps["data"]
        result = device.train(spec("r1"), progress.append)
        fetched = device.fetch_checkpoint("r1", tmp_path / "r1")
        evaluated = device.evaluate("mlp", DataSpec("digits-s0", tasks=2, seed=SEED), run="r1", threads=1)
    expected, engine_state = reference
    same_metrics(result, expected)
    assert min(np.diag(result.acc_matrix)) > 0.8 and not result.resumed  # each task learnt
    assert [p["step"] for p in progress] == list(range(1, result.steps + 1))  # every step reported
    assert all(p["loss"] > 0 for p in progress)
    # The checkpoint came back whole: the board's weights are the in-process ones.
    ckpt = load_checkpoint(tmp_path / "r1")
    assert ckpt.path == fetched.path and fetched.result.acc_matrix == result.acc_matrix
    for name, value in engine_state.items():
        if name.startswith("param::"):
            np.testing.assert_allclose(ckpt.parts["engine"][name], value, rtol=0, atol=1e-6)
    np.testing.assert_allclose(evaluated.class_il, expected.acc_matrix[-1], atol=1e-6)
    np.testing.assert_allclose(evaluated.task_il, expected.task_il_matrix[-1], atol=1e-6)


def test_training_survives_an_agent_restart(board, pushed, reference):
    device = board.device()
    kill_at = [None]

    def kill_midway(msg):
        if msg["step"] >= 10 and kill_at[0] is None:
            kill_at[0] = msg["step"]
            board.kill()

    with pytest.raises(LinkError):
        device.train(spec("r2", checkpoint_every=4), kill_midway)
    assert kill_at[0] is not None
    board.start()
    _hello_when_up(device)
    result = device.train(spec("r2", checkpoint_every=4))
    assert result.resumed
    same_metrics(result, reference[0])
    with pytest.raises(AgentError, match="exists on the board with another spec"):
        device.train(spec("r2", checkpoint_every=4, epochs=1))
    device.close()


def test_errors_on_the_board_come_back_named(board, pushed):
    with board.device() as device:
        with pytest.raises(AgentError, match="no artifact 'nope' on the board"):
            device.bench("nope")
        with pytest.raises(AgentError, match="a budget of .* is too small"):
            device.train(spec("r3", buffer=None, budget="10KiB"))
        latency = device.bench("mlp", batch=16, steps=5, warmup=1, threads=1)
    assert latency.measured and latency.median_ms > 0 and latency.engine == "portable"


def test_cli_device_commands(board, pushed, capsys, tmp_path):
    from edgecl.bench.edgecl_cli import main

    port = ["--port", board.relay.host_path, "--ack-timeout", str(ACK_S), "--retries", str(RETRIES)]
    assert main(["device", "ping", *port]) == 0
    assert "engines         portable" in capsys.readouterr().out
    assert main(["device", "push", str(pushed), "--name", "mlp", *port]) == 0
    assert "sha256 checked on the board" in capsys.readouterr().out
    args = ["--artifact", "mlp", "--data", "digits", "--tasks", "2", "--method", "derpp", "--sparsity", "0.75",
            "--epochs", "1", "--seed", "0", "--budget", "4MiB", "--threads", "1"]
    assert main(["device", "train", *args, "--fetch", str(tmp_path), *port]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "accuracy after each task" in out and "SparCL-DER++ 0.75" in out
    assert main(["device", "train", *args, *port]) == 0  # same settings: the run resumes, already done
    assert "(resumed)" in capsys.readouterr().out
    assert main(["device", "eval", "--data", "digits", "--tasks", "2", *port]) == 0  # the only artifact
    assert "class-IL" in capsys.readouterr().out
    assert main(["device", "bench", "--artifact", "mlp", "--steps", "4", "--batch", "8", *port]) == 0
    assert "measured on the board" in capsys.readouterr().out
    assert main(["device", "bench", "--artifact", "nope", *port]) == 2
    assert "no artifact 'nope'" in capsys.readouterr().err


def test_board_latency_pushes_once_and_measures(board, pushed):
    from edgecl.devices.host import board_latency

    first = board_latency(board.relay.host_path, pushed, batch=8, steps=3, warmup=0, threads=1)
    again = board_latency(board.relay.host_path, pushed, batch=8, steps=3, warmup=0, threads=1)
    assert first.measured and first.median_ms > 0 and first.infer_median_ms > 0 and again.steps == 3
    with board.device() as device:
        names = device.capabilities()["artifacts"]
    assert len([n for n in names if n.startswith("bench-")]) == 1  # pushed once, then reused
