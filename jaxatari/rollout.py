"""The on-policy rollout shared by PPO and A2C (feed-forward or recurrent).

A rollout runs ``num_steps`` env steps inside ``lax.scan``: sample an action
from the policy, step EnvPool (``env.xla()`` or the host callback), update the
episode statistics. Everything is time-major ``[T, B, ...]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxatari import envs
from jaxatari.ops.losses import categorical_log_prob

PolicyFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, jax.Array, jax.Array]]


class Trajectory(NamedTuple):
    """``num_steps`` steps of ``B`` envs, every field ``[T, B]`` (``obs [T, B, ...]``).

    ``first[t]``: ``obs[t]`` starts an episode (recurrent state reset).
    ``valid[t]``: False on EnvPool reset steps (excluded from losses).
    ``dones = terminated | truncated``: the episode ended after step ``t``.
    """

    obs: jax.Array
    first: jax.Array
    valid: jax.Array
    actions: jax.Array
    log_probs: jax.Array
    values: jax.Array
    rewards: jax.Array
    terminated: jax.Array
    truncated: jax.Array

    @property
    def dones(self) -> jax.Array:
        return self.terminated | self.truncated


class EpisodeMetrics(NamedTuple):
    """Full-game episodes finished during a rollout: sums and count (scalars)."""

    return_sum: jax.Array
    length_sum: jax.Array
    count: jax.Array


def episode_metrics(outcomes: envs.EpisodeOutcome) -> EpisodeMetrics:
    """Reduce ``[T, B]`` outcomes to sums (host computes the means)."""
    d = outcomes.done
    return EpisodeMetrics(
        return_sum=jnp.where(d, outcomes.returns, 0.0).sum(),
        length_sum=jnp.where(d, outcomes.lengths, 0).sum(),
        count=d.sum(dtype=jnp.int32),
    )


def rollout(
    policy_fn: PolicyFn,
    params,
    carry,
    env_state: envs.EnvState,
    handle: jax.Array,
    step_fn: envs.StepFn,
    key: jax.Array,
    num_steps: int,
    env_index: jax.Array | None = None,
) -> tuple[jax.Array, envs.EnvState, Any, Trajectory, EpisodeMetrics]:
    """Collect ``num_steps`` steps with actions sampled from ``policy_fn``.

    Args:
      policy_fn: ``(params, carry, obs [1, B, ...], first [1, B]) -> (carry, logits [1, B, A], values [1, B])``.
      carry: the recurrent state at the rollout's start (``()`` if feed-forward).
      env_index: ``[B]`` global env indices. If given, env ``b`` samples with
        ``fold_in(key_t, env_index[b])`` (device-invariant sampling, see
        :mod:`jaxatari.parallel`); by default one key samples the whole batch.

    Returns:
      ``(handle, env_state, carry, trajectory, episode_metrics)`` where ``carry``
      is the state after the last step (to continue the next rollout).
    """

    def body(c, k):
        handle, env_state, carry = c
        carry, logits, value = policy_fn(params, carry, env_state.obs[None], env_state.first[None])
        logits, value = logits[0], value[0]
        if env_index is None:
            action = jax.random.categorical(k, logits)
        else:
            action = jax.vmap(lambda i, l: jax.random.categorical(jax.random.fold_in(k, i), l))(env_index, logits)
        log_prob = categorical_log_prob(logits, action)
        handle, env_state2, tr, outcome = envs.env_step(step_fn, handle, env_state, action.astype(jnp.int32))
        step = Trajectory(
            obs=tr.obs, first=tr.first, valid=tr.valid, actions=action.astype(jnp.int32),
            log_probs=log_prob, values=value, rewards=tr.reward,
            terminated=tr.terminated, truncated=tr.truncated,
        )
        return (handle, env_state2, carry), (step, outcome)

    keys = jax.random.split(key, num_steps)
    (handle, env_state, carry), (traj, outcomes) = jax.lax.scan(body, (handle, env_state, carry), keys)
    return handle, env_state, carry, traj, episode_metrics(outcomes)


def bootstrap_value(policy_fn: PolicyFn, params, carry, env_state: envs.EnvState) -> jax.Array:
    """``V(obs_T) [B]`` for the observation after the rollout."""
    _, _, value = policy_fn(params, carry, env_state.obs[None], env_state.first[None])
    return value[0]


def rollout_population(
    policy_fn: PolicyFn,
    params,
    carry,
    env_state: envs.EnvState,
    handle: jax.Array,
    step_fn: Callable,
    key: jax.Array,
    num_steps: int,
) -> tuple[jax.Array, envs.EnvState, Any, Trajectory, EpisodeMetrics]:
    """:func:`rollout` for ``K`` agents at once, every input and output with a
    leading agent axis (``key [K, 2]``, ``trajectory [K, T, B]``).

    The policy and the bookkeeping are vmapped over agents; the env step is one
    call of ``step_fn(handle, actions [K, B]) -> (handle, Timestep [K, B, ...])``
    on the joint EnvPool. Each agent samples exactly as :func:`rollout` would
    with its own key.
    """

    def act(p, c, o, f, k):
        c, logits, value = policy_fn(p, c, o[None], f[None])
        logits, value = logits[0], value[0]
        action = jax.random.categorical(k, logits)
        return c, action, categorical_log_prob(logits, action), value

    def bookkeep(state, action, ts):
        _, state2, tr, outcome = envs.env_step(lambda h, a: (h, ts), None, state, action)
        return state2, tr, outcome

    def body(c, k):
        handle, env_state, carry = c
        carry, action, log_prob, value = jax.vmap(act)(params, carry, env_state.obs, env_state.first, k)
        action = action.astype(jnp.int32)
        handle, ts = step_fn(handle, action)
        env_state2, tr, outcome = jax.vmap(bookkeep)(env_state, action, ts)
        step = Trajectory(
            obs=tr.obs, first=tr.first, valid=tr.valid, actions=action,
            log_probs=log_prob, values=value, rewards=tr.reward,
            terminated=tr.terminated, truncated=tr.truncated,
        )
        return (handle, env_state2, carry), (step, outcome)

    keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num_steps))(key), 0, 1)  # [T, K, 2]
    (handle, env_state, carry), (traj, outcomes) = jax.lax.scan(body, (handle, env_state, carry), keys)
    traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    outcomes = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outcomes)
    return handle, env_state, carry, traj, jax.vmap(episode_metrics)(outcomes)
