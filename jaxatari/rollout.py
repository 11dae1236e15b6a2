"""The on-policy pieces shared by PPO and A2C (feed-forward or recurrent).

A rollout runs ``num_steps`` env steps inside ``lax.scan``: sample an action
from the policy, step EnvPool (``env.xla()`` or the host callback), update the
episode statistics. Everything is time-major ``[T, B, ...]``. :class:`State`
and :func:`init_state` are the training state both agents keep;
:func:`device_rollout` is the rollout of their ``update`` inside ``shard_map``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from flax import struct

from jaxatari import envs, parallel
from jaxatari.networks import ActorCritic, init_actor_critic, initial_carry
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



# ---------------------------------------------------------------------------
# The state of an on-policy agent, and its rollout on one device's envs
# ---------------------------------------------------------------------------


@struct.dataclass
class State:
    """An on-policy agent's training state (PPO, A2C), checkpointed whole."""

    params: Any
    opt_state: Any
    env: envs.EnvState
    carry: Any  # recurrent state per env, () when feed-forward
    key: jax.Array
    update: jax.Array  # updates done so far (int32)


def init_state(ctx, env_state: envs.EnvState, key: jax.Array, optimizer, num_envs: int) -> State:
    """The state before update 0: fresh params of ``ctx.net_spec`` and their
    ``optimizer`` state, the envs' first observations and statistics
    ``env_state``, the zero recurrent state for ``num_envs`` envs, counter 0."""
    k_params, k_train = jax.random.split(key)
    _, params = init_actor_critic(ctx.net_spec, k_params, ctx.spec.obs_shape, ctx.spec.obs_dtype)
    return State(params=params, opt_state=optimizer.init(params), env=env_state,
                 carry=initial_carry(ctx.net_spec, num_envs), key=k_train, update=jnp.zeros((), jnp.int32))


def device_rollout(ctx, state: State, handle: jax.Array, key: jax.Array, num_steps: int):
    """:func:`rollout` of ``state``'s policy on this device's envs inside ``shard_map``
    (``ctx`` a :class:`jaxatari.algorithm.Context`): one sampling key per env
    (device-invariant). Returns ``(handle, env_state, carry, trajectory,
    episode_metrics, env_index)``, ``env_index [B/N]`` the envs' global indices;
    ``env_state`` keeps its per-device count as a scalar (:func:`jaxatari.parallel.env_state_in`)."""
    env_index = parallel.env_index(ctx.local_envs)
    out = rollout(ActorCritic(ctx.net_spec).apply, state.params, state.carry, parallel.env_state_in(state.env),
                  handle, ctx.step_fn, key, num_steps, env_index=env_index)
    return (*out, env_index)
