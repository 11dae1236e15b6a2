"""Throughput of the scale-out modes (issue #9): one device, N devices of one
machine, P processes on localhost (``jax.distributed``), and a population of K
agents in one process.

Each mode is a real training run of ``scripts/<algo>.py`` in subprocesses (fake
CPU devices need ``XLA_FLAGS`` before JAX starts); SPS is the median over the
chunks after the first of the runner's per-chunk SPS (compilation excluded),
times K for a population (the runner counts one agent's steps).

    python benchmarks/parallel_throughput.py          # -> benchmarks/results/parallel_<machine>.{json,md}

On a CPU the "devices" are XLA's fake host devices sharing the same cores, so
the figures show the overhead of the machinery, not a speed-up. On a GPU
machine the multi-device mode uses every GPU, and the modes that need more
accelerators than the machine has (several devices, or one per process) are
recorded as skipped, with the reason. A mode that fails is recorded with its
error and the others still run; the files are rewritten after every row.
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
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine as _machine  # noqa: E402


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
            gpu_per_process: bool = False, timeout: int = 1200) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        base = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [f"scripts/{algo}.py", *flags, "--run-dir", str(run_dir), "--no-tensorboard"]
        if processes == 1:
            _run(cmd, base, timeout)
        else:
            from jaxatari import parallel

            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            own_gpu = (lambda i: {"CUDA_VISIBLE_DEVICES": visible[i] if visible else str(i)}) if gpu_per_process else None
            for rc, _, err in parallel.launch_local(cmd, processes, Path(tmp) / "logs", env=base, cwd=ROOT,
                                                    timeout=timeout, process_env=own_gpu):
                if rc:
                    raise RuntimeError(f"exit status {rc}\n{err[-3000:]}")
        return _sps(run_dir, agents)


#: Rows: name -> (script, extra flags).
ALGOS = {
    "ppo": ("ppo", []),
    "ppo-cfc": ("ppo", ["--network", "cfc"]),
    "a2c": ("a2c", []),
    "dqn": ("dqn", []),
}


def accelerators(desc: dict[str, Any]) -> int:
    """Accelerator devices of the machine :func:`machine.describe` saw (0 on a CPU-only machine)."""
    if desc.get("jax_backend") in (None, "cpu"):
        return 0
    return len(desc.get("jax_devices") or [])


def plan_modes(desc: dict[str, Any]) -> list[tuple[str, dict[str, int], list[str], str | None]]:
    """``(name, measure kwargs, extra flags, reason to skip or None)`` per mode on this machine.

    On a CPU every mode runs on fake host devices. On an accelerator machine the
    multi-device mode takes all its devices and needs two or more; several
    processes need one device each (they cannot share one GPU's memory).
    """
    acc, backend = accelerators(desc), desc.get("jax_backend")
    n = max(2, acc)
    if acc == 0 or (acc >= 2 and backend in ("gpu", "cuda")):
        processes_skip = None
    elif acc < 2:
        processes_skip = f"needs one {backend} device per process; this machine has {acc}"
    else:
        processes_skip = f"several local processes are set up for CPUs and NVIDIA GPUs, not {backend}"
    modes = [
        ("1 device", dict(devices=1), ["--devices", "1"], None),
        (f"{n} devices, one process", dict(devices=n), ["--devices", str(n)],
         None if acc == 0 or acc >= 2 else f"needs 2 or more {backend} devices; this machine has {acc}"),
        ("2 processes x 1 device (jax.distributed" + (", gloo)" if acc == 0 else ")"),
         dict(devices=1, processes=2, **({"gpu_per_process": True} if acc else {})), [], processes_skip),
        ("population of 4 agents, one process", dict(devices=1, agents=4), ["--num-agents", "4"], None),
    ]
    return modes


def markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    fake = accelerators(m) == 0
    lines = [f"# Scale-out throughput ({s['env']}, {s['num_envs']} envs per agent, global batch)", "",
             f"Machine: {_machine.summary(m)}" + ("; the devices are fake XLA host devices" if fake else ""), "",
             "| algo | mode | env steps / s |", "|---|---|---:|"]
    for r in doc["results"]:
        value = f"{r['sps']:,.0f}" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['algo']} | {r['mode']} | {value} |")
    lines.append("")
    if fake:
        lines.append("Fake CPU devices share the same cores: these figures measure the overhead of each mode, "
                     "not a speed-up. ")
    lines[-1] += "The population figure counts the steps of all agents."
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, measure_fn: Callable[..., float] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="Output path without extension "
                    "(default: benchmarks/results/parallel_<machine kind>).")
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--total-timesteps", type=int, default=40_960)
    ap.add_argument("--chunk-steps", type=int, default=8_192)
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    a = ap.parse_args(argv)
    for flag in ("num_envs", "total_timesteps", "chunk_steps"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(a, flag)} is not accepted: it must be >= 1.")
    from jaxatari import envs

    try:
        envs.validate_env_id(a.env)
    except envs.EnvError as e:
        ap.error(str(e))
    measure_fn = measure_fn or measure
    desc = _machine.describe()
    print(f"machine: {_machine.summary(desc)}", flush=True)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"parallel_{_machine.kind(desc)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ["--env", a.env, "--num-envs", str(a.num_envs), "--total-timesteps", str(a.total_timesteps),
             "--chunk-steps", str(a.chunk_steps)]
    doc: dict[str, Any] = dict(machine=desc, settings=dict(env=a.env, num_envs=a.num_envs,
                                                           total_timesteps=a.total_timesteps,
                                                           chunk_steps=a.chunk_steps), results=[])
    for algo in a.algos:
        script, algo_flags = ALGOS[algo]
        for name, kw, extra, skip in plan_modes(desc):
            row = dict(algo=algo, mode=name, env=a.env, num_envs=a.num_envs, **kw)
            if skip:
                row.update(status="skipped", reason=skip, sps=None)
            else:
                try:
                    row.update(status="ok", reason=None, sps=round(measure_fn(script, flags + algo_flags + extra, **kw), 1))
                except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
                    lines = str(err).strip().splitlines()
                    row.update(status="failed", reason=(lines[-1] if lines else type(err).__name__)[:300], sps=None)
            doc["results"].append(row)
            shown = f"{row['sps']:10,.0f} SPS" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            print(f"{algo:7s} {name:50s} {shown}", flush=True)
            out.with_suffix(".json").write_text(json.dumps(doc, indent=2))  # nothing measured is lost to a later row
            out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {out.with_suffix('.json')} and .md")
    return 0 if all(r["status"] != "failed" for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
