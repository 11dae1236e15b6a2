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
from jaxatari.configs import ActorCriticFields, TrainFields, option
from jaxatari.networks import ActorCritic
from jaxatari.ops import A2CBatch, a2c_loss, all_finite, gae, n_step_returns, weighted_loss
from jaxatari.rollout import State as OnPolicyState
from jaxatari.rollout import Trajectory, bootstrap_value, device_rollout, init_state

ALGO = "a2c"
TARGETS = ("nstep", "gae")


@dataclasses.dataclass(frozen=True)
class Config(ActorCriticFields, TrainFields):
    """A2C on EnvPool. Fields left at None take the default of the env's kind: Atari
    (the published A2C of baselines / the SB3 zoo) 10M steps, 16 envs, RMSProp 7e-4,
    ent 0.01, vf 0.25; classic control 500k steps, 8 envs, 2e-3, ent 0, vf 0.5."""

    env: str = "SpaceInvaders-v5"
    """EnvPool task id, e.g. SpaceInvaders-v5, Breakout-v5, CartPole-v1."""
    num_steps: int = option(5, range="an integer >= 1")
    """Steps per env per rollout (the n of the n-step returns)."""
    target: str = option("nstep", choices=TARGETS)
    """Value target: nstep (bootstrapped n-step returns, the published A2C) or gae (GAE returns)."""
    gae_lambda: float = option(0.95, range="in [0, 1]", sweepable=True)
    """GAE lambda (used with --target gae only)."""
    learning_rate: float | None = option(None, range="> 0", sweepable=True)
    """RMSProp learning rate."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    rms_alpha: float = option(0.99, range="in [0, 1)", sweepable=True)
    """RMSProp decay of the mean squared gradient."""
    rms_eps: float = option(1e-5, range="> 0", sweepable=True)
    """RMSProp epsilon, added inside the square root (TensorFlow / baselines convention)."""
    gamma: float = option(0.99, range="in (0, 1]", sweepable=True)
    """Discount."""
    ent_coef: float | None = option(None, range=">= 0", sweepable=True)
    """Entropy bonus coefficient."""
    vf_coef: float | None = option(None, range=">= 0", sweepable=True)
    """Value loss coefficient (the value loss is a plain MSE)."""
    max_grad_norm: float = option(0.5, range="> 0", sweepable=True)
    """Global gradient-norm clip."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


ATARI_DEFAULTS = dict(total_timesteps=10_000_000, num_envs=16, learning_rate=7e-4,
                      ent_coef=0.01, vf_coef=0.25, checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(total_timesteps=500_000, num_envs=8, learning_rate=2e-3,
                        ent_coef=0.0, vf_coef=0.5, checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the per-env-kind defaults and validate; raises before anything compiles."""
    return configs.resolve(config, ATARI_DEFAULTS, CLASSIC_DEFAULTS)


network_spec = configs.actor_critic_spec  # the actor-critic of --network/--torso and the CfC flags


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
    steps_per_update=lambda c: c.batch_size, metric_columns=METRIC_COLUMNS)
