"""benchmarks/: machine description, throughput structure (never speed), learning collection."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import learning, machine, throughput  # noqa: E402

# ----------------------------------------------------------------------------- machine

MACHINE_KEYS = {
    "cpu_model", "physical_cores", "logical_cores", "usable_cores", "cpu_quota_cores", "arch", "memory_gib",
    "gpus", "jax_backend", "jax_devices", "versions", "os", "load_avg_1m", "timestamp",
}  # fmt: skip


def test_describe_keys_and_no_hostname():
    d = machine.describe()
    assert MACHINE_KEYS <= set(d)
    assert {"python", "jax", "jaxlib", "envpool", "flax"} <= set(d["versions"])
    assert d["logical_cores"] >= 1 and d["physical_cores"] >= 1
    assert isinstance(d["gpus"], list)
    assert d["jax_backend"] in ("cpu", "gpu", "cuda", "rocm", "tpu")
    json.dumps(d)  # serialisable as is
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in json.dumps(d)
    line = machine.summary(d)
    assert "\n" not in line and d["versions"]["jax"] in line


def test_kind_and_summary_on_fabricated_machines():
    base = {"cpu_model": "AMD EPYC", "physical_cores": 2, "logical_cores": 2, "usable_cores": 2,
            "memory_gib": 23.5, "jax_backend": "cpu", "versions": {"jax": "0.10.2", "python": "3.11"}}  # fmt: skip
    assert machine.kind({**base, "gpus": []}) == "cpu-2core"
    assert "no GPU" in machine.summary({**base, "gpus": []})
    h200 = {"name": "NVIDIA H200", "memory_gib": 139.8, "driver": "560"}
    gpu = {**base, "usable_cores": 16, "gpus": [h200], "jax_backend": "gpu"}
    assert machine.kind(gpu) == "nvidia-h200-16core"
    assert machine.kind({**gpu, "gpus": [h200, h200]}) == "2xnvidia-h200-16core"
    assert "2x NVIDIA H200" in machine.summary({**gpu, "gpus": [h200, h200]})


def test_jax_is_asked_in_a_child_process_and_a_failure_is_recorded(monkeypatch):
    # The child keeps a GPU's memory free for the training runs a benchmark launches next.
    monkeypatch.setattr(machine, "_JAX_QUERY", "import os, sys; sys.exit('prealloc=' + os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])")
    machine._jax.cache_clear()  # asked once per process
    try:
        assert machine._jax() == {"jax_backend": None, "jax_devices": [], "jax_error": "RuntimeError: prealloc=false"}
    finally:
        machine._jax.cache_clear()


# ----------------------------------------------------------------------------- parallel_throughput

from benchmarks import parallel_throughput  # noqa: E402


def test_parallel_modes_fit_the_machine_and_every_row_is_kept(tmp_path, monkeypatch, capsys):
    cpu = {"jax_backend": "cpu", "jax_devices": ["cpu:cpu"], "gpus": []}
    one_gpu = {"jax_backend": "gpu", "jax_devices": ["gpu:NVIDIA H200"], "gpus": [{"name": "NVIDIA H200"}]}
    four_gpus = dict(one_gpu, jax_devices=["gpu:NVIDIA H200"] * 4)
    plan = {k: {name: (kw, extra, skip) for name, kw, extra, skip in parallel_throughput.plan_modes(d)}
            for k, d in (("cpu", cpu), ("one", one_gpu), ("four", four_gpus))}
    assert all(skip is None for _, _, skip in plan["cpu"].values())  # fake host devices
    assert plan["cpu"]["2 devices, one process"][1] == ["--devices", "2"]
    assert plan["one"]["2 devices, one process"][2] == "needs 2 or more gpu devices; this machine has 1"
    assert plan["one"]["2 processes x 1 device (jax.distributed)"][2] == "needs one gpu device per process; this machine has 1"
    assert plan["four"]["4 devices, one process"][:2] == ({"devices": 4}, ["--devices", "4"])
    assert plan["four"]["2 processes x 1 device (jax.distributed)"][0]["gpu_per_process"] is True

    # A 1-GPU machine: skipped modes and a failing one are recorded, and the rest still measured.
    monkeypatch.setattr(parallel_throughput._machine, "describe", lambda: dict(one_gpu, cpu_model="X", versions={}))
    calls = []

    def fake_measure(script, flags, **kw):
        calls.append((script, kw))
        if "--num-agents" in flags and script == "ppo":
            raise RuntimeError("scripts/ppo.py failed:\nTraceback ...\nValueError: boom")
        if "--num-agents" in flags:
            raise RuntimeError("")  # a process killed without a word on stderr
        return 1234.5

    out = tmp_path / "par"
    assert parallel_throughput.main(["--algos", "ppo", "a2c", "--out", str(out)], measure_fn=fake_measure) == 1
    doc = json.loads(out.with_suffix(".json").read_text())
    status = {(r["algo"], r["mode"]): (r["status"], r["sps"], r["reason"]) for r in doc["results"]}
    assert status["ppo", "1 device"] == status["a2c", "1 device"] == ("ok", 1234.5, None)
    assert status["ppo", "population of 4 agents, one process"] == ("failed", None, "ValueError: boom")
    assert status["a2c", "population of 4 agents, one process"] == ("failed", None, "RuntimeError")
    assert status["ppo", "2 devices, one process"][0] == "skipped"
    assert status["ppo", "2 processes x 1 device (jax.distributed)"][0] == "skipped"
    assert len(calls) == 4 and doc["settings"]["env"] == "CartPole-v1"
    md = out.with_suffix(".md").read_text()
    assert "| ppo | 2 devices, one process | skipped: needs 2 or more gpu devices" in md and "fake" not in md
    with pytest.raises(SystemExit):
        parallel_throughput.main(["--env", "Pongg-v5"])
    assert "Unknown env id 'Pongg-v5'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- throughput


README_QUICK_ROWS = ("ppo", "ppo-cfc", "a2c", "dqn")  # README: "--quick ... ppo, ppo-cfc, a2c, dqn"


def _results_state():
    """benchmarks/results/ as the checkout sees it: each file's size and mtime, and `git status` where git is."""
    results = REPO / "benchmarks" / "results"
    files = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(results.iterdir())}
    git = subprocess.run(["git", "status", "--porcelain", "benchmarks/results"], cwd=REPO, capture_output=True,
                         text=True)
    return files, git.stdout if git.returncode == 0 else None


def test_quick_throughput_writes_expected_structure(tmp_path):
    # Every row the README promises must be measured (SPS, not a timeout); the figures themselves are not
    # checked. On CartPole: the rows run each algorithm's benchmark as on Breakout, at a fifth of the
    # compile time (the Atari torsos are compiled by the script tests; the preset handed from the ceiling to
    # the rows is checked with fakes above). The suite shares the CPU with another test worker, so a generous
    # --algo-timeout replaces --quick's own (sized for a quiet machine; the settings test checks them). Short
    # timings keep it cheap: 0.1 s per ceiling row without warm-up, 0.1 s of training per row after compiling.
    # Without --out-dir, --quick writes under the temporary directory (TMPDIR here), never the committed
    # benchmarks/results/: the checkout stays clean.
    before = _results_state()
    proc = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", "--env", "CartPole-v1",
         "--seconds", "0.1", "--warmup", "0", "--algo-seconds", "0.1", "--algo-timeout", "150"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, TMPDIR=str(tmp_path)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _results_state() == before, "--quick wrote into benchmarks/results/"
    out = tmp_path / "jaxatari-benchmarks"
    kind = machine.kind(machine.describe())
    assert proc.stdout.strip().splitlines()[-1].startswith(f"wrote {out / f'throughput_{kind}_CartPole-v1_quick.json'}")
    doc = json.loads((out / f"throughput_{kind}_CartPole-v1_quick.json").read_text())
    assert MACHINE_KEYS <= set(doc["machine"]) and doc["kind"] == kind
    assert doc["settings"]["quick"] is True and doc["settings"]["env"] == "CartPole-v1" and doc["complete"] is True
    assert doc["settings"]["preset"] == "none" and all(r["preset"] == "none" for r in doc["algorithms"])
    modes = {r["mode"] for r in doc["ceiling"]}
    assert modes == {"sync", "async"}
    for r in doc["ceiling"]:
        assert r["sps"] > 0 and r["fps"] == pytest.approx(r["sps"] * r["frame_skip"])
        assert (r["batch_size"] == r["num_envs"]) == (r["mode"] == "sync")
    assert throughput.QUICK_ALGOS == README_QUICK_ROWS
    rows = {r["name"]: r for r in doc["algorithms"]}
    assert [r["name"] for r in doc["algorithms"]] == list(README_QUICK_ROWS)
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["status"], r["reason"], r.get("traceback"))
        assert isinstance(r["sps"], float) and r["sps"] > 0 and r["steps"] > 0 and r["fraction_of_ceiling"] > 0
        assert r["compile_s"] > 0 and r["num_envs"] == 4
    md = (out / f"throughput_{kind}_CartPole-v1_quick.md").read_text()
    assert doc["machine_summary"] in md and "| async |" in md and "EnvPool options (preset none)" in md
    assert all(f"| {name} | 4 | {doc['settings']['algo_threads']} | ok |" in md for name in README_QUICK_ROWS)
    # --quick's cut-down rows, recorded: DQN's shorter metric rows, PPO's shorter rollouts, PPO-CfC's longer timeout.
    assert rows["dqn"]["overrides"] == throughput.QUICK_OVERRIDES["jaxatari.agents.dqn"] == {"log_every": 100}
    assert rows["ppo-cfc"]["overrides"] == {"network": "cfc", "num_steps": 8} and rows["ppo-cfc"]["batch"] == 4 * 8
    assert rows["ppo"]["overrides"] == {"num_steps": 32} and rows["ppo"]["batch"] == 4 * 32
    assert all(r["timeout"] == 150 for r in rows.values())
    assert all(s in md for s in ("100-step metric rows (--quick)", "8-step rollouts (--quick)", "32-step rollouts"))


FAKE_ALGOS = {  # modules with an ALGORITHM (a tag here), run by the fake benchmark below
    "fake_ok": "ALGORITHM = 'ok'\n",
    "fake_raises": "ALGORITHM = 'raises'\n",
    "fake_nofn": "X = 1\n",
    "fake_badimport": "import no_such_module_anywhere\n",
    "fake_slow": "ALGORITHM = 'slow'\n",
    "fake_bench": "import time\n"
    "def benchmark(algo, env_id, num_envs, num_threads, seconds, **overrides):\n"
    "    if algo == 'raises':\n        raise RuntimeError('boom')\n"
    "    if algo == 'slow':\n        time.sleep(60)\n"
    "    return {'sps': 123.0, 'compile_s': 1.5, 'steps': 10, 'echo': [env_id, num_envs, num_threads, overrides]}\n",
}


def test_algorithm_rows_from_the_registry_contract(tmp_path, monkeypatch):
    for name, src in FAKE_ALGOS.items():
        (tmp_path / f"{name}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert throughput.TRAIN_SPS == "benchmarks.train_sps:benchmark"  # what the rows run unless told

    def row(module, timeout=30.0, **overrides):
        spec = throughput.AlgoSpec(module, overrides)
        return throughput.run_algorithm(
            module, spec, env_id="Pong-v5", num_envs=4, num_threads=2, seconds=0.1, timeout=timeout,
            bench="fake_bench:benchmark",
        )

    ok = row("fake_ok", network="cfc")
    assert ok["status"] == "ok" and ok["sps"] == 123.0 and ok["compile_s"] == 1.5 and ok["steps"] == 10
    assert ok["echo"] == ["Pong-v5", 4, 2, {"network": "cfc"}]
    sticky = throughput.run_algorithm("fake_ok", throughput.AlgoSpec("fake_ok", {"network": "cfc"}), env_id="Pong-v5",
                                      num_envs=4, num_threads=2, seconds=0.1, timeout=30.0, preset="machado",
                                      bench="fake_bench:benchmark")
    assert sticky["echo"][3] == {"network": "cfc", "preset": "machado"}  # the ceiling's env options, passed on
    assert sticky["overrides"] == {"network": "cfc"} and sticky["preset"] == "machado"
    failed = row("fake_raises")
    assert failed["status"] == "failed" and "RuntimeError: boom" in failed["reason"]
    nofn = row("fake_nofn")
    assert nofn["status"] == "not available" and "fake_nofn has no ALGORITHM" in nofn["reason"]
    bad = row("fake_badimport")
    assert bad["status"] == "not available" and "no_such_module_anywhere" in bad["reason"]
    missing = row("jaxatari.agents.no_such_algo")
    assert missing["status"] == "not available" and "does not exist" in missing["reason"]
    assert row("fake_slow", timeout=1.0)["status"] == "timed out"


def test_budget_cuts_timeouts_skips_rows_and_every_row_is_written(tmp_path, monkeypatch):
    # A fake clock: each training row takes 40 s. Budget 100 s, 10 s rows need 10 + BUDGET_ROW_MIN_S = 40 s left.
    clock = {"t": 0.0}
    monkeypatch.setattr(throughput.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(throughput.machine, "describe", lambda: {"usable_cores": 2, "gpus": []})
    monkeypatch.setattr(throughput.machine, "summary", lambda d: "fake machine")

    def ceiling(env, *, mode, num_envs, batch_size, num_threads, **_):
        clock["t"] += 2.0
        return {"mode": mode, "num_envs": num_envs, "batch_size": batch_size, "num_threads": num_threads,
                "sps": 1000.0, "fps": 4000.0, "frame_skip": 4, "sps_repeats": [1000.0], "make_s": 0.1}

    timeouts = []

    def train(name, spec, *, num_envs, num_threads, seconds, timeout, preset, **_):
        timeouts.append((name, timeout))
        clock["t"] += 40.0
        row = throughput.blank_row(name, spec, preset=preset, num_envs=num_envs, num_threads=num_threads,
                                   seconds=seconds, timeout=timeout)
        if name == "a2c":
            return {**row, "status": "timed out", "reason": "no result within its timeout"}
        return {**row, "status": "ok", "sps": 500.0, "compile_s": 1.0, "steps": 10, "backend": "callback"}

    monkeypatch.setattr(throughput, "measure_envpool", ceiling)
    monkeypatch.setattr(throughput, "run_algorithm", train)
    s = throughput.resolve(throughput.Args(threads=(2,), algos=("ppo", "a2c", "dqn"), algo_envs=(4,),
                                           algo_seconds=10.0, algo_timeout=70.0, budget=100.0), cores=2)
    written = []

    def on_row(doc):  # what main() does: rewrite both files after every row
        written.append(doc)
        throughput.write_results(doc, tmp_path)
        assert json.loads(next(tmp_path.glob("throughput_*.json")).read_text())["complete"] is False

    doc = throughput.run(s, log=lambda _: None, on_row=on_row)
    # 3 ceiling rows end at t=6: ppo starts with 94 s left (its own 70 s timeout), a2c at t=46 with 54 s left
    # (cut to 54 s), dqn at t=86 with 14 s < 40 s left: skipped, never started.
    assert timeouts == [("ppo", 70.0), ("a2c", pytest.approx(54.0))]
    rows = {r["name"]: r for r in doc["algorithms"]}
    assert rows["ppo"]["status"] == "ok" and rows["ppo"]["fraction_of_ceiling"] == 0.5
    assert rows["a2c"]["status"] == "timed out" and "54 s left of the --budget of 100 s" in rows["a2c"]["reason"]
    assert rows["dqn"]["status"] == "skipped" and rows["dqn"]["sps"] is None and rows["dqn"]["fraction_of_ceiling"] is None
    assert "not started: 14 s of the --budget of 100 s left, a row needs 40 s" == rows["dqn"]["reason"]
    assert set(rows["dqn"]) == set(rows["ppo"]) - {"backend"}  # a skipped row: the keys of a measured one
    assert [(len(d["ceiling"]), len(d["algorithms"])) for d in written] == [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert all(d["complete"] is False for d in written) and doc["complete"] is True
    partial = throughput.to_markdown(written[3])
    assert "**Partial:** written after 3 ceiling and 1 training row(s)" in partial
    final = throughput.to_markdown(doc)
    assert "Partial" not in final and "| dqn | 4 | 2 | skipped | - |" in final and "a --budget of 100 s" in final
    assert "host callback: EnvPool's xla() did not compile here" in final
    assert not list(tmp_path.glob("*.tmp"))  # atomic rewrites leave no temporary file behind
    with pytest.raises(ValueError, match="--budget must be a positive number of seconds, got 0"):
        throughput.resolve(throughput.Args(budget=0.0), cores=2)


def test_settings_defaults_and_validation():
    quick = throughput.resolve(throughput.Args(quick=True), cores=16)
    assert quick.threads == (2,) and quick.repeats == 1 and quick.algo_envs == (4,)
    assert quick.algos == throughput.QUICK_ALGOS and set(quick.algos) <= set(throughput.ALGORITHMS)
    assert quick.algo_timeout == throughput.QUICK_TIMEOUT and quick.algo_timeouts == throughput.QUICK_TIMEOUTS
    assert throughput.algo_spec("ppo-cfc", quick).overrides == {"network": "cfc", "num_steps": 8}
    assert throughput.algo_spec("ppo", quick).overrides == {"num_steps": 32}
    assert throughput.algo_spec("ppo-cfc-nature", quick).overrides == throughput.ALGORITHMS["ppo-cfc-nature"].overrides
    given = throughput.resolve(throughput.Args(quick=True, algo_timeout=5.0), cores=2)  # one timeout for every row
    assert given.algo_timeout == 5.0 and given.algo_timeouts == {}
    assert throughput.resolve(throughput.Args(), cores=16).algos == tuple(throughput.ALGORITHMS)
    assert throughput.resolve(throughput.Args(quick=True, algos=("ppo-cfc-nature",)), cores=2).algos == (
        "ppo-cfc-nature",)
    full = throughput.resolve(throughput.Args(), cores=16)
    assert full.threads == (16,) and full.algo_threads == 16 and full.algo_envs == (16,)
    assert full.algo_timeouts == {} and throughput.algo_spec("ppo-cfc", full).overrides == {"network": "cfc"}
    assert throughput.resolve(throughput.Args(threads=(1, 2)), cores=2).algo_envs == (8,)
    with pytest.raises(ValueError, match="--async-envs-per-thread must be at least 2"):
        throughput.resolve(throughput.Args(async_envs_per_thread=(2, 1)), cores=2)
    with pytest.raises(ValueError, match="Unknown algorithm 'sac'"):
        throughput.resolve(throughput.Args(algos=("sac",)), cores=2)
    with pytest.raises(ValueError, match="Breakout-v5"):
        throughput.resolve(throughput.Args(env="Breakout-v4x"), cores=2)
    assert full.preset == "nature" and throughput.resolve(throughput.Args(env="CartPole-v1"), cores=2).preset == "none"
    assert throughput.resolve(throughput.Args(preset="machado"), cores=2).preset == "machado"
    with pytest.raises(ValueError, match="Unknown preset 'sticky' for Breakout-v5; accepted: machado, nature"):
        throughput.resolve(throughput.Args(preset="sticky"), cores=2)


def test_ceiling_configs_cover_the_training_rows_once():
    s = throughput.resolve(throughput.Args(threads=(1, 2), algo_envs=(2, 8)), cores=2)
    assert throughput.ceiling_configs(s) == [
        ("sync", 1, 1, 1), ("async", 2, 1, 1),
        ("sync", 2, 2, 2), ("async", 4, 2, 2),
        ("sync", 8, 8, 2),
    ]  # fmt: skip
    s = throughput.resolve(throughput.Args(threads=(2,), sync_envs_per_thread=(1, 4), algos=()), cores=2)
    assert throughput.ceiling_configs(s) == [("sync", 2, 2, 2), ("sync", 8, 8, 2), ("async", 4, 2, 2)]


# ----------------------------------------------------------------------------- learning


def write_run(run: Path, returns, *, seed=0, mean100=None, extra_config=None) -> Path:
    """A fabricated run directory; `returns` may contain None for rows without a return."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"algo": "ppo", "env": "Pong-v5", "seed": seed, "total_timesteps": 1000, **(extra_config or {})})
    )
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "wall_time", "sps", "episode_return", "episode_length", "return_mean100"])
        for i, r in enumerate(returns):
            m100 = "" if mean100 is None or r is None else mean100
            w.writerow([(i + 1) * 100, (i + 1) * 2.0, 50, "" if r is None else r, 10, m100])
    return run


def test_collect_run_final_return_is_mean_of_last_k_logged(tmp_path):
    run = write_run(tmp_path / "s0", [1, 2, None, 3, 4, 5, None], mean100=2.5)
    row = learning.collect_run(run, last=3)
    assert row["final_return"] == pytest.approx((3 + 4 + 5) / 3)  # rows without a return are skipped
    assert row["episodes_logged"] == 5 and row["last_k"] == 3 and row["return_mean100"] == 2.5
    assert row["global_step"] == 700 and row["wall_time_s"] == 14.0 and row["seed"] == 0
    assert learning.collect_run(run, last=100)["final_return"] == pytest.approx(3.0)
    empty = learning.collect_run(write_run(tmp_path / "s1", [None, None]), last=3)
    assert empty["final_return"] is None and "no episode returns" in empty["status"]
    gone = learning.collect_run(tmp_path / "nope", last=3)
    assert gone["final_return"] is None and "does not exist" in gone["status"]
    summary = learning.summarize([row, {**row, "final_return": 6.0}, empty])
    assert summary["runs"] == 3 and summary["runs_with_returns"] == 2
    assert summary["final_return_mean"] == pytest.approx(5.0) and summary["final_return_std"] == pytest.approx(2**0.5)


def test_collect_only_tables_existing_runs(tmp_path, capsys):
    for seed, rets in ((0, [1, 2, 3]), (1, [3, 4, 5])):
        write_run(tmp_path / "runs" / f"seed{seed}", rets, seed=seed)
    res = tmp_path / "res"
    rc = learning.main(["--collect-only", "--out-dir", str(tmp_path / "runs"), "--results-dir", str(res), "--last", "2"])
    assert rc == 0
    doc = json.loads((res / "learning_ppo_Pong-v5.json").read_text())  # algo and env read from the runs
    assert [r["seed"] for r in doc["runs"]] == [0, 1]
    assert doc["summary"]["final_return_mean"] == pytest.approx((2.5 + 4.5) / 2)
    assert "last 2 logged episode_return" in doc["final_return_definition"]
    assert (res / "learning_ppo_Pong-v5.png").stat().st_size > 10_000
    assert "| 1 | ok | 4.5 |" in (res / "learning_ppo_Pong-v5.md").read_text()


FAKE_SCRIPT = textwrap.dedent(
    """
    import argparse, csv, json, os, pathlib, sys
    p = argparse.ArgumentParser()
    for flag in ("--env", "--seed", "--total-timesteps", "--run-dir", "--num-envs"):
        p.add_argument(flag)
    a = p.parse_args()
    if a.seed == "1":
        sys.exit("seed 1 crashes")
    run = pathlib.Path(a.run_dir)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": "fake", "env": a.env, "seed": int(a.seed),
        "total_timesteps": int(a.total_timesteps), "num_envs": int(a.num_envs),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "wall_time", "sps", "episode_return", "episode_length"])
        for i in range(1, 6):
            w.writerow([i * 10, i * 0.1, 100, i + int(a.seed), 7])
    """
)


def test_learning_launches_seeds_in_parallel_and_passes_args_through(tmp_path, monkeypatch):
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(var, raising=False)  # a GPU machine's own allocator settings are left alone (below)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    out, res = tmp_path / "runs", tmp_path / "res"
    argv = ["--algo", "fake", "--env", "Pong-v5", "--seeds", "0", "1", "2", "--parallel", "2",
            "--total-timesteps", "50", "--scripts-dir", str(scripts), "--out-dir", str(out),
            "--results-dir", str(res), "--last", "2", "--no-plot", "--", "--num-envs", "3"]  # fmt: skip
    assert learning.main(argv) == 1  # seed 1 failed
    doc = json.loads((res / "learning_fake_Pong-v5.json").read_text())
    by_seed = {r["seed"]: r for r in doc["runs"]}
    assert by_seed[0]["final_return"] == pytest.approx(4.5) and by_seed[2]["final_return"] == pytest.approx(6.5)
    assert by_seed[1]["returncode"] != 0 and by_seed[1]["final_return"] is None
    assert "seed 1 crashes" in (out / "logs" / "seed1.log").read_text()
    config = json.loads((out / "seed0" / "config.json").read_text())
    assert config["num_envs"] == 3
    assert config["mem_fraction"] == "0.450"  # two runs at once share a GPU's memory instead of taking 75% each
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in learning.child_env(1, {})
    assert learning.child_env(2, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert doc["extra_args"] == ["--num-envs", "3"] and doc["curves"] is None
    assert all(r["wall_s"] > 0 for r in doc["runs"])
    # Run directories are never overwritten.
    assert learning.main(argv) == 2


def test_learning_fails_clearly(tmp_path, capsys):
    assert learning.main(["--algo", "nope", "--scripts-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"No training script {tmp_path.resolve() / 'nope.py'} for --algo nope" in err
    assert learning.main(["--algo", "nope", "--scripts-dir", str(tmp_path), "--", "--seed", "3"]) == 2
    assert "--seed is set by learning.py" in capsys.readouterr().err
    assert learning.main(["--algo", "collect"]) == 2  # scripts/collect.py exists but trains nothing
    err = capsys.readouterr().err
    assert "for --algo collect; available: a2c, dqn, ppo, pqn." in err


# ----------------------------------------------------------------------------- breakdown

import math  # noqa: E402

from benchmarks import breakdown  # noqa: E402


def test_quick_breakdown_writes_expected_structure(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/breakdown.py", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind = machine.kind(machine.describe())
    doc = json.loads((tmp_path / f"breakdown_{kind}_quick.json").read_text())
    assert MACHINE_KEYS <= set(doc["machine"]) and doc["kind"] == kind
    assert doc["settings"]["quick"] is True and doc["settings"]["env"] == "CartPole-v1"
    assert [r["name"] for r in doc["algorithms"]] == list(breakdown.DEFAULT_ALGOS)
    for r in doc["algorithms"]:
        assert r["status"] == "ok", r.get("reason")
        assert set(r["components"]) == set(breakdown.COMPONENTS)
        d = r["derived"]
        for name, f in r["components"].items():  # structure, not timing: one quick window can put a part above 100%
            assert f["ms_per_update"] >= 0 and f["share"] == pytest.approx(
                f["ms_per_update"] / d["total"]["ms_per_update"]), (r["name"], name, f)
            assert f["us_per_env_step"] == pytest.approx(f["ms_per_update"] * 1e3 / r["steps_per_update"])
        assert set(d) == set(breakdown.DERIVED)
        assert all(math.isfinite(d[k]["ms_per_update"]) and math.isfinite(d[k]["share"]) for k in d)
        assert sum(d[k]["share"] for k in breakdown.DERIVED[:-1]) == pytest.approx(1.0)
        c = r["components"]
        assert d["total"]["ms_per_update"] == pytest.approx(c["chunk"]["ms_per_update"] + c["host"]["ms_per_update"])
    md = (tmp_path / f"breakdown_{kind}_quick.md").read_text()
    assert f"**Machine:** {doc['machine_summary']}" in md and "## How to read this" in md
    assert all(f"| {name} |" in md for name in breakdown.DEFAULT_ALGOS)


def test_breakdown_bad_input_and_derived_figures(capsys):
    assert breakdown.main(["--algos", "ppo", "sac"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Unknown algorithm 'sac'" in err and "ppo-cfc" in err
    assert breakdown.main(["--env", "Breakout-v4x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'Breakout-v4x'" in err and "Breakout-v5" in err
    # 2 updates per call of 100 env steps each; host: 10 updates per training chunk.
    timings = {name: {"call_s": [s, 3 * s], "compile_s": 1.0} for name, s in
               (("env", 0.004), ("act", 0.010), ("learn", 0.006), ("chunk", 0.018))}  # fmt: skip
    timings["host"] = {"chunk_s": [0.02, 0.02], "updates_per_training_chunk": 10}
    comp, derived = breakdown.summarize(timings, {"updates_per_call": 2, "steps_per_update": 100})
    assert comp["act"]["ms_per_update"] == pytest.approx(10.0) and comp["host"]["ms_per_update"] == pytest.approx(2.0)
    assert comp["env"]["us_per_env_step"] == pytest.approx(40.0)  # median 8 ms per call of 2 x 100 steps
    assert derived["total"]["ms_per_update"] == pytest.approx(20.0)
    assert derived["inference"]["ms_per_update"] == pytest.approx(6.0)
    assert derived["unexplained"]["ms_per_update"] == pytest.approx(18.0 - 10.0 - 6.0)
    assert sum(derived[k]["share"] for k in breakdown.DERIVED[:-1]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- dqn_throughput

from benchmarks import dqn_throughput  # noqa: E402


def test_dqn_throughput_rows_and_files(tmp_path):
    """Python-loop baseline and compiled rows on CartPole, written to the machine's and env's files."""
    a = dqn_throughput.Args(env="CartPole-v1", num_envs=(2,), seconds=0.3, buffer_size=2_000, learning_starts=200,
                            out_dir=str(tmp_path))
    doc = dqn_throughput.measure(a, log=lambda *_: None)
    assert [(r["kind"], r.get("num_envs")) for r in doc["rows"]] == [("python-loop", 1), ("compiled", 2)]
    for r in doc["rows"]:
        assert r["sps"] > 0 and r["updates_per_s"] > 0 and r["replay_ratio"] == doc["rows"][0]["replay_ratio"]
        assert r["speedup"] == pytest.approx(r["sps"] / doc["rows"][0]["sps"])
    js, md = dqn_throughput.write_results(doc, tmp_path)
    assert js.name == f"dqn_throughput_{machine.kind(doc['machine'])}_cartpole_v1.json"
    assert "| compiled | 2 |" in md.read_text() and json.loads(js.read_text())["rows"] == doc["rows"]


@pytest.mark.parametrize("argv,message", [
    (["--env", "Pongg-v5"], "Unknown env id 'Pongg-v5'. Did you mean 'Pong-v5'"),
    (["--num-envs", "8", "0"], "--num-envs 0 is not accepted: every env count must be >= 1."),
    (["--seconds", "0"], "--seconds 0.0 is not accepted: it must be > 0."),
    (["--dqn-preset", "fast"], "--dqn-preset 'fast' is not accepted; use one of nature, pong-fast, classic."),
    (["--env", "CartPole-v1", "--gradient-steps", "0"], "--gradient-steps 0 is not accepted"),
])
def test_dqn_throughput_refuses_bad_input_before_measuring(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(dqn_throughput, "measure", lambda *a, **k: pytest.fail("measured despite bad input"))
    assert dqn_throughput.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- cpu learner

from benchmarks import cpu_learner  # noqa: E402


def test_cpu_learner_flops_and_table():
    # Nature CNN as im2col matmuls (M x K x N per sample): conv1 400x256x32, conv2 81x512x64, conv3 49x576x64,
    # dense 1x3136x512; forward + backward = 3 forwards of 2 flops per multiply-add.
    per_sample = 400 * 256 * 32 + 81 * 512 * 64 + 49 * 576 * 64 + 3136 * 512
    assert cpu_learner.nature_flops(2) == 3 * 2 * 2 * per_sample
    doc = {"tag": "", "machine_summary": "fake", "settings": {"steps": 4, "repeats": 3},
           "dots": [{"shape": "1x1x1", "float32_gflops": 200.0, "bfloat16_gflops": 400.0},
                    {"shape": "2x2x2", "float32_gflops": 100.0, "bfloat16_gflops": 300.0}],
           "torsos": [{"torso": "nature", "batch": 256, "ms_per_step": 140.0, "samples_per_s": 1828.6, "gflops": 50.0},
                      {"torso": "convblock", "batch": 256, "ms_per_step": 2047.0, "samples_per_s": 125.1}]}
    md = cpu_learner.to_markdown(doc)
    assert "| nature | 256 | 140 | 1,829 | 50 | 25% |" in md  # against the best float32 dot, 200
    assert "| convblock | 256 | 2047 | 125 | - | - |" in md and "| 1x1x1 | 200 | 400 |" in md
