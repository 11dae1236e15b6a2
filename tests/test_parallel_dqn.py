"""Scale-out (issue #9) for DQN: data parallel over devices, populations of agents.

Data parallel (``--devices N``): each device steps its share of the envs and
holds their replay rows; minibatches are stratified by env with per-env keys,
so N devices give the params of one device to float tolerance; so do two processes on
localhost with ``jax.distributed`` (one device each). A checkpoint resumes
bit for bit on the topology that wrote it and to float tolerance on another.
Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before JAX starts, so those runs go through ``tests/_scale_worker.py``: all
single-process ones in one worker process with 2 devices, started once by the
``runs`` fixture.

A population of K agents (``--num-agents K``, ``--sweep``) vmaps acting and
learning over agents and steps one EnvPool of ``K x num_envs`` envs; agent
``k`` must end with the params (and metrics) of a lone run with seed
``seed + k`` and its hyperparameters, to float tolerance. Populations need no
fake devices, so these run in-process.
"""

import csv
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from _scale_worker import copy, job, launch, run_jobs, trained
from jaxatari import configs, driver, errors, parallel
from jaxatari.agents import dqn
from jaxatari.policy import load_policy

pytestmark = pytest.mark.slow

# 300 iterations of 4 envs, learning from iteration 100 on: 201 gradient steps per agent.
TINY = dict(env="CartPole-v1", total_timesteps=1200, num_envs=4, buffer_size=1000, batch_size=32,
            learning_starts=400, train_frequency=4, target_network_frequency=200, exploration_steps=600,
            log_every=100, chunk_steps=400, tensorboard=False)
FLAGS = ["--env", "CartPole-v1", "--num-envs", "4", "--buffer-size", "1000", "--batch-size", "32",
         "--learning-starts", "400", "--train-frequency", "4", "--target-network-frequency", "200",
         "--exploration-steps", "600", "--log-every", "100", "--chunk-steps", "400", "--no-tensorboard"]
FULL, HALF = [*FLAGS, "--total-timesteps", "1200"], [*FLAGS, "--total-timesteps", "800"]


def train(run_dir, **kw):
    return driver.train(dqn.ALGORITHM, dqn.Config(**dict(TINY, **kw), run_dir=str(run_dir)))


def params_of(path):
    return [np.asarray(x) for x in jax.tree.leaves(load_policy(path).params)]


def assert_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def floats(rs, col):
    return [float(r[col]) if r[col] else np.nan for r in rs]


def params(result):
    return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


def strip(rs, drop=("wall_time", "sps")):
    return [{k: v for k, v in r.items() if k not in drop} for r in rs]


def assert_rows_close(got, want):
    """The same metrics rows, to float tolerance."""
    assert [r["episodes"] for r in got] == [r["episodes"] for r in want]
    assert [r["global_step"] for r in got] == [r["global_step"] for r in want]
    for col in ("loss", "q_mean", "buffer_size", "episode_return", "return_mean100"):
        np.testing.assert_allclose(floats(got, col), floats(want, col), rtol=1e-4, atol=1e-6)


def final_eval_return(run_dir, seed):
    """What ``--eval-episodes 3`` scores the latest policy saved in ``run_dir`` with ``seed``
    (the evaluation after the last chunk of an ``--eval-every`` run)."""
    pol = load_policy(Path(run_dir) / "checkpoints" / "latest")
    c = dqn.resolve(dqn.Config(**dict(TINY, eval_episodes=3, seed=seed)))
    return driver.q_evaluator(c, pol.spec)(pol.params, seed)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("dqn_scale")


@pytest.fixture(scope="module")
def multi(shared):
    """The full run in two processes of one device each; --eval-every on process 0, its score broadcast."""
    return launch(shared, "multi", "dqn", *FULL, "--eval-every", "1200", "--eval-episodes", "3")


@pytest.fixture(scope="module")
def mhalf(shared):
    """Half the run in two processes, copied to ``mhalf_in_one`` for the worker to resume in one process."""
    launch(shared, "mhalf", "dqn", *HALF)
    shutil.copytree(shared / "mhalf", shared / "mhalf_in_one")


@pytest.fixture(scope="module")
def lone(shared):
    """Half a run on one device, in this process: agent 1 of the population alone (seed 3 + 1) for 800
    steps; the worker resumes it on 2 devices."""
    return train(shared / "lone", seed=4, total_timesteps=800)


@pytest.fixture(scope="module")
def runs(shared, mhalf, lone):
    """Every single-process run on fake devices, in one worker process with 2 devices."""
    run_jobs(shared, [
        job(shared, "one", "dqn", *FULL, "--devices", "1"),  # the reference: one device
        # --eval-every: evaluated after every chunk, on the host copy of the replicated params (which leaves
        # training as it is)
        job(shared, "two", "dqn", *FULL, "--devices", "2", "--eval-every", "400", "--eval-episodes", "3"),
        job(shared, "half", "dqn", *HALF, "--devices", "2"),
        copy(shared, "half", "half_on_one"),
        job(shared, "resumed", "dqn", "--resume", str(shared / "half"), "--total-timesteps", "1200"),
        job(shared, "half_on_one", "dqn", "--resume", str(shared / "half_on_one"), "--total-timesteps", "1200",
            "--devices", "1"),
        job(shared, "mhalf_in_one", "dqn", "--resume", str(shared / "mhalf_in_one"), "--total-timesteps", "1200",
            "--devices", "1"),
        job(shared, "lone_resumed", "dqn", "--resume", str(shared / "lone"), "--total-timesteps", "1200",
            "--devices", "2"),
    ], devices=2)
    return shared


# ---------------------------------------------------------------------------
# Data parallel: N devices == 1 device
# ---------------------------------------------------------------------------


def test_dqn_two_devices_match_one_device(runs):
    one = trained(runs, "one")
    assert_close(trained(runs, "two"), one)
    cfg = json.loads((runs / "two" / "config.json").read_text())
    assert cfg["devices"] == 2 and cfg["scale_out"]["devices"] == 2 and "sharded" not in cfg
    r1, r2 = rows(runs / "one"), rows(runs / "two")
    assert len(r2) == 12 and r2[-1]["global_step"] == "1200" and r2[-1]["update"] == "201"
    assert [r["episodes"] for r in r2] == [r["episodes"] for r in r1]
    for col in ("loss", "q_mean", "buffer_size", "episode_return"):
        np.testing.assert_allclose(floats(r2, col), floats(r1, col), rtol=1e-4, atol=1e-6)
    assert float(r2[-1]["buffer_size"]) > 900  # both replay shards filled
    assert [i for i, r in enumerate(r2) if r["eval_return"]] == [3, 7, 11]  # the last row of every chunk
    assert float(r2[-1]["eval_return"]) == pytest.approx(final_eval_return(runs / "two", seed=1), rel=1e-6)
    # the checkpoint (replicated params, sharded buffer) restores on one device
    assert_close(params_of(runs / "two" / "checkpoints" / "latest"), one)
    # The match is not that of two idle learners: from ~0 at the first update, the Q of the taken actions climbs
    # past 2 by the 4th target sync (each adds at most ~1 reward; a learner whose target never syncs stays ~1).
    q = floats(r2, "q_mean")
    assert abs(q[3]) < 0.5 and q[-1] > 2, q


def test_dqn_resume_is_exact_and_resumes_on_one_device(runs):
    """Half the run on 2 devices, then --resume (sharded buffer restored, env actions replayed): same as one go,
    bit for bit on 2 devices, to float tolerance on 1."""
    full, drop = trained(runs, "two"), ("wall_time", "sps", "eval_return")  # the run in one go evaluated
    for x, y in zip(full, trained(runs, "resumed")):
        np.testing.assert_array_equal(x, y)
    assert strip(rows(runs / "half"), drop) == strip(rows(runs / "two"), drop)

    assert_close(trained(runs, "half_on_one"), full)
    assert_rows_close(rows(runs / "half_on_one"), rows(runs / "two"))
    cfg = json.loads((runs / "half_on_one" / "config.json").read_text())
    assert cfg["devices"] == 1 and cfg["scale_out"]["devices"] == 1


# ---------------------------------------------------------------------------
# Two processes on localhost (jax.distributed, CPU collectives: gloo)
# ---------------------------------------------------------------------------


def test_dqn_two_processes_match_one_device(shared, multi, runs):
    (out0, out1), (p0, p1) = multi
    assert "DONE 0 2 2" in out0 and "DONE 1 2 2" in out1
    for x, y in zip(p0, p1):
        np.testing.assert_array_equal(x, y)
    assert_close(p0, trained(runs, "one"))  # 2 processes x 1 device == 1 device, same global batch
    assert "Compiled" in out0 and "Compiled" not in out1 and "replay buffer" not in out1  # only process 0 logs
    run_dir = shared / "multi"
    got = rows(run_dir)
    assert len(got) == 12 and got[-1]["global_step"] == "1200" and got[-1]["update"] == "201"
    assert_rows_close(got, rows(runs / "one"))
    assert float(got[-1]["eval_return"]) == pytest.approx(final_eval_return(run_dir, seed=1), rel=1e-6)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["scale_out"]["processes"] == 2 and cfg["scale_out"]["devices"] == 2
    for i in range(2):  # one action log per process: its 2 envs, 300 env steps
        assert (run_dir / f"actions.p{i}of2.u8").stat().st_size == 300 * 2
    assert_close(params_of(run_dir / "checkpoints" / "latest"), p0)  # written once, restores on one device


def test_dqn_two_processes_resume_exact_and_in_one_process(shared, multi, runs):
    """Half the run in 2 processes, then --resume: in 2 processes bit for bit the run in one go; in one
    process (one device) the same to float tolerance, its action log rewritten for one process."""
    _, (full, _) = multi
    _, (r0, r1) = launch(shared, "mresumed", "dqn", "--resume", str(shared / "mhalf"), "--total-timesteps", "1200")
    for x, y, z in zip(full, r0, r1):
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(z, x)
    drop = ("wall_time", "sps", "eval_return")
    assert strip(rows(shared / "mhalf"), drop) == strip(rows(shared / "multi"), drop)

    assert_close(trained(runs, "mhalf_in_one"), full)
    assert_rows_close(rows(shared / "mhalf_in_one"), rows(shared / "multi"))
    assert (shared / "mhalf_in_one" / "actions.u8").stat().st_size == 300 * 4
    cfg = json.loads((shared / "mhalf_in_one" / "config.json").read_text())
    assert cfg["scale_out"]["processes"] == 1 and cfg["coordinator"] is None


def test_one_device_run_resumes_on_two_devices(runs):
    """A one-device run resumed with --devices 2 says that it continues to float tolerance."""
    trained(runs, "lone_resumed")
    log = (runs / "lone_resumed.log").read_text()
    assert "written on 1 device(s) and continues on 2" in log
    got = rows(runs / "lone")
    assert len(got) == 12 and got[-1]["global_step"] == "1200"
    assert json.loads((runs / "lone" / "config.json").read_text())["scale_out"]["devices"] == 2


def test_bad_process_flags_are_named(tmp_path, monkeypatch):
    for var in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(parallel.ParallelError, match=r"--process-id 2 is not accepted: it must lie in \[0, 2\)"):
        train(tmp_path / "bad", coordinator="127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(parallel.ParallelError, match=r"needs --coordinator HOST:PORT, --num-processes and "
                                                     r"--process-id .*process_id=None"):
        train(tmp_path / "bad", coordinator="127.0.0.1:1", num_processes=2)
    assert not (tmp_path / "bad").exists()  # refused before anything was built or written


def test_bad_device_flags_are_named(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"--batch-size 30 is not divisible by --num-envs 4"):
        dqn.resolve(dqn.Config(**dict(TINY, batch_size=30)))
    with pytest.raises(parallel.ParallelError, match=r"--devices 2 .* 1 local device"):
        train(tmp_path / "bad", devices=2)
    with pytest.raises(parallel.ParallelError, match=r"--num-agents 2 runs on one device of one process; "
                                                     r"drop --devices 2"):
        train(tmp_path / "bad", devices=2, num_agents=2)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------
# Populations: agent k == that agent trained alone
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pop(shared):
    """Two agents, seeds 3 and 4; --eval-every: each agent's rows get its own score, as it would alone."""
    return train(shared / "pop", seed=3, num_agents=2, eval_every=1200, eval_episodes=3)


@pytest.fixture(scope="module")
def pop_half(shared):
    """The population run stopped at 800 steps."""
    return train(shared / "pop_half", seed=3, num_agents=2, eval_every=1200, eval_episodes=3, total_timesteps=800)


def test_dqn_population_matches_agents_trained_alone(shared, pop, pop_half, lone):
    """Agent 1 ends where a lone run with seed 3 + 1 ends (so the agents are
    neither mixed up nor given the population's seed). --eval-every: each
    agent's rows get its own score, as it would alone."""
    assert pop.global_step == 1200  # env steps per agent
    got = rows(shared / "pop")
    assert [r["agent"] for r in got[:2]] == ["0", "1"] and len(got) == 2 * 12
    cfg = json.loads((shared / "pop" / "config.json").read_text())
    assert cfg["num_agents"] == 2 and cfg["scale_out"]["num_agents"] == 2
    assert [(r["global_step"], r["agent"]) for r in got if r["eval_return"]] == [("1200", "0"), ("1200", "1")]
    for k in range(2):
        score = float(got[-2 + k]["eval_return"])
        assert score == pytest.approx(final_eval_return(shared / "pop" / "agents" / str(k), seed=3 + k), rel=1e-6)

    # agent 1 of the population at 800 steps == the lone run with seed 4 (its first 800 steps)
    half = shared / "pop_half"
    agent = load_policy(half / "agents" / "1")
    assert agent.config["seed"] == 4 and agent.config["num_agents"] == 1
    alone = params(lone)
    assert_close([np.asarray(x) for x in jax.tree.leaves(agent.params)], alone)
    assert_close([np.asarray(x)[1] for x in jax.tree.leaves(pop_half.state.params)], alone)  # the stacked state
    solo, mine = rows(shared / "lone")[:8], [r for r in rows(half) if r["agent"] == "1"]
    assert [r["episodes"] for r in mine] == [r["episodes"] for r in solo]
    assert [r["global_step"] for r in mine] == [r["global_step"] for r in solo]
    for col in ("loss", "q_mean", "epsilon", "buffer_size"):
        np.testing.assert_allclose(floats(mine, col), floats(solo, col), rtol=1e-4, atol=1e-6)
    a0, a1 = params_of(shared / "pop" / "agents" / "0"), params_of(shared / "pop" / "agents" / "1")
    assert any(not np.allclose(x, y, atol=1e-4) for x, y in zip(a0, a1))


def test_dqn_sweep_matches_agents_trained_alone(tmp_path):
    pop = tmp_path / "sweep"
    train(pop, sweep="learning_rate=1e-3,3e-3")
    cfg = json.loads((pop / "config.json").read_text())
    assert cfg["num_agents"] == 2 and cfg["scale_out"]["sweep"] == {"name": "learning_rate", "values": [1e-3, 3e-3]}
    for k, lr in enumerate((1e-3, 3e-3)):
        agent = load_policy(pop / "agents" / str(k))
        assert agent.config["learning_rate"] == lr and agent.config["seed"] == 1 + k
    # Agent 0 alone (the population test checks agent 1): the sweep's first value, the base seed.
    alone = train(tmp_path / "lr0", learning_rate=1e-3, seed=1)
    assert_close(params_of(pop / "agents" / "0"), params(alone))


def test_dqn_population_resume_is_exact(shared, pop, pop_half, tmp_path):
    """Half the run, then --resume (buffers in the checkpoint, env actions replayed): same as one go."""
    d = tmp_path / "resumed"
    shutil.copytree(shared / "pop_half", d)
    resumed = driver.train(dqn.ALGORITHM, configs.cli(dqn.Config,
                                   argv=["--resume", str(d), "--total-timesteps", "1200"]))
    for x, y in zip(jax.tree.leaves(pop.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    drop = ("wall_time", "sps", "eval_return")  # the half evaluated at its end
    got, want = rows(d), rows(shared / "pop")
    assert strip(got, drop) == strip(want, drop)
    assert [r["eval_return"] for r in got[-2:]] == [r["eval_return"] for r in want[-2:]]
    assert load_policy(d / "agents" / "1").meta["step"] == 1200


def test_bad_population_flags_are_named(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"--num-agents 0 is not accepted"):
        dqn.resolve(dqn.Config(**dict(TINY, num_agents=0)))
    with pytest.raises(parallel.ParallelError, match=r"--sweep 'tau' .* learning_rate, gamma"):
        train(tmp_path / "bad", sweep="tau=0.5,1.0")
    with pytest.raises(parallel.ParallelError, match=r"3 values for gamma but --num-agents is 2"):
        train(tmp_path / "bad", sweep="gamma=0.9,0.95,0.99", num_agents=2)
    with pytest.raises(parallel.ParallelError, match=r"--learning-rate -0.001 is not accepted: it must be > 0"):
        train(tmp_path / "bad", sweep="learning_rate=1e-3,-1e-3")
    assert set(dqn.ALGORITHM.sweepable) <= set(dqn.ALGORITHM.ranges)
