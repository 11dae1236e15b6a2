"""Learning benchmark: N seeds of one algorithm on one game, final returns and curves.

    python benchmarks/learning.py --algo ppo --env Breakout-v5 --num-seeds 3 --total-timesteps 10000000
    python benchmarks/learning.py --algo dqn --seeds 0 1 --parallel 2 -- --num-envs 8 --preset machado
    python benchmarks/learning.py --algo ppo --collect-only      # tabulate runs already in --out-dir

Launches `scripts/<algo>.py --env ENV --seed S --total-timesteps N --run-dir DIR
[extra args]` once per seed, sequentially or `--parallel K` at a time, each into
its own run directory `<out-dir>/seed<S>` with its console output in
`<out-dir>/logs/seed<S>.log`. Arguments this script does not know (or all
after a lone `--`) are passed through to the training script. With
--parallel K the runs share the machine's cores: give each run its share of
EnvPool threads through the training script's own flags. On a GPU each run
preallocates 90%/K of its memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`, unless
you set it or `XLA_PYTHON_CLIENT_PREALLOCATE` yourself).

Then it reads each run's metrics.csv and writes `<name>.json` and `<name>.md`
(default name `learning_<algo>_<env>`) under `--results-dir` (default
benchmarks/results/), plus `<name>.png` learning curves (scripts/plot.py) unless
--no-plot.

Final return of a run = the mean of its last `--last` (default 10) logged
`episode_return` values, i.e. of the last 10 metrics.csv rows that carry a
return (each such row is what the script logged for the episodes that finished
since the previous row), not of a fixed number of episodes. The summary gives
its mean, standard deviation (ddof=1), min and max across seeds, and each
run's wall time (process start to exit) and env steps.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:  # imported as benchmarks.learning (tests) or run as a script
    from benchmarks import machine
except ImportError:
    import machine  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCRIPTS_DIR = REPO / "scripts"
NOT_ALGO_SCRIPTS = {"plot", "evaluate", "collect", "bc", "__init__"}
"""Scripts in scripts/ that are not env-training algorithms (bc trains on a dataset)."""
RESERVED_FLAGS = {"--env", "--seed", "--total-timesteps", "--run-dir"}
"""Flags learning.py sets per run; passing them through would contradict it."""


def load_plot_module():
    """scripts/plot.py as a module (scripts/ is not a package)."""
    name = "jaxatari_scripts_plot"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS_DIR / "plot.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses looks the module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclasses.dataclass(frozen=True)
class Args:
    """Run N seeds of scripts/<algo>.py on one game and tabulate their final returns."""

    algo: str = "ppo"
    """Algorithm: runs scripts/<algo>.py (ppo, a2c, dqn)."""
    env: str = "Breakout-v5"
    """EnvPool task id passed as --env."""
    seeds: tuple[int, ...] | None = None
    """Seeds to run (default: 0 .. num-seeds - 1)."""
    num_seeds: int = 3
    """Number of seeds when --seeds is not given."""
    total_timesteps: int = 10_000_000
    """Env steps per run, passed as --total-timesteps."""
    parallel: int = 1
    """Runs at a time (subprocesses)."""
    out_dir: str | None = None
    """Parent of the run directories (default runs/learning/<algo>_<env> in the repository)."""
    results_dir: str = str(RESULTS_DIR)
    """Where <name>.json, .md and .png go."""
    name: str | None = None
    """Stem of the result files (default learning_<algo>_<env>)."""
    last: int = 10
    """Final return = mean of each run's last this-many logged episode_return values."""
    plot: bool = True
    """Draw <name>.png learning curves with scripts/plot.py."""
    collect_only: bool = False
    """Launch nothing; tabulate the run directories already in --out-dir."""
    skip_existing: bool = False
    """Do not relaunch a seed whose run directory already has a metrics.csv (finished or not: an
    unfinished one can be continued with the training script's --resume before collecting)."""
    scripts_dir: str = str(SCRIPTS_DIR)
    """Where the training scripts live."""


@dataclasses.dataclass
class Job:
    """One training run: its command, and once launched its exit code and wall time."""

    seed: int | None
    run_dir: Path
    log: Path
    cmd: list[str]
    returncode: int | None = None
    wall_s: float | None = None
    skipped: bool = False


def script_for(algo: str, scripts_dir: str | Path) -> Path:
    """scripts/<algo>.py, or a ValueError naming it and the scripts that do exist."""
    scripts = Path(scripts_dir)
    path = scripts / f"{algo}.py"
    if not path.is_file() or algo in NOT_ALGO_SCRIPTS:
        present = sorted(p.stem for p in scripts.glob("*.py") if p.stem not in NOT_ALGO_SCRIPTS) if scripts.is_dir() else []
        raise ValueError(
            f"No training script {path} for --algo {algo}; available: {', '.join(present) or 'none yet'}."
        )
    return path


def _stem(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text)


def discover(out_dir: Path) -> list[Job]:
    """Every sub-directory of out_dir with a metrics.csv, as finished jobs (for --collect-only)."""
    if not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} does not exist; nothing to collect.")
    run_dirs = sorted(d for d in out_dir.iterdir() if (d / "metrics.csv").is_file())
    if not run_dirs:
        raise ValueError(f"No run directories with a metrics.csv under {out_dir}; nothing to collect.")
    jobs = []
    for d in run_dirs:
        try:
            seed = json.loads((d / "config.json").read_text()).get("seed")
        except (OSError, json.JSONDecodeError, AttributeError):
            seed = None
        jobs.append(Job(seed=seed, run_dir=d, log=out_dir / "logs" / f"{d.name}.log", cmd=[], skipped=True))
    return jobs


def plan(args: Args, extra: Sequence[str]) -> tuple[list[Job], Path]:
    """The jobs to run (validated, nothing launched) and the out dir."""
    if args.parallel < 1 or args.num_seeds < 1 or args.last < 1 or args.total_timesteps < 1:
        raise ValueError(
            f"--parallel, --num-seeds, --last and --total-timesteps must be positive "
            f"(got {args.parallel}, {args.num_seeds}, {args.last}, {args.total_timesteps})."
        )
    seeds = list(args.seeds) if args.seeds else list(range(args.num_seeds))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has duplicates: {seeds}.")
    out_dir = Path(args.out_dir) if args.out_dir else REPO / "runs" / "learning" / f"{_stem(args.algo)}_{_stem(args.env)}"
    out_dir = out_dir.resolve()  # the runs start in the repository root, not in our cwd
    reserved = sorted({a.split("=", 1)[0] for a in extra} & RESERVED_FLAGS)
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)} is set by learning.py for every run; use --env, --seeds/--num-seeds, "
            f"--total-timesteps and --out-dir instead of passing it through."
        )
    if args.collect_only and not args.seeds:
        return discover(out_dir), out_dir
    script = None if args.collect_only else script_for(args.algo, Path(args.scripts_dir).resolve())
    jobs = []
    for seed in seeds:
        run_dir = out_dir / f"seed{seed}"
        cmd = [
            sys.executable,
            str(script),
            "--env", args.env,
            "--seed", str(seed),
            "--total-timesteps", str(args.total_timesteps),
            "--run-dir", str(run_dir),
            *extra,
        ]  # fmt: skip
        job = Job(seed=seed, run_dir=run_dir, log=out_dir / "logs" / f"seed{seed}.log", cmd=cmd)
        if not args.collect_only and run_dir.exists() and any(run_dir.iterdir()):
            if args.skip_existing and (run_dir / "metrics.csv").is_file():
                job.skipped = True
            else:
                raise ValueError(
                    f"Run directory {run_dir} already exists and is not empty; pass --skip-existing to keep "
                    f"finished runs, --collect-only to only tabulate, or another --out-dir."
                )
        jobs.append(job)
    return jobs, out_dir


def child_env(parallel: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The runs' environment: with ``parallel`` > 1 runs at once, each preallocates
    ``0.9 / parallel`` of a GPU's memory (JAX's default, 75% each, would fail the
    second run); left alone where the user set the allocator themselves. A CPU
    ignores it."""
    env = dict(os.environ if environ is None else environ)
    if parallel > 1 and not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                             "XLA_PYTHON_CLIENT_ALLOCATOR"} & set(env):
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.3f}"
    return env


def launch(jobs: Sequence[Job], parallel: int, log=print) -> None:
    """Run the jobs' commands, at most `parallel` at a time; records returncode and wall time.

    On Ctrl-C the children (which got the SIGINT too) are given 60 s to save and
    exit, then terminated; the interruption is re-raised.
    """
    pending = [j for j in jobs if not j.skipped]
    env = child_env(parallel)
    running: dict[subprocess.Popen, tuple[Job, float, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                job.run_dir.parent.mkdir(parents=True, exist_ok=True)
                fh = open(job.log, "w")
                fh.write("$ " + shlex.join(job.cmd) + "\n")
                fh.flush()
                log(f"start seed {job.seed}: {shlex.join(job.cmd[1:])}  (log: {job.log})")
                proc = subprocess.Popen(job.cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
                running[proc] = (job, time.perf_counter(), fh)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, start, fh = running.pop(proc)
                fh.close()
                job.returncode, job.wall_s = proc.returncode, time.perf_counter() - start
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {job.log})"
                log(f"seed {job.seed} {state} after {format_duration(job.wall_s)}")
    except KeyboardInterrupt:
        for proc, (job, start, fh) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            fh.close()
            job.returncode, job.wall_s = proc.returncode, time.perf_counter() - start
        raise


# ----------------------------------------------------------------------------- collection


def _scan(metrics: Path) -> tuple[dict[str, str], str | None]:
    """metrics.csv's last row, and its last non-empty return_mean100 (None without that column)."""
    last: dict[str, str] = {}
    mean100 = None
    with open(metrics, newline="") as f:
        for last in csv.DictReader(f):
            if last.get("return_mean100"):
                mean100 = last["return_mean100"]
    return last, mean100


def _num(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def collect_run(run_dir: str | Path, last: int = 10, plot_module=None) -> dict[str, Any]:
    """One run's row: final return (mean of the last `last` logged returns), episodes
    logged, last global_step / wall_time / sps, and `return_mean100` (the script's
    own mean over the last 100 episodes, when metrics.csv has that column);
    `status` says why a value is missing."""
    plot = plot_module or load_plot_module()
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run_dir": str(run_dir), "seed": None, "status": "ok", "final_return": None}
    config_path = run_dir / "config.json"
    if config_path.is_file():
        try:
            row["seed"] = json.loads(config_path.read_text()).get("seed")
        except (json.JSONDecodeError, AttributeError):
            pass
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        tail, mean100 = _scan(metrics)
        row["return_mean100"] = _num(mean100)
        row["global_step"] = _num(tail.get("global_step"))
        row["wall_time_s"] = _num(tail.get("wall_time"))
        row["sps"] = _num(tail.get("sps"))
    try:
        run = plot.load_run(run_dir)
    except plot.PlotError as err:
        row.update(status=str(err), episodes_logged=0)
        return row
    tail_returns = run.returns[-last:]
    row.update(
        final_return=float(sum(tail_returns) / len(tail_returns)),
        episodes_logged=int(run.returns.size),
        last_k=int(len(tail_returns)),
    )
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std (ddof=1), min, max of final returns over the runs that have one."""
    finals = [r["final_return"] for r in rows if r.get("final_return") is not None]
    mean100 = [r["return_mean100"] for r in rows if r.get("return_mean100") is not None]
    walls = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
    return {
        "runs": len(rows),
        "runs_with_returns": len(finals),
        "final_return_mean": statistics.fmean(finals) if finals else None,
        "final_return_std": statistics.stdev(finals) if len(finals) > 1 else None,
        "final_return_min": min(finals) if finals else None,
        "final_return_max": max(finals) if finals else None,
        "return_mean100_mean": statistics.fmean(mean100) if mean100 else None,
        "wall_s_mean": statistics.fmean(walls) if walls else None,
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    spread = f" ± {s['final_return_std']:.1f} (std over {s['runs_with_returns']} seeds)" if s["final_return_std"] is not None else ""
    lines = [
        f"# Learning: {doc['algo']} on {doc['env']}, {doc['total_timesteps']:,} env steps",
        "",
        f"**Machine:** {doc['machine_summary']}",
        "",
        f"Command per seed: `{doc['command']}`"
        if doc.get("command")
        else f"Runs collected from `{doc.get('out_dir')}` (not launched by this invocation).",
        "",
        f"Final return = {doc['final_return_definition']}.",
        "",
        f"**Final return: {_f(s['final_return_mean'])}{spread}; min {_f(s['final_return_min'])}, max {_f(s['final_return_max'])}.**"
        + (f" Mean over seeds of the last-100-episode mean: {_f(s['return_mean100_mean'])}." if s.get("return_mean100_mean") is not None else ""),
        "",
        "| seed | status | final return | last-100-episode mean | returns logged | env steps | wall time | training time (metrics.csv wall_time) | last SPS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        status = r["status"] if r.get("returncode") in (None, 0) else f"exit {r['returncode']}: {r['status']}"
        lines.append(
            f"| {r.get('seed', '-')} | {status.replace('|', '/')} | {_f(r.get('final_return'))} | {_f(r.get('return_mean100'))} | "
            f"{r.get('episodes_logged', 0)} | "
            f"{_f(r.get('global_step'), 0)} | {format_duration(r.get('wall_s'))} | {format_duration(r.get('wall_time_s'))} | "
            f"{_f(r.get('sps'), 0)} |"
        )
    lines += [
        "",
        "Wall time: from process start to exit (the run's own metrics.csv clock for runs not launched by this "
        "invocation). Last SPS: the sps column of the last metrics.csv row. Last-100-episode mean: the "
        "return_mean100 column the training script logs, where it has one.",
    ]
    if doc.get("distinct_configs", 1) > 1:
        lines += ["", f"**Warning:** these runs have {doc['distinct_configs']} different configs (not only the seed)."]
    if doc.get("curves"):
        lines += ["", f"![learning curves]({Path(doc['curves']).name})"]
    lines.append("")
    return "\n".join(lines)


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _consensus(configs: Sequence[dict[str, Any]], keys: Sequence[str], default: Any) -> Any:
    """The value all configs give for the first of `keys` they have, or `default` if they disagree."""
    values = {json.dumps(next((c[k] for k in keys if k in c), None)) for c in configs}
    if len(values) == 1:
        value = json.loads(values.pop())
        return default if value is None else value
    return default


def _command_template(args: Args, extra: Sequence[str]) -> str:
    cmd = [f"scripts/{args.algo}.py", "--env", args.env, "--seed", "SEED"]
    cmd += ["--total-timesteps", str(args.total_timesteps), "--run-dir", "OUT_DIR/seedSEED", *extra]
    return shlex.join(cmd)


def collect(
    args: Args, jobs: Sequence[Job], extra: Sequence[str], results_dir: str | Path, log=print
) -> dict[str, Any]:
    """Read every job's run directory, write <name>.json/.md (and .png), return the document."""
    plot = load_plot_module()
    rows = []
    for job in jobs:
        row = collect_run(job.run_dir, args.last, plot)
        row["seed"] = job.seed if row["seed"] is None else row["seed"]
        row["returncode"], row["wall_s"], row["log"] = job.returncode, job.wall_s, str(job.log)
        if job.wall_s is None:  # not launched by us: fall back to the script's own clock
            row["wall_s"] = row.get("wall_time_s")
        rows.append(row)
    configs = [_read_config(job.run_dir) for job in jobs]
    groups = {json.dumps(plot.comparable_config(c), sort_keys=True, default=str) for c in configs if c}
    if len(groups) > 1:
        log(f"warning: these {len(jobs)} runs have {len(groups)} different configs (not only the seed); the summary mixes them.")
    if args.collect_only:  # describe the runs by what they say, not by this script's defaults
        args = dataclasses.replace(
            args,
            algo=_consensus(configs, ("algo", "algorithm"), args.algo),
            env=_consensus(configs, ("env", "env_id"), args.env),
            total_timesteps=_consensus(configs, ("total_timesteps",), args.total_timesteps),
        )
    desc = machine.describe()
    name = args.name or f"learning_{_stem(args.algo)}_{_stem(args.env)}"
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "schema": 1,
        "algo": args.algo,
        "env": args.env,
        "total_timesteps": args.total_timesteps,
        "seeds": [j.seed for j in jobs],
        "extra_args": list(extra),
        "command": None if args.collect_only else _command_template(args, extra),
        "out_dir": str(jobs[0].run_dir.parent) if jobs else None,
        "final_return_definition": f"mean of the last {args.last} logged episode_return values (metrics.csv rows with a return) of each run",
        "machine": desc,
        "machine_summary": machine.summary(desc),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "distinct_configs": len(groups),
        "runs": rows,
        "summary": summarize(rows),
        "curves": None,
    }
    plottable = [Path(r["run_dir"]) for r in rows if r.get("final_return") is not None]
    if args.plot and plottable:
        png = results / f"{name}.png"
        title = f"{args.algo} {args.env}, {args.total_timesteps:,} steps"
        doc["curves"] = str(plot.plot_runs(plottable, png, title=title))
    (results / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (results / f"{name}.md").write_text(to_markdown(doc))
    log(f"wrote {results / name}.json and .md" + (f" and {Path(doc['curves']).name}" if doc["curves"] else ""))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, unknown = tyro.cli(Args, args=argv, return_unknown_args=True, description=__doc__.split("\n\n")[0])
    extra = [*unknown, *passthrough]
    try:
        jobs, out_dir = plan(args, extra)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    interrupted = False
    if not args.collect_only:
        try:
            launch(jobs, args.parallel)
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: collecting what the runs wrote so far", file=sys.stderr)
    doc = collect(args, jobs, extra, args.results_dir)
    s = doc["summary"]
    if s["final_return_mean"] is not None:
        std = f" ± {s['final_return_std']:.2f}" if s["final_return_std"] is not None else ""
        print(f"final return over {s['runs_with_returns']}/{s['runs']} runs: {s['final_return_mean']:.2f}{std}")
    failed = [j.seed for j in jobs if j.returncode not in (None, 0)]
    if failed:
        print(f"error: seeds {failed} failed; their logs are under {out_dir / 'logs'}.", file=sys.stderr)
    return 130 if interrupted else (1 if failed or s["runs_with_returns"] == 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
