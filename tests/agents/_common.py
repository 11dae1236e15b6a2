"""What the agent tests share: reading metrics, running a script, the CartPole learning check."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_script(*args, timeout=600, cwd=ROOT, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def assert_cartpole_learns(script, run_dir, *flags):
    """``script`` with its CartPole defaults: the mean of the last 100 returns reaches 400 within 500k steps."""
    r = run_script(script, "--env", "CartPole-v1", "--run-dir", str(run_dir), "--no-tensorboard", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(Path(run_dir) / "metrics.csv")
    assert int(rows[-1]["global_step"]) <= 501_248
    best = max(float(row["return_mean100"]) for row in rows if row["return_mean100"])
    assert best >= 400, f"mean of the last 100 returns peaked at {best:.1f} (random play scores ~22)"
