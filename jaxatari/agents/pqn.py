"""Parallelised Q-network (PQN; Gallici et al. 2024, arXiv:2407.04811), compiled end to end.

Q-learning made for vectorised envs: no replay buffer and no target network.
Each update the ``num_envs`` envs take ``num_steps`` epsilon-greedy steps,
Peng's Q(lambda) targets are computed once over that rollout
(:func:`jaxatari.ops.q_lambda_returns`), and ``update_epochs`` x
``num_minibatches`` RAdam steps regress ``Q(s_t, a_t)`` onto them. A LayerNorm
after every layer of the Q-network keeps the bootstrapping stable.

One file, top to bottom: ``Config`` (with the ``--pqn-preset`` hyperparameter
sets) -> ``init`` -> ``update`` -> :data:`ALGORITHM`, which
:func:`jaxatari.driver.train` trains. ``update`` sees one device's share of
the envs inside ``shard_map``: actions and minibatches are drawn per global
env index and gradients summed over devices, so a seed gives the same run on
any number of devices, as PPO's does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxatari import configs, envs, parallel
from jaxatari.algorithm import Algorithm, Context
from jaxatari.configs import QFields, TrainFields, option
from jaxatari.errors import ConfigError
from jaxatari.networks import NetworkSpec, QNetwork, resolve_network_spec
from jaxatari.ops import all_finite, masked_mean, q_lambda_returns, weighted_loss
from jaxatari.rollout import State, rollout

ALGO = "pqn"

#: ``--pqn-preset`` hyperparameter sets, filling the fields left at None.
PQN_PRESETS: dict[str, dict[str, Any]] = {
    # CleanRL's pqn_atari_envpool.py: 8 envs x 128 steps, 4 minibatches x 4 epochs, RAdam 2.5e-4
    # annealed, epsilon 1 -> 0.01 over 10%, lambda 0.65.
    "cleanrl": dict(total_timesteps=10_000_000, num_envs=8, num_steps=128, num_minibatches=4, update_epochs=4,
                    learning_rate=2.5e-4, anneal_lr=True, end_e=0.01, exploration_fraction=0.1, q_lambda=0.65),
    # purejaxql's pqn_atari.yaml: 128 envs x 32 steps, 32 minibatches x 2 epochs, constant 2.5e-4,
    # epsilon 1 -> 0.001 over 10%, lambda 0.65.
    "purejaxql": dict(total_timesteps=10_000_000, num_envs=128, num_steps=32, num_minibatches=32, update_epochs=2,
                      learning_rate=2.5e-4, anneal_lr=False, end_e=0.001, exploration_fraction=0.1, q_lambda=0.65),
    # CleanRL's pqn.py (CartPole-v1): 4 envs x 128 steps, MLP 120-84 with LayerNorm, epsilon 1 -> 0.05
    # over 50%, lambda 0.65.
    "classic": dict(total_timesteps=500_000, num_envs=4, num_steps=128, num_minibatches=4, update_epochs=4,
                    learning_rate=2.5e-4, anneal_lr=True, end_e=0.05, exploration_fraction=0.5, q_lambda=0.65),
}


@dataclasses.dataclass(frozen=True)
class Config(QFields, TrainFields):
    """PQN on EnvPool. Fields left at None take the value of --pqn-preset (cleanrl on
    Atari, classic otherwise; PQN_PRESETS in jaxatari/agents/pqn.py); explicit flags win."""

    pqn_preset: str | None = option(None, choices=PQN_PRESETS)
    """PQN hyperparameters: cleanrl (8 x 128), purejaxql (128 x 32) or classic."""
    num_steps: int | None = option(None, range="an integer >= 1")
    """Steps per env per rollout."""
    num_minibatches: int | None = option(None, range="an integer >= 1")
    """Minibatches per epoch."""
    update_epochs: int | None = option(None, range="an integer >= 1")
    """Epochs of SGD per rollout."""
    learning_rate: float | None = option(None, range="> 0", sweepable=True)
    """RAdam learning rate."""
    anneal_lr: bool | None = None
    """Decay the learning rate linearly to 0 over training."""
    gamma: float = option(0.99, range="in (0, 1]", sweepable=True)
    """Discount."""
    q_lambda: float | None = option(None, range="in [0, 1]", sweepable=True)
    """Lambda of the Q(lambda) targets."""
    max_grad_norm: float = option(10.0, range="> 0", sweepable=True)
    """Global gradient-norm clip."""
    start_e: float = option(1.0, range="in [0, 1]")
    """Initial exploration epsilon."""
    end_e: float | None = option(None, range="in [0, 1]")
    """Final exploration epsilon."""
    exploration_fraction: float | None = option(None, range="in (0, 1]")
    """Fraction of --total-timesteps over which epsilon decays linearly."""
    network: str = option("auto", choices=("auto", "nature", "mlp"))
    """auto (Nature CNN on pixels, MLP 120-84 on vectors), nature or mlp; LayerNorm after every layer."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


ATARI_DEFAULTS = dict(checkpoint_every=1_000_000)
CLASSIC_DEFAULTS = dict(checkpoint_every=100_000)


def resolve(config: Config) -> Config:
    """Fill the preset and per-env-kind defaults and validate; raises before anything compiles."""
    c, fill = configs.named_preset(config, "pqn_preset", PQN_PRESETS, "cleanrl", "classic")
    c = configs.resolve(c, dict(ATARI_DEFAULTS, **fill), dict(CLASSIC_DEFAULTS, **fill))
    if c.num_steps % c.num_minibatches:
        raise ConfigError(f"--num-steps {c.num_steps} is not divisible by --num-minibatches {c.num_minibatches}; "
                          "a minibatch takes the same share of every env's steps.")
    return c


def network_spec(c: Config, spec: envs.EnvSpec) -> NetworkSpec:
    """The Q-network of ``--network`` with a LayerNorm after every layer (the MLP: 120-84, ReLU)."""
    kw = dict(norm="layer") if spec.atari else dict(hidden=(120, 84), activation="relu", norm="layer")
    try:
        return resolve_network_spec(c.network, num_actions=spec.num_actions, atari=spec.atari, torso_kwargs=kw,
                                    head="q")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def make_optimizer(c: Config, num_updates: int) -> optax.GradientTransformation:
    """Global-norm clipping, then RAdam, its learning rate annealed linearly to 0 over
    the run's SGD steps if ``--anneal-lr``."""
    steps = num_updates * c.update_epochs * c.num_minibatches
    lr = optax.linear_schedule(c.learning_rate, 0.0, steps) if c.anneal_lr else c.learning_rate
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.radam(lr))


def init(c: Config, ctx: Context, env_state: envs.EnvState, key: jax.Array) -> State:
    """The state before update 0: fresh Q-network params and their optimizer state,
    the envs' first observations and statistics ``env_state``, counter 0."""
    k_params, k_train = jax.random.split(key)
    params = QNetwork(ctx.net_spec).init(k_params, jnp.zeros((1, *ctx.spec.obs_shape), ctx.spec.obs_dtype))
    return State(params=params, opt_state=make_optimizer(c, ctx.num_updates).init(params), env=env_state,
                 carry=(), key=k_train, update=jnp.zeros((), jnp.int32))


def epsilon(c: Config, env_steps: jax.Array) -> jax.Array:
    """Exploration epsilon after ``env_steps``: linear from ``start_e`` to ``end_e``
    over ``exploration_fraction * total_timesteps`` env steps, then flat."""
    return optax.linear_schedule(c.start_e, c.end_e, max(1, round(c.exploration_fraction * c.total_timesteps)))(
        env_steps)


def epsilon_greedy(q_apply, eps: jax.Array):
    """A :func:`jaxatari.rollout.rollout` policy: the epsilon-greedy distribution over
    ``Q(s, .)`` as logits (greedy action ``1 - eps + eps / A``, others ``eps / A``) and
    ``max_a Q(s, a)`` as the value."""
    def policy_fn(params, carry, obs, first):
        q = q_apply(params, obs[0])
        probs = eps / q.shape[-1] + (1.0 - eps) * jax.nn.one_hot(q.argmax(-1), q.shape[-1])
        return carry, jnp.log(probs)[None], q.max(-1)[None]

    return policy_fn


def td_loss(params, batch, *, q_apply):
    """``0.5 (Q(s, a) - G)^2``, masked mean over the valid steps; info: mean ``Q(s, a)``."""
    obs, actions, targets, mask = batch
    q = jnp.take_along_axis(q_apply(params, obs), actions[:, None], axis=-1)[:, 0]
    return masked_mean(0.5 * (q - targets) ** 2, mask), masked_mean(q, mask)


def update(c: Config, ctx: Context, state: State, handle):
    """One PQN iteration on this device's envs: an epsilon-greedy rollout of
    ``num_steps`` steps, Q(lambda) targets, then ``update_epochs`` x
    ``num_minibatches`` gradient steps. Arguments and returns as
    :func:`jaxatari.agents.ppo.update`."""
    key, k_roll, k_sgd = jax.random.split(state.key, 3)
    qnet = QNetwork(ctx.net_spec)
    eps = epsilon(c, state.update * c.batch_size)
    env_index = parallel.env_index(ctx.local_envs)
    handle, env_state, _, traj, ep = rollout(epsilon_greedy(qnet.apply, eps), state.params, (),
                                             parallel.env_state_in(state.env), handle, ctx.step_fn, k_roll,
                                             c.num_steps, env_index=env_index)
    last_q = qnet.apply(state.params, env_state.obs).max(-1)
    targets = q_lambda_returns(traj.rewards, traj.values, traj.dones, last_q, gamma=c.gamma, q_lambda=c.q_lambda,
                               truncations=traj.truncated)

    optimizer = make_optimizer(c, ctx.num_updates)
    local_loss = weighted_loss(functools.partial(td_loss, q_apply=qnet.apply))
    grad_fn = jax.value_and_grad(lambda p, mb: local_loss(p, mb, parallel.global_weight(mb[3])), has_aux=True)

    def sgd_step(carry, mb):
        params, opt_state = carry
        (loss, q_mean), grads = grad_fn(params, mb)  # mb: [T/M * B/N, ...] samples
        loss, q_mean, grads = jax.lax.psum((loss, q_mean, grads), parallel.AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, q_mean, optax.tree.norm(grads))

    def epoch(carry, k):
        return jax.lax.scan(sgd_step, carry, parallel.time_minibatches(batch, k, c.num_minibatches, env_index))

    batch = (traj.obs, traj.actions, targets, traj.valid)
    (params, opt_state), (loss, q_mean, gnorm) = jax.lax.scan(
        epoch, (state.params, state.opt_state), jax.random.split(k_sgd, c.update_epochs))

    ep = jax.lax.psum(ep, parallel.AXIS)
    new_state = state.replace(params=params, opt_state=opt_state, env=parallel.env_state_out(env_state), key=key,
                              update=state.update + 1)
    frac = 1.0 - state.update / ctx.num_updates  # the learning rate this update started with
    metrics = dict(
        update=new_state.update, env_steps=new_state.update * c.batch_size,
        episode_return_sum=ep.return_sum, episode_length_sum=ep.length_sum, episode_count=ep.count,
        return_mean100=parallel.global_window_mean(env_state.stats),
        finite=jnp.isfinite(loss).all() & all_finite(params),
        loss=loss.mean(), q_mean=q_mean.mean(), grad_norm=gnorm.mean(),
        target_mean=parallel.psum_masked_mean(targets, traj.valid), epsilon=eps,
        learning_rate=jnp.asarray(c.learning_rate * (frac if c.anneal_lr else 1.0), jnp.float32),
    )
    return new_state, handle, metrics, traj.actions


METRIC_COLUMNS = ("loss", "q_mean", "grad_norm", "target_mean", "epsilon", "learning_rate")


def describe(c: Config, spec: envs.EnvSpec, agents: int) -> tuple[str, dict[str, Any]]:
    """The start-up line after the driver's: the preset, the SGD plan and exploration."""
    line = (f"PQN preset {c.pqn_preset} | {c.update_epochs} epochs x {c.num_minibatches} minibatches | "
            f"Q(lambda) {c.q_lambda} | epsilon {c.start_e} -> {c.end_e} over "
            f"{round(c.exploration_fraction * c.total_timesteps):,} env steps")
    return line, {}


ALGORITHM = Algorithm(
    name=ALGO, config=Config, resolve=resolve, network_spec=network_spec, init=init, update=update,
    steps_per_update=lambda c: c.batch_size, metric_columns=METRIC_COLUMNS, describe=describe)
