"""A2C: the loss by hand, value targets, the optimiser, config errors, learning on
CartPole, and the script on SpaceInvaders (exact resume: tests/test_exact_resume.py)."""

import csv
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import driver, envs, errors, runner
from jaxatari.agents import a2c
from jaxatari.driver import train
from jaxatari.ops import A2CBatch, a2c_loss, gae, n_step_returns
from jaxatari.rollout import Trajectory

ROOT = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "scripts/a2c.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---------------------------------------------------------------------------
# The loss against hand-computed values
# ---------------------------------------------------------------------------


def table_apply(params, batch):
    """A 'network' that is a table: logits and values are the params themselves."""
    return params["logits"], params["values"]


def hand_batch():
    # Sample 0: logits (0, 0)     -> pi = (1/2, 1/2), a = 0, A = 2,  V = 1,   v_hat = 3
    # Sample 1: logits (ln 3, 0)  -> pi = (3/4, 1/4), a = 0, A = -1, V = 0.5, v_hat = 0
    # Sample 2: masked out (an EnvPool reset step) with values that would change everything.
    params = dict(logits=jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]]),
                  values=jnp.array([1.0, 0.5, 100.0]))
    batch = A2CBatch(obs=jnp.zeros((3, 1)), actions=jnp.array([0, 0, 1]), advantages=jnp.array([2.0, -1.0, 50.0]),
                     targets=jnp.array([3.0, 0.0, -100.0]), mask=jnp.array([True, True, False]))
    return params, batch


def test_a2c_loss_hand_computed():
    params, batch = hand_batch()
    loss, info = a2c_loss(params, batch, apply_fn=table_apply, vf_coef=0.25, ent_coef=0.01)
    # policy: -(2 ln(1/2) + (-1) ln(3/4)) / 2 = (2 ln 2 + ln 0.75) / 2           = 0.5493061
    # value:  ((1 - 3)^2 + (0.5 - 0)^2) / 2 = 4.25 / 2                           = 2.125
    # entropy: (ln 2 + [-(3/4) ln(3/4) - (1/4) ln(1/4)]) / 2 = (0.6931472 + 0.5623351) / 2 = 0.6277412
    # total: 0.5493061 + 0.25 * 2.125 - 0.01 * 0.6277412                          = 1.0742787
    np.testing.assert_allclose(info.policy_loss, 0.5493061, rtol=1e-6)
    np.testing.assert_allclose(info.value_loss, 2.125, rtol=1e-6)
    np.testing.assert_allclose(info.entropy, 0.6277412, rtol=1e-6)
    np.testing.assert_allclose(loss, 1.0742787, rtol=1e-6)


def test_a2c_loss_detaches_advantages_and_targets():
    # Advantages computed from the critic's own params (as targets - V): the policy term must
    # not push on V, so dL/dV is the value term alone, vf_coef * 2 (V - v_hat) / N_valid.
    params, batch = hand_batch()

    def loss(p):
        b = batch._replace(advantages=batch.targets - p["values"], targets=batch.targets + 0 * p["values"])
        return a2c_loss(p, b, apply_fn=table_apply, vf_coef=0.25, ent_coef=0.01)[0]

    g = jax.grad(loss)(params)
    np.testing.assert_allclose(g["values"], [0.25 * 2 * (1 - 3) / 2, 0.25 * 2 * 0.5 / 2, 0.0], rtol=1e-6)
    # d/dlogits of -A log pi(a) / N for sample 0: -A (onehot - pi) / 2 = -2 (1/2, -1/2) / 2; entropy at
    # the uniform policy has zero gradient.
    np.testing.assert_allclose(g["logits"][0], [-0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(g["logits"][2], [0.0, 0.0])


# ---------------------------------------------------------------------------
# Value targets from a rollout
# ---------------------------------------------------------------------------


def fake_traj(T=6, B=3, seed=0):
    rng = np.random.default_rng(seed)
    term = np.zeros((T, B), bool)
    trunc = np.zeros((T, B), bool)
    term[2, 0] = True
    trunc[4, 1] = True
    return Trajectory(obs=jnp.zeros((T, B, 1)), first=jnp.zeros((T, B), bool), valid=jnp.ones((T, B), bool),
                      actions=jnp.zeros((T, B), jnp.int32), log_probs=jnp.zeros((T, B)),
                      values=jnp.asarray(rng.normal(size=(T, B)), jnp.float32),
                      rewards=jnp.asarray(rng.normal(size=(T, B)), jnp.float32),
                      terminated=jnp.asarray(term), truncated=jnp.asarray(trunc))


def test_value_targets_nstep_and_gae():
    traj = fake_traj()
    last = jnp.array([0.5, -1.0, 2.0])
    adv, tgt = a2c.value_targets(traj, last, target="nstep", gamma=0.9, gae_lambda=0.95)
    ref = n_step_returns(traj.rewards, traj.dones, last, gamma=0.9, truncations=traj.truncated, values=traj.values)
    np.testing.assert_allclose(tgt, ref)
    np.testing.assert_allclose(adv, ref - traj.values, rtol=1e-6)
    # The truncated step bootstraps from V(s_{t+1}), the terminated one does not.
    np.testing.assert_allclose(tgt[4, 1], traj.rewards[4, 1] + 0.9 * traj.values[5, 1], rtol=1e-6)
    np.testing.assert_allclose(tgt[2, 0], traj.rewards[2, 0], rtol=1e-6)

    adv_g, tgt_g = a2c.value_targets(traj, last, target="gae", gamma=0.9, gae_lambda=0.95)
    ref_adv, ref_ret = gae(traj.rewards, traj.values, traj.dones, last, gamma=0.9, gae_lambda=0.95,
                           truncations=traj.truncated)
    np.testing.assert_allclose(adv_g, ref_adv)
    np.testing.assert_allclose(tgt_g, ref_ret)


# ---------------------------------------------------------------------------
# The optimiser: clip, then TensorFlow-style RMSProp, linearly decayed learning rate
# ---------------------------------------------------------------------------


def test_rmsprop_is_tensorflow_style_and_lr_decays_to_zero():
    c = a2c.resolve(a2c.Config(env="SpaceInvaders-v5"))
    opt = a2c.make_optimizer(c, num_updates=10)
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([0.1, -0.2])}  # global norm 0.22 < max_grad_norm: not clipped
    state = opt.init(params)
    upd, state = opt.update(g, state, params)
    # ms starts at 1: ms = 0.99 * 1 + 0.01 g^2; step = -lr g / sqrt(ms + eps), eps inside the root.
    ms = 0.99 + 0.01 * np.array([0.1, -0.2]) ** 2
    np.testing.assert_allclose(upd["w"], -7e-4 * np.array([0.1, -0.2]) / np.sqrt(ms + 1e-5), rtol=1e-5)
    for _ in range(9):
        upd, state = opt.update(g, state, params)
    assert np.all(np.asarray(upd["w"]) != 0)  # update 10 of 10 still moves
    upd, state = opt.update(g, state, params)
    np.testing.assert_allclose(upd["w"], 0.0)  # the rate has reached 0

    big = {"w": jnp.array([30.0, -40.0])}  # norm 50 -> clipped to 0.5: (0.3, -0.4)
    upd, _ = opt.update(big, opt.init(params), params)
    ms = 0.99 + 0.01 * np.array([0.3, -0.4]) ** 2
    np.testing.assert_allclose(upd["w"], -7e-4 * np.array([0.3, -0.4]) / np.sqrt(ms + 1e-5), rtol=1e-5)


# ---------------------------------------------------------------------------
# Config: defaults and bad input
# ---------------------------------------------------------------------------


def test_atari_and_classic_defaults():
    a = a2c.resolve(a2c.Config(env="SpaceInvaders-v5"))
    assert (a.num_envs, a.num_steps, a.learning_rate, a.rms_alpha, a.rms_eps) == (16, 5, 7e-4, 0.99, 1e-5)
    assert (a.ent_coef, a.vf_coef, a.max_grad_norm, a.gamma, a.anneal_lr) == (0.01, 0.25, 0.5, 0.99, True)
    assert a.target == "nstep" and a.gae_lambda == 0.95 and a.preset == "nature"
    c = a2c.resolve(a2c.Config(env="CartPole-v1"))
    assert c.preset == "none" and c.total_timesteps <= 1_000_000


@pytest.mark.parametrize("kw, match", [
    (dict(target="td"), r"--target 'td' is not accepted; use one of nstep, gae\."),
    (dict(num_envs=0), r"--num-envs 0"),
    (dict(gae_lambda=1.5), r"--gae-lambda 1.5 .* in \[0, 1\]"),
    (dict(rms_alpha=1.0), r"--rms-alpha 1.0 .* in \[0, 1\)"),
    (dict(max_grad_norm=0.0), r"--max-grad-norm 0.0 .* > 0"),
    (dict(learning_rate=-1.0), r"--learning-rate -1.0"),
    (dict(network="lstm"), r"--network 'lstm'"),
])
def test_bad_config_named(kw, match):
    with pytest.raises(errors.ConfigError, match=match):
        c = a2c.resolve(a2c.Config(env="CartPole-v1", **kw))
        a2c.network_spec(c, envs.make(c.env, 1, seed=0)[1])


def test_script_rejects_bad_target_before_compiling():
    r = run_script("--env", "CartPole-v1", "--target", "td")
    assert r.returncode == 2
    assert "--target 'td'" in r.stderr and "Traceback" not in r.stderr
    assert "Compiled" not in r.stdout


# ---------------------------------------------------------------------------
# The compiled chunk: traces once, feed-forward and recurrent
# ---------------------------------------------------------------------------


def build(c, num_updates=100):
    """The driver's pieces for one device: ``(config, context, envs, state before update 0)``."""
    c = dataclasses.replace(c, devices=1)
    es = driver.make_envs(c, 1, [c.seed])
    ctx = driver.Context(es.spec, a2c.network_spec(c, es.spec), es.step_fn, es.local_envs, num_updates)
    return c, ctx, es, driver.initial_state(a2c.ALGORITHM, c, ctx, es, [c], abstract=False)


@pytest.mark.parametrize("network", ["auto", "cfc"])
def test_chunk_compiles_once(network):
    c = a2c.resolve(a2c.Config(env="CartPole-v1", num_envs=3, num_steps=5, network=network, cfc_units=8,
                               cfc_backbone_units=16))
    c, ctx, es, state = build(c)

    def update(state, handle):
        return a2c.update(c, ctx, state, handle)

    chex.clear_trace_counter()
    chunk = driver.make_chunk(chex.assert_max_traces(update, n=1), es.mesh,
                              driver.state_specs(a2c.ALGORITHM, state, False), 4)
    handle = es.handle
    with jax.transfer_guard("disallow"):  # no implicit host<->device copy inside the training loop
        for _ in range(3):
            state, handle, out = chunk(state, handle)
    assert int(state.update) == 12
    m = jax.device_get(out.metrics)
    assert m["finite"].all() and list(m["env_steps"]) == [135, 150, 165, 180]
    assert out.actions.shape == (4 * 5, 3) and out.actions.dtype == jnp.uint8
    np.testing.assert_allclose(m["learning_rate"], 2e-3 * (1 - np.arange(8, 12) / 100), rtol=1e-6)
    assert set(a2c.METRIC_COLUMNS) <= set(m)


# ---------------------------------------------------------------------------
# Learning: CartPole with the classic-control defaults
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cartpole_learns(tmp_path):
    # The classic defaults (8 envs x 5 steps, RMSProp 2e-3) over the 1M steps, stopped once
    # the mean of the last 100 full games reaches 400: seeds 1-9 get there at 120k-140k steps (and
    # reach 500 by the end of the default 500k-step run). Random play scores ~22.
    c = a2c.resolve(a2c.Config(env="CartPole-v1", total_timesteps=1_000_000, chunk_steps=10_000))
    assert (c.num_envs, c.num_steps, c.learning_rate, c.target) == (8, 5, 2e-3, "nstep")
    sched = runner.make_schedule(c.total_timesteps, c.batch_size, c.chunk_steps)
    c, ctx, es, state = build(c, sched.num_updates)
    chunk = driver.make_chunk(functools.partial(a2c.update, c, ctx), es.mesh,
                              driver.state_specs(a2c.ALGORITHM, state, False), sched.updates_per_chunk)
    res = runner.run(run_dir=tmp_path, state=state, handle=es.handle, chunk_fn=chunk, schedule=sched, start_chunk=0,
                     num_envs=c.num_envs, env_steps=lambda s: int(s.update) * c.batch_size,
                     policy_of=lambda s: s.params, target_return=400.0, metric_columns=a2c.METRIC_COLUMNS,
                     tensorboard=False)
    rows = read_csv(tmp_path / "metrics.csv")
    best = max(float(row["return_mean100"]) for row in rows if row["return_mean100"])
    assert res.status == "target_reached" and best >= 400, f"mean of the last 100 returns peaked at {best:.1f}"
    assert res.global_step <= 1_000_000


# ---------------------------------------------------------------------------
# The script on a real Atari game
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_spaceinvaders_script_writes_run_dir(tmp_path):
    d = tmp_path / "run"
    r = run_script("--env", "SpaceInvaders-v5", "--total-timesteps", "100", "--num-envs", "4",
                   "--num-steps", "5", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["env"] == "SpaceInvaders-v5" and cfg["algo"] == "a2c" and cfg["preset"] == "nature"
    assert (cfg["num_envs"], cfg["num_steps"], cfg["target"]) == (4, 5, "nstep")
    assert cfg["network_spec"]["torso"] == "nature" and cfg["network_spec"]["shared"] is True
    with open(d / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert header == list(runner.BASE_COLUMNS) + list(a2c.METRIC_COLUMNS)
    rows = read_csv(d / "metrics.csv")
    assert len(rows) == 5 and int(rows[-1]["global_step"]) == 100
    assert all(math.isfinite(float(rows[-1][k])) for k in ("grad_norm", "policy_loss", "value_loss", "entropy",
                                                            "value_mean", "return_target_mean"))
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert (d / "checkpoints" / "latest" / "100").is_dir()
    assert (d / "actions.u8").stat().st_size == 100  # one uint8 per env step, for exact resume
