"""The one training driver: everything around an algorithm, for every algorithm.

An algorithm (:class:`Algorithm`) is a set of pure functions: ``init`` builds
its training state, ``update`` collects a rollout and learns from it. The
driver owns the rest: the envs, the mesh, the run directory and
``config.json``, resume (checkpoint and action log), the compiled chunk,
progress, metrics, checkpoints, evaluation and signals (:func:`train`).

One compiled path, for 1..N devices and hosts. ``update`` is written for one
device's share of the env batch inside ``shard_map`` over
:data:`jaxatari.parallel.AXIS`; its collectives (``psum``) make it
device-invariant, and one device is simply N = 1. A population of K agents
(``--num-agents``, ``--sweep``) is ``jax.vmap`` over that same ``update`` on one
device: the env step of the joint EnvPool batches itself
(:func:`jaxatari.parallel.agent_step_fn`), so agent ``k`` trains exactly as a
lone run with seed ``seed + k`` would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxatari import configs, envs, parallel, rundir, runner
from jaxatari.algorithm import Algorithm, Context
from jaxatari.checkpoint import Checkpointer
from jaxatari.errors import ConfigError, ParallelError
from jaxatari.evaluate import actor_critic_eval_fn, evaluate, q_policy
from jaxatari.networks import ActorCritic, NetworkSpec, QNetwork

AXIS = parallel.AXIS


# ---------------------------------------------------------------------------
# The compiled chunk
# ---------------------------------------------------------------------------


def agents_update(algo: Algorithm, c, ctx: Context, sweep_name: str | None, sweep_values):
    """``update(state, handle)`` of ``K`` agents stacked on a leading axis: ``algo.update``
    vmapped, agent ``k`` with its value of the swept field. Metrics ``[K]`` (``update`` and
    ``env_steps`` scalars), actions ``[T, K * B]`` in the joint pool's order."""
    values = jnp.asarray(sweep_values, jnp.float32)

    def update(state, handle):
        def one(s, v):
            ck = dataclasses.replace(c, **{sweep_name: v}) if sweep_name else c
            return algo.update(ck, ctx, s, handle)

        s, h, m, a = jax.vmap(one, out_axes=(0, None, 0, 0), axis_name=ctx.agent_axis)(state, values)
        m["update"], m["env_steps"] = m["update"][0], m["env_steps"][0]
        return s, h, m, jnp.swapaxes(a, 0, 1).reshape(a.shape[1], -1)

    return update


def make_chunk(update: Callable, mesh, state_specs, updates_per_chunk: int):
    """A jitted ``chunk(state, handle) -> (state, handle, ChunkOutput)``: a ``lax.scan`` of
    ``updates_per_chunk`` calls of ``update`` under ``shard_map`` on ``mesh``; ``state``
    is donated. Metrics ``[U, ...]``, actions ``[S, B]`` (global env order)."""

    def chunk(state, handle):
        def body(carry, _):
            s, h, m, a = update(*carry)
            return (s, h), (m, a)

        (state, handle), (metrics, actions) = jax.lax.scan(body, (state, handle), None, length=updates_per_chunk)
        return state, handle, runner.ChunkOutput(metrics, actions.reshape(-1, actions.shape[-1]).astype(jnp.uint8))

    out = runner.ChunkOutput(P(), P(None, AXIS))
    f = jax.shard_map(chunk, mesh=mesh, in_specs=(state_specs, P(AXIS)), out_specs=(state_specs, P(AXIS), out),
                      check_vma=False)
    return jax.jit(f, donate_argnames=("state",))


def compile_update(update: Callable, mesh, state_specs):
    """``update(state, handle) -> (state, handle, metrics, actions [T, B])`` under
    ``shard_map`` on ``mesh``, jitted, ``state`` donated: one update per call."""
    f = jax.shard_map(update, mesh=mesh, in_specs=(state_specs, P(AXIS)),
                      out_specs=(state_specs, P(AXIS), P(), P(None, AXIS)), check_vma=False)
    return jax.jit(f, donate_argnums=0)


# ---------------------------------------------------------------------------
# Envs and the state before update 0
# ---------------------------------------------------------------------------


class Setup(NamedTuple):
    """The envs of a run and how its state is laid out."""

    group: Any  # this process's envs on the host (reset/step), for the action-log replay
    spec: envs.EnvSpec  # spec.num_envs: one agent's global batch
    mesh: Any
    handle: jax.Array
    step_fn: envs.StepFn
    local_envs: int
    obs: np.ndarray  # first observations: this process's [B_local, ...], or [K, B, ...] for a population
    backend: str
    devices_per_process: int


def make_envs(c, num_agents: int, seeds) -> Setup:
    """The run's EnvPools: one per local device, or one joint pool of ``K x B`` envs
    for a population (agent ``k``'s env ``i`` seeded ``seeds[k] + i``)."""
    options = envs.parse_env_options(c.env_option)
    if num_agents > 1:
        env, spec = parallel.make_population_envs(c.env, c.num_envs, seeds, preset=c.preset, options=options,
                                                  num_threads=c.num_threads)
        obs, _ = env.reset()
        handle, step_fn, backend = envs.make_step_fn(env, dataclasses.replace(spec, num_envs=num_agents * c.num_envs),
                                                     c.env_backend)
        return Setup(env, spec, parallel.make_mesh(1), handle, parallel.agent_step_fn(step_fn, num_agents),
                     c.num_envs, obs.reshape(num_agents, c.num_envs, *obs.shape[1:]), backend, 1)
    senv = parallel.make_sharded_envs(c.env, c.num_envs, seed=c.seed, devices_per_process=c.devices,
                                      preset=c.preset, options=options, num_threads=c.num_threads,
                                      backend=c.env_backend)
    return Setup(senv.group, senv.spec, senv.mesh, senv.handle, senv.step_fn, senv.local_envs, senv.initial_obs,
                 senv.backend, c.devices)


def state_specs(algo: Algorithm, state, population: bool):
    """``shard_map`` specs: the sharded fields split along envs, the rest replicated
    (a population lives on one device: everything replicated)."""
    return state.replace(**{f.name: P(AXIS) if f.name in algo.sharded_fields and not population else P()
                            for f in dataclasses.fields(state)})


def initial_state(algo: Algorithm, c, ctx: Context, es: Setup, agents, *, abstract: bool):
    """The state before update 0 (``abstract``: its shapes and shardings only, the
    target a checkpoint restores into without a second copy in memory)."""
    if len(agents) > 1:
        def make():  # each agent's init compiled (DQN's network init is ~100 tiny programs run eagerly)
            states = [jax.jit(functools.partial(algo.init, ck, ctx))(parallel.device_env_state(es.obs[k], 1),
                                                                     jax.random.PRNGKey(ck.seed))
                      for k, ck in enumerate(agents)]
            return jax.tree.map(lambda *x: jnp.stack(x), *states)

        if not abstract:
            return make()
        on_device = NamedSharding(es.mesh, P())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), jax.eval_shape(make))
    env_state = parallel.sharded_env_state(es.mesh, es.obs, es.devices_per_process)

    def make(env_state):  # the key is a constant: every process computes the same replicated fields
        return algo.init(c, ctx, env_state, jax.random.PRNGKey(c.seed))

    shapes = jax.eval_shape(make, env_state)
    specs = state_specs(algo, shapes, population=False)
    shardings = jax.tree.map(lambda s, x: jax.tree.map(lambda _: NamedSharding(es.mesh, s), x), specs, shapes,
                             is_leaf=lambda x: isinstance(x, P))
    init = jax.jit(make, out_shardings=shardings)
    return jax.eval_shape(init, env_state) if abstract else init(env_state)


class Prepared(NamedTuple):
    """What :func:`prepare` returns: a research loop's starting point."""

    config: Any  # resolved
    context: Context
    envs: Setup
    state: Any  # the state before update 0
    handle: jax.Array
    update: Callable  # jitted update(state, handle) -> (state, handle, metrics, actions [T, B])


def prepare(algo: Algorithm, config) -> Prepared:
    """Envs, the state before update 0 and a compiled ``update`` for ``config``, without a
    run directory: for a training loop of one's own. ``config.total_timesteps`` sets the
    number of updates the learning-rate schedules anneal over, as in :func:`train`; ``--devices`` the mesh."""
    c = algo.resolve(config)
    parallel.initialize_distributed(c.coordinator, c.num_processes, c.process_id)
    c = dataclasses.replace(c, devices=_scale_out(dataclasses.replace(c, num_agents=1, sweep=None), 1))
    algo.check_devices(c, c.devices * jax.process_count())
    es = make_envs(c, 1, [c.seed])
    ctx = Context(es.spec, algo.network_spec(c, es.spec), es.step_fn, es.local_envs,
                  runner.make_schedule(c.total_timesteps, algo.steps_per_update(c), c.chunk_steps).num_updates)
    state = initial_state(algo, c, ctx, es, [c], abstract=False)
    update = compile_update(functools.partial(algo.update, c, ctx), es.mesh, state_specs(algo, state, False))
    return Prepared(c, ctx, es, state, es.handle, update)


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------


def _scale_out(c, num_agents: int) -> int:
    """Devices per process for this run (1 for a population), after refusing what cannot run."""
    if num_agents < 1:
        raise ParallelError(f"--num-agents {num_agents} is not accepted: it must be >= 1.")
    if num_agents > 1 or c.sweep:
        if c.devices not in (None, 1) or jax.process_count() > 1:
            raise ParallelError(f"--num-agents {num_agents} runs on one device of one process; "
                                f"drop --devices {c.devices} (or run one population per device).")
        return 1
    return parallel.resolve_devices(c.devices, c.num_envs // jax.process_count())


def actor_critic_evaluator(c, net_spec: NetworkSpec) -> Callable[[Any, int], float]:
    """``score(params, seed)``: the mean full-game return of ``--eval-episodes`` games
    (env seeds from ``seed + 100_000``) with the policy of host ``params``."""
    options = envs.parse_env_options(c.env_option)
    net = ActorCritic(net_spec)
    cache: dict[int, Callable] = {}

    def score(params, seed: int) -> float:
        if seed not in cache:
            cache[seed] = actor_critic_eval_fn(net, net_spec, env_id=c.env, preset=c.preset, options=options,
                                               episodes=c.eval_episodes, seed=seed + 100_000)
        return cache[seed](params)

    return score


def q_evaluator(c, net_spec: NetworkSpec) -> Callable[[Any, int], float]:
    """``score(params, seed)``: the mean full-game return of ``--eval-episodes`` games
    (env seeds from ``seed + 100_000``) with the ``--eval-epsilon``-greedy (greedy at 0)
    policy of the Q-network of host ``params``."""
    policy_fn = q_policy(QNetwork(net_spec).apply)  # one policy function: its compiled step is reused
    options = envs.parse_env_options(c.env_option)

    def score(params, seed: int) -> float:
        return evaluate(policy_fn, params, None, env_id=c.env, preset=c.preset, options=options,
                        episodes=c.eval_episodes, seed=seed + 100_000,
                        mode="epsilon" if c.eval_epsilon > 0 else "greedy", epsilon=c.eval_epsilon).mean

    return score


class _Without:
    """The checkpointer as ``runner.run`` sees it, saving the state without ``fields``."""

    def __init__(self, checkpointer, fields: tuple[str, ...]):
        self._ckpt, self._drop = checkpointer, dict.fromkeys(fields)

    def save(self, step, state, **kw):
        return self._ckpt.save(step, state.replace(**self._drop), **kw)

    def save_best(self, step, state, score, **kw):
        return self._ckpt.save_best(step, state.replace(**self._drop), score, **kw)

    def wait(self):
        self._ckpt.wait()


def train(algo: Algorithm, config) -> runner.RunResult:
    """Train ``algo`` as ``config`` says: one agent on 1..N devices and processes, or a
    population; a new run or a ``--resume``. Returns the final :class:`runner.RunResult`."""
    c = algo.resolve(config)
    parallel.initialize_distributed(c.coordinator, c.num_processes, c.process_id)
    name, values, K = parallel.parse_sweep(c.sweep, c.num_agents, algo.sweepable, algo.ranges)
    c = dataclasses.replace(c, num_agents=K, devices=_scale_out(c, K))
    population, processes, main = K > 1, jax.process_count(), parallel.is_main_process()
    if not population:
        algo.check_devices(c, c.devices * processes)
    stored = rundir.load_run_config(c.resume) if c.resume else {}
    steps = algo.steps_per_update(c)
    sched = runner.make_schedule(c.total_timesteps, steps, c.chunk_steps,
                                 updates_per_chunk=stored.get("schedule", {}).get("updates_per_chunk"))
    run_dir = rundir.run_dir_for(c, algo.name)
    afresh = rundir.start_over_if_unfinished(run_dir, resume=bool(c.resume))  # a start killed before its first save
    c = dataclasses.replace(c, run_dir=str(run_dir))
    seeds = parallel.agent_seeds(c.seed, K)
    agents = [dataclasses.replace(c, seed=s, **({name: values[k]} if name else {})) for k, s in enumerate(seeds)]

    es = make_envs(c, K, seeds)
    net_spec = algo.network_spec(c, es.spec)
    ctx = Context(es.spec, net_spec, es.step_fn, es.local_envs, sched.num_updates, "agents" if population else None)
    total_envs = K * c.num_envs
    unsaved = algo.unsaved(c, es.spec, K)

    def updates_done(state) -> int:
        return int(np.ravel(parallel.fetch(algo.updates_done(c, state)))[0])

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        start_chunk, meta = 0, {}
        if c.resume and not afresh:
            target = initial_state(algo, c, ctx, es, agents, abstract=True).replace(**dict.fromkeys(unsaved))
            restored = parallel.restore_latest_any_topology(ckpt, target, stored)
            state, meta = restored.state, dict(restored.meta or {})
            done = updates_done(state)
            rundir.check_unfinished(run_dir, done * steps, sched.total_steps)  # before a fresh buffer is allocated
            why = ""
            if unsaved:  # taken afresh: the state without them, then a new state for them
                state, why = algo.restart(c, es.spec, state, initial_state(algo, c, ctx, es, agents, abstract=False))
            if done % sched.updates_per_chunk:
                raise ConfigError(f"Checkpoint at update {done} is not on a chunk boundary of "
                                  f"{sched.updates_per_chunk} updates.")
            start_chunk = done // sched.updates_per_chunk
            obs = np.asarray(parallel.fetch(state.env.obs)).reshape(-1, *es.spec.obs_shape)
            if not rundir.restore_env(es.group, run_dir, done * steps // c.num_envs, obs, total_envs,
                                      logged_processes=parallel.stored_layout(stored)[1],
                                      process_index=jax.process_index(), process_count=processes):
                state = state.replace(env=rundir.restart_episodes(state.env))
            if main:
                print(f"Resumed {run_dir} at env step {done * steps:,}{' per agent' if population else ''}.",
                      flush=True)
                _say_how_it_continues(stored, c.devices * processes, population)
                if why:
                    print(why, flush=True)
        else:
            state = initial_state(algo, c, ctx, es, agents, abstract=False)
        line, recorded = algo.describe(c, es.spec, K) if algo.describe else ("", {})
        if main:
            rundir.write_config(run_dir, dict(
                configs.config_to_json(c), algo=algo.name, env_spec=es.spec.to_json(), network_spec=net_spec.to_json(),
                schedule=dataclasses.asdict(sched), env_backend_used=es.backend, versions=rundir.versions(),
                coordinator=None, num_processes=None, process_id=None,  # a resume may use another topology
                scale_out=dict(devices_per_process=c.devices, processes=processes, devices=c.devices * processes,
                               num_agents=K, sweep=dict(name=name, values=values) if name else None,
                               windows_per_agent=1),
                **recorded,
            ))
            n = c.devices * processes
            mode = (f"population of {K} agents x {c.num_envs} envs" if population else
                    f"{n} device(s) x {c.num_envs // n} envs" + (f" on {processes} processes" if processes > 1 else ""))
            print(f"{algo.name.upper()} on {c.env} ({describe_preset(es.spec.preset, es.spec.options)}) | {mode} x "
                  f"{steps // c.num_envs} steps | network {net_spec.torso}{'+cfc' if net_spec.recurrent else ''} | "
                  f"env backend {es.backend} | {jax.default_backend()} | run dir {run_dir}", flush=True)
            if line:
                print(line, flush=True)

        update = (agents_update(algo, c, ctx, name, values if name else np.zeros(K)) if population else
                  functools.partial(algo.update, c, ctx))
        chunk_fn = make_chunk(update, es.mesh, state_specs(algo, state, population), sched.updates_per_chunk)
        eval_fn = None
        if c.eval_every:  # process 0 evaluates; the runner broadcasts the score
            score = (q_evaluator if net_spec.head == "q" else actor_critic_evaluator)(c, net_spec)
            if population:
                def eval_fn(params):  # [K] scores: agent k as its lone run would score it
                    return np.array([score(jax.tree.map(lambda x: np.asarray(x)[k], params), s)
                                     for k, s in enumerate(seeds)])
            else:
                def eval_fn(params):
                    return score(jax.tree.map(parallel.fetch, params), c.seed)
        result = runner.run(
            run_dir=run_dir, state=state, handle=es.handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=total_envs, env_steps=lambda s: updates_done(s) * steps,
            policy_of=lambda s: s.params, checkpointer=_Without(ckpt, unsaved) if unsaved else ckpt,
            checkpoint_every=c.checkpoint_every, checkpoint_minutes=c.checkpoint_minutes,
            target_return=getattr(c, "target_return", None), metric_columns=algo.metric_columns, eval_fn=eval_fn,
            eval_every=c.eval_every, meta=meta,
            tensorboard=c.tensorboard, resume_command=rundir.resume_command(algo.name, run_dir), num_agents=K,
            is_main=main, fetch=parallel.fetch,
        )
    if population and main:
        save_agents(run_dir, result.state.replace(**dict.fromkeys(unsaved)), c, agents, algo.name,
                             es.spec, net_spec, sched, result.global_step)
    return result


def describe_preset(preset: str, options: dict[str, Any]) -> str:
    """The run header's view of the env options: ``preset nature`` plus those that differ from the
    preset (``preset nature, noop_max=10``); config.json's env_spec holds them all."""
    base = envs.ATARI_PRESETS.get(preset, {})
    return ", ".join([f"preset {preset}", *(f"{k}={v}" for k, v in options.items() if k not in base or base[k] != v)])


def _say_how_it_continues(stored: dict[str, Any], devices: int, population: bool) -> None:
    """After a resume: one line if the run does not continue bit for bit."""
    if population or stored.get("scale_out", {}).get("num_agents", 1) > 1:
        return
    old, _ = parallel.stored_layout(stored)
    if not old:
        print("It was trained on the former single-device path and continues on the one device-invariant path, "
              "whose sampling keys and minibatches differ: not the run its own code would have given.", flush=True)
    elif old != devices:
        print(f"The checkpoint was written on {old} device(s) and continues on {devices}: the same run to float "
              "tolerance, not bit for bit.", flush=True)


def save_agents(run_dir, state, c, agents, algo, spec, net_spec, sched, step: int) -> None:
    """Per-agent checkpoints: ``RUN_DIR/agents/<k>/`` is a run directory of its
    own (``config.json`` with the agent's seed and hyperparameters, and
    ``checkpoints/latest``), loadable with :func:`jaxatari.policy.load_policy`."""
    for k, ck in enumerate(agents):
        d = run_dir / "agents" / str(k)
        one = jax.tree.map(lambda x: np.asarray(x)[k], state)
        rundir.write_config(d, dict(
            configs.config_to_json(dataclasses.replace(ck, num_agents=1, sweep=None, run_dir=str(d))),
            algo=algo, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            schedule=dataclasses.asdict(sched), agent=k, population=str(run_dir), versions=rundir.versions(),
        ))
        with Checkpointer(d, keep=1, async_save=False) as ckpt:
            if ckpt.latest_step() != step:
                ckpt.save(step, one, policy=one.params, meta=dict(agent=k, env_steps=step))
