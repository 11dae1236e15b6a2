"""Checkpoints through the CLI: interrupt + resume is exact, runs are deterministic,
refused flags, corrupt and damaged checkpoints, SIGKILL at every stage of a run (the preemption
loop), load_policy and evaluation of a trained policy.
What needs no fresh process (a signal, an exit status) trains in this one, as the
script would."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoint import flip_bytes_in_largest_file

from jaxatari import configs, driver, errors
from jaxatari.agents import ppo as ppo_agent
from jaxatari.checkpoint import Checkpointer
from jaxatari.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--env", "CartPole-v1", "--total-timesteps", "51200", "--chunk-steps", "5120",
        "--checkpoint-every", "10000", "--no-tensorboard"]
pytestmark = pytest.mark.slow


def ppo(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "scripts/ppo.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env, **kw)


def train(*args):
    """What ``scripts/ppo.py args`` trains, in this process."""
    return driver.train(ppo_agent.ALGORITHM, configs.cli(ppo_agent.Config, argv=list(args)))


def rows(run_dir, drop=("wall_time", "sps")):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs of seed 1 and 2, trained in this process (the test of SIGINT trains seed 1 again with the script)."""
    base = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "1"), ("c", "2")):
        train(*ARGS, "--seed", seed, "--run-dir", str(base / name))
    return {name: base / name for name in ("a", "c")}


def test_a_different_seed_gives_different_metrics(runs):
    a, c = rows(runs["a"]), rows(runs["c"])
    assert len(a) == 100 and a != c


def test_sigint_then_resume_matches_uninterrupted(runs, tmp_path, capsys):
    """The script run again with the seed of ``a``, stopped half-way by SIGINT and resumed, ends with a's
    metrics and params: the resume is exact and runs are deterministic."""
    d = tmp_path / "b"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "scripts/ppo.py", *ARGS, "--seed", "1", "--run-dir", str(d)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the loop to run (the handler is installed by then)
        if (d / "metrics.csv").exists() and sum(1 for _ in open(d / "metrics.csv")) > 11:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Resume with:" in stdout and "Traceback" not in stderr
    interrupted_at = json.loads(open(d / "config.json").read())  # config written
    assert interrupted_at["seed"] == 1
    n_rows = len(rows(d))
    assert 0 < n_rows < 100, "the run should have stopped half-way"

    capsys.readouterr()
    train("--resume", str(d))
    assert "Resumed" in capsys.readouterr().out
    assert rows(d) == rows(runs["a"])
    a, b = load_policy(runs["a"] / "checkpoints" / "latest"), load_policy(d / "checkpoints" / "latest")
    assert a.meta["step"] == b.meta["step"] == 51200
    assert params_equal(a.params, b.params)


def test_resume_refuses_flags_that_change_the_problem(runs):
    with pytest.raises(errors.ConfigError, match=r"--num-envs 8.*would change the learning problem"):
        train("--resume", str(runs["a"]), "--num-envs", "8")
    with pytest.raises(errors.ConfigError, match=r"--env 'Acrobot-v1'"):
        train("--resume", str(runs["a"]), "--env", "Acrobot-v1")


def test_resume_extends_total_timesteps(runs, tmp_path):
    d = tmp_path / "ext"
    shutil.copytree(runs["a"], d)
    train("--resume", str(d), "--total-timesteps", "61440")
    got = rows(d)
    assert int(got[-1]["global_step"]) == 61440 and got[:100] == rows(runs["a"])


def test_a_finished_run_is_neither_retrained_nor_overwritten(runs, tmp_path):
    """Resuming a complete run says so (the CLI exits 0) before replaying or
    compiling; a fresh run, a --run-dir beside --resume or another algorithm's
    script refuse the directory; none of them touches its files."""
    from jaxatari.agents import dqn

    d = tmp_path / "done"
    shutil.copytree(runs["a"], d)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    with pytest.raises(errors.AlreadyComplete, match=r"already complete.* 51,200 .*--total-timesteps"):
        train("--resume", str(d))
    with pytest.raises(errors.ConfigError, match=r"already holds a run \(config.json, metrics.csv, checkpoints"):
        driver.train(ppo_agent.ALGORITHM, configs.cli(ppo_agent.Config, argv=[*ARGS, "--run-dir", str(d)]))
    with pytest.raises(errors.ConfigError, match=r"is a ppo run, not dqn; resume it with \S*python scripts/ppo.py --resume"):
        configs.cli(dqn.Config, argv=["--resume", str(d)])
    with pytest.raises(errors.ConfigError, match="--run-dir cannot be combined with --resume"):
        configs.cli(ppo_agent.Config,
                   argv=["--resume", str(d), "--run-dir", str(tmp_path / "elsewhere")])
    assert files == {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("damage", ["short", "mismatch"])
def test_an_inexact_resume_restarts_episodes_and_later_resumes_replay_it(runs, tmp_path, caplog, damage):
    """A damaged action log (cut short, or actions changed so that the replay
    ends elsewhere): the resume warns, every env starts a new episode (no
    return above CartPole's 500 from a checkpointed half-episode glued to a
    fresh one), and the log records the restart. Resuming that run again, from
    a checkpoint after the restart or from the one it restarted at, continues
    exactly as the run did."""
    def resume(d, *args):
        train("--resume", str(d), "--total-timesteps", "61440", *args)

    d = tmp_path / damage
    shutil.copytree(runs["a"], d)
    with open(d / "actions.u8", "r+b") as f:
        if damage == "short":
            f.truncate(1001)  # 250.25 rows of 4 envs
        else:
            f.seek(1000)
            f.write(bytes(1 - b for b in (d / "actions.u8").read_bytes()[1000:1004]))
    resume(d, "--checkpoint-every", "5000")  # checkpoints at 56,320 and 61,440
    assert "resume is not exact" in caplog.text.lower()
    new = rows(d)[100:]
    assert int(new[-1]["global_step"]) == 61440
    assert all(float(r["episode_return"]) <= 500 for r in new if r["episode_return"])
    assert (d / "actions.u8").stat().st_size == {"short": 0, "mismatch": 51200}[damage] + 10240  # whole rows

    for dropped in ([61440], [56320, 61440]):  # killed before its last save(s)
        again = tmp_path / f"{damage}_again_{len(dropped)}"
        shutil.copytree(d, again)
        for step in dropped:
            shutil.rmtree(again / "checkpoints" / "latest" / str(step))
        caplog.clear()
        resume(again)
        assert "not exact" not in caplog.text
        assert rows(again) == rows(d)
        assert params_equal(load_policy(again / "checkpoints" / "latest").params,
                            load_policy(d / "checkpoints" / "latest").params)


def test_truncated_latest_checkpoint_falls_back(runs, tmp_path, caplog, capsys):
    d = tmp_path / "corrupt"
    shutil.copytree(runs["a"], d)
    latest = d / "checkpoints" / "latest"
    newest = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    for f in (latest / str(newest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    train("--resume", str(d), "--total-timesteps", "51200")
    assert str(newest) in caplog.text  # reported
    out = capsys.readouterr().out
    assert "Resumed" in out and f"env step {newest:,}" not in out
    b = load_policy(d / "checkpoints" / "latest")
    a = load_policy(runs["a"] / "checkpoints" / "latest")
    assert params_equal(a.params, b.params)  # replayed from the previous checkpoint, exactly


# A tiny PPO whose life has every stage in a few seconds: 8 chunks of 4 updates x 64 env steps,
# a checkpoint every 2 chunks (4 saves, the last one final).
TINY = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "1",
        "--update-epochs", "1", "--total-timesteps", "2048", "--chunk-steps", "256", "--checkpoint-every", "512",
        "--no-tensorboard"]

# Where each start of the loop is killed (tests/_kill_worker.py), in the order of a run's life: a start
# killed before its first checkpoint finished is started again, from step 0, by the next.
KILLS = [
    "envs",  # start-up: nothing written
    "config",  # checkpoints/ made, no config.json: the original command again
    "compile",  # config.json written: --resume starts the run in place
    "row:6",  # mid-chunk 2, before the first save: rows and actions of 1.5 chunks, no checkpoint
    "saving:1",  # during the first save
    "saved:1",  # just after the first save: the next one resumes at 512
    "replay",  # replaying the action log
    "saving:2",  # during a later save, 1,536, with rows past 1,024 written: the next resumes at 1,024
    "saving:2",  # during the final save, 2,048: the next resumes at 1,536 and finishes the run
]


def test_a_run_killed_anywhere_in_its_life_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL at every stage of a run's life, each time followed by the preemption loop of the README
    (the original command while there is no config.json, --resume after): every kill resumes, the loop
    finishes the run, and metrics.csv and the final params equal the uninterrupted run's."""
    ref, d = tmp_path / "ref", tmp_path / "run"
    train(*TINY, "--run-dir", str(ref))
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(point):
        args = ["--resume", str(d)] if (d / "config.json").exists() else [*TINY, "--run-dir", str(d)]
        return subprocess.run([sys.executable, "tests/_kill_worker.py", point, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    log = []
    for point in KILLS:
        r = start(point)
        log.append(f"--- {point}: exit {r.returncode}\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
        assert r.returncode == -signal.SIGKILL and "KILLED" in r.stderr, "\n".join(log)
    r = start("none")
    log.append(f"--- none: exit {r.returncode}\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    text = "\n".join(log)
    assert r.returncode == 0 and "Done: 2,048 env steps" in r.stdout, text
    assert "holds a start that was stopped before its first checkpoint" in text, text  # after "config"
    assert text.count("holds no finished checkpoint") >= 2, text  # after "compile", "row:6" (and "saving:1")
    assert text.count("Resumed") >= 3 and "Traceback" not in text, text
    assert rows(d) == rows(ref)  # continuous: every row once, and exact
    a, b = load_policy(ref / "checkpoints" / "latest"), load_policy(d / "checkpoints" / "latest")
    assert a.meta["step"] == b.meta["step"] == 2048 and params_equal(a.params, b.params)


def test_a_damaged_latest_checkpoint_is_caught_and_the_previous_one_used(runs, tmp_path, caplog, capsys):
    """64 bytes flipped in the middle of the newest checkpoint's largest file (its size unchanged): the
    resume names the step as damaged, continues from the previous checkpoint and ends as the
    uninterrupted run did; load_policy refuses the damaged step in one sentence."""
    d = tmp_path / "damaged"
    shutil.copytree(runs["a"], d)
    latest = d / "checkpoints" / "latest"
    flip_bytes_in_largest_file(latest / "51200")
    flip_bytes_in_largest_file(latest / "51200" / "policy")
    with pytest.raises(errors.CheckpointError, match=r"51200 is damaged \(its policy arrays differ from the digest "
                                                     r"saved with them \('params/.*'\)\) and is not loaded; load "
                                                     r"another checkpoint, or its run directory"):
        load_policy(latest / "51200")
    train("--resume", str(d), "--total-timesteps", "51200")
    assert f"Checkpoint step 51200 in {latest} is damaged: its state arrays differ" in caplog.text
    assert "Resumed" in capsys.readouterr().out and (latest / "51200.corrupt").is_dir()
    assert rows(d) == rows(runs["a"])
    assert params_equal(load_policy(latest).params, load_policy(runs["a"] / "checkpoints" / "latest").params)


def test_no_good_checkpoint_is_a_clear_error(runs, tmp_path):
    d = tmp_path / "empty"
    shutil.copytree(runs["a"], d)
    shutil.rmtree(d / "checkpoints")
    r = ppo("--resume", str(d))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "checkpoint" in r.stderr.lower()


def test_load_policy_matches_checkpointed_params_and_best_survives(runs):
    """load_policy(latest) holds the params of the newest checkpoint's training state (read here with orbax
    alone) and acts greedily on them (the MLP computed in NumPy). Catches a loader that restores another
    checkpoint or fresh params, and a policy that does not act on its argmax."""
    import orbax.checkpoint as ocp

    d = runs["a"]
    pol = load_policy(d)  # best
    assert pol.config["algo"] == "ppo" and not pol.recurrent
    latest = load_policy(d / "checkpoints" / "latest")
    with Checkpointer(d, keep=3) as ck:
        assert ck.latest_step() == 51200
    assert (d / "checkpoints" / "best").is_dir() and any((d / "checkpoints" / "best").iterdir())
    saved = ocp.StandardCheckpointer().restore(d / "checkpoints" / "latest" / "51200" / "state")["params"]
    assert params_equal(latest.params, saved)
    p = jax.tree.map(np.asarray, saved["params"])
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    h = obs
    for layer in ("Dense_0", "Dense_1"):  # the actor's tanh MLP torso, then the policy head
        h = np.tanh(h @ p["torso"][layer]["kernel"] + p["torso"][layer]["bias"])
    want = np.argmax(h @ p["pi"]["kernel"] + p["pi"]["bias"], axis=-1)
    assert set(want) == {0, 1}  # observations on which the two actions are both taken
    np.testing.assert_array_equal(np.asarray(latest(obs)), want)


def test_trained_policy_beats_random_by_a_wide_margin(runs):
    from jaxatari.evaluate import evaluate, random_policy

    pol = load_policy(runs["a"] / "checkpoints" / "latest")
    assert pol.env_kwargs == dict(env_id="CartPole-v1", preset="none", options={}) and pol.obs_shape == (4,)
    trained = evaluate(pol.policy_fn, pol.params, pol.initial_carry, episodes=10, seed=123, mode="greedy",
                       **pol.env_kwargs)
    rand = evaluate(random_policy(2), None, None, env_id="CartPole-v1", episodes=10, seed=123, mode="sample")
    assert rand.mean < 40
    assert trained.mean > 3 * rand.mean + 50, (trained.format(), rand.format())


def test_loaded_policy_names_bad_observation_shapes(runs):
    pol = load_policy(runs["a"])
    assert pol(np.zeros((3, 4), np.float32)).shape == (3,)
    with pytest.raises(ValueError, match=r"obs must be \[B, 4\] \(one step of B envs\), got shape \(1, 3, 4\)"):
        pol(np.zeros((1, 3, 4), np.float32))  # a time axis too many
    with pytest.raises(ValueError, match=r"first must be \[B\] = \[3\] \(episode starts\), got shape \(1, 3\)"):
        pol.act(np.zeros((3, 4), np.float32), pol.initial_carry(3), np.ones((1, 3), bool))


def test_evaluate_script_writes_eval_json_and_video(runs, tmp_path):
    video = tmp_path / "play.gif"
    r = subprocess.run([sys.executable, "scripts/evaluate.py", "--run-dir", str(runs["a"]), "--episodes", "4",
                        "--video", str(video), "--checkpoint", "latest"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((runs["a"] / "eval.json").read_text())
    assert out["episodes"] == 4 and len(out["returns"]) == 4 and out["checkpoint_step"] == 51200
    assert "±" in r.stdout and video.stat().st_size > 1000
    bad = subprocess.run([sys.executable, "scripts/evaluate.py", "--run-dir", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope" in bad.stderr
