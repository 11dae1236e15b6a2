"""Throughput of the scale-out modes (issue #9): one device, N devices of one
machine, P processes on localhost (``jax.distributed``), and a population of K
agents in one process.

Each mode is a real training run of ``scripts/<algo>.py`` in subprocesses (fake
CPU devices need ``XLA_FLAGS`` before JAX starts); SPS is the median over the
chunks after the first of the runner's per-chunk SPS (compilation excluded),
times K for a population (the runner counts one agent's steps).

    python benchmarks/parallel_throughput.py --out benchmarks/results/parallel_cpu-2core

On a CPU the "devices" are XLA's fake host devices sharing the same cores, so
the figures show the overhead of the machinery, not a speed-up; on a machine
with several GPUs run the same command (``--devices`` defaults to all).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sps(run_dir: Path, agents: int) -> float:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if agents > 1:
        rows = [r for r in rows if r["agent"] == "0"]
    by_chunk = []
    for r in rows:
        v = float(r["sps"])
        if not by_chunk or by_chunk[-1] != v:
            by_chunk.append(v)
    tail = by_chunk[1:] or by_chunk
    return statistics.median(tail) * agents


def _run(args: list[str], env: dict, timeout: int) -> None:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")


def measure(algo: str, flags: list[str], *, devices: int = 1, agents: int = 1, processes: int = 1,
            timeout: int = 1200) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        base = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [f"scripts/{algo}.py", *flags, "--run-dir", str(run_dir), "--no-tensorboard"]
        if processes == 1:
            _run(cmd, base, timeout)
        else:
            from jaxatari import parallel

            for rc, _, err in parallel.launch_local(cmd, processes, Path(tmp) / "logs", env=base, cwd=ROOT,
                                                    timeout=timeout):
                if rc:
                    raise RuntimeError(err[-3000:])
        return _sps(run_dir, agents)


#: Rows: name -> (script, extra flags).
ALGOS = {
    "ppo": ("ppo", []),
    "ppo-cfc": ("ppo", ["--network", "cfc"]),
    "a2c": ("a2c", []),
    "dqn": ("dqn", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/parallel_cpu-2core")
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--total-timesteps", type=int, default=40_960)
    ap.add_argument("--chunk-steps", type=int, default=8_192)
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    a = ap.parse_args()
    flags = ["--env", a.env, "--num-envs", str(a.num_envs), "--total-timesteps", str(a.total_timesteps),
             "--chunk-steps", str(a.chunk_steps)]
    modes = [
        ("1 device (default path)", dict(devices=1), ["--devices", "1"]),
        ("1 device, sharded path", dict(devices=1), ["--devices", "1", "--sharded"]),
        ("2 devices, one process", dict(devices=2), ["--devices", "2"]),
        ("2 processes x 1 device (jax.distributed, gloo)", dict(devices=1, processes=2), []),
        ("population of 4 agents, one process", dict(devices=1, agents=4), ["--num-agents", "4"]),
    ]
    results = []
    for algo in a.algos:
        script, algo_flags = ALGOS[algo]
        for name, kw, extra in modes:
            sps = measure(script, flags + algo_flags + extra, **kw)
            results.append(dict(algo=algo, mode=name, sps=round(sps, 1), env=a.env, num_envs=a.num_envs, **kw))
            print(f"{algo:4s} {name:50s} {sps:10,.0f} SPS", flush=True)
    sys.path.insert(0, str(ROOT))
    from benchmarks import machine as _machine

    machine = _machine.describe()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(machine=machine, results=results), indent=2))
    lines = [f"# Scale-out throughput ({a.env}, {a.num_envs} envs per agent, global batch; CPU, "
             f"{os.cpu_count()} cores, fake XLA host devices)", "",
             "| algo | mode | env steps / s |", "|---|---|---:|"]
    lines += [f"| {r['algo']} | {r['mode']} | {r['sps']:,.0f} |" for r in results]
    lines += ["", "Fake CPU devices share the same cores: these figures measure the overhead of each mode, "
              "not a speed-up. The population figure counts the steps of all agents."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
