"""Exact resume on Atari: a Breakout PPO run interrupted by SIGINT after its first
chunk and resumed (the emulators rebuilt by replaying the action log) equals the
uninterrupted run, under the nature preset (episodic life, FIRE resets, no-op
starts) and the machado preset (sticky actions)."""

import os
import signal

import pytest
from test_resume import params_equal, rows

from jaxatari import configs, driver, runner
from jaxatari.agents import ppo
from jaxatari.policy import load_policy

# Two chunks of 4 updates x 2 envs x 16 steps (64 steps per env each), a
# checkpoint after each. The 50-step time limit ends each env's first game in
# the first chunk and its second in the second: the checkpoint holds half-played
# games, which the resumed run must finish and count as the uninterrupted run does.
ARGS = ["--env", "Breakout-v5", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--chunk-steps", "128", "--total-timesteps", "256", "--checkpoint-every", "128",
        "--env-option", "max_episode_steps=50", "--no-tensorboard"]
pytestmark = pytest.mark.slow


class SigintOnEntry(runner.Signals):
    """The run loop's signal handlers, plus a real SIGINT to this process as soon as
    they are installed (after compiling, before the first chunk): the run stops
    after its first chunk, as after a Ctrl-C during it."""

    def __enter__(self):
        super().__enter__()
        os.kill(os.getpid(), signal.SIGINT)
        return self


def train(*argv):
    return driver.train(ppo.ALGORITHM, configs.cli(ppo.Config, argv=list(argv)))


@pytest.mark.parametrize("preset", ["nature", "machado"])
def test_breakout_sigint_then_resume_matches_uninterrupted(preset, tmp_path, monkeypatch, capsys, caplog):
    """Final params (from the checkpoints) and every metrics.csv row but the wall
    clock's equal the uninterrupted run's; the replay reached the checkpoint's
    observations (no "not exact" restart)."""
    a, b = tmp_path / "a", tmp_path / "b"
    done = train(*ARGS, "--preset", preset, "--run-dir", str(a))
    assert done.status == "done" and done.global_step == 256

    with monkeypatch.context() as m:
        m.setattr(runner, "Signals", SigintOnEntry)
        stopped = train(*ARGS, "--preset", preset, "--run-dir", str(b))
    assert stopped.status == "interrupted" and stopped.signal == signal.SIGINT
    assert stopped.global_step == 128 and len(rows(b)) == 4

    resumed = train("--resume", str(b))
    out = capsys.readouterr().out
    assert "Replaying 128 env steps" in out and "Resumed" in out and "not exact" not in caplog.text
    assert resumed.status == "done" and resumed.global_step == 256
    got, want = rows(b), rows(a)
    assert got == want and len(want) == 8
    assert sum(int(r["episodes"]) for r in want[4:]) > 0  # games ended after the resume (scored from the checkpoint)
    pa, pb = load_policy(a / "checkpoints" / "latest"), load_policy(b / "checkpoints" / "latest")
    assert pa.meta["step"] == pb.meta["step"] == 256
    assert params_equal(pa.params, pb.params)
