"""Behaviour cloning: the loss, learning a synthetic task that needs memory, the
closed-loop reset, exact resume, and collect -> bc -> evaluate as scripts."""

import csv
import dataclasses
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from jaxatari import data, envs, errors
from jaxatari.agents import bc
from jaxatari.policy import load_policy
from jaxatari.evaluate import evaluate
from jaxatari.networks import ActorCritic, initial_carry

ROOT = Path(__file__).resolve().parents[2]
H = 32  # synthetic frames: Breakout under --env-option img_height=32 img_width=32
SMALL = dict(conv_channels=(8, 8, 8, 8), cfc_units=16, cfc_backbone_units=32)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def write_memory_task(directory, *, n_train, n_val, S=8, size=H, seed=0):
    """Shards (ncps layout, no manifest) of a task that needs memory.

    Each step shows an 8x8 bright square in one of four quadrants over noise, or
    (with probability 1/2, never at t = 0) noise only. The label is the quadrant
    of the most recently shown square, so a memoryless policy scores at most
    ``visible + (1 - visible) / 4`` (about 62%). Returns that ceiling for the
    validation split.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    half, visible = size // 2, []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            obs = rng.integers(0, 60, (S, size, size, 4), dtype=np.uint8)
            actions = np.zeros(S, np.int64)
            for t in range(S):
                show = t == 0 or rng.random() < 0.5
                if show:
                    q = int(rng.integers(4))
                    r, c = (q // 2) * half + rng.integers(0, half - 7), (q % 2) * half + rng.integers(0, half - 7)
                    obs[t, r:r + 8, c:c + 8] = 255
                actions[t] = q
                if split == "val":
                    visible.append(show)
            data.write_sequence(data.shard_path(directory, split, i), obs, actions)
    v = float(np.mean(visible))
    return v + (1 - v) / 4


def memory_config(tmp, **kw):
    return bc.Config(**{**dict(data=str(tmp / "data"), env="Breakout-v5",
                               env_option=(f"img_height={H}", f"img_width={H}"), epochs=4, batch_size=16,
                               learning_rate=1e-2, eval_episodes=0, run_dir=str(tmp / "run"), tensorboard=False,
                               keep=2, seed=0), **SMALL, **kw})


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bc_memory")
    ceiling = write_memory_task(tmp / "data", n_train=256, n_val=32)
    result = bc.train(memory_config(tmp))
    return tmp, ceiling, result


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def tiny_net(A=4):
    c = bc.Config(data="-", conv_channels=(4, 4), cfc_units=4, cfc_backbone_units=8)
    spec = bc.network_spec(c, A)
    net = ActorCritic(spec)
    state = bc.init(spec, bc.make_optimizer(c), (4, 16, 16), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), state.params)
    return c, spec, net, state.replace(params=params)


def test_bc_loss_matches_numpy_and_starts_each_sequence_from_zero():
    c, spec, net, state = tiny_net()
    T, B = 5, 3
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.integers(0, 256, (T, B, 4, 16, 16), dtype=np.uint8))
    actions = jnp.asarray(rng.integers(0, 4, (T, B)), jnp.int32)
    mask = jnp.array([True, False, True])
    carry0 = initial_carry(spec, B)
    loss_fn = jax.jit(functools.partial(bc.bc_loss, apply_fn=net.apply))
    apply = jax.jit(net.apply)
    loss, stats = loss_fn(state.params, carry0, obs, actions, mask)

    first = np.zeros((T, B), bool)
    first[0] = True
    _, logits, _ = apply(state.params, carry0, obs, first)
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(actions)[..., None], -1)[..., 0]  # [T, B]
    m = np.asarray(mask, np.float64)[None]
    assert float(loss) == pytest.approx((nll * m).sum() / (T * m.sum()), rel=1e-5)
    assert float(stats.count) == T * 2
    assert float(stats.correct) == ((logits.argmax(-1) == np.asarray(actions)) * m).sum()
    # The state is zeroed at t = 0: any carry passed in gives the same loss.
    other = jax.tree.map(lambda x: jnp.full_like(x, 0.7), carry0)
    assert float(loss_fn(state.params, other, obs, actions, mask)[0]) == float(loss)
    # ... and the state is carried: later steps depend on earlier frames.
    obs2 = obs.at[0].set(255 - obs[0])
    _, logits2, _ = apply(state.params, carry0, obs2, first)
    assert not np.allclose(np.asarray(logits2[-1]), logits[-1], atol=1e-6)


def test_train_step_compiles_once_and_moves_only_the_policy():
    c, spec, net, state = tiny_net()
    opt = bc.make_optimizer(c)
    state = state.replace(opt_state=opt.init(state.params))
    step = bc.make_train_step(net, spec, opt, batch_size=2)
    v0 = jax.device_get(state.params["params"]["v"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        state = step(state, rng.integers(0, 256, (2, 4, 4, 16, 16), dtype=np.uint8), rng.integers(0, 4, (2, 4)))
    assert step._cache_size() == 1
    assert int(state.update) == int(state.batch) == 3 and float(state.count) == 3 * 2 * 4
    # The unused value head gets no gradient, and Adam leaves it exactly as initialised.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["params"]["v"]), v0)


# ---------------------------------------------------------------------------
# Learning: a Conv+CfC clone of a task that needs memory
# ---------------------------------------------------------------------------


def test_cfc_clone_learns_a_task_that_needs_memory(memory_run):
    tmp, ceiling, result = memory_run
    assert ceiling < 0.7  # a memoryless policy cannot pass the bar below
    assert result.status == "done" and result.best_val_accuracy >= 0.95, result
    rows = read_csv(tmp / "run" / "metrics.csv")
    assert list(rows[0])[:3] == ["global_step", "epoch", "update"]
    assert {"train_loss", "val_loss", "val_accuracy", "eval_return", "sps"} <= set(rows[0])
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["global_step"]) for r in rows] == [e * 16 * 16 * 8 for e in (1, 2, 3, 4)]  # steps seen
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # The best checkpoint is the epoch with the highest validation accuracy.
    accs = [float(r["val_accuracy"]) for r in rows]
    best_step = int(rows[int(np.argmax(accs))]["global_step"])
    assert [p.name for p in (tmp / "run" / "checkpoints" / "best").iterdir()] == [str(best_step)]
    cfg = json.loads((tmp / "run" / "config.json").read_text())
    assert cfg["algo"] == "bc" and cfg["network_spec"]["core"] == "cfc" and cfg["env_spec"]["obs_shape"] == [4, H, H]
    pol = load_policy(tmp / "run")
    assert pol.meta["score"] == pytest.approx(max(accs))


def test_closed_loop_resets_the_clone_at_each_episode_start(memory_run):
    """One env plays three short games in a row. At each episode's first step the
    loaded clone's logits are those of a zero state, although the state it is
    handed there (the previous game's) is not zero; within a game the state flows."""
    tmp, _, _ = memory_run
    pol = load_policy(tmp / "run")
    calls = []

    def record(carry, first, obs, logits):
        calls.append(tuple(np.asarray(x) for x in (carry, first, obs, logits)))

    def recording_policy(params, carry, obs, first):
        out = pol.policy_fn(params, carry, obs, first)
        io_callback(record, None, carry, first[0], obs[0], out[1][0], ordered=True)
        return out

    options = dict(img_height=H, img_width=H, max_episode_steps=12)
    r = evaluate(recording_policy, pol.params, pol.initial_carry, env_id="Breakout-v5", options=options,
                 episodes=3, num_envs=1, seed=7)
    assert r.episodes == 3 and len(calls) == r.steps
    starts = [i for i, (_, first, _, _) in enumerate(calls) if first[0]]
    assert len(starts) == 3 and starts[0] == 0

    zero = pol.initial_carry(1)
    no_reset = jnp.zeros((1, 1), bool)
    for i in starts:
        carry, _, obs, logits = calls[i]
        _, from_zero, _ = pol.network.apply(pol.params, zero, jnp.asarray(obs)[None], no_reset)
        np.testing.assert_allclose(logits, np.asarray(from_zero[0]), rtol=1e-5, atol=1e-6)
        if i > 0:  # the previous game's state was handed in, and would have mattered
            assert np.abs(carry).max() > 1e-3
            _, from_carry, _ = pol.network.apply(pol.params, jnp.asarray(carry), jnp.asarray(obs)[None], no_reset)
            assert not np.allclose(np.asarray(from_carry[0]), logits, atol=1e-4)
    # Within a game the state flows: the step after a start sees a non-zero state.
    assert all(np.abs(calls[i + 1][0]).max() > 1e-3 for i in starts)


# ---------------------------------------------------------------------------
# Resume: interrupted mid-epoch and resumed == uninterrupted
# ---------------------------------------------------------------------------


class InterruptAfter:
    """Stands in for runner.Signals: a SIGINT arrives after ``n`` batches."""

    n = 0

    def __init__(self, unit="batch"):
        self.checks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def received(self):
        self.checks += 1
        return signal.SIGINT if self.checks > self.n else None


def test_interrupted_mid_epoch_and_resumed_matches_uninterrupted(tmp_path, monkeypatch, capsys):
    write_memory_task(tmp_path / "data", n_train=12, n_val=3, S=4, size=16)
    base = dict(data=str(tmp_path / "data"), env="Breakout-v5", env_option=("img_height=16", "img_width=16"), epochs=2,
                batch_size=4, eval_episodes=0, tensorboard=False, conv_channels=(4, 4), cfc_units=4,
                cfc_backbone_units=8)
    monkeypatch.setattr(bc._EpochBar, "PLAIN_EVERY_S", 0.0)  # not a terminal: a plain line per batch, here
    full = bc.train(bc.Config(**base, run_dir=str(tmp_path / "full")))
    out = capsys.readouterr().out  # 3 batches per epoch: lines after batches 1 and 2, the epoch line after 3
    assert "epoch 1/2: 1/3 batches, train loss " in out and "epoch 2/2: 2/3 batches" in out
    assert "3/3 batches" not in out and "epoch 1/2: train loss" in out

    monkeypatch.setattr(bc.runner, "Signals", type("Interrupt", (InterruptAfter,), {"n": 4}))  # epoch 2, batch 2 of 3
    part = bc.train(bc.Config(**base, run_dir=str(tmp_path / "part")))
    assert part.status == "interrupted" and int(part.state.epoch) == 1 and int(part.state.batch) == 1
    monkeypatch.undo()
    resumed = bc.train(dataclasses.replace(bc.Config(**base, run_dir=str(tmp_path / "part")),
                                           resume=str(tmp_path / "part")))
    assert resumed.status == "done"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params), jax.device_get(full.state.params))
    a, b = read_csv(tmp_path / "full" / "metrics.csv"), read_csv(tmp_path / "part" / "metrics.csv")
    for row in (*a, *b):
        del row["wall_time"], row["sps"]
    assert a == b


def test_a_bad_shard_mid_epoch_keeps_the_batches_trained(tmp_path):
    """A shard that cannot be read stops training with the file named and the
    batches before it saved; with the file replaced, --resume ends where an
    unbroken run does."""
    write_memory_task(tmp_path / "data", n_train=12, n_val=3, S=4, size=16)
    base = dict(data=str(tmp_path / "data"), env="Breakout-v5", env_option=("img_height=16", "img_width=16"), epochs=1,
                batch_size=4, eval_episodes=0, tensorboard=False, conv_channels=(4, 4), cfc_units=4,
                cfc_backbone_units=8, num_workers=0)
    full = bc.train(bc.Config(**base, run_dir=str(tmp_path / "full")))
    train_ds = data.SequenceDataset(tmp_path / "data", "train")
    victim = train_ds.files[train_ds.order(shuffle=True, seed=1, epoch=0)[8]]  # read by the third batch
    good = victim.read_bytes()
    victim.write_bytes(b"not a zip")
    part = tmp_path / "part"
    with pytest.raises(data.DataError, match=rf"{victim.name} is not a readable shard .* Training stopped at epoch "
                                             r"1 \+ 2 batches, saved in .* --resume "):
        bc.train(bc.Config(**base, run_dir=str(part)))
    assert load_policy(part / "checkpoints" / "latest").meta["update"] == 2
    victim.write_bytes(good)
    resumed = bc.train(dataclasses.replace(bc.Config(**base, run_dir=str(part)), resume=str(part)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params), jax.device_get(full.state.params))
    # --data may point at a moved copy on resume, not at another dataset.
    write_memory_task(tmp_path / "other", n_train=16, n_val=3, S=4, size=16)
    with pytest.raises(data.DataError, match=r"holds 16 train sequences of 4 steps, .* resumed trained on 12 of 4"):
        bc.train(dataclasses.replace(bc.Config(**dict(base, data=str(tmp_path / "other"), epochs=2),
                                               run_dir=str(part)), resume=str(part)))


def test_closed_loop_games_are_the_datasets(tmp_path):
    """With the dataset's preset, the options its games were played with beyond
    the preset (the expert's --env-option values, collect's cap) apply to the
    clone's games too, and to scripts/evaluate.py through config.json."""
    write_memory_task(tmp_path / "d", n_train=2, n_val=1, S=2, size=16)
    played = dict(envs.resolve_options("Breakout-v5", "nature"), max_episode_steps=500, repeat_action_probability=0.1)
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"env": "Breakout-v5", "preset": "nature",
                                                                "options": played}))
    c, _ = bc.resolve(bc.Config(data=str(tmp_path / "d")))
    assert sorted(c.env_option) == ["max_episode_steps=500", "repeat_action_probability=0.1"]
    assert envs.resolve_options(c.env, c.preset, envs.parse_env_options(c.env_option))["max_episode_steps"] == 500
    c, _ = bc.resolve(bc.Config(data=str(tmp_path / "d"), env_option=("max_episode_steps=100",)))
    assert c.env_option == ("repeat_action_probability=0.1", "max_episode_steps=100")  # the flag wins
    assert bc.resolve(c)[0] == c  # resolving a resolved config (a resume) adds nothing
    assert bc.resolve(bc.Config(data=str(tmp_path / "d"), preset="machado"))[0].env_option == ()  # another game


# ---------------------------------------------------------------------------
# Bad input fails before compiling, naming the values
# ---------------------------------------------------------------------------


def test_bad_input(tmp_path):
    with pytest.raises(data.DataError, match=r"--data '.*nowhere' is not a directory"):
        bc.resolve(bc.Config(data=str(tmp_path / "nowhere")))
    write_memory_task(tmp_path / "d", n_train=2, n_val=1, S=2, size=16)
    with pytest.raises(errors.ConfigError, match=r"--env is needed: .* no manifest.json"):
        bc.resolve(bc.Config(data=str(tmp_path / "d")))
    with pytest.raises(errors.ConfigError, match=r"--network 'lstm' .* cfc, convblock, nature, impala"):
        bc.resolve(bc.Config(data=str(tmp_path / "d"), env="Breakout-v5", network="lstm"))
    with pytest.raises(errors.ConfigError, match=r"--seed -1 is not accepted: it must be an integer >= 0"):
        bc.resolve(bc.Config(data=str(tmp_path / "d"), env="Breakout-v5", seed=-1))
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"env": "Pong-v5", "preset": "machado"}))
    c, _ = bc.resolve(bc.Config(data=str(tmp_path / "d")))
    assert (c.env, c.preset) == ("Pong-v5", "machado")
    with pytest.raises(errors.ConfigError, match=r"--env Breakout-v5 differs .* \(Pong-v5\)"):
        bc.resolve(bc.Config(data=str(tmp_path / "d"), env="Breakout-v5"))
    # 16x16 frames are not what Pong-v5 shows under its preset, and 2 sequences are not a batch of 32.
    with pytest.raises(data.DataError, match=r"frames are \[4, 16, 16\] .* Pong-v5 .* \[4, 84, 84\]"):
        bc.train(bc.Config(data=str(tmp_path / "d"), run_dir=str(tmp_path / "r")))
    with pytest.raises(errors.ConfigError, match=r"has 2 sequences, fewer than --batch-size 32"):
        bc.train(bc.Config(data=str(tmp_path / "d"), env_option=("img_height=16", "img_width=16"),
                           run_dir=str(tmp_path / "r")))


# ---------------------------------------------------------------------------
# Scripts: expert -> collect -> bc -> load_policy / evaluate, on Breakout
# ---------------------------------------------------------------------------


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_collect_then_bc_scripts_on_breakout(tmp_path):
    from jaxatari.agents import ppo

    expert = tmp_path / "expert"  # a tiny, untrained PPO expert: the run directory is what matters
    from jaxatari.driver import train

    train(ppo.ALGORITHM, ppo.Config(env="Breakout-v5", total_timesteps=64, num_envs=4, num_steps=16, num_minibatches=2,
                         update_epochs=1, run_dir=str(expert), tensorboard=False))

    d = tmp_path / "data"
    # Sampled actions: played greedily, the untrained expert's two 20-step games are the same frames (Breakout's
    # screen does not change over the no-op starts), and collect would drop the validation game as a repeat.
    r = run_script("scripts/collect.py", "--run-dir", str(expert), "--episodes", "2", "--out", str(d),
                   "--seq-len", "4", "--max-episode-steps", "20", "--mode", "sample")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((d / "manifest.json").read_text())
    assert (m["train_episodes"], m["val_episodes"], m["train_sequences"], m["val_sequences"]) == (1, 1, 5, 5)
    assert "Expert return" in r.stdout and m["expert"]["algo"] == "ppo"

    run = tmp_path / "bc"
    r = run_script("scripts/bc.py", "--data", str(d), "--epochs", "1", "--eval-episodes", "1", "--batch-size", "4",
                   "--conv-channels", "8", "8", "8", "8", "--cfc-units", "8", "--cfc-backbone-units", "16",
                   "--run-dir", str(run), "--no-tensorboard")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1/1" in r.stdout
    rows = read_csv(run / "metrics.csv")
    assert len(rows) == 1 and rows[0]["eval_return"] != "" and rows[0]["val_accuracy"] != ""
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["algo"], cfg["env"], cfg["preset"]) == ("bc", "Breakout-v5", "nature")  # from the manifest
    assert cfg["env_option"] == ["max_episode_steps=20"]  # the games the data came from (collect's cap)
    assert (run / "checkpoints" / "best").is_dir() and (run / "checkpoints" / "latest").is_dir()

    pol = load_policy(run)
    actions, carry = pol.act(np.zeros((2, 4, 84, 84), np.uint8))
    assert actions.shape == (2,) and pol.recurrent
    # scripts/evaluate.py plays it (video included) like any other policy.
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve the script's annotations through it
    try:
        spec.loader.exec_module(script)
    finally:
        del sys.modules[spec.name]
    video = tmp_path / "play.gif"
    assert script.main(script.Config(run_dir=str(run), episodes=1, video=str(video))) == 0
    assert video.stat().st_size > 0
    assert json.loads((run / "eval.json").read_text())["episodes"] == 1


def test_scripts_reject_bad_input_quickly(tmp_path):
    r = run_script("scripts/bc.py", "--data", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "is not a directory" in r.stderr and "Traceback" not in r.stderr
