"""scripts/plot.py on fabricated run directories: grouping, labels, maths, errors, PNG."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_plot():
    name = "jaxatari_scripts_plot"  # the name benchmarks/learning.py loads it under
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "plot.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


plot = _load_plot()

BASE = {"algo": "ppo", "env": "Breakout-v5", "total_timesteps": 40_000, "lr": 2.5e-4}


def make_run(root: Path, name: str, config: dict, *, n: int = 40, slope: float = 1.0, seed: int = 0) -> Path:
    """A run directory as scripts/<algo>.py writes it: config.json and metrics.csv
    with every third episode_return empty and extra columns."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**config, "seed": seed, "run_dir": str(run)}))
    rng = np.random.default_rng(seed)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "update", "wall_time", "sps", "episode_return", "episode_length", "loss"])
        for i in range(n):
            step = (i + 1) * 1000
            ret = "" if i % 3 == 1 else f"{slope * step / 1000 + rng.normal():.3f}"
            w.writerow([step, i, f"{step / 500:.3f}", 500, ret, 120 if ret else "", 0.5])
    return run


@pytest.fixture
def four_runs(tmp_path):
    """2 configs (num_envs 8 and 64) x 2 seeds."""
    runs = []
    for num_envs, slope in ((8, 1.0), (64, 2.0)):
        for seed in (0, 1):
            cfg = {**BASE, "num_envs": num_envs, "versions": {"jax": f"0.{seed}"}}
            runs.append(make_run(tmp_path, f"ne{num_envs}_s{seed}", cfg, slope=slope, seed=seed))
    return runs


def test_png_from_two_configs_two_seeds(four_runs, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main([*map(str, four_runs), "--out", str(out), "--title", "test"]) == 0
    assert out.stat().st_size > 20_000  # two panels with lines and bands, not a blank canvas
    one = tmp_path / "steps.png"
    assert plot.main([*map(str, four_runs), "--out", str(one), "--x", "steps", "--band", "std", "--smooth", "1"]) == 0
    assert one.stat().st_size > 10_000


def test_parent_directory_stands_for_its_runs(four_runs, tmp_path):
    assert plot.expand_run_dirs([tmp_path]) == sorted(four_runs)
    assert plot.expand_run_dirs([four_runs[0]]) == [four_runs[0]]


def test_grouping_ignores_per_run_fields(four_runs):
    runs = [plot.load_run(p) for p in four_runs]
    groups = plot.group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 2]
    assert [g.config["num_envs"] for g in groups] == [8, 64]  # order of first appearance
    for g in groups:  # seed, run_dir and versions.* do not split groups
        assert not any(k in g.config for k in ("seed", "run_dir", "versions.jax"))


def test_grouping_ignores_fields_that_do_not_change_the_learning_problem():
    from jaxatari import configs
    from jaxatari.agents import a2c, bc, dqn, ppo

    for agent in (ppo, a2c, dqn, bc):  # plot.py reads the resumable fields from the source (without importing JAX)
        resumable = configs.resumable(agent.Config)
        assert plot.non_learning_keys(agent.ALGO) == {*resumable, "chunk_steps", "resume"} - {"total_timesteps"}
    a = {**BASE, "chunk_steps": 50_000, "checkpoint_every": 0, "keep": 3, "eval_every": 0, "num_threads": 0,
         "env_backend": "auto", "env_backend_used": "host", "devices": 1,
         "schedule": {"steps_per_update": 1024, "updates_per_chunk": 48, "num_chunks": 1}}
    b = {**a, "chunk_steps": 10_000, "checkpoint_every": 5000, "keep": 1,
         "eval_every": 1000, "num_threads": 4, "env_backend": "xla", "env_backend_used": "xla", "devices": 2,
         "schedule": {"steps_per_update": 1024, "updates_per_chunk": 9, "num_chunks": 8, "requested": 40_000}}
    c = {**a, "lr": 1e-3}
    d = {**a, "total_timesteps": 80_000}  # the lr decay stretches over it: another config
    runs = [plot.Run(Path(f"r{i}"), {**cfg, "seed": i}, np.ones(1), np.ones(1), np.ones(1))
            for i, cfg in enumerate((a, b, c, d))]
    groups = plot.group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    assert groups[0].config["schedule.steps_per_update"] == 1024  # derived from learning fields: kept
    assert plot.group_labels(groups) == ["ppo Breakout-v5 total_timesteps=40000 lr=0.00025 (2 seeds)",
                                         "ppo Breakout-v5 total_timesteps=40000 lr=0.001 (1 seed)",
                                         "ppo Breakout-v5 total_timesteps=80000 lr=0.00025 (1 seed)"]


def test_labels_name_what_differs(four_runs):
    groups = plot.group_runs([plot.load_run(p) for p in four_runs])
    assert plot.group_labels(groups) == [
        "ppo Breakout-v5 num_envs=8 (2 seeds)",
        "ppo Breakout-v5 num_envs=64 (2 seeds)",
    ]
    assert plot.group_labels(groups[:1]) == ["ppo Breakout-v5 (2 seeds)"]


def _group(config, seeds=(0,)):
    runs = tuple(
        plot.Run(Path(f"r{s}"), {**config, "seed": s}, np.ones(1), np.ones(1), np.ones(1)) for s in seeds
    )
    return plot.Group(key=json.dumps(config, sort_keys=True), config=plot.comparable_config(config), runs=runs)


def test_labels_nested_keys_missing_keys_and_repeated_seeds():
    # Top-level differences hide the nested keys that follow from them.
    a = _group({**BASE, "num_envs": 8, "schedule": {"num_updates": 10}})
    b = _group({**BASE, "num_envs": 64, "schedule": {"num_updates": 2}})
    assert plot.group_labels([a, b]) == ["ppo Breakout-v5 num_envs=8 (1 seed)", "ppo Breakout-v5 num_envs=64 (1 seed)"]
    # Only nested keys differ: they are named by their last component.
    c = _group({**BASE, "net": {"torso": "nature"}})
    d = _group({**BASE, "net": {"torso": "impala"}})
    assert plot.group_labels([c, d]) == ["ppo Breakout-v5 torso=nature (1 seed)", "ppo Breakout-v5 torso=impala (1 seed)"]
    # A key present in one group only differs; the same seed twice is "runs", not "seeds".
    e = _group({**BASE, "network": "cfc"}, seeds=(0, 0))
    f = _group(dict(BASE))
    assert plot.group_labels([e, f]) == ["ppo Breakout-v5 network=cfc (2 runs)", "ppo Breakout-v5 (1 seed)"]


def test_aggregate_union_grid_without_extrapolation():
    # A: y = x on [0, 10]; B: y = 2 on [0, 5]. Grid [0, 5, 10]:
    # A = [0, 5, 10], B = [2, 2, nan] -> mean [1, 3.5, 10], min [0, 2, 10], max [2, 5, 10].
    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    b = (np.array([0.0, 5.0]), np.array([2.0, 2.0]))
    grid, mean, std, lo, hi, count = plot.aggregate([a, b], num_points=3)
    np.testing.assert_allclose(grid, [0, 5, 10])
    np.testing.assert_allclose(mean, [1, 3.5, 10])
    np.testing.assert_allclose(std, [1, 1.5, 0])
    np.testing.assert_allclose(lo, [0, 2, 10])
    np.testing.assert_allclose(hi, [2, 5, 10])
    np.testing.assert_array_equal(count, [2, 2, 1])


def make_population(root: Path, name: str, sweep: dict | None, *, agents: int = 2, n: int = 12) -> Path:
    """A population's run directory: one metrics.csv row per update and agent (the
    `agent` column), agent k returning 10 ** (k + 1); the sweep recorded in scale_out."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**BASE, "seed": 5, "run_dir": str(run), "num_agents": agents,
                                                 "sweep": sweep and f"lr={','.join(map(str, sweep['values']))}",
                                                 "scale_out": {"num_agents": agents, "sweep": sweep}}))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "update", "agent", "wall_time", "sps", "episode_return", "episode_length"])
        for i in range(n):
            for k in range(agents):
                w.writerow([(i + 1) * 1000, i, k, i + 1.0, 500, 10 ** (k + 1) if k or i > 2 else "", 100])
    return run


def test_a_population_plots_one_curve_per_agent_config(tmp_path):
    """Agents are runs of their own: a sweep's values are separate configs, and the
    agents of a plain population are the seeds of one config."""
    sweep = plot.runs_of(make_population(tmp_path, "sweep", {"name": "lr", "values": [1e-3, 3e-3]}))
    assert [(r.seed, r.config["lr"]) for r in sweep] == [(5, 1e-3), (6, 3e-3)]
    np.testing.assert_array_equal(sweep[0].returns, [10.0] * 9)  # agent 0's rows only, from its first return
    np.testing.assert_array_equal(sweep[1].returns, [100.0] * 12)
    groups = plot.group_runs(sweep)
    assert len(groups) == 2 and "lr=0.001" in plot.group_labels(groups)[0] and "lr=0.003" in plot.group_labels(groups)[1]
    seeds = plot.group_runs(plot.runs_of(make_population(tmp_path, "pop", None, agents=3)))
    assert len(seeds) == 1 and [r.seed for r in seeds[0].runs] == [5, 6, 7]
    assert plot.main([str(tmp_path / "sweep"), str(tmp_path / "pop"), "--out", str(tmp_path / "c.png")]) == 0


def test_smooth_matches_a_loop():
    y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    expected = [np.mean(y[max(0, i - 2) : i + 1]) for i in range(len(y))]
    np.testing.assert_allclose(plot.smooth(y, 3), expected)
    np.testing.assert_allclose(plot.smooth(y, 1), y)


def test_axis_formatting():
    assert [plot.format_steps(v) for v in (0, 500, 1234, 5000, 250_000, 1_500_000, 2e9)] == [
        "0", "500", "1.234k", "5k", "250k", "1.5M", "2B"]  # fmt: skip
    assert plot.time_unit(90) == ("seconds", 1.0)
    assert plot.time_unit(600) == ("minutes", 60.0)
    assert plot.time_unit(5 * 3600) == ("hours", 3600.0)


def test_read_metrics_keeps_rows_with_returns(tmp_path):
    run = make_run(tmp_path, "r", BASE, n=6)
    loaded = plot.load_run(run)
    np.testing.assert_array_equal(loaded.steps, [1000, 3000, 4000, 6000])  # rows 2 and 5 have no return
    np.testing.assert_allclose(loaded.wall_time, [2, 6, 8, 12])


def test_wall_time_of_rows_logged_together_is_spread_over_their_chunk():
    steps = np.array([100, 200, 300, 400, 500, 600, 700])
    wall = np.array([3.0, 3.0, 3.0, 4.0, 6.0, 6.0, np.nan])
    # chunk 1 ends at (300, 3.0) from (0, 0): 1, 2, 3; row 4 alone stays 4.0;
    # chunk 3 ends at (600, 6.0) from (400, 4.0): 5, 6; NaN stays NaN.
    np.testing.assert_allclose(plot.spread_wall_time(steps, wall), [1, 2, 3, 4, 5, 6, np.nan])
    increasing = np.array([0.5, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(plot.spread_wall_time(steps, increasing), increasing)


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(plot.PlotError, match=f"Run directory {tmp_path / 'missing'} does not exist"):
        plot.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(plot.PlotError, match=f"{tmp_path / 'empty'} has no metrics.csv"):
        plot.load_run(tmp_path / "empty")
    noret = tmp_path / "noret"
    noret.mkdir()
    (noret / "metrics.csv").write_text("global_step,wall_time,sps,episode_return,episode_length\n100,1.0,100,,\n")
    with pytest.raises(plot.PlotError, match=f"{noret / 'metrics.csv'} has no episode returns"):
        plot.load_run(noret)
    nocol = tmp_path / "nocol"
    nocol.mkdir()
    (nocol / "metrics.csv").write_text("global_step,sps\n100,5\n")
    with pytest.raises(plot.PlotError, match="has no column wall_time, episode_return"):
        plot.load_run(nocol)
    # The CLI turns them into one line on stderr and exit code 2 (as scripts/<algo>.py), no traceback.
    assert plot.main([str(noret), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "noret" in err
    assert not (tmp_path / "x.png").exists()


def test_runs_without_returns_yet_are_skipped(four_runs, tmp_path, capsys):
    noret = tmp_path / "starting"  # a run that has logged rows but finished no episode yet
    noret.mkdir()
    (noret / "metrics.csv").write_text("global_step,wall_time,sps,episode_return,episode_length\n100,1.0,100,,\n")
    out = tmp_path / "all.png"
    assert plot.main([str(tmp_path), "--out", str(out)]) == 0  # the parent expands to all five
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: skipping {noret}: ") and "\n" not in err and out.is_file()
    other = tmp_path / "other"
    shutil.copytree(noret, other)
    assert plot.main([str(noret), str(other), "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: None of the 2 runs has episode returns yet") and "\n" not in err


def test_bad_options_exit_2_before_any_run_is_read(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    for argv, expected in [
        (["--out", "p.xyz"], "--out 'p.xyz' has extension '.xyz', which is not an image format matplotlib"),
        (["--out", "curves"], "--out 'curves' has no extension"),
        (["--smooth", "0"], "--smooth 0 is not accepted: it must be an integer >= 1"),
    ]:
        assert plot.main([missing, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {expected}") and "\n" not in err, err
    with pytest.raises(plot.PlotError, match=r"accepted: .*\.pdf, .*\.png, .*\.svg"):
        plot.check_options("p.xyz")
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    usage = capsys.readouterr().out
    assert "RUN_DIR [RUN_DIR ...]" in usage and "(default: )" not in usage


def test_legend_covers_no_panel(four_runs):
    import matplotlib.pyplot as plt

    groups = plot.group_runs([plot.load_run(p) for p in four_runs])
    for x in ("both", "steps"):
        fig = plot.draw_groups(groups, x=x)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        assert len(legend.get_texts()) == 2
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:  # the axes with their tick labels and axis labels
            assert not box.overlaps(ax.get_tightbbox(renderer)), x
        plt.close(fig)


def _games(tmp_path, x="both", **kwargs):
    """CartPole (returns up to ~500) next to Breakout and Pong (tens), one seed each."""
    runs = [make_run(tmp_path, env, {**BASE, "env": env}, slope=slope)
            for env, slope in (("CartPole-v1", 12.0), ("Breakout-v5", 0.5), ("Pong-v5", 0.2))]
    groups = plot.group_runs([plot.load_run(p) for p in runs])
    return plot.draw_groups(groups, x=x, smooth_window=1, **kwargs)


def test_one_row_of_panels_per_game(tmp_path):
    import matplotlib.pyplot as plt

    for x, panels in (("both", 2), ("steps", 1)):
        fig = _games(tmp_path / x, x=x)
        try:
            grid = fig.axes[0].get_gridspec()
            assert (grid.nrows, grid.ncols) == (3, panels) and len(fig.axes) == 3 * panels
            titles = [ax.get_title() for ax in fig.axes]
            assert titles == [g for g in ("CartPole-v1", "Breakout-v5", "Pong-v5") for _ in range(panels)]
            tops = [ax.get_ylim()[1] for ax in fig.axes[::panels]]
            assert tops[0] > 400 and tops[1] < 30 and tops[2] < 15, tops  # each game its own y-axis
            assert all(ax.get_ylim() == fig.axes[i - i % panels].get_ylim() for i, ax in enumerate(fig.axes))
        finally:
            plt.close(fig)
    fig = _games(tmp_path / "one", x="steps", per_game=False)  # --no-per-game: every game on one axis
    assert len(fig.axes) == 1 and fig.axes[0].get_ylim()[1] > 400
    plt.close(fig)
    out = tmp_path / "games.png"
    assert plot.main([str(tmp_path / "both"), "--out", str(out)]) == 0 and out.stat().st_size > 20_000


def test_step_tick_labels_share_one_style(tmp_path):
    import matplotlib.pyplot as plt

    fig = _games(tmp_path, x="steps")  # steps 1,000 .. 40,000: ticks at 0, 5,000, 10,000 ...
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert "5k" in texts and "10k" in texts, texts
            assert all(re.fullmatch(r"0|[1-9]\d{0,2}|\d+(\.\d+)?[kMB]", t) for t in texts), texts
    finally:
        plt.close(fig)
