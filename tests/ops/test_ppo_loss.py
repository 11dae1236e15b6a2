"""The PPO loss against hand-computed values."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxatari.ops import A2CBatch, PPOBatch, a2c_loss, categorical_entropy, masked_mean, ppo_loss, standardize


def fixed_apply(logits, values):
    """An 'network' that returns fixed outputs, so the loss is computed by hand."""
    return lambda params, batch: (logits * params["scale"], values)


def test_hand_computed():
    # Two samples, two actions. New policy logits [0, 0] -> pi = [0.5, 0.5].
    logits = jnp.zeros((2, 2))
    values = jnp.array([1.0, 0.0])
    old_logp = jnp.log(jnp.array([0.25, 0.8]))  # ratio = 0.5/0.25 = 2, 0.5/0.8 = 0.625
    batch = PPOBatch(
        obs=jnp.zeros((2, 1)), actions=jnp.array([0, 1]), log_probs=old_logp,
        values=jnp.array([0.5, 0.5]), advantages=jnp.array([1.0, -1.0]),
        returns=jnp.array([2.0, 0.0]), mask=jnp.ones(2),
    )
    loss, info = ppo_loss({"scale": 1.0}, batch, apply_fn=fixed_apply(logits, values), clip_eps=0.2,
                          vf_coef=0.5, ent_coef=0.01, clip_value=True, normalize_advantages=False)
    # policy: sample 0: min(2*1, 1.2*1) = 1.2; sample 1: min(0.625*-1, 0.8*-1) = -0.8 -> -(1.2-0.8)/2 = -0.2
    np.testing.assert_allclose(info.policy_loss, -0.2, rtol=1e-6)
    # value, clipped: s0: (1-2)^2=1 vs (0.5+0.2-2)^2=1.69 -> 1.69; s1: (0-0)^2=0 vs (0.5-0.2-0)^2=0.09 -> 0.09
    np.testing.assert_allclose(info.value_loss, 0.5 * (1.69 + 0.09) / 2, rtol=1e-6)
    np.testing.assert_allclose(info.entropy, np.log(2.0), rtol=1e-6)
    # approx kl = mean((r-1) - log r) ; clip fraction: both ratios outside [0.8, 1.2]
    kl = ((2 - 1) - np.log(2) + (0.625 - 1) - np.log(0.625)) / 2
    np.testing.assert_allclose(info.approx_kl, kl, rtol=1e-5)
    np.testing.assert_allclose(info.clip_fraction, 1.0)
    np.testing.assert_allclose(loss, -0.2 + 0.5 * 0.89 / 2 * 1.0 - 0.01 * np.log(2), rtol=1e-5)


def test_min_and_max_keep_the_unclipped_term_when_it_is_worse():
    """The pessimistic bound: where the unclipped surrogate is the smaller one (ratio > 1 + eps with A < 0,
    ratio < 1 - eps with A > 0), or the unclipped value error the larger one, the loss keeps it. Catches a
    loss that uses only the clipped terms (the min or the max dropped)."""
    batch = PPOBatch(  # new policy pi = (1/2, 1/2) in both samples
        obs=jnp.zeros((2, 1)), actions=jnp.array([0, 1]), log_probs=jnp.log(jnp.array([0.25, 1.0])),
        values=jnp.array([0.5, 0.5]), advantages=jnp.array([-1.0, 1.0]), returns=jnp.array([0.0, 1.0]),
        mask=jnp.ones(2))
    apply_fn = fixed_apply(jnp.zeros((2, 2)), jnp.array([1.0, 0.0]))
    # s0: ratio 2,   A = -1: min(2 * -1, 1.2 * -1)  = -2   (unclipped); V 1 -> R 0: max(1^2, (0.7 - 0)^2) = 1
    # s1: ratio 0.5, A = +1: min(0.5 * 1, 0.8 * 1)  = 0.5  (unclipped); V 0 -> R 1: max(1^2, (0.3 - 1)^2) = 1
    for mask, policy_loss in (([1.0, 0.0], 2.0), ([0.0, 1.0], -0.5)):
        _, info = ppo_loss({"scale": 1.0}, batch._replace(mask=jnp.array(mask)), apply_fn=apply_fn, clip_eps=0.2,
                           vf_coef=0.5, ent_coef=0.0, normalize_advantages=False)
        np.testing.assert_allclose(info.policy_loss, policy_loss, rtol=1e-6)
        np.testing.assert_allclose(info.value_loss, 0.5 * 1.0, rtol=1e-6)


def test_mask_excludes_samples():
    logits = jnp.zeros((3, 2))
    values = jnp.zeros(3)
    base = dict(obs=jnp.zeros((3, 1)), actions=jnp.array([0, 1, 0]), log_probs=jnp.log(jnp.full(3, 0.5)),
                values=jnp.zeros(3), returns=jnp.array([1.0, 2.0, 1000.0]))
    masked = PPOBatch(**base, advantages=jnp.array([1.0, 2.0, 1e6]), mask=jnp.array([1.0, 1.0, 0.0]))
    two = PPOBatch(**{k: v[:2] for k, v in base.items()}, advantages=jnp.array([1.0, 2.0]), mask=jnp.ones(2))
    kw = dict(clip_eps=0.1, vf_coef=0.5, ent_coef=0.01)
    l3, _ = ppo_loss({"scale": 1.0}, masked, apply_fn=fixed_apply(logits, values), **kw)
    l2, _ = ppo_loss({"scale": 1.0}, two, apply_fn=fixed_apply(logits[:2], values[:2]), **kw)
    np.testing.assert_allclose(l3, l2, rtol=1e-6)


def _constant_advantage_batch(n, advantage, valid):
    rng = np.random.default_rng(0)
    return PPOBatch(
        obs=jnp.asarray(rng.normal(size=(n, 3)), jnp.float32), actions=jnp.asarray(rng.integers(0, 4, n)),
        log_probs=jnp.zeros(n), values=jnp.zeros(n), returns=jnp.zeros(n),
        advantages=jnp.where(jnp.arange(n) < valid, advantage, 1e6).astype(jnp.float32),  # garbage where masked
        mask=(jnp.arange(n) < valid).astype(jnp.float32))


def test_constant_advantages_give_no_policy_gradient():
    """A minibatch whose advantages are all equal carries no signal: normalised, they
    are 0, not the +-1 a one-pass mean's rounding error would make of them."""
    def apply_fn(p, b):
        out = b.obs @ p["w"]
        return out - jax.lax.stop_gradient(out), out[:, 0] * 0  # uniform policy (ratio 1/4), with gradients

    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)}
    kw = dict(apply_fn=apply_fn, clip_eps=0.2, vf_coef=0.0, ent_coef=0.0)
    for c in (0.1, 3.7, -3.7, 123.4):
        batch = _constant_advantage_batch(777, c, valid=700)
        loss, info = ppo_loss(params, batch, **kw)
        grads = jax.grad(lambda p: ppo_loss(p, batch, **kw)[0])(params)
        assert float(info.policy_loss) == 0.0 and float(jnp.abs(grads["w"]).max()) == 0.0, c
    # and the normalisation is still (x - mean) / std on real data
    x = jnp.asarray(np.random.default_rng(2).normal(5.0, 2.0, 300), jnp.float32)
    np.testing.assert_allclose(standardize(x, lambda v: v.mean()), (x - x.mean()) / x.std(), atol=2e-6)


def test_masked_out_nan_and_impossible_actions_stay_finite():
    assert float(masked_mean(jnp.array([1.0, jnp.nan, 3.0]), jnp.array([1.0, 0.0, 1.0]))) == 2.0
    assert float(masked_mean(jnp.array([2.0, jnp.inf]), jnp.array([0.5, 0.0]))) == 1.0  # a weight, not a flag
    logits = jnp.array([[0.0, -jnp.inf, 0.0], [1.0, 2.0, 3.0]])
    ent = categorical_entropy(logits)
    np.testing.assert_allclose(ent[0], np.log(2.0), rtol=1e-6)  # two equally likely legal actions
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(ent[1], -(p * np.log(p)).sum(), rtol=1e-6)
    assert np.isfinite(jax.grad(lambda x: categorical_entropy(x).sum())(logits)).all()


def test_nan_in_masked_out_samples_reaches_neither_loss_nor_gradient():
    rng = np.random.default_rng(3)
    n, valid = 6, jnp.arange(6) < 4
    nan_where_masked = lambda x: jnp.where(valid, jnp.asarray(x, jnp.float32), jnp.nan)  # noqa: E731
    obs = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}

    def apply_fn(p, b):
        out = b.obs @ p["w"]
        return out[:, :4], out[:, 4]

    ppo = PPOBatch(obs=obs, actions=jnp.asarray(rng.integers(0, 4, n)), mask=valid,
                   log_probs=nan_where_masked(rng.normal(size=n) - 1.5), values=nan_where_masked(rng.normal(size=n)),
                   advantages=nan_where_masked(rng.normal(size=n)), returns=nan_where_masked(rng.normal(size=n)))
    a2c = A2CBatch(obs=obs, actions=ppo.actions, advantages=ppo.advantages, targets=ppo.returns, mask=valid)
    for loss_fn, batch in ((functools.partial(ppo_loss, clip_eps=0.2, vf_coef=0.5, ent_coef=0.01), ppo),
                           (functools.partial(a2c_loss, vf_coef=0.5, ent_coef=0.01), a2c)):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, apply_fn=apply_fn)[0])(params)
        clean = jax.tree.map(lambda x: x[:4] if x.ndim and x.shape[0] == n else x, batch)
        ref, _ = loss_fn(params, clean, apply_fn=apply_fn)  # the same loss on the valid samples alone
        np.testing.assert_allclose(loss, ref, rtol=1e-5)
        assert np.isfinite(grads["w"]).all()


class TestJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_agrees(self):
        rng = np.random.default_rng(1)
        batch = PPOBatch(
            obs=jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), actions=jnp.asarray(rng.integers(0, 4, 8)),
            log_probs=jnp.asarray(rng.normal(size=8) - 1.5, jnp.float32),
            values=jnp.asarray(rng.normal(size=8), jnp.float32),
            advantages=jnp.asarray(rng.normal(size=8), jnp.float32),
            returns=jnp.asarray(rng.normal(size=8), jnp.float32), mask=jnp.ones(8))
        params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}

        def apply_fn(p, b):
            out = b.obs @ p["w"]
            return out[:, :4], out[:, 4]

        fn = self.variant(functools.partial(ppo_loss, apply_fn=apply_fn, clip_eps=0.2, vf_coef=0.5, ent_coef=0.01))
        loss, info = fn(params, batch)
        ref, _ = ppo_loss(params, batch, apply_fn=apply_fn, clip_eps=0.2, vf_coef=0.5, ent_coef=0.01)
        np.testing.assert_allclose(loss, ref, rtol=1e-6)
        grads = jax.grad(lambda p: fn(p, batch)[0])(params)
        assert np.isfinite(grads["w"]).all()
