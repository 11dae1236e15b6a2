"""Deep Q-networks (Mnih et al. 2015, Nature 518), compiled end to end.

One file, top to bottom: ``Config`` (with the ``--dqn-preset`` hyperparameter
sets) -> ``State`` -> ``init`` -> ``update`` (gradient steps on
:func:`jaxatari.ops.td.dqn_loss`) -> ``iteration`` (act, env step, buffer
insert, learn, target sync) -> ``make_chunk`` (a ``lax.scan`` of metric rows,
each a ``lax.scan`` of iterations: one compiled call) -> ``train``.

The whole act-store-sample-learn loop runs on the device. One *iteration*
steps all ``B = --num-envs`` envs once with epsilon-greedy actions, adds the
``B`` transitions to the device-resident, frame-deduplicated replay buffer
(:mod:`jaxatari.replay`, held in the training :class:`State`), then, on train
iterations, samples minibatches and takes gradient steps; the target network
follows by env-step count.

Counting. Every count in the config is in **env steps summed over envs**
(agent steps, each ``frame_skip`` = 4 emulator frames on Atari): one iteration
is ``B`` env steps. ``--learning-starts``, ``--target-network-frequency``,
``--exploration-steps`` and ``--train-frequency`` are all in env steps.

Replay ratio. ``--gradient-steps G`` updates every ``--train-frequency F`` env
steps is ``G / F`` gradient updates (of ``--batch-size`` transitions) per env
step, whatever ``B``. With ``g = gcd(F, B G)`` the compiled loop takes
``U = B G / g`` updates every ``P = F / g`` iterations (:attr:`Config.train_period`,
:attr:`Config.updates_per_train`), which is exactly ``G / F`` per env step for
any ``B``: e.g. ``F = 4, G = 1`` gives 1 update every 4 iterations with one
env and 2 updates every iteration with 8 envs. The startup line states the ratio.

Target network. Every time the env-step count crosses a multiple of
``--target-network-frequency`` the target parameters move towards the online
ones, ``theta_bar <- tau theta + (1 - tau) theta_bar``: ``--tau 1`` (default)
is the hard copy of Mnih et al. 2015; ``tau < 1`` is Polyak averaging
(``--target-network-frequency 1`` averages every iteration; if one iteration
crosses ``k`` multiples the update is applied as ``k`` of them,
``1 - (1 - tau)^k``).

Checkpoints and resume. The buffer is part of the state. ``--checkpoint-buffer``
(default) saves it with every checkpoint when it is at most
``--checkpoint-buffer-limit-gib`` (default 2 GiB: the 10k-transition Pong
buffer, ~75 MiB, is saved; the 1M-transition Nature buffer, ~7 GiB, is not), so
that a resumed run continues bit-for-bit (the runner replays the logged env
actions). Otherwise checkpoints hold everything but the buffer; a resumed run
refills the buffer for ``--learning-starts`` env steps (exploring with the
epsilon of the schedule at that point) before learning again, and is then not
exact (it says so).

Scale-out (issue #9, see :mod:`jaxatari.parallel`). ``--devices N`` (default:
all local devices; 1 = the path above, unchanged) splits the envs *and the
replay buffer* along envs over ``N`` devices under ``shard_map``
(:func:`train_sharded`): each device steps its own EnvPool and stores its envs'
transitions; each gradient step draws ``batch_size / B`` transitions from every
env with a per-env key (:func:`update_sharded`, stratified by env, so
``--batch-size`` must divide by ``--num-envs``) and gradients are averaged with
``pmean``, so params stay identical and the result does not depend on ``N``
(``--devices 1 --sharded`` is the reference). Several processes
(``--coordinator HOST:PORT --num-processes P --process-id I``, or the
``JAXATARI_*`` environment variables; ``jax.distributed``) take the same path
with ``--num-envs`` the global batch over the ``N P`` devices; process 0 logs.
Checkpoints are written once and restore on any topology: a sharded run resumes
on any number of devices and processes (to float tolerance when the count
changes, bit for bit when it does not) and stays on the sharded path even with
``--devices 1``; a plain run resumes on the plain path unless ``--devices`` is
given. ``--num-agents K`` / ``--sweep FIELD=V1,...`` (:func:`train_population`)
vmaps acting and learning over ``K`` agents stepping one EnvPool of ``K x B``
envs; agent ``k`` gets what it would get alone with seed ``seed + k``.
``--eval-every`` works in every mode (per agent for a population).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxatari import envs, parallel, replay, runner
from jaxatari.errors import ConfigError
from jaxatari.networks import NetworkSpec, QNetwork, resolve_network_spec
from jaxatari.ops.td import LOSSES, dqn_loss
from jaxatari.rollout import episode_metrics

log = logging.getLogger(__name__)

ALGO = "dqn"
OPTIMIZERS = ("adam", "rmsprop")
NETWORKS = ("auto", "nature", "impala", "mlp")


@dataclasses.dataclass(frozen=True)
class Config:
    """DQN on EnvPool. Fields left at ``None`` take the value of ``--dqn-preset``
    (see :data:`DQN_PRESETS`); explicit flags win over the preset."""

    env: str = "Pong-v5"
    """EnvPool task id, e.g. Pong-v5, Breakout-v5, CartPole-v1."""
    seed: int = 1
    """Seed for params, actions and envs (env i gets seed + i)."""
    dqn_preset: str | None = None
    """DQN hyperparameter set: nature, pong-fast or classic. Default: nature on Atari, classic otherwise.
    (Not to be confused with --preset, the Atari env options.)"""
    total_timesteps: int | None = None
    """Env steps (agent steps, summed over envs). Preset: nature 10M, pong-fast 2M, classic 500k."""
    num_envs: int | None = None
    """Parallel envs stepped per iteration. Default: 8 Atari, 4 classic control."""
    buffer_size: int | None = None
    """Replay capacity in transitions (rounded up to a multiple of --num-envs).
    Preset: nature 1M, pong-fast 10k, classic 10k."""
    batch_size: int | None = None
    """Transitions per gradient step. Preset: 32 (nature, pong-fast), 128 (classic)."""
    learning_rate: float | None = None
    """Optimizer learning rate (constant). Preset: 1e-4 (nature, pong-fast), 2.5e-4 (classic)."""
    optimizer: str | None = None
    """adam, or rmsprop (optax's centered RMSProp, as in Mnih et al. 2015). Preset: adam."""
    optimizer_eps: float | None = None
    """Optimizer epsilon. Default: 1e-8 for adam (optax's), 0.01 for rmsprop."""
    rmsprop_decay: float = 0.95
    """RMSProp decay of the squared-gradient average (--optimizer rmsprop)."""
    max_grad_norm: float | None = None
    """Global gradient-norm clip; 0 disables it. Preset: 10 (nature, classic), 0 (pong-fast)."""
    gamma: float = 0.99
    """Discount."""
    loss: str | None = None
    """TD loss: huber (delta --huber-delta) or mse (plain squared error).
    Preset: huber (nature), mse (pong-fast, classic)."""
    huber_delta: float = 1.0
    """Huber threshold (--loss huber)."""
    double_q: bool = False
    """Double DQN target: the online network picks the bootstrap action, the target network values it."""
    n_step: int = 1
    """n-step returns: sum n rewards before bootstrapping (cut at terminals, kept on truncation)."""
    target_network_frequency: int | None = None
    """Env steps between target-network updates. Preset: 1000 (nature, pong-fast), 500 (classic)."""
    tau: float = 1.0
    """Target update rate: 1 copies the online network (hard update), < 1 is Polyak averaging."""
    start_e: float | None = None
    """Initial exploration epsilon. Preset: 1.0."""
    end_e: float | None = None
    """Final exploration epsilon. Preset: 0.01 (nature, pong-fast), 0.05 (classic)."""
    exploration_fraction: float | None = None
    """Fraction of --total-timesteps over which epsilon decays linearly (if --exploration-steps is unset).
    Preset: 0.1 (nature, classic)."""
    exploration_steps: int | None = None
    """Env steps over which epsilon decays linearly; overrides --exploration-fraction. Preset: 150k (pong-fast)."""
    learning_starts: int | None = None
    """Env steps of random-ish play before the first gradient step. Preset: 80k (nature), 10k (pong-fast, classic)."""
    train_frequency: int | None = None
    """Env steps (summed over envs) between training events. Preset: 4 (nature), 1 (pong-fast), 10 (classic)."""
    gradient_steps: int = 1
    """Gradient steps per training event: the replay ratio is gradient_steps / train_frequency updates per env step."""
    target_return: float | None = None
    """Stop once the mean of the last 100 full-game training returns reaches this; the policy is saved as best.
    Preset: 19 (pong-fast), none otherwise. To train on past it: --resume RUN --target-return None (or inf)."""
    network: str = "auto"
    """auto (Nature CNN on pixels, MLP on vectors), nature, impala or mlp."""
    mlp_hidden: tuple[int, ...] = (120, 84)
    """Hidden layer sizes of the MLP torso (vector observations)."""
    mlp_activation: str = "relu"
    """Activation of the MLP torso: relu or tanh."""
    preset: str | None = None
    """Atari env preset: nature (default) or machado; 'none' for classic control."""
    env_option: tuple[str, ...] = ()
    """EnvPool option overrides, KEY=VALUE (e.g. noop_max=10 repeat_action_probability=0.25)."""
    num_threads: int = 0
    """EnvPool worker threads (0: EnvPool's default)."""
    env_backend: str = "auto"
    """auto, xla (env.xla() inside jit) or callback (host-stepped fallback)."""
    log_every: int = 1000
    """Env steps aggregated into one metrics row (rounded up to whole iterations of --num-envs steps)."""
    chunk_steps: int = 10_000
    """Env steps per compiled chunk: the granularity of progress, checkpoints, --target-return and Ctrl-C."""
    checkpoint_every: int | None = None
    """Env steps between checkpoints. Default: 1M Atari, 100k classic control."""
    checkpoint_buffer: bool = True
    """Save the replay buffer in checkpoints, so that a resumed run continues exactly, unless it is larger
    than --checkpoint-buffer-limit-gib. --no-checkpoint-buffer: never (a resumed run refills it)."""
    checkpoint_buffer_limit_gib: float = 2.0
    """Largest buffer (GiB, as printed at start) that --checkpoint-buffer saves; the 1M-transition Atari
    buffer (~7 GiB) is not saved unless this is raised."""
    keep: int = 3
    """How many latest checkpoints to keep (the best is kept separately)."""
    eval_every: int = 0
    """Env steps between evaluations (0: off; 'best' then uses the training return)."""
    eval_episodes: int = 10
    """Episodes per periodic evaluation."""
    eval_epsilon: float = 0.001
    """Exploration epsilon of the evaluation policy (0: greedy)."""
    run_dir: str | None = None
    """Output directory. Default: runs/<env>__dqn__<seed>__<timestamp>."""
    resume: str | None = None
    """Resume the run in this directory from its latest good checkpoint."""
    tensorboard: bool = True
    """Write TensorBoard events beside metrics.csv."""
    devices: int | None = None
    """Devices per process to split the env batch (and replay) over (data parallel; default: all local devices,
    or the plain path when resuming a plain run). 1 = the single-device path, unless --sharded, several processes
    or resuming a data-parallel run (which stays on the data-parallel path on any number of devices)."""
    sharded: bool = False
    """Take the data-parallel (device-invariant) code path even on one device, e.g. to compare with --devices N."""
    num_agents: int = 1
    """Train this many independent agents in one process (agent k: seed + k), vmapped, on one EnvPool."""
    sweep: str | None = None
    """One hyperparameter per agent, FIELD=V1,V2,... (e.g. learning_rate=1e-4,2.5e-4); sets --num-agents."""
    coordinator: str | None = None
    """Multi-host: HOST:PORT of process 0 for jax.distributed (or JAXATARI_COORDINATOR)."""
    num_processes: int | None = None
    """Multi-host: number of processes (or JAXATARI_NUM_PROCESSES); --num-envs is the global batch."""
    process_id: int | None = None
    """Multi-host: this process's index (or JAXATARI_PROCESS_ID); only process 0 logs."""

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


#: Fields that may change when resuming (they do not change the learning problem).
RESUMABLE = ("total_timesteps", "checkpoint_every", "keep", "eval_every", "eval_episodes", "eval_epsilon",
             "target_return", "tensorboard", "num_threads", "env_backend", "run_dir", "devices", "coordinator",
             "num_processes", "process_id")

#: Float fields ``--sweep`` may vary across the agents of a population.
SWEEPABLE = ("learning_rate", "gamma")

#: ``--dqn-preset`` hyperparameter sets, filling the fields left at ``None``.
DQN_PRESETS: dict[str, dict[str, Any]] = {
    # The DQN Atari setup of Mnih et al. (2015) as CleanRL's dqn_atari runs it: 1M
    # buffer, batch 32, Adam 1e-4, target copy every 1000 steps, epsilon 1 -> 0.01
    # over the first 10%, learning after 80k, train every 4; with the Huber loss
    # (the paper's error clipping) and a gradient-norm clip of 10, as in SB3.
    "nature": dict(
        total_timesteps=10_000_000, buffer_size=1_000_000, batch_size=32, learning_rate=1e-4,
        optimizer="adam", max_grad_norm=10.0, loss="huber", target_network_frequency=1000,
        start_e=1.0, end_e=0.01, exploration_fraction=0.1, learning_starts=80_000, train_frequency=4,
    ),
    # The Pong workload of "Deep RL Hands-On" (Lapan, ch. 6: DQN on PongNoFrameskip-v4):
    # replay 10k, learning after 10k, target sync every 1000, epsilon 1 -> 0.01 over
    # the first 150k, Adam 1e-4, batch 32, MSE loss, one update per step, no clipping,
    # stop at a mean return of 19. Its "frames" count agent steps (the loop steps the
    # frame-skipping wrapper once per "frame"), and so do we.
    "pong-fast": dict(
        total_timesteps=2_000_000, buffer_size=10_000, batch_size=32, learning_rate=1e-4,
        optimizer="adam", max_grad_norm=0.0, loss="mse", target_network_frequency=1000,
        start_e=1.0, end_e=0.01, exploration_steps=150_000, learning_starts=10_000, train_frequency=1,
        target_return=19.0,
    ),
    # Classic control (CartPole-v1), after CleanRL's dqn.py: MLP 120-84 ReLU, Adam
    # 2.5e-4, buffer 10k, batch 128, target copy every 500, train every 10, learning
    # after 10k, epsilon 1 -> 0.05; epsilon decays over 10% (CleanRL: 50%) so that
    # the training returns reach the 400 of the learning test early.
    "classic": dict(
        total_timesteps=500_000, buffer_size=10_000, batch_size=128, learning_rate=2.5e-4,
        optimizer="adam", max_grad_norm=10.0, loss="mse", target_network_frequency=500,
        start_e=1.0, end_e=0.05, exploration_fraction=0.1, learning_starts=10_000, train_frequency=10,
    ),
}

#: Accepted values of the numeric fields (``runner.check_ranges`` rules); ``--sweep`` values too.
RANGES = dict(
    runner.RUN_OPTION_RANGES, **{name: "an integer >= 1" for name in (
        "buffer_size", "batch_size", "train_frequency", "gradient_steps", "n_step", "target_network_frequency",
        "log_every")},
    learning_starts="an integer >= 0", start_e="in [0, 1]", end_e="in [0, 1]", eval_epsilon="in [0, 1]",
    gamma="in [0, 1]", rmsprop_decay="in [0, 1]", tau="in (0, 1] (1 = hard target update)",
    learning_rate="> 0", huber_delta="> 0", max_grad_norm=">= 0 (0 = no clipping)",
    optimizer_eps="> 0", exploration_fraction="in (0, 1]", exploration_steps="an integer >= 1")

ATARI_DEFAULTS = dict(num_envs=8, checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(num_envs=4, checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the preset and per-env-kind defaults and validate; raises before anything compiles."""
    envs.validate_env_id(config.env)
    atari = envs.is_atari(config.env)
    preset = config.dqn_preset or ("nature" if atari else "classic")
    if preset not in DQN_PRESETS:
        raise ConfigError(f"--dqn-preset {preset!r} is not accepted; use one of {', '.join(DQN_PRESETS)}.")
    fill = dict(ATARI_DEFAULTS if atari else CLASSIC_DEFAULTS, **DQN_PRESETS[preset])
    fill = {k: v for k, v in fill.items() if getattr(config, k) is None}
    if config.exploration_fraction is not None and config.exploration_steps is None:
        fill.pop("exploration_steps", None)  # an explicit --exploration-fraction beats the preset's step count
    if config.resume:
        fill.pop("target_return", None)  # a resume's --target-return None means: no target any more
    c = dataclasses.replace(config, dqn_preset=preset, **fill)
    c = dataclasses.replace(c, preset=envs.resolve_preset(c.env, c.preset))

    runner.check_ranges(c, RANGES)
    if not c.mlp_hidden or min(c.mlp_hidden) < 1:
        raise ConfigError(f"--mlp-hidden {' '.join(map(str, c.mlp_hidden)) or '(empty)'} is not accepted: "
                          "it needs one or more layer widths, each >= 1.")
    if c.loss not in LOSSES:
        raise ConfigError(f"--loss {c.loss!r} is not accepted; use one of {', '.join(LOSSES)}.")
    if c.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {c.optimizer!r} is not accepted; use one of {', '.join(OPTIMIZERS)}.")
    if c.network not in NETWORKS:
        raise ConfigError(f"--network {c.network!r} is not accepted for DQN; use one of {', '.join(NETWORKS)} "
                     "(recurrent cores are for the actor-critic agents).")
    if c.mlp_activation not in ("relu", "tanh"):
        raise ConfigError(f"--mlp-activation {c.mlp_activation!r} is not accepted; use relu or tanh.")
    if c.optimizer_eps is None:
        c = dataclasses.replace(c, optimizer_eps=1e-8 if c.optimizer == "adam" else 0.01)
    if c.exploration_steps is None:
        c = dataclasses.replace(c, exploration_steps=max(1, round(c.exploration_fraction * c.total_timesteps)))
    if c.total_timesteps <= c.learning_starts:
        log.warning("--total-timesteps %d does not exceed --learning-starts %d: this run fills the replay buffer "
                    "but takes no gradient step.", c.total_timesteps, c.learning_starts)
    if c.buffer_size % c.num_envs:
        c = dataclasses.replace(c, buffer_size=-(-c.buffer_size // c.num_envs) * c.num_envs)
    return c


def network_spec(c: Config, spec: envs.EnvSpec) -> NetworkSpec:
    """The Q-network of ``--network`` (``--mlp-hidden``/``--mlp-activation`` on vectors) for ``spec``."""
    kw = {} if spec.atari else dict(hidden=tuple(c.mlp_hidden), activation=c.mlp_activation)
    try:
        return resolve_network_spec(c.network, num_actions=spec.num_actions, atari=spec.atari, torso_kwargs=kw)
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


# ---------------------------------------------------------------------------
# State and init
# ---------------------------------------------------------------------------


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


def init(c: Config, spec: envs.EnvSpec, qnet: QNetwork, optimizer, obs: np.ndarray, key: jax.Array) -> State:
    """The initial state (one compiled program: run eagerly, the network's init
    alone compiles ~100 tiny XLA programs, >10 s on a small CPU)."""

    def build(obs, key):
        k_params, k_train = jax.random.split(key)
        params = qnet.init(k_params, jnp.zeros((1, *spec.obs_shape), spec.obs_dtype))
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        return State(
            params=params,
            target_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            env=envs.env_state_init(obs),
            replay=create_buffer(c, spec),
            key=k_train,
            iteration=zero(),
            updates=zero(),
            buffer_iterations=zero(),
        )

    return jax.jit(build)(obs, key)  # every output leaf is its own buffer (the state is donated)


# ---------------------------------------------------------------------------
# Update: gradient steps on minibatches from the buffer
# ---------------------------------------------------------------------------


class TrainSums(struct.PyTreeNode):
    """Sums over the gradient steps of one training event (zeros when none)."""

    count: jax.Array
    loss: jax.Array
    q: jax.Array
    grad_norm: jax.Array

    @classmethod
    def zeros(cls) -> "TrainSums":
        return cls(count=jnp.zeros((), jnp.int32), loss=jnp.zeros(()), q=jnp.zeros(()), grad_norm=jnp.zeros(()))


def update(params, target_params, opt_state, buffer: replay.BufferState, key: jax.Array, *,
           c: Config, qnet: QNetwork, optimizer, num_updates: int):
    """``num_updates`` gradient steps, each on a fresh uniform minibatch of
    ``batch_size`` (n-step) transitions.

    Args:
      params, target_params: the online and target Q-network parameters.
      opt_state: :func:`make_optimizer`'s state for ``params``.
      buffer: a :mod:`jaxatari.replay` buffer (:func:`create_buffer`) with
        at least one valid transition.
      key: the minibatches' sampling key.
      c: a resolved :class:`Config`; ``qnet``: ``QNetwork(network_spec(c, spec))``.
      num_updates: gradient steps (static).

    Returns:
      ``(params, opt_state, TrainSums)``: sums over the steps of the loss,
      the mean Q of the taken actions and the gradient norm, with their ``count``.
    """
    loss_fn = functools.partial(dqn_loss, apply_fn=qnet.apply, double_q=c.double_q, loss=c.loss,
                                huber_delta=c.huber_delta)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def sgd_step(carry, k):
        params, opt_state = carry
        batch = replay.sample(buffer, k, c.batch_size, n_step=c.n_step, gamma=c.gamma)
        (loss, info), grads = grad_fn(params, target_params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, info.q_mean, optax.tree.norm(grads))

    (params, opt_state), (loss, q, gnorm) = jax.lax.scan(
        sgd_step, (params, opt_state), jax.random.split(key, num_updates))
    sums = TrainSums(count=jnp.asarray(num_updates, jnp.int32), loss=loss.sum(), q=q.sum(), grad_norm=gnorm.sum())
    return params, opt_state, sums


def update_sharded(params, target_params, opt_state, buffer: replay.BufferState, key: jax.Array, *,
                   c: Config, qnet: QNetwork, optimizer, num_updates: int, local_envs: int):
    """:func:`update` inside ``shard_map`` over :data:`jaxatari.parallel.AXIS`, on
    this device's replay shard (the rows of its ``B/N`` envs).

    Device-invariant, stratified by env: each gradient step draws
    ``batch_size / B`` transitions, uniformly with replacement, from every env's
    own ring with ``fold_in(key, global env index)``; the loss is the mean over
    the ``batch_size`` transitions of all devices (every device holds the same
    number, so the global mean is the ``pmean`` of the local means), and the
    gradients and statistics are ``pmean``-ed, so params stay identical. The
    same key gives the same minibatch on any number of devices.
    """
    per_env = c.batch_size // c.num_envs
    env_index = parallel.env_index(local_envs)
    loss_fn = functools.partial(dqn_loss, apply_fn=qnet.apply, double_q=c.double_q, loss=c.loss,
                                huber_delta=c.huber_delta)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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

    (params, opt_state), (loss, q, gnorm) = jax.lax.scan(
        sgd_step, (params, opt_state), jax.random.split(key, num_updates))
    sums = TrainSums(count=jnp.asarray(num_updates, jnp.int32), loss=loss.sum(), q=q.sum(), grad_norm=gnorm.sum())
    return params, opt_state, sums


def target_update(target_params, params, *, crossings: jax.Array, tau: float):
    """``theta_bar <- tau_k theta + (1 - tau_k) theta_bar`` with ``tau_k = 1 - (1 - tau)^k``
    for ``k = crossings`` multiples of the target frequency crossed (no change when 0)."""
    if tau == 1.0:
        return jax.tree.map(lambda t, p: jnp.where(crossings > 0, p, t), target_params, params)
    tau_k = 1.0 - (1.0 - tau) ** crossings.astype(jnp.float32)
    return jax.tree.map(lambda t, p: (1.0 - tau_k) * t + tau_k * p, target_params, params)


# ---------------------------------------------------------------------------
# One iteration, a metrics row, a chunk
# ---------------------------------------------------------------------------


def act(state: State, *, c: Config, qnet: QNetwork, num_actions: int):
    """Epsilon-greedy actions in all ``B`` envs. Returns ``(action [B], key, k_train, epsilon)``:
    the state's next key and the key of this iteration's gradient steps."""
    B = c.num_envs
    key, k_explore, k_random, k_train = jax.random.split(state.key, 4)
    epsilon = c.epsilon_schedule(state.iteration * B)
    q = qnet.apply(state.params, state.env.obs)
    explore = jax.random.uniform(k_explore, (B,)) < epsilon
    action = jnp.where(explore, jax.random.randint(k_random, (B,), 0, num_actions), jnp.argmax(q, axis=-1))
    action = action.astype(jnp.int32)
    return action, key, k_train, epsilon


def train_due(c: Config, iteration: jax.Array, buffer_iterations: jax.Array) -> jax.Array:
    """Whether the iteration that brings the counters to these values takes gradient steps."""
    return (buffer_iterations * c.num_envs >= c.learning_starts) & (iteration % c.train_period == 0)


def observe(state: State, env_state: envs.EnvState, tr: envs.Transition, key: jax.Array, k_train: jax.Array, *,
            c: Config, qnet: QNetwork, optimizer, update_fn=update, do_train: jax.Array | None = None):
    """After the env step: store the ``B`` transitions, learn on training
    iterations (``update_fn``: :func:`update` or :func:`update_sharded`), sync
    the target. Returns ``(state, TrainSums)``. ``do_train``: the
    :func:`train_due` flag computed by the caller (a population passes it from
    outside its vmap, so that the ``lax.cond`` is not turned into a select that
    runs the update on every iteration)."""
    B = c.num_envs
    buffer = replay.add(state.replay, tr.obs, tr.action, tr.reward, tr.next_obs, tr.terminated,
                        tr.truncated, tr.valid)

    it = state.iteration + 1
    buffer_it = state.buffer_iterations + 1
    do_train = train_due(c, it, buffer_it) if do_train is None else do_train
    learn = functools.partial(update_fn, c=c, qnet=qnet, optimizer=optimizer, num_updates=c.updates_per_train)

    def skip(params, target_params, opt_state, buffer, key):
        return params, opt_state, TrainSums.zeros()

    params, opt_state, sums = jax.lax.cond(do_train, learn, skip, state.params, state.target_params,
                                           state.opt_state, buffer, k_train)
    crossings = it * B // c.target_network_frequency - state.iteration * B // c.target_network_frequency
    target_params = target_update(state.target_params, params, crossings=crossings, tau=c.tau)
    state = state.replace(params=params, target_params=target_params, opt_state=opt_state, env=env_state,
                          replay=buffer, key=key, iteration=it, updates=state.updates + sums.count,
                          buffer_iterations=buffer_it)
    return state, sums


def iteration(state: State, handle, *, c: Config, qnet: QNetwork, optimizer, step_fn, num_actions: int):
    """Act epsilon-greedily in all ``B`` envs, step them, store the transitions,
    learn on training iterations, sync the target. Returns
    ``(state, handle, (actions [B], episode outcome, TrainSums, epsilon))``."""
    action, key, k_train, epsilon = act(state, c=c, qnet=qnet, num_actions=num_actions)
    handle, env_state, tr, outcome = envs.env_step(step_fn, handle, state.env, action)
    state, sums = observe(state, env_state, tr, key, k_train, c=c, qnet=qnet, optimizer=optimizer)
    return state, handle, (action, outcome, sums, epsilon)


def act_sharded(state: State, *, c: Config, qnet: QNetwork, num_actions: int, local_envs: int):
    """:func:`act` inside ``shard_map`` on this device's ``B/N`` envs, one key per
    env (``fold_in(key, global env index)``), so actions do not depend on the split."""
    key, k_explore, k_random, k_train = jax.random.split(state.key, 4)
    epsilon = c.epsilon_schedule(state.iteration * c.num_envs)
    q = qnet.apply(state.params, state.env.obs)
    idx = parallel.env_index(local_envs)
    u = jax.vmap(lambda b: jax.random.uniform(jax.random.fold_in(k_explore, b)))(idx)
    rand = jax.vmap(lambda b: jax.random.randint(jax.random.fold_in(k_random, b), (), 0, num_actions))(idx)
    action = jnp.where(u < epsilon, rand, jnp.argmax(q, axis=-1)).astype(jnp.int32)
    return action, key, k_train, epsilon


def iteration_sharded(state: State, handle, *, c: Config, qnet: QNetwork, optimizer, step_fn, num_actions: int,
                      local_envs: int):
    """:func:`iteration` inside ``shard_map``: this device's envs and replay shard,
    :func:`act_sharded` and :func:`update_sharded`; counters (in global env steps),
    params and the target stay replicated."""
    action, key, k_train, epsilon = act_sharded(state, c=c, qnet=qnet, num_actions=num_actions,
                                                local_envs=local_envs)
    handle, env_state, tr, outcome = envs.env_step(step_fn, handle, state.env, action)
    state, sums = observe(state, env_state, tr, key, k_train, c=c, qnet=qnet, optimizer=optimizer,
                          update_fn=functools.partial(update_sharded, local_envs=local_envs))
    return state, handle, (action, outcome, sums, epsilon)


def iteration_population(state: State, handle, *, c: Config, qnet: QNetwork, step_fn, num_actions: int,
                         sweep_name: str | None, sweep_values: jax.Array | None):
    """:func:`iteration` for ``K`` agents stacked on a leading axis (``--num-agents``):
    acting and learning are vmapped over agents (each with its own value of the
    swept hyperparameter); the env step is one call of
    ``step_fn(handle, actions [K, B])`` on the joint EnvPool. Agent ``k`` gets
    what :func:`iteration` gives it alone, to float tolerance."""
    action, key, k_train, epsilon = jax.vmap(functools.partial(act, c=c, qnet=qnet, num_actions=num_actions))(state)
    handle, ts = step_fn(handle, action)
    due = train_due(c, state.iteration[0] + 1, state.buffer_iterations[0] + 1)  # the same for every agent

    def one(s, a, t, key, k_train, v):
        ck = dataclasses.replace(c, **{sweep_name: v}) if sweep_name else c
        _, env_state, tr, outcome = envs.env_step(lambda h, _: (h, t), None, s.env, a)
        s, sums = observe(s, env_state, tr, key, k_train, c=ck, qnet=qnet, optimizer=make_optimizer(ck),
                          do_train=due)
        return s, outcome, sums

    values = sweep_values if sweep_name else jnp.zeros((action.shape[0],))
    state, outcome, sums = jax.vmap(one)(state, action, ts, key, k_train, values)
    return state, handle, (action, outcome, sums, epsilon)


def _tree_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


METRIC_COLUMNS = ("epsilon", "loss", "q_mean", "grad_norm", "buffer_size")


def row_metrics(s: State, outcomes, sums: TrainSums, eps: jax.Array, *, num_envs: int) -> dict[str, jax.Array]:
    """One metrics row from the state after it and its iterations' outputs (time-major)."""
    ep = episode_metrics(outcomes)
    n = sums.count.sum()
    mean = lambda x: jnp.where(n > 0, x.sum() / jnp.maximum(n, 1), jnp.nan)  # noqa: E731
    return dict(
        update=s.updates,
        env_steps=s.iteration * num_envs,
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=envs.window_mean(s.env.stats),
        finite=jnp.isfinite(sums.loss).all() & jnp.isfinite(sums.q).all() & _tree_finite(s.params),
        epsilon=eps[-1], loss=mean(sums.loss), q_mean=mean(sums.q), grad_norm=mean(sums.grad_norm),
        buffer_size=replay.num_valid(s.replay),
    )


def make_chunk(c: Config, qnet: QNetwork, optimizer, step_fn, num_actions: int, rows_per_chunk: int):
    """A jitted ``chunk(state, handle) -> (state, handle, ChunkOutput)`` of
    ``rows_per_chunk`` metric rows of :attr:`Config.iterations_per_row`
    iterations each; ``state`` (with the buffer) is donated."""
    step = functools.partial(iteration, c=c, qnet=qnet, optimizer=optimizer, step_fn=step_fn,
                             num_actions=num_actions)

    def row(carry, _):
        def body(carry, _):
            s, h, out = step(*carry)
            return (s, h), out

        (s, h), (actions, outcomes, sums, eps) = jax.lax.scan(body, carry, None, length=c.iterations_per_row)
        return (s, h), (row_metrics(s, outcomes, sums, eps, num_envs=c.num_envs), actions)

    def chunk(state: State, handle):
        (state, handle), (metrics, actions) = jax.lax.scan(row, (state, handle), None, length=rows_per_chunk)
        actions = actions.reshape(-1, c.num_envs).astype(jnp.uint8)
        return state, handle, runner.ChunkOutput(metrics, actions)

    return jax.jit(chunk, donate_argnames=("state",))


def make_chunk_sharded(c: Config, qnet: QNetwork, optimizer, senv, state: State, rows_per_chunk: int):
    """:func:`make_chunk` across the devices of ``senv.mesh`` under ``shard_map``:
    env state and replay split along envs, everything else replicated; metrics
    are global (summed or averaged over devices), actions ``[S, B]``."""
    from jax.sharding import PartitionSpec as P

    step = functools.partial(iteration_sharded, c=c, qnet=qnet, optimizer=optimizer, step_fn=senv.step_fn,
                             num_actions=senv.spec.num_actions, local_envs=senv.local_envs)

    def row(carry, _):
        def body(carry, _):
            s, h, out = step(*carry)
            return (s, h), out

        (s, h), (actions, outcomes, sums, eps) = jax.lax.scan(body, carry, None, length=c.iterations_per_row)
        m = row_metrics(s, outcomes, sums, eps, num_envs=c.num_envs)
        for k in ("episode_return_sum", "episode_length_sum", "episode_count", "buffer_size"):
            m[k] = jax.lax.psum(m[k], parallel.AXIS)
        m["return_mean100"] = parallel.global_window_mean(s.env.stats)
        return (s, h), (m, actions)

    def chunk(state: State, handle):
        state = state.replace(env=parallel.env_state_in(state.env))
        (state, handle), (metrics, actions) = jax.lax.scan(row, (state, handle), None, length=rows_per_chunk)
        actions = actions.reshape(-1, actions.shape[-1]).astype(jnp.uint8)
        return state.replace(env=parallel.env_state_out(state.env)), handle, runner.ChunkOutput(metrics, actions)

    specs = parallel.state_specs(state, sharded_fields=("env", "replay"))
    out = runner.ChunkOutput(P(), P(None, parallel.AXIS))
    f = jax.shard_map(chunk, mesh=senv.mesh, in_specs=(specs, P(parallel.AXIS)),
                      out_specs=(specs, P(parallel.AXIS), out), check_vma=False)
    return jax.jit(f, donate_argnames=("state",))


def make_chunk_population(c: Config, qnet: QNetwork, step_fn, num_actions: int, rows_per_chunk: int,
                          sweep_name: str | None, sweep_values):
    """:func:`make_chunk` for a population of ``K`` agents: metrics are ``[R, K]``
    (``update`` and ``env_steps`` ``[R]``), actions ``[S, K * B]`` (the joint pool's order)."""
    values = None if sweep_values is None else jnp.asarray(sweep_values, jnp.float32)
    step = functools.partial(iteration_population, c=c, qnet=qnet, step_fn=step_fn, num_actions=num_actions,
                             sweep_name=sweep_name, sweep_values=values)
    metrics_of = jax.vmap(functools.partial(row_metrics, num_envs=c.num_envs), in_axes=(0, 1, 1, 1))

    def row(carry, _):
        def body(carry, _):
            s, h, out = step(*carry)
            return (s, h), out

        (s, h), (actions, outcomes, sums, eps) = jax.lax.scan(body, carry, None, length=c.iterations_per_row)
        metrics = metrics_of(s, outcomes, sums, eps)
        metrics["update"], metrics["env_steps"] = metrics["update"][0], metrics["env_steps"][0]
        return (s, h), (metrics, actions)

    def chunk(state: State, handle):
        (state, handle), (metrics, actions) = jax.lax.scan(row, (state, handle), None, length=rows_per_chunk)
        actions = actions.reshape(-1, actions.shape[-2] * actions.shape[-1]).astype(jnp.uint8)  # [S, K * B]
        return state, handle, runner.ChunkOutput(metrics, actions)

    return jax.jit(chunk, donate_argnames=("state",))


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------


class _WithoutBuffer:
    """The checkpointer as ``runner.run`` sees it, saving the state without its buffer."""

    def __init__(self, checkpointer):
        self._ckpt = checkpointer

    def save(self, step, state, **kw):
        return self._ckpt.save(step, state.replace(replay=None), **kw)

    def save_best(self, step, state, score, **kw):
        return self._ckpt.save_best(step, state.replace(replay=None), score, **kw)

    def wait(self):
        self._ckpt.wait()


def _why_not_saved(c: Config, nbytes: int) -> str:
    if not c.checkpoint_buffer:
        return "--no-checkpoint-buffer"
    return f"{nbytes / 2**30:.1f} GiB > --checkpoint-buffer-limit-gib {c.checkpoint_buffer_limit_gib:g}"


def _say_if_buffer_lost(c: Config, nbytes: int, save_buffer: bool, *, buffers: bool = False) -> None:
    """After a resume: say that the run is not an exact continuation because its
    replay buffer (``buffers``: a population's) was not checkpointed, if so.
    (Whether the envs continue exactly, :func:`runner.restore_env` has said.)"""
    if not save_buffer:
        it = "The replay buffers were" if buffers else "The replay buffer was"
        print(f"{it} not checkpointed ({_why_not_saved(c, nbytes)}): {'they refill' if buffers else 'it refills'} "
              f"for {c.learning_starts:,} env steps before learning resumes, so the resumed run is not an exact "
              "continuation.", flush=True)


def describe_replay_ratio(c: Config) -> str:
    return (f"replay ratio {c.updates_per_env_step:g} updates/env step ({c.gradient_steps} per "
            f"{c.train_frequency} env steps: {c.updates_per_train} every {c.train_period} iteration"
            f"{'s' if c.train_period > 1 else ''} of {c.num_envs} env{'s' if c.num_envs > 1 else ''})")


def make_evaluator(c: Config, qnet: QNetwork, env_options: dict[str, Any]):
    """``score(params, seed=c.seed) -> float``: the mean return of ``--eval-episodes``
    games (env seeds from ``seed + 100_000``) with the ``--eval-epsilon``-greedy
    (or greedy, at 0) Q-policy of host or single-device ``params``."""
    from jaxatari.evaluate import evaluate, q_policy

    policy_fn = q_policy(qnet.apply)  # one policy function: its compiled step is reused

    def score(params, seed: int = c.seed) -> float:
        res = evaluate(policy_fn, params, None, env_id=c.env, preset=c.preset, options=env_options,
                       episodes=c.eval_episodes, seed=seed + 100_000,
                       mode="epsilon" if c.eval_epsilon > 0 else "greedy", epsilon=c.eval_epsilon)
        return res.mean

    return score


class _Prepared(NamedTuple):
    config: Config  # with run_dir filled
    net_spec: NetworkSpec
    qnet: QNetwork
    nbytes: int  # replay bytes, all buffers
    save_buffer: bool  # the buffer goes into checkpoints
    stored: dict  # the resumed run's config.json ({} for a new run)
    schedule: runner.Schedule
    run_dir: Path


def _prepare(c: Config, spec: envs.EnvSpec, buffers: int = 1) -> _Prepared:
    """What every training path (:func:`train`, :func:`train_sharded`,
    :func:`train_population`) derives from the config and the env spec;
    ``buffers``: replay buffers held (one per agent)."""
    net_spec = network_spec(c, spec)
    nbytes = buffers * buffer_nbytes(c, spec)
    stored = runner.load_run_config(c.resume) if c.resume else {}
    sched = runner.make_schedule(c.total_timesteps, c.steps_per_row, c.chunk_steps,
                                 updates_per_chunk=stored.get("schedule", {}).get("updates_per_chunk"))
    run_dir = runner.run_dir_for(c, ALGO)
    return _Prepared(dataclasses.replace(c, run_dir=str(run_dir)), net_spec, QNetwork(net_spec), nbytes,
                     c.checkpoint_buffer and nbytes <= c.checkpoint_buffer_limit_gib * 2**30, stored, sched, run_dir)


def train(config: Config) -> runner.RunResult:
    """Train DQN as configured; returns the final :class:`jaxatari.runner.RunResult`."""
    from jaxatari.checkpoint import Checkpointer

    c = resolve(config)
    parallel.initialize_distributed(c.coordinator, c.num_processes, c.process_id)
    if c.num_agents > 1 or c.sweep:
        if c.devices not in (None, 1):
            raise parallel.ParallelError(f"--num-agents {c.num_agents} runs on one device; drop --devices {c.devices}.")
        if jax.process_count() > 1:
            raise parallel.ParallelError(f"--num-agents {c.num_agents} runs in one process; drop --num-processes "
                                         f"{jax.process_count()} (or start one population per process).")
        return train_population(c)
    devices, sharded = resolve_devices(c)
    if sharded:
        return train_sharded(dataclasses.replace(c, devices=devices, sharded=True))
    env_options = envs.parse_env_options(c.env_option)
    env, spec = envs.make(c.env, c.num_envs, seed=c.seed, preset=c.preset, options=env_options,
                          num_threads=c.num_threads)
    c, net_spec, qnet, nbytes, save_buffer, stored, sched, run_dir = _prepare(c, spec)
    optimizer = make_optimizer(c)

    obs, _ = env.reset()
    make_state = functools.partial(init, c, spec, qnet, optimizer, obs, jax.random.PRNGKey(c.seed))
    # Before a resume replays the action log: a backend that cannot step these envs fails here, at once.
    handle, step_fn, backend = envs.make_step_fn(env, spec, c.env_backend)

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        start_chunk = 0
        meta: dict[str, Any] = {}
        if not c.resume:
            state = make_state()
        else:
            target = jax.eval_shape(make_state)  # no second buffer in memory
            restored = ckpt.restore_latest(runner.abstract(target if save_buffer else target.replace(replay=None)))
            state, meta = restored.state, dict(restored.meta or {})
            if not save_buffer:  # refill from scratch
                state = state.replace(replay=create_buffer(c, spec), buffer_iterations=jnp.zeros((), jnp.int32))
            iterations = int(state.iteration)
            runner.check_unfinished(run_dir, iterations * c.num_envs, sched.total_steps)
            if iterations % (c.iterations_per_row * sched.updates_per_chunk):
                raise ConfigError(f"Checkpoint at iteration {iterations} is not on a chunk boundary.")
            start_chunk = iterations // (c.iterations_per_row * sched.updates_per_chunk)
            exact = runner.restore_env(env, run_dir, iterations, np.asarray(state.env.obs), c.num_envs)
            if not exact:
                state = state.replace(env=runner.restart_episodes(state.env))
            print(f"Resumed {run_dir} at env step {iterations * c.num_envs:,}.", flush=True)
            _say_if_buffer_lost(c, nbytes, save_buffer)
        runner.write_config(run_dir, dict(
            runner.config_to_json(c), algo=ALGO, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            schedule=dataclasses.asdict(sched), env_backend_used=backend, versions=runner.versions(),
            replay_ratio=c.updates_per_env_step, buffer_mib=nbytes / 2**20, buffer_in_checkpoints=save_buffer,
        ))
        print(f"DQN on {c.env} (preset {c.preset}: {spec.options}) | dqn-preset {c.dqn_preset} | "
              f"{c.num_envs} envs | network {net_spec.torso} | loss {c.loss}"
              f"{' | double Q' if c.double_q else ''}{f' | {c.n_step}-step' if c.n_step > 1 else ''} | "
              f"env backend {backend} | {jax.default_backend()} | run dir {run_dir}", flush=True)
        saved = "saved in checkpoints" if save_buffer else f"NOT saved in checkpoints ({_why_not_saved(c, nbytes)})"
        print(f"Replay buffer: {c.buffer_size:,} transitions, {nbytes / 2**20:,.1f} MiB on {jax.default_backend()}"
              f"{' (frame-deduplicated)' if frame_stack(spec) else ''}, {saved} | "
              f"{describe_replay_ratio(c)}, batch {c.batch_size} | learning starts at {c.learning_starts:,} | "
              f"epsilon {c.start_e} -> {c.end_e} over {c.exploration_steps:,} env steps", flush=True)

        eval_fn = make_evaluator(c, qnet, env_options) if c.eval_every else None
        chunk_fn = make_chunk(c, qnet, optimizer, step_fn, spec.num_actions, sched.updates_per_chunk)
        return runner.run(
            run_dir=run_dir, state=state, handle=handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=c.num_envs,
            env_steps=lambda s: int(s.iteration) * c.num_envs, policy_of=lambda s: s.params,
            checkpointer=ckpt if save_buffer else _WithoutBuffer(ckpt),
            checkpoint_every=c.checkpoint_every, eval_fn=eval_fn, eval_every=c.eval_every,
            target_return=c.target_return, metric_columns=METRIC_COLUMNS, meta=meta,
            tensorboard=c.tensorboard, resume_command=runner.resume_command(ALGO, run_dir),
        )


def resolve_devices(c: Config) -> tuple[int, bool]:
    """``(devices per process, sharded)``; ``sharded`` False means the plain
    single-device path.

    The data-parallel path (:func:`train_sharded`) is taken with several
    devices (``--devices``, default: all local devices) or processes, with
    ``--sharded``, and when resuming a run that took it, even on one device: its
    minibatches and exploration keys differ from the plain path's. A plain run
    resumes on the plain path unless ``--devices`` is given. The data-parallel
    path needs ``--batch-size`` divisible by ``--num-envs`` (each env gives
    ``batch_size / num_envs`` transitions per gradient step); by default a fresh
    one-process run that does not fit stays on one device."""
    processes = jax.process_count()
    if c.num_envs % processes:
        raise parallel.ParallelError(f"--num-envs {c.num_envs} is not divisible by the {processes} processes; "
                                     "--num-envs is the global batch, split evenly over the processes.")
    stored_devices = parallel.stored_layout(runner.load_run_config(c.resume))[0] if c.resume else 0
    if c.resume and not stored_devices and c.devices is None and processes == 1:
        return 1, False
    n = parallel.resolve_devices(c.devices, c.num_envs // processes)
    forced = c.sharded or processes > 1 or stored_devices > 0
    if n == 1 and not forced:
        return 1, False
    if not c.batch_size % c.num_envs:
        return n, True
    problem = (f"--batch-size {c.batch_size} is not divisible by --num-envs {c.num_envs}; with several devices "
               "every env contributes batch_size / num_envs transitions to each gradient step")
    if c.devices is None and not forced:
        log.warning("Using 1 of %d local devices: %s.", n, problem)
        return 1, False
    raise parallel.ParallelError(problem + ".")


def train_sharded(c: Config) -> runner.RunResult:
    """``--devices N`` (or ``--sharded``, or several processes): data parallel
    over ``N`` devices in each of ``P`` processes (``jax.distributed``).

    Device ``d`` of the ``N P`` devices steps its own EnvPool of ``B / (N P)``
    envs (env ``i`` of the global batch keeps seed ``seed + i``) and holds the
    replay rows of those envs (the global buffer split along envs); each
    gradient step draws ``batch_size / B`` transitions from every env
    (:func:`update_sharded`) and gradients are averaged over devices, so params,
    target and optimiser state stay identical. The same seed and global batch
    give the same params on any number of devices and processes, to float
    tolerance (not those of the default single-device path, whose minibatches
    and exploration keys differ). Only process 0 prints, logs metrics and
    writes ``config.json``; every process writes the action log of its envs and
    takes part in the (collective) checkpoint saves.

    Every field of the state, the replay buffer included (``[B, ...]`` leaves
    split along envs), has the same global shape on every topology, so a
    checkpoint restores on any number of devices and processes
    (:func:`jaxatari.parallel.restore_latest_any_topology`), and the logged env
    actions are replayed into whatever envs this process now owns."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxatari.checkpoint import Checkpointer

    n, processes, main = c.devices, jax.process_count(), parallel.is_main_process()
    env_options = envs.parse_env_options(c.env_option)
    senv = parallel.make_sharded_envs(c.env, c.num_envs, seed=c.seed, devices_per_process=n, preset=c.preset,
                                      options=env_options, num_threads=c.num_threads, backend=c.env_backend)
    spec, mesh = senv.spec, senv.mesh
    c, net_spec, qnet, nbytes, save_buffer, stored, sched, run_dir = _prepare(c, spec)
    optimizer = make_optimizer(c)

    local_obs = senv.initial_obs
    s0 = init(dataclasses.replace(c, num_envs=1, buffer_size=1), spec, qnet, optimizer, local_obs[:1],
              jax.random.PRNGKey(c.seed))  # params, optimiser state, key and counters; env and buffer below
    # Each process materialises only the shards of its own devices.
    new_buffer = jax.jit(lambda: create_buffer(c, spec), out_shardings=NamedSharding(mesh, P(parallel.AXIS)))
    rep = functools.partial(parallel.replicate, mesh)
    state = s0.replace(params=rep(s0.params), target_params=rep(s0.target_params), opt_state=rep(s0.opt_state),
                       key=rep(s0.key), iteration=rep(s0.iteration), updates=rep(s0.updates),
                       buffer_iterations=rep(s0.buffer_iterations),
                       env=parallel.sharded_env_state(mesh, local_obs, n), replay=None)

    with Checkpointer(run_dir, keep=c.keep) as ckpt:  # on every process: orbax saves are collective
        start_chunk = 0
        meta: dict[str, Any] = {}
        if c.resume:
            old_devices, old_processes = parallel.stored_layout(stored)
            target = state.replace(replay=jax.eval_shape(new_buffer)) if save_buffer else state
            restored = parallel.restore_latest_any_topology(ckpt, target, stored)
            state, meta = restored.state, dict(restored.meta or {})
            iterations = int(parallel.fetch(state.iteration))
            runner.check_unfinished(run_dir, iterations * c.num_envs, sched.total_steps)
            if iterations % (c.iterations_per_row * sched.updates_per_chunk):
                raise ConfigError(f"Checkpoint at iteration {iterations} is not on a chunk boundary.")
            start_chunk = iterations // (c.iterations_per_row * sched.updates_per_chunk)
            exact = runner.restore_env(senv.group, run_dir, iterations, parallel.fetch(state.env.obs), c.num_envs,
                                       logged_processes=old_processes, process_index=jax.process_index(),
                                       process_count=processes)
            if not exact:
                state = state.replace(env=runner.restart_episodes(state.env))
            if main:
                print(f"Resumed {run_dir} at env step {iterations * c.num_envs:,}.", flush=True)
                if not old_devices:
                    print(f"It was trained on the plain single-device path and continues on the data-parallel one "
                          f"({n * processes} device(s)), whose minibatches and exploration keys differ: not the "
                          "run a resume without --devices would give.", flush=True)
                elif old_devices != n * processes:
                    print(f"The checkpoint was written on {old_devices} device(s) and continues on {n * processes}: "
                          "the same run to float tolerance, not bit for bit.", flush=True)
                _say_if_buffer_lost(c, nbytes, save_buffer)
        if state.replay is None:  # a fresh run, or a resumed one whose buffer was not checkpointed
            state = state.replace(replay=new_buffer(), buffer_iterations=rep(np.zeros((), np.int32)))
        if main:
            runner.write_config(run_dir, dict(
                runner.config_to_json(c), algo=ALGO, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
                schedule=dataclasses.asdict(sched), env_backend_used="xla", versions=runner.versions(),
                replay_ratio=c.updates_per_env_step, buffer_mib=nbytes / 2**20, buffer_in_checkpoints=save_buffer,
                scale_out=dict(devices_per_process=n, processes=processes, devices=n * processes, num_agents=1,
                               sweep=None),
                # the topology is given anew at each launch: a resume in one process must not wait for others
                coordinator=None, num_processes=None, process_id=None,
            ))
            saved = ("saved in checkpoints" if save_buffer else
                     f"NOT saved in checkpoints ({_why_not_saved(c, nbytes)})")
            print(f"DQN on {c.env} | {n * processes} device(s) x {senv.local_envs} envs"
                  f"{f' on {processes} processes' if processes > 1 else ''} | dqn-preset {c.dqn_preset} | "
                  f"network {net_spec.torso} | loss {c.loss} | env backend xla | {jax.default_backend()} | "
                  f"run dir {run_dir}", flush=True)
            print(f"Replay buffer: {c.buffer_size:,} transitions in {n * processes} shard(s) of "
                  f"{c.buffer_size // (n * processes):,}, {nbytes / 2**20:,.1f} MiB, {saved} | "
                  f"{describe_replay_ratio(c)}, batch {c.batch_size} ({c.batch_size // c.num_envs} per env)",
                  flush=True)
        eval_fn = None
        if c.eval_every:  # runs on process 0 only; the runner broadcasts the score
            score = make_evaluator(c, qnet, env_options)
            eval_fn = lambda params: score(jax.tree.map(parallel.fetch, params))  # noqa: E731
        chunk_fn = make_chunk_sharded(c, qnet, optimizer, senv, state, sched.updates_per_chunk)
        return runner.run(
            run_dir=run_dir, state=state, handle=senv.handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=c.num_envs,
            env_steps=lambda s: int(parallel.fetch(s.iteration)) * c.num_envs, policy_of=lambda s: s.params,
            checkpointer=ckpt if save_buffer else _WithoutBuffer(ckpt),
            checkpoint_every=c.checkpoint_every, eval_fn=eval_fn, eval_every=c.eval_every,
            target_return=c.target_return, metric_columns=METRIC_COLUMNS, meta=meta, tensorboard=c.tensorboard,
            resume_command=runner.resume_command(ALGO, run_dir), is_main=main, fetch=parallel.fetch,
        )


def train_population(c: Config) -> runner.RunResult:
    """``--num-agents K`` (or ``--sweep``): ``K`` independent agents, agent ``k``
    with seed ``seed + k`` (params, actions and envs) and its value of the swept
    field, vmapped in one compiled chunk over one EnvPool of ``K x num_envs``
    envs seeded as each agent's envs would be alone (see :mod:`jaxatari.parallel`).
    ``metrics.csv`` has an ``agent`` column; ``RUN_DIR/agents/<k>/`` holds each
    agent's final checkpoint (without its buffer) and config."""
    from jaxatari.checkpoint import Checkpointer

    name, values, K = parallel.parse_sweep(c.sweep, c.num_agents, SWEEPABLE, RANGES)
    c = dataclasses.replace(c, num_agents=K)
    env_options = envs.parse_env_options(c.env_option)
    seeds = parallel.agent_seeds(c.seed, K)
    agents = [dataclasses.replace(c, seed=s, **({name: values[k]} if name else {})) for k, s in enumerate(seeds)]
    env, spec = parallel.make_population_envs(c.env, c.num_envs, seeds, preset=c.preset, options=env_options,
                                              num_threads=c.num_threads)
    c, net_spec, qnet, nbytes, save_buffer, stored, sched, run_dir = _prepare(c, spec, buffers=K)
    total_B = K * c.num_envs
    obs, _ = env.reset()
    obs = obs.reshape(K, c.num_envs, *obs.shape[1:])

    def make_state():
        states = [init(ck, spec, qnet, make_optimizer(ck), obs[k], jax.random.PRNGKey(ck.seed))
                  for k, ck in enumerate(agents)]
        return jax.tree.map(lambda *x: jnp.stack(x), *states)

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        start_chunk = 0
        meta: dict[str, Any] = {}
        if not c.resume:
            state = make_state()
        else:
            target = jax.eval_shape(make_state)
            restored = ckpt.restore_latest(runner.abstract(target if save_buffer else target.replace(replay=None)))
            state, meta = restored.state, dict(restored.meta or {})
            if not save_buffer:
                state = state.replace(replay=jax.vmap(lambda _: create_buffer(c, spec))(jnp.arange(K)),
                                      buffer_iterations=jnp.zeros((K,), jnp.int32))
            iterations = int(np.asarray(state.iteration)[0])
            runner.check_unfinished(run_dir, iterations * c.num_envs, sched.total_steps)
            if iterations % (c.iterations_per_row * sched.updates_per_chunk):
                raise ConfigError(f"Checkpoint at iteration {iterations} is not on a chunk boundary.")
            start_chunk = iterations // (c.iterations_per_row * sched.updates_per_chunk)
            exact = runner.restore_env(env, run_dir, iterations, np.asarray(state.env.obs).reshape(
                total_B, *spec.obs_shape), total_B)
            if not exact:
                state = state.replace(env=runner.restart_episodes(state.env))
            print(f"Resumed {run_dir} at env step {iterations * c.num_envs:,} per agent.", flush=True)
            _say_if_buffer_lost(c, nbytes, save_buffer, buffers=True)
        handle, step_fn, backend = envs.make_step_fn(env, dataclasses.replace(spec, num_envs=total_B),
                                                     c.env_backend)
        runner.write_config(run_dir, dict(
            runner.config_to_json(c), algo=ALGO, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            schedule=dataclasses.asdict(sched), env_backend_used=backend, versions=runner.versions(),
            replay_ratio=c.updates_per_env_step, buffer_mib=nbytes / 2**20, buffer_in_checkpoints=save_buffer,
            scale_out=dict(devices_per_process=1, processes=1, devices=1, num_agents=K,
                           sweep=dict(name=name, values=values) if name else None),
        ))
        saved = "saved in checkpoints" if save_buffer else f"NOT saved in checkpoints ({_why_not_saved(c, nbytes)})"
        print(f"DQN on {c.env} | population of {K} agents x {c.num_envs} envs | dqn-preset {c.dqn_preset} | "
              f"network {net_spec.torso} | loss {c.loss} | env backend {backend} | {jax.default_backend()} | "
              f"run dir {run_dir}", flush=True)
        print(f"Replay buffers: {K} x {c.buffer_size:,} transitions, {nbytes / 2**20:,.1f} MiB, {saved} | "
              f"{describe_replay_ratio(c)}, batch {c.batch_size} per agent", flush=True)
        chunk_fn = make_chunk_population(c, qnet, parallel.population_step_fn(step_fn, K), spec.num_actions,
                                         sched.updates_per_chunk, name, values)
        score = make_evaluator(c, qnet, env_options) if c.eval_every else None

        def eval_population(params):  # [K] scores: agent k as a lone run with its seed would score it
            return [score(jax.tree.map(lambda x: np.asarray(x)[k], params), seed=ck.seed)
                    for k, ck in enumerate(agents)]

        eval_fn = eval_population if c.eval_every else None

        result = runner.run(
            run_dir=run_dir, state=state, handle=handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=total_B,
            env_steps=lambda s: int(np.asarray(s.iteration)[0]) * c.num_envs, policy_of=lambda s: s.params,
            checkpointer=ckpt if save_buffer else _WithoutBuffer(ckpt),
            checkpoint_every=c.checkpoint_every, eval_fn=eval_fn, eval_every=c.eval_every,
            target_return=c.target_return, metric_columns=METRIC_COLUMNS, meta=meta, tensorboard=c.tensorboard,
            resume_command=runner.resume_command(ALGO, run_dir), num_agents=K,
        )
    parallel.save_agents(run_dir, result.state.replace(replay=None), c, agents, ALGO, spec, net_spec, sched,
                         result.global_step)
    return result


def benchmark(env_id: str, num_envs: int, num_threads: int, seconds: float, **overrides) -> dict[str, float]:
    """Training SPS after compilation and after learning has started (for
    ``benchmarks/throughput.py`` and ``benchmarks/dqn_throughput.py``).

    Defaults differ from training only where a benchmark needs it: a 100k
    buffer (``buffer_size``) and ``learning_starts`` of one row, so that
    every timed step includes the learning at the preset's replay ratio.
    """
    import time

    overrides = dict(dict(buffer_size=100_000, learning_starts=1), **overrides)
    c = resolve(Config(env=env_id, num_envs=num_envs, num_threads=num_threads, total_timesteps=10**9,
                       **overrides))
    env, spec = envs.make(c.env, c.num_envs, seed=c.seed, preset=c.preset, num_threads=c.num_threads)
    qnet = QNetwork(network_spec(c, spec))
    optimizer = make_optimizer(c)
    obs, _ = env.reset()
    state = init(c, spec, qnet, optimizer, obs, jax.random.PRNGKey(c.seed))
    handle, step_fn, backend = envs.make_step_fn(env, spec, c.env_backend)
    chunk = make_chunk(c, qnet, optimizer, step_fn, spec.num_actions, 1)
    t0 = time.perf_counter()
    compiled = chunk.lower(state, handle).compile()
    compile_s = time.perf_counter() - t0
    state, handle, out = compiled(state, handle)
    jax.block_until_ready(out)
    steps, updates0, t0 = 0, int(state.updates), time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps == 0:
        state, handle, out = compiled(state, handle)
        jax.block_until_ready(out.metrics["loss"])
        steps += c.steps_per_row
    dt = time.perf_counter() - t0
    return dict(sps=steps / dt, compile_s=compile_s, steps=steps, backend=backend,
                updates_per_s=(int(state.updates) - updates0) / dt, replay_ratio=c.updates_per_env_step,
                batch_size=c.batch_size, buffer_mib=replay.nbytes(state.replay) / 2**20,
                dqn_preset=c.dqn_preset)
