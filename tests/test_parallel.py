"""Scale-out (issue #9): data parallel over devices, two processes with
``jax.distributed``, populations of agents; all on CPU with fake devices.

Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set
before JAX starts, so every training here runs in a subprocess
(``tests/_scale_worker.py``) that dumps its final params to an ``.npz``.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxatari import parallel
from jaxatari.agents import a2c, ppo
from jaxatari.checkpoint import CheckpointError, load_policy

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_scale_worker.py")
PPO = ["--env", "CartPole-v1", "--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "32",
       "--no-tensorboard"]
A2C = ["--env", "CartPole-v1", "--total-timesteps", "400", "--num-envs", "4", "--no-tensorboard"]
pytestmark = pytest.mark.slow


def train(tmp, name, algo, *args, devices=1, timeout=600):
    """Run the worker in a fresh process with ``devices`` fake CPU devices; return the params leaves."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = tmp / f"{name}.npz"
    r = subprocess.run([sys.executable, WORKER, algo, str(out), *args, "--run-dir", str(tmp / name)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return leaves(tmp / f"{name}.0.npz")


def leaves(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def assert_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


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


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def ppo_one(tmp):
    """PPO through the sharded (device-invariant) path on one device: the reference."""
    return train(tmp, "ppo_one", "ppo", *PPO, "--devices", "1", "--sharded", devices=2)


# ---------------------------------------------------------------------------
# Data parallel: N devices == 1 device (same global batch and seed)
# ---------------------------------------------------------------------------


def test_ppo_two_devices_match_one_device(tmp, ppo_one):
    """Without --devices a run takes every local device (here 2)."""
    two = train(tmp, "ppo_two", "ppo", *PPO, devices=2)
    assert_close(two, ppo_one)
    cfg = json.loads((tmp / "ppo_two" / "config.json").read_text())
    assert cfg["devices"] == 2 and cfg["scale_out"]["devices"] == 2
    assert int(rows(tmp / "ppo_two")[-1]["global_step"]) == 1024
    # the checkpoint restores on another topology (here: one plain device)
    pol = load_policy(tmp / "ppo_two" / "checkpoints" / "latest")
    assert_close([np.asarray(x) for x in jax.tree.leaves(pol.params)], ppo_one)


def test_ppo_four_devices_match_one_device(tmp, ppo_one):
    four = train(tmp, "ppo_four", "ppo", *PPO, "--devices", "4", devices=4)
    assert_close(four, ppo_one)


def test_recurrent_ppo_two_devices_match_one_device(tmp):
    """--network cfc: the recurrent state is split along envs with the env
    batch; minibatches take whole envs from every device; periodic evaluation
    runs on the replicated params."""
    args = ["--env", "CartPole-v1", "--network", "cfc", "--num-envs", "8", "--num-steps", "16",
            "--num-minibatches", "2", "--total-timesteps", "512", "--no-tensorboard"]
    one = train(tmp, "cfc_one", "ppo", *args, "--devices", "1", "--sharded", devices=2)
    two = train(tmp, "cfc_two", "ppo", *args, "--devices", "2", "--eval-every", "256", "--eval-episodes", "2",
                devices=2)
    assert_close(two, one)
    assert load_policy(tmp / "cfc_two" / "checkpoints" / "latest").recurrent
    assert rows(tmp / "cfc_two")[-1]["eval_return"]


def test_a2c_two_devices_match_one_device(tmp):
    one = train(tmp, "a2c_one", "a2c", *A2C, "--devices", "1", "--sharded", devices=2)
    two = train(tmp, "a2c_two", "a2c", *A2C, "--devices", "2", devices=2)
    assert_close(two, one)


# ---------------------------------------------------------------------------
# Two processes on localhost with jax.distributed (CPU collectives: gloo)
# ---------------------------------------------------------------------------


def launch(tmp, name, algo, *args, processes=2, devices=1, timeout=400):
    """Run the worker as ``processes`` processes on localhost (``jax.distributed``,
    gloo); return each process's stdout and params leaves."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = parallel.launch_local([WORKER, algo, str(tmp / f"{name}.npz"), *args], processes, tmp / f"{name}.logs",
                                 env=env, cwd=ROOT, timeout=timeout)
    for rc, out, err in done:
        assert rc == 0, out[-2000:] + err[-3000:]
    return [out for _, out, _ in done], [leaves(tmp / f"{name}.{i}.npz") for i in range(processes)]


def test_two_processes_end_with_identical_params(tmp, ppo_one):
    run_dir = tmp / "multi"
    outs, (p0, p1) = launch(tmp, "multi", "ppo", *PPO, "--run-dir", str(run_dir))
    assert "DONE 0 2 2" in outs[0] and "DONE 1 2 2" in outs[1]
    for x, y in zip(p0, p1):
        np.testing.assert_array_equal(x, y)
    assert_close(p0, ppo_one)  # 2 processes x 1 device == 1 device, same global batch
    assert "Compiled" in outs[0] and "Compiled" not in outs[1]  # only process 0 logs
    assert int(rows(run_dir)[-1]["global_step"]) == 1024
    pol = load_policy(run_dir / "checkpoints" / "latest")  # written once, restores on one device
    assert_close([np.asarray(x) for x in jax.tree.leaves(pol.params)], p0)
    # each process logs the actions of its own envs (exact resume)
    assert sorted(f.name for f in run_dir.glob("actions*")) == ["actions.p0of2.u8", "actions.p1of2.u8"]


# ---------------------------------------------------------------------------
# Resume on any topology
# ---------------------------------------------------------------------------

HALF = [*PPO[:2], *PPO[4:], "--chunk-steps", "512", "--no-anneal-lr"]


@pytest.fixture(scope="module")
def full_on_two_devices(tmp):
    return train(tmp, "ppo_full", "ppo", *HALF, "--devices", "2", "--total-timesteps", "1024", devices=2)


def strip(rs, drop=("wall_time", "sps")):
    return [{k: v for k, v in r.items() if k not in drop} for r in rs]


def test_sharded_resume_is_exact_and_continues_on_fewer_devices(tmp, full_on_two_devices):
    """Half the run on 2 devices, then --resume to the full length (constant
    learning rate: the annealing depends on the total length): on 2 devices the
    same params as one go, bit for bit. Resumed on 1 device, the run stays on
    the data-parallel path, the emulators are replayed, the return windows
    re-laid; params and metrics follow the uninterrupted run to float tolerance."""
    import shutil

    train(tmp, "ppo_half", "ppo", *HALF, "--devices", "2", "--total-timesteps", "512", devices=2)
    shutil.copytree(tmp / "ppo_half", tmp / "topo")
    resumed = train(tmp, "ppo_half", "ppo", "--resume", str(tmp / "ppo_half"), "--total-timesteps", "1024",
                    devices=2)
    for x, y in zip(full_on_two_devices, resumed):
        np.testing.assert_array_equal(x, y)

    resumed = train(tmp, "topo", "ppo", "--resume", str(tmp / "topo"), "--devices", "1",
                    "--total-timesteps", "1024", devices=2)
    assert_close(resumed, full_on_two_devices)
    cfg = json.loads((tmp / "topo" / "config.json").read_text())
    assert cfg["sharded"] and cfg["scale_out"]["devices"] == 1
    got, want = rows(tmp / "topo"), rows(tmp / "ppo_full")
    assert [(r["global_step"], r["episodes"], r["return_mean100"]) for r in got] == \
           [(r["global_step"], r["episodes"], r["return_mean100"]) for r in want]


def test_plain_run_resumes_on_two_devices(tmp):
    train(tmp, "plain", "ppo", *HALF, "--total-timesteps", "512", devices=2)
    train(tmp, "plain", "ppo", "--resume", str(tmp / "plain"), "--devices", "2", "--total-timesteps", "1024",
          devices=2)
    got = rows(tmp / "plain")
    assert int(got[-1]["global_step"]) == 1024 and got[-1]["return_mean100"]
    assert json.loads((tmp / "plain" / "config.json").read_text())["scale_out"]["devices"] == 2


def test_two_process_run_resumes_exactly_on_any_topology(tmp, full_on_two_devices):
    """Half on 2 processes, then resumed (a) on 2 processes and (b) in one
    process on 2 devices: both replay the per-process action logs and end where
    the uninterrupted run ends; --eval-every works across processes."""
    import shutil

    args = [*HALF, "--eval-every", "512", "--eval-episodes", "2"]
    launch(tmp, "mp_half", "ppo", *args, "--total-timesteps", "512", "--run-dir", str(tmp / "mp"))
    shutil.copytree(tmp / "mp", tmp / "mp_single")
    outs, (p0, p1) = launch(tmp, "mp_resumed", "ppo", "--resume", str(tmp / "mp"), "--total-timesteps", "1024")
    assert "Replaying" in outs[0] and "not exact" not in outs[0] + outs[1]
    for x, y in zip(p0, p1):
        np.testing.assert_array_equal(x, y)
    assert_close(p0, full_on_two_devices)
    single = train(tmp, "mp_single", "ppo", "--resume", str(tmp / "mp_single"), "--devices", "2",
                   "--total-timesteps", "1024", devices=2)
    assert_close(single, full_on_two_devices)
    assert (tmp / "mp_single" / "actions.u8").stat().st_size == 1024  # the logs re-written for one process
    evals = [(r["global_step"], float(r["eval_return"])) for r in rows(tmp / "mp") if r["eval_return"]]
    assert [step for step, _ in evals] == ["512", "1024"]
    for step, score in evals:  # each is the score of the policy saved at its step, played again here
        assert score == pytest.approx(eval_return(tmp / "mp" / "checkpoints" / "latest" / step, 2), rel=1e-6)


# ---------------------------------------------------------------------------
# Populations: agent k == that agent trained alone
# ---------------------------------------------------------------------------


def test_ppo_population_matches_agents_trained_alone(tmp):
    pop = tmp / "pop"
    train(tmp, "pop", "ppo", *PPO, "--seed", "3", "--num-agents", "2", "--eval-every", "1024", "--eval-episodes", "2")
    got = rows(pop)
    assert [r["agent"] for r in got[:2]] == ["0", "1"] and len(got) == 2 * 8
    assert all(r["eval_return"] for r in got[-2:]) and not any(r["eval_return"] for r in got[:-2])  # per agent
    for k in (1,):  # agent 1 (seed 3 + 1) alone: the agents are neither mixed up nor given the population's seed
        alone = train(tmp, f"alone{k}", "ppo", *PPO, "--seed", str(3 + k))
        agent = load_policy(pop / "agents" / str(k))
        assert agent.config["seed"] == 3 + k
        assert_close([np.asarray(x) for x in jax.tree.leaves(agent.params)], alone)
        # metrics of agent k are those of the lone run
        solo = rows(tmp / f"alone{k}")
        mine = [r for r in got if r["agent"] == str(k)]
        np.testing.assert_allclose([float(r["loss"]) for r in mine], [float(r["loss"]) for r in solo], rtol=1e-4)
        assert [r["episodes"] for r in mine] == [r["episodes"] for r in solo]
    a0 = [np.asarray(x) for x in jax.tree.leaves(load_policy(pop / "agents" / "0").params)]
    a1 = [np.asarray(x) for x in jax.tree.leaves(load_policy(pop / "agents" / "1").params)]
    assert_differs(a0, a1)
    with pytest.raises(CheckpointError, match=r"is a population of 2 agents .*/agents/<k> with k in 0\.\.1"):
        load_policy(pop)  # its checkpoints stack the agents' params: one agent's directory is the policy


def test_a2c_sweep_matches_agents_trained_alone(tmp):
    pop = tmp / "sweep"
    train(tmp, "sweep", "a2c", *A2C, "--sweep", "learning_rate=1e-3,3e-3")
    cfg = json.loads((pop / "config.json").read_text())
    assert cfg["num_agents"] == 2 and cfg["scale_out"]["sweep"] == {"name": "learning_rate", "values": [1e-3, 3e-3]}
    for k, lr in enumerate(("1e-3", "3e-3")):
        agent = load_policy(pop / "agents" / str(k))
        assert agent.config["learning_rate"] == float(lr) and agent.config["seed"] == 1 + k
    # Agent 0 alone (the population test checks agent 1): the sweep's first value, the base seed.
    alone = train(tmp, "lr0", "a2c", *A2C, "--learning-rate", "1e-3", "--seed", "1")
    assert_close([np.asarray(x) for x in jax.tree.leaves(load_policy(pop / "agents" / "0").params)], alone)


# ---------------------------------------------------------------------------
# Bad input: one sentence, before compiling
# ---------------------------------------------------------------------------


def test_bad_scale_out_flags_are_named():
    with pytest.raises(parallel.ParallelError, match=r"--devices 3 .* 1 local device"):
        parallel.resolve_devices(3, 8)
    with pytest.raises(parallel.ParallelError, match=r"--sweep 'lr' .* learning_rate"):
        parallel.parse_sweep("lr=1,2", 1, ppo.SWEEPABLE, ppo.RANGES)
    with pytest.raises(parallel.ParallelError, match=r"3 values for learning_rate but --num-agents is 2"):
        parallel.parse_sweep("learning_rate=1,2,3", 2, a2c.SWEEPABLE, a2c.RANGES)
    assert parallel.parse_sweep("ent_coef=0.0,0.01", 1, ppo.SWEEPABLE, ppo.RANGES) == ("ent_coef", [0.0, 0.01], 2)
    # Swept values get the flag's own range check; an empty sweep is refused.
    with pytest.raises(parallel.ParallelError, match=r"--sweep gamma=0.9,1.5: --gamma 1.5 is not accepted: .*\(0, 1\]"):
        parallel.parse_sweep("gamma=0.9,1.5", 1, ppo.SWEEPABLE, ppo.RANGES)
    with pytest.raises(parallel.ParallelError, match=r"--rms-alpha 1.0 is not accepted: it must be in \[0, 1\)"):
        parallel.parse_sweep("rms_alpha=0.99,1.0,-1", 1, a2c.SWEEPABLE, a2c.RANGES)
    with pytest.raises(parallel.ParallelError, match=r"gives 0 value\(s\); a sweep takes two or more"):
        parallel.parse_sweep("learning_rate=,", 1, ppo.SWEEPABLE, ppo.RANGES)
    with pytest.raises(parallel.ParallelError, match=r"gives 1 value\(s\).* pass --learning-rate alone"):
        parallel.parse_sweep("learning_rate=1e-4", 1, ppo.SWEEPABLE, ppo.RANGES)
    assert set(ppo.SWEEPABLE) <= set(ppo.RANGES) and set(a2c.SWEEPABLE) <= set(a2c.RANGES)
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


def test_recurrent_population_matches_agent_trained_alone(tmp):
    """--network cfc: the carry is vmapped over agents too."""
    args = ["--env", "CartPole-v1", "--network", "cfc", "--num-envs", "4", "--num-steps", "16",
            "--total-timesteps", "256", "--no-tensorboard"]
    train(tmp, "cfc_pop", "ppo", *args, "--num-agents", "2")
    alone = train(tmp, "cfc_alone", "ppo", *args, "--seed", "2")
    agent = load_policy(tmp / "cfc_pop" / "agents" / "1")
    assert agent.recurrent
    assert_close([np.asarray(x) for x in jax.tree.leaves(agent.params)], alone)


def test_population_resume_is_exact(tmp):
    args = [*PPO[:2], *PPO[4:], "--chunk-steps", "512", "--no-anneal-lr", "--num-agents", "2"]
    full = train(tmp, "pop_full", "ppo", *args, "--total-timesteps", "1024")
    train(tmp, "pop_half", "ppo", *args, "--total-timesteps", "512")
    resumed = train(tmp, "pop_half", "ppo", "--resume", str(tmp / "pop_half"), "--total-timesteps", "1024")
    for x, y in zip(full, resumed):
        np.testing.assert_array_equal(x, y)
    assert strip(rows(tmp / "pop_half")) == strip(rows(tmp / "pop_full"))
    assert load_policy(tmp / "pop_half" / "agents" / "1").meta["step"] == 1024
