"""Trainings in subprocesses for tests/test_parallel*.py: several fake CPU devices need
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts, and several
processes need ``jax.distributed``. Each training runs through ``driver.train`` and dumps its
final params to ``NAME.<process index>.npz``.

The tests call :func:`run_jobs` (many trainings in one worker process: one start and one JAX
import for all) and :func:`launch` (one training in several processes); as a script:

``python tests/_scale_worker.py ALGO OUT.npz [CLI flags ...]``: one training (each process of
a :func:`launch`); ``python tests/_scale_worker.py JOBS.json``: the jobs of that list in turn.
"""

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------


def job(tmp, name, algo, *args):
    """A training for :func:`run_jobs`: into ``tmp/name`` (a resume: into the run it resumes), its final params
    to ``tmp/name.0.npz``, its stdout and stderr to ``tmp/name.log``."""
    run_dir = [] if "--resume" in args else ["--run-dir", str(tmp / name)]
    return dict(algo=algo, out=str(tmp / f"{name}.npz"), argv=[*args, *run_dir])


def copy(tmp, src, dst):
    """A job of :func:`run_jobs` that copies run directory ``tmp/src`` to ``tmp/dst``."""
    return dict(copy=[str(tmp / src), str(tmp / dst)])


def run_jobs(tmp, jobs, devices, timeout=3000):
    """Run ``jobs`` in order in one worker process with ``devices`` fake CPU devices; a failed job leaves its
    traceback in its log and the next one runs."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, __file__, str(tmp / "jobs.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def trained(tmp, name):
    """The final params of the job ``name`` of :func:`run_jobs` (its log if it failed)."""
    path = tmp / f"{name}.0.npz"
    assert path.exists(), (tmp / f"{name}.log").read_text()[-5000:]
    return leaves(path)


def leaves(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def launch(tmp, name, algo, *args, processes=2, timeout=600):
    """Train as :func:`job` does, in ``processes`` processes of one device on localhost
    (``jax.distributed``, gloo); return each process's stdout and final params."""
    from jaxatari import parallel

    j = job(tmp, name, algo, *args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = parallel.launch_local([__file__, algo, j["out"], *j["argv"]], processes, tmp / f"{name}.logs",
                                 env=env, cwd=ROOT, timeout=timeout)
    for rc, out, err in done:
        assert rc == 0, out[-2000:] + err[-3000:]
    return [out for _, out, _ in done], [leaves(tmp / f"{name}.{i}.npz") for i in range(processes)]


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def train(algo, out, argv):
    from jaxatari import configs, driver, parallel

    mod = importlib.import_module(f"jaxatari.agents.{algo}")
    config = configs.cli(mod.Config, argv=argv)
    result = driver.train(mod.ALGORITHM, config)
    params = [parallel.fetch(x) for x in jax.tree.leaves(result.state.params)]
    np.savez(out.replace(".npz", f".{jax.process_index()}.npz"), *params)
    print("DONE", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)


@contextlib.contextmanager
def output_to(path):
    """This process's stdout and stderr (the file descriptors: print, logging, C++) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def work(path):
    with open(path) as f:
        jobs = json.load(f)
    for j in jobs:
        if "copy" in j:
            with contextlib.suppress(FileNotFoundError):  # its source failed: so will the jobs that need it
                shutil.copytree(*j["copy"])
            continue
        with output_to(j["out"].replace(".npz", ".log")):
            try:
                train(j["algo"], j["out"], j["argv"])
            except (Exception, SystemExit):  # SystemExit: a refused flag
                traceback.print_exc()


if __name__ == "__main__":
    if sys.argv[1].endswith(".json"):
        work(sys.argv[1])
    else:
        train(sys.argv[1], sys.argv[2], sys.argv[3:])
