"""Run directories: where a run lives, its ``config.json``, and the action log
that makes a resume exact.

Exact resume. EnvPool cannot snapshot emulator state, but each env is a
deterministic function of its seed and its actions. A resumed run rebuilds the
envs with the same seeds, replays the logged actions up to the checkpoint on the
host and checks that the observations match the checkpointed ones, so that it
continues bit-for-bit as if never interrupted. A resume that cannot (a damaged
log) restarts the envs and records where in ``actions.json``; later resumes
replay that restart too, and are exact again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxatari.errors import AlreadyComplete, ConfigError

log = logging.getLogger("jaxatari")


def python_command() -> str:
    """The interpreter running now, as the start of a printed command: relative if it
    lies under the current directory (``.venv/bin/python``), ``python`` if that name on
    PATH finds this very interpreter, else its absolute path; quoted for a shell."""
    if not sys.executable:
        return "python"
    exe = Path(os.path.abspath(sys.executable))  # not resolved: a venv's python is a link out of the venv
    try:
        rel = exe.relative_to(Path.cwd())
    except ValueError:
        rel = None
    if rel is not None:
        return shlex.quote(str(rel) if len(rel.parts) > 1 else f"./{rel}")
    found = shutil.which("python")
    if found and _same_interpreter(found, str(exe)):
        return "python"
    return shlex.quote(str(exe))


def _same_interpreter(a: str, b: str) -> bool:
    """Whether executables ``a`` and ``b`` start the same Python: the same file, found
    in the same directory (a venv is told by where its ``python`` lies, not what it links to)."""
    try:
        return os.path.samefile(a, b) and os.path.samefile(os.path.dirname(a), os.path.dirname(b))
    except OSError:
        return False


def resume_command(algo: str, run_dir: str | os.PathLike) -> str:
    """The command that continues the run in ``run_dir`` (paths quoted for a shell)."""
    return f"{python_command()} scripts/{algo}.py --resume {shlex.quote(str(run_dir))}"


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
    fail at its first checkpoint. A start stopped before its first checkpoint
    (:func:`unfinished_start`) is no run: :func:`start_over_if_unfinished` resets
    it. With several processes, process 0's view decides for all (the others may
    already see what process 0 has written)."""
    if config.resume:
        return Path(config.resume)
    processes = jax.process_count()
    if config.run_dir:
        run_dir = Path(config.run_dir)
    else:  # with several processes, process 0's time stamp names the directory for all
        run_dir = default_run_dir(config.env, algo, config.seed, stamp=_process0_stamp() if processes > 1 else None)
    held = [n for n in ("config.json", "metrics.csv", "checkpoints", SEGMENTS_FILE) if (run_dir / n).exists()]
    held += sorted(p.name for p in run_dir.glob("actions*.u8"))
    if unfinished_start(run_dir):
        held = []
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


def unfinished_start(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a start that was stopped before its first
    checkpoint finished: ``checkpoints/latest`` (the first thing a run creates)
    without a step in it, finished or moved aside as unreadable."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_dir():
        return False
    return not any(p.name.isdigit() or ".corrupt" in p.name for p in latest.iterdir())


#: What a run writes beside config.json, reset when it starts over (:func:`start_over_if_unfinished`).
_RUN_FILES = ("metrics.csv", "metrics.csv.tmp", "tb", "actions.json", "actions.json.tmp")


def start_over_if_unfinished(run_dir: Path, *, resume: bool) -> bool:
    """Start the run in ``run_dir`` from step 0 in place if it holds a start that
    was stopped before its first checkpoint (:func:`unfinished_start`): its
    partial ``metrics.csv``, TensorBoard events, action log and unfinished
    checkpoints are removed and one line says so. True if it starts over. So a
    preemption loop converges whenever it is killed: ``--resume`` of such a
    directory, and its original command, both start the run. With several
    processes, process 0 decides and resets for all."""
    again = unfinished_start(run_dir)
    main = jax.process_index() == 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        again = bool(multihost_utils.broadcast_one_to_all(np.int32(again)))
    if not again or not main:
        return again
    run_dir = Path(run_dir)
    parts = [run_dir / n for n in _RUN_FILES] + sorted(run_dir.glob("actions*.u8*"))
    parts += [p for kind in ("latest", "best") for p in sorted((run_dir / "checkpoints" / kind).glob("*"))]
    for p in parts:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    what = ("holds no finished checkpoint (its start was stopped before the first)" if resume else
            "holds a start that was stopped before its first checkpoint")
    print(f"{run_dir} {what}; starting the run from step 0 in place, with its partial metrics.csv, TensorBoard "
          "events and action log reset.", flush=True)
    return True


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


#: What a resume's env replay achieved (:func:`restore_env`).
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
