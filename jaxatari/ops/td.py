"""Temporal-difference targets and losses for Q-learning, as pure functions.

Naming follows rlax: ``q_tm1`` are the online network's Q-values at the state
the action was taken in, ``a_tm1`` that action, ``r_t`` the (n-step) reward
sum, ``discount_t`` the (n-step) discount and ``q_t`` Q-values at the state to
bootstrap from. Every array is batch-major ``[N]`` / ``[N, A]``.

The discount carries the episode structure: ``discount_t = gamma^n' (1 -
terminated)`` is 0 after a real terminal and stays ``gamma^n'`` on a time-limit
truncation (bootstrap kept) -- exactly what :func:`jaxatari.replay.gather`
returns in ``Batch.discounts``, where ``n' <= n`` is the number of rewards
summed. n-step returns are therefore plain ``q_learning_target`` with the
buffer's ``rewards``/``discounts``; nothing here depends on ``n``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

LOSSES = ("huber", "mse")


def _select(q: jax.Array, a: jax.Array) -> jax.Array:
    """``q[i, a[i]]`` for ``q [N, A]``, ``a [N]``."""
    chex.assert_rank(q, 2)
    chex.assert_shape(a, q.shape[:1])
    return jnp.take_along_axis(q, a[:, None].astype(jnp.int32), axis=-1)[:, 0]


def q_learning_target(r_t: jax.Array, discount_t: jax.Array, q_t: jax.Array) -> jax.Array:
    r"""The Q-learning (DQN) target (Watkins 1989; Mnih et al. 2015, Nature 518).

    .. math::
        y = r_t + \gamma_t \max_a Q_{\bar\theta}(s_t, a)

    with :math:`\gamma_t` = ``discount_t`` (0 at a terminal) and ``q_t`` the
    *target* network's Q-values at :math:`s_t`. With n-step ``r_t`` (a
    discounted reward sum) and ``discount_t = gamma^n`` this is the n-step
    target of Hessel et al. (2018, Rainbow).

    Args:
      r_t: ``[N]`` rewards (or n-step discounted reward sums).
      discount_t: ``[N]`` discounts (``gamma^n'``, 0 after a terminal).
      q_t: ``[N, A]`` target-network Q-values at the bootstrap state.

    Returns:
      ``[N]`` targets (no gradient flows through them: ``stop_gradient``).
    """
    chex.assert_rank([r_t, discount_t, q_t], [1, 1, 2])
    chex.assert_equal_shape([r_t, discount_t])
    chex.assert_equal_shape_prefix([r_t, q_t], 1)
    y = r_t + discount_t * jnp.max(q_t, axis=-1)
    return jax.lax.stop_gradient(y)


def double_q_learning_target(
    r_t: jax.Array, discount_t: jax.Array, q_t_value: jax.Array, q_t_selector: jax.Array
) -> jax.Array:
    r"""The Double DQN target (van Hasselt, Guez & Silver 2016, arXiv:1509.06461).

    The online network selects the bootstrap action, the target network values it:

    .. math::
        y = r_t + \gamma_t Q_{\bar\theta}(s_t, \arg\max_a Q_\theta(s_t, a))

    Args:
      r_t: ``[N]`` rewards (or n-step discounted reward sums).
      discount_t: ``[N]`` discounts (0 after a terminal).
      q_t_value: ``[N, A]`` target-network Q-values at the bootstrap state.
      q_t_selector: ``[N, A]`` online-network Q-values at the bootstrap state.

    Returns:
      ``[N]`` targets (``stop_gradient``-ed). Ties in the argmax go to the
      lowest action index.
    """
    chex.assert_rank([r_t, discount_t, q_t_value, q_t_selector], [1, 1, 2, 2])
    chex.assert_equal_shape([r_t, discount_t])
    chex.assert_equal_shape([q_t_value, q_t_selector])
    a_star = jnp.argmax(q_t_selector, axis=-1)
    y = r_t + discount_t * _select(q_t_value, a_star)
    return jax.lax.stop_gradient(y)


def td_loss(td_error: jax.Array, *, loss: str = "huber", huber_delta: float = 1.0) -> jax.Array:
    r"""Elementwise loss of a TD error :math:`\delta = Q_\theta(s, a) - y`.

    * ``huber`` (Huber 1964; the error clipping of Mnih et al. 2015):
      :math:`\tfrac12 \delta^2` for :math:`|\delta| \le \kappa`, else
      :math:`\kappa (|\delta| - \tfrac12 \kappa)`, with :math:`\kappa` =
      ``huber_delta`` (``optax.huber_loss``). Its gradient is :math:`\delta`
      clipped to :math:`[-\kappa, \kappa]`.
    * ``mse``: :math:`\delta^2`, the plain squared error (no 1/2), as in the
      PyTorch ``MSELoss`` and CleanRL DQNs; its gradient is :math:`2\delta`.

    Args:
      td_error: ``[...]`` TD errors.

    Returns:
      ``[...]`` losses.
    """
    if loss == "huber":
        return optax.huber_loss(td_error, delta=huber_delta)
    if loss == "mse":
        return jnp.square(td_error)
    raise ValueError(f"loss={loss!r} is not accepted; use one of {', '.join(LOSSES)}.")


class DQNBatch(NamedTuple):
    """A Q-learning minibatch of ``N`` (n-step) transitions, e.g. a
    :class:`jaxatari.replay.Batch`: ``o_tm1 -> a_tm1 -> (r_t, discount_t, o_t)``."""

    obs: jax.Array
    """``[N, ...]`` observations the actions were taken in."""
    actions: jax.Array
    """``[N]`` int actions."""
    rewards: jax.Array
    """``[N]`` (n-step discounted sums of) rewards."""
    discounts: jax.Array
    """``[N]`` ``gamma^n'``, 0 after a real terminal."""
    next_obs: jax.Array
    """``[N, ...]`` observations to bootstrap from."""


class DQNLossInfo(NamedTuple):
    q_mean: jax.Array
    """Mean of ``Q_theta(s, a)`` over the batch."""
    target_mean: jax.Array
    """Mean of the TD targets ``y``."""
    td_abs_mean: jax.Array
    """Mean absolute TD error."""


def dqn_loss(
    params,
    target_params,
    batch: Any,
    *,
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    double_q: bool = False,
    loss: str = "huber",
    huber_delta: float = 1.0,
) -> tuple[jax.Array, DQNLossInfo]:
    r"""The DQN loss (Mnih et al. 2015) on a batch of (n-step) transitions.

    .. math::
        L(\theta) = \mathbb{E}_{(s, a, r, \gamma, s') \sim \mathcal{D}}
            \big[\ell\big(Q_\theta(s, a) - y\big)\big]

    with :math:`y` the :func:`q_learning_target` (or, with ``double_q``, the
    :func:`double_q_learning_target`) computed from ``target_params``
    (:math:`\bar\theta`) and treated as a constant, and :math:`\ell` the
    :func:`td_loss` ``loss``.

    Args:
      params: online network parameters :math:`\theta` (differentiated).
      target_params: target network parameters :math:`\bar\theta`.
      batch: anything with the fields of :class:`DQNBatch` (e.g. a
        :class:`jaxatari.replay.Batch`).
      apply_fn: ``apply_fn(params, obs [N, ...]) -> q [N, A]``.
      double_q: use the Double DQN target.
      loss: ``huber`` or ``mse``, see :func:`td_loss`.
      huber_delta: the Huber threshold :math:`\kappa`.

    Returns:
      ``(loss, DQNLossInfo(q_mean, target_mean, td_abs_mean))``.
    """
    q_t_target = apply_fn(target_params, batch.next_obs)
    if double_q:  # one online pass over [obs; next_obs]
        n = batch.obs.shape[0]
        q_online = apply_fn(params, jnp.concatenate([batch.obs, batch.next_obs], axis=0))
        q_tm1, q_t_online = q_online[:n], q_online[n:]
        y = double_q_learning_target(batch.rewards, batch.discounts, q_t_target, q_t_online)
    else:
        q_tm1 = apply_fn(params, batch.obs)
        y = q_learning_target(batch.rewards, batch.discounts, q_t_target)
    q_a = _select(q_tm1, batch.actions)
    td = q_a - y
    value = td_loss(td, loss=loss, huber_delta=huber_delta).mean()
    return value, DQNLossInfo(q_mean=q_a.mean(), target_mean=y.mean(), td_abs_mean=jnp.abs(td).mean())
