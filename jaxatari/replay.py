"""Device-resident, frame-deduplicated replay buffer, as pure functions.

Usage (DQN with EnvPool Atari, ``obs [B, 4, 84, 84] uint8``)::

    state = replay.create(1_000_000, (4, 84, 84), jnp.uint8, num_envs=B, frame_stack=4)
    add = jax.jit(replay.add, donate_argnames="state")   # donation updates the rings in place
    state = add(state, obs, actions, rewards, next_obs, terminated, truncated, valid)
    batch = replay.sample(state, key, 32, n_step=3, gamma=0.99)
    # Q target: batch.rewards + batch.discounts * max_a Q(batch.next_obs, a)

Layout: every env ``b`` owns a transition ring of ``T = capacity // num_envs``
slots (action, reward, terminated, truncated, and the frame-ring positions
where the stacks of ``obs`` and ``next_obs`` start) and a frame ring of ``F``
single frames, in which a stack is ``S = frame_stack`` consecutive frames
(oldest first, as in EnvPool).  Without ``frame_stack``, ``S = 1`` and each
observation (any shape and dtype) is one "frame".

Deduplication: ``add`` pushes ``obs`` (``S`` frames) only if it differs from
the last ``S`` frames pushed for that env (the previous ``next_obs``), and
``next_obs`` as its newest frame alone when ``next_obs[:-1] == obs[1:]``,
otherwise whole.  Both checks compare pixels on device, so a rebuilt stack is
always exactly what was added, never mixing frames across an episode boundary
or a soft reset.  Within an episode a transition costs one frame; an episode
start costs ``S + 1``.

Sampling guarantees: a transition is sampleable until its slot is reused or
one of its frames is overwritten; frames are pushed in time order, so per env
the sampleable ones are the newest ``size[b]``, a contiguous run of the ring.
The frame ring has ``F = T + max(floor(frame_headroom * T), S)`` frames: with
the default headroom 0.1 (``frame_stack``) all ``T`` newest transitions fit
while episodes average more than about ``S / 0.1`` transitions; without
``frame_stack`` the default 1.0 gives ``F = 2T``, which always fits them.
Invalid transitions (``valid=False``: EnvPool's reset steps, ``final_obs ->
reset_obs``) are never stored.  A stored transition whose successor was not
stored next is marked ``cut``: n-step sums stop there and bootstrap from its
``next_obs``.  Everything is jittable with fixed shapes and no host sync;
``add`` writes ``O(num_envs * S)`` frames, ``sample`` gathers
``O(batch_size * (S + n_step))``; nothing scans the buffer.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["Batch", "BufferState", "add", "create", "gather", "nbytes", "num_valid", "sample"]


@struct.dataclass
class BufferState:
    """Replay buffer state. ``B = num_envs``, ``T = capacity // num_envs``,
    ``F`` frames per env, ``S = frame_stack`` (1 without frame stacking).

    Frame ring positions are in ``[0, F)``, transition slots in ``[0, T)``.
    """

    frames: jax.Array
    """``[B, F, *frame_shape]`` obs dtype: the frame ring of each env."""
    obs_start: jax.Array
    """``[B, T]`` int32: frame-ring position of the oldest frame of ``obs``."""
    next_start: jax.Array
    """``[B, T]`` int32: frame-ring position of the oldest frame of ``next_obs``."""
    actions: jax.Array
    """``[B, T, *action_shape]`` action dtype."""
    rewards: jax.Array
    """``[B, T]`` float32."""
    terminated: jax.Array
    """``[B, T]`` bool: a real terminal (bootstrap cut)."""
    truncated: jax.Array
    """``[B, T]`` bool: a time-limit truncation (bootstrap kept)."""
    cut: jax.Array
    """``[B, T]`` bool: the next transition stored for this env is not this one's successor (n-step sums stop)."""
    frame_head: jax.Array
    """``[B]`` int32: frame-ring position of the next frame to write."""
    head: jax.Array
    """``[B]`` int32: transition slot of the next transition to write."""
    size: jax.Array
    """``[B]`` int32: number of sampleable transitions of each env, the
    newest ones, in slots ``(head - size + i) % T`` for ``i < size``."""
    has_last: jax.Array
    """``[B]`` bool: a ``next_obs`` has been pushed (it is the ``S`` frames before ``frame_head``)."""
    pending_cut: jax.Array
    """``[B]`` bool: an invalid transition was skipped since the last valid one."""

    obs_shape: tuple[int, ...] = struct.field(pytree_node=False)
    """Shape of one observation, e.g. ``(4, 84, 84)``."""
    frame_stack: int | None = struct.field(pytree_node=False)
    """Frames per observation stacked on axis 0, or None (observations stored whole)."""

    @property
    def num_envs(self) -> int:
        return self.frames.shape[0]

    @property
    def capacity_per_env(self) -> int:
        return self.obs_start.shape[1]

    @property
    def capacity(self) -> int:
        return self.num_envs * self.capacity_per_env

    @property
    def frames_per_env(self) -> int:
        return self.frames.shape[1]

    @property
    def _stack(self) -> int:
        return 1 if self.frame_stack is None else self.frame_stack


@struct.dataclass
class Batch:
    """A minibatch of ``N`` (n-step) transitions; see :func:`gather`."""

    obs: jax.Array
    """``[N, *obs_shape]``: ``o_t``."""
    actions: jax.Array
    """``[N, *action_shape]``: ``a_t``."""
    rewards: jax.Array
    """``[N]`` float32: ``sum_{k<n'} gamma^k r_{t+k}``."""
    discounts: jax.Array
    """``[N]`` float32: ``gamma^n' * (1 - terminated_{t+n'-1})``."""
    next_obs: jax.Array
    """``[N, *obs_shape]``: ``o_{t+n'}``, the observation to bootstrap from."""
    terminated: jax.Array
    """``[N]`` bool: the sum ended on a real terminal (``discounts == 0``)."""
    n_steps: jax.Array
    """``[N]`` int32: ``n'``, the number of rewards summed (``1 <= n' <= n``)."""
    env_ids: jax.Array
    """``[N]`` int32: env of each transition (with ``slots``: its location, e.g. for priority updates)."""
    slots: jax.Array
    """``[N]`` int32: transition-ring slot of each transition."""


def create(capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, *, num_envs: int = 1,
           frame_stack: int | None = None, action_shape: tuple[int, ...] = (), action_dtype: Any = jnp.int32,
           frame_headroom: float | None = None) -> BufferState:
    """An empty buffer for ``capacity`` transitions from ``num_envs`` envs.

    Args:
      capacity: number of transitions; a multiple of ``num_envs`` (each env
        keeps the newest ``capacity // num_envs`` of its own).
      obs_shape: shape of one observation, e.g. ``(4, 84, 84)`` or ``(4,)``.
      obs_dtype: its dtype, e.g. ``jnp.uint8``.
      num_envs: ``B``, the number of parallel envs; every :func:`add` takes
        one transition from each.
      frame_stack: ``S`` when observations are stacks of ``S`` frames on axis 0
        (``obs_shape[0] == S``, newest frame last, as EnvPool returns them):
        each frame is then stored once. None: observations are stored whole.
      action_shape: shape of one action (``()`` for discrete actions).
      action_dtype: its dtype.
      frame_headroom: extra frame-ring capacity as a fraction of ``T``, for
        the extra frames of episode starts (default 0.1 with ``frame_stack``,
        1.0 without). The ring holds at least ``T + S`` frames per env (one
        long episode fills all ``T`` slots) and at least ``2 * S``.

    Returns:
      The empty :class:`BufferState`, all arrays zero (so that sampling it
      gives finite garbage). Its size in bytes is :func:`nbytes`.
    """
    for name, value in (("capacity", capacity), ("num_envs", num_envs)):
        if not _is_pos_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    capacity, num_envs = int(capacity), int(num_envs)
    if capacity % num_envs:
        lower = max(capacity // num_envs, 1) * num_envs
        raise ValueError(f"capacity={capacity} is not divisible by num_envs={num_envs}: each env keeps "
                         f"capacity // num_envs transitions, so capacity must be a multiple of "
                         f"{num_envs} (e.g. {lower} or {lower + num_envs}).")
    try:
        obs_shape = tuple(int(d) for d in obs_shape)
    except TypeError:
        raise ValueError(f"obs_shape must be a tuple of ints, got {obs_shape!r}.") from None
    if frame_stack is None:
        stack, frame_shape = 1, obs_shape
        headroom = 1.0 if frame_headroom is None else frame_headroom
    else:
        if not _is_pos_int(frame_stack) or len(obs_shape) < 1 or obs_shape[0] != frame_stack:
            raise ValueError(f"frame_stack={frame_stack!r} does not match obs_shape={obs_shape}: with "
                             f"frame stacking the stack must be axis 0 of the observation, i.e. "
                             f"obs_shape == ({frame_stack}, ...) with a positive integer frame_stack; "
                             f"pass frame_stack=None to store observations whole.")
        stack = frame_stack = int(frame_stack)
        frame_shape = obs_shape[1:]
        headroom = 0.1 if frame_headroom is None else frame_headroom
    if not headroom >= 0:
        raise ValueError(f"frame_headroom must be >= 0, got {frame_headroom!r}.")

    t = capacity // num_envs
    f = max(t + max(int(math.floor(t * headroom)), stack), 2 * stack)
    per_t = lambda dtype, shape=(): jnp.zeros((num_envs, t, *shape), dtype)  # noqa: E731
    per_env = lambda dtype: jnp.zeros((num_envs,), dtype)  # noqa: E731
    return BufferState(
        frames=jnp.zeros((num_envs, f, *frame_shape), obs_dtype),
        obs_start=per_t(jnp.int32), next_start=per_t(jnp.int32), actions=per_t(action_dtype, tuple(action_shape)),
        rewards=per_t(jnp.float32), terminated=per_t(jnp.bool_), truncated=per_t(jnp.bool_), cut=per_t(jnp.bool_),
        frame_head=per_env(jnp.int32), head=per_env(jnp.int32), size=per_env(jnp.int32),
        has_last=per_env(jnp.bool_), pending_cut=per_env(jnp.bool_),
        obs_shape=obs_shape, frame_stack=frame_stack,
    )


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_obs(state: BufferState, name: str, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    expected = (state.num_envs, *state.obs_shape)
    if x.shape != expected:
        raise ValueError(f"{name} has shape {x.shape}, expected [num_envs, *obs_shape] = {expected}.")
    if x.dtype != state.frames.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, the buffer stores {state.frames.dtype}.")
    return x


def add(state: BufferState, obs: jax.Array, actions: jax.Array, rewards: jax.Array, next_obs: jax.Array,
        terminated: jax.Array, truncated: jax.Array, valid: jax.Array | None = None) -> BufferState:
    """Adds one transition ``(o_t, a_t, r_t, o_{t+1})`` from each of the B envs.

    Args:
      state: the buffer.
      obs: ``[B, *obs_shape]`` ``o_t``.
      actions: ``[B, *action_shape]`` ``a_t``.
      rewards: ``[B]`` ``r_t``.
      next_obs: ``[B, *obs_shape]`` ``o_{t+1}`` (on a terminal or truncation:
        the final observation of the episode, as EnvPool returns it).
      terminated: ``[B]`` bool, a real terminal: the bootstrap is cut.
      truncated: ``[B]`` bool, a time-limit truncation: the bootstrap is kept.
      valid: ``[B]`` bool, default all True. ``False`` transitions (EnvPool's
        reset steps, ``final_obs -> reset_obs``) are skipped: never stored,
        never sampled, and n-step sums never run across them.

    Returns:
      The new state. Per env, the oldest transition is dropped when the
      transition ring is full, and so is any whose frames this call overwrote.
    """
    b_n, t_n, f_n, s_n = state.num_envs, state.capacity_per_env, state.frames_per_env, state._stack
    obs = _check_obs(state, "obs", obs)
    next_obs = _check_obs(state, "next_obs", next_obs)
    actions = jnp.asarray(actions)
    if jnp.issubdtype(state.actions.dtype, jnp.integer) and not jnp.issubdtype(actions.dtype, jnp.integer):
        raise TypeError(f"actions must be integers for this buffer (action_dtype {state.actions.dtype}), got dtype "
                        f"{actions.dtype}; a cast would truncate them silently.")
    actions = actions.astype(state.actions.dtype)
    chex.assert_shape(actions, state.actions.shape[:1] + state.actions.shape[2:])
    rewards = jnp.asarray(rewards).astype(jnp.float32)
    terminated = jnp.asarray(terminated).astype(jnp.bool_)
    truncated = jnp.asarray(truncated).astype(jnp.bool_)
    valid = jnp.ones((b_n,), jnp.bool_) if valid is None else jnp.asarray(valid).astype(jnp.bool_)
    chex.assert_shape([rewards, terminated, truncated, valid], (b_n,))

    if state.frame_stack is None:  # one "frame" per observation
        obs, next_obs = obs[:, None], next_obs[:, None]
    frame_axes = tuple(range(1, obs.ndim))
    envs = jnp.arange(b_n)
    envs_col = envs[:, None]

    # Is obs the stack pushed last (the previous next_obs)? Does next_obs continue obs?
    last_pos = (state.frame_head[:, None] + jnp.arange(-s_n, 0)) % f_n
    last_stack = state.frames[envs_col, last_pos]  # [B, S, *frame_shape]
    obs_match = state.has_last & jnp.all(obs == last_stack, axis=frame_axes)
    next_cont = jnp.all(next_obs[:, :-1] == obs[:, 1:], axis=frame_axes)

    # Push, in order: obs's S frames unless matched, then next_obs's newest frame
    # (continued) or all S of them.
    candidates = jnp.concatenate([obs, next_obs], axis=1)  # [B, 2S, *frame_shape]
    push = jnp.concatenate([jnp.broadcast_to(~obs_match[:, None], (b_n, s_n)),
                            (jnp.arange(s_n) == s_n - 1)[None, :] | ~next_cont[:, None]], axis=1)
    push = push & valid[:, None]  # [B, 2S]
    rank = jnp.cumsum(push, axis=1) - 1
    pos = jnp.where(push, (state.frame_head[:, None] + rank) % f_n, f_n)  # f_n: dropped
    frames = state.frames.at[envs_col, pos].set(candidates, mode="drop")
    n_push = jnp.sum(push, axis=1, dtype=jnp.int32)  # [B] in {0, 1, S, S+1, 2S}
    frame_head = (state.frame_head + n_push) % f_n
    obs_start = jnp.where(obs_match, (state.frame_head - s_n) % f_n, state.frame_head)
    next_start = (frame_head - s_n) % f_n

    # Transition ring: mark the previous transition cut if this one is not its
    # successor, then write this one (invalid ones are dropped).
    prev = jnp.where(valid & (state.pending_cut | ~obs_match), (state.head - 1) % t_n, t_n)
    cut = state.cut.at[envs, prev].set(True, mode="drop")
    slot = jnp.where(valid, state.head, t_n)

    def write(buf, value):
        return buf.at[envs, slot].set(value, mode="drop")

    new_obs_start = write(state.obs_start, obs_start)
    head = jnp.where(valid, (state.head + 1) % t_n, state.head)
    size = jnp.where(valid, jnp.minimum(state.size + 1, t_n), state.size)

    # Retire transitions whose oldest frame was just overwritten: frame-ring
    # positions [frame_head, frame_head + n_push) before this call. They are the
    # oldest (frames are pushed in time order), at most n_push <= 2S of them;
    # the one just added is never among them.
    k = jnp.arange(2 * s_n)
    window = (head - size)[:, None] + k
    starts = new_obs_start[envs_col, window % t_n]
    overwritten = (starts - state.frame_head[:, None]) % f_n < n_push[:, None]
    older = k[None, :] < (size - valid)[:, None]
    size = size - jnp.sum(overwritten & older, axis=1, dtype=jnp.int32)

    return state.replace(
        frames=frames,
        obs_start=new_obs_start,
        next_start=write(state.next_start, next_start),
        actions=write(state.actions, actions),
        rewards=write(state.rewards, rewards),
        terminated=write(state.terminated, terminated),
        truncated=write(state.truncated, truncated),
        cut=write(cut, False),
        frame_head=frame_head,
        head=head,
        size=size,
        has_last=state.has_last | valid,
        pending_cut=~valid,
    )


def num_valid(state: BufferState) -> jax.Array:
    """Number of sampleable transitions, an int32 scalar (at most ``capacity``)."""
    return jnp.sum(state.size)


def nbytes(state: BufferState) -> int:
    """Size of the state in bytes (a Python int; works on ``jax.eval_shape`` output)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))


def _rebuild(state: BufferState, envs: jax.Array, start: jax.Array) -> jax.Array:
    """``[N, *obs_shape]`` stacks of ``S`` frames from frame-ring positions ``start [N]``."""
    pos = (start[:, None] + jnp.arange(state._stack)) % state.frames_per_env
    stacks = state.frames[envs[:, None], pos]  # [N, S, *frame_shape]
    return stacks[:, 0] if state.frame_stack is None else stacks


def gather(state: BufferState, indices: jax.Array, *, n_step: int = 1, gamma: float | jax.Array = 0.99) -> Batch:
    """The sampleable transitions of rank ``indices``, as n-step transitions.

    Rank ``i`` in ``[0, num_valid(state))`` orders sampleable transitions by
    env, then oldest first. Ranks out of range (e.g. any rank of an empty
    buffer) give finite garbage. :func:`sample` is this with uniform ranks.

    With ``t`` the transition of rank ``i``, ``n' = min(n, m, e)`` where ``m``
    is the number of transitions stored from ``t`` up to the newest one of its
    env, and ``e = k + 1`` for the first ``k >= 0`` where ``t + k`` is
    terminated, truncated or cut (its successor was not stored)::

        rewards   = sum_{k < n'} gamma^k r_{t+k}
        discounts = gamma^n' * (1 - terminated_{t+n'-1})
        next_obs  = o_{t+n'}   (the next_obs of transition t+n'-1)

    so the (Peng & Williams 1996; Sutton 1988) n-step target is
    ``rewards + discounts * max_a Q(next_obs, a)``: cut to 0 on a real
    terminal, bootstrapped on a truncation, a cut, or when the newest stored
    transition is reached. With ``n_step=1``: ``discounts = gamma * (1 -
    terminated_t)``.

    Args:
      state: the buffer.
      indices: ``[N]`` int ranks.
      n_step: ``n >= 1``, a Python int.
      gamma: discount ``gamma`` (float or scalar array).

    Returns:
      A :class:`Batch` of ``N`` transitions.
    """
    if not _is_pos_int(n_step):
        raise ValueError(f"n_step must be a positive integer, got {n_step!r}.")
    indices = jnp.asarray(indices, jnp.int32)
    chex.assert_rank(indices, 1)
    b_n, t_n = state.num_envs, state.capacity_per_env

    # Rank -> (env, slot).
    counts = state.size
    ends = jnp.cumsum(counts)
    envs = jnp.minimum(jnp.searchsorted(ends, indices, side="right"), b_n - 1).astype(jnp.int32)
    offset = indices - (ends[envs] - counts[envs])
    slots = ((state.head[envs] - counts[envs] + offset) % t_n).astype(jnp.int32)
    remaining = jnp.maximum(counts[envs] - offset, 1)  # transitions from t to the newest

    # n-step window.
    k = jnp.arange(n_step)
    win = (slots[:, None] + k) % t_n  # [N, n]
    envs_col = envs[:, None]
    stop = state.terminated[envs_col, win] | state.truncated[envs_col, win] | state.cut[envs_col, win]
    first_stop = jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1) + 1, n_step)
    n_steps = jnp.minimum(jnp.minimum(first_stop, remaining), n_step).astype(jnp.int32)
    gamma = jnp.asarray(gamma, jnp.float32)
    powers = gamma ** k.astype(jnp.float32)
    summed = k[None, :] < n_steps[:, None]
    rewards = jnp.sum(jnp.where(summed, powers * state.rewards[envs_col, win], 0.0), axis=1)
    last = (slots + n_steps - 1) % t_n
    terminal = state.terminated[envs, last]
    discounts = jnp.where(terminal, 0.0, gamma ** n_steps.astype(jnp.float32))

    return Batch(
        obs=_rebuild(state, envs, state.obs_start[envs, slots]),
        actions=state.actions[envs, slots],
        rewards=rewards,
        discounts=discounts,
        next_obs=_rebuild(state, envs, state.next_start[envs, last]),
        terminated=terminal,
        n_steps=n_steps,
        env_ids=envs,
        slots=slots,
    )


def sample(state: BufferState, key: chex.PRNGKey, batch_size: int, *, n_step: int = 1,
           gamma: float | jax.Array = 0.99) -> Batch:
    """A minibatch drawn uniformly, with replacement, from the sampleable transitions.

    Args:
      state: the buffer.
      key: PRNG key.
      batch_size: ``N``, a Python int.
      n_step: ``n``; see :func:`gather` for the n-step equations.
      gamma: discount.

    Returns:
      A :class:`Batch` of ``N`` transitions. Invalid transitions and
      transitions whose frames were overwritten are never drawn. On a buffer
      with nothing sampleable (``num_valid(state) == 0``) it returns finite
      garbage rather than failing inside jit: gate learning on ``num_valid``
      (or ``learning_starts``).
    """
    total = num_valid(state)
    indices = jax.random.randint(key, (batch_size,), 0, jnp.maximum(total, 1), dtype=jnp.int32)
    return gather(state, indices, n_step=n_step, gamma=gamma)
