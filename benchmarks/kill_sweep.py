"""Kill runs at random moments (SIGKILL) and let the preemption loop finish them.

    python benchmarks/kill_sweep.py                              # 40 kills of CartPole PPO runs, ~8 min on 2 cores
    python benchmarks/kill_sweep.py --kills 8 --name _population --flags --num-agents 2

Each run starts the README's preemption loop: the original command while its
directory holds no ``config.json``, ``--resume`` after. Each start still running
after a random delay (uniform in ``[0, --max-delay]`` seconds, seeded) is
killed with SIGKILL, until a start finishes the run (exit 0): that ends the
run, and the next run begins until ``--kills`` kills have landed. Any other
exit is a stranding. Every run's ``metrics.csv`` (less the wall-clock columns)
and final params are compared with an uninterrupted run of the same flags. What the directory held at each kill (no config, no finished
checkpoint, a save under way, checkpoints) is tallied.

Writes ``kill_sweep_<kind>.json`` and ``.md`` under ``--out-dir`` (default
benchmarks/results/). The test of the same loop at chosen points (every stage
of a run's life) is tests/test_resume.py; this one samples the moments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "1",
         "--update-epochs", "1", "--total-timesteps", "4096", "--chunk-steps", "256", "--checkpoint-every", "512",
         "--no-tensorboard"]


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_time", "sps")} for r in csv.DictReader(f)]


def final_params(run_dir: Path):
    import orbax.checkpoint as ocp

    latest = run_dir / "checkpoints" / "latest"
    step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    return step, ocp.StandardCheckpointer().restore(latest / str(step) / "state")["params"]


def same_params(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def held(run_dir: Path) -> str:
    """What a kill left behind."""
    latest = run_dir / "checkpoints" / "latest"
    if not (run_dir / "config.json").exists():
        return "no config.json"
    names = [p.name for p in latest.iterdir()] if latest.is_dir() else []
    if any("tmp" in n for n in names):
        return "a save under way"
    return "checkpoints" if any(n.isdigit() for n in names) else "no finished checkpoint"


def start(run_dir: Path, flags: list[str]) -> subprocess.Popen:
    args = ["--resume", str(run_dir)] if (run_dir / "config.json").exists() else [*flags, "--run-dir", str(run_dir)]
    return subprocess.Popen([sys.executable, "scripts/ppo.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def one_run(run_dir: Path, flags: list[str], max_kills: int, max_delay: float, rng: random.Random) -> dict:
    """The preemption loop on one run: each start killed after a random delay while it runs, until one
    finishes the run (after ``max_kills`` kills the loop is left alone); or 4 starts that fail otherwise."""
    kills, where, starts, failed = 0, [], 0, []
    while True:
        proc, starts = start(run_dir, flags), starts + 1
        try:
            out, _ = proc.communicate(timeout=rng.uniform(0, max_delay) if kills < max_kills else None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            where.append(held(run_dir))
            continue
        if proc.returncode == 0:
            return dict(kills=kills, starts=starts, where=where, stranded=failed)
        failed.append(f"exit {proc.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        if len(failed) > 3:
            return dict(kills=kills, starts=starts, where=where, stranded=failed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=40, help="kills in all")
    ap.add_argument("--kills-per-run", type=int, default=8, help="at most; then the run is let finish")
    ap.add_argument("--max-delay", type=float, default=12.0, help="seconds; a start lives ~10 s on 2 cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more scripts/ppo.py flags")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="", help="appended to the result file names")
    a = ap.parse_args()
    flags, rng, t0 = [*FLAGS, *a.flags], random.Random(a.seed), time.time()
    with tempfile.TemporaryDirectory(prefix="kill-sweep-") as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run([sys.executable, "scripts/ppo.py", *flags, "--run-dir", str(ref)], cwd=ROOT, check=True,
                       capture_output=True)
        want, (ref_step, ref_params) = rows(ref), final_params(ref)
        results = []
        while sum(r["kills"] for r in results) < a.kills:
            i = len(results)
            d = Path(tmp) / f"run{i}"
            r = one_run(d, flags, a.kills_per_run, a.max_delay, rng)
            step, params = final_params(d) if (d / "checkpoints").is_dir() else (None, None)
            r.update(exact=(d / "metrics.csv").exists() and rows(d) == want and step == ref_step
                     and same_params(params, ref_params))
            results.append(r)
            print(f"run {i}: {r['kills']} kills, {r['starts']} starts, exact {r['exact']}, where {r['where']}"
                  + (f", stranded {r['stranded']}" if r["stranded"] else ""), flush=True)
    kills = sum(r["kills"] for r in results)
    resumed = sum(r["kills"] for r in results if not r["stranded"] and r["exact"])
    tally = {}
    for r in results:
        for w in r["where"]:
            tally[w] = tally.get(w, 0) + 1
    desc = machine.describe()
    out = dict(machine=desc, flags=flags, runs=results, kills=kills, resumed_exactly=resumed, where=tally,
               seconds=round(time.time() - t0, 1))
    stem = Path(a.out_dir) / f"kill_sweep_{machine.kind(desc)}{a.name}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [f"# Kill sweep: {machine.summary(desc)}", "", f"`scripts/ppo.py {' '.join(flags)}`", "",
             f"**{resumed}/{kills} kills resumed** (the loop finished the run, metrics.csv and params equal to "
             f"the uninterrupted run's), {len(results)} runs, kills after U(0, {a.max_delay:g}) s, "
             f"{out['seconds']:.0f} s in all.", "", "| what the directory held at the kill | kills |", "|---|---|"]
    lines += [f"| {w} | {n} |" for w, n in sorted(tally.items(), key=lambda x: -x[1])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
