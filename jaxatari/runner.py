"""The one host loop shared by every algorithm.

An agent hands the runner a compiled ``chunk_fn(state, handle) -> (state, handle,
ChunkOutput)`` that advances training by a fixed number of updates entirely on
the device. Between chunks, and only there, the runner:

* fetches the chunk's metrics (one small host transfer), writes one
  ``metrics.csv`` row and TensorBoard point per update and a progress line;
* appends the env actions to ``actions.u8`` (the log that makes resume exact);
* stops with a clear message on non-finite losses or params (nothing saved);
* saves checkpoints every ``checkpoint_every`` env steps, the best policy by
  score, and a final checkpoint; on SIGINT/SIGTERM it saves and exits cleanly.

Exact resume. EnvPool cannot snapshot emulator state, but each env is a
deterministic function of its seed and its actions. A resumed run rebuilds the
envs with the same seeds, replays the logged actions up to the checkpoint on the
host and checks that the observations match the checkpointed ones, so that it
continues bit-for-bit as if never interrupted. A resume that cannot (a damaged
log) restarts the envs and records where in ``actions.json``; later resumes
replay that restart too, and are exact again.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxatari.errors import AlreadyComplete, ConfigError, NonFiniteError

log = logging.getLogger("jaxatari")

#: Columns every metrics.csv starts with; algorithm metrics follow.
BASE_COLUMNS = (
    "global_step", "update", "wall_time", "sps",
    "episode_return", "episode_length", "episodes", "return_mean100", "eval_return",
)
#: Columns whose values depend on wall-clock time (excluded from determinism checks).
WALL_CLOCK_COLUMNS = ("wall_time", "sps")


# ---------------------------------------------------------------------------
# CLI, config files and the run directory
# ---------------------------------------------------------------------------


_RANGES: dict[str, Callable[[Any], bool]] = {
    ">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1,
    "an integer >= 1": lambda v: isinstance(v, int) and v >= 1,
    "an integer >= 0": lambda v: isinstance(v, int) and v >= 0,
}

#: The ranges of the run options the on-policy and DQN configs share (fields a config lacks are skipped).
RUN_OPTION_RANGES = {
    "total_timesteps": "an integer >= 1", "num_envs": "an integer >= 1", "chunk_steps": "an integer >= 1",
    "checkpoint_every": "an integer >= 0", "keep": "an integer >= 1", "eval_every": "an integer >= 0",
    "eval_episodes": "an integer >= 1", "num_threads": "an integer >= 0", "num_agents": "an integer >= 1",
    "cfc_units": "an integer >= 1", "cfc_backbone_units": "an integer >= 1", "cfc_backbone_layers": "an integer >= 0",
}


def _range_rule(rule: str) -> Callable[[Any], bool]:
    """The test of ``rule``: a key of ``_RANGES``, optionally followed by a note in parentheses."""
    for key in sorted(_RANGES, key=len, reverse=True):
        if rule == key or rule.startswith(key + " ("):
            return _RANGES[key]
    raise ValueError(f"Unknown range rule {rule!r}; rules are {', '.join(_RANGES)} (optionally + ' (note)').")


def check_ranges(config, ranges: dict[str, str]) -> None:
    """Raise :class:`ConfigError` naming the flag, its value and the accepted
    range for the first field of ``config`` outside its range. A rule is one of
    ``">= 1"``, ``">= 0"``, ``"> 0"``, ``"in [0, 1]"``, ``"in (0, 1]"``,
    ``"in [0, 1)"``, ``"an integer >= 1"``, ``"an integer >= 0"``, optionally
    followed by a note for the message (``">= 0 (0 = no clipping)"``). Fields
    that are None or absent from ``config`` are skipped."""
    for name, rule in ranges.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _range_rule(rule)(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not accepted: it must be {rule}.")


def config_to_json(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_from_json(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


def _flag_name(token: str) -> str:
    """``--run_dir=x`` -> ``--run-dir``; ``--no-tensorboard`` -> ``--tensorboard`` (one flag, two spellings)."""
    name = token.split("=", 1)[0].replace("_", "-")
    return "--" + name[5:] if name.startswith("--no-") else name


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--") and _flag_name(a) == flag:
            if "=" in a:
                return a.split("=", 1)[1]
            if i + 1 < len(argv):
                return argv[i + 1]
    return None


def _refuse_repeated_flags(argv: Sequence[str]) -> None:
    """tyro keeps the last of a repeated flag and drops the others without a word
    (``--env-option a=1 --env-option b=2`` would lose ``a=1``): refuse instead."""
    seen: set[str] = set()
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name = _flag_name(a)
            if name in seen:
                raise ConfigError(f"{name} is given more than once; give it once (several --env-option values "
                                  "go after one flag: --env-option noop_max=30 frame_skip=4).")
            seen.add(name)


#: Flags taken out of the agents, each with the value that left it off (a stored config may still hold them).
REMOVED_FLAGS = {"overlap_learning": False, "overlap_microbatches": 1, "env_groups": 1}
REMOVED_WHERE = "README.md, Performance: Removed speed features"


def _refuse_removed_flags(argv: Sequence[str]) -> None:
    """A removed flag gets one sentence, not tyro's usage screen."""
    for a in argv:
        name = _flag_name(a)[2:].replace("-", "_") if a.startswith("--") else ""
        if name in REMOVED_FLAGS:
            raise ConfigError(f"{_flag_name(a)} was removed: it showed no gain on the CPU measured "
                              f"({REMOVED_WHERE}); train without it.")


#: Flags whose meaning is gone, each with the sentence that says why (refused where the config lacks the field).
MEANINGLESS_FLAGS = {"sharded": "every run takes the one device-invariant path, on one device or --devices N"}


def _refuse_meaningless_flags(config_cls, argv: Sequence[str]) -> None:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for a in argv:
        name = _flag_name(a)[2:].replace("-", "_") if a.startswith("--") else ""
        if name in MEANINGLESS_FLAGS and name not in fields:
            raise ConfigError(f"{_flag_name(a)} has no meaning any more: {MEANINGLESS_FLAGS[name]}; drop it.")


def _refuse_removed_features(stored: dict[str, Any], run_dir: str) -> None:
    """A run trained with a removed flag on cannot continue exactly without it."""
    on = [f"--{k.replace('_', '-')}" + ("" if isinstance(off, bool) else f" {stored[k]}")
          for k, off in REMOVED_FLAGS.items() if stored.get(k, off) != off]
    if on:
        was, it = ("were", "them") if len(on) > 1 else ("was", "it")
        raise ConfigError(f"{run_dir} was trained with {' and '.join(on)}, which {was} removed ({REMOVED_WHERE}); "
                          f"it cannot continue exactly without {it}.")


def cli(config_cls, *, resumable: Sequence[str], argv: Sequence[str] | None = None, description: str | None = None):
    """Parse ``config_cls`` with tyro; ``--resume RUN_DIR`` starts from the stored config.

    On resume only the fields in ``resumable`` (and ``resume`` itself) may
    differ from the stored config; any other change is refused with a sentence
    naming the flag, since it would change the learning problem. A removed
    flag (:data:`REMOVED_FLAGS`) is refused, and so is the resume of a run
    trained with one.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help"} & set(argv):
        _refuse_removed_flags(argv)
        _refuse_meaningless_flags(config_cls, argv)
        _refuse_repeated_flags(argv)
    resume = _flag_value(argv, "--resume")
    if resume is None:
        return tyro.cli(config_cls, args=argv, description=description)
    given = _flag_value(argv, "--run-dir")
    if given is not None and Path(given).resolve() != Path(resume).resolve():
        raise ConfigError(f"--run-dir cannot be combined with --resume: a run continues in its own directory "
                          f"({resume}); to continue a copy elsewhere, copy the directory and resume the copy.")
    stored = load_run_config(resume)
    if "population" in stored:
        raise ConfigError(f"{resume} is agent {stored.get('agent', '?')} of the population {stored['population']}: a "
                          f"snapshot to evaluate or load, not a run; resume the population, --resume "
                          f"{stored['population']}.")
    _refuse_removed_features(stored, resume)
    algo = getattr(sys.modules.get(config_cls.__module__), "ALGO", None)
    if algo and stored.get("algo", algo) != algo:
        raise ConfigError(f"{resume} is a {stored['algo']} run, not {algo}; resume it with "
                          f"python scripts/{stored['algo']}.py --resume {resume}")
    default = config_from_json(config_cls, stored)
    default = dataclasses.replace(default, resume=resume)
    config = tyro.cli(config_cls, args=argv, default=default, description=description)
    for f in dataclasses.fields(config_cls):
        if f.name in ("resume", *resumable):
            continue
        new, old = getattr(config, f.name), getattr(default, f.name)
        if new != old and f.name == "env_option" and _same_env_options(new, old):
            config = dataclasses.replace(config, env_option=old)  # the same options in another order
            continue
        if new != old:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(
                f"{flag} {new!r} differs from the run being resumed ({old!r}); it would change the "
                f"learning problem. On resume you may change: "
                f"{', '.join('--' + r.replace('_', '-') for r in resumable if r != 'run_dir')}."
            )
    return config


def _same_env_options(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two ``--env-option`` lists set the same values (in any order, spaces around ``=`` aside)."""
    from jaxatari import envs

    try:
        return envs.parse_env_options(list(a)) == envs.parse_env_options(list(b))
    except envs.EnvError:
        return False


def resume_command(algo: str, run_dir: str | os.PathLike) -> str:
    """The command that continues the run in ``run_dir`` (the path quoted for a shell)."""
    return f"python scripts/{algo}.py --resume {shlex.quote(str(run_dir))}"


def load_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {run_dir!s} is not a jaxatari run directory.")
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} holds a JSON {type(stored).__name__}, not a jaxatari run config (an object).")
    return stored


def run_dir_for(config, algo: str) -> Path:
    """The run directory of ``config``: ``--resume``'s, else ``--run-dir``, else a
    new ``runs/<env>__<algo>__<seed>__<time>``. A fresh run refuses a directory
    that already holds a run: it would mix two runs' metrics and action logs and
    fail at its first checkpoint. With several processes, process 0's view
    decides for all (the others may already see what process 0 has written)."""
    if config.resume:
        return Path(config.resume)
    processes = jax.process_count()
    if config.run_dir:
        run_dir = Path(config.run_dir)
    else:  # with several processes, process 0's time stamp names the directory for all
        run_dir = default_run_dir(config.env, algo, config.seed, stamp=_process0_stamp() if processes > 1 else None)
    held = [n for n in ("config.json", "metrics.csv", "checkpoints", SEGMENTS_FILE) if (run_dir / n).exists()]
    held += sorted(p.name for p in run_dir.glob("actions*.u8"))
    if processes > 1:  # process 0's view, so that every process stops (or none does)
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(bool(held)))):
            held = []
        elif not held:
            held = ["files written by process 0"]
    if held:
        raise ConfigError(f"--run-dir {run_dir} already holds a run ({', '.join(held)}); continue it with "
                          f"--resume {run_dir}, delete it, or pass another --run-dir.")
    return run_dir


def default_chunk_steps(atari: bool) -> int:
    """``--chunk-steps`` when not given: 50k env steps, 10k for Atari on a CPU,
    where the Nature CNN trains at ~150 steps/s (a 50k chunk would show the first
    progress line, and act on Ctrl-C or a preemption notice, after ~5 minutes)."""
    return 10_000 if atari and cpu_only() else 50_000


def cpu_only() -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend (a
    multi-process run must call ``jax.distributed.initialize`` first): an explicit
    ``JAX_PLATFORMS`` / ``jax_platforms`` names the platform; otherwise, whether
    no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return False
    try:
        import jax_plugins  # namespace package of PJRT plugins
    except ImportError:
        return True
    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def check_unfinished(run_dir: Path, done: int, total: int, *, unit: str = "env step",
                     flag: str = "--total-timesteps") -> None:
    """Raise :class:`AlreadyComplete` if a resumed run's checkpoint (at ``done``)
    already reaches ``total``: before any env replay, config rewrite or training."""
    if done >= total:
        raise AlreadyComplete(f"{run_dir} is already complete: its latest checkpoint is at {unit} {done:,} and "
                              f"{flag} asks for {total:,}. Pass a larger {flag} to train further.")


def default_run_dir(env_id: str, algo: str, seed: int, stamp: str | None = None) -> Path:
    """``runs/<env>__<algo>__<seed>__<stamp>``; ``stamp`` defaults to the local time, ``YYYYmmdd-HHMMSS``."""
    stamp = stamp or _dt.datetime.now().strftime(_STAMP)
    return Path("runs") / f"{env_id}__{algo}__{seed}__{stamp}"


_STAMP = "%Y%m%d-%H%M%S"


def _process0_stamp() -> str:
    """Process 0's local time as a run-directory stamp, sent to every process
    (the processes start at different seconds, and would each name their own)."""
    from jax.experimental import multihost_utils

    mine = np.frombuffer(_dt.datetime.now().strftime(_STAMP).encode("ascii"), np.uint8).astype(np.int32)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine)).astype(np.uint8)).decode("ascii")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "optax", "envpool", "orbax-checkpoint", "jaxatari"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_config(run_dir: Path, payload: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, run_dir / "config.json")


# ---------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How ``total_timesteps`` splits into compiled chunks of equal length."""

    steps_per_update: int
    updates_per_chunk: int
    num_chunks: int
    requested: int = 0  # --total-timesteps as given (0: unknown)

    @property
    def num_updates(self) -> int:
        return self.updates_per_chunk * self.num_chunks

    @property
    def steps_per_chunk(self) -> int:
        return self.steps_per_update * self.updates_per_chunk

    @property
    def total_steps(self) -> int:
        return self.steps_per_chunk * self.num_chunks

    def rounding_note(self) -> str:
        """A sentence saying how --total-timesteps was rounded up to whole chunks ("" if it was not)."""
        if not self.requested or self.total_steps == self.requested:
            return ""
        return (f"--total-timesteps {self.requested:,} is rounded up to {self.total_steps:,}: {self.num_chunks} "
                f"chunk(s) of {self.updates_per_chunk} x {self.steps_per_update:,} env steps.")


def make_schedule(
    total_timesteps: int, steps_per_update: int, chunk_steps: int, *, updates_per_chunk: int | None = None
) -> Schedule:
    """Equal chunks covering at least ``total_timesteps`` (rounded up to whole updates).

    ``updates_per_chunk`` pins the chunk length (a resumed run keeps its own).
    """
    if total_timesteps < 1:
        raise ConfigError(f"--total-timesteps {total_timesteps} is not accepted: it must be >= 1.")
    if chunk_steps < 1:
        raise ConfigError(f"--chunk-steps {chunk_steps} is not accepted: it must be >= 1.")
    num_updates = max(1, math.ceil(total_timesteps / steps_per_update))
    if updates_per_chunk:
        return Schedule(steps_per_update, updates_per_chunk, math.ceil(num_updates / updates_per_chunk),
                        total_timesteps)
    target = max(1, min(num_updates, chunk_steps // steps_per_update or 1))
    num_chunks = math.ceil(num_updates / target)
    per_chunk = math.ceil(num_updates / num_chunks)
    return Schedule(steps_per_update, per_chunk, num_chunks, total_timesteps)


def abstract(tree):
    """``jax.ShapeDtypeStruct`` leaves on the default device: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


# ---------------------------------------------------------------------------
# Exact resume: the env action log
# ---------------------------------------------------------------------------


def action_log_name(process_index: int = 0, process_count: int = 1) -> str:
    """The action log of one process: ``actions.u8`` for a one-process run,
    ``actions.p<I>of<P>.u8`` (process ``I``'s columns of the global env batch) otherwise."""
    return "actions.u8" if process_count == 1 else f"actions.p{process_index}of{process_count}.u8"


class ActionLog:
    """Append-only ``RUN_DIR/<name>``: one row of ``num_envs`` uint8 actions per env step."""

    def __init__(self, run_dir: Path, num_envs: int, name: str = "actions.u8"):
        self.path = Path(run_dir) / name
        self.num_envs = num_envs

    def rows(self) -> int:
        return self.path.stat().st_size // self.num_envs if self.path.exists() else 0

    def truncate(self, rows: int) -> None:
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(rows * self.num_envs)

    def append(self, actions: np.ndarray) -> None:
        a = np.asarray(actions).reshape(-1, self.num_envs)
        with open(self.path, "ab") as f:
            f.write(a.astype(np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def read(self, rows: int) -> np.ndarray:
        if rows == 0:  # the file may not exist
            return np.zeros((0, self.num_envs), np.uint8)
        data = np.fromfile(self.path, dtype=np.uint8, count=rows * self.num_envs)
        return data.reshape(rows, self.num_envs)

    def rewrite(self, actions: np.ndarray) -> None:
        """Replace the whole log with ``actions [S, num_envs]`` (atomically)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(np.asarray(actions, np.uint8).reshape(-1, self.num_envs).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


#: The action log's restarts (see :func:`restore_env`); absent: the log runs from step 0.
SEGMENTS_FILE = "actions.json"


class Segment(NamedTuple):
    """One stretch of the action log between restarts.

    ``row``: its first row in the log; ``step``: the env step (per env) of that
    row; ``reset``: True if it began with ``env.reset()`` after the rows before
    it were replayed (a resume whose replay did not match its checkpoint),
    False if it began with freshly built envs (the log's first segment).
    ``digests``: for a reset, one hex digest per global env of its last
    observation before the reset, so that a resume from the restart's own
    checkpoint can check that the replay still ends where it did.
    """

    row: int
    step: int
    reset: bool
    digests: tuple[str, ...] | None = None


_FROM_START = [Segment(0, 0, False)]


def read_segments(run_dir: Path) -> list[Segment] | None:
    """The action log's segments (one from step 0 if it never restarted), or
    None (with a warning) if :data:`SEGMENTS_FILE` is unreadable."""
    path = Path(run_dir) / SEGMENTS_FILE
    if not path.exists():
        return list(_FROM_START)
    try:
        segs = [Segment(int(s["row"]), int(s["step"]), bool(s["reset"]),
                        None if s.get("digests") is None else tuple(str(d) for d in s["digests"]))
                for s in json.loads(path.read_text())]
        ordered = all(b.row >= a.row and b.step >= a.step for a, b in zip(segs, segs[1:]))
        if not segs or segs[0].row != 0 or segs[0].reset or not ordered:
            raise ValueError("not a list of segments in log order")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s is unreadable (%s); the action log cannot be replayed.", path, e)
        return None
    return segs


def write_segments(run_dir: Path, segments: Sequence[Segment]) -> None:
    """Record ``segments`` (atomically); a log that never restarted has no file."""
    path = Path(run_dir) / SEGMENTS_FILE
    if list(segments) == _FROM_START:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([s._asdict() for s in segments]))
    os.replace(tmp, path)


def obs_digests(obs: np.ndarray) -> tuple[str, ...]:
    """One short hex digest per env (row of ``obs [B, ...]``)."""
    return tuple(hashlib.blake2b(np.ascontiguousarray(o).tobytes(), digest_size=8).hexdigest()
                 for o in np.asarray(obs))


def read_global_actions(run_dir: Path, rows: int, num_envs: int, processes: int = 1) -> np.ndarray | None:
    """The first ``rows`` rows ``[rows, num_envs]`` of the global action log that
    ``processes`` processes wrote (process ``p`` owns the ``p``-th contiguous block
    of ``num_envs / processes`` columns), or None if a log is missing or short."""
    per = num_envs // processes
    parts = []
    for p in range(processes):
        alog = ActionLog(run_dir, per, action_log_name(p, processes))
        if alog.rows() < rows:
            log.warning("Resume is not exact: %s holds %d of the %d env steps to replay; continuing with "
                        "freshly reset envs.", alog.path, alog.rows(), rows)
            return None
        parts.append(alog.read(rows))
    return np.concatenate(parts, axis=1)


def replay_actions(env, actions: np.ndarray, resets: Sequence[int] = ()) -> np.ndarray | None:
    """Step ``env`` (already reset) through ``actions [S, B]``, calling
    ``env.reset()`` before each row index in ``resets``; return the last step's obs
    (None if no step was taken)."""
    resets, obs = set(resets), None
    for i, a in enumerate(actions):
        if i in resets:
            env.reset()
        obs, *_ = env.step(a.astype(np.int32))
    return obs


_EXACT, _AS_BEFORE, _LOST = 0, 1, 2


def restore_env(env, run_dir: Path, env_steps_per_env: int, expected_obs: np.ndarray, num_envs: int, *,
                logged_processes: int = 1, process_index: int = 0, process_count: int = 1) -> bool:
    """Replay the logged actions so the envs match the checkpoint. True if exact.

    ``env`` holds this process's envs (columns ``process_index`` of
    ``process_count`` equal blocks of the ``num_envs`` global envs), freshly
    built and reset, and ``expected_obs`` their checkpointed observations. The
    log may have been written by another number of processes
    (``logged_processes``): it is read whole and rewritten in this run's
    layout, so a run resumes on any topology.

    False means the envs do not continue the checkpoint's episodes and the
    caller restarts them (:func:`restart_episodes`). Either the log cannot
    bring the envs to the checkpoint (missing, short, or the replayed
    observations differ): a warning, and the restart is recorded in
    :data:`SEGMENTS_FILE`, so that a later resume replays it too and is exact
    again. Or the checkpoint is the very one an earlier such resume started
    from: the envs are rebuilt as that resume left them (checked against the
    digests recorded then), and the run continues exactly as it did after it.
    A resume from a checkpoint before a restart replays the log as it was
    then, and drops the restart.
    """
    gather = None
    if process_count > 1:  # every process continues the same way (and runs the same programs)
        from jax.experimental import multihost_utils

        gather = multihost_utils.process_allgather
    per = num_envs // process_count
    mine = slice(process_index * per, (process_index + 1) * per)
    alog = ActionLog(run_dir, per, action_log_name(process_index, process_count))
    segments = read_segments(run_dir) or []
    behind = [i for i, s in enumerate(segments) if s.step <= env_steps_per_env]
    actions, outcome, at_restart = None, _LOST, False
    if behind:
        j = behind[-1]
        segments, seg = segments[:j + 1], segments[j]
        rows = seg.row + env_steps_per_env - seg.step
        at_restart = env_steps_per_env == seg.step and (j > 0 or seg.step > 0)
        actions = read_global_actions(run_dir, rows, num_envs, logged_processes)
    elif segments:
        log.warning("Resume is not exact: the action log starts at env step %s, after the checkpoint's %s; "
                    "continuing with freshly reset envs.", f"{segments[0].step * num_envs:,}",
                    f"{env_steps_per_env * num_envs:,}")
    if gather is not None and behind and not np.all(gather(np.int32(actions is not None))):
        actions = None  # another process sees a short log: none replays
    if actions is not None:
        if rows and process_index == 0:
            print(f"Replaying {rows * num_envs:,} env steps to restore the emulators ...", flush=True)
        obs = replay_actions(env, actions[:, mine], [s.row for s in segments[1:] if s.reset and s.row < rows])
        if at_restart and seg.reset and seg.digests and obs_digests(obs) != seg.digests[mine]:
            log.warning("The replayed action log no longer ends where the restart at env step %s began (changed "
                        "since, or another EnvPool); resume is not exact: continuing with freshly reset envs.",
                        f"{env_steps_per_env * num_envs:,}")
        elif at_restart:
            outcome = _AS_BEFORE  # the checkpoint an earlier resume restarted the envs from
        elif obs is None or np.array_equal(np.asarray(obs), np.asarray(expected_obs)):
            outcome = _EXACT
        else:
            log.warning("Replayed observations differ from the checkpoint; resume is not exact: continuing with "
                        "freshly reset envs.")
    if gather is not None:
        outcome = int(np.max(gather(np.int32(outcome))))
    if outcome == _LOST and actions is not None and rows:  # the envs were stepped: reset them, and log where
        digests = obs_digests(obs)
        if gather is not None:  # every process's envs, as bytes
            raw = np.frombuffer(bytes.fromhex("".join(digests)), np.uint8).reshape(per, 8)
            digests = tuple(bytes(d).hex() for d in np.asarray(gather(raw)).reshape(num_envs, 8))
        env.reset()
        segments = [s for s in segments if (s.row, s.step) != (rows, env_steps_per_env)]  # replaced, if redone
        segments.append(Segment(rows, env_steps_per_env, True, digests))
    elif outcome == _LOST:  # the envs were not stepped: the log starts afresh with them
        actions, segments = np.zeros((0, num_envs), np.uint8), [Segment(0, env_steps_per_env, False)]
    elif outcome == _AS_BEFORE and seg.reset:
        env.reset()
    if logged_processes == process_count and outcome != _LOST:
        alog.truncate(rows)
    else:
        alog.rewrite(actions[:, mine])
    if process_index == 0:  # after the allgather: every process has read the segments
        write_segments(run_dir, segments)
    if outcome == _AS_BEFORE and process_index == 0:
        print(f"Env step {env_steps_per_env * num_envs:,} is where an earlier resume restarted the envs (it was "
              "not exact); they are rebuilt as it left them, and the run continues as it did.", flush=True)
    return outcome == _EXACT


def restart_episodes(env_state):
    """The per-env state after a resume that is not exact (the envs were freshly
    reset, or replayed into other states than the checkpoint's): every env
    starts a new episode, so the checkpoint's unfinished episodes do not leak
    into the returns logged after it. Running returns and lengths are zeroed,
    no env is marked as about to reset, and ``first`` is set (recurrent state
    resets at the next step); the window of finished returns is kept. The
    first action is taken on the checkpoint's observation. Keeps every leaf's
    sharding, so it applies to data-parallel and population states too."""

    def restart(e):
        st = e.stats
        return e.replace(done=jnp.zeros_like(e.done), first=jnp.ones_like(e.first),
                         stats=st.replace(returns=jnp.zeros_like(st.returns), lengths=jnp.zeros_like(st.lengths)))

    return jax.jit(restart, out_shardings=jax.tree.map(lambda x: x.sharding, env_state))(env_state)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class ChunkOutput(NamedTuple):
    """What a compiled chunk returns to the host.

    ``metrics``: dict of ``[U]`` arrays, one entry per update, including
    ``env_steps`` (global env steps after the update), ``episode_return_sum``,
    ``episode_length_sum``, ``episode_count``, ``return_mean100`` and
    ``finite`` (bool: loss and params finite); any other keys become columns.
    ``actions``: ``[S, B]`` env actions taken in the chunk (for exact resume).
    """

    metrics: dict[str, jax.Array]
    actions: jax.Array


_SPECIAL = ("env_steps", "episode_return_sum", "episode_length_sum", "episode_count", "return_mean100", "finite")


class MetricsWriter:
    """``metrics.csv`` (appending on resume) plus TensorBoard, same rows."""

    def __init__(self, run_dir: Path, columns: Sequence[str], *, tensorboard: bool = True):
        self.path = run_dir / "metrics.csv"
        self.columns = list(columns)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path) as f:
                header = f.readline().strip().split(",")
            if header != self.columns:
                self.columns = header
        self._f = open(self.path, "a", newline="")
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(self.columns)
        self.tb = None
        self._tb_dir = run_dir / "tb"
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self._tb_dir))

    def truncate_after(self, global_step: int) -> None:
        """Drop rows past ``global_step`` (written after the checkpoint being resumed),
        and a last row cut short by a crash (no newline, or missing fields); the file
        is replaced atomically. TensorBoard is told to discard its events past
        ``global_step`` too (``purge_step``)."""
        self._f.close()
        text = self.path.read_text()
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]  # the crash cut the last row mid-write
        rows = list(csv.reader(lines))
        width = len(rows[0])
        keep = [rows[0]] + [r for r in rows[1:] if len(r) == width and int(float(r[0])) <= global_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", newline="")
        self._w = csv.writer(self._f)
        if self.tb is not None:
            from tensorboardX import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(str(self._tb_dir), purge_step=global_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])
        if self.tb is not None:
            step = int(row["global_step"])
            for k, v in row.items():
                if k not in ("global_step", "update") and v is not None and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"charts/{k}" if k in BASE_COLUMNS else f"losses/{k}", v, step)

    def flush(self) -> None:
        self._f.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


class Signals:
    """SIGINT/SIGTERM set a flag checked between ``unit``s (chunks, batches); a
    second SIGINT aborts, except while a checkpoint is being written
    (:func:`jaxatari.checkpoint.writing`): an abort there would leave orbax's
    writer threads waiting for ever, so the write finishes first. Use as a
    context manager; handlers are restored on exit."""

    def __init__(self, unit: str = "chunk"):
        self.unit = unit
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            from jaxatari.checkpoint import writing

            if writing():
                print(f"\n{signal.Signals(signum).name} ignored: a checkpoint is being written, and aborting it "
                      "would hang the process; the run stops once it is written.", file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after the current {self.unit} "
              "(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _wait_keeping_the_error(checkpointer, *, replace: bool) -> None:
    """``checkpointer.wait()``; a failed background save raises, unless another
    error is already on its way out (``replace`` False): then it is logged, and
    the first error is the one reported."""
    from jaxatari.checkpoint import CheckpointError

    try:
        checkpointer.wait()
    except CheckpointError as e:
        if replace:
            raise
        log.error("%s", e)


@dataclasses.dataclass
class RunResult:
    state: Any
    status: str  # "done" | "interrupted" | "target_reached"
    global_step: int
    return_mean100: float
    compile_s: float
    sps: float
    signal: int | None = None  # the SIGINT/SIGTERM that interrupted the run


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def run(
    *,
    run_dir: Path,
    state,
    handle,
    chunk_fn: Callable,
    schedule: Schedule,
    start_chunk: int,
    num_envs: int,
    env_steps: Callable[[Any], int],
    policy_of: Callable[[Any], Any],
    checkpointer=None,
    checkpoint_every: int = 0,
    eval_fn: Callable[[Any], float] | None = None,
    eval_every: int = 0,
    target_return: float | None = None,
    metric_columns: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    resume_command: str = "",
    tensorboard: bool = True,
    num_agents: int = 1,
    is_main: bool = True,
    log_actions: bool = True,
    fetch: Callable[[Any], Any] | None = None,
) -> RunResult:
    """Drive ``chunk_fn`` for chunks ``start_chunk .. schedule.num_chunks - 1``.

    ``chunk_fn`` must be ``jax.jit``-ed; it is compiled once ahead of time here
    (compile time reported separately from SPS). ``env_steps(state)`` reads the
    global env-step counter; ``policy_of(state)`` the inference params to save
    beside the full state.

    Scale-out (all optional, defaults are the single-agent, single-process loop):
    ``num_agents`` > 1 means the metrics are ``[U, K]`` (``update`` and
    ``env_steps`` ``[U]``) and ``metrics.csv`` gets an ``agent`` column, one
    row per update and agent; progress and the best score use the agents' mean.
    ``is_main`` False (processes other than 0) writes no metrics and prints no
    progress; every process logs the actions of its own envs
    (:func:`action_log_name`); ``log_actions`` False skips the action log;
    ``fetch`` brings a device array to the host (default ``jax.device_get``).
    ``eval_fn`` returns a float, or ``[num_agents]`` floats for a population
    (each agent's row gets its own ``eval_return``; "best" uses their mean); with
    several processes only process 0 evaluates and the score is broadcast.
    """
    fetch = fetch or jax.device_get
    population = num_agents > 1

    run_dir = Path(run_dir)
    columns = list(BASE_COLUMNS) + [c for c in metric_columns if c not in BASE_COLUMNS]
    if population:
        columns.insert(columns.index("update") + 1, "agent")
    writer = MetricsWriter(run_dir, columns, tensorboard=tensorboard and not population) if is_main else _NoWriter()
    processes = jax.process_count()
    alog = ActionLog(run_dir, num_envs // processes, action_log_name(jax.process_index(), processes))
    meta = dict(meta or {})

    step0 = int(env_steps(state))
    if start_chunk > 0:
        writer.truncate_after(step0)

    t0 = time.perf_counter()
    compiled = chunk_fn.lower(state, handle).compile()
    compile_s = time.perf_counter() - t0
    if is_main:
        print(f"Compiled one chunk ({schedule.steps_per_chunk:,} env steps, {schedule.updates_per_chunk} "
              f"logged rows) in {compile_s:.1f}s.", flush=True)
        if schedule.rounding_note():
            print(schedule.rounding_note(), flush=True)

    wall0 = time.perf_counter()
    prev_wall = float(meta.get("wall_time", 0.0))
    last_ckpt = step0
    last_eval = step0
    mean100 = math.nan
    status, received = "done", None
    sps = 0.0
    global_step = step0

    def save(score: float | None = None):
        if checkpointer is None:
            return None
        m = dict(meta, env_steps=global_step, wall_time=prev_wall + time.perf_counter() - wall0,
                 return_mean100=None if math.isnan(mean100) else mean100)
        path = checkpointer.save(global_step, state, policy=policy_of(state), meta=m)
        if score is not None and not math.isnan(score):
            checkpointer.save_best(global_step, state, score, policy=policy_of(state), meta=m)
        return path

    progress = _Progress(schedule.total_steps, step0) if is_main else _NoProgress()
    completed = False
    try:
        with Signals() as sig:
            for chunk in range(start_chunk, schedule.num_chunks):
                tc = time.perf_counter()
                new_state, handle, out = compiled(state, handle)
                if fetch is jax.device_get and log_actions:
                    metrics, actions = jax.device_get((out.metrics, out.actions))
                else:
                    metrics = jax.tree.map(fetch, out.metrics)
                    actions = fetch(out.actions) if log_actions else None
                dt = time.perf_counter() - tc
                sps = schedule.steps_per_chunk / max(dt, 1e-9)

                finite = np.asarray(metrics["finite"])
                if population:
                    finite = finite.reshape(len(finite), -1).all(axis=1)
                if not finite.all():
                    bad = int(np.asarray(metrics.get("update", np.arange(len(finite))))[np.argmin(finite)])
                    raise NonFiniteError(
                        f"Non-finite loss or parameters at update {bad} (env step "
                        f"~{int(metrics['env_steps'][np.argmin(finite)]):,}); training stopped. The last "
                        f"good checkpoint in {run_dir / 'checkpoints'} is still the latest; lower the "
                        "learning rate or check the inputs."
                    )
                state = new_state
                if log_actions:
                    alog.append(actions)
                global_step = int(metrics["env_steps"][-1])
                if population:
                    last = np.asarray(metrics["return_mean100"][-1], np.float64)
                    mean100 = float(np.nanmean(last)) if np.isfinite(last).any() else math.nan
                else:
                    mean100 = float(metrics["return_mean100"][-1])
                score, eval_score, eval_scores = mean100, None, None
                if eval_fn is not None and eval_every:
                    if global_step - last_eval >= eval_every or chunk == schedule.num_chunks - 1:
                        last_eval = global_step
                        eval_scores = _evaluate(eval_fn, policy_of(state), is_main, num_agents)
                        eval_score = float(np.nanmean(eval_scores))
                        meta["eval_return"] = eval_score
                        progress.note(f"eval return {eval_score:.1f} at step {global_step:,}" +
                                      (f" (agents: {', '.join(f'{x:.1f}' for x in eval_scores)})"
                                       if population else ""))
                    score = float(meta.get("eval_return", math.nan))
                wall = prev_wall + time.perf_counter() - wall0
                n = len(finite)
                if population:
                    _write_population_rows(writer, columns, metrics, n, num_agents, wall, sps,
                                           eval_scores if eval_score is not None else None)
                for i in range(n if not population else 0):
                    count = int(metrics["episode_count"][i])
                    m100 = float(metrics["return_mean100"][i])
                    row = {
                        "global_step": int(metrics["env_steps"][i]),
                        "update": int(metrics["update"][i]) if "update" in metrics else None,
                        "wall_time": round(wall, 3),
                        "sps": round(sps, 1),
                        "episode_return": float(metrics["episode_return_sum"][i]) / count if count else None,
                        "episode_length": float(metrics["episode_length_sum"][i]) / count if count else None,
                        "episodes": count,
                        "return_mean100": None if math.isnan(m100) else m100,
                        "eval_return": eval_score if i == n - 1 else None,
                    }
                    for k in columns:
                        if k not in row and k in metrics:
                            v = float(metrics[k][i])
                            row[k] = None if math.isnan(v) else v  # e.g. DQN before learning starts
                    writer.write(row)
                writer.flush()
                progress.update(global_step, sps, mean100)

                reached = target_return is not None and not math.isnan(mean100) and mean100 >= target_return
                last = chunk == schedule.num_chunks - 1
                if sig.received is not None:
                    status, received = "interrupted", sig.received
                if reached:
                    status = "target_reached"
                due = checkpoint_every and global_step - last_ckpt >= checkpoint_every
                if due or last or status != "done":
                    save(score=score)
                    last_ckpt = global_step
                if status != "done":
                    break
            if checkpointer is not None:
                checkpointer.wait()  # under the handlers: a SIGTERM now cannot kill the final save
        completed = True
    except KeyboardInterrupt:
        status = "aborted"
        raise
    finally:
        try:
            progress.close()
            writer.close()
        finally:
            if checkpointer is not None:
                _wait_keeping_the_error(checkpointer, replace=completed)

    if status == "interrupted" and is_main:
        print(f"\nInterrupted at env step {global_step:,}. Checkpoint saved in {run_dir / 'checkpoints'}.\n"
              f"Resume with:  {resume_command}", flush=True)
    elif status in ("done", "target_reached") and is_main:
        agent = Path(run_dir) / "agents" / "0" if num_agents > 1 else Path(run_dir)  # a population: one agent
        watch = (f"python scripts/evaluate.py --run-dir {shlex.quote(str(agent))} --video play.mp4"
                 + (f" (agent 0 of {num_agents}: agents/<k> for the others)" if num_agents > 1 else ""))
        if status == "target_reached":
            print(f"\nTarget return {target_return} reached (mean of last 100 episodes {mean100:.1f}) at step "
                  f"{global_step:,}; saved as best. Run in {run_dir}. Watch the agent: {watch}", flush=True)
        else:
            print(f"\nDone: {global_step:,} env steps in {_duration(prev_wall + time.perf_counter() - wall0)}; "
                  f"run in {run_dir}. Watch the agent: {watch}", flush=True)
    return RunResult(state, status, global_step, mean100, compile_s, sps, received)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _evaluate(eval_fn, policy, is_main: bool, num_agents: int) -> np.ndarray:
    """``eval_fn(policy)`` as ``[num_agents]`` floats (a population's ``eval_fn``
    returns one score per agent). With several processes, process 0 evaluates and
    broadcasts its scores, so that every process takes the same checkpoint decisions."""
    if jax.process_count() == 1:
        return np.asarray(eval_fn(policy), np.float64).reshape(num_agents)
    from jax.experimental import multihost_utils

    scores = np.asarray(eval_fn(policy) if is_main else np.zeros(num_agents), np.float32).reshape(num_agents)
    return np.asarray(multihost_utils.broadcast_one_to_all(scores), np.float64)


def _write_population_rows(writer, columns, metrics, n, num_agents, wall, sps, eval_scores):
    """One ``metrics.csv`` row per update and agent (the ``agent`` column);
    ``eval_scores [K]`` (or None) go on each agent's last row of the chunk."""
    for i in range(n):
        for k in range(num_agents):
            count = int(metrics["episode_count"][i][k])
            m100 = float(metrics["return_mean100"][i][k])
            row = {
                "global_step": int(metrics["env_steps"][i]),
                "update": int(metrics["update"][i]),
                "agent": k,
                "wall_time": round(wall, 3),
                "sps": round(sps, 1),
                "episode_return": float(metrics["episode_return_sum"][i][k]) / count if count else None,
                "episode_length": float(metrics["episode_length_sum"][i][k]) / count if count else None,
                "episodes": count,
                "return_mean100": None if math.isnan(m100) else m100,
                "eval_return": float(eval_scores[k]) if eval_scores is not None and i == n - 1 else None,
            }
            for c in columns:
                if c not in row and c in metrics:
                    v = np.asarray(metrics[c][i])
                    row[c] = float(v.reshape(-1)[k] if v.ndim else v)
            writer.write(row)


class _NoWriter:
    """The metrics writer of processes other than 0: writes nothing."""

    def truncate_after(self, global_step: int) -> None:
        pass

    def write(self, row) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NoProgress:
    def update(self, *a) -> None:
        pass

    def note(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    """A live progress bar on a terminal; one plain line per chunk otherwise."""

    def __init__(self, total: int, start: int):
        self.total = total
        self.tty = sys.stdout.isatty()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.completed:,}/{task.total:,}"), BarColumn(),
                TextColumn("{task.fields[sps]} SPS  return(100) {task.fields[ret]}"), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, sps="-", ret="-")
            self.bar.start()

    def update(self, step: int, sps: float, ret: float):
        if self.bar is not None:
            self.bar.update(self.task, completed=step, sps=f"{sps:,.0f}", ret=_fmt(ret))
        else:
            print(f"step {step:>12,}/{self.total:,}  SPS {sps:>9,.0f}  return(100) {_fmt(ret)}", flush=True)

    def note(self, msg: str):
        (self.bar.console.print if self.bar is not None else print)(msg)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
