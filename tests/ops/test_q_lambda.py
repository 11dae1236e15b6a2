"""Q(lambda) targets against a plain NumPy loop of the recursion (purejaxql's form)."""

import numpy as np
import pytest

from jaxatari.ops import q_lambda_returns


def numpy_q_lambda(rewards, q_max, dones, last_q_max, gamma, lam, truncations=None):
    """G_t = r_t + gamma (1 - d_t) [(1 - lam) Q*_{t+1} + lam G_{t+1}]; terminal: r_t; truncated: r_t + gamma Q*_{t+1}."""
    T, B = rewards.shape
    out = np.zeros((T, B))
    for b in range(B):
        g, q_next = last_q_max[b], last_q_max[b]
        for t in reversed(range(T)):
            if truncations is not None and truncations[t, b]:
                g = rewards[t, b] + gamma * q_next
            elif dones[t, b]:
                g = rewards[t, b]
            else:
                g = rewards[t, b] + gamma * ((1 - lam) * q_next + lam * g)
            out[t, b] = g
            q_next = q_max[t, b]
    return out


@pytest.mark.parametrize("lam", [0.0, 0.65, 1.0])
@pytest.mark.parametrize("with_truncations", [False, True])
def test_matches_numpy_loop(lam, with_truncations):
    rng = np.random.default_rng(1)
    T, B = 10, 4
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    q_max = rng.normal(size=(T, B)).astype(np.float32)
    last = rng.normal(size=(B,)).astype(np.float32)
    dones = np.zeros((T, B), bool)
    dones[2, 0] = dones[9, 1] = dones[0, 2] = dones[5, 3] = True  # ends inside and at both edges
    truncations = None
    if with_truncations:
        truncations = np.zeros((T, B), bool)
        truncations[5, 3] = truncations[6, 0] = True
        dones = dones | truncations  # jaxatari's dones include the truncations
    got = q_lambda_returns(rewards, q_max, dones, last, gamma=0.9, q_lambda=lam, truncations=truncations)
    want = numpy_q_lambda(rewards, q_max, dones, last, 0.9, lam, truncations)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_one_step_q_learning():
    r = np.array([[1.0], [2.0]], np.float32)
    q = np.array([[0.0], [10.0]], np.float32)
    got = q_lambda_returns(r, q, np.zeros((2, 1), bool), np.array([20.0], np.float32), gamma=0.5, q_lambda=0.0)
    np.testing.assert_allclose(np.asarray(got)[:, 0], [1.0 + 0.5 * 10.0, 2.0 + 0.5 * 20.0])
