"""Actor-critic and Q networks over a torso, with an optional recurrent core.

Every actor-critic speaks one time-major interface, recurrent or not::

    carry, logits, values = net.apply(params, carry, obs, first)
    # obs [T, B, ...], first [T, B] bool (episode starts), logits [T, B, A], values [T, B]

A feed-forward network has an empty carry ``()`` and ignores ``first``. A
recurrent core zeroes its state before step ``t`` wherever ``first[t]`` is set.
The whole network is rebuilt from a JSON-able :class:`NetworkSpec`, which is what
checkpoints store so that a policy loads without the training script.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxatari.networks.cfc import CfC
from jaxatari.networks.torsos import TORSOS, ortho

NETWORKS = ("auto", "nature", "impala", "mlp", "cfc")
CFC_TORSOS = ("auto", "convblock", "impala", "nature", "mlp")


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild a network (stored in ``config.json``).

    ``torso``: nature | impala | convblock | mlp. ``core``: none | cfc.
    ``cfc``: keyword arguments of :class:`jaxatari.networks.cfc.CfC`.
    ``shared``: actor and critic share the torso (and core). Unshared (two
    separate networks) is the standard for small MLP policies, where the value
    loss would otherwise dominate the shared features. ``head``: actor_critic
    (:class:`ActorCritic`) or q (:class:`QNetwork`).
    """

    torso: str
    num_actions: int
    core: str = "none"
    shared: bool = True
    torso_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    cfc: dict[str, Any] = dataclasses.field(default_factory=dict)
    head: str = "actor_critic"

    @property
    def recurrent(self) -> bool:
        return self.core != "none"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "NetworkSpec":
        return cls(**d)


def resolve_network_spec(
    network: str,
    *,
    num_actions: int,
    atari: bool,
    torso: str = "auto",
    cfc: dict[str, Any] | None = None,
    torso_kwargs: dict[str, Any] | None = None,
    head: str = "actor_critic",
) -> NetworkSpec:
    """Map the CLI's ``--network``/``--torso`` onto a :class:`NetworkSpec`.

    ``auto`` is the Nature CNN on pixels and an MLP on vectors; ``cfc`` is the
    ncps conv block (or ``--torso``) into a CfC core.
    """
    if network not in NETWORKS:
        raise ValueError(f"--network {network!r} is not accepted; use one of {', '.join(NETWORKS)}.")
    if torso not in CFC_TORSOS:
        raise ValueError(f"--torso {torso!r} is not accepted; use one of {', '.join(CFC_TORSOS)}.")
    default = "nature" if atari else "mlp"
    if network == "cfc":
        t = torso if torso != "auto" else ("convblock" if atari else "mlp")
        core, cfc_kw = "cfc", dict(cfc or {})
    else:
        if torso != "auto" and network != "auto" and torso != network:
            raise ValueError(
                f"--torso {torso!r} conflicts with --network {network!r}; --torso picks the "
                "torso of --network cfc (or equals --network)."
            )
        t = network if network != "auto" else (torso if torso != "auto" else default)
        core, cfc_kw = "none", {}
    if atari and t == "mlp":
        raise ValueError("The mlp torso takes vector observations; Atari pixels need nature, impala or convblock.")
    if not atari and t != "mlp":
        raise ValueError(f"The {t} torso takes Atari pixels; vector observations need the mlp torso.")
    if head == "q" and core != "none":
        raise ValueError("A Q-network is feed-forward; --network cfc is for the actor-critic agents.")
    return NetworkSpec(torso=t, num_actions=num_actions, core=core, shared=t != "mlp",
                       torso_kwargs=dict(torso_kwargs or {}), cfc=cfc_kw, head=head)


def _fold(x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    T, B = x.shape[:2]
    return x.reshape(T * B, *x.shape[2:]), (T, B)


class ActorCritic(nn.Module):
    """Torso -> (optional recurrent core) -> policy logits and value heads.

    Heads use orthogonal init with gain 0.01 (policy) and 1.0 (value).
    """

    spec: NetworkSpec

    def setup(self):
        self.torso = TORSOS[self.spec.torso](**self.spec.torso_kwargs)
        if not self.spec.shared:
            self.critic_torso = TORSOS[self.spec.torso](**self.spec.torso_kwargs)
            if self.spec.core == "cfc":
                self.critic_core = CfC(**self.spec.cfc)
        if self.spec.core == "cfc":
            self.core = CfC(**self.spec.cfc)
        self.pi = nn.Dense(self.spec.num_actions, kernel_init=ortho(0.01), bias_init=nn.initializers.zeros)
        self.v = nn.Dense(1, kernel_init=ortho(1.0), bias_init=nn.initializers.zeros)

    def __call__(self, carry, obs: jax.Array, first: jax.Array):
        """``carry, obs [T, B, ...], first [T, B] -> (carry, logits [T, B, A], values [T, B])``."""
        flat, (T, B) = _fold(obs)
        x = self.torso(flat).reshape(T, B, -1)
        if self.spec.shared:
            if self.spec.core == "cfc":
                x, carry = self.core(x, carry, first)
            return carry, self.pi(x), self.v(x)[..., 0]
        xv = self.critic_torso(flat).reshape(T, B, -1)
        if self.spec.core == "cfc":  # unshared: carry = (actor state, critic state)
            x, ca = self.core(x, carry[0], first)
            xv, cc = self.critic_core(xv, carry[1], first)
            carry = (ca, cc)
        return carry, self.pi(x), self.v(xv)[..., 0]


def initial_carry(spec: NetworkSpec, batch_size: int):
    """The zero recurrent state for ``batch_size`` envs (``()`` if feed-forward)."""
    if spec.core == "none":
        return ()
    core = CfC(**spec.cfc)
    if spec.shared:
        return core.initialize_carry(batch_size)
    return (core.initialize_carry(batch_size), core.initialize_carry(batch_size))  # two buffers


def init_actor_critic(spec: NetworkSpec, key: jax.Array, obs_shape, obs_dtype) -> tuple[ActorCritic, Any]:
    """Build the module and its params for observations of ``obs_shape``.

    The init runs as one compiled program, cached per (spec, shape, dtype) in
    the process: run eagerly, flax compiles each of ~100 small ops on its own
    (5-6 s for the Nature CNN on a small CPU, against ~2 s).
    """
    net = ActorCritic(spec)
    return net, _compiled_init(spec, tuple(obs_shape), jnp.dtype(obs_dtype))(key)


_INIT_CACHE: dict[str, Any] = {}


def _compiled_init(spec: NetworkSpec, obs_shape: tuple[int, ...], obs_dtype):
    def init(key):
        obs = jnp.zeros((1, 1, *obs_shape), obs_dtype)
        return ActorCritic(spec).init(key, initial_carry(spec, 1), obs, jnp.ones((1, 1), bool))

    try:
        cache_key = json.dumps([spec.to_json(), obs_shape, obs_dtype.name], sort_keys=True)
    except TypeError:  # a spec holding objects JSON cannot write: compiled, not cached
        return jax.jit(init)
    if cache_key not in _INIT_CACHE:
        _INIT_CACHE[cache_key] = jax.jit(init)
    return _INIT_CACHE[cache_key]


class QNetwork(nn.Module):
    """Torso -> Q-values ``[N, A]`` (Mnih et al. 2015). Observations ``[N, ...]``."""

    spec: NetworkSpec

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = TORSOS[self.spec.torso](**self.spec.torso_kwargs)(obs)
        return nn.Dense(self.spec.num_actions, kernel_init=ortho(1.0), bias_init=nn.initializers.zeros)(x)
