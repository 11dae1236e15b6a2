"""Score measured throughput and learning against jaxatari's speed targets, per machine.

    python benchmarks/targets.py                          # every machine with results in benchmarks/results/
    python benchmarks/targets.py --results-dir /tmp/gpu   # e.g. what benchmarks/gpu_session.sh brought back

Reads the files the other benchmarks write (nothing is measured here, so it runs in
a second and needs no jax) and writes `targets_<kind>.json` and `.md` beside them,
one pair per machine kind that has a `throughput_<kind>.json` or a DQN comparison:

| target | from | threshold |
|---|---|---|
| feed-forward PPO SPS / EnvPool ceiling at the same thread count | `throughput_<kind>.json`: the best `ok` ppo row | >= 0.75 |
| Conv-CfC PPO (`--network cfc`) SPS / feed-forward PPO SPS, same envs and threads | same file: the fastest ppo-cfc row against the fastest ppo row | >= 0.80 |
| compiled DQN with parallel envs / one-env Python-loop DQN, same replay ratio | `dqn_throughput_<kind>_<env>.json` for Atari games (the best compiled row of more than one env) | >= 10 |
| PPO on Breakout-v5: mean final return over seeds after >= 10M env steps | `learning_*.json` from `benchmarks/learning.py --algo ppo --env Breakout-v5`, every run finished | >= 400 |

Each target is "met", "missed" or "not measured" (no file, no usable row), with the
file and rows it came from. The PPO ratio is only half of its target: the env count
must also learn well, which is the learning row's job. The structural targets (no
host transfer inside a training chunk, no recompilation after the first) are not
scored here: tests pin them (`jax.transfer_guard("disallow")` and
`chex.assert_max_traces` in tests/agents/).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

try:  # imported as benchmarks.targets (tests) or run as a script
    from benchmarks import machine
except ImportError:
    import machine  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

PPO_ROWS = ("ppo",)
"""Feed-forward PPO rows of `throughput.py` that count for the ceiling target (older files hold rows of removed
speed features, which do not count)."""
LEARNING_MIN_STEPS = 10_000_000
"""A learning result counts for the Breakout target only at this many env steps or more."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    what: str
    threshold: float
    unit: str
    """How the measured value is printed: "ratio" (0.42 -> 42%), "x" (12.3x) or "return"."""


TARGETS = (
    Target("ppo_vs_ceiling", "feed-forward PPO SPS / EnvPool ceiling (same threads)", 0.75, "ratio"),
    Target("cfc_vs_ppo", "Conv-CfC PPO SPS / feed-forward PPO SPS (same envs, threads)", 0.80, "ratio"),
    Target("dqn_vs_python_loop", "compiled DQN, parallel envs / one-env Python-loop DQN (same replay ratio)", 10.0,
           "x"),
    Target("ppo_breakout_return", "PPO on Breakout-v5, mean final return over seeds at >= 10M env steps", 400.0,
           "return"),
)  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _result(target: Target, value: float | None, source: str | None, detail: str) -> dict[str, Any]:
    status = "not measured" if value is None else ("met" if value >= target.threshold else "missed")
    return {"name": target.name, "what": target.what, "threshold": target.threshold, "unit": target.unit,
            "value": value, "status": status, "source": source, "detail": detail}  # fmt: skip


def _envs(n: int) -> str:
    return f"{n} env" + ("" if n == 1 else "s")


def _rows(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The training rows that measured an SPS, with the keys scoring reads (older files may lack some)."""
    return [r for r in (doc or {}).get("algorithms", [])
            if r.get("status") == "ok" and r.get("sps") and r.get("name") and r.get("num_envs")]  # fmt: skip


def _callback(rows: Sequence[dict[str, Any]]) -> str:
    """A warning for rows whose envs were stepped through the host callback (EnvPool's xla() did not compile)."""
    names = [r["name"] for r in rows if r.get("backend") == "callback"]
    return f" (envs stepped through the host callback in {', '.join(names)})" if names else ""


def score_ppo_vs_ceiling(doc: dict[str, Any] | None, source: str | None) -> dict[str, Any]:
    """The feed-forward PPO row closest to the ceiling (the best ceiling row at its thread count)."""
    t = TARGETS[0]
    rows = [r for r in _rows(doc) if r["name"] in PPO_ROWS and r.get("fraction_of_ceiling")]
    if not rows:
        return _result(t, None, source, "no feed-forward PPO row with a ceiling at its thread count")
    best = max(rows, key=lambda r: r["fraction_of_ceiling"])
    others = "; ".join(f"{r['name']} {_envs(r['num_envs'])} {r['fraction_of_ceiling']:.0%}"
                       for r in rows if r is not best)  # fmt: skip
    ceiling = f"{best['ceiling_sps']:,.0f}" if best.get("ceiling_sps") else "-"
    detail = (f"{best['name']} with {_envs(best['num_envs'])}, {best.get('num_threads', '?')} threads: "
              f"{best['sps']:,.0f} SPS vs ceiling {ceiling} ({best.get('ceiling_row') or 'row not recorded'})"
              + _callback([best]) + (f"; others: {others}" if others else ""))
    return _result(t, best["fraction_of_ceiling"], source, detail)


CFC_ROWS = ("ppo-cfc",)
"""Conv-CfC PPO rows of `throughput.py` (the Nature-torso twin, ppo-cfc-nature, is listed apart)."""


def score_cfc_vs_ppo(doc: dict[str, Any] | None, source: str | None) -> dict[str, Any]:
    """The fastest Conv-CfC row (`CFC_ROWS`) against the fastest feed-forward PPO row (`PPO_ROWS`) at the same envs
    and threads."""
    t = TARGETS[1]
    rows = _rows(doc)
    fastest: dict[tuple[str, int, Any], dict[str, Any]] = {}
    for r in rows:
        group = "cfc" if r["name"] in CFC_ROWS else "ff" if r["name"] in PPO_ROWS else None
        key = (group, r["num_envs"], r.get("num_threads"))
        if group and (key not in fastest or r["sps"] > fastest[key]["sps"]):
            fastest[key] = r
    pairs = [(c, fastest[("ff", n, th)]) for (g, n, th), c in fastest.items() if g == "cfc" and ("ff", n, th) in fastest]
    if not pairs:
        return _result(t, None, source, "no Conv-CfC PPO row (ppo-cfc) with a feed-forward PPO row at the same envs "
                                        "and threads")
    cfc, ff = max(pairs, key=lambda p: p[0]["sps"])
    detail = (f"{_envs(cfc['num_envs'])}, {cfc.get('num_threads', '?')} threads: {cfc['name']} {cfc['sps']:,.0f} vs "
              f"{ff['name']} {ff['sps']:,.0f} SPS" + _callback([cfc, ff]))
    others = [f"{c['name']} at {_envs(c['num_envs'])}: {c['sps'] / f['sps']:.0%} of {f['name']}"
              for c, f in pairs if c is not cfc]  # fmt: skip
    ppo = {(r["num_envs"], r.get("num_threads")): r for r in rows if r["name"] == "ppo"}
    others += [f"Nature CNN + CfC (ppo-cfc-nature) at {_envs(r['num_envs'])}: "  # the recurrent core's own cost
               f"{r['sps'] / ppo[(r['num_envs'], r.get('num_threads'))]['sps']:.0%} of ppo"
               for r in rows if r["name"] == "ppo-cfc-nature" and (r["num_envs"], r.get("num_threads")) in ppo]
    return _result(t, cfc["sps"] / ff["sps"], source, detail + "".join(f"; {o}" for o in others))


def score_dqn(docs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The best compiled row of the Atari DQN comparisons (classic-control ones are listed, not scored)."""
    t = TARGETS[2]
    best, best_src, seen = None, None, []
    for source, doc in docs:
        env = doc.get("env", "?")
        rows = [r for r in doc.get("rows", []) if r.get("kind") == "compiled" and r.get("speedup")
                and r.get("num_envs", 1) > 1]  # parallel envs: the one-env compiled row is listed in the file only
        for r in rows:
            seen.append(f"{env} {_envs(r['num_envs'])} {r['speedup']:.1f}x")
        if str(env).endswith("-v5") and rows:
            top = max(rows, key=lambda r: r["speedup"])
            if best is None or top["speedup"] > best[1]["speedup"]:
                best, best_src = (env, top), source
    if best is None:
        note = f" (not Atari: {'; '.join(seen)})" if seen else ""
        return _result(t, None, None, "no Atari DQN comparison with a compiled and a Python-loop row" + note)
    env, r = best
    detail = (f"{env}, {_envs(r['num_envs'])}: {r['sps']:,.0f} SPS, replay ratio {r.get('replay_ratio')}; "
              f"all rows: {'; '.join(seen)}")
    return _result(t, r["speedup"], best_src, detail)


def _ran_to_the_end(d: dict[str, Any]) -> bool:
    """Every run that logged returns exited cleanly after at least 99% of LEARNING_MIN_STEPS env steps (the scripts
    round --total-timesteps to whole updates): learning.py also writes its files after a failed or interrupted run."""
    runs = [r for r in d.get("runs") or [] if r.get("final_return") is not None]
    return bool(runs) and all(r.get("returncode") == 0 and (r.get("global_step") or 0) >= 0.99 * LEARNING_MIN_STEPS
                              for r in runs)  # fmt: skip


def score_learning(docs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    t = TARGETS[3]
    usable = [(src, d) for src, d in docs if d.get("algo") == "ppo" and d.get("env") == "Breakout-v5"
              and (d.get("summary") or {}).get("final_return_mean") is not None and _ran_to_the_end(d)]  # fmt: skip
    if not usable:
        return _result(t, None, None, f"no benchmarks/learning.py result for ppo on Breakout-v5 whose runs all "
                                      f"finished >= {LEARNING_MIN_STEPS:,} env steps")
    src, d = max(usable, key=lambda p: p[1]["summary"]["final_return_mean"])
    s = d["summary"]
    n = s.get("runs_with_returns") or 0
    spread = f" +- {s['final_return_std']:.1f}" if s.get("final_return_std") is not None else ""
    detail = (f"{n} seed{'' if n == 1 else 's'} x {d.get('total_timesteps') or 0:,} steps, extra args "
              f"{' '.join(d.get('extra_args') or []) or 'none'}: {s['final_return_mean']:.1f}{spread}")
    return _result(t, s["final_return_mean"], src, detail)


def _summary(docs: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """The machine line of the first file that describes its machine (when there is no throughput file)."""
    return next((machine.summary(d["machine"]) for _, d in docs if isinstance(d.get("machine"), dict)), None)


def score(results_dir: Path, kind: str) -> dict[str, Any]:
    """The scorecard of machine `kind` from the files in `results_dir`."""
    tp_path = results_dir / f"throughput_{kind}.json"
    tp = _load(tp_path)
    tp_src = tp_path.name if tp else None
    dqn = [(p.name, d) for p in sorted(results_dir.glob(f"dqn_throughput_{kind}_*.json")) if (d := _load(p))]
    learning = [(p.name, d) for p in sorted(results_dir.glob("learning_*.json")) if (d := _load(p))
                and isinstance(d.get("machine"), dict) and machine.kind(d["machine"]) == kind]  # fmt: skip
    return {
        "schema": 1,
        "kind": kind,
        "machine_summary": (tp or {}).get("machine_summary") or _summary(dqn),
        "throughput_complete": (tp or {}).get("complete", True) if tp else None,
        "targets": [
            score_ppo_vs_ceiling(tp, tp_src),
            score_cfc_vs_ppo(tp, tp_src),
            score_dqn(dqn),
            score_learning(learning),
        ],
    }


def _value(r: dict[str, Any]) -> str:
    v = r["value"]
    if v is None:
        return "-"
    return {"ratio": f"{v:.0%}", "x": f"{v:.1f}x"}.get(r["unit"], f"{v:,.1f}")


def _threshold(r: dict[str, Any]) -> str:
    return _value({**r, "value": r["threshold"]})


def to_markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# Speed targets on {card['kind']}",
        "",
        f"**Machine:** {card['machine_summary'] or 'unknown (no throughput file)'}",
        "",
    ]
    if card["throughput_complete"] is False:
        lines += ["**Partial:** the throughput run these come from did not finish.", ""]
    lines += ["| target | threshold | measured | status | source | detail |", "|---|---:|---:|---|---|---|"]
    for r in card["targets"]:
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['what']} | {_threshold(r)} | {_value(r)} | {r['status']} | {r['source'] or '-'} | {detail} |")
    lines.append("")
    return "\n".join(lines)


def kinds_in(results_dir: Path) -> list[str]:
    """Machine kinds with a `throughput_<kind>.json` or a `dqn_throughput_<kind>_<env>.json` (kinds have no '_';
    variants like `throughput_<kind>_quick.json` do, and are not scored)."""
    kinds = {m.group(1) for p in results_dir.glob("throughput_*.json") if (m := re.fullmatch(r"throughput_([^_]+)\.json", p.name))}
    kinds |= {m.group(1) for p in results_dir.glob("dqn_throughput_*_*.json")
              if (m := re.fullmatch(r"dqn_throughput_([^_]+)_.+\.json", p.name))}  # fmt: skip
    return sorted(kinds)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the benchmarks wrote their files")
    parser.add_argument("--kind", action="append", help="machine kind(s) to score (default: every kind found)")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        print(f"error: --results-dir {results_dir} is not a directory.", file=sys.stderr)
        return 2
    found = kinds_in(results_dir)
    kinds = args.kind or found
    if not kinds:
        print(f"error: no throughput_<kind>.json or dqn_throughput_<kind>_<env>.json in {results_dir}; run "
              f"benchmarks/throughput.py first.", file=sys.stderr)
        return 2
    missing = [k for k in kinds if k not in found]
    if missing:
        print(f"error: no results for machine kind {missing[0]!r} in {results_dir}; kinds found: "
              f"{', '.join(found) or 'none'}.", file=sys.stderr)
        return 2
    for kind in kinds:
        card = score(results_dir, kind)
        md = to_markdown(card)
        (results_dir / f"targets_{kind}.json").write_text(json.dumps(card, indent=2) + "\n")
        (results_dir / f"targets_{kind}.md").write_text(md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
