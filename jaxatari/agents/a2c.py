"""Synchronous advantage actor-critic (A2C; Mnih et al. 2016, arXiv:1602.01783), compiled end to end.

One file, top to bottom: ``Config`` -> ``State`` -> ``init`` -> ``update``
(rollout, value targets, one RMSProp step on :func:`jaxatari.ops.a2c_loss`) ->
:data:`ALGORITHM`, which :func:`jaxatari.driver.train` trains. ``update`` sees
one device's share of the envs inside ``shard_map`` (one device is N = 1), as
PPO's does.

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

import jax
import jax.numpy as jnp
import optax

from jaxatari import configs, envs, parallel
from jaxatari.algorithm import Algorithm, Context
from jaxatari.errors import ConfigError
from jaxatari.networks import ActorCritic, NetworkSpec, resolve_network_spec
from jaxatari.ops import A2CBatch, a2c_loss, all_finite, gae, n_step_returns, weighted_loss
from jaxatari.rollout import State as OnPolicyState
from jaxatari.rollout import Trajectory, bootstrap_value, device_rollout, init_state

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
    """Devices to split the env batch over (data parallel; default: all local devices)."""
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

#: Accepted values of the numeric fields (``configs.check_ranges`` rules); ``--sweep`` values too.
RANGES = dict(
    configs.RUN_OPTION_RANGES, num_steps="an integer >= 1", ent_coef=">= 0", vf_coef=">= 0",
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
        c = dataclasses.replace(c, chunk_steps=configs.default_chunk_steps(envs.is_atari(c.env)))
    configs.check_ranges(c, RANGES)
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


State = OnPolicyState  # params, opt_state, env, carry (recurrent), key, update counter


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


def init(c: Config, ctx: Context, env_state: envs.EnvState, key: jax.Array) -> State:
    """The training state before update 0 (:func:`jaxatari.rollout.init_state`)."""
    return init_state(ctx, env_state, key, make_optimizer(c, ctx.num_updates), c.num_envs)


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


def update(c: Config, ctx: Context, state: State, handle):
    """One A2C iteration on this device's envs: a rollout of ``num_steps`` steps,
    then one gradient step on the global batch.

    The arguments are :func:`jaxatari.agents.ppo.update`'s. Returns ``(state,
    handle, metrics, actions [T, B/N])``, ``metrics`` a dict of scalars over every
    device (:data:`METRIC_COLUMNS` and the episode sums, as PPO's)."""
    key, k_roll = jax.random.split(state.key)
    handle, env_state, carry, traj, ep, _ = device_rollout(ctx, state, handle, k_roll, c.num_steps)
    new_state, metrics = learn(c, ctx, state, traj, ep, env_state, carry, key)
    return new_state.replace(env=parallel.env_state_out(new_state.env)), handle, metrics, traj.actions


def learn(c: Config, ctx: Context, state: State, traj: Trajectory, ep, env_state, carry, key):
    """Value targets and one gradient step on one rollout; returns ``(state, metrics)``.
    The loss is the global masked mean and gradients are summed over devices."""
    net = ActorCritic(ctx.net_spec)
    optimizer = make_optimizer(c, ctx.num_updates)
    carry0 = state.carry
    last_value = bootstrap_value(net.apply, state.params, carry, env_state)
    adv, targets = value_targets(traj, last_value, target=c.target, gamma=c.gamma, gae_lambda=c.gae_lambda)
    batch = A2CBatch(obs=traj.obs, actions=traj.actions, advantages=adv, targets=targets, mask=traj.valid,
                     extras=(traj.first, carry0))

    local_loss = weighted_loss(functools.partial(a2c_loss, apply_fn=make_apply(net), vf_coef=c.vf_coef,
                                                 ent_coef=c.ent_coef))

    def loss_fn(params, b):
        return local_loss(params, b, parallel.global_weight(b.mask))

    (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    loss, info, grads = jax.lax.psum((loss, info, grads), parallel.AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    valid = traj.valid
    var_y = parallel.psum_masked_var(targets, valid)
    explained_var = 1.0 - parallel.psum_masked_var(targets - traj.values, valid) / jnp.maximum(var_y, 1e-8)
    ep = jax.lax.psum(ep, parallel.AXIS)
    mmean = parallel.psum_masked_mean
    new_state = state.replace(params=params, opt_state=opt_state, env=env_state, carry=carry,
                              key=key, update=state.update + 1)
    frac = 1.0 - state.update / ctx.num_updates  # the learning rate this update used
    metrics = dict(
        update=new_state.update,
        env_steps=new_state.update * (c.num_envs * c.num_steps),
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=parallel.global_window_mean(env_state.stats),
        finite=jnp.isfinite(loss) & all_finite(params),
        loss=loss, policy_loss=info.policy_loss, value_loss=info.value_loss, entropy=info.entropy,
        grad_norm=optax.tree.norm(grads), explained_variance=explained_var,
        value_mean=mmean(traj.values, valid), return_target_mean=mmean(targets, valid),
        advantage_mean=mmean(adv, valid),
        learning_rate=jnp.asarray(c.learning_rate * (frac if c.anneal_lr else 1.0), jnp.float32),
    )
    return new_state, metrics


METRIC_COLUMNS = ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "explained_variance",
                  "value_mean", "return_target_mean", "advantage_mean", "learning_rate")


ALGORITHM = Algorithm(
    name=ALGO, config=Config, resolve=resolve, network_spec=network_spec, init=init, update=update,
    steps_per_update=lambda c: c.batch_size, metric_columns=METRIC_COLUMNS, resumable=RESUMABLE,
    sweepable=SWEEPABLE, ranges=RANGES)
