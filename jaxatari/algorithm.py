"""The interface between an algorithm and the driver that trains it.

An algorithm file (``jaxatari/agents/<algo>.py``) ends with one
:class:`Algorithm` value; :func:`jaxatari.driver.train` trains any of them.
This module holds only the two types, so that algorithm files depend on the
contract and not on the driver.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from jaxatari import configs, envs
from jaxatari.networks import NetworkSpec


class Context(NamedTuple):
    """What ``init`` and ``update`` know beyond the config: fixed for a run."""

    spec: envs.EnvSpec  # the env; spec.num_envs is one agent's global batch
    net_spec: NetworkSpec
    step_fn: envs.StepFn  # step_fn(handle, actions [local_envs]) -> (handle, Timestep), inside shard_map
    local_envs: int  # envs per device: the share ``update`` sees
    num_updates: int  # updates in the whole run (learning-rate schedules)
    agent_axis: str | None = None  # the vmap axis of a population's agents (None: one agent)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The contract between an algorithm file and the driver.

    ``init(c, ctx, env_state, key) -> State`` builds the state before update 0
    for the global batch (``env_state`` is the envs' first observations and
    statistics, already laid out by the driver). ``update(c, ctx, state, handle)
    -> (state, handle, metrics, actions [T, local_envs])`` is one compiled step
    inside ``shard_map``: ``metrics`` a dict of scalars holding ``update``,
    ``env_steps``, the episode sums, ``return_mean100``, ``finite`` and the
    algorithm's :attr:`metric_columns`.
    """

    name: str  # "ppo": run directories, config.json, checkpoints
    config: type  # its Config dataclass
    resolve: Callable[[Any], Any]  # fill defaults and validate, before anything compiles
    network_spec: Callable[[Any, envs.EnvSpec], NetworkSpec]
    init: Callable
    update: Callable
    steps_per_update: Callable[[Any], int]  # global env steps of one update
    metric_columns: tuple[str, ...]
    sharded_fields: tuple[str, ...] = ("env", "carry")  # state fields split along envs; the rest replicated
    check_devices: Callable[[Any, int], None] = lambda c, n: None  # refuse a split over n devices
    updates_done: Callable[[Any, Any], jax.Array] = lambda c, s: s.update  # update() calls a state has seen
    # A state field left out of checkpoints (DQN: a replay buffer too large to save): unsaved(c, spec, agents)
    # names them; after a resume, restart(c, spec, restored, fresh) -> (state, why the run is not exact).
    unsaved: Callable[[Any, envs.EnvSpec, int], tuple[str, ...]] = lambda c, spec, agents: ()
    restart: Callable | None = None
    describe: Callable | None = None  # (c, spec, agents) -> (a start-up line, entries for config.json)

    @property
    def sweepable(self) -> tuple[str, ...]:
        return configs.sweepable(self.config)

    @property
    def ranges(self) -> dict[str, str]:
        return configs.ranges(self.config)
