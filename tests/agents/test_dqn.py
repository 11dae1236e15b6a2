"""DQN: presets and config errors, the replay ratio, the compiled chunk, learning on
CartPole, the script on Pong, and exact resume."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import configs, driver, envs, errors, runner
from jaxatari.agents import dqn

ROOT = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _train(argv):
    """What ``scripts/dqn.py argv`` trains, in this process."""
    return driver.train(dqn.ALGORITHM, configs.cli(dqn.Config, argv=argv))


# ---------------------------------------------------------------------------
# Presets, defaults and bad input (no compilation)
# ---------------------------------------------------------------------------


def test_nature_preset_is_the_published_setup():
    c = dqn.resolve(dqn.Config(env="Breakout-v5"))
    assert c.dqn_preset == "nature" and c.preset == "nature"  # DQN preset and env preset are separate flags
    assert (c.buffer_size, c.batch_size, c.optimizer, c.learning_rate) == (1_000_000, 32, "adam", 1e-4)
    assert (c.target_network_frequency, c.tau, c.start_e, c.end_e) == (1000, 1.0, 1.0, 0.01)
    assert c.exploration_steps == 1_000_000 == c.total_timesteps // 10  # epsilon over the first 10%
    assert (c.learning_starts, c.train_frequency, c.gradient_steps, c.loss) == (80_000, 4, 1, "huber")


def test_pong_fast_preset_counts_agent_steps():
    c = dqn.resolve(dqn.Config(env="Pong-v5", dqn_preset="pong-fast"))
    assert (c.buffer_size, c.batch_size, c.learning_rate, c.learning_starts) == (10_000, 32, 1e-4, 10_000)
    assert (c.target_network_frequency, c.exploration_steps, c.end_e, c.target_return) == (1000, 150_000, 0.01, 19.0)
    assert c.updates_per_env_step == 1.0


def test_explicit_flags_win_over_the_preset():
    c = dqn.resolve(dqn.Config(env="Pong-v5", dqn_preset="pong-fast", buffer_size=4000, learning_rate=3e-4,
                               exploration_steps=5, target_return=-21.0, num_envs=4))
    assert (c.buffer_size, c.learning_rate, c.exploration_steps, c.target_return) == (4000, 3e-4, 5, -21.0)
    # An explicit --exploration-fraction beats the preset's step count (pong-fast decays over 150k steps) ...
    c = dqn.resolve(dqn.Config(env="Pong-v5", dqn_preset="pong-fast", exploration_fraction=0.5))
    assert c.exploration_steps == c.total_timesteps // 2 == 1_000_000
    # ... an explicit --exploration-steps beats the preset's fraction, and resolving is idempotent (resume).
    c = dqn.resolve(dqn.Config(env="Breakout-v5", exploration_steps=1234))
    assert c.exploration_steps == 1234 and dqn.resolve(c) == c
    # A resume may drop the preset's target (--target-return None): it is not filled in again.
    assert dqn.resolve(dqn.Config(env="Pong-v5", dqn_preset="pong-fast")).target_return == 19.0
    assert dqn.resolve(dqn.Config(env="Pong-v5", dqn_preset="pong-fast", resume="r")).target_return is None


def test_classic_defaults_and_buffer_rounding():
    c = dqn.resolve(dqn.Config(env="CartPole-v1"))
    assert c.dqn_preset == "classic" and c.preset == "none" and c.num_envs == 4
    c = dqn.resolve(dqn.Config(env="CartPole-v1", num_envs=3, buffer_size=1000, batch_size=126))
    assert c.buffer_size == 1002  # rounded up to a multiple of the env count


@pytest.mark.parametrize("num_envs,freq,grad_steps,period,updates", [
    (1, 4, 1, 4, 1),    # the single-env reference: one update every 4 steps
    (8, 4, 1, 1, 2),    # 8 envs: 2 updates every iteration
    (6, 4, 1, 2, 3),    # 6 envs: 3 updates every 2 iterations
    (4, 10, 1, 5, 2),
    (3, 1, 2, 1, 6),
])
def test_replay_ratio_is_kept_for_any_env_count(num_envs, freq, grad_steps, period, updates):
    c = dqn.resolve(dqn.Config(env="CartPole-v1", num_envs=num_envs, train_frequency=freq,
                               gradient_steps=grad_steps, batch_size=24 * num_envs))
    assert (c.train_period, c.updates_per_train) == (period, updates)
    assert c.updates_per_train / (c.train_period * num_envs) == pytest.approx(grad_steps / freq)
    assert f"{grad_steps / freq:g} updates/env step" in dqn.describe_replay_ratio(c)


@pytest.mark.parametrize("kw,match", [
    (dict(dqn_preset="fast"), r"--dqn-preset 'fast' .* nature, pong-fast, classic"),
    (dict(network="cfc"), r"--network 'cfc' .* auto, nature, impala, mlp"),
    (dict(tau=0.0), r"--tau 0.0 .* \(0, 1\]"),
    (dict(n_step=0), r"--n-step 0 .* >= 1"),
    (dict(loss="l1"), r"--loss 'l1' .* huber, mse"),
    (dict(optimizer="sgd"), r"--optimizer 'sgd' .* adam, rmsprop"),
    (dict(end_e=1.5), r"--end-e 1.5 .* \[0, 1\]"),
    (dict(train_frequency=0), r"--train-frequency 0"),
    (dict(buffer_size=1.5), r"--buffer-size 1.5 is not accepted: it must be an integer >= 1\."),
    (dict(learning_starts=-1), r"--learning-starts -1 is not accepted: it must be an integer >= 0\."),
    (dict(max_grad_norm=-1.0), r"--max-grad-norm -1.0 .* >= 0 \(0 = no clipping\)\."),
    (dict(huber_delta=0.0), r"--huber-delta 0.0 .* > 0\."),
    (dict(optimizer_eps=-1.0), r"--optimizer-eps -1.0 is not accepted: it must be > 0\."),
    (dict(exploration_fraction=0.0), r"--exploration-fraction 0.0 is not accepted: it must be in \(0, 1\]\."),
    (dict(exploration_steps=0), r"--exploration-steps 0 is not accepted: it must be an integer >= 1\."),
    (dict(num_envs=3), r"--batch-size 128 is not divisible by --num-envs 3: every env gives"),
])
def test_bad_config_names_the_value(kw, match):
    with pytest.raises(errors.ConfigError, match=match):
        dqn.resolve(dqn.Config(env="CartPole-v1", **kw))


def test_script_rejects_bad_preset_quickly():
    r = run_script("scripts/dqn.py", "--env", "Pong-v5", "--dqn-preset", "pong")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--dqn-preset 'pong'" in r.stderr and "pong-fast" in r.stderr
    assert "Traceback" not in r.stderr and "Compiled" not in r.stdout


# ---------------------------------------------------------------------------
# Target network updates
# ---------------------------------------------------------------------------


def test_target_update_hard_and_polyak():
    target, online = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    none = dqn.target_update(target, online, crossings=jnp.asarray(0), tau=1.0)
    hard = dqn.target_update(target, online, crossings=jnp.asarray(1), tau=1.0)
    np.testing.assert_array_equal(none["w"], 0.0)
    np.testing.assert_array_equal(hard["w"], 1.0)
    # Polyak: k crossings apply tau k times: 1 - (1 - tau)^k of the way.
    for k, want in ((0, 0.0), (1, 0.1), (2, 0.19)):
        got = dqn.target_update(target, online, crossings=jnp.asarray(k), tau=0.1)
        np.testing.assert_allclose(got["w"], want, rtol=1e-6)


# ---------------------------------------------------------------------------
# The compiled chunk: traces once, learns at the stated replay ratio
# ---------------------------------------------------------------------------


def _chunk_parts(c):
    """``(config, context, envs, state)`` of the driver on one device for config ``c`` (env seeds from 0)."""
    c = dataclasses.replace(c, devices=1, seed=0)
    es = driver.make_envs(c, 1, [c.seed])
    ctx = driver.Context(es.spec, dqn.network_spec(c, es.spec), es.step_fn, es.local_envs, 1)
    return c, ctx, es, driver.initial_state(dqn.ALGORITHM, c, ctx, es, [c], abstract=False)


def _chunk(c, ctx, es, state, rows_per_chunk, wrap=lambda f: f):
    """The compiled chunk of ``rows_per_chunk`` metrics rows the driver trains with."""
    def update(state, handle):
        return dqn.update(c, ctx, state, handle)

    return driver.make_chunk(wrap(update), es.mesh, driver.state_specs(dqn.ALGORITHM, state, False), rows_per_chunk)


def test_the_chunk_updates_the_buffer_in_place():
    """No copy of the replay frames in the optimized program: the buffer is
    updated in place (learning on a buffer before inserting into it makes XLA
    copy the whole buffer every iteration)."""
    import re

    c = dqn.resolve(dqn.Config(env="CartPole-v1", num_envs=2, buffer_size=512, learning_starts=1, batch_size=8,
                               mlp_hidden=(8,), total_timesteps=10_000, log_every=8))
    c, ctx, es, state = _chunk_parts(c)
    hlo = _chunk(c, ctx, es, state, 1).lower(state, es.handle).compile().as_text()
    frames = state.replay.frames
    shape = f"{jnp.dtype(frames.dtype).name.replace('float', 'f')}[{','.join(map(str, frames.shape))}]"
    assert shape in hlo, shape  # the buffer is in the program
    copies = re.findall(rf"= {re.escape(shape)}(?:{{[^}}]*}})? copy\(", hlo)
    assert not copies, f"{len(copies)} copies of the replay frames {shape} per iteration"


def test_chunk_compiles_once_and_keeps_the_replay_ratio():
    # 3 envs, one update per 2 env steps: 3 updates every 2 iterations, from env step 30 on.
    c = dqn.resolve(dqn.Config(env="CartPole-v1", num_envs=3, train_frequency=2, learning_starts=30,
                               buffer_size=300, batch_size=15, log_every=12, target_network_frequency=7,
                               mlp_hidden=(16,), total_timesteps=10_000))
    c, ctx, es, state = _chunk_parts(c)
    chex.clear_trace_counter()
    chunk = _chunk(c, ctx, es, state, 2, wrap=lambda f: chex.assert_max_traces(f, n=1))
    rows, handle = [], es.handle
    for _ in range(3):
        with jax.transfer_guard("disallow"):  # no implicit host<->device copy inside the training loop
            state, handle, out = chunk(state, handle)
        rows.append(jax.device_get(out.metrics))
        assert out.actions.shape == (2 * c.iterations_per_row, 3) and out.actions.dtype == jnp.uint8
    iters = 3 * 2 * c.iterations_per_row  # 3 chunks of 2 rows of 4 iterations
    assert int(state.iteration) == iters
    expected = 3 * sum(1 for it in range(1, iters + 1) if it * 3 >= 30 and it % 2 == 0)
    assert int(state.updates) == expected
    m = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    np.testing.assert_array_equal(m["env_steps"], np.arange(1, 7) * c.steps_per_row)
    assert np.isnan(m["loss"][0]) and np.isfinite(m["loss"][-1]) and m["finite"].all()
    assert set(runner._SPECIAL) | set(dqn.METRIC_COLUMNS) <= set(m)
    assert m["epsilon"][0] > m["epsilon"][-1]
    # The last iteration (env steps 69 -> 72) trained, then crossed 70 = 10 x 7: a hard sync after the update.
    chex.assert_trees_all_close(state.target_params, state.params)


class BallFollower:
    """A Q-network stand-in for Breakout whose greedy action moves the paddle under the ball (FIRE when no ball
    is in sight): it breaks through to a 4-point brick within 300 steps, where random play only ever scores 1s."""

    @staticmethod
    def init(key, obs):
        return {}

    @staticmethod
    def apply(params, obs):  # [N, 4, 84, 84] uint8 -> [N, 4]
        frame = obs[:, -1, :, 5:79].astype(jnp.float32)  # the newest frame, inside the side walls
        ball = frame[:, 38:75].sum(1)  # column sums between the bricks and the paddle (row 76)
        paddle = frame[:, 76] > 100
        paddle_x = (paddle * jnp.arange(74)).sum(1) / jnp.maximum(paddle.sum(1), 1)
        ball_x = ball.argmax(1)
        move = jnp.where(ball_x > paddle_x + 1, 2, jnp.where(ball_x < paddle_x - 1, 3, 0))  # RIGHT, LEFT, NOOP
        return jax.nn.one_hot(jnp.where(ball.max(1) > 0, move, 1), 4)


@pytest.mark.parametrize("env_id, option, qnet, epsilon", [
    ("CartPole-v1", ("max_episode_steps=20",), None, 1.0),  # random play: terminations and truncations
    ("Breakout-v5", (), BallFollower(), 0.0),  # lives lost (terminated), a 4-point brick (reward clipped to 1)
])
def test_the_buffer_holds_what_the_envs_returned(env_id, option, qnet, epsilon, monkeypatch):
    """After one compiled chunk, each env's stored actions, rewards and terminated/truncated flags are those
    the same seeded envs return when stepped on the host with the chunk's actions, EnvPool's reset steps left
    out. Catches flags swapped or dropped, and the unclipped score stored as the reward."""
    n_iter, B = 320, 2
    if qnet is not None:
        monkeypatch.setattr(dqn, "QNetwork", lambda spec: qnet)
    c = dqn.resolve(dqn.Config(env=env_id, env_option=option, num_envs=B, buffer_size=B * (n_iter + 1),
                               learning_starts=10**6, start_e=epsilon, end_e=epsilon, exploration_steps=1,
                               log_every=B * n_iter, total_timesteps=10**7, mlp_hidden=(8,)))
    c, ctx, es, state = _chunk_parts(c)
    state, _, out = _chunk(c, ctx, es, state, 1)(state, es.handle)
    for pool in es.group.pools:
        pool.close()

    host, _ = envs.make(c.env, B, seed=0, preset=c.preset, options=envs.parse_env_options(c.env_option))
    host.reset()
    want, raw, done = [[] for _ in range(B)], [], np.zeros(B, bool)
    for a in np.asarray(out.actions, np.int32):
        _, reward, term, trunc, info = host.step(a)
        for b in np.flatnonzero(~done):  # the step after an episode's end is EnvPool's reset step: not stored
            want[b].append((a[b], reward[b], term[b], trunc[b]))
        raw.append(info.get("reward", reward))
        done = term | trunc
    host.close()
    buf = jax.device_get(state.replay)
    for b in range(B):
        n = int(buf.head[b])
        got = (buf.actions[b, :n], buf.rewards[b, :n], buf.terminated[b, :n], buf.truncated[b, :n])
        for field, x, y in zip(("actions", "rewards", "terminated", "truncated"), got, zip(*want[b])):
            np.testing.assert_array_equal(x, y, err_msg=f"env {b}: {field}")
    term, trunc = (np.array([w[i] for ws in want for w in ws]) for i in (2, 3))
    assert term.any() and (trunc.any() if env_id == "CartPole-v1" else np.max(raw) > 1)  # the cases arose


# ---------------------------------------------------------------------------
# Learning: CartPole with the script's defaults reaches >= 400 within 500k steps
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cartpole_learns(tmp_path, capsys):
    """What the script trains with these flags, in this process."""
    d = tmp_path / "run"
    _train(["--env", "CartPole-v1", "--target-return", "400", "--run-dir", str(d), "--no-tensorboard"])
    out = capsys.readouterr().out
    assert "Target return 400.0 reached" in out
    rows = read_csv(d / "metrics.csv")
    assert int(rows[-1]["global_step"]) <= 500_000
    assert float(rows[-1]["return_mean100"]) >= 400, "random play scores ~22"
    assert list((d / "checkpoints" / "best").iterdir())


# ---------------------------------------------------------------------------
# The script on a real Atari game
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_pong_script_writes_run_dir(tmp_path):
    d = tmp_path / "run"
    r = run_script("scripts/dqn.py", "--env", "Pong-v5", "--dqn-preset", "pong-fast", "--total-timesteps", "256",
                   "--num-envs", "4", "--buffer-size", "400", "--batch-size", "4", "--learning-starts", "192",
                   "--train-frequency", "4", "--log-every", "64", "--chunk-steps", "128", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replay buffer: 400 transitions" in r.stdout and "MiB" in r.stdout
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["algo"] == "dqn" and cfg["env"] == "Pong-v5" and cfg["dqn_preset"] == "pong-fast"
    assert cfg["preset"] == "nature" and cfg["env_spec"]["options"]["episodic_life"] is True
    assert cfg["network_spec"]["torso"] == "nature" and cfg["buffer_in_checkpoints"] is True
    rows = read_csv(d / "metrics.csv")
    assert list(rows[0])[:4] == ["global_step", "update", "wall_time", "sps"]
    assert {"episode_return", "epsilon", "loss", "q_mean", "grad_norm", "buffer_size"} <= set(rows[0])
    assert [int(row["global_step"]) for row in rows] == [64, 128, 192, 256]
    # 1 update per 4 env steps = per iteration of 4 envs, from iteration 48 (192 env steps) to 64.
    assert rows[-1]["loss"] not in ("", "nan") and int(rows[-1]["update"]) == 17
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert (d / "checkpoints" / "latest" / "256").is_dir()
    assert (d / "actions.u8").stat().st_size == 256  # one uint8 per env step

    from jaxatari.policy import load_policy

    policy = load_policy(d)
    obs = np.zeros((2, 4, 84, 84), np.uint8)
    assert np.asarray(policy(obs)).shape == (2,)


# ---------------------------------------------------------------------------
# Resume: exact with the buffer in the checkpoint, refilled without it
# ---------------------------------------------------------------------------


def _rows(path):
    return [{k: v for k, v in row.items() if k not in runner.WALL_CLOCK_COLUMNS} for row in read_csv(path)]


#: The resume tests' run: 600 iterations of 2 envs, checkpointed and chunked at half-way.
RESUME_RUN = ["--env", "CartPole-v1", "--num-envs", "2", "--buffer-size", "1000", "--learning-starts", "300",
              "--exploration-steps", "1000", "--log-every", "200", "--chunk-steps", "600",
              "--checkpoint-every", "600", "--mlp-hidden", "32", "--no-tensorboard"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The resume-test run in one go: the resume test's reference, and a trained DQN run to load."""
    d = tmp_path_factory.mktemp("dqn_full") / "full"
    _train(RESUME_RUN + ["--total-timesteps", "1200", "--run-dir", str(d)])
    return d


@pytest.mark.slow
def test_resume_is_exact_with_the_buffer_and_refills_without(tmp_path, capsys, full_run):
    common, full, part = RESUME_RUN, full_run, tmp_path / "part"
    _train(common + ["--total-timesteps", "600", "--run-dir", str(part)])
    result = _train(["--resume", str(part), "--total-timesteps", "1200"])
    assert result.global_step == 1200
    assert _rows(part / "metrics.csv") == _rows(full / "metrics.csv")

    # Without the buffer in the checkpoint: it refills for --learning-starts steps.
    nobuf = tmp_path / "nobuf"
    _train(common + ["--total-timesteps", "600", "--run-dir", str(nobuf), "--no-checkpoint-buffer"])
    capsys.readouterr()
    _train(["--resume", str(nobuf), "--total-timesteps", "1200"])
    out = capsys.readouterr().out
    assert "not checkpointed (--no-checkpoint-buffer)" in out and "not an exact continuation" in out
    rows = read_csv(nobuf / "metrics.csv")
    assert [int(r["global_step"]) for r in rows] == list(range(200, 1201, 200))
    # The first row after the resume holds only the refilled transitions, with no learning yet.
    assert float(rows[3]["buffer_size"]) <= 200 and rows[3]["loss"] in ("", "nan")
    assert rows[-1]["loss"] not in ("", "nan")


@pytest.mark.slow
def test_sampling_a_q_network_is_refused(tmp_path, full_run):
    """Q-values are not a distribution: ``--mode sample`` (evaluate, collect) and
    ``LoadedPolicy.act(mode="sample")`` refuse a DQN run instead of playing softmax(Q)."""
    from jaxatari import data
    from jaxatari.policy import load_policy

    policy = load_policy(full_run)
    obs = np.zeros((2, 4), np.float32)
    assert np.asarray(policy.act(obs)[0]).shape == (2,)
    with pytest.raises(ValueError, match=r"mode='sample' is not accepted for a DQN policy"):
        policy.act(obs, mode="sample", key=jax.random.key(0))
    with pytest.raises(errors.ConfigError, match=r"--mode sample is not accepted for a DQN run"):
        data.collect(data.CollectConfig(run_dir=str(full_run), out=str(tmp_path / "data"), mode="sample"))
    assert not (tmp_path / "data").exists()
    r = run_script("scripts/evaluate.py", "--run-dir", str(full_run), "--mode", "sample", "--episodes", "1", timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "--mode sample is not accepted for a DQN run" in r.stderr and "use epsilon or greedy" in r.stderr
