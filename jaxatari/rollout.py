"""The on-policy rollout shared by PPO and A2C (feed-forward or recurrent).

A rollout runs ``num_steps`` env steps inside ``lax.scan``: sample an action
from the policy, step EnvPool (``env.xla()`` or the host callback), update the
episode statistics. Everything is time-major ``[T, B, ...]``.

Pipelined acting. With :class:`jaxatari.envs.EnvGroups` (``--env-groups G``)
the envs are ``G`` pools stepped in turn: receive group ``g``'s observations,
act for it, send its actions, then the same for group ``g + 1`` while group
``g`` emulates. The emulator's time then overlaps the policy's (on a GPU, or
wherever the two do not share the same cores). Every env still takes exactly
the actions a one-pool rollout with per-env sampling keys (``env_index``)
would take: the result equals :func:`rollout` on one pool with
``env_index=arange(B)``.

Work while the envs emulate. :func:`rollout_with_work` runs a given compiled
function in the same gap, after the last send and before the next recv, on a
static schedule (PPO's ``--overlap-learning`` runs its learner there).
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

    With a :class:`jaxatari.envs.GroupedStep` ``step_fn`` (env groups) the
    rollout is pipelined (see the module docstring) and always samples per env
    (``env_index`` defaults to ``arange(B)``).
    """
    if isinstance(step_fn, envs.GroupedStep):
        return _rollout_grouped(policy_fn, params, carry, env_state, handle, step_fn, key, num_steps, env_index)[:5]

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


WorkFn = Callable[[Any, jax.Array], Any]


def rollout_with_work(
    policy_fn: PolicyFn,
    params,
    carry,
    env_state: envs.EnvState,
    handles: tuple,
    step_fn: envs.GroupedStep,
    key: jax.Array,
    num_steps: int,
    work: WorkFn,
    work_state,
    every: int = 1,
    env_index: jax.Array | None = None,
) -> tuple[tuple, envs.EnvState, Any, Trajectory, EpisodeMetrics, Any]:
    """:func:`rollout` that runs ``work`` while the envs emulate.

    At env steps ``t = n * every`` (``n = 0 .. num_steps / every - 1``), after
    the last group's actions are sent and before the first group's next
    observations are received, ``work_state = work(work_state, n)``: compiled
    work placed where the program would otherwise wait for EnvPool (PPO's
    ``--overlap-learning`` puts its learner there). ``n`` is traced; the
    schedule is static (nested scans, no conditionals), and the work's
    data depend on the last send's handle (:func:`jaxatari.envs.after`), so XLA
    cannot schedule it before the send. ``work`` must not
    depend on the rollout. ``step_fn`` is a :class:`jaxatari.envs.GroupedStep`
    (``make_step_fn(..., split=True)`` for one pool); the rollout itself is
    :func:`rollout`'s with that step (per-env sampling keys).

    Returns :func:`rollout`'s tuple plus the final ``work_state``.
    """
    if not isinstance(step_fn, envs.GroupedStep):
        raise TypeError("rollout_with_work needs a split env step (envs.make_step_fn(..., split=True)); "
                        f"got {type(step_fn).__name__}.")
    if every < 1 or num_steps % every:
        raise ValueError(f"every={every} must be >= 1 and divide num_steps={num_steps}.")
    return _rollout_grouped(policy_fn, params, carry, env_state, handles, step_fn, key, num_steps, env_index,
                            (work, work_state, every))


def _rollout_grouped(policy_fn, params, carry, env_state, handles, gstep, key, num_steps, env_index, work=None):
    G, M = gstep.groups, gstep.group_size
    B = G * M
    if env_index is None:
        env_index = jnp.arange(B, dtype=jnp.int32)
    rows = [slice(g * M, (g + 1) * M) for g in range(G)]
    keys = jax.random.split(key, num_steps)

    def act(g, state, carry, k):
        """Policy and sampling for group ``g``: ``(carry, action, log_prob, value)``, each ``[M]``."""
        view = envs.env_state_rows(state, rows[g])
        sub = jax.tree.map(lambda x: x[rows[g]], carry)
        sub, logits, value = policy_fn(params, sub, view.obs[None], view.first[None])
        carry = jax.tree.map(lambda x, y: x.at[rows[g]].set(y), carry, sub)
        logits = logits[0]
        action = jax.vmap(lambda i, l: jax.random.categorical(jax.random.fold_in(k, i), l))(
            env_index[rows[g]], logits).astype(jnp.int32)
        return carry, (action, categorical_log_prob(logits, action), value[0])

    def observe(g, state, ts, pending):
        """Group ``g``'s bookkeeping of the step just received: ``(state, Trajectory [M], outcome [M])``."""
        action, log_prob, value = pending
        _, view, tr, outcome = envs.env_step(lambda h, a: (h, ts), None, envs.env_state_rows(state, rows[g]), action)
        step = Trajectory(
            obs=tr.obs, first=tr.first, valid=tr.valid, actions=action, log_probs=log_prob, values=value,
            rewards=tr.reward, terminated=tr.terminated, truncated=tr.truncated,
        )
        return envs.env_state_set_rows(state, rows[g], view), step, outcome

    def after(hs, g):
        """Order group ``g+1``'s (or, wrapping, group 0's) env call after group ``g``'s send: a data
        dependency (an optimization barrier alone let XLA receive every group before any send)."""
        n = (g + 1) % G
        hs[n] = envs.after(hs[g], hs[n])

    work_fn, w, every = work if work is not None else (None, None, 1)

    def do_work(hs, w, n):
        """``work`` after every group has sent (ordered after the last send through ``n``)."""
        if work_fn is None:
            return w
        return work_fn(w, envs.after(hs[G - 1], n))

    def receive_all(hs, state, carry, pending, k):
        """Receive, record and (if ``k`` is given) act again for each group in turn."""
        steps, outcomes = [], []
        for g in range(G):
            hs[g], ts = gstep.recv[g](hs[g])
            state, step, outcome = observe(g, state, ts, pending[g])
            steps.append(step)
            outcomes.append(outcome)
            if k is not None:
                carry, pending[g] = act(g, state, carry, k)
                hs[g] = gstep.send[g](hs[g], pending[g][0])
            after(hs, g)
        join = lambda *xs: jnp.concatenate(xs)  # noqa: E731
        return state, carry, jax.tree.map(join, *steps), jax.tree.map(join, *outcomes)

    hs, pending = list(handles), [None] * G
    for g in range(G):  # step 0: act and send for every group
        carry, pending[g] = act(g, env_state, carry, keys[0])
        hs[g] = gstep.send[g](hs[g], pending[g][0])
        after(hs, g)
    w = do_work(hs, w, jnp.zeros((), jnp.int32))

    def step(c, k, n=None):
        hs, state, carry, pending, w = c
        hs, pending = list(hs), list(pending)
        state, carry, st, outcome = receive_all(hs, state, carry, pending, k)
        if n is not None:
            w = do_work(hs, w, n)
        return (tuple(hs), state, carry, tuple(pending), w), (st, outcome)

    def block(c, xs):
        """Env steps ``n * every .. (n + 1) * every - 1``: the first with the work."""
        k0, ks, n = xs
        c, first = step(c, k0, n)
        c, rest = jax.lax.scan(step, c, ks)
        return c, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)

    # Steps 1 .. every - 1, then blocks n = 1 .. num_steps / every - 1 (without work: every = 1, one block per step).
    c = (tuple(hs), env_state, carry, tuple(pending), w)
    c, head = jax.lax.scan(step, c, keys[1:every])
    rest = keys[every:].reshape(num_steps // every - 1, every, *keys.shape[1:])
    c, blocks = jax.lax.scan(block, c, (rest[:, 0], rest[:, 1:], jnp.arange(1, num_steps // every, dtype=jnp.int32)))
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), blocks)
    traj, outcomes = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, flat)
    hs, state, carry, pending, w = c
    hs, pending = list(hs), list(pending)
    state, carry, last, last_outcome = receive_all(hs, state, carry, pending, None)
    cat = lambda a, b: jnp.concatenate([a, b[None]])  # noqa: E731
    traj = jax.tree.map(cat, traj, last)
    outcomes = jax.tree.map(cat, outcomes, last_outcome)
    return tuple(hs), state, carry, traj, episode_metrics(outcomes), w


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
