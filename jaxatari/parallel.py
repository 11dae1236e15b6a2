"""Scale-out on JAX's own runtime: the pieces :mod:`jaxatari.driver` puts together
for data parallelism over devices and hosts, and for populations (README, "Scaling out").

Data parallelism: the global env batch ``B`` is split over the ``N`` devices of a
one-axis mesh (:data:`AXIS`, every process's devices in order), one EnvPool per
device; device ``d`` owns envs ``d * B/N .. (d + 1) * B/N - 1``, seeded as in a
one-device run (env ``i`` gets ``seed + i``). Updates run under ``shard_map``,
summing gradients and statistics with ``psum``; params stay replicated. They are
*device-invariant*: per-env keys (``fold_in(key, global env index)``) and
minibatches fixed by the key and the global env indices (:func:`time_minibatches`,
:func:`env_minibatches`) give the same result on any number of devices. Every
field of a training state has the same global shape on any topology except the
per-device windows of recent returns, which :func:`restore_latest_any_topology`
re-lays (:func:`merge_windows`). Populations: one EnvPool of ``K x num_envs``
envs seeded as each agent alone (:func:`make_population_envs`), the update
vmapped over agents (:func:`agent_step_fn`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxatari import configs, envs
from jaxatari.errors import ConfigError, ParallelError
from jaxatari.ops import standardize

log = logging.getLogger(__name__)

#: The mesh axis the env batch is split over.
AXIS = "d"

#: Environment variables read by :func:`initialize_distributed` when flags are unset.
ENV_COORDINATOR = "JAXATARI_COORDINATOR"
ENV_NUM_PROCESSES = "JAXATARI_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXATARI_PROCESS_ID"


# --- Multi-host ---
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` if a multi-process run is asked for.

    Flags win over the environment variables ``JAXATARI_COORDINATOR``
    (``HOST:PORT``), ``JAXATARI_NUM_PROCESSES`` and ``JAXATARI_PROCESS_ID``.
    On CPU, collectives go through gloo. Returns True if initialised.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if not coordinator and not (num_processes and num_processes > 1):
        return False
    if not coordinator or num_processes is None or process_id is None:
        raise ParallelError(
            f"A multi-process run needs --coordinator HOST:PORT, --num-processes and --process-id "
            f"(got coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id})."
        )
    if not 0 <= process_id < num_processes:
        raise ParallelError(f"--process-id {process_id} is not accepted: it must lie in [0, {num_processes}).")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def launch_local(argv: Sequence[str], processes: int, log_dir, *, env: dict[str, str] | None = None,
                 cwd=None, timeout: float | None = None,
                 process_env: Callable[[int], dict[str, str]] | None = None) -> list[tuple[int, str, str]]:
    """Run ``python argv...`` as ``processes`` processes of one ``jax.distributed``
    job on this machine (coordinator on a free localhost port, passed in the
    ``JAXATARI_*`` variables) and wait for all of them; for trying a multi-host
    run on one machine, tests and benchmarks.

    Output goes to ``log_dir/p<I>.out`` and ``.err``, not pipes: a process
    blocked on a full pipe would stall the others at the next collective.
    Processes still running at ``timeout`` are killed. ``process_env(i)``
    gives process ``i`` extra variables, e.g. its own GPU on a machine with
    several (``{"CUDA_VISIBLE_DEVICES": str(i)}``). Returns
    ``(returncode, stdout, stderr)`` per process.
    """
    import socket
    import subprocess
    import sys
    from pathlib import Path

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for i in range(processes):
        logs.append((log_dir / f"p{i}.out", log_dir / f"p{i}.err"))
        with open(logs[-1][0], "w") as fo, open(logs[-1][1], "w") as fe:
            procs.append(subprocess.Popen(
                [sys.executable, *argv], cwd=cwd, stdout=fo, stderr=fe,
                env=dict(os.environ if env is None else env, **(process_env(i) if process_env else {}),
                         JAXATARI_COORDINATOR=f"127.0.0.1:{port}", JAXATARI_NUM_PROCESSES=str(processes),
                         JAXATARI_PROCESS_ID=str(i))))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]


def is_main_process() -> bool:
    """True on process 0 (the one that logs and prints)."""
    return jax.process_index() == 0


# --- Devices and the mesh ---
def resolve_devices(requested: int | None, num_envs: int) -> int:
    """Devices per process to use.

    ``None``: all local devices, or the largest count that divides ``num_envs``.
    An explicit count must be between 1 and the local device count and divide
    ``num_envs`` (the env batch is split evenly).
    """
    local = jax.local_device_count()
    if requested is None:
        n = max(d for d in range(1, local + 1) if num_envs % d == 0)
        if n != local:
            log.warning("Using %d of %d local devices: --num-envs %d is not divisible by %d.",
                        n, local, num_envs, local)
        return n
    if not 1 <= requested <= local:
        raise ParallelError(f"--devices {requested} is not accepted: this process has {local} local "
                            f"device(s) ({jax.default_backend()}); use 1..{local}.")
    if num_envs % requested:
        raise ParallelError(f"--num-envs {num_envs} is not divisible by --devices {requested}; each device "
                            "steps an equal share of the envs.")
    return requested


def make_mesh(devices_per_process: int) -> Mesh:
    """A one-axis mesh of the first ``devices_per_process`` devices of every
    process, ordered by process (so process ``p`` owns a contiguous block)."""
    devs = []
    for p in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        devs.extend(mine[:devices_per_process])
    return Mesh(np.array(devs), (AXIS,))


def place(tree, like):
    """Put the (host or single-device) leaves of ``tree`` with the shardings of ``like``'s leaves."""
    def one(x, ref):
        if isinstance(x, jax.Array) and x.sharding == ref.sharding:
            return x
        x = fetch(x)
        return jax.make_array_from_callback(x.shape, ref.sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree, like)


def fetch(x) -> np.ndarray:
    """A global array on the host: whole if replicated or addressable, else this process's rows."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    spec = tuple(getattr(x.sharding, "spec", ()))
    axis = next((i for i, a in enumerate(spec) if a == AXIS), 0)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[axis].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=axis)


# --- One EnvPool per device ---
class PoolGroup:
    """This process's EnvPools, one per local device, seen as one env batch on the host.

    ``step``/``reset`` split and concatenate along envs, so the runner's exact
    resume (replaying logged actions) works unchanged.
    """

    def __init__(self, pools: Sequence[Any]):
        self.pools = list(pools)
        self.sizes = [p.config["num_envs"] for p in self.pools]

    def reset(self):
        outs = [p.reset() for p in self.pools]
        return np.concatenate([o[0] for o in outs]), outs[0][1]

    def step(self, actions):
        shares = np.split(np.asarray(actions), np.cumsum(self.sizes)[:-1])
        outs = [p.step(a) for p, a in zip(self.pools, shares)]
        return (*[np.concatenate([o[k] for o in outs]) for k in range(4)], outs[0][4])


@dataclasses.dataclass
class ShardedEnvs:
    """Per-device EnvPools and the step function used inside ``shard_map``.

    ``handle`` is a global array sharded over the mesh (each device its pool's
    handle); ``step_fn(handle, actions [B/N])`` steps the calling device's pool.
    """

    group: PoolGroup
    spec: envs.EnvSpec
    mesh: Mesh
    local_envs: int  # envs per device
    handle: jax.Array
    step_fn: envs.StepFn
    initial_obs: np.ndarray  # this process's first observations [B_local, ...]
    backend: str  # the env backend used: xla or callback


def make_sharded_envs(env_id: str, num_envs: int, *, seed: int, devices_per_process: int, preset=None,
                      options=None, num_threads: int = 0, backend: str = "auto") -> ShardedEnvs:
    """Build ``devices_per_process`` EnvPools on this process; env ``i`` of the
    global batch of ``num_envs`` (summed over every process) gets ``seed + i``.

    ``num_envs`` is the *global* batch; it must divide evenly over all devices.
    ``backend`` is :func:`jaxatari.envs.make_step_fn`'s; several devices or
    processes need ``env.xla()`` (``auto`` then means ``xla``).
    """
    mesh = make_mesh(devices_per_process)
    n_global = mesh.devices.size
    if backend == "callback" and n_global > 1:
        raise ParallelError(f"--env-backend callback is not supported on {n_global} devices (--devices, or several "
                            "processes); use auto or xla.")
    if num_envs % n_global:
        raise ParallelError(f"--num-envs {num_envs} is not divisible by the {n_global} devices of the mesh.")
    per = num_envs // n_global
    first = jax.process_index() * devices_per_process * per
    made = [envs.make(env_id, per, seed=seed + first + j * per, preset=preset, options=options,
                      num_threads=num_threads) for j in range(devices_per_process)]
    group, spec = PoolGroup([env for env, _ in made]), made[-1][1]
    obs0, _ = group.reset()
    fns = [envs.make_step_fn(env, spec, backend if n_global == 1 else "xla") for env in group.pools]
    handles, steps, used = [np.asarray(h) for h, _, _ in fns], [f for _, f, _ in fns], fns[-1][2]
    local_devs = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    sh = NamedSharding(mesh, P(AXIS))
    hshape = handles[0].shape
    handle = jax.make_array_from_single_device_arrays(
        (n_global * hshape[0], *hshape[1:]), sh, [jax.device_put(h, d) for h, d in zip(handles, local_devs)])

    # env.xla()'s custom call carries its pool in the compiled op (the handle alone does not select it), so
    # with several local devices each device switches to its own pool's step.
    def step_fn(h, actions):
        if len(steps) == 1:
            return steps[0](h, actions)
        idx = jax.lax.axis_index(AXIS) % devices_per_process
        return jax.lax.switch(idx, steps, h, actions)

    spec = dataclasses.replace(spec, num_envs=num_envs)
    return ShardedEnvs(group, spec, mesh, per, handle, step_fn, obs0, used)


def device_env_state(obs: np.ndarray, devices: int, window: int = 100) -> envs.EnvState:
    """A host :class:`~jaxatari.envs.EnvState` for ``obs [B, ...]`` split over ``devices``:
    per-env fields ``[B]``, a window of recent returns and a count per device
    (``[devices * W]``, ``[devices]``)."""
    B = obs.shape[0]
    return envs.EnvState(obs=obs, done=np.zeros((B,), bool), first=np.ones((B,), bool),
                         stats=envs.EpisodeStats(returns=np.zeros((B,), np.float32), lengths=np.zeros((B,), np.int32),
                                                 window=np.full((devices * window,), np.nan, np.float32),
                                                 count=np.zeros((devices,), np.int32)))


def sharded_env_state(mesh: Mesh, obs_local: np.ndarray, devices_per_process: int, window: int = 100) -> envs.EnvState:
    """The global :class:`~jaxatari.envs.EnvState`: per-env fields split along
    envs; the episode window and count are kept per device (``[N * W]``, ``[N]``)."""
    sh = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)),
                        device_env_state(obs_local, devices_per_process, window))


# --- Checkpoints on any topology ---
def stored_layout(stored: dict[str, Any]) -> tuple[int, int]:
    """``(windows, processes)`` of the run that wrote ``stored`` (its config.json):
    ``windows`` is the number of per-device episode windows in its env state (0:
    the former single-device path, one unsplit window), ``processes`` the number of
    processes whose action logs it wrote."""
    so = stored.get("scale_out") or {}
    if not so or so.get("num_agents", 1) > 1:
        return 0, 1
    return int(so.get("devices", 1)), int(so.get("processes", 1))


def merge_windows(window: np.ndarray, count: np.ndarray, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-lay per-device rings of recent returns for another device count.

    ``window [max(n,1) * W]`` and ``count`` (``[n]``, or a scalar for ``n = 0``)
    are ``n`` rings of ``W`` returns; the result has ``windows`` rings (0: one
    unsplit ring and a scalar count). The newest returns of every old ring are
    dealt round-robin into the new rings (the newest kept when they do not all
    fit), so the mean over the windows, the logged ``return_mean100``, is kept.
    """
    count = np.atleast_1d(np.asarray(count))
    old = count.shape[0]
    W = window.shape[0] // old
    rings = window.reshape(old, W)
    newest_first = []
    for ring, n in zip(rings, count):
        n = int(n)
        ordered = ring[:n] if n < W else np.roll(ring, -(n % W))  # oldest -> newest
        newest_first.append(ordered[::-1])
    merged = [r[i] for i in range(W) for r in newest_first if i < len(r)]  # newest first, interleaved
    k = max(windows, 1)
    out = np.full((k, W), np.nan, np.float32)
    new_count = np.zeros((k,), np.int32)
    for j in range(k):
        mine = merged[j::k][:W][::-1]  # oldest -> newest
        out[j, :len(mine)] = mine
        new_count[j] = len(mine)
    return out.reshape(-1), (new_count if windows else new_count[0])


def restore_latest_any_topology(ckpt, target, stored: dict[str, Any]):
    """``ckpt.restore_latest`` into ``target``'s layout, whatever topology wrote it.

    ``target`` is a training state (arrays, with their shardings) built for this
    run: on any number of devices and processes, or a population. Every field
    has the same global shape on every topology except the per-device windows of
    recent episode returns (``target.env.stats``), which are restored as stored
    and re-laid with :func:`merge_windows`. Returns the ``Restored`` with its
    ``state`` placed with ``target``'s shardings.
    """
    old, _ = stored_layout(stored)
    so = stored.get("scale_out") or {}
    population = so.get("num_agents", 1) > 1  # agents x envs on one device
    stats = target.env.stats
    new = old if population else (int(np.shape(stats.count)[0]) if np.ndim(stats.count) else 0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            target)
    if population and np.ndim(stats.count) == 2 and "windows_per_agent" not in so:
        # Written before an agent's count of returns had its device axis: [K] -> [K, 1].
        count = abstract.env.stats.count
        restored = ckpt.restore_latest(_with_stats(abstract, count=jax.ShapeDtypeStruct(
            count.shape[:1], count.dtype, sharding=count.sharding)))
        state = _with_stats(restored.state, count=restored.state.env.stats.count[:, None])
        return restored._replace(state=place(state, target))
    if old != new:
        W = stats.window.shape[0] // max(new, 1)
        sh = stats.window.sharding
        rep = NamedSharding(sh.mesh, P()) if isinstance(sh, NamedSharding) else sh
        abstract = _with_stats(abstract,
                               window=jax.ShapeDtypeStruct((max(old, 1) * W,), stats.window.dtype, sharding=rep),
                               count=jax.ShapeDtypeStruct((old,) if old else (), stats.count.dtype, sharding=rep))
        log.warning("Resuming a checkpoint written with %s on %s: the windows of recent episode returns are "
                    "re-laid for the new device count.",
                    f"{old} device window(s)" if old else "one window (the former single-device path)",
                    f"{new} device(s)" if new else "one window")
    restored = ckpt.restore_latest(abstract)
    state = restored.state
    if old != new:
        w, n = merge_windows(np.asarray(fetch(state.env.stats.window)), np.asarray(fetch(state.env.stats.count)),
                             new)
        state = _with_stats(state, window=w, count=n)
    return restored._replace(state=place(state, target))


def _with_stats(state, **fields):
    """``state`` with ``fields`` of its ``env.stats`` replaced."""
    return state.replace(env=state.env.replace(stats=state.env.stats.replace(**fields)))


def env_state_in(env: envs.EnvState) -> envs.EnvState:
    """Inside ``shard_map``: the per-device count ``[1]`` becomes a scalar."""
    return env.replace(stats=env.stats.replace(count=env.stats.count[0]))


def env_state_out(env: envs.EnvState) -> envs.EnvState:
    return env.replace(stats=env.stats.replace(count=env.stats.count[None]))


def global_window_mean(stats: envs.EpisodeStats) -> jax.Array:
    """Mean of every device's last-W full-game returns (inside ``shard_map``)."""
    return jnp.nanmean(jax.lax.all_gather(stats.window, AXIS))


# --- Maths of the device-invariant updates (inside shard_map) ---
def env_index(local_envs: int) -> jax.Array:
    """Global env indices ``[B/N]`` of the calling device's envs."""
    return jax.lax.axis_index(AXIS) * local_envs + jnp.arange(local_envs)


def psum_masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)`` over the global batch (masked-out samples count as 0)."""
    mask = mask.astype(x.dtype)
    s, n = jax.lax.psum((jnp.where(mask != 0, x * mask, 0.0).sum(), mask.sum()), AXIS)
    return s / jnp.maximum(n, 1.0)


def psum_masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked variance over the global batch (two passes, like ``jnp.var(where=)``)."""
    mean = psum_masked_mean(x, mask)
    return psum_masked_mean((x - mean) ** 2, mask)


def normalize_advantages(adv: jax.Array, mask: jax.Array) -> jax.Array:
    """``(A - mean) / (std + 1e-8)`` with the global masked mean and std, as in :func:`jaxatari.ops.ppo_loss`
    (:func:`jaxatari.ops.standardize`: a constant ``A`` gives zeros)."""
    return standardize(adv, lambda v: psum_masked_mean(v, mask))


def global_weight(mask: jax.Array) -> jax.Array:
    """``n_local / max(n_global, 1)``: a local masked mean times this, summed over
    devices, is the global masked mean (exactly, in real arithmetic)."""
    n = mask.astype(jnp.float32).sum()
    return n / jnp.maximum(jax.lax.psum(n, AXIS), 1.0)


def time_minibatches(batch, key: jax.Array, num_minibatches: int, global_env: jax.Array):
    """Device-invariant minibatches of a ``[T, B/N, ...]`` batch -> ``[M, T/M * B/N, ...]``.

    Env ``b`` permutes its own time steps with ``fold_in(key, b)``; minibatch
    ``m`` takes block ``m`` of every env's permuted steps. Which samples form a
    minibatch depends only on the key and the global env index.
    """
    T = jax.tree.leaves(batch)[0].shape[0]
    perms = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(key, b), T))(global_env)  # [Bn, T]

    def one(x):
        x = jax.vmap(lambda row, p: row[p], in_axes=(1, 0), out_axes=1)(x, perms)  # [T, Bn, ...] permuted per env
        x = x.reshape(num_minibatches, T // num_minibatches, *x.shape[1:])
        return x.reshape(num_minibatches, -1, *x.shape[3:])

    return jax.tree.map(one, batch)


def env_minibatches(batch, carry0, key: jax.Array, num_minibatches: int, global_env: jax.Array):
    """Device-invariant env-split minibatches for a recurrent policy.

    Sequences stay whole: a minibatch is a set of envs. The envs form blocks of
    ``M = num_minibatches`` consecutive global indices; block ``g`` permutes its
    ``M`` envs with ``fold_in(key, g)`` and minibatch ``m`` takes the ``m``-th env
    of every block. A device's ``B/N`` envs must be whole blocks (``B/N``
    divisible by ``M``), so which envs form a minibatch depends only on the key.

    ``batch`` leaves ``[T, B/N, ...]`` -> ``[M, T, B/(N M), ...]``; ``carry0``
    leaves ``[B/N, ...]`` -> ``[M, B/(N M), ...]``.
    """
    M = num_minibatches
    Bn = global_env.shape[0]
    blocks = global_env[::M] // M  # [Bn/M] global block ids of this device's blocks
    perms = jax.vmap(lambda g: jax.random.permutation(jax.random.fold_in(key, g), M))(blocks)  # [Bn/M, M]
    idx = (jnp.arange(Bn // M)[:, None] * M + perms).T  # [M, Bn/M] local env indices

    data = jax.tree.map(lambda x: jnp.moveaxis(jnp.take(x, idx, axis=1), 1, 0), batch)
    return data, jax.tree.map(lambda x: jnp.take(x, idx, axis=0), carry0)


# --- Populations ---
def parse_sweep(sweep: str | None, num_agents: int, sweepable: Sequence[str],
                ranges: dict[str, str]) -> tuple[str | None, list[float] | None, int]:
    """``"learning_rate=1e-4,2.5e-4"`` -> ``(field, values, num_agents)``.

    With ``--num-agents 1`` (the default) the sweep sets the agent count;
    otherwise the count must equal the number of values. Each value must be in
    the field's range, ``ranges`` being the agent's :func:`configs.check_ranges`
    rules (``Algorithm.ranges``), as the flag itself would be.
    """
    if not sweep:
        return None, None, num_agents
    if "=" not in sweep:
        raise ParallelError(f"--sweep {sweep!r} is not of the form FIELD=V1,V2,..., e.g. learning_rate=1e-4,2.5e-4.")
    name, vals = sweep.split("=", 1)
    name = name.strip().replace("-", "_")
    if name not in sweepable:
        raise ParallelError(f"--sweep {name!r} is not accepted; sweepable: {', '.join(sweepable)}.")
    try:
        values = [float(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise ParallelError(f"--sweep values {vals!r} are not numbers.") from None
    if len(values) < 2:
        raise ParallelError(f"--sweep {sweep!r} gives {len(values)} value(s); a sweep takes two or more, e.g. "
                            f"{name}=1e-4,2.5e-4 (for one value, pass --{name.replace('_', '-')} alone).")
    for v in values:
        try:
            configs.check_ranges(types.SimpleNamespace(**{name: v}), {name: ranges[name]})
        except ConfigError as e:
            raise ParallelError(f"--sweep {name}={vals}: {e}") from None
    if num_agents == 1:
        num_agents = len(values)
    if len(values) != num_agents:
        raise ParallelError(f"--sweep gives {len(values)} values for {name} but --num-agents is {num_agents}.")
    return name, values, num_agents


def agent_seeds(seed: int, num_agents: int) -> list[int]:
    """Agent ``k`` trains with seed ``seed + k`` (params, actions and envs)."""
    return [seed + k for k in range(num_agents)]


def make_population_envs(env_id: str, num_envs: int, seeds: Sequence[int], *, preset=None, options=None,
                         num_threads: int = 0):
    """One EnvPool of ``K x num_envs`` envs; agent ``k``'s env ``i`` is seeded
    ``seeds[k] + i``, as in a run of agent ``k`` alone. Returns ``(env, spec)``,
    ``spec.num_envs`` being ``num_envs`` (per agent)."""
    _, spec = envs.make(env_id, 1, seed=seeds[0], preset=preset, options=options)
    env_seed = [s + i for s in seeds for i in range(num_envs)]
    env = envs.envpool_make(env_id, env_type="gymnasium", num_envs=len(env_seed), batch_size=len(env_seed),
                       num_threads=num_threads, seed=seeds[0], env_seed=env_seed, **spec.options)
    return env, dataclasses.replace(spec, num_envs=num_envs)


def agent_step_fn(step_fn: envs.StepFn, num_agents: int) -> envs.StepFn:
    """One agent's ``step(handle, actions [B])`` on the joint pool of ``K x B`` envs,
    for ``jax.vmap`` over agents: vmapped, it is one call of ``step_fn`` with the
    agents' actions ``[K, B]`` laid end to end (a custom batching rule; the
    handle stays unbatched). Called outside a vmap it steps the pool with the
    actions repeated for every agent and returns the first agent's share (only
    its shapes are ever used, when JAX traces the unbatched function)."""
    def joint(h, actions):  # actions [K, B] -> Timestep [K, B, ...]
        h, ts = step_fn(h, actions.reshape(-1))
        return h, jax.tree.map(lambda x: x.reshape(num_agents, -1, *x.shape[1:]), ts)

    @jax.custom_batching.custom_vmap
    def step(h, actions):
        h, ts = joint(h, jnp.broadcast_to(actions, (num_agents, *actions.shape)))
        return h, jax.tree.map(lambda x: x[0], ts)

    @step.def_vmap
    def _batched(axis_size, in_batched, h, actions):
        h_batched, a_batched = in_batched
        if h_batched or axis_size != num_agents:
            raise ValueError(f"the joint pool steps {num_agents} agents with one handle; got a vmap of "
                             f"{axis_size} with a batched handle: {h_batched}")
        if not a_batched:
            actions = jnp.broadcast_to(actions, (num_agents, *actions.shape))
        h, ts = joint(h, actions)
        return (h, ts), (False, jax.tree.map(lambda _: True, ts))

    return step
