"""Proximal policy optimisation (Schulman et al. 2017), compiled end to end.

One file, top to bottom: ``Config`` -> ``State`` -> ``init`` -> ``update``
(rollout, GAE, epochs of minibatch SGD on :func:`jaxatari.ops.ppo_loss`) ->
:data:`ALGORITHM`, which :func:`jaxatari.driver.train` trains.

``update`` sees one device's share of the envs inside ``shard_map`` (one
device is N = 1): actions are sampled with one key per env, minibatches permute
time within each env, and gradients and statistics are summed over devices, so
the same seed gives the same run on any number of devices (see
:mod:`jaxatari.parallel`).

Feed-forward and recurrent (``--network cfc``) policies share the code path:
a recurrent policy carries its state across rollouts, stores it at the start of
each rollout for the update, resets it where an episode starts, and its
minibatches split along envs so that sequences stay whole (truncated BPTT at the
rollout length).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from jaxatari import configs, envs, parallel
from jaxatari.algorithm import Algorithm, Context
from jaxatari.configs import ActorCriticFields, TrainFields, option
from jaxatari.errors import ConfigError
from jaxatari.networks import ActorCritic
from jaxatari.ops import PPOBatch, all_finite, gae, ppo_loss, weighted_loss
from jaxatari.rollout import State as OnPolicyState
from jaxatari.rollout import bootstrap_value, device_rollout, init_state

ALGO = "ppo"


@dataclasses.dataclass(frozen=True)
class Config(ActorCriticFields, TrainFields):
    """PPO on EnvPool. Fields left at None take the default of the env's kind:
    Atari 10M steps, 8 envs, clip 0.1; classic control 500k steps, 4 envs, clip 0.2."""

    num_steps: int | None = option(None, range="an integer >= 1")
    """Steps per env per rollout. Default 128."""
    num_minibatches: int = option(4, range="an integer >= 1")
    """Minibatches per epoch (recurrent: the envs are split into this many groups)."""
    update_epochs: int = option(4, range="an integer >= 1")
    """Epochs of SGD per rollout."""
    learning_rate: float = option(2.5e-4, range="> 0", sweepable=True)
    """Adam learning rate."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    adam_eps: float = option(1e-5, range="> 0", sweepable=True)
    """Adam epsilon."""
    gamma: float = option(0.99, range="in (0, 1]", sweepable=True)
    """Discount."""
    gae_lambda: float = option(0.95, range="in [0, 1]", sweepable=True)
    """GAE lambda."""
    clip_coef: float | None = option(None, range="> 0", sweepable=True)
    """Surrogate clip epsilon."""
    clip_vloss: bool = True
    """Clip the value loss around the old values."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    ent_coef: float = option(0.01, range=">= 0", sweepable=True)
    """Entropy bonus coefficient."""
    vf_coef: float = option(0.5, range=">= 0", sweepable=True)
    """Value loss coefficient."""
    max_grad_norm: float = option(0.5, range="> 0", sweepable=True)
    """Global gradient-norm clip."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


ATARI_DEFAULTS = dict(total_timesteps=10_000_000, num_envs=8, num_steps=128, clip_coef=0.1,
                      checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(total_timesteps=500_000, num_envs=4, num_steps=128, clip_coef=0.2,
                        checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the per-env-kind defaults and validate; raises before anything compiles."""
    c = configs.resolve(config, ATARI_DEFAULTS, CLASSIC_DEFAULTS)
    if c.network == "cfc":
        if c.num_envs % c.num_minibatches:
            raise ConfigError(
                f"--num-envs {c.num_envs} is not divisible by --num-minibatches {c.num_minibatches}; "
                "a recurrent policy splits minibatches along envs."
            )
    elif c.num_steps % c.num_minibatches:
        raise ConfigError(
            f"--num-steps {c.num_steps} is not divisible by --num-minibatches {c.num_minibatches}; "
            "a minibatch takes the same share of every env's steps."
        )
    return c


network_spec = configs.actor_critic_spec  # the actor-critic of --network/--torso and the CfC flags


# ---------------------------------------------------------------------------
# State and init
# ---------------------------------------------------------------------------


State = OnPolicyState  # params, opt_state, env, carry (recurrent), key, update counter


def make_optimizer(c: Config, num_updates: int) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (``--adam-eps``), its learning rate
    annealed linearly to 0 over ``num_updates`` updates' SGD steps if ``--anneal-lr``."""
    steps = num_updates * c.update_epochs * c.num_minibatches
    lr = optax.linear_schedule(c.learning_rate, 0.0, steps) if c.anneal_lr else c.learning_rate
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.adam(lr, eps=c.adam_eps))


def init(c: Config, ctx: Context, env_state: envs.EnvState, key: jax.Array) -> State:
    """The training state before update 0 (:func:`jaxatari.rollout.init_state`)."""
    return init_state(ctx, env_state, key, make_optimizer(c, ctx.num_updates), c.num_envs)


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


def update(c: Config, ctx: Context, state: State, handle):
    """One PPO iteration on this device's envs: a rollout of ``num_steps`` steps,
    then ``update_epochs`` x ``num_minibatches`` gradient steps.

    Args:
      c: a resolved :class:`Config` (:func:`resolve`).
      ctx: the run's :class:`jaxatari.algorithm.Context` (env spec, network spec,
        ``step_fn(handle, actions [B/N]) -> (handle, Timestep)``, envs per device,
        updates in the run).
      state: the :class:`State` (:func:`init`), this device's share of its
        per-env fields.

    Returns:
      ``(state, handle, metrics, actions [T, B/N])``: ``metrics`` a dict of
      scalars over every device (``update``, ``env_steps``, the episodes that
      ended: ``episode_return_sum``/``episode_length_sum``/``episode_count``
      (full games, unclipped), ``return_mean100``, ``finite`` and
      :data:`METRIC_COLUMNS`); ``actions`` the actions taken (the action log's rows).
    """
    key, k_roll, k_sgd = jax.random.split(state.key, 3)
    handle, env_state, carry, traj, ep, env_index = device_rollout(ctx, state, handle, k_roll, c.num_steps)
    new_state, metrics = learn(c, ctx, state, traj, ep, env_state, carry, key, k_sgd, env_index)
    return new_state.replace(env=parallel.env_state_out(new_state.env)), handle, metrics, traj.actions


def learn(c: Config, ctx: Context, state: State, traj, ep, env_state, carry, key, k_sgd, env_index: jax.Array):
    """GAE and the epochs of minibatch SGD on one rollout; returns ``(state, metrics)``.

    ``env_index`` (global env indices ``[B/N]``) makes the minibatches
    device-invariant; advantages are normalised over the global minibatch and
    gradients summed over devices."""
    net = ActorCritic(ctx.net_spec)
    optimizer = make_optimizer(c, ctx.num_updates)
    recurrent = ctx.net_spec.recurrent
    carry0 = state.carry
    last_value = bootstrap_value(net.apply, state.params, carry, env_state)
    adv, ret = gae(traj.rewards, traj.values, traj.dones, last_value,
                   gamma=c.gamma, gae_lambda=c.gae_lambda, truncations=traj.truncated)
    batch = PPOBatch(obs=traj.obs, actions=traj.actions, log_probs=traj.log_probs, values=traj.values,
                     advantages=adv, returns=ret, mask=traj.valid, extras=(traj.first, carry0))

    local_loss = weighted_loss(functools.partial(
        ppo_loss, apply_fn=make_apply(net, recurrent), clip_eps=c.clip_coef, vf_coef=c.vf_coef,
        ent_coef=c.ent_coef, clip_value=c.clip_vloss, normalize_advantages=False))

    def loss_fn(params, mb):
        if c.norm_adv:
            mb = mb._replace(advantages=parallel.normalize_advantages(mb.advantages, mb.mask))
        return local_loss(params, mb, parallel.global_weight(mb.mask))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def sgd_step(carry, mb):
        params, opt_state = carry
        (loss, info), grads = grad_fn(params, mb)
        loss, info, grads = jax.lax.psum((loss, info, grads), parallel.AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, info, optax.tree.norm(grads))

    def epoch(carry, k):
        if recurrent:
            (data, first), carry_mb = parallel.env_minibatches(
                (batch._replace(extras=None), batch.extras[0]), carry0, k, c.num_minibatches, env_index)
            mbs = data._replace(extras=(first, carry_mb))
        else:
            mbs = parallel.time_minibatches(batch._replace(extras=None), k, c.num_minibatches, env_index)
        return jax.lax.scan(sgd_step, carry, mbs)

    (params, opt_state), (loss, info, gnorm) = jax.lax.scan(
        epoch, (state.params, state.opt_state), jax.random.split(k_sgd, c.update_epochs))

    mask = traj.valid.astype(jnp.float32)
    var_y = parallel.psum_masked_var(ret, traj.valid)
    explained_var = 1.0 - parallel.psum_masked_var(ret - traj.values, traj.valid) / jnp.maximum(var_y, 1e-8)
    ep = jax.lax.psum(ep, parallel.AXIS)
    new_state = state.replace(params=params, opt_state=opt_state, env=env_state, carry=carry,
                              key=key, update=state.update + 1)
    frac = 1.0 - state.update / ctx.num_updates  # the learning rate this update started with
    metrics = dict(
        update=new_state.update,
        env_steps=new_state.update * (c.num_envs * c.num_steps),
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=parallel.global_window_mean(env_state.stats),
        finite=jnp.isfinite(loss).all() & all_finite(params),
        loss=loss.mean(), policy_loss=info.policy_loss.mean(), value_loss=info.value_loss.mean(),
        entropy=info.entropy.mean(), approx_kl=info.approx_kl.mean(), clip_fraction=info.clip_fraction.mean(),
        grad_norm=gnorm.mean(), explained_variance=explained_var,
        value_mean=parallel.psum_masked_mean(traj.values, mask),
        return_target_mean=parallel.psum_masked_mean(ret, mask),
        learning_rate=jnp.asarray(c.learning_rate * (frac if c.anneal_lr else 1.0), jnp.float32),
    )
    return new_state, metrics


METRIC_COLUMNS = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                  "grad_norm", "explained_variance", "value_mean", "return_target_mean", "learning_rate")


def check_devices(c: Config, devices: int) -> None:
    """Refuse a split of the envs over ``devices`` that the minibatches cannot follow."""
    if c.network == "cfc" and (c.num_envs // devices) % c.num_minibatches:
        raise ConfigError(f"--num-envs {c.num_envs} on {devices} device(s) gives {c.num_envs // devices} envs per "
                          f"device, not divisible by --num-minibatches {c.num_minibatches}; a recurrent "
                          "policy's minibatches take whole envs from every device.")


ALGORITHM = Algorithm(
    name=ALGO, config=Config, resolve=resolve, network_spec=network_spec, init=init, update=update,
    steps_per_update=lambda c: c.batch_size, metric_columns=METRIC_COLUMNS, check_devices=check_devices)
