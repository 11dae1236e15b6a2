"""Where a training step's time goes: env, inference, learning and host, per algorithm.

    python benchmarks/breakdown.py                        # Breakout-v5, 8 envs, all cores
    python benchmarks/breakdown.py --algos ppo dqn --repeats 5
    python benchmarks/breakdown.py --quick                # CartPole-v1, tiny, < 60 s on 2 cores (the test suite)

Writes `breakdown_<kind>.json` and `.md` (`_quick` appended in --quick mode,
then `_<env>` when --env is not the mode's default) under `--out-dir`
(default benchmarks/results/), `<kind>` being the machine slug of
`machine.kind()` (`cpu-2core`, `nvidia-h200-16core`). The Markdown starts with
the machine description.

Method. A training step cannot be profiled from the inside without changing
it (it is one compiled program), so each part is rebuilt from the library's
own functions as a separately compiled program and timed on its own, on the
same EnvPool, with the agent's own resolved Config as the throughput
benchmark builds it (`throughput.ALGORITHMS` names the rows and their
overrides, over the algorithm's benchmark defaults in `train_sps.EXTRAS`;
DQN: a 100k buffer, learning from the first iteration, so that every update
learns). Every algorithm: the envs and state
of the training driver on one device (`driver.make_envs`,
`driver.initial_state`), every part inside `shard_map` on a one-device mesh,
as training runs it.

1. env:   the update's env steps in a `lax.scan` of the same `make_step_fn`
          step (`env.xla()` on CPU and GPU) with random actions fed in: the
          emulator at this env count, inside the graph, and nothing else.
2. act:   the agent's acting for the update's env steps, no learning.
          PPO/A2C: `rollout.rollout` with per-env sampling keys (policy
          forward, sampling, env step, episode statistics, the stored
          trajectory), as `ppo.update` calls it. DQN: `dqn.act` (forward,
          epsilon-greedy), `envs.env_step` and `dqn.observe` with training off
          (`learning_starts` out of reach: replay insert, target sync).
3. learn: the agent's learning on data already collected, no env. PPO:
          `ppo.learn` (bootstrap value, GAE, update_epochs x num_minibatches
          SGD steps) and A2C: `a2c.learn` (targets, one gradient step), each
          update on its own rollout kept from step 2 (distinct inputs, so
          that XLA cannot hoist work out of the loop). DQN: the gradient
          steps that go with the update's iterations at the preset's replay
          ratio (`dqn.train_due`, `dqn.learn`: `updates_per_train` x
          (stratified sample + SGD step), then `dqn.target_update`), on the
          replay buffer step 2 filled.
4. chunk: the compiled update as training runs it: `driver.make_chunk` of
          the agent's `update`.
5. host:  the runner's work between chunks: `runner.run` itself (fetching the
          metrics and actions, metrics.csv, the action log with its fsync, the
          progress line), driven by a stand-in chunk that does no work and
          returns the real chunk's output tiled to the length of a training
          chunk (`--chunk-steps` of the agent's Config), with TensorBoard off
          and no checkpoint or evaluation (those come every 1M steps or not at
          all by default). Host per chunk = (runner wall time - its compile
          time) / chunks; per update = that / updates per training chunk.

An "update" is one PPO/A2C iteration (num_envs x num_steps env steps) or one
DQN metrics row (`--log-every` env steps, i.e. `iterations_per_row` iterations
of num_envs envs). Each compiled call covers `updates_per_call` updates (enough
for at least `--call-steps` env steps), so that dispatch stays out of the
figures. Each part is compiled (time reported separately), run once untimed,
then timed in `--repeats` windows of at least `--window` seconds (whole
calls); the reported figure is the median window.

Derived figures, per update: env; inference = act - env (policy forward,
sampling, episode bookkeeping, trajectory or replay writes); learning = learn;
unexplained = chunk - act - learn (what the full program costs beyond its
parts: negative when XLA overlaps or fuses across them, plus noise); host.
Total = chunk + host, the wall time of an update in training; every share is
of that total, so env + inference + learning + unexplained + host = 100%.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import machine, throughput, train_sps  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_ENV = "Breakout-v5"
QUICK_ENV = "CartPole-v1"
DEFAULT_ALGOS = ("ppo", "ppo-cfc", "a2c", "dqn")
COMPONENTS = ("env", "act", "learn", "chunk", "host")
DERIVED = ("env", "inference", "learning", "unexplained", "host", "total")

#: Config overrides per agent module beyond the registry's: each algorithm's benchmark defaults
#: (`train_sps.EXTRAS`; DQN: a 100k buffer, learning from the first iteration, so every update learns).
MODULE_OVERRIDES: dict[str, dict[str, Any]] = {
    f"jaxatari.agents.{name}": dict(extra.defaults) for name, extra in train_sps.EXTRAS.items()
}
#: --quick: tiny updates on CartPole.
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "jaxatari.agents.ppo": dict(num_steps=32),
    "jaxatari.agents.dqn": dict(buffer_size=10_000, learning_starts=1, log_every=64),
}


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Args:
    """Time env, inference, learning and host separately for each algorithm's training step."""

    env: str | None = None
    """EnvPool task id (default Breakout-v5; --quick CartPole-v1)."""
    num_envs: int | None = None
    """Parallel envs of every algorithm (default 8; --quick 4)."""
    threads: int | None = None
    """EnvPool worker threads (default: all usable cores; --quick min(2, cores))."""
    algos: tuple[str, ...] = DEFAULT_ALGOS
    """Rows to measure, names from throughput.ALGORITHMS (ppo, ppo-cfc, ppo-cfc-nature, a2c, dqn)."""
    repeats: int | None = None
    """Timed windows per part; the median is reported (default 3; --quick 1)."""
    window: float | None = None
    """Least seconds per timed window, in whole calls (default 2; --quick 0.1)."""
    call_steps: int | None = None
    """Least env steps per compiled call: updates_per_call = max(1, call_steps // steps per update)
    (default 1024; --quick 128)."""
    host_chunks: int | None = None
    """Chunks the runner drives per host window (default 10; --quick 3)."""
    quick: bool = False
    """CartPole-v1 with tiny settings, for the test suite: under a minute on 2 CPU cores."""
    out_dir: str = str(RESULTS_DIR)
    """Directory for breakdown_<machine kind>.json and .md."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Args with every default resolved; recorded in the JSON."""

    env: str
    num_envs: int
    threads: int
    algos: tuple[str, ...]
    repeats: int
    window: float
    call_steps: int
    host_chunks: int
    quick: bool


def resolve(args: Args, cores: int) -> Settings:
    """Fill the defaults (which depend on --quick and the core count) and check the numbers."""
    q = args.quick
    pick = lambda value, normal, quick: value if value is not None else (quick if q else normal)  # noqa: E731
    s = Settings(
        env=pick(args.env, DEFAULT_ENV, QUICK_ENV),
        num_envs=pick(args.num_envs, 8, 4),
        threads=pick(args.threads, cores, min(2, cores)),
        algos=tuple(args.algos),
        repeats=pick(args.repeats, 3, 1),
        window=pick(args.window, 2.0, 0.1),
        call_steps=pick(args.call_steps, 1024, 128),
        host_chunks=pick(args.host_chunks, 10, 3),
        quick=q,
    )
    for flag, value in (("--num-envs", s.num_envs), ("--threads", s.threads), ("--repeats", s.repeats),
                        ("--call-steps", s.call_steps), ("--host-chunks", s.host_chunks)):
        if value < 1:
            raise ValueError(f"{flag} {value} is not accepted: it must be a positive integer.")
    if s.window < 0:
        raise ValueError(f"--window {s.window:g} is not accepted: it must be >= 0 seconds.")
    if not s.algos:
        raise ValueError(f"--algos is empty; choose from {', '.join(throughput.ALGORITHMS)}.")
    unknown = [a for a in s.algos if a not in throughput.ALGORITHMS]
    if unknown:
        raise ValueError(f"Unknown algorithm {unknown[0]!r} in --algos; known: {', '.join(throughput.ALGORITHMS)}.")
    return s


def algo_config(name: str, s: Settings):
    """``(module, Config)`` of row ``name``, resolved by the agent (its errors raise here, before compiling)."""
    spec = throughput.ALGORITHMS[name]
    module = importlib.import_module(spec.module)
    extra = dict(MODULE_OVERRIDES.get(spec.module, {}))
    if s.quick:
        extra.update(QUICK_OVERRIDES.get(spec.module, {}))
    extra.update(spec.overrides)
    config = module.Config(env=s.env, num_envs=s.num_envs, num_threads=s.threads, **extra)
    return module, module.resolve(config)


def check(s: Settings) -> None:
    """Validate the env id and every algorithm's Config; raises ValueError with one sentence."""
    from jaxatari import envs

    envs.validate_env_id(s.env)
    for name in s.algos:
        try:
            algo_config(name, s)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


# ----------------------------------------------------------------------------- timing


def measure(fn, args: tuple, advance: Callable[[tuple, Any], tuple], *, repeats: int, window: float):
    """Compile ``fn`` for ``args``, call it once untimed, then time ``repeats``
    windows of whole calls lasting at least ``window`` s each.

    ``advance(args, out)`` gives the next call's arguments (threading the env
    handle and donated state). Returns ``(timing, args, out)`` with
    ``timing = {compile_s, call_s: [seconds per call, one per window], calls}``.
    """
    import jax

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*args)
    jax.block_until_ready(out)
    args = advance(args, out)
    call_s, calls = [], []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            out = compiled(*args)
            jax.block_until_ready(out)
            args = advance(args, out)
            n += 1
            if (elapsed := time.perf_counter() - t0) >= window:
                break
        call_s.append(elapsed / n)
        calls.append(n)
    return dict(compile_s=compile_s, call_s=call_s, calls=calls), args, out


def env_scan(step_fn):
    """``f(handle, actions [S, B]) -> (handle, reward sum)``: ``S`` env steps with the given actions."""
    import jax

    def f(handle, actions):
        def body(h, a):
            h, ts = step_fn(h, a)
            return h, ts.reward.sum() + ts.terminated.sum()

        handle, r = jax.lax.scan(body, handle, actions)
        return handle, r.sum()

    return jax.jit(f)


def random_actions(num_actions: int, steps: int, num_envs: int, seed: int = 0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, num_actions, size=(steps, num_envs), dtype=np.int32))


class Measured(NamedTuple):
    """One algorithm's parts, before the host part."""

    timings: dict[str, dict[str, Any]]  # env, act, learn, chunk
    chunk_out: Any  # the last ChunkOutput (host: the runner's input)
    info: dict[str, Any]  # steps_per_update, updates_per_call, training_updates_per_chunk, backend, ...


def on_mesh(f, mesh, donate: tuple[int, ...] = ()):
    """``f`` compiled inside ``shard_map`` on ``mesh`` (one device), every input and output replicated;
    the arguments ``donate`` donated (DQN's state: its replay buffer is updated in place, not copied)."""
    import jax
    from jax.sharding import PartitionSpec as P

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False),
                   donate_argnums=donate)


def measure_actor_critic(module, c, s: Settings, log) -> Measured:
    """env / act / learn / chunk for PPO or A2C (``module``), built from its own functions on
    the driver's envs and state, each inside ``shard_map`` on a one-device mesh as training runs it."""
    import jax

    from jaxatari import driver, parallel, runner
    from jaxatari.networks import ActorCritic
    from jaxatari.rollout import rollout

    algo = module.ALGORITHM
    is_ppo = module.ALGO == "ppo"
    c = dataclasses.replace(c, devices=1)
    setup = driver.make_envs(c, num_agents=1, seeds=[c.seed])
    try:
        net_spec = algo.network_spec(c, setup.spec)
        net = ActorCritic(net_spec)
        recurrent = net_spec.recurrent
        ctx = driver.Context(setup.spec, net_spec, setup.step_fn, setup.local_envs, 10**6)
        state = driver.initial_state(algo, c, ctx, setup, agents=[c], abstract=False)
        mesh, handle, step_fn = setup.mesh, setup.handle, setup.step_fn
        T, B = c.num_steps, c.num_envs
        K = max(1, s.call_steps // (T * B))
        kw = dict(repeats=s.repeats, window=s.window)

        log("env")
        t_env, (handle, _), _ = measure(
            on_mesh(env_scan(step_fn), mesh), (handle, random_actions(setup.spec.num_actions, K * T, B)),
            lambda a, out: (out[0], a[1]), **kw)

        def act(params, carry, env_state, handle, key):
            env_index = parallel.env_index(B)

            def body(x, k):  # every rollout is kept, as learn's input
                h, es, cy = x
                h, es2, cy2, traj, ep = rollout(net.apply, params, cy, es, h, step_fn, k, T, env_index=env_index)
                return (h, es2, cy2), (traj, ep, es2, cy2)

            (handle, env_state, carry), rollouts = jax.lax.scan(
                body, (handle, parallel.env_state_in(env_state), carry), jax.random.split(key, K))
            return handle, parallel.env_state_out(env_state), carry, rollouts

        log("act")
        key = jax.random.PRNGKey(c.seed + 1)
        t_act, _, (handle, _, _, rollouts) = measure(
            on_mesh(act, mesh), (state.params, state.carry, state.env, handle, key),
            lambda a, out: (a[0], out[2], out[1], out[0], a[4]), **kw)

        def learn(state, rollouts, key):
            """K learning steps, each on its own rollout (distinct inputs: nothing is hoisted out of the loop)."""
            env_index = parallel.env_index(B)

            def body(st, x):
                (traj, ep, env_state, carry), k = x
                k1, k2 = jax.random.split(k)
                if is_ppo:
                    st, m = module.learn(c, ctx, st, traj, ep, env_state, carry, k1, k2, env_index)
                else:
                    st, m = module.learn(c, ctx, st, traj, ep, env_state, carry, k1)
                return st.replace(env=parallel.env_state_out(st.env)), m

            st, metrics = jax.lax.scan(body, state, (rollouts, jax.random.split(key, K)))
            return st.params, st.opt_state, metrics

        log("learn")
        t_learn, _, _ = measure(on_mesh(learn, mesh), (state, rollouts, key), lambda a, out: a, **kw)

        log("chunk")
        chunk = driver.make_chunk(functools.partial(algo.update, c, ctx), mesh, driver.state_specs(algo, state, False),
                                  K)
        t_chunk, _, out = measure(chunk, (state, handle), lambda a, out: (out[0], out[1]), **kw)
        sched = runner.make_schedule(c.total_timesteps, algo.steps_per_update(c), c.chunk_steps)
        info = dict(backend=setup.backend, steps_per_update=T * B, updates_per_call=K,
                    training_updates_per_chunk=sched.updates_per_chunk, metric_columns=list(algo.metric_columns),
                    update_is=f"one rollout of {T} steps x {B} envs and its learning step(s)",
                    sgd_steps_per_update=(c.update_epochs * c.num_minibatches) if is_ppo else 1,
                    network=net_spec.torso + ("+cfc" if recurrent else ""))
        return Measured(dict(env=t_env, act=t_act, learn=t_learn, chunk=t_chunk), out[2], info)
    finally:
        for pool in setup.group.pools:
            pool.close()


def measure_dqn(module, c, s: Settings, log) -> Measured:
    """env / act / learn / chunk for DQN, built from :mod:`jaxatari.agents.dqn`'s own functions on the
    driver's envs and state, each inside ``shard_map`` on a one-device mesh as training runs it."""
    import jax
    import jax.numpy as jnp

    from jaxatari import driver, envs, parallel, runner
    from jaxatari.rollout import episode_metrics

    dqn = module
    algo = dqn.ALGORITHM
    c = dataclasses.replace(c, devices=1)
    setup = driver.make_envs(c, num_agents=1, seeds=[c.seed])
    try:
        net_spec = algo.network_spec(c, setup.spec)
        ctx = driver.Context(setup.spec, net_spec, setup.step_fn, setup.local_envs, 10**6)
        state = driver.initial_state(algo, c, ctx, setup, agents=[c], abstract=False)
        mesh, handle, step_fn = setup.mesh, setup.handle, setup.step_fn
        A, B = setup.spec.num_actions, c.num_envs
        K = max(1, s.call_steps // c.steps_per_row)  # rows per call
        I = K * c.iterations_per_row  # iterations per call  # noqa: E741
        kw = dict(repeats=s.repeats, window=s.window)

        log("env")
        t_env, (handle, _), _ = measure(on_mesh(env_scan(step_fn), mesh), (handle, random_actions(A, I, B)),
                                        lambda a, out: (out[0], a[1]), **kw)

        # Acting without learning: dqn.observe with learning_starts out of reach never takes its training branch.
        c_act = dataclasses.replace(c, learning_starts=np.iinfo(np.int32).max)

        def act(state, handle):
            def body(x, _):
                st, h = x
                action, key, k_train, _ = dqn.act(c, ctx, st)
                h, env_state, tr, outcome = envs.env_step(step_fn, h, st.env, action)
                st, _ = dqn.observe(c_act, ctx, st, env_state, tr, key, k_train)
                return (st, h), (action, outcome)

            state = state.replace(env=parallel.env_state_in(state.env))
            (state, handle), (actions, outcomes) = jax.lax.scan(body, (state, handle), None, length=I)
            return state.replace(env=parallel.env_state_out(state.env)), handle, actions, episode_metrics(outcomes)

        log("act")  # also fills the replay buffer that learn samples from
        t_act, (state, handle), _ = measure(on_mesh(act, mesh, donate=(0,)), (state, handle),
                                            lambda a, out: (out[0], out[1]), **kw)

        def skip(c, ctx, params, target_params, opt_state, buffer, key):
            return params, opt_state, dqn.TrainSums.zeros()

        def learn(params, target_params, opt_state, buffer, key, iteration, buffer_iterations):
            def body(x, i):  # the learning half of dqn.observe, for iteration `iteration + i + 1`
                params, target_params, opt_state, key = x
                key, k = jax.random.split(key)
                it = iteration + i + 1
                due = dqn.train_due(c, it, buffer_iterations + i + 1)
                params, opt_state, sums = jax.lax.cond(due, functools.partial(dqn.learn, c, ctx),
                                                       functools.partial(skip, c, ctx), params, target_params,
                                                       opt_state, buffer, k)
                crossings = it * B // c.target_network_frequency - (it - 1) * B // c.target_network_frequency
                target_params = dqn.target_update(target_params, params, crossings=crossings, tau=c.tau)
                return (params, target_params, opt_state, key), sums

            x, sums = jax.lax.scan(body, (params, target_params, opt_state, key), jnp.arange(I))
            return x, sums

        log("learn")
        t_learn, _, (_, sums) = measure(
            on_mesh(learn, mesh), (state.params, state.target_params, state.opt_state, state.replay, state.key,
                                   state.iteration, state.buffer_iterations), lambda a, out: a, **kw)
        grad_steps = int(np.asarray(sums.count).sum()) / K

        log("chunk")
        chunk = driver.make_chunk(functools.partial(algo.update, c, ctx), mesh, driver.state_specs(algo, state, False),
                                  K)
        t_chunk, _, out = measure(chunk, (state, handle), lambda a, out: (out[0], out[1]), **kw)
        sched = runner.make_schedule(c.total_timesteps, algo.steps_per_update(c), c.chunk_steps)
        info = dict(backend=setup.backend, steps_per_update=c.steps_per_row, updates_per_call=K,
                    training_updates_per_chunk=sched.updates_per_chunk, metric_columns=list(algo.metric_columns),
                    update_is=(f"one metrics row: {c.iterations_per_row} iterations of {B} envs, "
                               f"{dqn.describe_replay_ratio(c)}"),
                    sgd_steps_per_update=grad_steps, network=net_spec.torso, replay_ratio=c.updates_per_env_step,
                    buffer_size=c.buffer_size)
        return Measured(dict(env=t_env, act=t_act, learn=t_learn, chunk=t_chunk), out[2], info)
    finally:
        for pool in setup.group.pools:
            pool.close()


class _Stand(NamedTuple):
    """The stand-in chunk's state: a counter and the output it returns."""

    count: Any
    metrics: dict
    actions: Any


def measure_host(chunk_out, info: dict[str, Any], num_envs: int, s: Settings) -> dict[str, Any]:
    """Seconds per training chunk that ``runner.run`` spends around the chunk.

    The stand-in chunk returns the measured chunk's metrics and actions tiled to
    ``training_updates_per_chunk`` updates (env_steps advancing), so the runner
    writes exactly the rows and action bytes of a training chunk.
    """
    import jax
    import jax.numpy as jnp

    from jaxatari import runner

    K, U, S = info["updates_per_call"], info["training_updates_per_chunk"], info["steps_per_update"]
    metrics, actions = jax.device_get((chunk_out.metrics, chunk_out.actions))
    metrics = {k: np.resize(np.asarray(v), (U, *np.shape(v)[1:])) for k, v in metrics.items()}
    metrics["finite"] = np.ones(U, bool)  # random-action params may be anything; the runner must not stop
    steps = np.arange(1, U + 1) * S
    per_update = actions.shape[0] // K
    actions = np.resize(actions, (U * per_update, actions.shape[1]))

    def stand_in(state: _Stand, handle):
        m = dict(state.metrics, env_steps=jnp.asarray(steps) + state.count * U * S)
        if "update" in m:
            m["update"] = jnp.arange(1, U + 1) + state.count * U
        return state._replace(count=state.count + 1), handle, runner.ChunkOutput(m, state.actions)

    chunk_fn = jax.jit(stand_in)
    sched = runner.Schedule(steps_per_update=S, updates_per_chunk=U, num_chunks=s.host_chunks)
    per_chunk = []
    for _ in range(s.repeats):
        state = _Stand(jnp.zeros((), jnp.int32), {k: jnp.asarray(v) for k, v in metrics.items()}, jnp.asarray(actions))
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            res = runner.run(run_dir=Path(tmp), state=state, handle=jnp.zeros((1,), jnp.uint8), chunk_fn=chunk_fn,
                             schedule=sched, start_chunk=0, num_envs=num_envs,
                             env_steps=lambda st: int(st.count) * U * S, policy_of=lambda st: None,
                             metric_columns=info["metric_columns"], tensorboard=False)
            wall = time.perf_counter() - t0
        per_chunk.append((wall - res.compile_s) / s.host_chunks)
    return dict(compile_s=None, chunk_s=per_chunk, chunks=s.host_chunks, updates_per_training_chunk=U)


# ----------------------------------------------------------------------------- figures


def summarize(timings: dict[str, dict[str, Any]], info: dict[str, Any]) -> tuple[dict, dict]:
    """``(components, derived)``: per update ms, per env step us, share of the total.

    ``timings`` holds ``call_s`` lists for env/act/learn/chunk (``updates_per_call``
    updates each) and ``chunk_s`` for host (``updates_per_training_chunk`` updates).
    """
    K, S = info["updates_per_call"], info["steps_per_update"]
    ms: dict[str, float] = {}
    windows: dict[str, list[float]] = {}
    for name in COMPONENTS:
        t = timings[name]
        per = t["chunk_s"] if name == "host" else t["call_s"]
        div = t["updates_per_training_chunk"] if name == "host" else K
        windows[name] = [x / div * 1e3 for x in per]
        ms[name] = statistics.median(windows[name])
    total = ms["chunk"] + ms["host"]

    def fig(value: float) -> dict[str, float]:
        return dict(ms_per_update=value, us_per_env_step=value * 1e3 / S, share=value / total if total > 0 else None)

    components = {
        name: dict(fig(ms[name]), windows_ms_per_update=windows[name], compile_s=timings[name].get("compile_s"))
        for name in COMPONENTS
    }
    derived = {
        "env": fig(ms["env"]),
        "inference": fig(ms["act"] - ms["env"]),
        "learning": fig(ms["learn"]),
        "unexplained": fig(ms["chunk"] - ms["act"] - ms["learn"]),
        "host": fig(ms["host"]),
        "total": fig(total),
    }
    return components, derived


def measure_algorithm(name: str, s: Settings, log=print) -> dict[str, Any]:
    """One row: every part of ``name``'s training step, or why it failed."""
    spec = throughput.ALGORITHMS[name]
    row: dict[str, Any] = dict(name=name, module=spec.module, overrides=spec.overrides, status=None, reason=None)
    row["load_avg_1m_start"] = _load()
    t0 = time.perf_counter()
    try:
        module, c = algo_config(name, s)
        row["config"] = {k: v for k, v in dataclasses.asdict(c).items() if v is not None}
        part = lambda p: log(f"{name:14s} {p}")  # noqa: E731
        fn = measure_dqn if module.ALGO == "dqn" else measure_actor_critic
        measured = fn(module, c, s, part)
        part("host")
        timings = dict(measured.timings, host=measure_host(measured.chunk_out, measured.info, c.num_envs, s))
        components, derived = summarize(timings, measured.info)
        info = {k: v for k, v in measured.info.items() if k != "metric_columns"}
        row.update(status="ok", **info, components=components, derived=derived,
                   sps_chunk=1e3 * info["steps_per_update"] / components["chunk"]["ms_per_update"],
                   sps_training=1e3 * info["steps_per_update"] / derived["total"]["ms_per_update"])
    except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
        row.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    row["wall_s"] = time.perf_counter() - t0
    row["load_avg_1m_end"] = _load()  # includes this benchmark's own threads
    return row


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run(s: Settings, log=print) -> dict[str, Any]:
    """Measure every algorithm and return the result document."""
    desc = machine.describe()
    log(f"machine: {machine.summary(desc)}")
    rows = []
    for name in s.algos:
        row = measure_algorithm(name, s, log)
        if row["status"] == "ok":
            d = row["derived"]
            log(f"{name:14s} total {d['total']['ms_per_update']:,.1f} ms/update ({row['sps_training']:,.0f} SPS): "
                + ", ".join(f"{k} {d[k]['share']:.0%}" for k in DERIVED[:-1]))
        else:
            log(f"{name:14s} failed: {row['reason']}")
        rows.append(row)
    return {
        "schema": 1,
        "kind": machine.kind(desc),
        "load_avg_1m_end": _load(),
        "machine": desc,
        "machine_summary": machine.summary(desc),
        "settings": dataclasses.asdict(s),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": __doc__.split("Method. ", 1)[1].strip(),
        "algorithms": rows,
    }


# ----------------------------------------------------------------------------- output

HOW_TO_READ = (
    "Each training update is split into parts timed as separately compiled programs built from the library's own "
    "functions, all on the same EnvPool. **env**: the update's env steps alone (random actions, inside the graph). "
    "**inference** = act - env: policy forward, sampling and bookkeeping (episode statistics, trajectory or replay "
    "writes) of the rollout. **learning**: the learning step(s) on rollouts already collected or a pre-filled "
    "replay buffer, no env. **unexplained** = chunk - act - learn: the full compiled update (as training runs it) minus its parts; "
    "negative when XLA overlaps or fuses them, and it carries the noise of the three timings. **host**: the runner's "
    "work between chunks (fetching metrics and actions, metrics.csv, the action log, progress), spread over the "
    "updates of a training chunk; checkpoints and evaluation excluded, TensorBoard off. **total** = chunk + host is "
    "the wall time of one update in training; shares are of it and add up to 100%. An update is one PPO/A2C "
    "rollout and its learning, or one DQN metrics row (iterations, replay inserts and the gradient steps of the "
    "replay ratio). Figures are medians of the timed windows, after compilation; see the module docstring of "
    "benchmarks/breakdown.py for the exact method."
)


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.2f}" if abs(x) < 10 else f"{x:,.1f}" if abs(x) < 100 else f"{x:,.0f}"


def _cell(fig: dict[str, float]) -> str:
    return f"{_ms(fig['ms_per_update'])} ({fig['share']:.0%})"


def to_markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    lines = [
        f"# Where the time goes on {doc['kind']}{' (quick)' if s['quick'] else ''}: {s['env']}, "
        f"{s['num_envs']} envs, {s['threads']} threads",
        "",
        f"**Machine:** {doc['machine_summary']}",
        "",
        "| field | value |",
        "|---|---|",
        f"| CPU | {m.get('cpu_model')} ({m.get('physical_cores')} physical / {m.get('logical_cores')} logical cores, "
        f"{m.get('usable_cores')} usable) |",
        f"| GPU | {', '.join(g['name'] for g in m.get('gpus') or []) or 'none'} |",
        f"| jax backend | {m.get('jax_backend')} ({', '.join(m.get('jax_devices') or [])}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items() if v)} |",
        f"| load average (1 min) at start / end | {m.get('load_avg_1m')} / {doc.get('load_avg_1m_end')} |",
        f"| measured | {doc['timestamp']} |",
        "",
        *throughput._busy_warning(doc),
        "## How to read this",
        "",
        HOW_TO_READ,
        "",
        "## Per update: ms (share of total)",
        "",
        f"Median of {s['repeats']} window(s) of at least {s['window']:g} s; host over {s['host_chunks']} chunks "
        "per window.",
        "",
        "| algorithm | network | env steps / update | env | inference | learning | unexplained | host | total "
        "| training SPS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ok = [r for r in doc["algorithms"] if r["status"] == "ok"]
    for r in ok:
        d = r["derived"]
        lines.append(
            f"| {r['name']} | {r['network']} | {r['steps_per_update']:,} | "
            + " | ".join(_cell(d[k]) for k in DERIVED[:-1])
            + f" | {_ms(d['total']['ms_per_update'])} | {r['sps_training']:,.0f} |"
        )
    for r in doc["algorithms"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | failed: {(r['reason'] or '').replace('|', '/')} | | | | | | | | |")
    lines += [
        "",
        "## Components",
        "",
        "What was timed; inference, learning and unexplained above are derived from these. "
        "Windows: the timed windows in ms per update (min-max).",
        "",
        "| algorithm | component | ms / update | µs / env step | share of total | compile (s) | windows |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in ok:
        for name in COMPONENTS:
            f = r["components"][name]
            w = f["windows_ms_per_update"]
            comp = "-" if f["compile_s"] is None else f"{f['compile_s']:.1f}"
            lines.append(f"| {r['name']} | {name} | {_ms(f['ms_per_update'])} | {_ms(f['us_per_env_step'])} | "
                         f"{f['share']:.0%} | {comp} | {_ms(min(w))}-{_ms(max(w))} |")
    lines += ["", "## Updates", "", "| algorithm | an update is | SGD steps / update | updates per timed call | "
              "updates per training chunk | host per training chunk (ms) | env backend | "
              "load (1 min) before / after | wall (s) |",
              "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in ok:
        host_chunk = r["components"]["host"]["ms_per_update"] * r["training_updates_per_chunk"]
        lines.append(f"| {r['name']} | {r['update_is']} | {r['sgd_steps_per_update']:g} | {r['updates_per_call']} | "
                     f"{r['training_updates_per_chunk']} | {_ms(host_chunk)} | {r['backend']} | "
                     f"{r['load_avg_1m_start']} / "
                     f"{r['load_avg_1m_end']} | {r['wall_s']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def write_results(doc: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    s = doc["settings"]
    stem = f"breakdown_{doc['kind']}"
    if s["quick"]:
        stem += "_quick"
    if s["env"] != (QUICK_ENV if s["quick"] else DEFAULT_ENV):
        stem += "_" + s["env"].replace("/", "-")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md_path.write_text(to_markdown(doc))
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    try:
        settings = resolve(args, machine.usable_cores())
        check(settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    doc = run(settings, log=lambda msg: print(msg, flush=True))
    json_path, md_path = write_results(doc, args.out_dir)
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r["status"] == "ok" for r in doc["algorithms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
