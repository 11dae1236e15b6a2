"""Returns and advantages, time-major ``[T, B]``.

Convention shared by every function here (the EnvPool convention of
:mod:`jaxatari.envs`): ``rewards[t]`` and ``dones[t]`` are the outcome of the
action taken at step ``t``; ``values[t] = V(obs_t)``; ``last_value = V(obs_T)``.
``dones[t]`` ends the episode after step ``t``: nothing flows from ``t + 1`` back
to ``t``.

Time-limit truncation. ``truncations[t]`` marks episodes cut by a time limit
rather than terminated. There the bootstrap is *kept*: with EnvPool the
observation after a truncated step is the true final observation, so
``V(obs_{t+1})`` is the right bootstrap. ``dones`` may include the truncations
(jaxatari's ``dones = terminated | truncated``) or not (gymnasium's split,
``dones = terminated``): either way an episode ends at ``dones | truncations``,
and a step flagged in ``truncations`` bootstraps. So with gymnasium's split
pass ``truncations = truncated & ~terminated`` if both flags can be set on one
step (such a step is terminal).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _check(rewards, dones, last_value, truncations, values=None):
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, dones])
    chex.assert_shape(last_value, rewards.shape[1:])
    if values is not None:
        chex.assert_equal_shape([rewards, values])
    if truncations is not None:
        chex.assert_equal_shape([rewards, truncations])


def _ends_and_bootstrap(dones, truncations, dtype):
    """``(ended, bootstrap)`` factors ``[T, B]``: ``ended = dones | truncations``
    cuts the recursion; ``bootstrap = 1 - ended + truncations`` keeps
    ``V(obs_{t+1})`` after a truncated step only."""
    d = dones.astype(dtype)
    if truncations is None:
        return d, 1.0 - d
    tau = truncations.astype(dtype)
    ended = jnp.maximum(d, tau)
    return ended, 1.0 - ended + tau


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    *,
    gamma: float,
    gae_lambda: float,
    truncations: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    .. math::
        \delta_t = r_t + \gamma (1 - d_t) V_{t+1} - V_t, \qquad
        A_t = \delta_t + \gamma \lambda (1 - d_t) A_{t+1}, \qquad
        R_t = A_t + V_t

    with :math:`V_T` = ``last_value`` and :math:`A_T = 0`. With ``truncations``
    the bootstrap term of :math:`\delta_t` uses :math:`(1 - d_t + \tau_t)`: a
    truncated step still bootstraps from :math:`V_{t+1}`, while the recursion
    is cut at every done.

    Args:
      rewards: ``[T, B]`` float.
      values: ``[T, B]`` float, ``V(obs_t)``.
      dones: ``[T, B]`` bool/float, episode ended after step t.
      last_value: ``[B]``, ``V(obs_T)``.
      gamma: discount.
      gae_lambda: GAE lambda.
      truncations: optional ``[T, B]``, time-limit truncations (within
        ``dones`` or not, see the module docstring).

    Returns:
      ``(advantages [T, B], returns [T, B])``.
    """
    _check(rewards, dones, last_value, truncations, values)
    dtype = jnp.promote_types(values.dtype, jnp.float32)  # integer values are promoted, not scanned as ints
    values, last_value = values.astype(dtype), last_value.astype(dtype)
    d, boot = _ends_and_bootstrap(dones, truncations, dtype)
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    deltas = rewards.astype(dtype) + gamma * boot * next_values - values

    def body(acc, x):
        delta, done = x
        acc = delta + gamma * gae_lambda * (1.0 - done) * acc
        return acc, acc

    _, adv = jax.lax.scan(body, jnp.zeros_like(last_value, dtype), (deltas, d), reverse=True)
    return adv, adv + values


def n_step_returns(
    rewards: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    *,
    gamma: float,
    truncations: jax.Array | None = None,
    values: jax.Array | None = None,
) -> jax.Array:
    r"""Bootstrapped n-step returns over the rollout (as in A2C, Mnih et al. 2016).

    .. math::
        \hat v(s_t) = \sum_{k=0}^{T-t-1} \gamma^k r_{t+k} + \gamma^{T-t} V(s_T),

    cut at episode ends: :math:`G_t = r_t + \gamma (1 - d_t) G_{t+1}`,
    :math:`G_T` = ``last_value``. With ``truncations`` (which needs ``values``),
    a truncated step bootstraps from :math:`V_{t+1}` instead:
    :math:`G_t = r_t + \gamma \tau_t V_{t+1}`. Equal to the returns of
    :func:`gae` with ``gae_lambda = 1``.

    Args:
      rewards, dones: ``[T, B]``.
      last_value: ``[B]``, ``V(obs_T)``.
      truncations, values: optional ``[T, B]`` each.

    Returns:
      ``returns [T, B]``.
    """
    _check(rewards, dones, last_value, truncations, values)
    if truncations is not None and values is None:
        raise ValueError("n_step_returns: truncations need values (V(obs_t)) to bootstrap from.")
    dtype = jnp.promote_types(last_value.dtype, jnp.float32)
    last_value = last_value.astype(dtype)
    d, _ = _ends_and_bootstrap(dones, truncations, dtype)
    if truncations is None:
        trunc_boot = jnp.zeros_like(rewards, dtype)
    else:
        next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
        trunc_boot = gamma * truncations.astype(dtype) * next_values

    def body(acc, x):
        r, done, tb = x
        acc = r + gamma * (1.0 - done) * acc + tb
        return acc, acc

    _, ret = jax.lax.scan(body, last_value, (rewards.astype(dtype), d, trunc_boot), reverse=True)
    return ret


def q_lambda_returns(
    rewards: jax.Array,
    q_max: jax.Array,
    dones: jax.Array,
    last_q_max: jax.Array,
    *,
    gamma: float,
    q_lambda: float,
    truncations: jax.Array | None = None,
) -> jax.Array:
    r"""Peng's Q(lambda) targets over a rollout, as PQN learns from (Gallici et al.
    2024, "Simplifying Deep Temporal Difference Learning", arXiv:2407.04811).

    .. math::
        G_t = r_t + \gamma (1 - d_t) \left[(1 - \lambda) \max_a Q(s_{t+1}, a)
              + \lambda G_{t+1}\right], \qquad G_T = \max_a Q(s_T, a)

    A terminal step gives :math:`G_t = r_t`; a truncated one bootstraps fully,
    :math:`G_t = r_t + \gamma \max_a Q(s_{t+1}, a)`. These are the returns of
    :func:`gae` with :math:`V = \max_a Q` and :math:`\lambda` = ``q_lambda``.

    Args:
      rewards, dones: ``[T, B]``.
      q_max: ``[T, B]``, :math:`\max_a Q(s_t, a)` under the acting parameters.
      last_q_max: ``[B]``, :math:`\max_a Q(s_T, a)`.
      truncations: optional ``[T, B]``, time-limit truncations (module docstring).

    Returns:
      ``returns [T, B]``.
    """
    _, returns = gae(rewards, q_max, dones, last_q_max, gamma=gamma, gae_lambda=q_lambda, truncations=truncations)
    return returns
