"""Proximal policy optimisation (Schulman et al. 2017), compiled end to end.

One file, top to bottom: ``Config`` -> ``State`` -> ``init`` -> ``update``
(rollout, GAE, epochs of minibatch SGD on :func:`jaxatari.ops.ppo_loss`) ->
``make_chunk`` (a ``lax.scan`` of updates, one compiled call) -> ``train``.

Feed-forward and recurrent (``--network cfc``) policies share the code path:
a recurrent policy carries its state across rollouts, stores it at the start of
each rollout for the update, resets it where an episode starts, and its
minibatches split along envs so that sequences stay whole (truncated BPTT at the
rollout length).
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
from jaxatari.ops import PPOBatch, gae, ppo_loss, weighted_loss
from jaxatari.rollout import bootstrap_value, rollout, rollout_population

ALGO = "ppo"


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO on EnvPool. Fields left at ``None`` take the Atari or classic-control default."""

    env: str = "Breakout-v5"
    """EnvPool task id, e.g. Breakout-v5, Pong-v5, CartPole-v1."""
    seed: int = 1
    """Seed for params, actions and envs (env i gets seed + i)."""
    total_timesteps: int | None = None
    """Env steps (agent steps, summed over envs). Default: 10M Atari, 500k classic control."""
    num_envs: int | None = None
    """Parallel envs. Default: 8 Atari, 4 classic control."""
    num_steps: int | None = None
    """Steps per env per rollout. Default 128."""
    num_minibatches: int = 4
    """Minibatches per epoch (recurrent: the envs are split into this many groups)."""
    update_epochs: int = 4
    """Epochs of SGD per rollout."""
    learning_rate: float = 2.5e-4
    """Adam learning rate."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float | None = None
    """Surrogate clip epsilon. Default: 0.1 Atari, 0.2 classic control."""
    clip_vloss: bool = True
    """Clip the value loss around the old values."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
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
    """Output directory. Default: runs/<env>__ppo__<seed>__<timestamp>."""
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

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


#: Fields that may change when resuming (they do not change the learning problem).
RESUMABLE = ("total_timesteps", "checkpoint_every", "keep", "eval_every", "eval_episodes",
             "tensorboard", "num_threads", "env_backend", "run_dir", "devices", "coordinator", "num_processes",
             "process_id")

#: Float fields ``--sweep`` may vary across the agents of a population.
SWEEPABLE = ("learning_rate", "ent_coef", "vf_coef", "gamma", "gae_lambda", "max_grad_norm", "clip_coef", "adam_eps")

#: Accepted values of the numeric fields (``runner.check_ranges`` rules); ``--sweep`` values too.
RANGES = dict(
    runner.RUN_OPTION_RANGES, num_steps="an integer >= 1", num_minibatches="an integer >= 1",
    update_epochs="an integer >= 1",
    learning_rate="> 0", adam_eps="> 0", gamma="in (0, 1]", gae_lambda="in [0, 1]", clip_coef="> 0",
    ent_coef=">= 0", vf_coef=">= 0", max_grad_norm="> 0")

ATARI_DEFAULTS = dict(total_timesteps=10_000_000, num_envs=8, num_steps=128, clip_coef=0.1,
                      checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(total_timesteps=500_000, num_envs=4, num_steps=128, clip_coef=0.2,
                        checkpoint_every=100_000)


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
    if c.network == "cfc":
        if c.num_envs % c.num_minibatches:
            raise ConfigError(
                f"--num-envs {c.num_envs} is not divisible by --num-minibatches {c.num_minibatches}; "
                "a recurrent policy splits minibatches along envs."
            )
    elif c.batch_size % c.num_minibatches:
        raise ConfigError(
            f"The batch --num-envs x --num-steps = {c.num_envs} x {c.num_steps} = {c.batch_size} is not "
            f"divisible by --num-minibatches {c.num_minibatches}."
        )
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
    """Global-norm clipping, then Adam (``--adam-eps``), its learning rate
    annealed linearly to 0 over ``num_updates`` updates' SGD steps if ``--anneal-lr``."""
    steps = num_updates * c.update_epochs * c.num_minibatches
    lr = optax.linear_schedule(c.learning_rate, 0.0, steps) if c.anneal_lr else c.learning_rate
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.adam(lr, eps=c.adam_eps))


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


def make_apply(net: ActorCritic, recurrent: bool):
    """``apply_fn(params, batch) -> (logits, values)`` for :func:`ppo_loss`.

    Feed-forward batches are flat ``[N, ...]``; recurrent ones ``[T, Bm, ...]``
    with ``batch.extras = (first [T, Bm], initial carry [Bm, ...])``.
    """
    if recurrent:
        def apply_fn(params, batch):
            first, carry0 = batch.extras
            _, logits, values = net.apply(params, carry0, batch.obs, first)
            return logits, values
    else:
        def apply_fn(params, batch):
            _, logits, values = net.apply(params, (), batch.obs[None], jnp.zeros((1, batch.obs.shape[0]), bool))
            return logits[0], values[0]
    return apply_fn


def _minibatches(batch: PPOBatch, key, num_minibatches: int, recurrent: bool) -> PPOBatch:
    """Shuffle and split into ``[M, ...]``: along samples, or along envs if recurrent."""
    if recurrent:
        B = batch.actions.shape[1]
        perm = jax.random.permutation(key, B)

        def split(x, axis):
            x = jnp.take(x, perm, axis=axis)
            x = jnp.moveaxis(x, axis, 0).reshape(num_minibatches, B // num_minibatches, *x.shape[:axis], *x.shape[axis + 1:])
            return jnp.moveaxis(x, 1, axis + 1)

        first, carry0 = batch.extras
        data = batch._replace(extras=None)
        data = jax.tree.map(lambda x: split(x, 1), data)
        return data._replace(extras=(split(first, 1), jax.tree.map(lambda x: split(x, 0), carry0)))
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch._replace(extras=None))
    N = flat.actions.shape[0]
    perm = jax.random.permutation(key, N)
    return jax.tree.map(lambda x: x[perm].reshape(num_minibatches, N // num_minibatches, *x.shape[1:]), flat)


def _tree_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def update(state: State, handle, *, c: Config, net: ActorCritic, optimizer, step_fn, recurrent: bool):
    """One PPO iteration: rollout of ``num_steps`` x ``num_envs``, then
    ``update_epochs`` x ``num_minibatches`` gradient steps.

    Args:
      state: the :class:`State` (:func:`init`).
      handle, step_fn: ``envs.make_step_fn(env, spec)``'s EnvPool handle and
        ``step_fn(handle, actions [B]) -> (handle, Timestep)``, usable inside ``jit``.
      c: a resolved :class:`Config` (:func:`resolve`).
      net: ``ActorCritic(network_spec(c, spec))``; ``recurrent``: its spec's ``recurrent``.
      optimizer: :func:`make_optimizer`'s.

    Returns:
      ``(state, handle, metrics, actions [T, B])``: ``metrics`` a dict of
      scalars (``update``, ``env_steps``, the episodes that ended:
      ``episode_return_sum``/``episode_length_sum``/``episode_count`` (full
      games, unclipped), ``loss``, ``policy_loss``, ``value_loss``,
      ``entropy``, ``approx_kl``, ``clip_fraction``, ``grad_norm``, value-fit
      statistics, ``finite``); ``actions`` the actions taken (the action log's
      rows). Jit it with ``handle`` threaded through, or use :func:`make_chunk`.
    """
    key, k_roll, k_sgd = jax.random.split(state.key, 3)
    handle, env_state, carry, traj, ep = rollout(
        net.apply, state.params, state.carry, state.env, handle, step_fn, k_roll, c.num_steps)
    new_state, metrics = learn(state, traj, ep, env_state, carry, key, k_sgd, c=c, net=net, optimizer=optimizer,
                               recurrent=recurrent)
    return new_state, handle, metrics, traj.actions


def update_sharded(state: State, handle, *, c: Config, net: ActorCritic, optimizer, step_fn, local_envs: int,
                   recurrent: bool = False):
    """:func:`update` inside ``shard_map`` over :data:`jaxatari.parallel.AXIS`:
    this device's ``B/N`` envs (and their recurrent state), device-invariant
    sampling and minibatches, and gradients and statistics summed over devices
    (see :mod:`jaxatari.parallel`)."""
    key, k_roll, k_sgd = jax.random.split(state.key, 3)
    env_index = parallel.env_index(local_envs)
    handle, env_state, carry, traj, ep = rollout(
        net.apply, state.params, state.carry, parallel.env_state_in(state.env), handle, step_fn, k_roll,
        c.num_steps, env_index=env_index)
    new_state, metrics = learn(state, traj, ep, env_state, carry, key, k_sgd, c=c, net=net, optimizer=optimizer,
                               recurrent=recurrent, env_index=env_index)
    return new_state.replace(env=parallel.env_state_out(new_state.env)), handle, metrics, traj.actions


def learn(state: State, traj, ep, env_state, carry, key, k_sgd, *, c: Config, net: ActorCritic, optimizer,
          recurrent: bool, env_index: jax.Array | None = None):
    """GAE and the epochs of minibatch SGD on one rollout; returns ``(state, metrics)``.

    ``env_index`` (global env indices ``[B/N]``) selects the sharded form: global
    advantage normalisation and masked means, gradients summed over devices.
    """
    carry0 = state.carry
    sharded = env_index is not None
    last_value = bootstrap_value(net.apply, state.params, carry, env_state)
    adv, ret = gae(traj.rewards, traj.values, traj.dones, last_value,
                   gamma=c.gamma, gae_lambda=c.gae_lambda, truncations=traj.truncated)
    batch = PPOBatch(obs=traj.obs, actions=traj.actions, log_probs=traj.log_probs, values=traj.values,
                     advantages=adv, returns=ret, mask=traj.valid, extras=(traj.first, carry0))

    loss_fn = functools.partial(ppo_loss, apply_fn=make_apply(net, recurrent), clip_eps=c.clip_coef,
                                vf_coef=c.vf_coef, ent_coef=c.ent_coef, clip_value=c.clip_vloss,
                                normalize_advantages=c.norm_adv and not sharded)
    if sharded:
        local_loss = weighted_loss(loss_fn)

        def loss_fn(params, mb):
            if c.norm_adv:
                mb = mb._replace(advantages=parallel.normalize_advantages(mb.advantages, mb.mask))
            return local_loss(params, mb, parallel.global_weight(mb.mask))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def sgd_step(carry, mb):
        params, opt_state = carry
        (loss, info), grads = grad_fn(params, mb)
        if sharded:
            loss, info, grads = jax.lax.psum((loss, info, grads), parallel.AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, info, optax.tree.norm(grads))

    def epoch(carry, k):
        if sharded and recurrent:
            (data, first), carry_mb = parallel.env_minibatches(
                (batch._replace(extras=None), batch.extras[0]), carry0, k, c.num_minibatches, env_index)
            mbs = data._replace(extras=(first, carry_mb))
        elif sharded:
            mbs = parallel.time_minibatches(batch._replace(extras=None), k, c.num_minibatches, env_index)
        else:
            mbs = _minibatches(batch, k, c.num_minibatches, recurrent)
        return jax.lax.scan(sgd_step, carry, mbs)

    (params, opt_state), (loss, info, gnorm) = jax.lax.scan(
        epoch, (state.params, state.opt_state), jax.random.split(k_sgd, c.update_epochs))

    mask = traj.valid.astype(jnp.float32)
    if sharded:
        var_y = parallel.psum_masked_var(ret, traj.valid)
        explained_var = 1.0 - parallel.psum_masked_var(ret - traj.values, traj.valid) / jnp.maximum(var_y, 1e-8)
        ep = jax.lax.psum(ep, parallel.AXIS)
        return_mean100 = parallel.global_window_mean(env_state.stats)
        value_mean = parallel.psum_masked_mean(traj.values, mask)
        return_target_mean = parallel.psum_masked_mean(ret, mask)
    else:
        var_y = jnp.var(ret, where=traj.valid)
        explained_var = 1.0 - jnp.var(ret - traj.values, where=traj.valid) / jnp.maximum(var_y, 1e-8)
        return_mean100 = envs.window_mean(env_state.stats)
        value_mean = (traj.values * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        return_target_mean = (ret * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    new_state = state.replace(params=params, opt_state=opt_state, env=env_state, carry=carry,
                              key=key, update=state.update + 1)
    metrics = dict(
        update=new_state.update,
        env_steps=new_state.update * (c.num_envs * c.num_steps),
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=return_mean100,
        finite=jnp.isfinite(loss).all() & _tree_finite(params),
        loss=loss.mean(), policy_loss=info.policy_loss.mean(), value_loss=info.value_loss.mean(),
        entropy=info.entropy.mean(), approx_kl=info.approx_kl.mean(), clip_fraction=info.clip_fraction.mean(),
        grad_norm=gnorm.mean(), explained_variance=explained_var,
        value_mean=value_mean, return_target_mean=return_target_mean,
    )
    return new_state, metrics


def update_population(state: State, handle, *, c: Config, net: ActorCritic, step_fn, recurrent: bool,
                      num_updates: int, sweep_name: str | None, sweep_values: jax.Array | None):
    """:func:`update` for ``K`` agents stacked on a leading axis (``--num-agents``):
    one rollout on the joint EnvPool, then each agent's learning step, vmapped,
    with its own value of the swept hyperparameter. Agent ``k`` gets what
    :func:`update` gives it alone, to float tolerance."""
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(state.key)
    key, k_roll, k_sgd = keys[:, 0], keys[:, 1], keys[:, 2]
    handle, env_state, carry, traj, ep = rollout_population(
        net.apply, state.params, state.carry, state.env, handle, step_fn, k_roll, c.num_steps)

    def one(s, tr, e, es, cy, k, ks, v):
        ck = dataclasses.replace(c, **{sweep_name: v}) if sweep_name else c
        s, m = learn(s, tr, e, es, cy, k, ks, c=ck, net=net, optimizer=make_optimizer(ck, num_updates),
                     recurrent=recurrent)
        m["learning_rate"] = jnp.asarray(ck.learning_rate, jnp.float32)  # the base rate, annealed in the chunk
        return s, m

    values = sweep_values if sweep_name else jnp.zeros((state.key.shape[0],))
    new_state, metrics = jax.vmap(one)(state, traj, ep, env_state, carry, key, k_sgd, values)
    return new_state, handle, metrics, traj.actions


METRIC_COLUMNS = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                  "grad_norm", "explained_variance", "value_mean", "return_target_mean", "learning_rate")


def _chunk_of_updates(upd, c: Config, updates_per_chunk: int, num_updates: int):
    """``chunk(state, handle)``: a ``lax.scan`` of ``updates_per_chunk`` calls of
    ``upd(state, handle) -> (state, handle, metrics, actions [T, B])``, logging the
    learning rate each update used; shared by :func:`make_chunk` and
    :func:`make_chunk_sharded`."""

    def chunk(state: State, handle):
        def body(carry, _):
            s, h = carry
            s, h, m, a = upd(s, h)
            frac = 1.0 - (s.update - 1) / num_updates
            m["learning_rate"] = c.learning_rate * (frac if c.anneal_lr else 1.0)
            return (s, h), (m, a)

        (state, handle), (metrics, actions) = jax.lax.scan(body, (state, handle), None, length=updates_per_chunk)
        actions = actions.reshape(-1, actions.shape[-1]).astype(jnp.uint8)
        return state, handle, runner.ChunkOutput(metrics, actions)

    return chunk


def make_chunk(c: Config, net: ActorCritic, optimizer, step_fn, recurrent: bool, updates_per_chunk: int, num_updates: int):
    """A jitted ``chunk(state, handle) -> (state, handle, ChunkOutput)`` of
    ``updates_per_chunk`` updates; ``state`` is donated."""
    upd = functools.partial(update, c=c, net=net, optimizer=optimizer, step_fn=step_fn, recurrent=recurrent)
    chunk = _chunk_of_updates(upd, c, updates_per_chunk, num_updates)
    return jax.jit(chunk, donate_argnames=("state",))


def make_chunk_sharded(c: Config, net: ActorCritic, optimizer, senv: parallel.ShardedEnvs, state: State,
                       updates_per_chunk: int, num_updates: int):
    """:func:`make_chunk` across the devices of ``senv.mesh``: the same chunk, under
    ``shard_map``; ``state`` holds replicated params and env state split along envs."""
    from jax.sharding import PartitionSpec as P

    upd = functools.partial(update_sharded, c=c, net=net, optimizer=optimizer, step_fn=senv.step_fn,
                            local_envs=senv.local_envs, recurrent=net.spec.recurrent)
    chunk = _chunk_of_updates(upd, c, updates_per_chunk, num_updates)
    specs = parallel.state_specs(state)
    out = runner.ChunkOutput(P(), P(None, parallel.AXIS))
    f = jax.shard_map(chunk, mesh=senv.mesh, in_specs=(specs, P(parallel.AXIS)),
                      out_specs=(specs, P(parallel.AXIS), out), check_vma=False)
    return jax.jit(f, donate_argnames=("state",))


def make_chunk_population(c: Config, net: ActorCritic, step_fn, recurrent: bool, updates_per_chunk: int,
                          num_updates: int, sweep_name: str | None, sweep_values):
    """:func:`make_chunk` for a population: metrics are ``[U, K]`` (``update`` and
    ``env_steps`` ``[U]``), actions ``[S, K * B]`` (the joint pool's order)."""
    values = None if sweep_values is None else jnp.asarray(sweep_values, jnp.float32)
    upd = functools.partial(update_population, c=c, net=net, step_fn=step_fn, recurrent=recurrent,
                            num_updates=num_updates, sweep_name=sweep_name, sweep_values=values)
    sgd_steps = c.update_epochs * c.num_minibatches

    def chunk(state: State, handle):
        def body(carry, _):
            s, h = carry
            s, h, m, a = upd(s, h)
            frac = 1.0 - (s.update - 1) * sgd_steps / (num_updates * sgd_steps)
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
    """Train PPO as configured; returns the final :class:`jaxatari.runner.RunResult`."""
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
        print(f"PPO on {c.env} (preset {c.preset}: {spec.options}) | {c.num_envs} envs x {c.num_steps} steps | "
              f"network {net_spec.torso}{'+cfc' if net_spec.recurrent else ''} | "
              f"env backend {backend} | {jax.default_backend()} | run dir {run_dir}", flush=True)

        eval_fn = None
        if c.eval_every:
            from jaxatari.evaluate import actor_critic_eval_fn

            eval_fn = actor_critic_eval_fn(net, net_spec, env_id=c.env, preset=c.preset, options=env_options,
                                           episodes=c.eval_episodes, seed=c.seed + 100_000)

        chunk_fn = make_chunk(c, net, optimizer, step_fn, net_spec.recurrent, sched.updates_per_chunk, sched.num_updates)
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
    chunk = make_chunk(c, net, optimizer, step_fn, net_spec.recurrent, 1, 10**6)
    t0 = time.perf_counter()
    compiled = chunk.lower(state, handle).compile()
    compile_s = time.perf_counter() - t0
    state, handle, out = compiled(state, handle)
    jax.block_until_ready(out)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps == 0:
        state, handle, out = compiled(state, handle)
        jax.block_until_ready(out.metrics["loss"])
        steps += c.batch_size
    dt = time.perf_counter() - t0
    return dict(sps=steps / dt, compile_s=compile_s, steps=steps, backend=backend, batch=c.batch_size)
