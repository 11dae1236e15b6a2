"""Exact resume, for every on-policy algorithm through the one driver: a run extended
by ``--resume`` equals one run straight through, metrics and params bit for bit.
(PPO's interrupted-and-resumed run: tests/test_resume.py; DQN's, with and without
its replay buffer: tests/agents/test_dqn.py.)"""

import csv
import dataclasses

import jax
import numpy as np
import pytest

from jaxatari.agents import a2c, pqn
from jaxatari.driver import train

# Without learning-rate annealing the learning problem does not depend on --total-timesteps, so a
# 2-chunk run equals a 1-chunk run resumed to 2 chunks; PQN's epsilon, which decays over a fraction of
# --total-timesteps, is held constant for the same reason.
CASES = {
    "a2c": (a2c, dict(chunk_steps=2000, anneal_lr=False), 2000),
    "pqn": (pqn, dict(chunk_steps=1024, anneal_lr=False, num_steps=32, start_e=0.2, end_e=0.2), 1024),
}


def rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in ("wall_time", "sps")} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_matches_uninterrupted(tmp_path, name):
    mod, kw, half = CASES[name]
    base = mod.Config(env="CartPole-v1", total_timesteps=2 * half, tensorboard=False, **kw)
    straight = train(mod.ALGORITHM, dataclasses.replace(base, run_dir=str(tmp_path / "a")))
    first = train(mod.ALGORITHM, dataclasses.replace(base, total_timesteps=half, run_dir=str(tmp_path / "b")))
    assert first.global_step == half
    resumed = train(mod.ALGORITHM, dataclasses.replace(base, resume=str(tmp_path / "b")))
    assert straight.global_step == resumed.global_step == 2 * half
    a, b = rows(tmp_path / "a" / "metrics.csv"), rows(tmp_path / "b" / "metrics.csv")
    assert len(a) > 2 and a == b
    for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(x, y)
