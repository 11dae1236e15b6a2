"""Training SPS of an algorithm on the training driver (:mod:`jaxatari.driver`).

``benchmarks/throughput.py`` and ``benchmarks/dqn_throughput.py`` run
:func:`benchmark` for an algorithm module's ``ALGORITHM`` (PPO, A2C, DQN): the
chunk training compiles, on one device. What differs per algorithm (a
benchmark's Config defaults, the chunk size, extra result keys) is its entry
in :data:`EXTRAS`, keyed by ``Algorithm.name``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable


def _per_chunk(c, batch: int) -> int:
    """Small updates (A2C's) go several to a call, so that dispatch stays out of the figure."""
    return max(1, 1024 // batch)


@dataclasses.dataclass(frozen=True)
class Extra:
    """What one algorithm's benchmark does beyond the common one."""

    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields set for a benchmark unless the caller overrides them."""
    updates_per_chunk: Callable[[Any, int], int] = _per_chunk
    """``(config, env steps per update) -> updates per compiled call``."""
    counter: Callable[[Any], Any] | None = None
    """A counter of the state read before and after the timed window (its increase goes to ``results``)."""
    results: Callable[[Any, Any, int, float], dict[str, Any]] = lambda c, state, counted, dt: {}
    """``(config, final state, counter increase, timed seconds) -> extra result keys``."""


def _dqn_results(c, state, counted: int, dt: float) -> dict[str, Any]:
    from jaxatari import replay

    return dict(updates_per_s=counted / dt, replay_ratio=c.updates_per_env_step, batch_size=c.batch_size,
                buffer_mib=replay.nbytes(state.replay) / 2**20, dqn_preset=c.dqn_preset)


EXTRAS: dict[str, Extra] = {
    # A 100k buffer and learning from the first iteration, so that every timed step includes the learning at
    # the preset's replay ratio; one metrics row (``--log-every`` env steps) per compiled call.
    "dqn": Extra(defaults=dict(buffer_size=100_000, learning_starts=1), updates_per_chunk=lambda c, batch: 1,
                 counter=lambda state: state.updates, results=_dqn_results),
}
"""Per-algorithm benchmark extras, keyed by ``Algorithm.name``; an algorithm not listed gets :class:`Extra`'s."""


def benchmark(algo, env_id: str, num_envs: int, num_threads: int, seconds: float, **overrides) -> dict[str, Any]:
    """Training SPS of ``algo`` (a :class:`jaxatari.driver.Algorithm`) after compilation.

    Builds the run as :func:`jaxatari.driver.train` does, on one device: ``num_envs``
    envs of ``env_id`` on ``num_threads`` EnvPool threads, ``overrides`` being Config
    fields (e.g. ``network="cfc"``) over the algorithm's benchmark defaults
    (``EXTRAS[algo.name].defaults``; DQN: a 100k buffer, learning from the start).
    Compiles a chunk of ``updates_per_chunk`` updates (default ``max(1, 1024 // batch)``:
    small updates, A2C's, go several to a call so that dispatch stays out of the
    figure; DQN: one metrics row; ``compile_s``), runs it once untimed, then trains
    for about ``seconds`` of wall time (at least one chunk). Returns ``sps`` (env
    steps summed over envs, per second, in that window), ``compile_s``, ``steps``
    (the env steps timed), ``backend`` (the env backend used), ``batch`` (env steps
    per update), ``updates_per_chunk`` and the algorithm's extra keys (DQN:
    ``updates_per_s`` gradient steps per second, ``replay_ratio``, ``batch_size``,
    ``buffer_mib``, ``dqn_preset``).
    """
    import jax

    from jaxatari import driver

    extra = EXTRAS.get(algo.name, Extra())
    c = algo.resolve(algo.config(env=env_id, num_envs=num_envs, num_threads=num_threads, total_timesteps=10**9,
                                 **{**extra.defaults, **overrides}))
    c = dataclasses.replace(c, devices=1)
    setup = driver.make_envs(c, num_agents=1, seeds=[c.seed])
    try:
        ctx = driver.Context(setup.spec, algo.network_spec(c, setup.spec), setup.step_fn, setup.local_envs, 10**6)
        state = driver.initial_state(algo, c, ctx, setup, agents=[c], abstract=False)
        batch = algo.steps_per_update(c)
        per_chunk = extra.updates_per_chunk(c, batch)
        chunk = driver.make_chunk(functools.partial(algo.update, c, ctx), setup.mesh,
                                  driver.state_specs(algo, state, False), per_chunk)
        handle = setup.handle
        t0 = time.perf_counter()
        compiled = chunk.lower(state, handle).compile()
        compile_s = time.perf_counter() - t0
        state, handle, out = compiled(state, handle)
        jax.block_until_ready(out)
        count0 = int(extra.counter(state)) if extra.counter else 0
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or steps == 0:
            state, handle, out = compiled(state, handle)
            jax.block_until_ready(out)
            steps += batch * per_chunk
        dt = time.perf_counter() - t0
        counted = int(extra.counter(state)) - count0 if extra.counter else 0
    finally:
        for pool in setup.group.pools:
            pool.close()
    return dict(sps=steps / dt, compile_s=compile_s, steps=steps, backend=setup.backend, batch=batch,
                updates_per_chunk=per_chunk, **extra.results(c, state, counted, dt))
