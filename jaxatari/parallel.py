"""Scale-out on JAX's own runtime: data parallelism over devices and hosts, and
populations of agents in one process.

Data parallelism (``--devices N``). The global env batch ``B`` is split into
``N`` shards of ``B / N`` envs, one EnvPool per device. Device ``d`` (global
index, counting the devices of every process in order) owns the envs
``d * B/N .. (d + 1) * B/N - 1`` and seeds them exactly as a one-device run
seeds those envs (env ``i`` gets ``seed + i``). The update runs under
``shard_map`` over a one-axis mesh: each device steps its own EnvPool, computes
gradients on its share, and gradients and statistics are summed with
``psum``; params and optimiser state stay replicated and identical.

EnvPool's ``env.xla()`` custom call carries its pool in the compiled op (the
handle argument alone does not select the pool), so the per-device step is a
``lax.switch`` on the device's index over the local pools' step functions: each
device executes only its own pool's custom call.

The sharded update is *device-invariant*: the same global batch and seed give
the same result on any number of devices (to float tolerance). To get there it
samples actions with one key per env (``fold_in(key, global env index)``) and
builds PPO minibatches by permuting time within each env (one key per env) and
cutting the permuted time axis into ``num_minibatches`` blocks, so a minibatch
holds the same samples however the envs are split. This scheme differs from the
default single-device path (one key for the batch, one flat permutation), so
the default (``--devices 1``, ``--num-agents 1``) keeps the old code path and
its numbers bit for bit; ``--devices N`` > 1 takes the sharded path, and the
sharded path on one device (``sharded=True``) is what it is compared against.

Recurrent policies carry their state split along envs like the env state;
their minibatches take whole envs (:func:`env_minibatches`, blocks of
``num_minibatches`` envs permuted per block), again device-invariant.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize``
(CPU collectives via gloo); each process builds the pools of its local devices,
and the mesh spans every process's devices. Each process logs the actions of
its own envs.

Any topology: every field of a training state has the same global shape on
any number of devices and processes except the per-device windows of recent
returns, so :func:`restore_latest_any_topology` resumes a checkpoint on another
topology (re-laying those windows with :func:`merge_windows`) and
:func:`jaxatari.runner.restore_env` replays the global action log into the envs
each process now owns.

Populations (``--num-agents K``): the update of the single-device path is
vmapped over a leading agent axis, the env step is taken out of the vmap and
made once for one EnvPool of ``K x num_envs`` envs whose per-env seeds
(EnvPool's ``env_seed``) are those agent ``k`` would have alone.

DQN (:mod:`jaxatari.agents.dqn`) uses these pieces with its own glue
(``train_sharded``, ``train_population``): its replay buffer is split along
envs like the env state, and its minibatches are stratified by env.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxatari import envs, runner
from jaxatari.errors import ConfigError, ParallelError
from jaxatari.ops import standardize

log = logging.getLogger(__name__)

#: The mesh axis the env batch is split over.
AXIS = "d"

#: Environment variables read by :func:`initialize_distributed` when flags are unset.
ENV_COORDINATOR = "JAXATARI_COORDINATOR"
ENV_NUM_PROCESSES = "JAXATARI_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXATARI_PROCESS_ID"


# ---------------------------------------------------------------------------
# Multi-host
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Devices and the mesh
# ---------------------------------------------------------------------------


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


def replicate(mesh: Mesh, tree):
    """Put every leaf, identical on every process, on every device of ``mesh``."""
    sh = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), tree)


def shard_local(mesh: Mesh, tree):
    """Arrays ``[B_local, ...]`` (this process's share) -> global arrays split on axis 0."""
    sh = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), tree)


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


# ---------------------------------------------------------------------------
# One EnvPool per device
# ---------------------------------------------------------------------------


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
        actions = np.asarray(actions)
        outs, i = [], 0
        for p, n in zip(self.pools, self.sizes):
            outs.append(p.step(actions[i:i + n]))
            i += n
        return (np.concatenate([o[0] for o in outs]), *[np.concatenate([o[k] for o in outs]) for k in (1, 2, 3)],
                outs[0][4])


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
    global_envs: int
    handle: jax.Array
    step_fn: envs.StepFn
    initial_obs: np.ndarray  # this process's first observations [B_local, ...]


def make_sharded_envs(env_id: str, num_envs: int, *, seed: int, devices_per_process: int, preset=None,
                      options=None, num_threads: int = 0, backend: str = "auto") -> ShardedEnvs:
    """Build ``devices_per_process`` EnvPools on this process; env ``i`` of the
    global batch of ``num_envs`` (summed over every process) gets ``seed + i``.

    ``num_envs`` is the *global* batch; it must divide evenly over all devices.
    """
    if backend == "callback":
        raise ParallelError("--env-backend callback is not supported with several devices; use auto or xla.")
    mesh = make_mesh(devices_per_process)
    n_global = mesh.devices.size
    if num_envs % n_global:
        raise ParallelError(f"--num-envs {num_envs} is not divisible by the {n_global} devices of the mesh.")
    per = num_envs // n_global
    first_dev = jax.process_index() * devices_per_process
    pools, spec, steps, handles = [], None, [], []
    for j in range(devices_per_process):
        env, spec = envs.make(env_id, per, seed=seed + (first_dev + j) * per, preset=preset, options=options,
                              num_threads=num_threads)
        pools.append(env)
    group = PoolGroup(pools)
    obs0, _ = group.reset()
    for env in pools:
        h, step, _ = envs.make_step_fn(env, spec, "xla")
        handles.append(np.asarray(h))
        steps.append(step)
    local_devs = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    sh = NamedSharding(mesh, P(AXIS))
    hshape = handles[0].shape
    handle = jax.make_array_from_single_device_arrays(
        (n_global * hshape[0], *hshape[1:]), sh, [jax.device_put(h, d) for h, d in zip(handles, local_devs)])

    def step_fn(h, actions):
        idx = jax.lax.axis_index(AXIS) % devices_per_process
        return jax.lax.switch(idx, steps, h, actions)

    spec = dataclasses.replace(spec, num_envs=num_envs)
    return ShardedEnvs(group, spec, mesh, per, num_envs, handle, step_fn, obs0)


def sharded_env_state(mesh: Mesh, obs_local: np.ndarray, devices_per_process: int, window: int = 100) -> envs.EnvState:
    """The global :class:`~jaxatari.envs.EnvState`: per-env fields split along
    envs; the episode window and count are kept per device (``[N * W]``, ``[N]``)."""
    B = obs_local.shape[0]
    local = dict(
        obs=obs_local,
        done=np.zeros((B,), bool),
        first=np.ones((B,), bool),
        returns=np.zeros((B,), np.float32),
        lengths=np.zeros((B,), np.int32),
        window=np.full((devices_per_process * window,), np.nan, np.float32),
        count=np.zeros((devices_per_process,), np.int32),
    )
    g = shard_local(mesh, local)
    return envs.EnvState(obs=g["obs"], done=g["done"], first=g["first"],
                         stats=envs.EpisodeStats(returns=g["returns"], lengths=g["lengths"], window=g["window"],
                                                 count=g["count"]))


# ---------------------------------------------------------------------------
# Checkpoints on any topology
# ---------------------------------------------------------------------------


def stored_layout(stored: dict[str, Any]) -> tuple[int, int]:
    """``(windows, processes)`` of the run that wrote ``stored`` (its config.json):
    ``windows`` is the number of per-device episode windows in its env state (0:
    the plain single-device path, one unsplit window), ``processes`` the number of
    processes whose action logs it wrote."""
    so = stored.get("scale_out") or {}
    if not so or so.get("num_agents", 1) > 1:
        return 0, 1
    return int(so.get("devices", 1)), int(so.get("processes", 1))


def _layout(stats: envs.EpisodeStats) -> int:
    return 0 if np.ndim(stats.count) == 0 else int(np.shape(stats.count)[0])


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
    run: on any number of devices and processes, or the plain path. Every field
    has the same global shape on every topology except the per-device windows of
    recent episode returns (``target.env.stats``), which are restored as stored
    and re-laid with :func:`merge_windows`. Returns the ``Restored`` with its
    ``state`` placed with ``target``'s shardings.
    """
    old, _ = stored_layout(stored)
    population = (stored.get("scale_out") or {}).get("num_agents", 1) > 1  # agents x envs: one fixed layout
    new = old if population else _layout(target.env.stats)

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    abstract = jax.tree.map(spec, target)
    stats = target.env.stats
    if old != new:
        W = stats.window.shape[0] // max(new, 1)
        sh = stats.window.sharding
        rep = NamedSharding(sh.mesh, P()) if isinstance(sh, NamedSharding) else sh
        abstract = abstract.replace(env=abstract.env.replace(stats=abstract.env.stats.replace(
            window=jax.ShapeDtypeStruct((max(old, 1) * W,), stats.window.dtype, sharding=rep),
            count=jax.ShapeDtypeStruct((old,) if old else (), stats.count.dtype, sharding=rep))))
        log.warning("Resuming a checkpoint written with %s on %s: the windows of recent episode returns are "
                    "re-laid for the new device count.", f"{old} device window(s)" if old else "the plain path",
                    f"{new} device(s)" if new else "the plain path")
    restored = ckpt.restore_latest(abstract)
    state = restored.state
    if old != new:
        w, n = merge_windows(np.asarray(fetch(state.env.stats.window)), np.asarray(fetch(state.env.stats.count)),
                             new)
        state = state.replace(env=state.env.replace(stats=state.env.stats.replace(window=w, count=n)))
    return restored._replace(state=place(state, target))


def env_state_in(env: envs.EnvState) -> envs.EnvState:
    """Inside ``shard_map``: the per-device count ``[1]`` becomes a scalar."""
    return env.replace(stats=env.stats.replace(count=env.stats.count[0]))


def env_state_out(env: envs.EnvState) -> envs.EnvState:
    return env.replace(stats=env.stats.replace(count=env.stats.count[None]))


def global_window_mean(stats: envs.EpisodeStats) -> jax.Array:
    """Mean of every device's last-W full-game returns (inside ``shard_map``)."""
    return jnp.nanmean(jax.lax.all_gather(stats.window, AXIS))


def state_specs(state, *, sharded_fields: Sequence[str] = ("env", "carry")):
    """``shard_map`` specs for a training state: ``env``/``carry`` split along envs, the rest replicated."""
    return state.replace(**{f.name: (P(AXIS) if f.name in sharded_fields else P())
                            for f in dataclasses.fields(state)})


# ---------------------------------------------------------------------------
# Maths shared by the sharded updates (inside shard_map)
# ---------------------------------------------------------------------------


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
        xt = jnp.moveaxis(x, 1, 0)  # [Bn, T, ...]
        xt = jax.vmap(lambda row, p: row[p])(xt, perms)
        x = jnp.moveaxis(xt, 0, 1)  # [T, Bn, ...] permuted per env
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


# ---------------------------------------------------------------------------
# Populations
# ---------------------------------------------------------------------------


def parse_sweep(sweep: str | None, num_agents: int, sweepable: Sequence[str],
                ranges: dict[str, str]) -> tuple[str | None, list[float] | None, int]:
    """``"learning_rate=1e-4,2.5e-4"`` -> ``(field, values, num_agents)``.

    With ``--num-agents 1`` (the default) the sweep sets the agent count;
    otherwise the count must equal the number of values. Each value must be in
    the field's range, ``ranges`` being the agent's :func:`runner.check_ranges`
    rules (``ppo.RANGES`` ...), as the flag itself would be.
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
            runner.check_ranges(types.SimpleNamespace(**{name: v}), {name: ranges[name]})
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


def population_step_fn(step_fn: envs.StepFn, num_agents: int) -> Callable:
    """``step(handle, actions [K, B]) -> (handle, Timestep [K, B, ...])`` over the joint pool."""

    def step(h, actions):
        h, ts = step_fn(h, actions.reshape(-1))
        return h, jax.tree.map(lambda x: x.reshape(num_agents, -1, *x.shape[1:]), ts)

    return step


# ---------------------------------------------------------------------------
# The scale-out training driver (PPO and A2C)
# ---------------------------------------------------------------------------


def setup(c) -> tuple[Any, int, bool]:
    """Initialise ``jax.distributed`` if asked, resolve ``--devices`` and the
    population. Returns ``(config, devices_per_process, scaled)``; ``scaled``
    False means: the plain single-device path."""
    initialize_distributed(c.coordinator, c.num_processes, c.process_id)
    if c.num_agents < 1:
        raise ParallelError(f"--num-agents {c.num_agents} is not accepted: it must be >= 1.")
    if c.num_agents > 1 or c.sweep:
        if c.devices not in (None, 1) or jax.process_count() > 1:
            raise ParallelError(f"--num-agents {c.num_agents} runs on one device of one process; "
                                f"drop --devices {c.devices} (or run one population per device).")
        n = 1
    else:
        n = resolve_devices(c.devices, c.num_envs if jax.process_count() == 1 else
                            c.num_envs // max(jax.process_count(), 1))
    c = dataclasses.replace(c, devices=n)
    c = dataclasses.replace(c, sharded=resume_sharded(c))
    scaled = n > 1 or c.sharded or c.num_agents > 1 or bool(c.sweep) or jax.process_count() > 1
    return c, n, scaled


def resume_sharded(c) -> bool:
    """``--sharded`` for a run that resumes one written on the data-parallel path
    (several devices or processes): it continues on that path (its minibatching
    differs from the plain path's) on whatever devices this run has."""
    if not c.resume or c.sharded or c.num_agents > 1 or c.sweep:
        return c.sharded
    windows, processes = stored_layout(runner.load_run_config(c.resume))
    if windows and is_main_process():
        print(f"Resuming a data-parallel run ({windows} device(s) on {processes} process(es)) on "
              f"{c.devices} device(s) x {jax.process_count()} process(es).", flush=True)
    return windows > 0


def train(mod, c, devices_per_process: int) -> runner.RunResult:
    """Train ``mod`` (:mod:`jaxatari.agents.ppo` or ``a2c``) data-parallel or as a
    population; the glue mirrors ``mod.train``."""
    from jaxatari.checkpoint import Checkpointer
    from jaxatari.networks import ActorCritic, initial_carry

    algo = mod.ALGO
    population = c.num_agents > 1 or bool(c.sweep)
    name, values, K = parse_sweep(c.sweep, c.num_agents, mod.SWEEPABLE, mod.RANGES)
    c = dataclasses.replace(c, num_agents=K)
    env_options = envs.parse_env_options(c.env_option)
    stored = runner.load_run_config(c.resume) if c.resume else {}
    sched = runner.make_schedule(c.total_timesteps, c.batch_size, c.chunk_steps,
                                 updates_per_chunk=stored.get("schedule", {}).get("updates_per_chunk"))
    run_dir = runner.run_dir_for(c, algo)
    c = dataclasses.replace(c, run_dir=str(run_dir))
    main = is_main_process()

    if population:
        seeds = agent_seeds(c.seed, K)
        env, spec = make_population_envs(c.env, c.num_envs, seeds, preset=c.preset, options=env_options,
                                         num_threads=c.num_threads)
        net_spec = mod.network_spec(c, spec)
        net = ActorCritic(net_spec)
        obs, _ = env.reset()
        obs = obs.reshape(K, c.num_envs, *obs.shape[1:])
        agents = [dataclasses.replace(c, seed=s, **({name: values[k]} if name else {})) for k, s in enumerate(seeds)]
        states = [mod.init(ck, spec, net_spec, mod.make_optimizer(ck, sched.num_updates), obs[k],
                           jax.random.PRNGKey(ck.seed)) for k, ck in enumerate(agents)]
        state = jax.tree.map(lambda *x: jnp.stack(x), *states)
        group, total_B = env, K * c.num_envs
        handle, step_fn, backend = envs.make_step_fn(env, dataclasses.replace(spec, num_envs=total_B),
                                                     c.env_backend)
        chunk_fn = mod.make_chunk_population(c, net, population_step_fn(step_fn, K), net_spec.recurrent,
                                             sched.updates_per_chunk, sched.num_updates, name, values)
        env_obs = lambda s: np.asarray(s.env.obs).reshape(total_B, *spec.obs_shape)  # noqa: E731
        env_steps = lambda s: int(np.asarray(s.update)[0]) * c.batch_size  # noqa: E731
    else:
        n_dev = devices_per_process * jax.process_count()
        if algo == "ppo" and c.network == "cfc" and (c.num_envs // n_dev) % c.num_minibatches:
            raise ParallelError(f"--num-envs {c.num_envs} on {n_dev} device(s) gives {c.num_envs // n_dev} envs per "
                                f"device, not divisible by --num-minibatches {c.num_minibatches}; a recurrent "
                                "policy's minibatches take whole envs from every device.")
        if algo == "ppo" and c.network != "cfc" and c.num_steps % c.num_minibatches:
            raise ParallelError(f"--num-steps {c.num_steps} is not divisible by --num-minibatches "
                                f"{c.num_minibatches}; with several devices minibatches split along time.")
        senv = make_sharded_envs(c.env, c.num_envs, seed=c.seed, devices_per_process=devices_per_process,
                                 preset=c.preset, options=env_options, num_threads=c.num_threads,
                                 backend=c.env_backend)
        spec, group, backend = senv.spec, senv.group, "xla"
        net_spec = mod.network_spec(c, spec)
        net = ActorCritic(net_spec)
        optimizer = mod.make_optimizer(c, sched.num_updates)
        local_obs = senv.initial_obs
        s0 = mod.init(c, spec, net_spec, optimizer, local_obs[:1], jax.random.PRNGKey(c.seed))
        state = s0.replace(params=replicate(senv.mesh, s0.params), opt_state=replicate(senv.mesh, s0.opt_state),
                           key=replicate(senv.mesh, s0.key), update=replicate(senv.mesh, s0.update),
                           env=sharded_env_state(senv.mesh, local_obs, devices_per_process),
                           carry=shard_local(senv.mesh, initial_carry(net_spec, local_obs.shape[0])))
        handle = senv.handle
        total_B = c.num_envs
        chunk_fn = mod.make_chunk_sharded(c, net, optimizer, senv, state, sched.updates_per_chunk,
                                          sched.num_updates)
        env_obs = lambda s: fetch(s.env.obs)  # noqa: E731
        env_steps = lambda s: int(fetch(s.update)) * c.batch_size  # noqa: E731

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        start_chunk = 0
        meta: dict[str, Any] = {}
        if c.resume:
            restored = restore_latest_any_topology(ckpt, state, stored)
            state, meta = restored.state, dict(restored.meta or {})
            done_updates = env_steps(state) // c.batch_size
            runner.check_unfinished(run_dir, env_steps(state), sched.total_steps)
            if done_updates % sched.updates_per_chunk:
                raise ConfigError(f"Checkpoint at update {done_updates} is not on a chunk boundary.")
            start_chunk = done_updates // sched.updates_per_chunk
            if not runner.restore_env(group, run_dir, done_updates * c.num_steps, env_obs(state), total_B,
                                      logged_processes=stored_layout(stored)[1], process_index=jax.process_index(),
                                      process_count=jax.process_count()):
                state = state.replace(env=runner.restart_episodes(state.env))
            if main:
                print(f"Resumed {run_dir} at env step {done_updates * c.batch_size:,}.", flush=True)
        if main:
            runner.write_config(run_dir, dict(
                runner.config_to_json(c), algo=algo, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
                schedule=dataclasses.asdict(sched), env_backend_used=backend, versions=runner.versions(),
                coordinator=None, num_processes=None, process_id=None,  # a resume may use another topology
                scale_out=dict(devices_per_process=devices_per_process, processes=jax.process_count(),
                               devices=devices_per_process * jax.process_count(), num_agents=K,
                               sweep=dict(name=name, values=values) if name else None),
            ))
            mode = (f"population of {K} agents x {c.num_envs} envs" if population else
                    f"{devices_per_process * jax.process_count()} device(s) x {c.num_envs // (devices_per_process * jax.process_count())} envs"
                    f" on {jax.process_count()} process(es)")
            print(f"{algo.upper()} on {c.env} | {mode} x {c.num_steps} steps | network {net_spec.torso}{'+cfc' if net_spec.recurrent else ''} | "
                  f"env backend {backend} | {jax.default_backend()} | run dir {run_dir}", flush=True)
        eval_fn = None
        if c.eval_every:
            from jaxatari.evaluate import actor_critic_eval_fn

            def scorer(seed):  # the lone run's evaluation: env seeds from seed + 100_000
                return actor_critic_eval_fn(net, net_spec, env_id=c.env, preset=c.preset, options=env_options,
                                            episodes=c.eval_episodes, seed=seed + 100_000)

            if population:
                eval_fn = functools.partial(evaluate_agents, [scorer(s) for s in seeds])
            else:
                one = scorer(c.seed)
                eval_fn = lambda params: one(jax.tree.map(fetch, params))  # noqa: E731
        result = runner.run(
            run_dir=run_dir, state=state, handle=handle, chunk_fn=chunk_fn, schedule=sched,
            start_chunk=start_chunk, num_envs=total_B, env_steps=env_steps, policy_of=lambda s: s.params,
            checkpointer=ckpt, checkpoint_every=c.checkpoint_every, metric_columns=mod.METRIC_COLUMNS,
            eval_fn=eval_fn, eval_every=c.eval_every, meta=meta, tensorboard=c.tensorboard,
            resume_command=runner.resume_command(algo, run_dir), num_agents=K, is_main=main, fetch=fetch,
        )
    if population and main:
        save_agents(run_dir, result.state, c, agents, algo, spec, net_spec, sched, result.global_step)
    return result


def evaluate_agents(scorers: Sequence[Callable[[Any], float]], params) -> np.ndarray:
    """``[K]`` scores: agent ``k``'s slice of the stacked ``params`` scored by ``scorers[k]``
    (the evaluation agent ``k``'s lone run would make)."""
    return np.array([score(jax.tree.map(lambda x: np.asarray(x)[k], params)) for k, score in enumerate(scorers)])


def save_agents(run_dir, state, c, agents, algo, spec, net_spec, sched, step: int) -> None:
    """Per-agent checkpoints: ``RUN_DIR/agents/<k>/`` is a run directory of its
    own (``config.json`` with the agent's seed and hyperparameters, and
    ``checkpoints/latest``), loadable with :func:`jaxatari.checkpoint.load_policy`."""
    from jaxatari.checkpoint import Checkpointer

    for k, ck in enumerate(agents):
        d = run_dir / "agents" / str(k)
        one = jax.tree.map(lambda x: np.asarray(x)[k], state)
        runner.write_config(d, dict(
            runner.config_to_json(dataclasses.replace(ck, num_agents=1, sweep=None, run_dir=str(d))),
            algo=algo, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            schedule=dataclasses.asdict(sched), agent=k, population=str(run_dir), versions=runner.versions(),
        ))
        with Checkpointer(d, keep=1, async_save=False) as ckpt:
            if ckpt.latest_step() != step:
                ckpt.save(step, one, policy=one.params, meta=dict(agent=k, env_steps=step))
