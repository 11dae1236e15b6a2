"""Describe the machine a benchmark ran on, without personal information.

`describe()` returns a JSON-serialisable dict (CPU model, cores, memory, GPUs,
library versions, jax backend, UTC timestamp); `summary(d)` turns it into one
line; `kind(d)` into a short slug used in result file names
(`cpu-2core`, `nvidia-h200-16core`, `2xnvidia-a100-sxm4-80gb-64core`).

Nothing here fails when a piece of information is unavailable (no
/proc/cpuinfo, no nvidia-smi, jax without a GPU backend): the field is None
or an empty list. The hostname, user name and paths are never recorded.

    python benchmarks/machine.py          # prints the summary and the JSON
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("jax", "jaxlib", "envpool", "flax", "optax", "numpy")
"""Packages whose installed versions are recorded (None when not installed)."""


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), falling back to os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu() -> dict[str, Any]:
    """CPU model and core counts, from /proc/cpuinfo where Linux provides it."""
    model = None
    physical: set[tuple[str, str]] = set()
    cpuinfo = _read("/proc/cpuinfo")
    if cpuinfo:
        phys_id = core_id = None
        for line in cpuinfo.splitlines() + [""]:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model is None:
                model = value
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                core_id = value
            elif not key:  # blank line ends one processor's block
                if core_id is not None:
                    physical.add((phys_id or "0", core_id))
                phys_id = core_id = None
    model = model or platform.processor() or platform.machine() or None
    logical = os.cpu_count()
    usable = usable_cores()
    return {
        "cpu_model": model,
        "physical_cores": len(physical) or logical,
        "logical_cores": logical,
        "usable_cores": usable,
        "cpu_quota_cores": _cgroup_cpu_quota(),
        "arch": platform.machine() or None,
    }


def _cgroup_cpu_quota() -> float | None:
    """CPU limit of the container (cgroup v2 cpu.max or v1 cfs quota), or None."""
    text = _read("/sys/fs/cgroup/cpu.max")
    if text:
        quota, _, period = text.strip().partition(" ")
        if quota != "max" and period:
            return round(int(quota) / int(period), 2)
        return None
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return round(int(quota) / int(period), 2)
    return None


def _memory_gib() -> float | None:
    meminfo = _read("/proc/meminfo")
    if meminfo:
        match = re.search(r"^MemTotal:\s+(\d+)\s+kB", meminfo, re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 2**20, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def _nvidia_smi() -> list[dict[str, Any]]:
    """GPUs listed by nvidia-smi (name, memory, driver); [] when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            name, mem_mib, driver = parts
            try:
                mem = round(float(mem_mib) / 1024, 1)
            except ValueError:
                mem = None
            gpus.append({"name": name, "memory_gib": mem, "driver": driver})
    return gpus


#: Run by :func:`_jax` in a child process: jax's default backend and devices as JSON.
_JAX_QUERY = (
    "import json, jax; ds = jax.devices(); print(json.dumps({'jax_backend': jax.default_backend(), "
    "'jax_devices': [f\"{d.platform}:{getattr(d, 'device_kind', '')}\".rstrip(':') for d in ds]}))"
)


@functools.lru_cache(maxsize=1)
def _jax() -> dict[str, Any]:
    """jax's default backend and its devices; errors become a note, never an exception.

    Asked in a child process (without preallocation): initialising a GPU
    backend here would take most of its memory away from the training runs a
    benchmark launches as subprocesses afterwards. Asked once per process.
    """
    import sys

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        r = subprocess.run([sys.executable, "-c", _JAX_QUERY], capture_output=True, text=True, timeout=300, env=env)
        if r.returncode:
            lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
            raise RuntimeError(lines[-1])
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as err:  # noqa: BLE001 - a broken jax install is itself worth recording
        return {"jax_backend": None, "jax_devices": [], "jax_error": f"{type(err).__name__}: {err}"}


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe() -> dict[str, Any]:
    """Everything a benchmark result needs to be compared across machines.

    Keys: cpu_model, physical_cores, logical_cores, usable_cores (this
    process's CPU affinity), cpu_quota_cores (container limit or None), arch,
    memory_gib, gpus (list of {name, memory_gib, driver} from nvidia-smi),
    jax_backend, jax_devices, versions ({python, jax, jaxlib, envpool, flax,
    optax, numpy}), os, load_avg_1m (other work running while measuring),
    timestamp (UTC, ISO 8601). No hostname or user.
    """
    d: dict[str, Any] = {}
    d.update(_cpu())
    d["memory_gib"] = _memory_gib()
    d["gpus"] = _nvidia_smi()
    d.update(_jax())
    # jax can see accelerators that nvidia-smi cannot (or the reverse): keep both.
    if not d["gpus"]:
        d["gpus"] = [
            {"name": dev.split(":", 1)[1] if ":" in dev else dev, "memory_gib": None, "driver": None}
            for dev in d["jax_devices"]
            if dev.split(":")[0] in ("gpu", "cuda", "rocm")
        ]
    try:  # other work on the machine while measuring explains a lot of noise
        d["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        d["load_avg_1m"] = None
    d["versions"] = _versions()
    d["os"] = f"{platform.system()} {platform.release()}".strip() or None
    d["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return d


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def kind(d: dict[str, Any]) -> str:
    """Short machine slug for file names: `cpu-2core`, `nvidia-h200-16core`, `2xnvidia-a100-64core`."""
    cores = d.get("usable_cores") or d.get("logical_cores") or 0
    gpus = d.get("gpus") or []
    if not gpus:
        return f"cpu-{cores}core"
    name = _slug(gpus[0]["name"] or "gpu")
    count = f"{len(gpus)}x" if len(gpus) > 1 else ""
    return f"{count}{name}-{cores}core"


def summary(d: dict[str, Any]) -> str:
    """One line, e.g. `AMD EPYC, 2 cores (2 threads), 23.4 GiB RAM, no GPU | jax 0.10.2 (cpu), ...`."""
    cpu = d.get("cpu_model") or "unknown CPU"
    phys, logical = d.get("physical_cores"), d.get("logical_cores")
    cores = f"{phys} cores ({logical} threads)"
    usable = d.get("usable_cores")
    if usable and logical and usable < logical:
        cores += f", {usable} usable"
    if d.get("cpu_quota_cores"):
        cores += f", quota {d['cpu_quota_cores']:g}"
    mem = f"{d['memory_gib']:g} GiB RAM" if d.get("memory_gib") is not None else "unknown RAM"
    gpus = d.get("gpus") or []
    if gpus:
        names = [g["name"] for g in gpus]
        gpu = f"{len(names)}x {names[0]}" if len(set(names)) == 1 and len(names) > 1 else ", ".join(names)
    else:
        gpu = "no GPU"
    v = d.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("envpool", "flax") if v.get(k))
    jax_part = f"jax {v.get('jax')} ({d.get('jax_backend')})"
    return f"{cpu}, {cores}, {mem}, {gpu} | {jax_part}, {libs}, python {v.get('python')}"


if __name__ == "__main__":
    desc = describe()
    print(summary(desc))
    print(json.dumps(desc, indent=2))
