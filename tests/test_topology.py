"""Resuming on another topology: the pieces that do not need several devices.

The end-to-end checks (2 devices -> 1, 2 processes -> 2 processes and -> 1
process) are in ``tests/test_parallel.py`` and ``tests/test_parallel_dqn.py``.
"""

import numpy as np
import pytest

from jaxatari import envs, parallel, rundir


def ring(values, W):
    """A ring of ``W`` slots after writing ``values`` in order, and its count."""
    r = np.full((W,), np.nan, np.float32)
    for i, v in enumerate(values):
        r[i % W] = v
    return r, len(values)


def test_merge_windows_keeps_every_return_when_they_fit():
    a, na = ring([1, 2], 3)
    b, nb = ring([3, 4, 5, 6], 3)  # 3 slots: 3 was overwritten by 6
    window, count = parallel.merge_windows(np.concatenate([a, b]), np.array([na, nb]), 3)
    rings = window.reshape(3, 3)
    kept = sorted(x for x in window if not np.isnan(x))
    assert kept == [1, 2, 4, 5, 6] and count.tolist() == [2, 2, 1]
    for r, n in zip(rings, count):  # each new ring is valid: n values from slot 0, newest last
        assert not np.isnan(r[:n]).any() and np.isnan(r[n:]).all()


def test_merge_windows_to_the_plain_layout_keeps_the_newest():
    a, na = ring([1, 2, 3, 4], 2)  # holds 3, 4
    b, nb = ring([10, 20, 30], 2)  # holds 20, 30
    window, count = parallel.merge_windows(np.concatenate([a, b]), np.array([na, nb]), 0)
    assert window.shape == (2,) and np.ndim(count) == 0 and int(count) == 2
    assert sorted(window.tolist()) == [4.0, 30.0]  # the newest of each ring


def test_merge_windows_then_the_tracker_continues_the_ring():
    window, count = parallel.merge_windows(np.array([5, 6, 7], np.float32), np.array(3), 2)
    stats = envs.EpisodeStats(returns=np.zeros(2, np.float32), lengths=np.zeros(2, np.int32),
                              window=window.reshape(2, 3)[0], count=count[0])
    assert envs.window_mean(stats) == pytest.approx(np.mean([7, 5]))


def test_stored_layout():
    assert parallel.stored_layout({}) == (0, 1)
    assert parallel.stored_layout({"scale_out": {"devices": 4, "processes": 2, "num_agents": 1}}) == (4, 2)
    assert parallel.stored_layout({"scale_out": {"devices": 1, "processes": 1, "num_agents": 3}}) == (0, 1)


def test_action_logs_convert_between_process_counts(tmp_path):
    """Two processes' logs (each its own columns) read as one global log,
    and rewritten for one process, and back."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, 6, size=(7, 4)).astype(np.uint8)
    for p in range(2):
        rundir.ActionLog(tmp_path, 2, rundir.action_log_name(p, 2)).append(full[:, 2 * p:2 * p + 2])
    np.testing.assert_array_equal(rundir.read_global_actions(tmp_path, 7, 4, processes=2), full)
    np.testing.assert_array_equal(rundir.read_global_actions(tmp_path, 5, 4, processes=2), full[:5])
    assert rundir.read_global_actions(tmp_path, 8, 4, processes=2) is None  # short: not exact

    class Recorder:
        def __init__(self):
            self.seen = []

        def step(self, a):
            self.seen.append(np.asarray(a))
            return np.full((len(a), 1), len(self.seen)), None, None, None, None

    env = Recorder()
    assert rundir.restore_env(env, tmp_path, 5, np.full((4, 1), 5), 4, logged_processes=2)
    np.testing.assert_array_equal(np.stack(env.seen), full[:5])
    np.testing.assert_array_equal(rundir.ActionLog(tmp_path, 4).read(5), full[:5])  # rewritten: one process
    assert rundir.ActionLog(tmp_path, 4).rows() == 5

    env = Recorder()  # and back to two processes: process 1 replays its own columns
    assert rundir.restore_env(env, tmp_path, 3, np.full((2, 1), 3), 4, logged_processes=1,
                              process_index=1, process_count=2)
    np.testing.assert_array_equal(np.stack(env.seen), full[:3, 2:])
    assert rundir.ActionLog(tmp_path, 2, "actions.p1of2.u8").rows() == 3


def test_replay_mismatch_is_reported_not_exact(tmp_path):
    rundir.ActionLog(tmp_path, 2).append(np.zeros((3, 2), np.uint8))

    class Env:
        resets = 0

        def step(self, a):
            return np.zeros((2, 1)), None, None, None, None

        def reset(self):
            self.resets += 1

    env = Env()
    assert not rundir.restore_env(env, tmp_path, 3, np.ones((2, 1)), 2)
    assert env.resets == 1 and rundir.ActionLog(tmp_path, 2).rows() == 3  # the envs reset after the 3 rows
    assert rundir.read_segments(tmp_path)[-1][:3] == (3, 3, True)


@pytest.mark.parametrize("agents", [1, 2])
def test_a_run_written_before_the_one_compiled_path_resumes(tmp_path, capsys, agents):
    """The former single-device path kept one unsplit window of returns and a scalar count (and wrote no
    scale_out into config.json); a former population a count per agent. Rewritten so, a run resumes: the
    windows are re-laid, the newest returns kept, and the run says how it continues."""
    import dataclasses
    import json
    import shutil

    import jax

    from jaxatari.agents import ppo
    from jaxatari.checkpoint import Checkpointer
    from jaxatari.driver import train

    base = ppo.Config(env="CartPole-v1", num_envs=2, num_steps=8, chunk_steps=16, total_timesteps=64,
                      tensorboard=False, run_dir=str(tmp_path), num_agents=agents, anneal_lr=False)
    first = train(ppo.ALGORITHM, base)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if agents == 1:
        del cfg["scale_out"]
    else:
        del cfg["scale_out"]["windows_per_agent"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = jax.device_get(first.state)
    st = state.env.stats
    assert st.count.shape == ((1,) if agents == 1 else (2, 1)) and int(np.sum(st.count)) > 0
    old = state.replace(env=state.env.replace(stats=st.replace(count=st.count.reshape(st.count.shape[:-1]))))
    shutil.rmtree(tmp_path / "checkpoints" / "latest" / "64")
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(64, old, policy=old.params, meta=dict(env_steps=64))
    capsys.readouterr()

    resumed = train(ppo.ALGORITHM, dataclasses.replace(base, resume=str(tmp_path), total_timesteps=96))
    assert resumed.global_step == 96
    out = capsys.readouterr().out
    assert ("former single-device path" in out) == (agents == 1)
    assert json.loads((tmp_path / "config.json").read_text())["scale_out"]["windows_per_agent"] == 1
