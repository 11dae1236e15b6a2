"""The host loop with a fake compiled chunk: schedule, CSV rows, non-finite stop, target return."""

import csv
import dataclasses
import importlib
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import configs, errors, rundir, runner
from jaxatari.checkpoint import Checkpointer

U, B = 4, 2  # updates per chunk, envs


def fake_chunk(nan_at_update=None, ret=1.0):
    """Each update: x += 1, two env steps per env, one episode of return `ret` finishes."""

    def chunk(state, handle):
        def body(s, _):
            u = s["update"] + 1
            x = s["x"] + 1.0
            x = jnp.where(u == (nan_at_update or -1), jnp.nan, x)
            m = dict(update=u, env_steps=u * 2 * B, episode_return_sum=jnp.float32(ret),
                     episode_length_sum=jnp.int32(7), episode_count=jnp.int32(1),
                     return_mean100=jnp.float32(ret), finite=jnp.isfinite(x), loss=x)
            return dict(x=x, update=u), m

        state, metrics = jax.lax.scan(body, state, None, length=U)
        return state, handle, runner.ChunkOutput(metrics, jnp.zeros((U * 2, B), jnp.uint8))

    return jax.jit(chunk, donate_argnames=("state",))


def drive(tmp_path, chunk_fn, num_chunks=5, ckpt=None, **kw):
    state = dict(x=jnp.zeros(()), update=jnp.zeros((), jnp.int32))
    return runner.run(run_dir=tmp_path, state=state, handle=jnp.zeros(1), chunk_fn=chunk_fn,
                      schedule=runner.Schedule(2 * B, U, num_chunks), start_chunk=0, num_envs=B,
                      env_steps=lambda s: int(s["update"]) * 2 * B, policy_of=lambda s: {"x": s["x"]},
                      checkpointer=ckpt, metric_columns=("loss",), tensorboard=False, **kw)


def test_rows_per_update_and_columns(tmp_path):
    res = drive(tmp_path, fake_chunk())
    assert res.status == "done" and res.global_step == 5 * U * 2 * B
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * U
    assert list(rows[0])[:9] == list(runner.BASE_COLUMNS)
    assert rows[0]["episode_return"] == "1.0" and rows[0]["episode_length"] == "7.0"
    assert [int(r["global_step"]) for r in rows] == list(range(4, 81, 4))
    assert (tmp_path / "actions.u8").stat().st_size == 5 * U * 2 * B


def test_non_finite_stops_and_keeps_last_good_checkpoint(tmp_path):
    with Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        with pytest.raises(errors.NonFiniteError, match=r"update 11 .*last good checkpoint"):
            drive(tmp_path, fake_chunk(nan_at_update=11), ckpt=ck, checkpoint_every=1)
        # chunks of 4 updates: updates 1-8 saved (steps 16, 32); the chunk holding update 11 is discarded
        assert ck.latest_step() == 8 * 2 * B
        restored = ck.restore_latest(runner.abstract(dict(x=jnp.zeros(()), update=jnp.zeros((), jnp.int32))))
        assert float(restored.state["x"]) == 8.0


def test_target_return_stops_and_saves_best(tmp_path, capsys):
    run = tmp_path / "my runs"  # the printed command quotes a path with a space
    with Checkpointer(run, keep=2, async_save=False) as ck:
        res = drive(run, fake_chunk(ret=20.0), ckpt=ck, target_return=19.0)
        assert res.status == "target_reached" and res.global_step == U * 2 * B
        assert ck.best_score == 20.0
    out = capsys.readouterr().out
    assert "Target return 19.0 reached" in out
    assert f"Watch the agent: {rundir.python_command()} scripts/evaluate.py --run-dir '{run}' --video play.mp4" in out


@pytest.mark.parametrize("total,per_update,chunk,expect", [
    (2048, 256, 50_000, (8, 1)),        # small run: one chunk of all updates
    (500_000, 512, 50_000, (89, 11)),   # 977 updates -> 11 chunks of 89 (979 updates)
    (10, 512, 50_000, (1, 1)),
])
def test_schedule(total, per_update, chunk, expect):
    s = runner.make_schedule(total, per_update, chunk)
    assert (s.updates_per_chunk, s.num_chunks) == expect
    assert s.total_steps >= total and s.total_steps - total < s.num_chunks * per_update
    assert s.requested == total and (s.rounding_note() == "") == (s.total_steps == total)


def test_schedule_says_how_the_total_was_rounded():
    s = runner.make_schedule(500_000, 512, 50_000)
    assert s.rounding_note() == ("--total-timesteps 500,000 is rounded up to 501,248: 11 chunk(s) of 89 x 512 "
                                 "env steps.")
    assert runner.make_schedule(2048, 256, 50_000).rounding_note() == ""


def test_schedule_errors():
    with pytest.raises(errors.ConfigError, match="--total-timesteps 0"):
        runner.make_schedule(0, 8, 100)


def test_action_log_roundtrip(tmp_path):
    log = rundir.ActionLog(tmp_path, 3)
    a = np.arange(12, dtype=np.uint8).reshape(4, 3)
    log.append(a[:2]); log.append(a[2:])
    assert log.rows() == 4
    np.testing.assert_array_equal(log.read(3), a[:3])
    log.truncate(1)
    assert log.rows() == 1


def test_periodic_eval_is_logged_and_picks_best(tmp_path):
    scores = iter([5.0, 9.0, 3.0, 4.0, 1.0])
    with Checkpointer(tmp_path, keep=2, async_save=False) as ck:
        drive(tmp_path, fake_chunk(), ckpt=ck, checkpoint_every=1, eval_fn=lambda p: next(scores),
              eval_every=1)
        assert ck.best_score == 9.0
        best = ck.restore_best(runner.abstract(dict(x=jnp.zeros(()), update=jnp.zeros((), jnp.int32))))
        assert float(best.state["x"]) == 8.0  # the second chunk's state
        assert ck.latest_step() == 5 * U * 2 * B  # latest rotation is independent of best
    with open(tmp_path / "metrics.csv") as f:
        evals = [r["eval_return"] for r in csv.DictReader(f)]
    assert evals[U - 1] == "5.0" and evals[2 * U - 1] == "9.0" and evals[0] == ""


def test_sigterm_saves_and_stops_cleanly(tmp_path, capsys):
    import os
    import signal

    def eval_fn(params):  # runs between chunks: deliver a preemption notice during the first
        os.kill(os.getpid(), signal.SIGTERM)
        return 0.0

    with Checkpointer(tmp_path, keep=2, async_save=False) as ck:
        res = drive(tmp_path, fake_chunk(), ckpt=ck, eval_fn=eval_fn, eval_every=1)
        assert res.status == "interrupted" and res.global_step == U * 2 * B
        assert res.signal == signal.SIGTERM
        assert ck.latest_step() == U * 2 * B
    assert "SIGTERM received: the current chunk has finished; saving a checkpoint now" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored


def test_the_last_save_is_waited_for_under_the_signal_handlers(tmp_path, monkeypatch):
    """A SIGTERM while the final checkpoint is still being written must not kill it:
    the runner waits for it before giving the default handlers back."""
    import signal

    seen = []
    with Checkpointer(tmp_path, keep=2) as ck:
        wait = ck.wait
        monkeypatch.setattr(ck, "wait", lambda: (seen.append(signal.getsignal(signal.SIGTERM)), wait())[1])
        drive(tmp_path, fake_chunk(), num_chunks=2, ckpt=ck)
    assert seen and getattr(seen[0], "__self__", None).__class__ is runner.Signals


def test_a_second_ctrl_c_waits_for_a_checkpoint_being_written(capsys):
    import signal

    from jaxatari import checkpoint

    with runner.Signals() as sig:
        sig._handle(signal.SIGINT, None)  # the first asks for a save
        assert sig.received == signal.SIGINT
        with checkpoint._Writing():
            assert checkpoint.writing()
            sig._handle(signal.SIGINT, None)  # deferred: aborting orbax mid-save would hang the process
        assert not checkpoint.writing()
        with pytest.raises(KeyboardInterrupt):
            sig._handle(signal.SIGINT, None)
    assert "SIGINT ignored: a checkpoint is being written" in capsys.readouterr().err


@pytest.mark.parametrize("every, minutes, saved", [
    (64, 0, [64, 128]),  # steps only (--checkpoint-minutes 0): every 4 chunks and the last
    (0, 3, [80, 128]),  # minutes only: the 4-minute chunk 5 makes it due, then the last
    (64, 3, [64, 80, 128]),  # whichever comes first: steps at chunk 4, minutes at chunk 5
])
def test_checkpoints_are_due_by_env_steps_or_minutes(tmp_path, monkeypatch, every, minutes, saved):
    """A fake clock (runner._clock) moved on between chunks: chunks 1-4 and 6-8 take half a minute,
    chunk 5 takes four. A checkpoint is saved at the end of the chunk where either interval has passed
    since the last one (16 env steps per chunk)."""
    now = [0.0]
    took = iter([0.5, 0.5, 0.5, 0.5, 4, 0.5, 0.5, 0.5])
    monkeypatch.setattr(runner, "_clock", lambda: now[0] * 60)

    def eval_fn(params):  # between chunks, before the runner decides whether a checkpoint is due
        now[0] += next(took)
        return 0.0

    with Checkpointer(tmp_path, keep=10, async_save=False) as ck:
        drive(tmp_path, fake_chunk(), num_chunks=8, ckpt=ck, checkpoint_every=every, checkpoint_minutes=minutes,
              eval_fn=eval_fn, eval_every=1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir()) == saved


def test_ctrl_c_says_when_the_current_chunk_ends(monkeypatch, capsys):
    """The first signal names the time the current chunk still takes (from the last chunk's length on
    runner._clock); a second Ctrl-C aborts without saving (KeyboardInterrupt), as the README says."""
    import signal

    now = [100.0]
    monkeypatch.setattr(runner, "_clock", lambda: now[0])
    with runner.Signals() as sig:
        sig.begin()
        sig._handle(signal.SIGTERM, None)  # during the first chunk: not timed yet
    with runner.Signals() as sig:
        sig.begin()
        now[0] = 140.0
        assert sig.end() == 40.0
        sig._handle(signal.SIGTERM, None)  # between chunks
        sig.begin()
        now[0] = 155.0
    with runner.Signals() as sig:
        sig.begin()
        now[0] = 195.0
        assert sig.end() == 40.0
        sig.begin()
        now[0] = 210.0
        sig._handle(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            sig._handle(signal.SIGINT, None)
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == [
        "SIGTERM received: saving a checkpoint after the current chunk (Ctrl-C again to abort without saving).",
        "SIGTERM received: the current chunk has finished; saving a checkpoint now (Ctrl-C again to abort "
        "without saving).",
        "SIGINT received: saving a checkpoint after the current chunk, which ends in about 25 s (a chunk takes "
        "40 s); Ctrl-C again to abort without saving.",
    ]


def test_resume_truncation_drops_rows_past_the_checkpoint_and_a_cut_last_row(tmp_path):
    w = runner.MetricsWriter(tmp_path, ["global_step", "loss"], tensorboard=True)
    for step in (8, 16, 24, 32):
        w.write(dict(global_step=step, loss=0.5))
    w.close()
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("4")  # a kill in the middle of writing the row of step 40
    w = runner.MetricsWriter(tmp_path, ["global_step", "loss"], tensorboard=True)
    w.truncate_after(24)
    w.write(dict(global_step=32, loss=0.25))
    w.close()
    assert (tmp_path / "metrics.csv").read_text() == "global_step,loss\n8,0.5\n16,0.5\n24,0.5\n32,0.25\n"
    assert not list(tmp_path.glob("*.tmp"))  # replaced atomically
    # TensorBoard is told to drop what the first run logged past step 24: a START session log at step 25.
    starts = [e.step for e in _tb_events(tmp_path / "tb") if e.session_log.status == e.session_log.START]
    assert starts == [25]


def _tb_events(directory):
    """Every event of the TFRecord event files in ``directory``."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            yield Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4


@pytest.mark.parametrize("outcome, code", [("SIGTERM", 143), ("SIGINT", 130), ("complete", 0), ("bad", 2),
                                           ("corrupt", 2), ("save", 1)])
def test_cli_exit_codes(monkeypatch, capsys, outcome, code):
    """Preemption (SIGTERM) exits 143, Ctrl-C 130, resuming a finished run 0, bad input (a bad flag, a run
    with no readable checkpoint) 2, a failed checkpoint write (not the user's input) 1."""
    import signal

    from jaxatari import cli
    from jaxatari.checkpoint import CheckpointError, CheckpointSaveError

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 1

    def train(config):
        if outcome == "complete":
            raise errors.AlreadyComplete("runs/x is already complete")
        if outcome == "bad":
            raise errors.ConfigError("--seed 1 is not accepted")
        if outcome == "corrupt":
            raise CheckpointError("No checkpoint in runs/x is readable")
        if outcome == "save":
            raise CheckpointSaveError("A background save in runs/x/checkpoints/latest failed: disk full")
        return runner.RunResult(None, "interrupted", 0, 0.0, 0.0, 0.0, getattr(signal, outcome))

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as e:
        cli.main(Config, train)
    assert e.value.code == code
    out = capsys.readouterr()
    assert ("already complete" in out.out) == (outcome == "complete")
    assert ("error: --seed 1" in out.err) == (outcome == "bad")
    assert ("error: A background save" in out.err) == (outcome == "save") and "Traceback" not in out.err


@dataclasses.dataclass(frozen=True)
class RunDirConfig:
    """The fields :func:`rundir.run_dir_for` reads."""

    env: str = "CartPole-v1"
    seed: int = 1
    run_dir: str | None = None
    resume: str | None = None


@pytest.mark.parametrize("held", ["config.json", "metrics.csv", "checkpoints", "actions.u8"])
def test_a_fresh_run_refuses_a_directory_holding_a_run(tmp_path, held):
    d = tmp_path / "run"
    assert rundir.run_dir_for(RunDirConfig(run_dir=str(d)), "ppo") == d  # missing: fine
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    assert rundir.run_dir_for(RunDirConfig(run_dir=str(d)), "ppo") == d  # holds no run: fine
    (d / held).mkdir() if held == "checkpoints" else (d / held).write_text("")
    with pytest.raises(errors.ConfigError, match=rf"--run-dir {d} already holds a run \({held}\).*--resume {d}"):
        rundir.run_dir_for(RunDirConfig(run_dir=str(d)), "ppo")
    assert rundir.run_dir_for(RunDirConfig(run_dir=None, resume=str(d)), "ppo") == d


def _killed_start(d: Path) -> None:
    """What a start killed during its first save leaves (and a user's own file)."""
    for kind in ("latest", "best"):
        (d / "checkpoints" / kind).mkdir(parents=True)
    (d / "checkpoints" / "latest" / "512.orbax-checkpoint-tmp-1").mkdir()
    (d / "checkpoints" / "best" / "512").mkdir()  # its best save finished first
    (d / "config.json").write_text("{}")
    (d / "metrics.csv").write_text("global_step,loss\n256,0.5\n512,0.4\n")
    (d / "tb").mkdir()
    (d / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    (d / "actions.u8").write_bytes(bytes(512))
    (d / "actions.json").write_text("[]")
    (d / "notes.txt").write_text("mine")


@pytest.mark.parametrize("resume", [False, True])
def test_a_start_killed_before_its_first_checkpoint_starts_again_in_place(tmp_path, capsys, resume):
    """The original command (accepted by run_dir_for) and --resume both start such a run again from
    step 0 in the same directory: its partial metrics, TensorBoard events, action log and unfinished
    checkpoints are removed, one line says so, and a file of the user's stays. A checkpoint that
    finished (or was moved aside as unreadable) makes it a run again: refused, and nothing removed."""
    d = tmp_path / "run"
    _killed_start(d)
    assert rundir.unfinished_start(d)
    assert rundir.run_dir_for(RunDirConfig(run_dir=str(d)), "ppo") == d
    assert rundir.start_over_if_unfinished(d, resume=resume)
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == [
        "checkpoints", "checkpoints/best", "checkpoints/latest", "config.json", "notes.txt"]
    what = "holds no finished checkpoint (its start was stopped before the first)" if resume else \
        "holds a start that was stopped before its first checkpoint"
    assert capsys.readouterr().out == (f"{d} {what}; starting the run from step 0 in place, with its partial "
                                       "metrics.csv, TensorBoard events and action log reset.\n")
    for finished in ("1024", "1024.corrupt"):
        e = tmp_path / finished
        _killed_start(e)
        (e / "checkpoints" / "latest" / finished).mkdir()
        assert not rundir.unfinished_start(e) and not rundir.start_over_if_unfinished(e, resume=resume)
        with pytest.raises(errors.ConfigError, match=r"already holds a run \(config.json, metrics.csv, checkpoints"):
            rundir.run_dir_for(RunDirConfig(run_dir=str(e)), "ppo")
        assert (e / "metrics.csv").exists() and (e / "actions.u8").exists()


def test_several_processes_start_again_as_process_0_decides(tmp_path, monkeypatch):
    """Process 0's view decides for every process, and only process 0 removes the shared files."""
    from jax.experimental import multihost_utils

    d = tmp_path / "run"
    _killed_start(d)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))  # process 0: a run
    assert not rundir.start_over_if_unfinished(d, resume=True)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(1))
    assert rundir.start_over_if_unfinished(d, resume=True)
    assert (d / "metrics.csv").exists()  # process 0's to remove
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert rundir.start_over_if_unfinished(d, resume=True) and not (d / "metrics.csv").exists()


def test_several_processes_share_process_0s_default_run_dir(tmp_path, monkeypatch):
    """Without --run-dir every process names the directory after process 0's
    clock (each process's own clock may already show another second)."""
    from jax.experimental import multihost_utils

    process0 = np.frombuffer(b"20260102-030405", np.uint8).astype(np.int32)
    sent = []

    def broadcast(x):  # what process 0 sends: its stamp, then whether the directory holds a run
        sent.append(np.asarray(x))
        return process0 if np.ndim(x) else np.int32(0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    d = rundir.run_dir_for(RunDirConfig(), "ppo")
    assert str(d) == "runs/CartPole-v1__ppo__1__20260102-030405"
    assert len(sent) == 2 and sent[0].shape == (15,)  # this process's own stamp was offered, then replaced


@pytest.mark.parametrize("value, rule, ok", [
    (1, "an integer >= 1", True), (1.0, "an integer >= 1", False), (0, "an integer >= 0", True),
    (True, ">= 0", False), (0.5, "in [0, 1)", True), (1.0, "in [0, 1)", False), (0.0, "in (0, 1]", False),
    (0.0, ">= 0 (0 = off)", True), (-1.0, ">= 0 (0 = off)", False), (None, "> 0", True),
])
def test_check_ranges_rules(value, rule, ok):
    @dataclasses.dataclass(frozen=True)
    class Config:
        some_flag: object

    if ok:
        configs.check_ranges(Config(value), {"some_flag": rule})
    else:
        with pytest.raises(errors.ConfigError, match=re.escape(f"--some-flag {value!r} is not accepted: "
                                                               f"it must be {rule}.")):
            configs.check_ranges(Config(value), {"some_flag": rule})


def test_check_ranges_refuses_an_unknown_rule():
    @dataclasses.dataclass(frozen=True)
    class Config:
        x: int = 3

    with pytest.raises(ValueError, match=r"Unknown range rule '>= 2'"):
        configs.check_ranges(Config(), {"x": ">= 2"})


def test_restart_episodes_after_an_inexact_resume():
    """Running returns/lengths zeroed, no pending reset, recurrent state reset
    at the next step; finished returns (the window) and the obs kept."""
    from jaxatari import envs

    e = envs.env_state_init(np.arange(6, dtype=np.float32).reshape(3, 2))
    e = e.replace(done=jnp.array([True, False, True]), first=jnp.zeros(3, bool),
                  stats=e.stats.replace(returns=jnp.array([7.0, 8.0, 9.0]), lengths=jnp.array([3, 4, 5]),
                                        window=e.stats.window.at[0].set(21.0), count=jnp.array(1)))
    r = rundir.restart_episodes(e)
    np.testing.assert_array_equal(r.stats.returns, 0)
    np.testing.assert_array_equal(r.stats.lengths, 0)
    assert not r.done.any() and r.first.all()
    np.testing.assert_array_equal(r.stats.window, e.stats.window)
    np.testing.assert_array_equal(r.obs, e.obs)
    assert int(r.stats.count) == 1 and r.stats.lengths.dtype == e.stats.lengths.dtype


class _Env:
    """A stand-in EnvPool: obs = the sum of the actions taken since the last
    reset, plus 1000 x the steps taken before it (a reset depends on the env's
    history, as EnvPool's random no-op starts do on its generator)."""

    def __init__(self, n):
        self.n, self.resets, self.steps = n, 0, 0

    def reset(self):
        self.resets += 1
        self.obs = np.full((self.n, 1), 1000.0 * self.steps)
        return self.obs, {}

    def step(self, a):
        self.steps += 1
        self.obs = self.obs + np.asarray(a, float)[:, None]
        return self.obs, None, None, None, {}


@pytest.mark.parametrize("case", ["exact", "short", "mismatch"])
def test_restore_env_replays_or_restarts_the_envs_and_the_log(tmp_path, case):
    log = rundir.ActionLog(tmp_path, 2)
    log.append(np.ones((5, 2), np.uint8))
    if case == "short":
        with open(log.path, "r+b") as f:
            f.truncate(7)  # 3.5 rows
    env = _Env(2)
    env.reset()
    expected = np.full((2, 1), 4.0 if case != "mismatch" else 99.0)
    exact = rundir.restore_env(env, tmp_path, 4, expected, 2)
    assert exact == (case == "exact")
    assert log.rows() == (0 if case == "short" else 4) and log.path.stat().st_size % 2 == 0
    assert env.resets == (2 if case == "mismatch" else 1)  # replayed into other states: reset afresh
    assert [seg[:3] for seg in rundir.read_segments(tmp_path)] == {  # where the log restarts, for later resumes
        "exact": [(0, 0, False)],
        "short": [(0, 4, False)],  # the log starts afresh with the unstepped envs
        "mismatch": [(0, 0, False), (4, 4, True)],  # its 4 rows, then a reset
    }[case]
    if case == "mismatch":  # and where the 4 rows ended, per env
        assert rundir.read_segments(tmp_path)[1].digests == rundir.obs_digests(np.full((2, 1), 4.0))


def _train(env, log, obs, start, steps, rng):
    """Act ``steps`` times as a training run would (random actions, logged);
    ``obs[t]`` is the env's observation at env step ``t``, as a checkpoint there holds it."""
    for t in range(start + 1, start + steps + 1):
        a = rng.integers(0, 3, size=(1, 2)).astype(np.uint8)
        log.append(a)
        obs[t] = env.step(a[0])[0].copy()


@pytest.mark.parametrize("damage", ["short", "mismatch"])
def test_resumes_after_an_inexact_one_replay_its_restart_and_are_exact(tmp_path, capsys, caplog, damage):
    """A run resumed inexactly at step 6 (damaged log) and trained on to step
    10: resuming it again from any later checkpoint is exact, from step 6 itself
    rebuilds the envs as the first resume left them, and from before step 6
    replays the original log where it is intact."""
    rng = np.random.default_rng(0)
    d = tmp_path / "run"
    log, env, obs = rundir.ActionLog(d, 2), _Env(2), {}
    d.mkdir()
    env.reset()
    _train(env, log, obs, 0, 6, rng)
    log.rewrite(log.read(5) if damage == "short" else np.vstack([log.read(4), [[7, 7]], log.read(6)[5:]]))

    env = _Env(2)
    env.reset()
    assert not rundir.restore_env(env, d, 6, obs[6], 2)
    restarted = env.obs.copy()
    _train(env, log, obs, 6, 4, rng)  # the run goes on from the restart to step 10

    def resume(step):
        run = tmp_path / f"resume{step}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(d, run)
        env = _Env(2)
        env.reset()
        return env, rundir.restore_env(env, run, step, obs[step], 2), rundir.ActionLog(run, 2).rows()

    first_rows = 0 if damage == "short" else 6
    for step in (10, 8, 7):
        env, exact, rows = resume(step)
        assert exact and rows == first_rows + step - 6
        np.testing.assert_array_equal(env.obs, obs[step])
    env, exact, rows = resume(6)
    assert not exact and rows == first_rows and "where an earlier resume restarted the envs" in capsys.readouterr().out
    np.testing.assert_array_equal(env.obs, restarted)
    env, exact, rows = resume(3)  # before the restart: the original log, intact up to row 4 if not cut short
    assert exact == (damage == "mismatch") and rows == (3 if damage == "mismatch" else 0)
    if exact:
        np.testing.assert_array_equal(env.obs, obs[3])
        assert not (tmp_path / "resume3" / rundir.SEGMENTS_FILE).exists()  # back to one segment
    if damage == "mismatch":  # the log before the restart changed since: the rebuilt envs are checked
        changed = rundir.ActionLog(d, 2)
        changed.rewrite(np.vstack([changed.read(2), [[5, 5]], changed.read(10)[3:]]))
        env, exact, rows = resume(6)
        assert not exact and "where an earlier resume" not in capsys.readouterr().out
        assert "no longer ends where the restart" in caplog.text
        segs = rundir.read_segments(tmp_path / "resume6")
        assert [s[:3] for s in segs] == [(0, 0, False), (6, 6, True)]  # the restart, recorded anew


def _as_processes(monkeypatch, fn, n):
    """Run ``fn(process_index)`` in ``n`` threads standing in for processes, with
    ``multihost_utils.process_allgather`` gathering across them; the results."""
    import threading

    from jax.experimental import multihost_utils

    slots, barrier, local = [None] * n, threading.Barrier(n), threading.local()

    def allgather(x):
        slots[local.index] = np.asarray(x)
        barrier.wait()
        out = np.stack(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    results = [None] * n

    def run(i):
        local.index = i
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_two_processes_restart_together_and_later_resume_on_any_topology(tmp_path, monkeypatch):
    """Process 1's log no longer replays to its checkpoint: both processes
    restart (process 0 too, whose replay matched), the digests of all four envs
    are recorded, and a later resume is exact in two processes and in one."""
    rng = np.random.default_rng(1)
    d = tmp_path / "run"
    d.mkdir()
    obs, env = {}, _Env(4)
    env.reset()
    for t in range(1, 6):  # a 2-process run: each logs its own 2 columns
        a = rng.integers(0, 3, size=4).astype(np.uint8)
        for p in range(2):
            rundir.ActionLog(d, 2, rundir.action_log_name(p, 2)).append(a[None, 2 * p:2 * p + 2])
        obs[t] = env.step(a)[0].copy()
    p1 = rundir.ActionLog(d, 2, rundir.action_log_name(1, 2))
    p1.rewrite(np.vstack([p1.read(2), [[9, 9]], p1.read(5)[3:]]))

    envs_ = [_Env(2), _Env(2)]

    def restart(i):
        envs_[i].reset()
        return rundir.restore_env(envs_[i], d, 5, obs[5][2 * i:2 * i + 2], 4, logged_processes=2,
                                  process_index=i, process_count=2)

    assert _as_processes(monkeypatch, restart, 2) == [False, False]
    assert [e.resets for e in envs_] == [2, 2]  # both reset after replaying
    seg = rundir.read_segments(d)[-1]
    assert seg[:3] == (5, 5, True) and len(seg.digests) == 4
    assert seg.digests[:2] == rundir.obs_digests(obs[5][:2])  # process 0's envs had matched
    for t in range(6, 8):  # the run goes on, each process logging its columns
        a = rng.integers(0, 3, size=4).astype(np.uint8)
        for i in range(2):
            rundir.ActionLog(d, 2, rundir.action_log_name(i, 2)).append(a[None, 2 * i:2 * i + 2])
            obs[t] = np.concatenate([obs.get(t, np.zeros((0, 1))), envs_[i].step(a[2 * i:2 * i + 2])[0]])

    single = tmp_path / "single"
    shutil.copytree(d, single)

    def resume(i):
        e = _Env(2)
        e.reset()
        exact = rundir.restore_env(e, d, 7, obs[7][2 * i:2 * i + 2], 4, logged_processes=2, process_index=i,
                                   process_count=2)
        return exact, e.obs.copy()

    got = _as_processes(monkeypatch, resume, 2)
    assert [x for x, _ in got] == [True, True]
    np.testing.assert_array_equal(np.concatenate([o for _, o in got]), obs[7])
    e = _Env(4)
    e.reset()
    assert rundir.restore_env(e, single, 6, obs[6], 4, logged_processes=2)  # one process, from step 6
    np.testing.assert_array_equal(e.obs, obs[6])
    assert rundir.ActionLog(single, 4).rows() == 6


def test_an_unreadable_segments_file_restarts_the_log(tmp_path, caplog):
    rundir.ActionLog(tmp_path, 2).append(np.ones((4, 2), np.uint8))
    for text in ("{not json", '[{"row": 0, "step": 0}]', '[{"row": 3, "step": 0, "reset": false}]', "[]"):
        (tmp_path / rundir.SEGMENTS_FILE).write_text(text)
        assert rundir.read_segments(tmp_path) is None
    env = _Env(2)
    env.reset()
    assert not rundir.restore_env(env, tmp_path, 4, np.full((2, 1), 4.0), 2)
    assert "is unreadable" in caplog.text and env.steps == 0 and rundir.ActionLog(tmp_path, 2).rows() == 0
    assert rundir.read_segments(tmp_path) == [rundir.Segment(0, 4, False)]  # replaced: later resumes start here
    shutil.rmtree(tmp_path / rundir.SEGMENTS_FILE, ignore_errors=True)


def test_cpu_only_is_decided_without_starting_a_backend(monkeypatch):
    if jax.config.jax_platforms:
        pytest.skip("jax_platforms is set for this process; it would take precedence over JAX_PLATFORMS")
    for platforms, cpu in (("cpu", True), ("cuda,cpu", False), ("tpu", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert configs.cpu_only() is cpu
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert configs.cpu_only() is (jax.default_backend() == "cpu")  # from the installed plugins: none here


def test_resume_accepts_its_own_run_dir(tmp_path):
    from jaxatari.agents import ppo

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**configs.config_to_json(ppo.Config(env="CartPole-v1")), "algo": "ppo"}))
    c = configs.cli(ppo.Config, argv=["--resume", str(d), "--run-dir", f"{tmp_path}/./run"])
    assert c.resume == str(d)
    with pytest.raises(errors.ConfigError, match="On resume you may change: .*--total-timesteps") as e:
        configs.cli(ppo.Config, argv=["--resume", str(d), "--seed", "7"])
    assert "--run-dir" not in str(e.value)


def test_resume_accepts_the_same_env_options_in_another_order(tmp_path):
    from jaxatari.agents import ppo

    d = tmp_path / "run"
    d.mkdir()
    stored = ppo.Config(env="Breakout-v5", env_option=("noop_max=10", "frame_skip=2"))
    (d / "config.json").write_text(json.dumps({**configs.config_to_json(stored), "algo": "ppo"}))

    def resume(*options):
        return configs.cli(ppo.Config, argv=["--resume", str(d), "--env-option", *options])

    assert resume("frame_skip=2", "noop_max=10").env_option == ("noop_max=10", "frame_skip=2")  # the run's own
    assert resume("noop_max = 10", "frame_skip=2").env_option == ("noop_max=10", "frame_skip=2")
    for options in (("frame_skip=2",), ("noop_max=10", "frame_skip=3"), ("noop_max=10", "frame_skip=2", "stack_num=2")):
        with pytest.raises(errors.ConfigError, match=r"--env-option .* differs from the run being resumed"):
            resume(*options)


def test_flags_given_twice_and_odd_resume_targets_are_refused(tmp_path):
    """tyro keeps the last of a repeated flag (losing the others without a word):
    refused, as are a population's agent snapshot and a config.json that is no object."""
    from jaxatari import envs
    from jaxatari.agents import ppo

    def cli(*argv):
        return configs.cli(ppo.Config, argv=list(argv))

    for argv in (["--env-option", "noop_max=10", "--env-option", "frame_skip=2"],
                 ["--tensorboard", "--no-tensorboard"], ["--num_envs", "4", "--num-envs", "8"]):
        with pytest.raises(errors.ConfigError, match=r"is given more than once; give it once"):
            cli("--env", "CartPole-v1", *argv)
    assert cli("--env", "Breakout-v5", "--env-option", "noop_max=10", "frame_skip=2").env_option == (
        "noop_max=10", "frame_skip=2")
    with pytest.raises(envs.EnvError, match=r"noop_max is given twice \(noop_max=10 and noop_max=20\)"):
        envs.parse_env_options(("noop_max=10", "noop_max=20"))

    d, other = tmp_path / "run", tmp_path / "other"
    for run in (d, other):
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**configs.config_to_json(ppo.Config(env="CartPole-v1")),
                                                     "algo": "ppo"}))
    with pytest.raises(errors.ConfigError, match=r"--resume is given more than once"):
        cli("--resume", str(d), "--resume", str(other))  # tyro would resume `other` with `d`'s config
    with pytest.raises(errors.ConfigError, match=r"--run-dir cannot be combined with --resume"):
        cli("--resume", str(d), "--run_dir", str(other))  # either spelling
    agent = tmp_path / "pop" / "agents" / "0"
    agent.mkdir(parents=True)
    (agent / "config.json").write_text(json.dumps({**configs.config_to_json(ppo.Config(env="CartPole-v1")),
                                                   "algo": "ppo", "agent": 0, "population": str(tmp_path / "pop")}))
    with pytest.raises(errors.ConfigError, match=rf"is agent 0 of the population {re.escape(str(tmp_path / 'pop'))}: "):
        cli("--resume", str(agent))
    (other / "config.json").write_text("[1, 2]")
    with pytest.raises(errors.ConfigError, match=r"holds a JSON list, not a jaxatari run config"):
        cli("--resume", str(other))



@pytest.mark.parametrize("algo, argv, flag", [
    ("ppo", ["--overlap-learning"], "--overlap-learning"),
    ("ppo", ["--overlap-microbatches", "8"], "--overlap-microbatches"),
    ("ppo", ["--env-groups", "2"], "--env-groups"),
    ("a2c", ["--env_groups=2"], "--env-groups"),
    ("dqn", ["--no-overlap-learning"], "--overlap-learning"),
])
def test_a_removed_flag_is_refused_in_one_sentence(monkeypatch, capsys, algo, argv, flag):
    """The removed speed features: the script exits 2 with one sentence naming the flag and where the docs
    say why, before anything is built or compiled."""
    from jaxatari import cli

    mod = importlib.import_module(f"jaxatari.agents.{algo}")
    monkeypatch.setattr("sys.argv", [f"{algo}.py", "--env", "CartPole-v1", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main(mod.Config, lambda config: pytest.fail("trained despite a removed flag"))
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {flag} was removed: it showed no gain on the CPU measured (README.md, "
                                       "Performance: Removed speed features); train without it.\n")


@pytest.mark.parametrize("stored, refused", [
    (dict(overlap_learning=True), "--overlap-learning, which was"),
    (dict(env_groups=2), "--env-groups 2, which was"),
    (dict(overlap_learning=True, overlap_microbatches=8),
     "--overlap-learning and --overlap-microbatches 8, which were"),
    (dict(overlap_learning=False, overlap_microbatches=1, env_groups=1), None),  # written before, features off
])
def test_resuming_a_run_of_a_removed_flag(tmp_path, stored, refused):
    """A run trained with a removed flag on cannot continue exactly: refused in one sentence. One written
    before the removal with the flags off resumes (the old keys are ignored)."""
    from jaxatari.agents import ppo

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**configs.config_to_json(ppo.Config(env="CartPole-v1")), "algo": "ppo",
                                               **stored}))

    def resume():
        return configs.cli(ppo.Config, argv=["--resume", str(d)])

    if refused is None:
        assert resume().resume == str(d)
        return
    with pytest.raises(errors.ConfigError) as e:
        resume()
    assert str(e.value) == (f"{d} was trained with {refused} removed (README.md, Performance: Removed speed "
                            f"features); it cannot continue exactly without {'them' if 'and' in refused else 'it'}.")
