"""GAE against a plain NumPy loop, with episode ends and truncations inside the rollout."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari.ops import gae


def numpy_gae(rewards, values, dones, last_value, gamma, lam, truncations=None):
    T, B = rewards.shape
    adv = np.zeros((T, B))
    for b in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            v_next = last_value[b] if t == T - 1 else values[t + 1, b]
            boot = 1.0 - dones[t, b]
            if truncations is not None and truncations[t, b]:
                boot = 1.0
            delta = rewards[t, b] + gamma * boot * v_next - values[t, b]
            acc = delta + gamma * lam * (1.0 - dones[t, b]) * acc
            adv[t, b] = acc
    return adv, adv + values


@pytest.fixture
def rollout():
    rng = np.random.default_rng(0)
    T, B = 12, 3
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    values = rng.normal(size=(T, B)).astype(np.float32)
    dones = np.zeros((T, B), np.float32)
    dones[3, 0] = dones[7, 0] = dones[0, 1] = dones[11, 2] = 1.0  # ends inside and at the edges
    last = rng.normal(size=(B,)).astype(np.float32)
    return rewards, values, dones, last


class TestGae(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_loop(self):
        rng = np.random.default_rng(0)
        T, B = 12, 3
        rewards = rng.normal(size=(T, B)).astype(np.float32)
        values = rng.normal(size=(T, B)).astype(np.float32)
        dones = np.zeros((T, B), np.float32)
        dones[3, 0] = dones[7, 0] = dones[0, 1] = dones[11, 2] = 1.0
        last = rng.normal(size=(B,)).astype(np.float32)
        fn = self.variant(lambda r, v, d, l: gae(r, v, d, l, gamma=0.99, gae_lambda=0.95))
        adv, ret = fn(rewards, values, dones, last)
        ref_adv, ref_ret = numpy_gae(rewards, values, dones, last, 0.99, 0.95)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_but_cuts_recursion(rollout):
    rewards, values, dones, last = rollout
    trunc = np.zeros_like(dones)
    trunc[7, 0] = 1.0  # the done at t=7 of env 0 is a time limit
    adv, _ = gae(rewards, values, dones, last, gamma=0.9, gae_lambda=0.8, truncations=trunc)
    ref, _ = numpy_gae(rewards, values, dones, last, 0.9, 0.8, truncations=trunc)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    # Hand check at the truncated step: delta = r + gamma * V(s_8) - V(s_7), nothing from t=8 on.
    np.testing.assert_allclose(adv[7, 0], rewards[7, 0] + 0.9 * values[8, 0] - values[7, 0], rtol=1e-6)


def test_hand_computed_two_steps():
    # T=2, B=1, gamma=0.5, lambda=0.5, no dones:
    # delta_1 = 1 + 0.5*4 - 2 = 1;  delta_0 = 0 + 0.5*2 - 1 = 0
    # A_1 = 1;  A_0 = 0 + 0.25*1 = 0.25
    adv, ret = gae(jnp.array([[0.0], [1.0]]), jnp.array([[1.0], [2.0]]), jnp.zeros((2, 1)),
                   jnp.array([4.0]), gamma=0.5, gae_lambda=0.5)
    np.testing.assert_allclose(adv[:, 0], [0.25, 1.0])
    np.testing.assert_allclose(ret[:, 0], [1.25, 3.0])


def test_shape_checks():
    with pytest.raises(AssertionError):
        gae(jnp.zeros((4, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(2), gamma=0.9, gae_lambda=0.9)


@pytest.mark.parametrize("fn", ["gae", "n_step_returns"])
def test_gymnasium_split_of_terminated_and_truncated_gives_the_same_result(rollout, fn):
    """``dones = terminated`` with separate ``truncations`` (gymnasium's split)
    equals ``dones = terminated | truncated`` (jaxatari's): the truncated step
    bootstraps once (not twice) and ends the episode."""
    from jaxatari.ops import n_step_returns

    rewards, values, terminated, last = rollout
    truncated = np.zeros_like(terminated)
    truncated[5, 1] = truncated[11, 0] = 1.0  # time limits where nothing terminated
    both = np.maximum(terminated, truncated)

    def run(dones):
        if fn == "gae":
            return gae(rewards, values, dones, last, gamma=0.9, gae_lambda=0.8, truncations=truncated)[0]
        return n_step_returns(rewards, dones, last, gamma=0.9, truncations=truncated, values=values)

    np.testing.assert_allclose(run(terminated), run(both), rtol=1e-6, atol=1e-6)
    adv, _ = numpy_gae(rewards, values, both, last, 0.9, 0.8, truncations=truncated)
    if fn == "gae":
        np.testing.assert_allclose(run(terminated), adv, rtol=1e-5, atol=1e-5)


def test_integer_values_are_promoted_to_float():
    adv, ret = gae(jnp.array([[0.0], [1.0]]), jnp.array([[1], [2]]), jnp.zeros((2, 1)), jnp.array([4]),
                   gamma=0.5, gae_lambda=0.5)
    assert adv.dtype == jnp.float32
    np.testing.assert_allclose(adv[:, 0], [0.25, 1.0])
