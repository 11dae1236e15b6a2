"""The inference API: a trained policy from a run directory, without the training code.

``load_policy(RUN_DIR)`` rebuilds the network from the run's ``config.json`` and
restores its parameters (:func:`jaxatari.checkpoint.restore_policy`) onto the
current default device; the :class:`LoadedPolicy` acts on observations (greedy
or sampled, recurrent state carried by the caller). :func:`load_checkpoint`
picks the best or the latest checkpoint for evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxatari import envs, rundir
from jaxatari.checkpoint import restore_policy
from jaxatari.errors import CheckpointError, EvalError
from jaxatari.evaluate import run_resets_at_life_loss
from jaxatari.networks import ActorCritic, NetworkSpec, QNetwork, initial_carry

__all__ = ["CHECKPOINTS", "LoadedPolicy", "find_run_dir", "load_checkpoint", "load_policy"]


def find_run_dir(path: str | os.PathLike) -> Path:
    """The run directory holding ``path``: ``path`` itself or its nearest parent with a ``config.json``."""
    path = Path(path)
    for p in (path, *path.parents):
        if (p / "config.json").is_file():
            return p
    raise CheckpointError(
        f"No config.json in {path} or above it; pass a jaxatari run directory (or a checkpoint inside one)."
    )


class LoadedPolicy:
    """A trained policy, callable on observations without the training script.

    Attributes:
      network: the Flax module (``ActorCritic`` or, for DQN, ``QNetwork``).
      params: its parameters.
      spec: the :class:`~jaxatari.networks.NetworkSpec` it was built from.
      config: the run's ``config.json`` (env id, preset, algorithm ...).
      meta: the checkpoint's metadata (env steps, score ...).

    ``policy(obs)`` returns greedy actions ``[B]`` for observations
    ``[B, *obs_shape]``; a recurrent policy also takes and returns its state::

        actions, carry = policy.act(obs, carry, first)   # first [B]: episode starts

    When ``policy.reset_on_life_loss`` (a recurrent PPO/A2C run trained under
    ``episodic_life``), set ``first`` also on the frame after each life lost, as
    training did (:class:`jaxatari.evaluate.LifeResets` tracks it for a host loop).
    ``policy.env_kwargs`` are the run's game, preset and env options, for
    :func:`jaxatari.evaluate` or :func:`jaxatari.envs.make`.
    """

    def __init__(self, network, params, spec, config: dict, meta: dict):
        self.network, self.params, self.spec, self.config, self.meta = network, params, spec, config, meta
        self.is_q = spec.head == "q" or config.get("algo") == "dqn"  # DQN runs wrote no head
        self._step = jax.jit(self._forward, static_argnames=("mode",))
        self._warned_stateless = False

    @property
    def recurrent(self) -> bool:
        return bool(getattr(self.spec, "recurrent", False))

    @property
    def obs_shape(self) -> tuple[int, ...] | None:
        """One observation's shape, from the run's env spec (None if the config has none)."""
        shape = self.config.get("env_spec", {}).get("obs_shape")
        return None if shape is None else tuple(shape)

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """``env_id``, ``preset`` and ``options`` (its ``--env-option`` values) of the run."""
        return dict(env_id=self.config["env"], preset=self.config.get("preset"),
                    options=envs.parse_env_options(self.config.get("env_option") or []))

    @property
    def reset_on_life_loss(self) -> bool:
        """Whether to restart the recurrent state at each life lost, as training did: a
        recurrent PPO/A2C run under ``episodic_life`` (pass it to :func:`jaxatari.evaluate.evaluate`)."""
        return run_resets_at_life_loss(self.config, self.recurrent)

    def initial_carry(self, batch_size: int):
        return () if self.is_q else initial_carry(self.spec, batch_size)

    def policy_fn(self, params, carry, obs, first):
        """``(params, carry, obs [T, B, ...], first [T, B]) -> (carry, logits_or_q [T, B, A], values)``,
        the interface of :func:`jaxatari.evaluate.evaluate`."""
        if self.is_q:
            T, B = obs.shape[:2]
            q = self.network.apply(params, obs.reshape(T * B, *obs.shape[2:])).reshape(T, B, -1)
            return carry, q, q.max(-1)
        return self.network.apply(params, carry, obs, first)

    def _forward(self, params, carry, obs, first, key, mode: str):
        carry, logits, _ = self.policy_fn(params, carry, obs[None], first[None])
        logits = logits[0]
        if mode == "sample":
            actions = jax.random.categorical(key, logits)
        else:
            actions = logits.argmax(-1)
        return actions, carry, logits

    def act(self, obs, carry=None, first=None, *, mode: str = "greedy", key=None):
        """Actions ``[B]`` for ``obs [B, ...]``; returns ``(actions, carry)``.

        ``mode``: ``greedy`` (argmax) or ``sample`` (from the policy's logits;
        needs ``key``, a fresh one per call; not for a DQN's Q-values). ``carry``
        defaults to the zero state and ``first`` to all-False (all-True when
        ``carry`` is None).
        """
        if mode not in ("greedy", "sample"):
            raise ValueError(f"mode {mode!r} is not accepted; use greedy or sample.")
        if mode == "sample" and self.is_q:
            raise ValueError("mode='sample' is not accepted for a DQN policy: its outputs "
                             "are Q-values, not a distribution; use greedy (or epsilon-greedy around it).")
        if mode == "sample" and key is None:
            raise ValueError("mode='sample' needs key= (a fresh jax.random key per call, e.g. from jax.random.split).")
        obs = jnp.asarray(obs)
        if self.obs_shape is not None and (obs.ndim != 1 + len(self.obs_shape) or obs.shape[1:] != self.obs_shape):
            raise ValueError(f"obs must be [B, {', '.join(map(str, self.obs_shape))}] (one step of B envs), got "
                             f"shape {tuple(obs.shape)}.")
        B = obs.shape[0]
        if first is not None and np.shape(first) != (B,):
            raise ValueError(f"first must be [B] = [{B}] (episode starts), got shape {np.shape(first)}.")
        if first is None:
            first = jnp.full((B,), carry is None)
        if carry is None:
            carry = self.initial_carry(B)
        if key is None:
            key = jax.random.PRNGKey(0)  # unused by greedy
        actions, carry, _ = self._step(self.params, carry, obs, jnp.asarray(first, bool), key, mode=mode)
        return actions, carry

    def __call__(self, obs):
        if self.recurrent and not self._warned_stateless:
            self._warned_stateless = True
            warnings.warn("policy(obs) on a recurrent policy starts from the zero state at every call (no memory); "
                          "carry it with: actions, carry = policy.act(obs, carry, first).", stacklevel=2)
        return self.act(obs)[0]


def load_policy(path: str | os.PathLike) -> LoadedPolicy:
    """Load a trained policy from a run directory or a checkpoint inside one.

    ``path``: ``RUN_DIR`` (the best checkpoint, else the newest good one),
    ``RUN_DIR/checkpoints/latest`` or ``.../best``, or one step directory.
    The network is rebuilt from the run's ``config.json``; params restore onto
    the current default device (a GPU checkpoint loads on a CPU machine).
    """
    path = Path(path)
    run_dir = find_run_dir(path)
    config = json.loads((run_dir / "config.json").read_text())
    agents = config.get("num_agents") or 1
    if agents > 1:  # its checkpoints hold [K, ...] stacked params
        raise CheckpointError(f"{run_dir} is a population of {agents} agents (--num-agents/--sweep); load one "
                              f"agent's run directory, {run_dir / 'agents' / '<k>'} with k in 0..{agents - 1}.")
    if "network_spec" not in config or "env_spec" not in config:
        raise CheckpointError(f"{run_dir / 'config.json'} lacks network_spec/env_spec; was it written by jaxatari?")
    spec = NetworkSpec.from_json(config["network_spec"])
    if spec.torso != "mlp" and "conv_impl" not in spec.torso_kwargs:
        # It acts a step at a time, outside any loop: there XLA's convolution is the fast one on every backend
        # (the CPU default, im2col, is for convolutions inside compiled chunks; the parameters are the same).
        spec = dataclasses.replace(spec, torso_kwargs={**spec.torso_kwargs, "conv_impl": "xla"})
    env_spec = config["env_spec"]
    obs = jnp.zeros((1, *env_spec["obs_shape"]), env_spec["obs_dtype"])
    if spec.head == "q" or config.get("algo") == "dqn":  # DQN runs wrote no head
        network = QNetwork(spec)
        abstract = jax.eval_shape(lambda: network.init(jax.random.PRNGKey(0), obs))
    else:
        network = ActorCritic(spec)
        abstract = jax.eval_shape(lambda: network.init(
            jax.random.PRNGKey(0), initial_carry(spec, 1), obs[None], jnp.ones((1, 1), bool)))
    params, meta = restore_policy(path, abstract)
    return LoadedPolicy(network, params, spec, config, meta)


CHECKPOINTS = ("best", "latest")


def load_checkpoint(path: str | Path, checkpoint: str = "best"):
    """Load the policy to evaluate from a run directory (or a checkpoint inside one).

    ``checkpoint``: ``best`` (the best checkpoint; if ``best/`` is missing or has no
    readable checkpoint, the newest readable one of ``latest/``, as
    :func:`load_policy` falls back) or ``latest``.

    Returns ``(policy, info)``: the :class:`LoadedPolicy` and
    ``info = {"checkpoint": kind, "checkpoint_step": step}``, the checkpoint actually
    loaded after any fallback (``kind`` is ``best`` when its metadata carries a
    score, which only ``best/`` checkpoints do). Raises ``ConfigError`` naming the
    run's ``config.json`` when it is not valid JSON, :class:`EvalError` for a bad
    ``checkpoint`` and ``CheckpointError`` when nothing is readable.
    """
    if checkpoint not in CHECKPOINTS:
        raise EvalError(f"checkpoint={checkpoint!r} is not accepted; use {' or '.join(CHECKPOINTS)}.")
    path = Path(path)
    for directory in (path, *path.parents):  # where load_policy finds the config, named on bad JSON
        if (directory / "config.json").is_file():
            rundir.load_run_config(directory)
            break
    if checkpoint == "latest" and (path / "checkpoints" / "latest").is_dir():
        path = path / "checkpoints" / "latest"
    policy = load_policy(path)
    kind = "best" if "score" in policy.meta else "latest"
    return policy, {"checkpoint": kind, "checkpoint_step": policy.meta.get("step")}
