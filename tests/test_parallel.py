"""Scale-out (issue #9): data parallel over devices, two processes with
``jax.distributed``, populations of agents; all on CPU with fake devices.

Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set
before JAX starts, so the trainings run in subprocesses (``tests/_scale_worker.py``):
every single-process training of this file in one worker process with 4 devices,
started once by the ``runs`` fixture; the tests inspect what it wrote.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from _scale_worker import ROOT, copy, job, launch, run_jobs, trained
from jaxatari import parallel
from jaxatari.agents import a2c, ppo
from jaxatari.checkpoint import CheckpointError
from jaxatari.policy import load_policy

# Chunked at the half (the resumed runs stop there) at a constant learning rate (the annealing depends on the
# total length); the annealed rate is checked on N devices by the recurrent and population tests.
PPO = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--chunk-steps", "512", "--no-anneal-lr",
       "--no-tensorboard"]
FULL, HALF = [*PPO, "--total-timesteps", "1024"], [*PPO, "--total-timesteps", "512"]
A2C = ["--env", "CartPole-v1", "--total-timesteps", "400", "--num-envs", "4", "--no-tensorboard"]
PQN = ["--env", "CartPole-v1", "--total-timesteps", "512", "--num-envs", "4", "--num-steps", "32", "--no-tensorboard"]
CFC = ["--env", "CartPole-v1", "--network", "cfc", "--num-steps", "16", "--no-tensorboard"]
pytestmark = pytest.mark.slow


def params_of(path):
    return [np.asarray(x) for x in jax.tree.leaves(load_policy(path).params)]


def assert_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


def assert_equal(*runs):
    for xs in zip(*runs):
        for x in xs[1:]:
            np.testing.assert_array_equal(x, xs[0])


def assert_differs(a, b):
    assert any(not np.allclose(x, y, atol=1e-4) for x, y in zip(a, b))


def eval_return(step_dir, episodes):
    """What ``--eval-every`` with ``--eval-episodes episodes`` scores the policy saved in ``step_dir``."""
    from jaxatari.evaluate import evaluate

    pol = load_policy(step_dir)
    return evaluate(pol.policy_fn, pol.params, pol.initial_carry, episodes=episodes, mode="sample",
                    seed=pol.config["seed"] + 100_000, **pol.env_kwargs).mean


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def strip(rs, drop=("wall_time", "sps")):
    return [{k: v for k, v in r.items() if k not in drop} for r in rs]


def config(run_dir):
    return json.loads((Path(run_dir) / "config.json").read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def mp_half(tmp):
    """Half a run in 2 processes of one device (--eval-every across processes), copied to ``mp_single``
    for the worker to resume in one process."""
    out = launch(tmp, "mp", "ppo", *HALF, "--eval-every", "512", "--eval-episodes", "2")
    shutil.copytree(tmp / "mp", tmp / "mp_single")
    return out


@pytest.fixture(scope="module")
def runs(tmp, mp_half):
    """Every single-process training of this file, in one worker process with 4 devices."""
    jobs = [
        job(tmp, "one", "ppo", *FULL, "--devices", "1"),  # the reference: one device
        job(tmp, "two", "ppo", *FULL, "--devices", "2"),
        job(tmp, "all", "ppo", *FULL),  # without --devices: every local device (4)
        job(tmp, "half", "ppo", *HALF, "--devices", "2"),
        copy(tmp, "half", "topo"),
        job(tmp, "resumed", "ppo", "--resume", str(tmp / "half"), "--total-timesteps", "1024", "--devices", "2"),
        job(tmp, "topo", "ppo", "--resume", str(tmp / "topo"), "--total-timesteps", "1024", "--devices", "1"),
        job(tmp, "mp_single", "ppo", "--resume", str(tmp / "mp_single"), "--total-timesteps", "1024",
            "--devices", "2"),
        job(tmp, "cfc_one", "ppo", *CFC, "--num-envs", "8", "--num-minibatches", "2", "--total-timesteps", "512",
            "--devices", "1"),
        job(tmp, "cfc_two", "ppo", *CFC, "--num-envs", "8", "--num-minibatches", "2", "--total-timesteps", "512",
            "--devices", "2", "--eval-every", "256", "--eval-episodes", "2"),
        job(tmp, "a2c_one", "a2c", *A2C, "--devices", "1"),
        job(tmp, "a2c_two", "a2c", *A2C, "--devices", "2"),
        job(tmp, "pqn_one", "pqn", *PQN, "--devices", "1"),
        job(tmp, "pqn_two", "pqn", *PQN, "--devices", "2"),
        # a population, resumed; its half against agent 1 alone (seed 3 + 1), which then resumes on 2 devices
        job(tmp, "pop", "ppo", *FULL, "--seed", "3", "--num-agents", "2", "--eval-every", "1024",
            "--eval-episodes", "2"),
        job(tmp, "pop_half", "ppo", *HALF, "--seed", "3", "--num-agents", "2", "--eval-every", "1024",
            "--eval-episodes", "2"),
        copy(tmp, "pop_half", "pop_512"),
        job(tmp, "pop_resumed", "ppo", "--resume", str(tmp / "pop_half"), "--total-timesteps", "1024"),
        job(tmp, "lone", "ppo", *HALF, "--seed", "4", "--devices", "1"),
        job(tmp, "lone_resumed", "ppo", "--resume", str(tmp / "lone"), "--total-timesteps", "1024",
            "--devices", "2"),
        job(tmp, "sweep", "a2c", *A2C, "--sweep", "learning_rate=1e-3,3e-3"),
        job(tmp, "lr0", "a2c", *A2C, "--learning-rate", "1e-3", "--seed", "1", "--devices", "1"),
        job(tmp, "cfc_pop", "ppo", *CFC, "--num-envs", "4", "--total-timesteps", "256", "--num-agents", "2"),
        job(tmp, "cfc_alone", "ppo", *CFC, "--num-envs", "4", "--total-timesteps", "256", "--seed", "2",
            "--devices", "1"),
    ]
    run_jobs(tmp, jobs, devices=4)
    return tmp


# ---------------------------------------------------------------------------
# Data parallel: N devices == 1 device (same global batch and seed)
# ---------------------------------------------------------------------------


def test_ppo_two_and_four_devices_match_one_device(runs):
    one = trained(runs, "one")
    assert_close(trained(runs, "two"), one)
    assert_close(trained(runs, "all"), one)
    assert config(runs / "all")["devices"] == 4 and config(runs / "all")["scale_out"]["devices"] == 4
    assert config(runs / "two")["devices"] == 2 and config(runs / "two")["scale_out"]["devices"] == 2
    assert int(rows(runs / "two")[-1]["global_step"]) == 1024
    # the checkpoint restores on another topology (here: one device)
    assert_close(params_of(runs / "two" / "checkpoints" / "latest"), one)


def test_recurrent_ppo_two_devices_match_one_device(runs):
    """--network cfc: the recurrent state is split along envs with the env
    batch; minibatches take whole envs from every device; periodic evaluation
    runs on the replicated params. The learning rate is annealed here."""
    assert_close(trained(runs, "cfc_two"), trained(runs, "cfc_one"))
    assert load_policy(runs / "cfc_two" / "checkpoints" / "latest").recurrent
    assert rows(runs / "cfc_two")[-1]["eval_return"]


@pytest.mark.parametrize("algo", ["a2c", "pqn"])
def test_two_devices_match_one_device(runs, algo):
    assert_close(trained(runs, f"{algo}_two"), trained(runs, f"{algo}_one"))


# ---------------------------------------------------------------------------
# Two processes on localhost with jax.distributed (CPU collectives: gloo)
# ---------------------------------------------------------------------------


def test_two_process_run_resumes_exactly_on_any_topology(tmp, mp_half, runs):
    """Half on 2 processes (as on 2 devices of one), then resumed (a) on 2
    processes and (b) in one process on 2 devices: both replay the per-process
    action logs and end where the uninterrupted run ends; --eval-every works
    across processes."""
    (out0, out1), (h0, h1) = mp_half
    assert "DONE 0 2 2" in out0 and "DONE 1 2 2" in out1
    assert "Compiled" in out0 and "Compiled" not in out1  # only process 0 logs
    assert_equal(h0, h1)
    assert_close(h0, trained(runs, "half"))  # 2 processes x 1 device == 1 process x 2 devices

    outs, (p0, p1) = launch(tmp, "mp_resumed", "ppo", "--resume", str(tmp / "mp"), "--total-timesteps", "1024")
    assert "Replaying" in outs[0] and "not exact" not in outs[0] + outs[1]
    assert_equal(p0, p1)
    assert_close(p0, trained(runs, "one"))  # 2 processes x 1 device == 1 device, same global batch
    assert int(rows(tmp / "mp")[-1]["global_step"]) == 1024
    assert_close(params_of(tmp / "mp" / "checkpoints" / "latest"), p0)  # written once, restores on one device
    # each process logs the actions of its own envs (exact resume)
    assert sorted(f.name for f in (tmp / "mp").glob("actions*")) == ["actions.p0of2.u8", "actions.p1of2.u8"]

    assert_close(trained(runs, "mp_single"), trained(runs, "two"))
    assert (tmp / "mp_single" / "actions.u8").stat().st_size == 1024  # the logs re-written for one process
    evals = [(r["global_step"], float(r["eval_return"])) for r in rows(tmp / "mp") if r["eval_return"]]
    assert [step for step, _ in evals] == ["512", "1024"]
    for step, score in evals:  # each is the score of the policy saved at its step, played again here
        assert score == pytest.approx(eval_return(tmp / "mp" / "checkpoints" / "latest" / step, 2), rel=1e-6)


# ---------------------------------------------------------------------------
# Resume on any topology
# ---------------------------------------------------------------------------


def test_resume_is_exact_and_continues_on_fewer_devices(runs):
    """Half the run on 2 devices, then --resume to the full length: on 2
    devices the same params as one go, bit for bit. Resumed on 1 device, the
    emulators are replayed, the return windows re-laid; params and metrics
    follow the uninterrupted run to float tolerance."""
    full = trained(runs, "two")
    assert_equal(full, trained(runs, "resumed"))
    assert_close(trained(runs, "topo"), full)
    cfg = config(runs / "topo")
    assert "sharded" not in cfg and cfg["scale_out"]["devices"] == 1
    got, want = rows(runs / "topo"), rows(runs / "two")
    assert [(r["global_step"], r["episodes"], r["return_mean100"]) for r in got] == \
           [(r["global_step"], r["episodes"], r["return_mean100"]) for r in want]


def test_one_device_run_resumes_on_two_devices(runs):
    trained(runs, "lone_resumed")
    assert "written on 1 device(s) and continues on 2" in (runs / "lone_resumed.log").read_text()
    got = rows(runs / "lone")
    assert int(got[-1]["global_step"]) == 1024 and got[-1]["return_mean100"]
    assert config(runs / "lone")["scale_out"]["devices"] == 2


# ---------------------------------------------------------------------------
# Populations: agent k == that agent trained alone
# ---------------------------------------------------------------------------


def test_ppo_population_matches_agents_trained_alone(runs):
    pop = runs / "pop_512"  # half the population run, before its resume
    got = rows(pop)
    assert [r["agent"] for r in got[:2]] == ["0", "1"] and len(got) == 2 * 4
    assert all(r["eval_return"] for r in got[-2:]) and not any(r["eval_return"] for r in got[:-2])  # per agent
    # agent 1 (seed 3 + 1) alone: the agents are neither mixed up nor given the population's seed
    agent = load_policy(pop / "agents" / "1")
    assert agent.config["seed"] == 4
    assert_close([np.asarray(x) for x in jax.tree.leaves(agent.params)], trained(runs, "lone"))
    # metrics of agent 1 are those of the lone run (its first half, before the resume)
    solo, mine = rows(runs / "lone")[:4], [r for r in got if r["agent"] == "1"]
    np.testing.assert_allclose([float(r["loss"]) for r in mine], [float(r["loss"]) for r in solo], rtol=1e-4)
    assert [r["episodes"] for r in mine] == [r["episodes"] for r in solo]
    assert_differs(params_of(pop / "agents" / "0"), params_of(pop / "agents" / "1"))
    with pytest.raises(CheckpointError, match=r"is a population of 2 agents .*/agents/<k> with k in 0\.\.1"):
        load_policy(pop)  # its checkpoints stack the agents' params: one agent's directory is the policy


def test_population_resume_is_exact(runs):
    assert_equal(trained(runs, "pop"), trained(runs, "pop_resumed"))
    drop = ("wall_time", "sps", "eval_return")  # the half evaluated at its end
    got, want = rows(runs / "pop_half"), rows(runs / "pop")
    assert strip(got, drop) == strip(want, drop)
    assert [r["eval_return"] for r in got[-2:]] == [r["eval_return"] for r in want[-2:]]
    assert load_policy(runs / "pop_half" / "agents" / "1").meta["step"] == 1024


def test_a2c_sweep_matches_agents_trained_alone(runs):
    pop = runs / "sweep"
    cfg = config(pop)
    assert cfg["num_agents"] == 2 and cfg["scale_out"]["sweep"] == {"name": "learning_rate", "values": [1e-3, 3e-3]}
    for k, lr in enumerate(("1e-3", "3e-3")):
        agent = load_policy(pop / "agents" / str(k))
        assert agent.config["learning_rate"] == float(lr) and agent.config["seed"] == 1 + k
    # Agent 0 alone (the population test checks agent 1): the sweep's first value, the base seed.
    assert_close(params_of(pop / "agents" / "0"), trained(runs, "lr0"))


def test_recurrent_population_matches_agent_trained_alone(runs):
    """--network cfc: the carry is vmapped over agents too."""
    agent = load_policy(runs / "cfc_pop" / "agents" / "1")
    assert agent.recurrent
    assert_close([np.asarray(x) for x in jax.tree.leaves(agent.params)], trained(runs, "cfc_alone"))


# ---------------------------------------------------------------------------
# Bad input: one sentence, before compiling
# ---------------------------------------------------------------------------


def test_bad_scale_out_flags_are_named():
    with pytest.raises(parallel.ParallelError, match=r"--devices 3 .* 1 local device"):
        parallel.resolve_devices(3, 8)
    with pytest.raises(parallel.ParallelError, match=r"--sweep 'lr' .* learning_rate"):
        parallel.parse_sweep("lr=1,2", 1, ppo.ALGORITHM.sweepable, ppo.ALGORITHM.ranges)
    with pytest.raises(parallel.ParallelError, match=r"3 values for learning_rate but --num-agents is 2"):
        parallel.parse_sweep("learning_rate=1,2,3", 2, a2c.ALGORITHM.sweepable, a2c.ALGORITHM.ranges)
    assert parallel.parse_sweep("ent_coef=0.0,0.01", 1, ppo.ALGORITHM.sweepable, ppo.ALGORITHM.ranges) == ("ent_coef", [0.0, 0.01], 2)
    # Swept values get the flag's own range check; an empty sweep is refused.
    with pytest.raises(parallel.ParallelError, match=r"--sweep gamma=0.9,1.5: --gamma 1.5 is not accepted: .*\(0, 1\]"):
        parallel.parse_sweep("gamma=0.9,1.5", 1, ppo.ALGORITHM.sweepable, ppo.ALGORITHM.ranges)
    with pytest.raises(parallel.ParallelError, match=r"--rms-alpha 1.0 is not accepted: it must be in \[0, 1\)"):
        parallel.parse_sweep("rms_alpha=0.99,1.0,-1", 1, a2c.ALGORITHM.sweepable, a2c.ALGORITHM.ranges)
    with pytest.raises(parallel.ParallelError, match=r"gives 0 value\(s\); a sweep takes two or more"):
        parallel.parse_sweep("learning_rate=,", 1, ppo.ALGORITHM.sweepable, ppo.ALGORITHM.ranges)
    with pytest.raises(parallel.ParallelError, match=r"gives 1 value\(s\).* pass --learning-rate alone"):
        parallel.parse_sweep("learning_rate=1e-4", 1, ppo.ALGORITHM.sweepable, ppo.ALGORITHM.ranges)
    assert set(ppo.ALGORITHM.sweepable) <= set(ppo.ALGORITHM.ranges) and set(a2c.ALGORITHM.sweepable) <= set(a2c.ALGORITHM.ranges)
    assert parallel.resolve_devices(None, 7) == 1


def test_script_rejects_uneven_split_before_compiling(tmp):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    uneven = [a if a != "4" else "3" for a in PPO]  # --num-envs 3
    r = subprocess.run([sys.executable, "scripts/ppo.py", *uneven, "--devices", "2",
                        "--run-dir", str(tmp / "bad")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "--num-envs 3 is not divisible by --devices 2" in r.stderr
    assert "Traceback" not in r.stderr and "Compiled" not in r.stdout
    r = subprocess.run([sys.executable, "scripts/ppo.py", *PPO, "--network", "cfc", "--devices", "2",
                        "--run-dir", str(tmp / "bad2")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "2 envs per device, not divisible by --num-minibatches 4" in r.stderr
