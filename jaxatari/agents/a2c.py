"""Synchronous advantage actor-critic (A2C; Mnih et al. 2016, arXiv:1602.01783), compiled end to end.

One file, top to bottom: ``Config`` -> ``State`` -> ``init`` -> ``update``
(rollout, value targets, one RMSProp step on :func:`jaxatari.ops.a2c_loss`) ->
``make_chunk`` (a ``lax.scan`` of updates, one compiled call) -> ``train``.

The synchronous variant of A3C as in OpenAI baselines and Stable-Baselines3:
``num_envs`` envs each take ``num_steps`` steps, then the whole ``[T, B]``
batch makes one gradient step. Value targets are selectable
(``--target``): n-step bootstrapped returns over the rollout
(:func:`jaxatari.ops.n_step_returns`, the published A2C) or GAE returns
(:func:`jaxatari.ops.gae`, ``--gae-lambda``). The rollout, the returns, the loss,
the networks and the host loop are the shared ones; only the glue is here.

Feed-forward and recurrent (``--network cfc``) policies share the code path:
the update re-runs the network over the rollout from the recurrent state stored
at its start (truncated BPTT at the rollout length).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxatari import envs, parallel, runner
from jaxatari.errors import ConfigError
from jaxatari.networks import ActorCritic, NetworkSpec, init_actor_critic, initial_carry, resolve_network_spec
from jaxatari.ops import A2CBatch, a2c_loss, gae, masked_mean, n_step_returns, weighted_loss
from jaxatari.rollout import Trajectory, bootstrap_value, rollout, rollout_population

ALGO = "a2c"
TARGETS = ("nstep", "gae")


@dataclasses.dataclass(frozen=True)
class Config:
    """A2C on EnvPool. Fields left at ``None`` take the Atari or classic-control default."""

    env: str = "SpaceInvaders-v5"
    """EnvPool task id, e.g. SpaceInvaders-v5, Breakout-v5, CartPole-v1."""
    seed: int = 1
    """Seed for params, actions and envs (env i gets seed + i)."""
    total_timesteps: int | None = None
    """Env steps (agent steps, summed over envs). Default: 10M Atari, 500k classic control."""
    num_envs: int | None = None
    """Parallel envs. Default: 16 Atari, 8 classic control."""
    num_steps: int = 5
    """Steps per env per rollout (the n of the n-step returns)."""
    target: str = "nstep"
    """Value target: nstep (bootstrapped n-step returns, the published A2C) or gae (GAE returns)."""
    gae_lambda: float = 0.95
    """GAE lambda (used with --target gae only)."""
    learning_rate: float | None = None
    """RMSProp learning rate. Default: 7e-4 Atari, 2e-3 classic control."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    rms_alpha: float = 0.99
    """RMSProp decay of the mean squared gradient."""
    rms_eps: float = 1e-5
    """RMSProp epsilon, added inside the square root (TensorFlow / baselines convention)."""
    gamma: float = 0.99
    """Discount."""
    ent_coef: float | None = None
    """Entropy bonus coefficient. Default: 0.01 Atari, 0.0 classic control."""
    vf_coef: float | None = None
    """Value loss coefficient (the value loss is a plain MSE). Default: 0.25 Atari, 0.5 classic control."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    preset: str | None = None
    """Atari preset: nature (default) or machado; 'none' for classic control."""
    env_option: tuple[str, ...] = ()
    """EnvPool option overrides, KEY=VALUE (e.g. noop_max=10 repeat_action_probability=0.25)."""
    network: str = "auto"
    """auto (Nature CNN on pixels, MLP on vectors), nature, impala, mlp, or cfc (recurrent)."""
    torso: str = "auto"
    """Torso under --network cfc: auto (ncps conv block on pixels, MLP on vectors), convblock, impala, nature, mlp."""
    cfc_units: int = 64
    """CfC hidden units (--network cfc)."""
    cfc_mode: str = "default"
    """CfC mode: default, no_gate or pure."""
    cfc_backbone_units: int = 128
    """CfC backbone width."""
    cfc_backbone_layers: int = 1
    """CfC backbone depth."""
    num_threads: int = 0
    """EnvPool worker threads (0: EnvPool's default)."""
    env_backend: str = "auto"
    """auto, xla (env.xla() inside jit) or callback (host-stepped fallback)."""
    chunk_steps: int | None = None
    """Env steps per compiled chunk: the granularity of progress, checkpoints and Ctrl-C. Default: 50k; 10k for
    Atari on a CPU."""
    checkpoint_every: int | None = None
    """Env steps between checkpoints. Default: 1M Atari, 100k classic control."""
    keep: int = 3
    """How many latest checkpoints to keep (the best is kept separately)."""
    eval_every: int = 0
    """Env steps between evaluations (full games, the policy sampling; 0: off; 'best' then uses the training return)."""
    eval_episodes: int = 10
    """Episodes per periodic evaluation."""
    run_dir: str | None = None
    """Output directory. Default: runs/<env>__a2c__<seed>__<timestamp>."""
    resume: str | None = None
    """Resume the run in this directory from its latest good checkpoint."""
    tensorboard: bool = True
    """Write TensorBoard events beside metrics.csv."""
    devices: int | None = None
    """Devices to split the env batch over (data parallel; default: all local devices). 1 = the single-device path."""
    sharded: bool = False
    """Take the data-parallel (device-invariant) code path even on one device, e.g. to compare with --devices N."""
    num_agents: int = 1
    """Train this many independent agents in one process (agent k: seed + k), vmapped, on one EnvPool."""
    sweep: str | None = None
    """One hyperparameter per agent, FIELD=V1,V2,... (e.g. learning_rate=1e-4,2.5e-4,5e-4); sets --num-agents."""
    coordinator: str | None = None
    """Multi-host: HOST:PORT of process 0 for jax.distributed (or JAXATARI_COORDINATOR)."""
    num_processes: int | None = None
    """Multi-host: number of processes (or JAXATARI_NUM_PROCESSES); --num-envs is the global batch."""
    process_id: int | None = None
    """Multi-host: this process's index (or JAXATARI_PROCESS_ID); only process 0 logs."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


#: Fields that may change when resuming (they do not change the learning problem).
RESUMABLE = ("total_timesteps", "checkpoint_every", "keep", "eval_every", "eval_episodes",
             "tensorboard", "num_threads", "env_backend", "run_dir", "devices", "coordinator", "num_processes",
             "process_id")

#: Float fields ``--sweep`` may vary across the agents of a population.
SWEEPABLE = ("learning_rate", "ent_coef", "vf_coef", "gamma", "gae_lambda", "max_grad_norm", "rms_eps", "rms_alpha")

#: Accepted values of the numeric fields (``runner.check_ranges`` rules); ``--sweep`` values too.
RANGES = dict(
    runner.RUN_OPTION_RANGES, num_steps="an integer >= 1", ent_coef=">= 0", vf_coef=">= 0",
    gae_lambda="in [0, 1]", gamma="in (0, 1]", rms_alpha="in [0, 1)", learning_rate="> 0", rms_eps="> 0",
    max_grad_norm="> 0")

#: The published Atari A2C (baselines / SB3 zoo): 16 envs x 5 steps, RMSProp 7e-4.
ATARI_DEFAULTS = dict(total_timesteps=10_000_000, num_envs=16, learning_rate=7e-4,
                      ent_coef=0.01, vf_coef=0.25, checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(total_timesteps=500_000, num_envs=8, learning_rate=2e-3,
                        ent_coef=0.0, vf_coef=0.5, checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the per-env-kind defaults and validate; raises before anything compiles."""
    envs.validate_env_id(config.env)
    defaults = ATARI_DEFAULTS if envs.is_atari(config.env) else CLASSIC_DEFAULTS
    fill = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    c = dataclasses.replace(config, **fill)
    c = dataclasses.replace(c, preset=envs.resolve_preset(c.env, c.preset))
    if c.chunk_steps is None:
        c = dataclasses.replace(c, chunk_steps=runner.default_chunk_steps(envs.is_atari(c.env)))
    runner.check_ranges(c, RANGES)
    if c.target not in TARGETS:
        raise ConfigError(f"--target {c.target!r} is not accepted; use nstep or gae.")
    if c.cfc_mode not in ("default", "no_gate", "pure"):
        raise ConfigError(f"--cfc-mode {c.cfc_mode!r} is not accepted; use default, no_gate or pure.")
    return c


def network_spec(c: Config, spec: envs.EnvSpec) -> NetworkSpec:
    """The actor-critic of ``--network``/``--torso`` (and the CfC flags) for ``spec``'s observations and actions."""
    cfc = dict(hidden_size=c.cfc_units, mode=c.cfc_mode, backbone_units=c.cfc_backbone_units,
               backbone_layers=c.cfc_backbone_layers)
    try:
        return resolve_network_spec(c.network, num_actions=spec.num_actions, atari=spec.atari,
                                    torso=c.torso, cfc=cfc)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------
# State and init
# ---------------------------------------------------------------------------


@struct.dataclass
class State:
    """Everything training needs, checkpointed whole."""

    params: Any
    opt_state: Any
    env: envs.EnvState
    carry: Any  # recurrent state per env, () when feed-forward
    key: jax.Array
    update: jax.Array  # updates done so far (int32)


def make_optimizer(c: Config, num_updates: int) -> optax.GradientTransformation:
    """Global-norm clipping, then RMSProp as in the published Atari A2C.

    The published A2C results (OpenAI baselines, ``tf.train.RMSPropOptimizer``)
    use TensorFlow's RMSProp: epsilon *inside* the square root,
    ``g / sqrt(ms + eps)``, and the mean square initialised to *ones*. PyTorch's
    ``RMSprop`` (SB3's default) puts eps outside and starts at zero, which is why
    SB3's Atari A2C setups switch to ``RMSpropTFLike``; we follow TensorFlow.
    One optimiser step per update, so the linear decay reaches 0 at the last update.
    """
    lr = optax.linear_schedule(c.learning_rate, 0.0, num_updates) if c.anneal_lr else c.learning_rate
    return optax.chain(
        optax.clip_by_global_norm(c.max_grad_norm),
        optax.rmsprop(lr, decay=c.rms_alpha, eps=c.rms_eps, initial_scale=1.0, eps_in_sqrt=True),
    )


def init(c: Config, spec: envs.EnvSpec, net_spec: NetworkSpec, optimizer, obs: np.ndarray, key: jax.Array) -> State:
    """The training state before update 0: fresh params and optimizer state,
    the envs' first observations ``obs [B, *obs_shape]`` (from ``env.reset()``),
    the zero recurrent state for ``B`` envs, update counter 0."""
    k_params, k_train = jax.random.split(key)
    _, params = init_actor_critic(net_spec, k_params, spec.obs_shape, spec.obs_dtype)
    return State(
        params=params,
        opt_state=optimizer.init(params),
        env=envs.env_state_init(obs),
        carry=initial_carry(net_spec, c.num_envs),
        key=k_train,
        update=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------


def value_targets(traj: Trajectory, last_value: jax.Array, *, target: str, gamma: float,
                  gae_lambda: float) -> tuple[jax.Array, jax.Array]:
    """``(advantages [T, B], targets [T, B])`` for a rollout.

    ``nstep``: targets are :func:`~jaxatari.ops.n_step_returns` and advantages
    ``targets - values``; ``gae``: both from :func:`~jaxatari.ops.gae`. Either
    way a time-limit truncation bootstraps from the value of the final observation.
    """
    if target == "nstep":
        ret = n_step_returns(traj.rewards, traj.dones, last_value, gamma=gamma,
                             truncations=traj.truncated, values=traj.values)
        return ret - traj.values, ret
    if target == "gae":
        return gae(traj.rewards, traj.values, traj.dones, last_value, gamma=gamma, gae_lambda=gae_lambda,
                   truncations=traj.truncated)
    raise ValueError(f"target {target!r} is not accepted; use one of {', '.join(TARGETS)}.")


def make_apply(net: ActorCritic):
    """``apply_fn(params, batch) -> (logits [T, B, A], values [T, B])`` for :func:`a2c_loss`.

    The batch is the whole rollout, ``obs [T, B, ...]`` with ``batch.extras =
    (first [T, B], carry at the rollout's start)``; a feed-forward network
    ignores both.
    """
    def apply_fn(params, batch: A2CBatch):
        first, carry0 = batch.extras
        _, logits, values = net.apply(params, carry0, batch.obs, first)
        return logits, values

    return apply_fn


def _tree_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def update(state: State, handle, *, c: Config, net: ActorCritic, optimizer, step_fn):
    """One A2C iteration: a rollout of ``num_steps`` x ``num_envs``, then one
    gradient step on the whole batch.

    The arguments are :func:`jaxatari.agents.ppo.update`'s (``state`` from
    :func:`init`; ``handle``/``step_fn`` from ``envs.make_step_fn``; ``net`` =
    ``ActorCritic(network_spec(c, spec))``; :func:`make_optimizer`'s optimizer).
    Returns ``(state, handle, metrics, actions [T, B])``, ``metrics`` a dict of
    scalars (:data:`METRIC_COLUMNS` and the episode sums, as PPO's)."""
    key, k_roll = jax.random.split(state.key)
    handle, env_state, carry, traj, ep = rollout(
        net.apply, state.params, state.carry, state.env, handle, step_fn, k_roll, c.num_steps)
    new_state, metrics = learn(state, traj, ep, env_state, carry, key, c=c, net=net, optimizer=optimizer)
    return new_state, handle, metrics, traj.actions


def update_sharded(state: State, handle, *, c: Config, net: ActorCritic, optimizer, step_fn, local_envs: int):
    """:func:`update` inside ``shard_map`` over :data:`jaxatari.parallel.AXIS`: this
    device's ``B/N`` envs, per-env sampling keys, gradients and statistics summed
    over devices (see :mod:`jaxatari.parallel`)."""
    key, k_roll = jax.random.split(state.key)
    env_index = parallel.env_index(local_envs)
    handle, env_state, carry, traj, ep = rollout(
        net.apply, state.params, state.carry, parallel.env_state_in(state.env), handle, step_fn, k_roll,
        c.num_steps, env_index=env_index)
    new_state, metrics = learn(state, traj, ep, env_state, carry, key, c=c, net=net, optimizer=optimizer,
                               sharded=True)
    return new_state.replace(env=parallel.env_state_out(new_state.env)), handle, metrics, traj.actions


def learn(state: State, traj: Trajectory, ep, env_state, carry, key, *, c: Config, net: ActorCritic, optimizer,
          sharded: bool = False):
    """Value targets and one gradient step on one rollout; returns ``(state, metrics)``.

    ``sharded``: inside ``shard_map``, the loss is the global masked mean and
    gradients are summed over devices."""
    carry0 = state.carry
    last_value = bootstrap_value(net.apply, state.params, carry, env_state)
    adv, targets = value_targets(traj, last_value, target=c.target, gamma=c.gamma, gae_lambda=c.gae_lambda)
    batch = A2CBatch(obs=traj.obs, actions=traj.actions, advantages=adv, targets=targets, mask=traj.valid,
                     extras=(traj.first, carry0))

    loss_fn = functools.partial(a2c_loss, apply_fn=make_apply(net), vf_coef=c.vf_coef, ent_coef=c.ent_coef)
    if sharded:
        local_loss = weighted_loss(loss_fn)

        def loss_fn(params, b):
            return local_loss(params, b, parallel.global_weight(b.mask))

    (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    if sharded:
        loss, info, grads = jax.lax.psum((loss, info, grads), parallel.AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    valid = traj.valid
    if sharded:
        var_y = parallel.psum_masked_var(targets, valid)
        explained_var = 1.0 - parallel.psum_masked_var(targets - traj.values, valid) / jnp.maximum(var_y, 1e-8)
        ep = jax.lax.psum(ep, parallel.AXIS)
        return_mean100 = parallel.global_window_mean(env_state.stats)
        mmean = parallel.psum_masked_mean
    else:
        var_y = jnp.var(targets, where=valid)
        explained_var = 1.0 - jnp.var(targets - traj.values, where=valid) / jnp.maximum(var_y, 1e-8)
        return_mean100 = envs.window_mean(env_state.stats)
        mmean = masked_mean
    new_state = state.replace(params=params, opt_state=opt_state, env=env_state, carry=carry,
                              key=key, update=state.update + 1)
    metrics = dict(
        update=new_state.update,
        env_steps=new_state.update * (c.num_envs * c.num_steps),
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=return_mean100,
        finite=jnp.isfinite(loss) & _tree_finite(params),
        loss=loss, policy_loss=info.policy_loss, value_loss=info.value_loss, entropy=info.entropy,
        grad_norm=optax.tree.norm(grads), explained_variance=explained_var,
        value_mean=mmean(traj.values, valid), return_target_mean=mmean(targets, valid),
        advantage_mean=mmean(adv, valid),
    )
    return new_state, metrics


def update_population(state: State, handle, *, c: Config, net: ActorCritic, step_fn, num_updates: int,
                      sweep_name: str | None, sweep_values: jax.Array | None, recurrent: bool = False):
    """:func:`update` for ``K`` agents stacked on a leading axis (``--num-agents``):
    one rollout on the joint EnvPool, then each agent's gradient step, vmapped,
    with its own value of the swept hyperparameter."""
    keys = jax.vmap(jax.random.split)(state.key)
    key, k_roll = keys[:, 0], keys[:, 1]
    handle, env_state, carry, traj, ep = rollout_population(
        net.apply, state.params, state.carry, state.env, handle, step_fn, k_roll, c.num_steps)

    def one(s, tr, e, es, cy, k, v):
        ck = dataclasses.replace(c, **{sweep_name: v}) if sweep_name else c
        s, m = learn(s, tr, e, es, cy, k, c=ck, net=net, optimizer=make_optimizer(ck, num_updates))
        m["learning_rate"] = jnp.asarray(ck.learning_rate, jnp.float32)  # the base rate, annealed in the chunk
        return s, m

    values = sweep_values if sweep_name else jnp.zeros((state.key.shape[0],))
    new_state, metrics = jax.vmap(one)(state, traj, ep, env_state, carry, key, values)
    return new_state, handle, metrics, traj.actions


METRIC_COLUMNS = ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "explained_variance",
                  "value_mean", "return_target_mean", "advantage_mean", "learning_rate")


def _chunk_of_updates(upd, c: Config, updates_per_chunk: int, num_updates: int):
    """``chunk(state, handle)``: a ``lax.scan`` of ``updates_per_chunk`` calls of
    ``upd(state, handle) -> (state, handle, metrics, actions [T, B])``, logging the
    learning rate each update used; shared by :func:`make_chunk` and
    :func:`make_chunk_sharded`."""

    def chunk(state: State, handle):
        def body(carry, _):
            s, h = carry
            s, h, m, a = upd(s, h)
            frac = 1.0 - (s.update - 1) / num_updates  # the rate this update used
            m["learning_rate"] = c.learning_rate * (frac if c.anneal_lr else 1.0)
            return (s, h), (m, a)

        (state, handle), (metrics, actions) = jax.lax.scan(body, (state, handle), None, length=updates_per_chunk)
        actions = actions.reshape(-1, actions.shape[-1]).astype(jnp.uint8)
        return state, handle, runner.ChunkOutput(metrics, actions)

    return chunk


def make_chunk(c: Config, net: ActorCritic, optimizer, step_fn, updates_per_chunk: int, num_updates: int):
    """A jitted ``chunk(state, handle) -> (state, handle, ChunkOutput)`` of
    ``updates_per_chunk`` updates; ``state`` is donated."""
    upd = functools.partial(update, c=c, net=net, optimizer=optimizer, step_fn=step_fn)
    chunk = _chunk_of_updates(upd, c, updates_per_chunk, num_updates)
    return jax.jit(chunk, donate_argnames=("state",))


def make_chunk_sharded(c: Config, net: ActorCritic, optimizer, senv: parallel.ShardedEnvs, state: State,
                       updates_per_chunk: int, num_updates: int):
    """:func:`make_chunk` across the devices of ``senv.mesh`` under ``shard_map``."""
    from jax.sharding import PartitionSpec as P

    upd = functools.partial(update_sharded, c=c, net=net, optimizer=optimizer, step_fn=senv.step_fn,
                            local_envs=senv.local_envs)
    chunk = _chunk_of_updates(upd, c, updates_per_chunk, num_updates)
    specs = parallel.state_specs(state)
    out = runner.ChunkOutput(P(), P(None, parallel.AXIS))
    f = jax.shard_map(chunk, mesh=senv.mesh, in_specs=(specs, P(parallel.AXIS)),
                      out_specs=(specs, P(parallel.AXIS), out), check_vma=False)
    return jax.jit(f, donate_argnames=("state",))


def make_chunk_population(c: Config, net: ActorCritic, step_fn, recurrent: bool, updates_per_chunk: int,
                          num_updates: int, sweep_name: str | None, sweep_values):
    """:func:`make_chunk` for a population: metrics ``[U, K]`` (``update`` and
    ``env_steps`` ``[U]``), actions ``[S, K * B]`` (the joint pool's order)."""
    values = None if sweep_values is None else jnp.asarray(sweep_values, jnp.float32)
    upd = functools.partial(update_population, c=c, net=net, step_fn=step_fn, num_updates=num_updates,
                            sweep_name=sweep_name, sweep_values=values)

    def chunk(state: State, handle):
        def body(carry, _):
            s, h = carry
            s, h, m, a = upd(s, h)
            frac = 1.0 - (s.update - 1) / num_updates
            m["learning_rate"] = m["learning_rate"] * (frac if c.anneal_lr else 1.0)
            m["update"], m["env_steps"] = m["update"][0], m["env_steps"][0]
            return (s, h), (m, a)

        (state, handle), (metrics, actions) = jax.lax.scan(body, (state, handle), None, length=updates_per_chunk)
        actions = jnp.swapaxes(actions, 1, 2)  # [U, T, K, B]
        actions = actions.reshape(-1, actions.shape[2] * actions.shape[3]).astype(jnp.uint8)
        return state, handle, runner.ChunkOutput(metrics, actions)

    return jax.jit(chunk, donate_argnames=("state",))


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------


def train(config: Config) -> runner.RunResult:
    """Train A2C as configured; returns the final :class:`jaxatari.runner.RunResult`."""
    from jaxatari.checkpoint import Checkpointer

    c = resolve(config)
    c, devices, scaled = parallel.setup(c)
    if scaled:  # --devices N > 1, --sharded, --num-agents K > 1, --sweep or several processes
        return parallel.train(sys.modules[__name__], c, devices)
    env_options = envs.parse_env_options(c.env_option)
    env, spec = envs.make(c.env, c.num_envs, seed=c.seed, preset=c.preset, options=env_options,
                          num_threads=c.num_threads)
    net_spec = network_spec(c, spec)
    net = ActorCritic(net_spec)
    stored = runner.load_run_config(c.resume) if c.resume else {}
    sched = runner.make_schedule(c.total_timesteps, c.batch_size, c.chunk_steps,
                                 updates_per_chunk=stored.get("schedule", {}).get("updates_per_chunk"))
    optimizer = make_optimizer(c, sched.num_updates)

    run_dir = runner.run_dir_for(c, ALGO)
    c = dataclasses.replace(c, run_dir=str(run_dir))
    obs, _ = env.reset()
    state = init(c, spec, net_spec, optimizer, obs, jax.random.PRNGKey(c.seed))
    # Before a resume replays the action log: a backend that cannot step these envs fails here, at once.
    handle, step_fn, backend = envs.make_step_fn(env, spec, c.env_backend)

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        start_chunk, meta = 0, {}
        if c.resume:
            state, meta, start_chunk = runner.resume_training(
                ckpt, state, run_dir=run_dir, env=env, schedule=sched, num_envs=c.num_envs, num_steps=c.num_steps)
        runner.write_config(run_dir, dict(
            runner.config_to_json(c), algo=ALGO, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            schedule=dataclasses.asdict(sched), env_backend_used=backend, versions=runner.versions(),
        ))
        print(f"A2C on {c.env} (preset {c.preset}: {spec.options}) | {c.num_envs} envs x {c.num_steps} steps | "
              f"{c.target} targets | network {net_spec.torso}{'+cfc' if net_spec.recurrent else ''} | "
              f"env backend {backend} | {jax.default_backend()} | run dir {run_dir}", flush=True)

        eval_fn = None
        if c.eval_every:
            from jaxatari.evaluate import actor_critic_eval_fn

            eval_fn = actor_critic_eval_fn(net, net_spec, env_id=c.env, preset=c.preset, options=env_options,
                                           episodes=c.eval_episodes, seed=c.seed + 100_000)

        chunk_fn = make_chunk(c, net, optimizer, step_fn, sched.updates_per_chunk, sched.num_updates)
        return runner.run(
            run_dir=run_dir, state=state, handle=handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=c.num_envs,
            env_steps=lambda s: int(s.update) * c.batch_size, policy_of=lambda s: s.params,
            checkpointer=ckpt, checkpoint_every=c.checkpoint_every, eval_fn=eval_fn, eval_every=c.eval_every,
            metric_columns=METRIC_COLUMNS, meta=meta, tensorboard=c.tensorboard,
            resume_command=runner.resume_command(ALGO, run_dir),
        )


def benchmark(env_id: str, num_envs: int, num_threads: int, seconds: float, **overrides) -> dict[str, float]:
    """Training SPS after compilation (for ``benchmarks/throughput.py``)."""
    import time

    c = resolve(Config(env=env_id, num_envs=num_envs, num_threads=num_threads, total_timesteps=10**9, **overrides))
    env, spec = envs.make(c.env, c.num_envs, seed=c.seed, preset=c.preset, num_threads=c.num_threads)
    net_spec = network_spec(c, spec)
    net = ActorCritic(net_spec)
    optimizer = make_optimizer(c, 10**6)
    obs, _ = env.reset()
    state = init(c, spec, net_spec, optimizer, obs, jax.random.PRNGKey(c.seed))
    handle, step_fn, backend = envs.make_step_fn(env, spec, c.env_backend)
    # A2C's updates are tiny (5 steps); a chunk of several keeps dispatch out of the figure.
    per_chunk = max(1, 1024 // c.batch_size)
    chunk = make_chunk(c, net, optimizer, step_fn, per_chunk, 10**6)
    t0 = time.perf_counter()
    compiled = chunk.lower(state, handle).compile()
    compile_s = time.perf_counter() - t0
    state, handle, out = compiled(state, handle)
    jax.block_until_ready(out)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps == 0:
        state, handle, out = compiled(state, handle)
        jax.block_until_ready(out.metrics["loss"])
        steps += c.batch_size * per_chunk
    dt = time.perf_counter() - t0
    return dict(sps=steps / dt, compile_s=compile_s, steps=steps, backend=backend, batch=c.batch_size,
                updates_per_chunk=per_chunk)
