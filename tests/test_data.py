"""Expert datasets: collect -> load round trip, the ncps layout, malformed shards."""

import io
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import data, envs, errors, rundir
from jaxatari.checkpoint import Checkpointer
from jaxatari.policy import load_policy
from jaxatari.data import DataError
from jaxatari.networks import init_actor_critic, resolve_network_spec

EPISODES, NUM_ENVS, SEQ_LEN, CAP = 4, 2, 7, 30


def make_expert(run_dir, *, network="cfc", seed=0, env_option=()):
    """A run directory as a training script writes it (config.json + a policy
    checkpoint), holding a random Conv(+CfC) policy for Breakout."""
    env, spec = envs.make("Breakout-v5", 1, seed=0, options=envs.parse_env_options(env_option))
    env.close()
    ns = resolve_network_spec(network, num_actions=spec.num_actions, atari=True, torso="convblock",
                              cfc=dict(hidden_size=8, backbone_units=16), torso_kwargs=dict(channels=[8, 8, 8, 8]))
    _, params = init_actor_critic(ns, jax.random.PRNGKey(seed), spec.obs_shape, spec.obs_dtype)
    # Perturbed, so that the actions depend on the state (a fresh policy plays one action).
    k = jax.random.PRNGKey(seed + 1)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(k, x.shape), params)
    rundir.write_config(run_dir, dict(env="Breakout-v5", preset="nature", env_option=list(env_option), algo="ppo",
                                      seed=seed, env_spec=spec.to_json(), network_spec=ns.to_json()))
    with Checkpointer(run_dir) as ckpt:
        ckpt.save(1, {"params": params}, policy=params)
    return run_dir


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    expert = make_expert(root / "expert")
    cfg = data.CollectConfig(run_dir=str(expert), out=str(root / "data"), episodes=EPISODES, seq_len=SEQ_LEN,
                             num_envs=NUM_ENVS, val_fraction=0.25, max_episode_steps=CAP, seed=3, mode="greedy")
    result = data.collect(cfg)
    return cfg, result


# ---------------------------------------------------------------------------
# collect -> load round trip
# ---------------------------------------------------------------------------


def test_collect_writes_the_ncps_layout_split_by_episode(collected):
    cfg, result = collected
    out = cfg.out
    m = json.loads((data.Path(out) / "manifest.json").read_text())
    assert result.status == "done" and m == json.loads(json.dumps(result.manifest))
    assert (m["env"], m["preset"], m["num_actions"], m["seq_len"], m["obs_shape"]) == (
        "Breakout-v5", "nature", 4, SEQ_LEN, [84, 84, 4])
    assert m["options"]["episodic_life"] is True and m["options"]["max_episode_steps"] == CAP  # as it trained
    log = m["episode_log"]
    assert len(log) == m["episodes"] == EPISODES
    assert [e["env"] for e in log].count(0) == [e["env"] for e in log].count(1) == EPISODES // NUM_ENVS
    assert (m["train_episodes"], m["val_episodes"]) == (3, 1)
    for e in log:  # consecutive windows, the tail shorter than S dropped (and validation repeats of training ones)
        assert 1 <= e["length"] <= CAP and len(e["shards"]) == e["sequences"]
        assert e["sequences"] + e.get("repeats_dropped", 0) == e["length"] // SEQ_LEN
    for split in ("train", "val"):
        ids = sorted(i for e in log if e["split"] == split for i in e["shards"])
        files = data.list_shards(out, split)
        assert len(ids) == len(files) == m[f"{split}_sequences"]
        assert [f.name for f in files] == [f"{split}_{i}.npz" for i in ids]  # dropped repeats leave gaps in val
        assert split == "val" or ids == list(range(len(files)))
    assert m["train_sequences"] > 0 and m["val_sequences"] > 0
    returns = [e["return"] for e in log]
    assert m["expert_return"]["mean"] == pytest.approx(np.mean(returns))

    # Raw files: exactly the ncps keys, dtypes and shapes.
    with np.load(data.shard_path(out, "train", 0), allow_pickle=False) as f:
        assert sorted(f.files) == ["actions", "obs"]
        assert f["obs"].dtype == np.uint8 and f["obs"].shape == (SEQ_LEN, 84, 84, 4)
        assert f["actions"].dtype == np.int64 and f["actions"].shape == (SEQ_LEN,)


def episode_frames(out, episode):
    obs, actions = zip(*(data.read_sequence(data.shard_path(out, episode["split"], i)) for i in episode["shards"]))
    return np.concatenate(obs), np.concatenate(actions)


def test_recorded_frames_and_actions_are_the_experts_games(collected):
    """Frame t of an episode is what the env showed before action t (replaying the
    recorded actions in a fresh env with the same seed reproduces every frame), and
    action t is the recurrent expert's greedy action after frames 0..t from a zero
    state (its state is reset at each episode start and, as a PPO expert trained
    under the nature preset's episodic life, on the frame after each life-loss
    frame: the episode's ``life_starts``, which the replay's lives confirm;
    carried otherwise). The games are played as the expert trained: under
    episodic life EnvPool's reset step after a lost life (FIRE) is not recorded."""
    cfg, result = collected
    log = result.manifest["episode_log"]
    pol = load_policy(cfg.run_dir)
    # Acting a step at a time, a loaded policy convolves with XLA (im2col is for loops on a CPU): same params.
    assert pol.spec.torso_kwargs["conv_impl"] == "xla"
    for e in log:
        if e.get("repeats_dropped"):  # a validation game with shards dropped: its frames are not contiguous
            continue
        obs, actions = episode_frames(cfg.out, e)
        T = len(actions)
        first = np.zeros((T, 1), bool)
        first[[0, *e["life_starts"]]] = True
        _, logits, _ = pol.network.apply(pol.params, pol.initial_carry(1), jnp.asarray(obs[:, None]), first)
        np.testing.assert_array_equal(np.asarray(logits[:, 0].argmax(-1)), actions)
        assert len(set(actions.tolist())) > 1, "the test expert should not play one action"

    e0 = next(e for e in log if e["env"] == 0)  # env 0's first game
    obs, actions = episode_frames(cfg.out, e0)
    env, _ = envs.make("Breakout-v5", NUM_ENVS, seed=cfg.seed, options={"max_episode_steps": CAP})
    o, info = env.reset()
    starts = []
    for t in range(len(actions)):
        np.testing.assert_array_equal(o[0], obs[t])
        o, _, term, trunc, info = env.step(np.array([actions[t]] + [0] * (NUM_ENVS - 1), np.int32))
        if term[0] and not (info["terminated"][0] or trunc[0]):  # a life lost, as in training: the reset step
            o, *_ = env.step(np.zeros(NUM_ENVS, np.int32))       # presses FIRE; its frame starts the next life
            starts.append(t + 1)
    env.close()
    assert result.manifest["expert"]["reset_on_life_loss"] is True
    assert e0["life_starts"] == [s for s in starts if s < len(actions)]
    assert any(e["life_starts"] for e in log)  # the case under test happened


def test_loader_batches_shapes_dtypes_and_coverage(collected):
    cfg, _ = collected
    train, val = data.load_splits(cfg.out, num_actions=4)
    assert (train.seq_len, train.obs_shape, val.obs_shape) == (SEQ_LEN, (4, 84, 84), (4, 84, 84))
    B = 3
    batches = list(train.batches(B, shuffle=True, seed=0, epoch=0, drop_last=True))
    assert len(batches) == len(train) // B == train.num_batches(B, drop_last=True)
    for b in batches:
        assert b.obs.shape == (B, SEQ_LEN, 4, 84, 84) and b.obs.dtype == np.uint8
        assert b.actions.shape == (B, SEQ_LEN) and b.actions.dtype == np.int32 and b.mask.all()

    # Every sequence once per epoch; the order changes with the epoch and is reproducible.
    def rows(epoch, **kw):
        return [tuple(a) for b in train.batches(1, shuffle=True, seed=0, epoch=epoch, **kw) for a in b.actions]

    assert rows(0) == rows(0, workers=0) == rows(0, workers=3, prefetch=1)
    assert sorted(rows(0)) == sorted(rows(1)) == sorted(tuple(data.read_sequence(f)[1]) for f in train.files)
    order0, order1 = train.order(shuffle=True, seed=0, epoch=0), train.order(shuffle=True, seed=0, epoch=1)
    assert sorted(order0) == list(range(len(train))) and not np.array_equal(order0, order1)
    # Resuming mid-epoch skips exactly the batches already done.
    full = list(train.batches(2, shuffle=True, seed=5, epoch=2))
    rest = list(train.batches(2, shuffle=True, seed=5, epoch=2, start=1))
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest):
        np.testing.assert_array_equal(a.obs, b.obs)

    # Validation: every sequence once, the last batch padded with masked zero rows.
    vb = list(val.batches(len(val) + 2, shuffle=False, drop_last=False))
    assert len(vb) == 1 and vb[0].mask.tolist() == [True] * len(val) + [False] * 2
    assert not vb[0].obs[len(val):].any()

    # Channel layout: channels first is the stored [S, H, W, C] transposed.
    with np.load(val.files[0]) as f:
        raw = f["obs"]
    first_cf = data.read_sequence(val.files[0])[0]
    first_cl = data.read_sequence(val.files[0], channels_first=False)[0]
    np.testing.assert_array_equal(first_cl, raw)
    np.testing.assert_array_equal(first_cf, raw.transpose(0, 3, 1, 2))
    assert data.SequenceDataset(cfg.out, "val", channels_first=False).obs_shape == (84, 84, 4)


def test_collect_refuses_to_overwrite_a_dataset(collected):
    cfg, _ = collected
    with pytest.raises(DataError, match="already holds a dataset"):
        data.collect(cfg)


@pytest.mark.parametrize("kwargs, message", [
    (dict(episodes=0), r"--episodes 0"),
    (dict(seq_len=0), r"--seq-len 0"),
    (dict(val_fraction=1.0), r"--val-fraction 1.0 .* \[0, 1\)"),
    (dict(mode="argmax"), r"--mode 'argmax' .* greedy or sample"),
    (dict(seed=-1), r"--seed -1 is not accepted: it must be an integer >= 0"),
])
def test_collect_bad_flags(tmp_path, kwargs, message):
    cfg = data.CollectConfig(run_dir=str(tmp_path / "nope"), out=str(tmp_path / "d"), **kwargs)
    with pytest.raises(errors.ConfigError, match=message):
        data.collect(cfg)


def test_repeated_games_do_not_leak_into_validation(tmp_path, caplog):
    """Without no-op starts or sticky actions a greedy expert plays the same game
    in every env: the validation sequences repeat training ones frame for frame,
    so they are dropped (a validation accuracy on them would measure memory)."""
    expert = make_expert(tmp_path / "expert", env_option=("noop_max=1",))  # no random no-ops: one game
    cfg = data.CollectConfig(run_dir=str(expert), out=str(tmp_path / "data"), episodes=4, seq_len=SEQ_LEN,
                             num_envs=2, val_fraction=0.25, max_episode_steps=CAP, seed=3, mode="greedy")
    with caplog.at_level("WARNING"):
        m = data.collect(cfg).manifest
    val = [e for e in m["episode_log"] if e["split"] == "val"]
    assert len(val) == 1 and val[0]["repeats_dropped"] == val[0]["length"] // SEQ_LEN > 0
    assert val[0]["shards"] == [] and m["val_sequences"] == 0 and data.list_shards(cfg.out, "val") == []
    assert m["val_repeats_dropped"] == val[0]["repeats_dropped"]
    assert m["distinct_train_sequences"] == m["train_sequences"] // 3  # three training games, one game's windows
    assert "repeated a training sequence frame for frame and were dropped" in caplog.text
    assert "--preset machado (sticky actions) or --mode sample" in caplog.text
    # The manifest records the options the games were played with (BC's closed loop takes them).
    assert data.read_manifest(tmp_path / "data")["options"]["noop_max"] == 1


def test_the_default_expert_samples_varied_games(tmp_path):
    """By default a PPO expert plays its own distribution: the same deterministic
    game gives varied sequences, none dropped as a repeat."""
    expert = make_expert(tmp_path / "expert", env_option=("noop_max=1",))
    m = data.collect(data.CollectConfig(run_dir=str(expert), out=str(tmp_path / "data"), episodes=4, seq_len=SEQ_LEN,
                                        num_envs=2, val_fraction=0.25, max_episode_steps=CAP, seed=3)).manifest
    assert m["expert"]["mode"] == "sample"
    assert m["val_repeats_dropped"] == 0 and m["distinct_train_sequences"] == m["train_sequences"] > 0


def test_val_split_sizes():
    assert data.val_episodes(1, 0.1, 0).sum() == 0  # one game: all training
    assert data.val_episodes(2, 0.1, 0).sum() == 1  # at least one validation game
    assert data.val_episodes(10, 0.1, 0).sum() == 1 and data.val_episodes(100, 0.1, 0).sum() == 10
    assert data.val_episodes(3, 0.9, 0).sum() == 2  # at least one training game
    assert data.val_episodes(10, 0.0, 0).sum() == 0


def test_windows_drop_the_tail():
    assert data.sequence_windows(10, 4) == [(0, 4), (4, 8)]
    assert data.sequence_windows(3, 4) == []


# ---------------------------------------------------------------------------
# The original ncps layout and malformed shards
# ---------------------------------------------------------------------------


def write_ncps(directory, n_train=5, n_val=2, S=4, seed=0):
    """Shards as the ncps data were published: no manifest, obs [S, 84, 84, 4], int64 actions."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            np.savez(directory / f"{split}_{i}.npz", obs=rng.integers(0, 256, (S, 84, 84, 4), dtype=np.uint8),
                     actions=rng.integers(0, 4, S).astype(np.int64))


def test_reads_the_ncps_layout(tmp_path):
    write_ncps(tmp_path / "breakout", n_train=12)
    with pytest.raises(DataError, match=r"no train_<i>.npz shards; did you mean .*breakout\?"):
        data.load_splits(tmp_path)  # ncps' data_atari_seq/ holds one directory per game
    train, val = data.load_splits(tmp_path / "breakout", num_actions=4)
    assert data.read_manifest(tmp_path / "breakout") is None
    assert (len(train), len(val), train.seq_len) == (12, 2, 4)
    # Index order, not lexicographic: train_10 after train_9.
    assert [f.name for f in train.files][9:] == ["train_9.npz", "train_10.npz", "train_11.npz"]
    b = next(train.batches(4, shuffle=False))
    with np.load(tmp_path / "breakout" / "train_0.npz") as f:
        np.testing.assert_array_equal(b.obs[0], f["obs"].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(b.actions[0], f["actions"])


def _bad_shards():
    ok_obs = np.zeros((4, 84, 84, 4), np.uint8)
    ok_act = np.zeros(4, np.int64)
    return {
        "not_npz": (lambda p: p.write_bytes(b"this is not a zip file"), r"not a readable shard"),
        "truncated": (lambda p: p.write_bytes(_valid_bytes(p)[:200]), r"not a readable shard"),
        "pickled": (lambda p: np.savez(p, obs=np.array([object()], dtype=object), actions=ok_act),
                    r"not a readable shard .*pickle"),
        "npy": (lambda p: np.save(open(p, "wb"), ok_obs), r"holds a single array"),
        "missing_actions": (lambda p: np.savez(p, obs=ok_obs, labels=ok_act), r"lacks actions \(it has obs, labels\)"),
        "float_obs": (lambda p: np.savez(p, obs=ok_obs.astype(np.float32), actions=ok_act),
                      r"obs has dtype float32 .* expected uint8 \[S, H, W, C\]"),
        "flat_obs": (lambda p: np.savez(p, obs=np.zeros((4, 84 * 84 * 4), np.uint8), actions=ok_act),
                     r"obs has dtype uint8 and shape \[4, 28224\]"),
        "short_actions": (lambda p: np.savez(p, obs=ok_obs, actions=ok_act[:3]),
                          r"actions have dtype int64 and shape \[3\]; expected integer actions \[4\]"),
        "float_actions": (lambda p: np.savez(p, obs=ok_obs, actions=ok_act.astype(np.float32)),
                          r"actions have dtype float32"),
        "action_range": (lambda p: np.savez(p, obs=ok_obs, actions=np.array([0, 1, 9, 2])),
                         r"action 9 is out of range; this game's actions are 0 \.\. 3"),
        "other_shape": (lambda p: np.savez(p, obs=np.zeros((4, 84, 84, 3), np.uint8), actions=ok_act),
                        r"obs has shape \[4, 84, 84, 3\] but train_0.npz has \[4, 84, 84, 4\]"),
        "channels_first": (lambda p: np.savez(p, obs=ok_obs.transpose(0, 3, 1, 2), actions=ok_act),
                           r"obs of shape \[4, 4, 84, 84\] look channels-first .* obs.transpose\(0, 2, 3, 1\)"),
    }


def _valid_bytes(p):
    buf = io.BytesIO()
    np.savez_compressed(buf, obs=np.zeros((4, 84, 84, 4), np.uint8), actions=np.zeros(4, np.int64))
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(_bad_shards()))
def test_malformed_shard_is_rejected_naming_the_file(tmp_path, kind):
    write_ncps(tmp_path, n_train=3, n_val=1)
    bad = tmp_path / "train_2.npz"
    make, message = _bad_shards()[kind]
    bad.unlink()
    make(bad)
    train = data.SequenceDataset(tmp_path, "train", num_actions=4)  # train_0 is fine
    with pytest.raises(DataError, match=message) as e:
        list(train.batches(3, shuffle=False))
    assert "train_2.npz" in str(e.value)
    with pytest.raises(DataError, match="train_2.npz"):  # also with reading threads off
        list(train.batches(1, shuffle=False, workers=0))


def test_missing_splits_and_directories(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_splits(tmp_path / "nowhere")
    write_ncps(tmp_path, n_val=0)
    with pytest.raises(DataError, match=r"no val_<i>.npz shards .* train_0.npz"):
        data.load_splits(tmp_path)


def test_write_sequence_is_atomic_and_checked(tmp_path):
    p = tmp_path / "train_0.npz"
    data.write_sequence(p, np.ones((2, 84, 84, 4), np.uint8), np.array([1, 2]))
    assert [q.name for q in tmp_path.iterdir()] == ["train_0.npz"]  # no temporary left behind
    assert zipfile.is_zipfile(p)
    obs, actions = data.read_sequence(p, channels_first=False)
    assert obs.shape == (2, 84, 84, 4) and actions.tolist() == [1, 2]
    with pytest.raises(DataError, match=r"takes integer actions \[2\]"):
        data.write_sequence(p, np.ones((2, 84, 84, 4), np.uint8), np.array([1]))
