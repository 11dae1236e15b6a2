"""Policy-gradient losses as pure functions of ``(params, batch)``.

Hyperparameters are keyword arguments; bind them with ``functools.partial``.
Every loss takes ``apply_fn(params, batch) -> (logits [..., A], values [...])``
so the same loss serves feed-forward and recurrent networks, and every batch
carries a ``mask`` (1 for real steps, 0 for EnvPool reset steps or padding)
that weights each sample.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

ApplyFn = Callable[[Any, Any], tuple[jax.Array, jax.Array]]


def all_finite(tree) -> jax.Array:
    """True if every floating-point leaf of ``tree`` is finite (no NaN or inf): a scalar bool."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)``: the mean of ``x`` over the samples
    where ``mask`` is set; ``x`` and ``mask`` have the same shape (a mask that
    would broadcast is refused: it would count each sample several times).
    Masked-out samples count as 0 whatever they hold (NaN and inf included) in the
    value; the gradient with respect to a NaN masked-out input is still NaN
    (``0 * NaN``), so the losses zero those inputs first."""
    chex.assert_equal_shape([x, mask])
    mask = mask.astype(x.dtype)
    return jnp.where(mask != 0, x * mask, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)


def _where_valid(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` where ``mask`` is set, 0 elsewhere: a masked-out sample's batch fields
    (padding, EnvPool reset steps) may hold anything, NaN included, without
    reaching the loss or, through ``0 * NaN`` in the backward pass, its gradient."""
    return jnp.where(mask != 0, x, jnp.zeros((), x.dtype))


def standardize(x: jax.Array, mean_fn: Callable[[jax.Array], jax.Array], eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / (std + eps)``, ``mean_fn(v)`` being the (masked) mean of ``v``
    that broadcasts against it (``lambda v: masked_mean(v, mask)``, a per-minibatch
    or a cross-device mean). Shape of ``x`` kept.

    The mean is corrected by a second pass over the centred values, so that a
    constant ``x`` gives exact zeros: one pass leaves every centred value equal
    to the same rounding error, whose std is that error, and normalises a
    minibatch without signal to +-1 (a full-strength policy gradient of
    arbitrary sign).
    """
    centred = x - mean_fn(x)
    centred = centred - mean_fn(centred)
    return centred / (jnp.sqrt(mean_fn(centred * centred)) + eps)


def weighted_loss(loss_fn: Callable) -> Callable:
    """``(params, batch, weight) -> (loss * weight, info * weight)`` for a
    masked-mean ``loss_fn(params, batch) -> (loss, info)``. With ``weight`` = the
    batch's valid samples over those of a larger batch it is made from, the
    weighted losses (and their gradients) sum to the larger batch's: the shards
    of a data-parallel step."""
    def fn(params, batch, weight):
        loss, info = loss_fn(params, batch)
        return loss * weight, jax.tree.map(lambda x: x * weight, info)

    return fn


def categorical_log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """``log pi(a | s)``: ``logits [*S, A]``, integer ``actions [*S]`` in
    ``[0, A)`` -> ``[*S]``. Actions outside ``[0, A)`` cannot be checked inside
    ``jit``: they give NaN (or wrap around, for -1)."""
    chex.assert_shape(actions, logits.shape[:-1])
    if not jnp.issubdtype(actions.dtype, jnp.integer):
        raise TypeError(f"actions must be integers (action indices), got dtype {actions.dtype}.")
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def categorical_entropy(logits: jax.Array) -> jax.Array:
    """``-sum_a pi(a) log pi(a)`` over the last axis: ``logits [*S, A]`` -> ``[*S]``.
    Actions of probability 0 (``-inf`` logits, e.g. masked illegal actions)
    contribute 0, with finite gradients."""
    logp = jax.nn.log_softmax(logits)
    p = jnp.exp(logp)
    return -(p * jnp.where(p > 0, logp, 0.0)).sum(-1)


class PPOBatch(NamedTuple):
    """A PPO minibatch; leading shape ``S`` (``[N]`` or ``[T, B]``), ``obs [*S, ...]``.

    ``extras`` holds what a recurrent ``apply_fn`` needs (initial state, episode
    starts); feed-forward networks ignore it.
    """

    obs: jax.Array  # [*S, *obs_shape], as the network takes them
    actions: jax.Array  # [*S] int, the actions taken
    log_probs: jax.Array  # [*S] float, log pi_old(a|s) of the policy that acted (behaviour policy)
    values: jax.Array  # [*S] float, V_old(s) when acting (the value clipping's centre)
    advantages: jax.Array  # [*S] float, e.g. from gae()
    returns: jax.Array  # [*S] float, the value targets (advantages + values for GAE)
    mask: jax.Array  # [*S] bool/float, 1 for real steps, 0 for EnvPool reset steps or padding
    extras: Any = None


class PPOLossInfo(NamedTuple):
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array


def ppo_loss(
    params,
    batch: PPOBatch,
    *,
    apply_fn: ApplyFn,
    clip_eps: float,
    vf_coef: float,
    ent_coef: float,
    clip_value: bool = True,
    normalize_advantages: bool = True,
) -> tuple[jax.Array, PPOLossInfo]:
    r"""Clipped-surrogate PPO loss (Schulman et al. 2017, arXiv:1707.06347).

    With :math:`\rho = \pi_\theta(a|s) / \pi_{old}(a|s)` and advantages
    :math:`A` (normalised per minibatch when ``normalize_advantages``):

    .. math::
        L^{clip} = -\mathbb{E}[\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon) A)]

        L^{V} = \tfrac12 \mathbb{E}[(V - R)^2]  \quad\text{or, clipped,}\quad
        \tfrac12 \mathbb{E}[\max((V - R)^2, (V_{old} + \mathrm{clip}(V - V_{old}, \pm\epsilon) - R)^2)]

        L = L^{clip} + c_V L^V - c_H \mathbb{E}[H(\pi_\theta(\cdot|s))]

    All expectations are means weighted by ``batch.mask``.

    Args:
      params: the network's parameters (differentiated).
      batch: a :class:`PPOBatch`.
      apply_fn: ``apply_fn(params, batch) -> (logits [*S, A], values [*S])``.
      clip_eps: :math:`\epsilon` of the ratio clipping (and of the value clipping).
      vf_coef, ent_coef: :math:`c_V`, :math:`c_H`.
      clip_value: clip the value loss around ``batch.values``.
      normalize_advantages: normalise the advantages over the (masked) minibatch.

    Returns:
      ``(loss, PPOLossInfo(policy_loss, value_loss, entropy, approx_kl, clip_fraction))``;
      ``approx_kl`` is the low-variance estimator :math:`\mathbb{E}[(\rho - 1) - \log\rho]`.
    """
    chex.assert_equal_shape([batch.actions, batch.log_probs, batch.values, batch.advantages,
                             batch.returns, batch.mask])
    logits, values = apply_fn(params, batch)
    chex.assert_equal_shape([values, batch.returns])
    mask = batch.mask.astype(jnp.float32)
    old_log_probs, old_values, adv, returns = (_where_valid(x, mask) for x in (
        batch.log_probs, batch.values, batch.advantages, batch.returns))

    log_prob = categorical_log_prob(logits, batch.actions)
    log_ratio = log_prob - old_log_probs
    ratio = jnp.exp(log_ratio)

    if normalize_advantages:
        adv = standardize(adv, lambda v: masked_mean(v, mask))
    pg1 = ratio * adv
    pg2 = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    policy_loss = -masked_mean(jnp.minimum(pg1, pg2), mask)

    v_err = (values - returns) ** 2
    if clip_value:
        v_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        v_err = jnp.maximum(v_err, (v_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(v_err, mask)

    entropy = masked_mean(categorical_entropy(logits), mask)
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy

    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask)
    return loss, PPOLossInfo(policy_loss, value_loss, entropy, approx_kl, clip_fraction)


class A2CBatch(NamedTuple):
    """An A2C batch; leading shape ``S``; ``targets`` are the value targets
    (n-step returns or GAE returns) and ``advantages`` are treated as constants."""

    obs: jax.Array  # [*S, *obs_shape]
    actions: jax.Array  # [*S] int
    advantages: jax.Array  # [*S] float
    targets: jax.Array  # [*S] float
    mask: jax.Array  # [*S] bool/float, 1 for real steps
    extras: Any = None


class A2CLossInfo(NamedTuple):
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array


def a2c_loss(
    params,
    batch: A2CBatch,
    *,
    apply_fn: ApplyFn,
    vf_coef: float,
    ent_coef: float,
) -> tuple[jax.Array, A2CLossInfo]:
    r"""Advantage actor-critic loss (Mnih et al. 2016, arXiv:1602.01783).

    .. math::
        L = -\mathbb{E}[\mathrm{sg}(A) \log\pi_\theta(a|s)]
            + c_V\, \mathbb{E}[(V_\theta(s) - \hat v)^2]
            - c_H\, \mathbb{E}[H(\pi_\theta(\cdot|s))]

    ``sg`` is stop-gradient; expectations are means weighted by ``batch.mask``.
    Note the value term is the plain mean squared error (no 1/2), as in the
    published A2C implementations with ``vf_coef = 0.25``/``0.5``.

    Args:
      params: the network's parameters (differentiated).
      batch: an :class:`A2CBatch`.
      apply_fn: ``apply_fn(params, batch) -> (logits [*S, A], values [*S])``.
      vf_coef, ent_coef: :math:`c_V`, :math:`c_H`.

    Returns:
      ``(loss, A2CLossInfo(policy_loss, value_loss, entropy))``.
    """
    chex.assert_equal_shape([batch.actions, batch.advantages, batch.targets, batch.mask])
    logits, values = apply_fn(params, batch)
    chex.assert_equal_shape([values, batch.targets])
    mask = batch.mask.astype(jnp.float32)
    log_prob = categorical_log_prob(logits, batch.actions)
    adv = jax.lax.stop_gradient(_where_valid(batch.advantages, mask))
    policy_loss = -masked_mean(adv * log_prob, mask)
    value_loss = masked_mean((values - jax.lax.stop_gradient(_where_valid(batch.targets, mask))) ** 2, mask)
    entropy = masked_mean(categorical_entropy(logits), mask)
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
    return loss, A2CLossInfo(policy_loss, value_loss, entropy)
