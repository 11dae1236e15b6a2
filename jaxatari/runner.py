"""The one host loop shared by every algorithm.

The driver hands the runner a compiled ``chunk_fn(state, handle) -> (state, handle,
ChunkOutput)`` that advances training by a fixed number of updates entirely on
the device. Between chunks, and only there, the runner:

* fetches the chunk's metrics (one small host transfer), writes one
  ``metrics.csv`` row and TensorBoard point per update and a progress line;
* appends the env actions to ``actions.u8`` (:class:`jaxatari.rundir.ActionLog`,
  the log that makes resume exact);
* stops with a clear message on non-finite losses or params (nothing saved);
* saves checkpoints every ``checkpoint_every`` env steps or ``checkpoint_minutes``
  minutes, whichever comes first, the best policy by score, and a final
  checkpoint; on SIGINT/SIGTERM it saves and exits cleanly, having said when the
  current chunk ends.
"""

from __future__ import annotations

import csv
import dataclasses
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
import numpy as np
from rich.progress import ProgressColumn
from rich.text import Text

from jaxatari.checkpoint import CheckpointError, writing
from jaxatari.errors import ConfigError, NonFiniteError
from jaxatari.rundir import ActionLog, action_log_name, python_command


log = logging.getLogger("jaxatari")

#: The clock of chunk timings and time-based checkpoints (a test replaces it).
_clock = time.monotonic

#: Columns every metrics.csv starts with; algorithm metrics follow.
BASE_COLUMNS = (
    "global_step", "update", "wall_time", "sps",
    "episode_return", "episode_length", "episodes", "return_mean100", "eval_return",
)


#: Columns whose values depend on wall-clock time (excluded from determinism checks).
WALL_CLOCK_COLUMNS = ("wall_time", "sps")

#: A run projected to train longer than this (seconds) on the CPU is told what to do instead ...
LONG_ON_CPU = 3600
#: ... and how many env steps fit this long (seconds) at the speed measured.
SHORT_RUN = 1800


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
    context manager; handlers are restored on exit. A loop that marks its units
    (:meth:`begin`, :meth:`end`) gets the time the current one still takes in
    the message, from the length of the last one."""

    def __init__(self, unit: str = "chunk"):
        self.unit = unit
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        self._started: float | None = None  # the current unit's start (_clock); None between units
        self._took: float | None = None  # the last whole unit's length in seconds

    def begin(self) -> None:
        """A unit starts now."""
        self._started = _clock()

    def end(self) -> float:
        """The unit begun last ends now; returns its length in seconds."""
        self._took, self._started = _clock() - self._started, None
        return self._took

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            if writing():
                print(f"\n{signal.Signals(signum).name} ignored: a checkpoint is being written, and aborting it "
                      "would hang the process; the run stops once it is written.", file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{self._message(signal.Signals(signum).name)}", file=sys.stderr, flush=True)

    def _message(self, name: str) -> str:
        """What the first signal does, and when: the time the current unit still takes, if timed."""
        again = "Ctrl-C again to abort without saving"
        if self._started is None and self._took is not None:
            return f"{name} received: the current {self.unit} has finished; saving a checkpoint now ({again})."
        if self._started is None or self._took is None:
            return f"{name} received: saving a checkpoint after the current {self.unit} ({again})."
        left = max(0.0, self._took - (_clock() - self._started))
        return (f"{name} received: saving a checkpoint after the current {self.unit}, which ends in about "
                f"{_about(left)} (a {self.unit} takes {_about(self._took)}); {again}.")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _about(seconds: float) -> str:
    """A rough duration: "25 s", "3 min"."""
    return f"{max(1, round(seconds))} s" if seconds < 90 else f"{round(seconds / 60)} min"


def _wait_keeping_the_error(checkpointer, *, replace: bool) -> None:
    """``checkpointer.wait()``; a failed background save raises, unless another
    error is already on its way out (``replace`` False): then it is logged, and
    the first error is the one reported."""
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


def projection(steps: int, sps: float, *, cpu: bool, done: int = 0) -> str:
    """One line: how long ``steps`` env steps take at ``sps`` (the first chunk's,
    compile excluded) and, where that is over :data:`LONG_ON_CPU` on the CPU, what
    to do instead: a ``--total-timesteps`` that fits :data:`SHORT_RUN` at this
    speed (``done`` env steps already trained count towards it), or a GPU."""
    seconds = steps / max(sps, 1e-9)
    line = (f"Projected training time on this machine: {_duration(seconds)} for {steps:,} env steps at "
            f"{sps:,.0f} SPS (the first chunk's, compile excluded).")
    if cpu and seconds > LONG_ON_CPU:
        fits = done + _round_down(sps * SHORT_RUN)
        line += (f" That is over an hour on the CPU: --total-timesteps {fits} fits ~{SHORT_RUN // 60} min at "
                 f"this speed, or train on a GPU: {python_command()} -m pip install -e \".[cuda12]\"")
    return line


def _round_down(x: float) -> int:
    """``x`` rounded down to two significant digits (at least 1): 28,800 -> 28,000."""
    if x < 10:
        return max(1, int(x))
    unit = 10 ** (int(math.log10(x)) - 1)
    return int(x // unit * unit)


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
    checkpoint_minutes: float = 0.0,
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
    beside the full state. A checkpoint is saved at the end of a chunk once
    ``checkpoint_every`` env steps (0: never) or ``checkpoint_minutes`` minutes
    of training (0: never) have passed since the last one, at the last chunk
    and on a signal; every checkpoint is on a chunk boundary, so a resume stays
    exact whichever interval saved it.

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
    last_ckpt, last_ckpt_time = step0, _clock()
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
                sig.begin()
                new_state, handle, out = compiled(state, handle)
                if fetch is jax.device_get and log_actions:
                    metrics, actions = jax.device_get((out.metrics, out.actions))
                else:
                    metrics = jax.tree.map(fetch, out.metrics)
                    actions = fetch(out.actions) if log_actions else None
                dt = sig.end()
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
                if chunk == start_chunk and chunk < schedule.num_chunks - 1:
                    progress.note(projection(schedule.total_steps - step0, sps, done=step0,
                                             cpu=jax.default_backend() == "cpu"))
                progress.update(global_step, sps, mean100)

                reached = target_return is not None and not math.isnan(mean100) and mean100 >= target_return
                last = chunk == schedule.num_chunks - 1
                if sig.received is not None:
                    status, received = "interrupted", sig.received
                if reached:
                    status = "target_reached"
                due = bool(checkpoint_every) and global_step - last_ckpt >= checkpoint_every
                if checkpoint_minutes and not due:
                    due = _agreed(_clock() - last_ckpt_time >= 60 * checkpoint_minutes)
                if due or last or status != "done":
                    save(score=score)
                    last_ckpt, last_ckpt_time = global_step, _clock()
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
        watch = (f"{python_command()} scripts/evaluate.py --run-dir {shlex.quote(str(agent))} --video play.mp4"
                 + (f" (agent 0 of {num_agents}: agents/<k> for the others)" if num_agents > 1 else ""))
        if status == "target_reached":
            print(f"\nTarget return {target_return} reached (mean of last 100 episodes {mean100:.1f}) at step "
                  f"{global_step:,}; saved as best. Run in {run_dir}. Watch the agent: {watch}", flush=True)
        else:
            print(f"\nDone: {global_step:,} env steps in {_duration(prev_wall + time.perf_counter() - wall0)}; "
                  f"run in {run_dir}. Watch the agent: {watch}", flush=True)
    return RunResult(state, status, global_step, mean100, compile_s, sps, received)


def _duration(seconds: float) -> str:
    """A duration to read: "4m 05s", "1h 02m 03s"."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _agreed(flag: bool) -> bool:
    """``flag`` as process 0 sees it, on every process (a save must be taken by all or none)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


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
    """A live progress bar on a terminal; one plain line per chunk otherwise. Both show
    the time since the loop started and an ETA from the chunks' rate so far (rich's
    own estimate looks back 30 s, less than one chunk, and would show nothing)."""

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.t0 = _clock()
        self.eta: float | None = None  # seconds left, as of self.at
        self.at = self.t0
        self.tty = sys.stdout.isatty()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]{task.completed:,}/{task.total:,}"), BarColumn(),
                TextColumn("{task.fields[sps]} SPS  return(100) {task.fields[ret]}"), _TimesColumn(self),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, sps="-", ret="-")
            self.bar.start()

    def times(self, now: float) -> str:
        """"elapsed H:MM:SS  ETA H:MM:SS" at ``now`` (the ETA counts down between chunks)."""
        eta = "-:--:--" if self.eta is None else _clock_time(self.eta - (now - self.at))
        return f"elapsed {_clock_time(now - self.t0)}  ETA {eta}"

    def update(self, step: int, sps: float, ret: float):
        now = _clock()
        if step > self.start:  # the rate of the chunks so far, what happens between them included
            self.eta, self.at = (self.total - step) * (now - self.t0) / (step - self.start), now
        if self.bar is not None:
            self.bar.update(self.task, completed=step, sps=f"{sps:,.0f}", ret=_fmt(ret))
        else:
            print(f"step {step:>{len(f'{self.total:,}')},}/{self.total:,}  SPS {sps:,.0f}  "
                  f"return(100) {_fmt(ret)}  {self.times(now)}", flush=True)

    def note(self, msg: str):
        if self.bar is not None:
            self.bar.console.print(Text(msg))  # as written: no markup (".[cuda12]")
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


class _TimesColumn(ProgressColumn):
    """The progress bar's elapsed time and ETA (:meth:`_Progress.times`), redrawn live."""

    def __init__(self, progress: _Progress):
        super().__init__()
        self.progress = progress

    def render(self, task) -> Text:
        return Text(self.progress.times(_clock()))


def _clock_time(seconds: float) -> str:
    """``H:MM:SS`` (negative as 0)."""
    m, s = divmod(max(0, int(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
