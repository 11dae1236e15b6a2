"""What a run tells its user while it trains: the projected time, elapsed time and ETA,
and follow-up commands that name the interpreter running."""

import os
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxatari import rundir, runner

U, B = 4, 64  # updates per chunk, envs: 2 env steps per env and update, 512 per chunk


def timed_chunk(now, seconds):
    """A compiled chunk (one episode of return 1 per update) whose every call takes
    ``seconds`` on the fake clock ``now`` (runner._clock)."""

    def chunk(state, handle):
        def body(u, _):
            u = u + 1
            m = dict(update=u, env_steps=u * 2 * B, episode_return_sum=jnp.float32(1.0),
                     episode_length_sum=jnp.int32(7), episode_count=jnp.int32(1),
                     return_mean100=jnp.float32(1.0), finite=jnp.bool_(True))
            return u, m

        state, metrics = jax.lax.scan(body, state, None, length=U)
        return state, handle, runner.ChunkOutput(metrics, jnp.zeros((U * 2, B), jnp.uint8))

    jitted = jax.jit(chunk)

    def compile_(*args):
        compiled = jitted.lower(*args).compile()

        def call(*a):
            now[0] += seconds
            return compiled(*a)

        return call

    return types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: compile_(*args)))


def drive(run_dir, chunk_fn, num_chunks, **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    return runner.run(run_dir=run_dir, state=jnp.zeros((), jnp.int32), handle=jnp.zeros(1), chunk_fn=chunk_fn,
                      schedule=runner.Schedule(2 * B, U, num_chunks), start_chunk=0, num_envs=B,
                      env_steps=lambda s: int(s) * 2 * B, policy_of=lambda s: s, tensorboard=False, **kw)


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(runner, "_clock", lambda: now[0])
    return now


def fake_python(monkeypatch, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    monkeypatch.setattr(sys, "executable", str(path))
    return path


def test_log_lines_carry_elapsed_time_and_an_eta_from_the_chunk_rate(tmp_path, clock, capsys):
    """Chunks of 4 s plus 2 s of evaluation after each: elapsed counts from the loop's start, and
    the ETA is the steps left at the rate of the chunks so far, what happens between them included
    (here 512 env steps per 6 s)."""

    def eval_fn(policy):
        clock[0] += 2
        return 0.0

    drive(tmp_path, timed_chunk(clock, 4), 3, eval_fn=eval_fn, eval_every=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines == [
        "step   512/1,536  SPS 128  return(100) 1.0  elapsed 0:00:06  ETA 0:00:12",
        "step 1,024/1,536  SPS 128  return(100) 1.0  elapsed 0:00:12  ETA 0:00:06",
        "step 1,536/1,536  SPS 128  return(100) 1.0  elapsed 0:00:18  ETA 0:00:00",
    ]


def test_the_eta_counts_down_between_chunks_and_a_resume_counts_only_its_own_steps(clock, capsys):
    progress = runner._Progress(1000, 500)  # resumed at step 500
    assert progress.times(0.0) == "elapsed 0:00:00  ETA -:--:--"
    clock[0] = 10.0
    progress.update(600, 10.0, 1.0)  # 100 steps in 10 s: 400 left take 40 s
    assert capsys.readouterr().out.endswith("elapsed 0:00:10  ETA 0:00:40\n")
    assert progress.times(25.0) == "elapsed 0:00:25  ETA 0:00:25"
    assert progress.times(80.0) == "elapsed 0:01:20  ETA 0:00:00"
    assert runner._TimesColumn(progress).render(None).plain == "elapsed 0:00:10  ETA 0:00:40"  # the bar's column


def test_the_first_chunk_projects_the_time_of_the_whole_run(tmp_path, clock, capsys):
    drive(tmp_path, timed_chunk(clock, 4), 3)
    out = capsys.readouterr().out.splitlines()
    line = ("Projected training time on this machine: 0m 12s for 1,536 env steps at 128 SPS (the first chunk's, "
            "compile excluded).")
    assert out.count(line) == 1
    assert out.index(line) == out.index("step   512/1,536  SPS 128  return(100) 1.0  elapsed 0:00:04  ETA 0:00:08") - 1


def test_a_long_run_on_the_cpu_is_told_what_to_do_instead(tmp_path, clock, capsys, monkeypatch):
    """10,000 chunks of 512 env steps at 128 SPS: 11 h. At that speed 30 min hold 230,400 env steps,
    rounded down to 230,000. The target return stops the run after its first chunk."""
    monkeypatch.chdir(tmp_path)
    fake_python(monkeypatch, tmp_path / ".venv" / "bin" / "python")
    assert jax.default_backend() == "cpu"
    drive(tmp_path / "run", timed_chunk(clock, 4), 10_000, target_return=0.5)
    assert ("Projected training time on this machine: 11h 06m 40s for 5,120,000 env steps at 128 SPS (the first "
            "chunk's, compile excluded). That is over an hour on the CPU: --total-timesteps 230000 fits ~30 min "
            "at this speed, or train on a GPU: .venv/bin/python -m pip install -e \".[cuda12]\"\n"
            ) in capsys.readouterr().out


def test_the_projection_advises_only_long_runs_on_the_cpu():
    long = runner.projection(5_120_000, 128.0, cpu=False)
    assert long.startswith("Projected training time on this machine: 11h 06m 40s") and "GPU" not in long
    assert "GPU" not in runner.projection(400_000, 128.0, cpu=True)  # 52 min
    assert "--total-timesteps 1230000 fits" in runner.projection(5_000_000, 128.0, cpu=True, done=1_000_000)
    assert [runner._round_down(x) for x in (0.3, 7.9, 28.8, 230_400.0, 999_999.0)] == [1, 7, 28, 230_000, 990_000]


def test_only_the_main_process_projects_and_shows_progress(tmp_path, clock, capsys):
    drive(tmp_path, timed_chunk(clock, 4), 3, is_main=False)
    assert capsys.readouterr().out == ""


def test_a_python_under_the_current_directory_is_printed_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_python(monkeypatch, tmp_path / ".venv" / "bin" / "python")
    assert rundir.python_command() == ".venv/bin/python"
    assert rundir.resume_command("ppo", "runs/a b") == ".venv/bin/python scripts/ppo.py --resume 'runs/a b'"
    fake_python(monkeypatch, tmp_path / "my env" / "bin" / "python")
    assert rundir.python_command() == "'my env/bin/python'"
    fake_python(monkeypatch, tmp_path / "python")
    assert rundir.python_command() == "./python"  # a bare name would be looked up on PATH


def test_a_python_on_path_is_printed_as_python_and_any_other_absolute(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the interpreters lie elsewhere
    usr = fake_python(monkeypatch, tmp_path / "usr bin" / "python3.12")
    os.symlink(usr, usr.with_name("python"))
    monkeypatch.setattr(rundir.shutil, "which", lambda name: str(usr.with_name("python")))
    assert rundir.python_command() == "python"  # the same file in the same directory
    venv = tmp_path / "my venv" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    os.symlink(usr, venv)  # a venv's python links to the system's: the same file, another interpreter
    monkeypatch.setattr(sys, "executable", str(venv))
    assert rundir.python_command() == f"'{venv}'"
    monkeypatch.setattr(rundir.shutil, "which", lambda name: None)
    assert rundir.python_command() == f"'{venv}'"


def test_the_done_line_names_the_running_python(tmp_path, clock, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_python(monkeypatch, tmp_path / ".venv" / "bin" / "python")
    drive(tmp_path / "my run", timed_chunk(clock, 4), 1)
    assert (f"Watch the agent: .venv/bin/python scripts/evaluate.py --run-dir '{tmp_path / 'my run'}' --video "
            "play.mp4") in capsys.readouterr().out
