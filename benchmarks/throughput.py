"""Environment throughput ceiling and training SPS, side by side, on this machine.

    python benchmarks/throughput.py                      # all cores, Breakout-v5
    python benchmarks/throughput.py --threads 1 2 4 8    # scaling with thread count
    python benchmarks/throughput.py --quick              # < 2 min on 2 CPU cores (the test suite)

Writes `throughput_<kind>.json` and `.md` (`_quick` appended in --quick mode,
`_<env>` when --env is not Breakout-v5) under `--out-dir`
(default benchmarks/results/; with --quick `<temp dir>/jaxatari-benchmarks/`, so
that the test suite's runs leave the committed results alone; the last line
says where), where <kind> is the machine slug of
`machine.kind()` (`cpu-2core`, `nvidia-h200-16core`). The Markdown starts with
the machine description.

1. EnvPool ceiling. Random actions, no learning: the most agent steps per
   second EnvPool delivers for the game with a given number of worker threads,
   with the EnvPool options the training rows use (`--preset`, default the
   agents' own: nature for Atari; the options are recorded).
   For each thread count T in `--threads` (default: all usable cores):
     - sync:  num_envs = batch_size = `--sync-envs-per-thread` x T (default 1 x T;
              several factors give several rows, e.g. `--sync-envs-per-thread 1 4`);
              `reset()`, then `step(actions)` on the whole batch.
     - async: num_envs = `--async-envs-per-thread` x T (default 2 x T), batch_size = T;
              `async_reset()`, then `recv()` / `send(actions, env_id)`. With twice
              as many envs as the batch, one batch is stepped by the threads while
              the other is with the agent (EnvPool's advice; on a 2-core VM it
              matched 3 x T and beat batch_size > T).
   plus a sync row at each (num_envs, threads) the training rows below use, so
   every training row has a ceiling measured at its own configuration.
   Each row: `--warmup` seconds stepped and discarded, then `--repeats` timed
   windows of `--seconds`; the reported figure is the median window.
   Agent steps/s counts one step per env per transition; frames/s = steps/s x
   frame_skip (4 for the Atari -v5 ids: every agent step is 4 emulator frames).

2. Training SPS. For each algorithm in `ALGORITHMS` and each env count in
   `--algo-envs` (default max(8, T)) at T = `--algo-threads` (default: the
   largest thread count), the algorithm's benchmark (below) runs in a
   fresh subprocess (so a crash, a hang or its memory cannot spoil the other
   rows; `--algo-timeout` bounds it). The row reports its SPS, the compile
   time separately, and SPS as a fraction of the best ceiling row measured at
   the same thread count. A missing module, or one without an `ALGORITHM`,
   marks the row "not available"; an exception marks it "failed" with the
   error.

   `--budget S` bounds the whole run to about S seconds of wall time (a lent
   GPU session, a CI job): the ceiling rows are measured first as usual, each
   training row's timeout is cut to the time left, and a row that cannot start
   with `--algo-seconds` + `BUDGET_ROW_MIN_S` left is recorded as "skipped"
   with the reason, so rows are listed in priority order. The JSON and
   Markdown are rewritten after every row (`"complete": false` until the last),
   so a run stopped from outside keeps every row it finished.

   --quick measures one row per algorithm (`QUICK_ALGOS`: ppo, ppo-cfc, a2c,
   dqn) with 4 envs and 2 s of training each, 70-85 s in all on 2 idle CPU
   cores. Rows are cut down to fit, never skipped: ppo and ppo-cfc collect
   shorter rollouts (`QUICK_ROW_OVERRIDES`; ppo-cfc's default torso, the ncps
   conv block, trains at ~10 SPS there, so one default 128-step rollout of
   4 envs would take ~50 s) and dqn logs 100-step metric rows
   (`QUICK_OVERRIDES`); each is recorded in the row's `overrides` and the
   Markdown's note column. Each row's timeout is `QUICK_TIMEOUT`, or its entry
   in `QUICK_TIMEOUTS` (ppo-cfc: longer), unless --algo-timeout is given.

   Every row's module has an `ALGORITHM` (a `jaxatari.driver.Algorithm`) and
   runs through one benchmark function, `benchmarks/train_sps.py`:

       benchmarks.train_sps.benchmark(
           algo, env_id: str, num_envs: int, num_threads: int, seconds: float, **overrides
       ) -> dict  # at least {"sps": float, "compile_s": float, "steps": int}

   It builds the training step for `env_id` with `num_envs` envs on
   `num_threads` EnvPool threads as the training driver does (DQN: with a
   100k buffer and learning from the start, `train_sps.EXTRAS`), compiles it
   (and runs it once) - the `compile_s` reported - then trains for about
   `seconds` of wall time after compilation and returns `sps` = env steps
   (summed over envs) per second in that window and `steps` = the env steps
   it counted. `overrides` are Config fields (e.g. network="cfc"). Extra keys
   in the returned dict (DQN: `updates_per_s`, `replay_ratio`, ...) are kept
   in the JSON. A module without an `ALGORITHM` is "not available".
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # imported as benchmarks.throughput (tests) or run as a script
    from benchmarks import machine
except ImportError:
    import machine  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_ENV = "Breakout-v5"


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """How to benchmark one training configuration: `module.ALGORITHM` through `train_sps.benchmark`, with
    `overrides`."""

    module: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


ALGORITHMS: dict[str, AlgoSpec] = {
    "ppo": AlgoSpec("jaxatari.agents.ppo"),
    "ppo-cfc": AlgoSpec("jaxatari.agents.ppo", {"network": "cfc"}),
    # Same torso as "ppo" (Nature CNN) plus the CfC core: isolates the recurrent cost
    # (the default cfc torso, the ncps conv block, is ~20x the Nature CNN's FLOPs).
    "ppo-cfc-nature": AlgoSpec("jaxatari.agents.ppo", {"network": "cfc", "torso": "nature"}),
    "a2c": AlgoSpec("jaxatari.agents.a2c"),
    "dqn": AlgoSpec("jaxatari.agents.dqn"),
}
"""Registry of training rows: name -> module (with an `ALGORITHM`) and the Config overrides its benchmark
(`benchmarks.train_sps.benchmark`) gets."""
QUICK_ALGOS = ("ppo", "ppo-cfc", "a2c", "dqn")
"""The rows of ``--quick``: one per algorithm, so that it stays under two minutes on 2 cores."""
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {"jaxatari.agents.dqn": {"log_every": 100}}
"""Extra overrides under ``--quick``, per module (recorded in the row): DQN's benchmark times whole metric
rows, and its default 1,000-step row takes ~16 s of learning on 2 CPU cores, longer than a quick row's budget."""
QUICK_ROW_OVERRIDES: dict[str, dict[str, Any]] = {"ppo": {"num_steps": 32}, "ppo-cfc": {"num_steps": 8}}
"""Extra overrides under ``--quick``, per row (recorded in the row), applied last. PPO's benchmark runs one
update to warm up and at least one timed, whole rollouts of num_envs x num_steps env steps. On 2 CPU cores
``ppo`` trains at ~80-160 SPS, so a default 128-step rollout of 4 envs takes 3-6 s per update, a 32-step one
~1 s; ``ppo-cfc`` (the ncps conv block) at ~6-11 SPS: ~50 s per default update, ~3-5 s per 8-step one. The
learning per env step is the same (every sample goes through --update-epochs passes); the rollout, the
minibatches and, for ppo-cfc, the BPTT window are shorter."""
BUDGET_ROW_MIN_S = 30.0
"""With --budget, a training row starts only if at least --algo-seconds + this many seconds are left: below that it
could hardly import jax, build its envs and compile (7-20 s on a 2-core CPU; more for the larger chunks of a GPU
run) before its timeout, and would spend the time left on a row that times out."""
QUICK_TIMEOUT = 40.0
"""``--quick``'s --algo-timeout for rows not in `QUICK_TIMEOUTS`. ppo, a2c and dqn each take 15-22 s on 2 idle
CPU cores (import, env, network init, compile, one warm-up call, 2 s timed) and up to ~33 s while other work
shares the cores; 20 s timed rows out on a shared machine."""
QUICK_TIMEOUTS: dict[str, float] = {"ppo-cfc": 60.0}
"""Per-row ``--quick`` timeouts, in seconds, where `QUICK_TIMEOUT` is too short: ``ppo-cfc`` initialises and
compiles the conv block, then runs two 8-step updates: ~24 s on 2 idle cores, up to ~43 s on shared ones. If
every row ran into its timeout the run would take ~3 min (the test suite passes a longer ``--algo-timeout``,
as it shares the cores with another test worker)."""


# ----------------------------------------------------------------------------- ceiling


def measure_envpool(
    env_id: str,
    *,
    mode: str,
    num_envs: int,
    batch_size: int,
    num_threads: int,
    seconds: float,
    repeats: int,
    warmup: float,
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Agent steps/s of EnvPool stepping `env_id` (EnvPool `options`) with random actions.

    mode "sync" needs batch_size == num_envs, "async" batch_size < num_envs.
    Returns the row: configuration, `sps` (median over repeats), `sps_repeats`,
    `fps` (= sps x frame_skip), `frame_skip`, `make_s` (env construction time).
    """
    from jaxatari import envs

    if (mode == "sync") != (batch_size == num_envs):
        raise ValueError(f"mode {mode!r} with num_envs={num_envs}, batch_size={batch_size}: sync needs them equal, async needs batch_size < num_envs.")
    t0 = time.perf_counter()
    env = envs.envpool_make(
        env_id, env_type="gymnasium", num_envs=num_envs, batch_size=batch_size, num_threads=num_threads, seed=seed,
        **(options or {}),
    )
    make_s = time.perf_counter() - t0
    frame_skip = int(getattr(env.spec.config, "frame_skip", 1))
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, env.action_space.n, size=(64, num_envs), dtype=np.int32)

    if mode == "sync":
        env.reset()

        def step(i: int) -> int:
            env.step(actions[i & 63])
            return num_envs

    else:
        env.async_reset()

        def step(i: int) -> int:
            *_, info = env.recv()
            ids = info["env_id"]
            env.send(actions[i & 63][: len(ids)], ids)
            return len(ids)

    def window(duration: float, i: int) -> tuple[int, float, int]:
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            steps += step(i)
            i += 1
        return steps, elapsed, i

    try:
        _, _, i = window(warmup, 0)
        rates = []
        for _ in range(repeats):
            steps, elapsed, i = window(seconds, i)
            rates.append(steps / elapsed)
    finally:
        env.close()
    sps = statistics.median(rates)
    return {
        "mode": mode,
        "num_envs": num_envs,
        "batch_size": batch_size,
        "num_threads": num_threads,
        "sps": sps,
        "fps": sps * frame_skip,
        "frame_skip": frame_skip,
        "sps_repeats": rates,
        "make_s": make_s,
    }


# ----------------------------------------------------------------------------- training rows

TRAIN_SPS = "benchmarks.train_sps:benchmark"
"""The benchmark every training row runs: ``benchmark(algo, env_id, num_envs, num_threads, seconds, **overrides)``."""

_WORKER = r"""
import importlib, json, sys, traceback
spec = json.loads(sys.argv[1])
try:
    module = importlib.import_module(spec["module"])
except Exception as err:
    out = {"status": "not available", "reason": f"import {spec['module']} failed: {type(err).__name__}: {err}"}
else:
    algo = getattr(module, "ALGORITHM", None)
    if algo is None:
        out = {"status": "not available", "reason": f"{spec['module']} has no ALGORITHM"}
    else:
        try:
            bench_module, bench_name = spec["bench"].split(":")
            fn = getattr(importlib.import_module(bench_module), bench_name)
            res = fn(algo, spec["env_id"], spec["num_envs"], spec["num_threads"], spec["seconds"],
                     **spec["overrides"])
            out = {"status": "ok", **dict(res)}
        except Exception as err:
            out = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-3000:]}
with open(spec["result_file"], "w") as f:
    json.dump(out, f, default=lambda x: x.item() if hasattr(x, "item") else str(x))
"""


def _module_file_exists(module: str) -> bool:
    """Whether `module`'s source file exists, found without importing the package."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    for location in spec.submodule_search_locations or []:
        base = Path(location, *rest)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def blank_row(name: str, spec: AlgoSpec, *, preset: str | None, num_envs: int, num_threads: int, seconds: float,
              timeout: float) -> dict[str, Any]:
    """A training row's keys before it is measured (status None); `run_algorithm` and a --budget skip fill it."""
    return {
        "name": name, "module": spec.module, "overrides": spec.overrides, "preset": preset, "num_envs": num_envs,
        "num_threads": num_threads, "seconds": seconds, "timeout": timeout, "status": None, "sps": None,
        "compile_s": None, "steps": None, "reason": None,
    }  # fmt: skip


def run_algorithm(
    name: str,
    spec: AlgoSpec,
    *,
    env_id: str,
    num_envs: int,
    num_threads: int,
    seconds: float,
    timeout: float,
    preset: str | None = None,
    bench: str = TRAIN_SPS,
) -> dict[str, Any]:
    """One training row: `bench` ("module:function", default `benchmarks.train_sps.benchmark`) called with
    `spec.module`'s `ALGORITHM` in a subprocess, or why not. `preset` (the env option preset the ceiling
    stepped) is passed with the overrides."""
    row = blank_row(name, spec, preset=preset, num_envs=num_envs, num_threads=num_threads, seconds=seconds,
                    timeout=timeout)
    if not _module_file_exists(spec.module):
        row.update(status="not available", reason=f"module {spec.module} does not exist")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        payload = dict(
            module=spec.module,
            bench=bench,
            env_id=env_id,
            num_envs=num_envs,
            num_threads=num_threads,
            seconds=seconds,
            overrides={**spec.overrides, **({"preset": preset} if preset is not None else {})},
            result_file=str(result_file),
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WORKER, json.dumps(payload)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            row.update(status="timed out", reason=f"no result within its timeout of {timeout:g} s (--algo-timeout)")
            return row
        row["process_s"] = time.perf_counter() - t0
        if not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            row.update(status="failed", reason=f"worker exited with code {proc.returncode}: {tail[0]}")
            return row
        result = json.loads(result_file.read_text())
    row.update(result)
    if row["status"] == "ok" and not isinstance(row.get("sps"), (int, float)):
        row.update(status="failed", reason=f"the benchmark returned no numeric 'sps' (keys: {sorted(result)})")
    return row


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class Args:
    """Measure the EnvPool throughput ceiling and each algorithm's training SPS on this machine."""

    env: str = DEFAULT_ENV
    """EnvPool task id (Atari ids end in -v5)."""
    preset: str | None = None
    """Env option preset for the ceiling and every training row alike (Atari: nature or machado; default: the
    agents' own default, nature for Atari, none otherwise)."""
    threads: tuple[int, ...] | None = None
    """EnvPool thread counts for the ceiling rows (default: all usable cores; --quick: min(2, cores))."""
    sync_envs_per_thread: tuple[int, ...] = (1,)
    """Sync rows use num_envs = batch_size = F x threads, one row per F given."""
    async_envs_per_thread: tuple[int, ...] = (2,)
    """Async rows use num_envs = F x threads and batch_size = threads, one row per F given; F >= 2."""
    seconds: float | None = None
    """Length of each timed window of a ceiling row (default 5; --quick 0.5)."""
    repeats: int | None = None
    """Timed windows per ceiling row; the median is reported (default 3; --quick 1)."""
    warmup: float | None = None
    """Seconds stepped and discarded before timing a ceiling row (default 1; --quick 0.25)."""
    algos: tuple[str, ...] | None = None
    """Training rows to measure (names from the ALGORITHMS registry; default: all of them, --quick: the four
    algorithms ppo, ppo-cfc, a2c, dqn); pass none to skip the section."""
    algo_envs: tuple[int, ...] | None = None
    """Env counts for the training rows (default max(8, algo-threads); --quick 4)."""
    algo_threads: int | None = None
    """EnvPool threads for the training rows (default: the largest --threads)."""
    algo_seconds: float | None = None
    """Wall-clock seconds each algorithm trains after compiling (default 30; --quick 2)."""
    algo_timeout: float | None = None
    """Seconds before an algorithm's subprocess is stopped and marked timed out, for every row (default 1800;
    --quick 40, and 60 for ppo-cfc: about twice what each row needs on 2 idle CPU cores)."""
    budget: float | None = None
    """Wall-clock seconds for the whole run: training rows get at most the time left as their timeout, and a row
    that cannot start with --algo-seconds + 30 s left is recorded as skipped (default: no limit). The ceiling rows
    are measured first and are not cut."""
    quick: bool = False
    """Short measurements, one small thread count, for the test suite: under two minutes on 2 CPU cores."""
    out_dir: str | None = None
    """Directory for throughput_<machine kind>.json and .md (default benchmarks/results/; --quick:
    <temp dir>/jaxatari-benchmarks/, see `default_out_dir`)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Args with every default resolved; recorded in the JSON."""

    env: str
    preset: str
    threads: tuple[int, ...]
    sync_envs_per_thread: tuple[int, ...]
    async_envs_per_thread: tuple[int, ...]
    seconds: float
    repeats: int
    warmup: float
    algos: tuple[str, ...]
    algo_envs: tuple[int, ...]
    algo_threads: int
    algo_seconds: float
    algo_timeout: float
    """Timeout of the rows without an entry in `algo_timeouts`."""
    algo_timeouts: dict[str, float]
    """Per-row timeouts (--quick's `QUICK_TIMEOUTS` for the rows measured, unless --algo-timeout was given)."""
    quick: bool
    budget: float | None = None
    """Wall-clock seconds for the whole run (None: no limit)."""


def resolve(args: Args, cores: int) -> Settings:
    """Fill the defaults (which depend on --quick and the core count) and validate."""
    from jaxatari import envs

    envs.validate_env_id(args.env)
    q = args.quick
    threads = args.threads or ((min(2, cores),) if q else (cores,))
    algo_threads = args.algo_threads or max(threads)
    pick = lambda value, normal, quick: value if value is not None else (quick if q else normal)  # noqa: E731
    algos = tuple(args.algos) if args.algos is not None else (QUICK_ALGOS if q else tuple(ALGORITHMS))
    own_timeouts = q and args.algo_timeout is None
    s = Settings(
        env=args.env,
        preset=envs.resolve_preset(args.env, args.preset),
        threads=tuple(threads),
        sync_envs_per_thread=tuple(args.sync_envs_per_thread),
        async_envs_per_thread=tuple(args.async_envs_per_thread),
        seconds=pick(args.seconds, 5.0, 0.5),
        repeats=pick(args.repeats, 3, 1),
        warmup=pick(args.warmup, 1.0, 0.25),
        algos=algos,
        algo_envs=tuple(args.algo_envs or ((4,) if q else (max(8, algo_threads),))),
        algo_threads=algo_threads,
        algo_seconds=pick(args.algo_seconds, 30.0, 2.0),
        algo_timeout=pick(args.algo_timeout, 1800.0, QUICK_TIMEOUT),
        algo_timeouts={a: QUICK_TIMEOUTS[a] for a in algos if a in QUICK_TIMEOUTS} if own_timeouts else {},
        quick=q,
        budget=args.budget,
    )
    if s.budget is not None and not s.budget > 0:
        raise ValueError(f"--budget must be a positive number of seconds, got {s.budget:g}.")
    for flag, values in (("--threads", s.threads), ("--algo-envs", s.algo_envs), ("--algo-threads", (s.algo_threads,))):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{flag} must be positive integers, got {bad[0]}.")
    if any(f < 1 for f in s.sync_envs_per_thread):
        raise ValueError(f"--sync-envs-per-thread must be at least 1, got {min(s.sync_envs_per_thread)}.")
    if any(f < 2 for f in s.async_envs_per_thread):
        raise ValueError(
            f"--async-envs-per-thread must be at least 2 (async mode needs more envs than the batch), "
            f"got {min(s.async_envs_per_thread)}."
        )
    if s.seconds <= 0 or s.warmup < 0 or s.repeats < 1 or s.algo_seconds <= 0 or s.algo_timeout <= 0:
        raise ValueError("--seconds, --algo-seconds and --algo-timeout must be positive, --warmup >= 0 and --repeats >= 1.")
    unknown = [a for a in s.algos if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"Unknown algorithm {unknown[0]!r} in --algos; known: {', '.join(ALGORITHMS)}.")
    return s


def algo_spec(name: str, s: Settings) -> AlgoSpec:
    """Row `name`'s registry entry, with --quick's overrides: per module first, then the row's own, then per row."""
    spec = ALGORITHMS[name]
    if not s.quick:
        return spec
    overrides = {**QUICK_OVERRIDES.get(spec.module, {}), **spec.overrides, **QUICK_ROW_OVERRIDES.get(name, {})}
    return AlgoSpec(spec.module, overrides)


def _timeouts_text(s: dict[str, Any]) -> str:
    """'1800 s' or '40 s (ppo-cfc 60 s)': the rows' timeouts, from the settings recorded in the JSON."""
    extra = ", ".join(f"{a} {t:g} s" for a, t in s["algo_timeouts"].items())
    return f"{s['algo_timeout']:g} s" + (f" ({extra})" if extra else "")


def ceiling_configs(s: Settings) -> list[tuple[str, int, int, int]]:
    """(mode, num_envs, batch_size, num_threads) for every ceiling row, deduplicated, in order."""
    configs: list[tuple[str, int, int, int]] = []
    for t in s.threads:
        configs.extend(("sync", f * t, f * t, t) for f in s.sync_envs_per_thread)
        configs.extend(("async", f * t, t, t) for f in s.async_envs_per_thread)
    if s.algos:
        configs.extend(("sync", n, n, s.algo_threads) for n in s.algo_envs)
    return list(dict.fromkeys(configs))


def best_ceiling(ceiling: Sequence[dict[str, Any]], num_threads: int) -> dict[str, Any] | None:
    rows = [r for r in ceiling if r["num_threads"] == num_threads]
    return max(rows, key=lambda r: r["sps"]) if rows else None


def run(s: Settings, log=print, on_row=None) -> dict[str, Any]:
    """Measure everything and return the result document.

    `on_row(doc)` (if given) gets the document so far after every ceiling and training row, with
    ``doc["complete"]`` False until the last row: `main` writes the files each time, so a run stopped from outside
    keeps every row it finished. With ``s.budget``, training rows are cut to fit it (module docstring).
    """
    from jaxatari import envs

    started = time.monotonic()
    desc = machine.describe()
    log(f"machine: {machine.summary(desc)}")
    options = envs.resolve_options(s.env, s.preset)
    log(f"env options (preset {s.preset}), for the ceiling and the training rows: {_options_text(options)}")
    ceiling: list[dict[str, Any]] = []
    algorithms: list[dict[str, Any]] = []

    def document(complete: bool) -> dict[str, Any]:
        try:
            load_end = round(os.getloadavg()[0], 2)
        except (AttributeError, OSError):
            load_end = None
        return {
            "schema": 1,
            "kind": machine.kind(desc),
            "complete": complete,
            "load_avg_1m_end": load_end,
            "machine": desc,
            "machine_summary": machine.summary(desc),
            "settings": dataclasses.asdict(s),
            "env_options": options,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - started, 1),
            "ceiling": list(ceiling),
            "algorithms": list(algorithms),
        }

    def done_row() -> None:
        if on_row is not None:
            on_row(document(complete=False))

    for mode, n, b, t in ceiling_configs(s):
        row = measure_envpool(
            s.env, mode=mode, num_envs=n, batch_size=b, num_threads=t, seconds=s.seconds, repeats=s.repeats, warmup=s.warmup,
            options=options,
        )
        log(f"ceiling {mode:5s} threads={t:<3d} envs={n:<4d} batch={b:<4d} {row['sps']:>10,.0f} steps/s {row['fps']:>11,.0f} frames/s")
        ceiling.append(row)
        done_row()
    for name in s.algos:
        spec = algo_spec(name, s)
        for n in s.algo_envs:
            timeout = s.algo_timeouts.get(name, s.algo_timeout)
            left = None if s.budget is None else s.budget - (time.monotonic() - started)
            if left is not None and left < s.algo_seconds + BUDGET_ROW_MIN_S:
                row = blank_row(name, spec, preset=s.preset, num_envs=n, num_threads=s.algo_threads,
                                seconds=s.algo_seconds, timeout=timeout)
                row.update(status="skipped", reason=f"not started: {max(left, 0):.0f} s of the --budget of "
                           f"{s.budget:g} s left, a row needs {s.algo_seconds + BUDGET_ROW_MIN_S:g} s")
            else:
                cut = left is not None and left < timeout
                row = run_algorithm(
                    name,
                    spec,
                    env_id=s.env,
                    num_envs=n,
                    num_threads=s.algo_threads,
                    seconds=s.algo_seconds,
                    timeout=left if cut else timeout,
                    preset=s.preset,
                )
                if cut and row["status"] == "timed out":
                    row["reason"] = f"no result within the {left:.0f} s left of the --budget of {s.budget:g} s"
            ref = best_ceiling(ceiling, s.algo_threads)
            row["ceiling_sps"] = ref["sps"] if ref else None
            row["ceiling_row"] = f"{ref['mode']} envs={ref['num_envs']} batch={ref['batch_size']}" if ref else None
            ok = row["status"] == "ok" and ref is not None
            row["fraction_of_ceiling"] = row["sps"] / ref["sps"] if ok else None
            same = [r for r in ceiling if (r["mode"], r["num_envs"], r["num_threads"]) == ("sync", n, s.algo_threads)]
            row["ceiling_same_envs_sps"] = same[0]["sps"] if same else None  # sync, same envs and threads
            if row["status"] == "ok":
                log(f"train   {name:8s} envs={n:<4d} threads={s.algo_threads:<3d} {row['sps']:>10,.0f} SPS (compile {row.get('compile_s') or 0:.1f} s)")
            else:
                log(f"train   {name:8s} envs={n:<4d} threads={s.algo_threads:<3d} {row['status']}: {row['reason']}")
            algorithms.append(row)
            done_row()
    return document(complete=True)


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "EnvPool's defaults"


def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _factors(fs: Sequence[int]) -> str:
    return " or ".join(map(str, fs))


def _busy_warning(doc: dict[str, Any]) -> list[str]:
    """A note when other work was using the CPU as the run started: the figures are then lower bounds.

    Only the load at the start counts: by the end it includes this benchmark's own threads.
    """
    cores = doc["machine"].get("usable_cores") or 1
    load = doc["machine"].get("load_avg_1m")
    if load is not None and load >= 0.5 * cores:
        return [
            f"**Note:** other work was using the machine when this ran (1-minute load average {load:g} on "
            f"{cores} usable cores): the figures below are lower bounds, not this machine's capacity.",
            "",
        ]
    return []


def _partial_note(doc: dict[str, Any]) -> list[str]:
    """A note while the run is still going (or was stopped): the rows below are the ones finished so far."""
    if doc.get("complete", True):
        return []
    return [f"**Partial:** written after {len(doc['ceiling'])} ceiling and {len(doc['algorithms'])} training "
            f"row(s), {doc.get('elapsed_s', 0):.0f} s into the run; the run did not finish (yet).", ""]


def to_markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    frame_skip = doc["ceiling"][0]["frame_skip"] if doc["ceiling"] else 4
    lines = [
        f"# Throughput on {doc['kind']}{' (quick)' if s['quick'] else ''}: {s['env']}",
        "",
        f"**Machine:** {doc['machine_summary']}",
        "",
        "| field | value |",
        "|---|---|",
        f"| CPU | {m.get('cpu_model')} ({m.get('physical_cores')} physical / {m.get('logical_cores')} logical cores, {m.get('usable_cores')} usable) |",
        f"| memory | {m.get('memory_gib')} GiB |",
        f"| GPU | {', '.join(g['name'] for g in m.get('gpus') or []) or 'none'} |",
        f"| jax backend | {m.get('jax_backend')} ({', '.join(m.get('jax_devices') or [])}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items() if v)} |",
        f"| OS | {m.get('os')} |",
        f"| load average (1 min) at start / end | {m.get('load_avg_1m')} / {doc.get('load_avg_1m_end')} |",
        f"| measured | {doc['timestamp']} |",
        "",
        *_busy_warning(doc),
        *_partial_note(doc),
        f"EnvPool options (preset {s.get('preset', '-')}), the same for the ceiling and every training row: "
        f"{_options_text(doc.get('env_options', {}))}.",
        "",
        "## EnvPool ceiling (random actions, no learning)",
        "",
        f"Agent steps/s summed over envs; frames/s = steps/s x {frame_skip} (frame skip). "
        f"Median of {s['repeats']} window(s) of {s['seconds']:g} s after {s['warmup']:g} s warm-up. "
        f"sync: num_envs = batch = {_factors(s['sync_envs_per_thread'])} x threads (step); "
        f"async: num_envs = {_factors(s['async_envs_per_thread'])} x threads, batch = threads (recv/send)"
        + (f"; plus sync rows at the training rows' env counts ({', '.join(map(str, s['algo_envs']))})" if s["algos"] else "")
        + ".",
        "",
        "| mode | threads | envs | batch | steps/s | frames/s | windows (min-max steps/s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["ceiling"]:
        lo, hi = min(r["sps_repeats"]), max(r["sps_repeats"])
        lines.append(
            f"| {r['mode']} | {r['num_threads']} | {r['num_envs']} | {r['batch_size']} | "
            f"{_n(r['sps'])} | {_n(r['fps'])} | {_n(lo)}-{_n(hi)} |"
        )
    lines += ["", "## Training throughput", ""]
    if not doc["algorithms"]:
        lines.append("Not measured in this run (--algos was empty).")
    else:
        lines += [
            f"Each algorithm's benchmark in its own process, {s['algo_seconds']:g} s of training after "
            f"compilation (compile time separate; rows stopped after {_timeouts_text(s)} are 'timed out'"
            + (f"; a --budget of {s['budget']:g} s for the whole run" if s.get("budget") else "") + "). "
            "Fraction = training SPS / best ceiling row at the same thread count.",
            "",
            "| algorithm | envs | threads | status | SPS | compile (s) | fraction of ceiling | ceiling row | note |",
            "|---|---:|---:|---|---:|---:|---:|---|---|",
        ]
        for r in doc["algorithms"]:
            frac = "-" if r.get("fraction_of_ceiling") is None else f"{r['fraction_of_ceiling']:.0%}"
            overrides = r.get("overrides") or {}
            notes = [(r.get("reason") or "").replace("|", "/")]
            if r.get("backend") == "callback":
                notes.append("envs stepped through the host callback: EnvPool's xla() did not compile here")
            if "log_every" in overrides:
                notes.append(f"{overrides['log_every']}-step metric rows (--quick)")
            if "num_steps" in overrides:
                notes.append(f"{overrides['num_steps']}-step rollouts (--quick)")
            note = "; ".join(n for n in notes if n)
            lines.append(
                f"| {r['name']} | {r['num_envs']} | {r['num_threads']} | {r['status']} | {_n(r.get('sps'))} | "
                f"{_n(r.get('compile_s'), 1)} | {frac} | {r.get('ceiling_row') or '-'} | {note} |"
            )
    lines.append("")
    return "\n".join(lines)


def default_out_dir(quick: bool) -> Path:
    """--out-dir's default: the committed benchmarks/results/, or for --quick (the test suite's
    run) a directory under the system's temporary directory, so that it never dirties the checkout."""
    return Path(tempfile.gettempdir()) / "jaxatari-benchmarks" if quick else RESULTS_DIR


def write_results(doc: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    s = doc["settings"]
    stem = f"throughput_{doc['kind']}"
    if s["env"] != DEFAULT_ENV:
        stem += "_" + s["env"].replace("/", "-")
    if s["quick"]:
        stem += "_quick"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (md_path, to_markdown(doc))):
        tmp = path.with_name(path.name + ".tmp")  # rewritten after every row: never leave half a file
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    cores = machine.usable_cores()
    try:
        settings = resolve(args, cores)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = args.out_dir if args.out_dir is not None else default_out_dir(args.quick)
    doc = run(settings, log=lambda msg: print(msg, flush=True), on_row=lambda d: write_results(d, out_dir))
    json_path, md_path = write_results(doc, out_dir)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
