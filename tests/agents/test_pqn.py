"""PQN: presets and config errors, exploration, the loss by hand, learning on CartPole,
and the script on Breakout (a Q-policy that loads, plays full games and records)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from _common import assert_cartpole_learns, read_csv, run_script
from jaxatari import errors, runner
from jaxatari.agents import pqn
from jaxatari.policy import load_policy


def test_presets_fill_what_is_left_and_flags_win():
    c = pqn.resolve(pqn.Config(env="Breakout-v5"))
    assert c.pqn_preset == "cleanrl" and c.preset == "nature"
    assert (c.num_envs, c.num_steps, c.num_minibatches, c.update_epochs) == (8, 128, 4, 4)
    assert (c.learning_rate, c.anneal_lr, c.end_e, c.exploration_fraction, c.q_lambda) == (2.5e-4, True, 0.01, 0.1,
                                                                                          0.65)
    assert c.max_grad_norm == 10.0 and c.total_timesteps == 10_000_000
    many = pqn.resolve(pqn.Config(env="Pong-v5", pqn_preset="purejaxql", num_envs=64))
    assert (many.num_envs, many.num_steps, many.num_minibatches, many.update_epochs) == (64, 32, 32, 2)
    assert many.anneal_lr is False and many.end_e == 0.001
    cart = pqn.resolve(pqn.Config(env="CartPole-v1"))
    assert cart.pqn_preset == "classic" and (cart.num_envs, cart.exploration_fraction, cart.end_e) == (4, 0.5, 0.05)
    assert pqn.resolve(cart) == cart  # idempotent: a resume resolves the stored config again


@pytest.mark.parametrize("kw, match", [
    (dict(pqn_preset="fast"), r"--pqn-preset 'fast' is not accepted; use one of cleanrl, purejaxql, classic\."),
    (dict(num_steps=10), r"--num-steps 10 is not divisible by --num-minibatches 4"),
    (dict(q_lambda=1.5), r"--q-lambda 1.5 is not accepted: it must be in \[0, 1\]\."),
    (dict(network="impala"), r"--network 'impala' is not accepted; use one of auto, nature, mlp\."),
    (dict(learning_rate=0.0), r"--learning-rate 0.0 is not accepted: it must be > 0\."),
])
def test_bad_config_named(kw, match):
    with pytest.raises(errors.ConfigError, match=match):
        pqn.resolve(pqn.Config(env="CartPole-v1", **kw))


def test_epsilon_decays_linearly_then_stays():
    c = pqn.resolve(pqn.Config(env="CartPole-v1", total_timesteps=1000, exploration_fraction=0.5, end_e=0.1))
    got = [float(pqn.epsilon(c, jnp.asarray(s))) for s in (0, 250, 500, 900)]
    np.testing.assert_allclose(got, [1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_epsilon_greedy_puts_the_rest_on_the_greedy_action():
    q = jnp.array([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    _, logits, values = pqn.epsilon_greedy(lambda p, obs: q, jnp.asarray(0.3))(None, (), jnp.zeros((1, 2, 4)), None)
    np.testing.assert_allclose(np.exp(logits[0]), [[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(values[0], [3.0, 5.0])
    _, greedy, _ = pqn.epsilon_greedy(lambda p, obs: q, jnp.asarray(0.0))(None, (), jnp.zeros((1, 2, 4)), None)
    assert list(np.argmax(greedy[0], -1)) == [1, 2] and np.isneginf(greedy[0][0, 0])


def test_td_loss_by_hand():
    """0.5 (Q(s, a) - G)^2 over the valid samples only; a masked-out sample holds values that would dominate."""
    table = jnp.array([[1.0, 2.0], [0.0, 4.0], [100.0, 100.0]])
    batch = (jnp.arange(3), jnp.array([1, 0, 1]), jnp.array([0.0, 1.0, -100.0]), jnp.array([True, True, False]))
    loss, q_mean = pqn.td_loss(None, batch, q_apply=lambda p, obs: table[obs])
    np.testing.assert_allclose(loss, (0.5 * 2.0**2 + 0.5 * 1.0**2) / 2)
    np.testing.assert_allclose(q_mean, (2.0 + 0.0) / 2)


@pytest.mark.slow
def test_cartpole_learns(tmp_path):
    assert_cartpole_learns("scripts/pqn.py", tmp_path / "run")


@pytest.mark.slow
def test_breakout_script_trains_a_q_policy_that_loads_and_plays(tmp_path):
    d = tmp_path / "run"
    r = run_script("scripts/pqn.py", "--env", "Breakout-v5", "--total-timesteps", "512", "--num-envs", "4",
                   "--num-steps", "32", "--chunk-steps", "256", "--eval-every", "512", "--eval-episodes", "1",
                   "--env-option", "max_episode_steps=200", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["algo"] == "pqn" and cfg["pqn_preset"] == "cleanrl" and cfg["preset"] == "nature"
    assert cfg["network_spec"]["head"] == "q" and cfg["network_spec"]["torso_kwargs"]["norm"] == "layer"
    with open(d / "metrics.csv") as f:
        assert f.readline().strip().split(",") == list(runner.BASE_COLUMNS) + list(pqn.METRIC_COLUMNS)
    rows = read_csv(d / "metrics.csv")
    assert int(rows[-1]["global_step"]) == 512 and rows[-1]["eval_return"]
    assert all(math.isfinite(float(rows[-1][k])) for k in pqn.METRIC_COLUMNS)
    pol = load_policy(d)
    assert pol.is_q and not pol.recurrent
    obs = np.zeros((3, 4, 84, 84), np.uint8)
    assert pol(obs).shape == (3,)
    video = tmp_path / "play.gif"
    r = run_script("scripts/evaluate.py", "--run-dir", str(d), "--checkpoint", "latest", "--episodes", "1",
                   "--video", str(video))
    assert r.returncode == 0, r.stderr[-3000:]
    assert video.stat().st_size > 0 and "epsilon" in r.stdout
