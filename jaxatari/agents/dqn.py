"""Deep Q-networks (Mnih et al. 2015, Nature 518), compiled end to end.

One *iteration* steps all ``B = --num-envs`` envs once with epsilon-greedy
actions, adds the ``B`` transitions to the device-resident, frame-deduplicated
replay buffer (:mod:`jaxatari.replay`, part of :class:`State`), learns on
training iterations (:func:`learn`) and moves the target network
(:func:`target_update`); :func:`update` scans iterations into one metrics row.

Counting: every count in the config (``--learning-starts``,
``--target-network-frequency``, ``--exploration-steps``, ``--train-frequency``)
is in env steps summed over envs; one iteration is ``B`` env steps.

Replay ratio: ``--gradient-steps G`` every ``--train-frequency F`` env steps is
``G / F`` updates per env step whatever ``B``: with ``g = gcd(F, B G)`` the loop
takes ``U = B G / g`` updates every ``P = F / g`` iterations
(:attr:`Config.updates_per_train`, :attr:`Config.train_period`).

Resume: checkpoints hold the buffer when it fits ``--checkpoint-buffer-limit-gib``
and the resumed run is then exact; otherwise the buffer refills for
``--learning-starts`` env steps before learning again (:func:`restart`).
Devices, processes and populations: see README's DQN and scaling sections.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxatari import configs, envs, parallel, replay
from jaxatari.algorithm import Algorithm, Context
from jaxatari.configs import QFields, TrainFields, option
from jaxatari.errors import ConfigError
from jaxatari.networks import NetworkSpec, QNetwork, resolve_network_spec
from jaxatari.ops import all_finite
from jaxatari.ops.td import LOSSES, dqn_loss
from jaxatari.rollout import episode_metrics

log = logging.getLogger(__name__)

ALGO = "dqn"
OPTIMIZERS = ("adam", "rmsprop")
NETWORKS = ("auto", "nature", "impala", "mlp")


#: ``--dqn-preset`` hyperparameter sets, filling the fields left at ``None``.
DQN_PRESETS: dict[str, dict[str, Any]] = {
    # Mnih et al. (2015) as CleanRL's dqn_atari runs it, with the Huber loss (the paper's error
    # clipping) and a gradient-norm clip of 10, as in SB3.
    "nature": dict(
        total_timesteps=10_000_000, buffer_size=1_000_000, batch_size=32, learning_rate=1e-4,
        optimizer="adam", max_grad_norm=10.0, loss="huber", target_network_frequency=1000,
        start_e=1.0, end_e=0.01, exploration_fraction=0.1, learning_starts=80_000, train_frequency=4,
    ),
    # The Pong workload of "Deep RL Hands-On" (Lapan, ch. 6); its "frames" are agent steps, as ours.
    "pong-fast": dict(
        total_timesteps=2_000_000, buffer_size=10_000, batch_size=32, learning_rate=1e-4,
        optimizer="adam", max_grad_norm=0.0, loss="mse", target_network_frequency=1000,
        start_e=1.0, end_e=0.01, exploration_steps=150_000, learning_starts=10_000, train_frequency=1,
        target_return=19.0,
    ),
    # Classic control (CartPole-v1) after CleanRL's dqn.py, epsilon decaying over 10% (CleanRL: 50%).
    "classic": dict(
        total_timesteps=500_000, buffer_size=10_000, batch_size=128, learning_rate=2.5e-4,
        optimizer="adam", max_grad_norm=10.0, loss="mse", target_network_frequency=500,
        start_e=1.0, end_e=0.05, exploration_fraction=0.1, learning_starts=10_000, train_frequency=10,
    ),
}

@dataclasses.dataclass(frozen=True)
class Config(QFields, TrainFields):
    """DQN on EnvPool. Fields left at None take the value of --dqn-preset (nature on
    Atari, classic otherwise; DQN_PRESETS in jaxatari/agents/dqn.py); explicit flags
    win. Default --num-envs: 8 Atari, 4 classic control."""

    env: str = "Pong-v5"
    """EnvPool task id, e.g. Pong-v5, Breakout-v5, CartPole-v1."""
    dqn_preset: str | None = option(None, choices=DQN_PRESETS)
    """DQN hyperparameters: nature, pong-fast or classic (not the env --preset)."""
    buffer_size: int | None = option(None, range="an integer >= 1")
    """Replay capacity in transitions (rounded up to a multiple of --num-envs)."""
    batch_size: int | None = option(None, range="an integer >= 1")
    """Transitions per gradient step."""
    learning_rate: float | None = option(None, range="> 0", sweepable=True)
    """Optimizer learning rate (constant)."""
    optimizer: str | None = option(None, choices=OPTIMIZERS)
    """adam, or rmsprop (optax's centered RMSProp, as in Mnih et al. 2015)."""
    optimizer_eps: float | None = option(None, range="> 0")
    """Optimizer epsilon. Default: 1e-8 for adam (optax's), 0.01 for rmsprop."""
    rmsprop_decay: float = option(0.95, range="in [0, 1]")
    """RMSProp decay of the squared-gradient average (--optimizer rmsprop)."""
    max_grad_norm: float | None = option(None, range=">= 0 (0 = no clipping)")
    """Global gradient-norm clip; 0 disables it."""
    gamma: float = option(0.99, range="in [0, 1]", sweepable=True)
    """Discount."""
    loss: str | None = option(None, choices=LOSSES)
    """TD loss: huber (delta --huber-delta) or mse (plain squared error)."""
    huber_delta: float = option(1.0, range="> 0")
    """Huber threshold (--loss huber)."""
    double_q: bool = False
    """Double DQN target: the online network picks the bootstrap action, the target network values it."""
    n_step: int = option(1, range="an integer >= 1")
    """n-step returns: sum n rewards before bootstrapping (cut at terminals, kept on truncation)."""
    target_network_frequency: int | None = option(None, range="an integer >= 1")
    """Env steps between target-network updates."""
    tau: float = option(1.0, range="in (0, 1] (1 = hard target update)")
    """Target update rate: 1 copies the online network (hard update), < 1 is Polyak averaging."""
    start_e: float | None = option(None, range="in [0, 1]")
    """Initial exploration epsilon."""
    end_e: float | None = option(None, range="in [0, 1]")
    """Final exploration epsilon."""
    exploration_fraction: float | None = option(None, range="in (0, 1]")
    """Fraction of --total-timesteps over which epsilon decays linearly (if --exploration-steps is unset)."""
    exploration_steps: int | None = option(None, range="an integer >= 1")
    """Env steps over which epsilon decays linearly; overrides --exploration-fraction."""
    learning_starts: int | None = option(None, range="an integer >= 0")
    """Env steps of random-ish play before the first gradient step."""
    train_frequency: int | None = option(None, range="an integer >= 1")
    """Env steps (summed over envs) between training events."""
    gradient_steps: int = option(1, range="an integer >= 1")
    """Gradient steps per training event: the replay ratio is gradient_steps / train_frequency."""
    target_return: float | None = option(None, resumable=True)
    """Stop once the mean of the last 100 full-game returns reaches this (--resume RUN --target-return None:
    train on)."""
    network: str = "auto"
    """auto (Nature CNN on pixels, MLP on vectors), nature, impala or mlp."""
    mlp_hidden: tuple[int, ...] = (120, 84)
    """Hidden layer sizes of the MLP torso (vector observations)."""
    mlp_activation: str = option("relu", choices=("relu", "tanh"))
    """Activation of the MLP torso: relu or tanh."""
    log_every: int = option(1000, range="an integer >= 1")
    """Env steps aggregated into one metrics row (rounded up to whole iterations of --num-envs steps)."""
    checkpoint_buffer: bool = True
    """Save the replay buffer in checkpoints (exact resume) unless it exceeds --checkpoint-buffer-limit-gib."""
    checkpoint_buffer_limit_gib: float = 2.0
    """Largest buffer (GiB, as printed at start) that --checkpoint-buffer saves."""

    @property
    def updates_per_env_step(self) -> float:
        """The replay ratio: gradient updates per env step, ``G / F``."""
        return self.gradient_steps / self.train_frequency

    @property
    def train_period(self) -> int:
        """``P``: iterations (of ``B`` env steps) between training events."""
        g = math.gcd(self.train_frequency, self.num_envs * self.gradient_steps)
        return self.train_frequency // g

    @property
    def updates_per_train(self) -> int:
        """``U``: gradient steps per training event; ``U / (P B) = G / F``."""
        g = math.gcd(self.train_frequency, self.num_envs * self.gradient_steps)
        return self.num_envs * self.gradient_steps // g

    @property
    def iterations_per_row(self) -> int:
        """Iterations aggregated into one metrics row."""
        return max(1, -(-self.log_every // self.num_envs))

    @property
    def steps_per_row(self) -> int:
        return self.iterations_per_row * self.num_envs

    @property
    def epsilon_schedule(self) -> optax.Schedule:
        """``epsilon(env_step)``: linear from ``start_e`` to ``end_e`` over ``exploration_steps``, then flat."""
        return optax.linear_schedule(self.start_e, self.end_e, self.exploration_steps)


ATARI_DEFAULTS = dict(num_envs=8, checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(num_envs=4, checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the preset and per-env-kind defaults and validate; raises before anything compiles."""
    c, fill = configs.named_preset(config, "dqn_preset", DQN_PRESETS, "nature", "classic")
    if c.exploration_fraction is not None and c.exploration_steps is None:
        fill.pop("exploration_steps", None)  # an explicit --exploration-fraction beats the preset's step count
    if c.resume:
        fill.pop("target_return", None)  # a resume's --target-return None means: no target any more
    c = configs.resolve(c, dict(ATARI_DEFAULTS, **fill), dict(CLASSIC_DEFAULTS, **fill))
    if not c.mlp_hidden or min(c.mlp_hidden) < 1:
        raise ConfigError(f"--mlp-hidden {' '.join(map(str, c.mlp_hidden)) or '(empty)'} is not accepted: "
                          "it needs one or more layer widths, each >= 1.")
    if c.network not in NETWORKS:
        raise ConfigError(f"--network {c.network!r} is not accepted for DQN; use one of {', '.join(NETWORKS)} "
                     "(recurrent cores are for the actor-critic agents).")
    if c.optimizer_eps is None:
        c = dataclasses.replace(c, optimizer_eps=1e-8 if c.optimizer == "adam" else 0.01)
    if c.exploration_steps is None:
        c = dataclasses.replace(c, exploration_steps=max(1, round(c.exploration_fraction * c.total_timesteps)))
    if c.total_timesteps <= c.learning_starts:
        log.warning("--total-timesteps %d does not exceed --learning-starts %d: this run fills the replay buffer "
                    "but takes no gradient step.", c.total_timesteps, c.learning_starts)
    if c.batch_size % c.num_envs:
        raise ConfigError(f"--batch-size {c.batch_size} is not divisible by --num-envs {c.num_envs}: every env "
                          "gives batch_size / num_envs transitions to each gradient step.")
    if c.buffer_size % c.num_envs:
        c = dataclasses.replace(c, buffer_size=-(-c.buffer_size // c.num_envs) * c.num_envs)
    return c


def network_spec(c: Config, spec: envs.EnvSpec) -> NetworkSpec:
    """The Q-network of ``--network`` (``--mlp-hidden``/``--mlp-activation`` on vectors) for ``spec``."""
    kw = {} if spec.atari else dict(hidden=tuple(c.mlp_hidden), activation=c.mlp_activation)
    try:
        return resolve_network_spec(c.network, num_actions=spec.num_actions, atari=spec.atari, torso_kwargs=kw,
                                    head="q")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def frame_stack(spec: envs.EnvSpec) -> int | None:
    """Frames stacked on axis 0 of Atari observations (stored once each), None otherwise."""
    return spec.obs_shape[0] if spec.atari and len(spec.obs_shape) == 3 else None


def create_buffer(c: Config, spec: envs.EnvSpec) -> replay.BufferState:
    """An empty :mod:`jaxatari.replay` buffer of ``--buffer-size`` transitions from ``--num-envs`` envs (Atari
    frames stored once: ``frame_stack`` = the env's stack)."""
    return replay.create(c.buffer_size, spec.obs_shape, spec.obs_dtype, num_envs=c.num_envs,
                         frame_stack=frame_stack(spec))


def buffer_nbytes(c: Config, spec: envs.EnvSpec) -> int:
    """Bytes the replay buffer takes on the device (computed without allocating it)."""
    return replay.nbytes(jax.eval_shape(lambda: create_buffer(c, spec)))


# --- State and init ---
@struct.dataclass
class State:
    """Everything training needs, checkpointed whole (the buffer optionally)."""

    params: Any
    target_params: Any
    opt_state: Any
    env: envs.EnvState
    replay: replay.BufferState | None
    key: jax.Array
    iteration: jax.Array
    """Iterations done (int32); env steps = ``iteration * num_envs``."""
    updates: jax.Array
    """Gradient steps done (int32)."""
    buffer_iterations: jax.Array
    """Iterations since the buffer was (re)created (int32): learning starts
    once ``buffer_iterations * num_envs >= learning_starts``."""


def make_optimizer(c: Config) -> optax.GradientTransformation:
    """Adam or centred RMSProp (``--optimizer``), after global-norm clipping unless ``--max-grad-norm 0``."""
    if c.optimizer == "adam":
        opt = optax.adam(c.learning_rate, eps=c.optimizer_eps)
    else:
        opt = optax.rmsprop(c.learning_rate, decay=c.rmsprop_decay, eps=c.optimizer_eps, centered=True)
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), opt) if c.max_grad_norm else opt


def init(c: Config, ctx: Context, env_state: envs.EnvState, key: jax.Array) -> State:
    """The state before the first iteration: fresh params (the target a copy),
    optimizer state, the envs' first observations and statistics ``env_state``
    (laid out by the driver), an empty replay buffer, counters at 0."""
    k_params, k_train = jax.random.split(key)
    params = QNetwork(ctx.net_spec).init(k_params, jnp.zeros((1, *ctx.spec.obs_shape), ctx.spec.obs_dtype))
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return State(params=params, target_params=jax.tree.map(jnp.copy, params), opt_state=make_optimizer(c).init(params),
                 env=env_state, replay=create_buffer(c, ctx.spec), key=k_train, iteration=zero(), updates=zero(),
                 buffer_iterations=zero())


# --- Learning: gradient steps on minibatches from the buffer ---
class TrainSums(struct.PyTreeNode):
    """Sums over the gradient steps of one training event (zeros when none)."""

    count: jax.Array
    loss: jax.Array
    q: jax.Array
    grad_norm: jax.Array

    @classmethod
    def zeros(cls) -> "TrainSums":
        return cls(count=jnp.zeros((), jnp.int32), loss=jnp.zeros(()), q=jnp.zeros(()), grad_norm=jnp.zeros(()))


def learn(c: Config, ctx: Context, params, target_params, opt_state, buffer: replay.BufferState, key: jax.Array):
    """``updates_per_train`` gradient steps on this device's replay shard (the rows
    of its ``B/N`` envs), inside ``shard_map`` over :data:`jaxatari.parallel.AXIS`.

    Device-invariant, stratified by env: each gradient step draws
    ``batch_size / B`` (n-step) transitions, uniformly with replacement, from
    every env's own ring with ``fold_in(key, global env index)``; the loss is the
    mean over the ``batch_size`` transitions of all devices (every device holds
    the same number, so the global mean is the ``pmean`` of the local means), and
    the gradients and statistics are ``pmean``-ed, so params stay identical. The
    same key gives the same minibatch on any number of devices.

    Returns ``(params, opt_state, TrainSums)``: sums over the steps of the loss,
    the mean Q of the taken actions and the gradient norm, with their ``count``.
    """
    optimizer = make_optimizer(c)
    per_env = c.batch_size // c.num_envs
    env_index = parallel.env_index(ctx.local_envs)
    grad_fn = jax.value_and_grad(functools.partial(dqn_loss, apply_fn=QNetwork(ctx.net_spec).apply, double_q=c.double_q,
                                                   loss=c.loss, huber_delta=c.huber_delta), has_aux=True)

    def sample_env(buf, k):  # one env's rows, its env axis restored
        one = jax.tree.map(lambda x: x[None], buf)
        return replay.sample(one, k, per_env, n_step=c.n_step, gamma=c.gamma)

    def sgd_step(carry, k):
        params, opt_state = carry
        keys = jax.vmap(lambda b: jax.random.fold_in(k, b))(env_index)
        batch = jax.vmap(sample_env)(buffer, keys)  # [B/N, batch_size/B, ...]
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        (loss, info), grads = grad_fn(params, target_params, batch)
        grads, loss, q = jax.lax.pmean((grads, loss, info.q_mean), parallel.AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, q, optax.tree.norm(grads))

    n = c.updates_per_train
    (params, opt_state), (loss, q, gnorm) = jax.lax.scan(sgd_step, (params, opt_state), jax.random.split(key, n))
    sums = TrainSums(count=jnp.asarray(n, jnp.int32), loss=loss.sum(), q=q.sum(), grad_norm=gnorm.sum())
    return params, opt_state, sums


def target_update(target_params, params, *, crossings: jax.Array, tau: float):
    """``theta_bar <- tau_k theta + (1 - tau_k) theta_bar`` with ``tau_k = 1 - (1 - tau)^k``
    for ``k = crossings`` multiples of the target frequency crossed (no change when 0)."""
    if tau == 1.0:
        return jax.tree.map(lambda t, p: jnp.where(crossings > 0, p, t), target_params, params)
    tau_k = 1.0 - (1.0 - tau) ** crossings.astype(jnp.float32)
    return jax.tree.map(lambda t, p: (1.0 - tau_k) * t + tau_k * p, target_params, params)


# --- One iteration, one update (a metrics row) ---
def act(c: Config, ctx: Context, state: State):
    """Epsilon-greedy actions in this device's ``B/N`` envs, one key per env
    (``fold_in(key, global env index)``), so actions do not depend on the split.
    Returns ``(action [B/N], key, k_train, epsilon)``: the state's next key and
    the key of this iteration's gradient steps."""
    key, k_explore, k_random, k_train = jax.random.split(state.key, 4)
    epsilon = c.epsilon_schedule(state.iteration * c.num_envs)
    q = QNetwork(ctx.net_spec).apply(state.params, state.env.obs)
    idx = parallel.env_index(ctx.local_envs)
    u = jax.vmap(lambda b: jax.random.uniform(jax.random.fold_in(k_explore, b)))(idx)
    num_actions = ctx.spec.num_actions
    rand = jax.vmap(lambda b: jax.random.randint(jax.random.fold_in(k_random, b), (), 0, num_actions))(idx)
    action = jnp.where(u < epsilon, rand, jnp.argmax(q, axis=-1)).astype(jnp.int32)
    return action, key, k_train, epsilon


def train_due(c: Config, iteration: jax.Array, buffer_iterations: jax.Array) -> jax.Array:
    """Whether the iteration that brings the counters to these values takes gradient steps."""
    return (buffer_iterations * c.num_envs >= c.learning_starts) & (iteration % c.train_period == 0)


def observe(c: Config, ctx: Context, state: State, env_state: envs.EnvState, tr: envs.Transition, key: jax.Array,
            k_train: jax.Array) -> tuple[State, TrainSums]:
    """After the env step: store the transitions, learn on training iterations
    (:func:`learn`), sync the target. Returns ``(state, TrainSums)``."""
    B = c.num_envs
    buffer = replay.add(state.replay, tr.obs, tr.action, tr.reward, tr.next_obs, tr.terminated,
                        tr.truncated, tr.valid)
    it = state.iteration + 1
    buffer_it = state.buffer_iterations + 1
    do_train = train_due(c, it, buffer_it)
    if ctx.agent_axis:  # the same for every agent: kept a branch (a vmapped cond would run both sides)
        do_train = jax.lax.pmax(do_train.astype(jnp.int32), ctx.agent_axis) > 0

    def skip(params, target_params, opt_state, buffer, key):
        return params, opt_state, TrainSums.zeros()

    params, opt_state, sums = jax.lax.cond(do_train, functools.partial(learn, c, ctx), skip,
                                           state.params, state.target_params, state.opt_state, buffer, k_train)
    crossings = it * B // c.target_network_frequency - state.iteration * B // c.target_network_frequency
    target_params = target_update(state.target_params, params, crossings=crossings, tau=c.tau)
    state = state.replace(params=params, target_params=target_params, opt_state=opt_state, env=env_state,
                          replay=buffer, key=key, iteration=it, updates=state.updates + sums.count,
                          buffer_iterations=buffer_it)
    return state, sums


METRIC_COLUMNS = ("epsilon", "loss", "q_mean", "grad_norm", "buffer_size")


def update(c: Config, ctx: Context, state: State, handle):
    """One metrics row: :attr:`Config.iterations_per_row` iterations on this
    device's envs and replay shard, inside ``shard_map``.

    Returns ``(state, handle, metrics, actions [I, B/N])``: ``metrics`` a dict
    of scalars over every device (``update`` = gradient steps so far,
    ``env_steps``, the episode sums, ``return_mean100``, ``finite`` and
    :data:`METRIC_COLUMNS`)."""
    def iteration(carry, _):  # act, env step, store, learn when due, sync the target
        state, handle = carry
        action, key, k_train, epsilon = act(c, ctx, state)
        handle, env_state, tr, outcome = envs.env_step(ctx.step_fn, handle, state.env, action)
        state, sums = observe(c, ctx, state, env_state, tr, key, k_train)
        return (state, handle), (action, outcome, sums, epsilon)

    state = state.replace(env=parallel.env_state_in(state.env))
    (state, handle), (actions, outcomes, sums, eps) = jax.lax.scan(iteration, (state, handle), None,
                                                                   length=c.iterations_per_row)
    ep = jax.lax.psum(episode_metrics(outcomes), parallel.AXIS)
    n = sums.count.sum()
    mean = lambda x: jnp.where(n > 0, x.sum() / jnp.maximum(n, 1), jnp.nan)  # noqa: E731
    metrics = dict(
        update=state.updates,
        env_steps=state.iteration * c.num_envs,
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=parallel.global_window_mean(state.env.stats),
        finite=jnp.isfinite(sums.loss).all() & jnp.isfinite(sums.q).all() & all_finite(state.params),
        epsilon=eps[-1], loss=mean(sums.loss), q_mean=mean(sums.q), grad_norm=mean(sums.grad_norm),
        buffer_size=jax.lax.psum(replay.num_valid(state.replay), parallel.AXIS),
    )
    return state.replace(env=parallel.env_state_out(state.env)), handle, metrics, actions


# --- What the driver asks of DQN beyond init and update ---
def buffer_saved(c: Config, spec: envs.EnvSpec, agents: int = 1) -> tuple[bool, str]:
    """Whether checkpoints hold the replay buffer(s) of ``agents`` agents, and why not."""
    nbytes = agents * buffer_nbytes(c, spec)
    if not c.checkpoint_buffer:
        return False, "--no-checkpoint-buffer"
    if nbytes > c.checkpoint_buffer_limit_gib * 2**30:
        return False, f"{nbytes / 2**30:.1f} GiB > --checkpoint-buffer-limit-gib {c.checkpoint_buffer_limit_gib:g}"
    return True, ""


def unsaved(c: Config, spec: envs.EnvSpec, agents: int) -> tuple[str, ...]:
    """State fields left out of checkpoints: the replay buffer when too large (or ``--no-checkpoint-buffer``)."""
    return () if buffer_saved(c, spec, agents)[0] else ("replay",)


def restart(c: Config, spec: envs.EnvSpec, restored: State, fresh: State) -> tuple[State, str]:
    """After a resume from a checkpoint without the buffer: an empty buffer that
    refills for ``--learning-starts`` env steps before learning resumes."""
    state = restored.replace(replay=fresh.replay, buffer_iterations=jnp.zeros_like(restored.buffer_iterations))
    why = buffer_saved(c, spec, int(np.size(restored.iteration)))[1]
    return state, (f"The replay buffer was not checkpointed ({why}): it refills for {c.learning_starts:,} env steps "
                   "before learning resumes, so the resumed run is not an exact continuation.")


def describe_replay_ratio(c: Config) -> str:
    return (f"replay ratio {c.updates_per_env_step:g} updates/env step ({c.gradient_steps} per "
            f"{c.train_frequency} env steps: {c.updates_per_train} every {c.train_period} iteration"
            f"{'s' if c.train_period > 1 else ''} of {c.num_envs} env{'s' if c.num_envs > 1 else ''})")


def describe(c: Config, spec: envs.EnvSpec, agents: int) -> tuple[str, dict[str, Any]]:
    """The start-up line after the driver's (the buffer, the replay ratio, exploration) and
    what config.json records of them."""
    nbytes = agents * buffer_nbytes(c, spec)
    saved, why = buffer_saved(c, spec, agents)
    line = (f"DQN preset {c.dqn_preset} | loss {c.loss}{' | double Q' if c.double_q else ''}"
            f"{f' | {c.n_step}-step' if c.n_step > 1 else ''} | replay buffer"
            f"{f's: {agents} x' if agents > 1 else ':'} {c.buffer_size:,} transitions, {nbytes / 2**20:,.1f} MiB"
            f"{' (frame-deduplicated)' if frame_stack(spec) else ''}, "
            f"{'saved in checkpoints' if saved else f'NOT saved in checkpoints ({why})'} | {describe_replay_ratio(c)}, "
            f"batch {c.batch_size} | learning starts at {c.learning_starts:,} | epsilon {c.start_e} -> {c.end_e} "
            f"over {c.exploration_steps:,} env steps")
    return line, dict(replay_ratio=c.updates_per_env_step, buffer_mib=nbytes / 2**20, buffer_in_checkpoints=saved)


ALGORITHM = Algorithm(
    name=ALGO, config=Config, resolve=resolve, network_spec=network_spec, init=init, update=update,
    steps_per_update=lambda c: c.steps_per_row, metric_columns=METRIC_COLUMNS,
    sharded_fields=("env", "replay"),
    updates_done=lambda c, s: s.iteration // c.iterations_per_row, unsaved=unsaved, restart=restart,
    describe=describe)
