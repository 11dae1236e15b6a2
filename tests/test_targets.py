"""benchmarks/targets.py (the speed-target scorecard) and benchmarks/gpu_session.sh (the bounded GPU call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import targets  # noqa: E402

GPU = {"usable_cores": 16, "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}
KIND = "nvidia-h100-80gb-hbm3-16core"


def _row(name, sps, envs=64, threads=16, ceiling=40_000.0):
    return {"name": name, "status": "ok", "sps": sps, "num_envs": envs, "num_threads": threads, "ceiling_sps": ceiling,
            "ceiling_row": "async envs=32 batch=16", "fraction_of_ceiling": sps / ceiling}  # fmt: skip


def write(d: Path, name: str, doc: dict) -> None:
    (d / name).write_text(json.dumps(doc))


def gpu_results(d: Path) -> None:
    write(d, f"throughput_{KIND}.json", {"kind": KIND, "machine": GPU, "machine_summary": "an H100 box", "algorithms": [
        _row("ppo", 31_000.0), _row("ppo", 20_000.0, envs=32),
        _row("ppo-cfc", 26_000.0, envs=32), _row("ppo-cfc", 25_000.0), _row("ppo-cfc-nature", 23_000.0),
        _row("a2c", 39_000.0),  # not PPO: does not count for the PPO target
        _row("ppo-g2", 39_800.0),  # a removed speed feature's row (older files hold them): does not count
        {**_row("ppo", 39_500.0, envs=128), "status": "timed out"},  # not ok: ignored
        _row("ppo-cfc", 30_000.0),
        {"name": "dqn", "status": "skipped", "sps": None, "num_envs": 64, "num_threads": 16},
    ]})  # fmt: skip
    write(d, f"dqn_throughput_{KIND}_pong_v5.json", {"env": "Pong-v5", "machine": GPU, "rows": [
        {"kind": "python-loop", "num_envs": 1, "sps": 900.0, "speedup": 1.0},
        {"kind": "compiled", "num_envs": 1, "sps": 20_000.0, "speedup": 22.2},  # one env: not "parallel envs"
        {"kind": "compiled", "num_envs": 32, "sps": 10_800.0, "speedup": 12.0, "replay_ratio": 0.25},
        {"kind": "compiled", "num_envs": 8, "sps": 9_000.0, "speedup": 10.0},
    ]})  # fmt: skip
    write(d, f"dqn_throughput_{KIND}_cartpole_v1.json", {"env": "CartPole-v1", "machine": GPU, "rows": [
        {"kind": "compiled", "num_envs": 32, "sps": 1e6, "speedup": 50.0}]})  # classic control: listed, not scored


def test_scorecard_from_a_gpu_machines_files(tmp_path):
    gpu_results(tmp_path)
    done = [{"final_return": 400.0, "returncode": 0, "global_step": 9_994_240}] * 3  # rounded to whole updates
    learning = {"algo": "ppo", "env": "Breakout-v5", "machine": GPU, "extra_args": ["--num-envs", "64"],
                "total_timesteps": 10_000_000, "runs": done,
                "summary": {"final_return_mean": 412.5, "final_return_std": 30.0, "runs_with_returns": 3}}  # fmt: skip
    better = {**learning, "summary": {**learning["summary"], "final_return_mean": 900.0}}
    write(tmp_path, "learning_ppo_10M.json", learning)
    write(tmp_path, "learning_ppo_2M.json", {**better, "runs": [{**done[0], "global_step": 2_000_000}]})
    write(tmp_path, "learning_ppo_crashed.json", {**better, "runs": [*done[:2], {**done[0], "returncode": 1}]})
    write(tmp_path, "learning_ppo_cpu.json", {**better, "machine": {"usable_cores": 2}})  # another machine kind
    assert targets.kinds_in(tmp_path) == [KIND]
    card = targets.score(tmp_path, KIND)
    t = {r["name"]: r for r in card["targets"]}
    # PPO: the best feed-forward PPO row, 31k / 40k; a2c's 39k, ppo-g2's 39.8k and the timed-out 39.5k do not count.
    assert t["ppo_vs_ceiling"]["value"] == pytest.approx(31_000 / 40_000) and t["ppo_vs_ceiling"]["status"] == "met"
    assert t["ppo_vs_ceiling"]["detail"].startswith("ppo with 64 envs, 16 threads: 31,000 SPS vs ceiling 40,000")
    # CfC: the fastest CfC row (30k at 64 envs) against the fastest feed-forward PPO row at 64 envs (31k; ppo-g2
    # and the timed-out row do not count): 97%, met. At 32 envs 26k vs ppo's 20k, listed.
    assert t["cfc_vs_ppo"]["value"] == pytest.approx(30_000 / 31_000) and t["cfc_vs_ppo"]["status"] == "met"
    assert t["cfc_vs_ppo"]["detail"] == ("64 envs, 16 threads: ppo-cfc 30,000 vs ppo 31,000 SPS; ppo-cfc at "
                                         "32 envs: 130% of ppo; Nature CNN + CfC (ppo-cfc-nature) at 64 envs: 74% of ppo")
    # DQN: the best Atari row with more than one env (12x), not the one-env row or CartPole's 50x.
    assert t["dqn_vs_python_loop"]["value"] == 12.0 and t["dqn_vs_python_loop"]["status"] == "met"
    assert t["dqn_vs_python_loop"]["source"] == f"dqn_throughput_{KIND}_pong_v5.json"
    assert "CartPole-v1 32 envs 50.0x" in t["dqn_vs_python_loop"]["detail"]
    assert "Pong-v5 8 envs 10.0x" in t["dqn_vs_python_loop"]["detail"]
    # Learning: only runs that all finished >= 10M steps on this machine kind count.
    assert t["ppo_breakout_return"]["value"] == 412.5 and t["ppo_breakout_return"]["source"] == "learning_ppo_10M.json"
    assert t["ppo_breakout_return"]["detail"] == "3 seeds x 10,000,000 steps, extra args --num-envs 64: 412.5 +- 30.0"
    md = targets.to_markdown(card)
    assert "**Machine:** an H100 box" in md and "| 75% | 78% | met |" in md and "| 10.0x | 12.0x | met |" in md
    # Older files without the ceiling keys, and rows stepped through the host callback, still score.
    (tmp_path / f"throughput_{KIND}.json").write_text(json.dumps({"algorithms": [
        {"name": "ppo", "status": "ok", "sps": 100.0, "num_envs": 8, "fraction_of_ceiling": 0.5, "backend": "callback"},
        {"name": "ppo-cfc", "status": "ok", "sps": 90.0, "num_envs": 8}]}))  # fmt: skip
    t = {r["name"]: r for r in targets.score(tmp_path, KIND)["targets"]}
    assert t["ppo_vs_ceiling"]["detail"] == ("ppo with 8 envs, ? threads: 100 SPS vs ceiling - (row not recorded) "
                                             "(envs stepped through the host callback in ppo)")
    assert t["cfc_vs_ppo"]["value"] == pytest.approx(0.9) and "host callback in ppo" in t["cfc_vs_ppo"]["detail"]
    assert "Partial" not in md


def test_missed_and_not_measured_targets_and_a_partial_run(tmp_path):
    write(tmp_path, "throughput_cpu-2core.json", {"complete": False, "machine_summary": "2 cores", "algorithms": [
        _row(name, sps, envs=8, threads=2, ceiling=3_663.0)
        for name, sps in (("ppo", 151.0), ("ppo", 183.0), ("ppo-cfc", 10.0), ("ppo-cfc", 15.0))]})  # fmt: skip
    write(tmp_path, "throughput_cpu-2core_quick.json", {"algorithms": []})  # a variant, not a machine kind
    write(tmp_path, "dqn_throughput_cpu-2core_cartpole_v1.json", {"env": "CartPole-v1", "rows": [
        {"kind": "compiled", "num_envs": 8, "sps": 21_000.0, "speedup": 13.3}]})  # fmt: skip
    assert targets.kinds_in(tmp_path) == ["cpu-2core"]
    t = {r["name"]: r for r in targets.score(tmp_path, "cpu-2core")["targets"]}
    assert t["ppo_vs_ceiling"]["status"] == "missed" and t["ppo_vs_ceiling"]["value"] == pytest.approx(183 / 3663)
    # The fastest Conv-CfC row against the fastest feed-forward row (two runs of each).
    assert t["cfc_vs_ppo"]["status"] == "missed" and t["cfc_vs_ppo"]["value"] == pytest.approx(15 / 183)
    assert t["cfc_vs_ppo"]["detail"] == "8 envs, 2 threads: ppo-cfc 15 vs ppo 183 SPS"
    assert t["dqn_vs_python_loop"]["status"] == "not measured"
    assert "not Atari: CartPole-v1 8 envs 13.3x" in t["dqn_vs_python_loop"]["detail"]
    assert t["ppo_breakout_return"]["status"] == "not measured"
    md = targets.to_markdown(targets.score(tmp_path, "cpu-2core"))
    assert "**Partial:**" in md and "| 75% | 5% | missed |" in md and md.count("not measured") == 2


def test_cli_writes_one_card_per_kind_and_refuses_bad_input(tmp_path, capsys):
    gpu_results(tmp_path)
    write(tmp_path, "throughput_cpu-2core.json", {"machine_summary": "2 cores", "algorithms": []})
    assert targets.main(["--results-dir", str(tmp_path)]) == 0
    for kind in (KIND, "cpu-2core"):
        card = json.loads((tmp_path / f"targets_{kind}.json").read_text())
        assert card["kind"] == kind and len(card["targets"]) == len(targets.TARGETS)
        assert (tmp_path / f"targets_{kind}.md").read_text().startswith(f"# Speed targets on {kind}")
    assert targets.main(["--results-dir", str(tmp_path / "none")]) == 2
    assert "--results-dir" in capsys.readouterr().err
    assert targets.main(["--results-dir", str(tmp_path), "--kind", "tpu-v5"]) == 2
    assert f"no results for machine kind 'tpu-v5' in {tmp_path}; kinds found: cpu-2core, {KIND}." in \
        capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert targets.main(["--results-dir", str(empty)]) == 2
    assert "run benchmarks/throughput.py first" in capsys.readouterr().err
    # A session whose throughput step never wrote its file still gets its DQN comparison scored.
    dqn_only = tmp_path / "dqn_only"
    dqn_only.mkdir()
    (dqn_only / f"dqn_throughput_{KIND}_pong_v5.json").write_text((tmp_path / f"dqn_throughput_{KIND}_pong_v5.json").read_text())
    assert targets.main(["--results-dir", str(dqn_only)]) == 0
    card = json.loads((dqn_only / f"targets_{KIND}.json").read_text())
    assert [r["status"] for r in card["targets"]] == ["not measured", "not measured", "met", "not measured"]
    assert card["machine_summary"].startswith("unknown CPU, ") and "NVIDIA H100 80GB HBM3" in card["machine_summary"]


def test_the_repos_own_results_score(tmp_path):
    # The committed results: every kind with a throughput file scores without error, and each scored value
    # matches its status (the README quotes targets_cpu-2core.md).
    results = REPO / "benchmarks" / "results"
    for kind in targets.kinds_in(results):
        for r in targets.score(results, kind)["targets"]:
            assert r["status"] == ("not measured" if r["value"] is None else
                                   "met" if r["value"] >= r["threshold"] else "missed")  # fmt: skip
    committed = results / "targets_cpu-2core.md"
    assert committed.read_text() == targets.to_markdown(targets.score(results, "cpu-2core"))  # not stale


# ----------------------------------------------------------------------------- gpu_session.sh

STUB = textwrap.dedent('''\
    #!{python}
    """Stands in for python3 in gpu_session.sh: parses each benchmark's flags as the script passes them
    (and validates them as the benchmark would), records them, and measures nothing."""
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    args = sys.argv[1:]
    if args[0] == "-c":
        os.execv(sys.executable, [sys.executable, *args])
    import tyro
    from benchmarks import dqn_throughput, targets, throughput
    script, rest = os.path.basename(args[0]), args[1:]
    print("INVOKED AS", sys.argv[0])  # a venv's python is a link: the script must call it by that path
    if script == "throughput.py":
        a = tyro.cli(throughput.Args, args=rest)
        s = throughput.resolve(a, cores=16)
        print("PARSED throughput", json.dumps(dict(algos=s.algos, envs=s.algo_envs, budget=s.budget, out_dir=a.out_dir)))
        with open(os.path.join(a.out_dir, "throughput_stub-16core.json"), "w") as f:  # something to score
            json.dump({"machine_summary": "stub", "algorithms": []}, f)
    elif script == "dqn_throughput.py":
        a = tyro.cli(dqn_throughput.Args, args=rest)
        dqn_throughput.check(a)
        print("PARSED dqn", json.dumps(dict(envs=a.num_envs, seconds=a.seconds, out_dir=a.out_dir)))
    else:
        sys.exit(targets.main(rest))
''')


def test_gpu_session_passes_valid_flags_within_its_budget(tmp_path):
    stub = tmp_path / "python-stub"
    stub.write_text(STUB.replace("{python}", sys.executable))
    stub.chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(stub)
    out = tmp_path / "out"
    # PYTHON and OUT_DIR relative to where the script is started (it changes to the repo root itself).
    env = {**os.environ, "PYTHON": "bin/python", "ALGO_ENVS": "8 32"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "300", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / "session.log").read_text()
    assert log.count(f"INVOKED AS {tmp_path / 'bin' / 'python'}\n") == 3  # dqn, throughput, targets
    assert "== versions" in log and "| jax " in log and "devices [" in log
    dqn = json.loads(log.split("PARSED dqn ", 1)[1].splitlines()[0])
    assert dqn == {"envs": [32], "seconds": 10.0, "out_dir": str(out / "results")}
    tp = json.loads(log.split("PARSED throughput ", 1)[1].splitlines()[0])
    assert tp["algos"][:2] == ["ppo", "ppo-cfc"] and tp["envs"] == [8, 32] and tp["out_dir"] == str(out / "results")
    assert 200 <= tp["budget"] <= 285  # the budget less the versions and DQN steps and 15 s for the scorecard
    assert "# Speed targets on stub-16core" in log and (out / "results" / "targets_stub-16core.md").is_file()
    for bad, message in (("abc", "whole number of seconds, got 'abc'"), ("60", "at least 120 s")):
        proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", bad, str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr
