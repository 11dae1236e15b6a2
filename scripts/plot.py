"""Learning curves from run directories.

    python scripts/plot.py runs/ppo_Breakout_s0 runs/ppo_Breakout_s1 ... --out curves.png
    python scripts/plot.py runs/                # a parent: every sub-directory with a metrics.csv

Each run directory holds `config.json` and `metrics.csv` (columns at least
`global_step,wall_time,sps,episode_return,episode_length`; `episode_return`
empty on rows where no episode finished), as every `scripts/<algo>.py` writes.

Runs whose config.json is identical once the per-run fields (seed, run_dir,
timestamps, resume options: see `PER_RUN_KEYS`) and the fields that do not change
the learning problem (the algorithm's resumable config fields, e.g.
checkpoint_every, num_threads, plus chunk_steps and what the scripts derive
from them: see `non_learning_keys`; total_timesteps is kept, as learning-rate
decay and exploration stretch over it) are dropped form one group:
one colour, the mean over its seeds as a line and their spread as a band
(`--band minmax` by default, or `std` for mean +- one standard deviation),
each seed's curve first smoothed with a trailing mean over `--smooth` logged
returns and then linearly interpolated onto a common x grid (no
extrapolation). Where some seeds of a group stop earlier than others, the
line continues dashed, without a band, as the mean of the seeds that reach
that x. Legend labels name a group by algo, game and the config values that
differ between groups, e.g. "ppo Breakout-v5 num_envs=64 (3 seeds)".

One row of panels per game (each with its own y-axis, so CartPole's 0-500
does not flatten Atari returns; `--no-per-game` puts every game on one), two
panels per row by default (`--x both`): return against environment steps and
against wall-clock time (rows a script logged together at the end of one
compiled chunk, which share its end time, are spread over the chunk in
proportion to env steps); the legend sits below the panels. Renders headless
(Agg), without importing JAX.

A run with no finished episode yet is skipped with a warning; bad input (a
missing directory, an image format matplotlib cannot write, `--smooth 0`) is one
line on stderr and exit status 2, as for the training scripts.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
import tyro

PER_RUN_KEYS = frozenset(
    {
        "seed",
        "run_dir",
        "run_name",
        "exp_name",
        "timestamp",
        "start_time",
        "date",
        "resume",
        "resume_from",
        "resume_dir",
        "checkpoint_dir",
        "log_dir",
        "out_dir",
        "track",
        "wandb_project",
        "wandb_entity",
        "capture_video",
        "versions",
    }
)
"""config.json keys that vary between seeds of one experiment (or say nothing about
the experiment); ignored when grouping, at any nesting level."""

NON_LEARNING_EXTRA = ("chunk_steps", "resume")
"""Config fields that do not change the learning problem but are not resumable: `chunk_steps` (how many env steps one compiled call covers; at
most it rounds the end of training up to a whole chunk, as total_timesteps moves
it) and `resume` (which jaxatari.configs.cli always lets change)."""

DERIVED_NON_LEARNING_KEYS = frozenset(
    {
        "env_backend_used",  # from env_backend
        "schedule.updates_per_chunk",  # from chunk_steps (and total_timesteps)
        "schedule.num_chunks",
        "schedule.requested",  # total_timesteps as given
        "scale_out.devices_per_process",  # from devices, num_processes
        "scale_out.processes",
        "scale_out.devices",
    }
)
"""Dotted config.json keys the scripts derive from non-learning fields only."""

ALGO_KEYS = ("algo", "algorithm")
ENV_KEYS = ("env", "env_id")
MAX_LABEL_KEYS = 6


class PlotError(ValueError):
    """Bad input to the plotting code; the message is one sentence naming the path."""


class NoReturnsYet(PlotError):
    """A run directory whose metrics.csv has no finished episode yet."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory's episode returns.

    `steps`, `wall_time` and `returns` are aligned 1-D arrays over the
    metrics.csv rows that carry an episode_return, in file order.
    """

    path: Path
    config: dict[str, Any]
    steps: np.ndarray
    wall_time: np.ndarray
    returns: np.ndarray

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs that share a config up to the per-run keys."""

    key: str
    config: dict[str, Any]
    runs: tuple[Run, ...]


# ----------------------------------------------------------------------------- loading


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def spread_wall_time(steps: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Wall times with each run of equal values spread linearly in env steps.

    A training script that logs a whole compiled chunk of updates at once gives
    every row of the chunk the chunk's end time. Within a chunk the updates run
    at a steady pace, so row i of a chunk that ends at (s1, t1), after the
    previous chunk ended at (s0, t0) (or (0, 0)), is placed at
    t0 + (t1 - t0) * (s_i - s0) / (s1 - s0). Strictly increasing times are
    returned unchanged; NaNs stay NaN and restart the reckoning.
    """
    out = wall.astype(float).copy()
    prev_s, prev_t = 0.0, 0.0
    i, n = 0, len(wall)
    while i < n:
        j = i
        if np.isnan(wall[i]):
            prev_s, prev_t = steps[i], np.nan
            i += 1
            continue
        while j + 1 < n and wall[j + 1] == wall[i]:
            j += 1
        s1, t1 = steps[j], wall[j]
        if j > i and s1 > prev_s and np.isfinite(prev_t) and t1 >= prev_t:
            out[i : j + 1] = prev_t + (t1 - prev_t) * (steps[i : j + 1] - prev_s) / (s1 - prev_s)
        prev_s, prev_t = s1, t1
        i = j + 1
    return out


def read_metrics(path: Path, agent: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global_step, wall_time, episode_return) for the rows of metrics.csv with a
    return, wall_time spread within chunks logged at once (`spread_wall_time`);
    with `agent`, only that agent's rows of a population's file."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if not fields:
            raise NoReturnsYet(f"{path} has no episode returns yet (the file is empty).")
        missing = [c for c in ("global_step", "wall_time", "episode_return") if c not in fields]
        if missing:
            raise PlotError(f"{path} has no column {', '.join(missing)} (its header is: {','.join(fields) or 'empty'}).")
        steps, times, returns = [], [], []
        for row in reader:
            if agent is not None and row.get("agent") != str(agent):
                continue
            step = _float(row.get("global_step"))
            if step is None:
                continue
            wall, ret = _float(row.get("wall_time")), _float(row.get("episode_return"))
            steps.append(step)
            times.append(np.nan if wall is None else wall)
            returns.append(np.nan if ret is None else ret)
    steps_a, returns_a = np.asarray(steps, float), np.asarray(returns, float)
    times_a = spread_wall_time(steps_a, np.asarray(times, float))
    has_return = np.isfinite(returns_a)
    if not has_return.any():
        raise NoReturnsYet(f"{path} has no episode returns yet (episode_return is empty in every row).")
    return steps_a[has_return], times_a[has_return], returns_a[has_return]


def runs_of(run_dir: str | Path) -> list[Run]:
    """The runs of one run directory: itself, or one per agent of a population
    (``--num-agents``/``--sweep``: an ``agent`` column in metrics.csv), each with the
    population's config given the agent's seed and swept value, so that agents
    group and are labelled like lone runs.
    Agents without a finished episode yet are left out; PlotError as `load_run`."""
    path = Path(run_dir)
    run = load_run(path)  # also checks the directory, and that some agent finished an episode
    with open(path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f), [])
    if "agent" not in header:
        return [run]
    scale = run.config.get("scale_out") or {}
    num_agents = int(scale.get("num_agents") or run.config.get("num_agents") or 1)
    sweep = scale.get("sweep") or {}
    runs = []
    for k in range(num_agents):  # agent k is the run --seed seed+k (with its swept value) would be alone
        config = {key: v for key, v in run.config.items() if key not in ("scale_out", "sweep")}
        config.update(seed=(run.config.get("seed") or 0) + k, num_agents=1, run_dir=f"{path}#agent{k}")
        if sweep.get("name"):
            config[sweep["name"]] = sweep["values"][k]
        try:
            steps, times, returns = read_metrics(path / "metrics.csv", agent=k)
        except NoReturnsYet:
            continue
        order = np.argsort(steps, kind="stable")
        runs.append(Run(path=path, config=config, steps=steps[order], wall_time=times[order], returns=returns[order]))
    return runs


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory (a population's agents all together: see `runs_of`);
    raise PlotError naming the path when it is not a usable run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PlotError(f"Run directory {path} does not exist.")
    metrics = path / "metrics.csv"
    if not metrics.is_file():
        raise PlotError(f"{path} has no metrics.csv (is it a run directory written by scripts/<algo>.py?).")
    config_path = path / "config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise PlotError(f"{config_path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
        if not isinstance(config, dict):
            raise PlotError(f"{config_path} holds a {type(config).__name__}, not a JSON object.")
    else:
        config = {"run_dir_name": path.name}  # no config: the run is its own group
    steps, times, returns = read_metrics(metrics)
    order = np.argsort(steps, kind="stable")
    return Run(path=path, config=config, steps=steps[order], wall_time=times[order], returns=returns[order])


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from the command line; a directory without metrics.csv
    whose sub-directories have one stands for those sub-directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "metrics.csv").exists():
            children = sorted(c for c in p.iterdir() if (c / "metrics.csv").is_file())
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


# ----------------------------------------------------------------------------- grouping


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


@functools.lru_cache(maxsize=None)
def _parse(source: str) -> list:
    """``ast.parse(source).body``, asked twice if CPython 3.11 raises its spurious
    "AST constructor recursion depth mismatch" (seen once in 5 CI runs, under xdist)."""
    try:
        return ast.parse(source).body
    except SystemError:
        return ast.parse(source).body


def _config_classes(body: list) -> dict[str, tuple[list[str], dict[str, bool]]]:
    """``{class: (base names, {field: resumable})}`` of a module's classes: a field is
    resumable where its value is ``option(..., resumable=True)``."""
    out = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            own = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    kw = item.value.keywords if isinstance(item.value, ast.Call) else []
                    own[item.target.id] = any(k.arg == "resumable" and getattr(k.value, "value", False) is True
                                              for k in kw)
            out[node.name] = ([b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases], own)
    return out


def _fields(classes: dict, name: str) -> dict[str, bool]:
    """The fields of class ``name`` with those of its bases (a redeclared field takes the subclass's rule)."""
    bases, own = classes.get(name, ([], {}))
    out: dict[str, bool] = {}
    for base in reversed(bases):
        out.update(_fields(classes, base))
    return {**out, **own}


def _resumable_tuples() -> dict[str, tuple[str, ...]]:
    """``{ALGO: resumable fields}`` of every module in jaxatari/agents/, read from the
    source (``option(..., resumable=True)`` beside each field, in the agent's ``Config``
    and the shared field groups of jaxatari/configs.py) so that plotting never imports
    JAX; empty if jaxatari is not found."""
    spec = importlib.util.find_spec("jaxatari")
    if spec is None or not spec.submodule_search_locations:
        return {}
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        shared = _config_classes(_parse((package / "configs.py").read_text()))
    except (OSError, SyntaxError):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted((package / "agents").glob("*.py")):
        try:
            body = _parse(path.read_text())
        except SyntaxError:
            continue
        algo = [n.value.value for n in body if isinstance(n, ast.Assign) and len(n.targets) == 1
                and getattr(n.targets[0], "id", None) == "ALGO" and isinstance(n.value, ast.Constant)]
        classes = {**shared, **_config_classes(body)}
        if algo and isinstance(algo[0], str) and "Config" in classes:
            out[algo[0]] = tuple(k for k, v in _fields(classes, "Config").items() if v)
    return out


LEARNING_BUT_RESUMABLE = ("total_timesteps",)
"""Resumable fields that still shape learning: the learning-rate decay and (in a
fresh run) DQN's exploration schedule stretch over `total_timesteps`, so runs of
different lengths are different configs."""


def non_learning_keys(algo: Any) -> frozenset[str]:
    """Top-level config fields of `algo` that do not change the learning problem: its
    resumable config fields less `LEARNING_BUT_RESUMABLE`, plus
    `NON_LEARNING_EXTRA`; for an unknown or missing algo, the union over all agents."""
    tuples = _resumable_tuples()
    chosen = [tuples[algo]] if isinstance(algo, str) and algo in tuples else list(tuples.values())
    return frozenset(NON_LEARNING_EXTRA).union(*chosen) - frozenset(LEARNING_BUT_RESUMABLE)


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with nested dicts flattened to dotted keys, without per-run keys
    (`PER_RUN_KEYS`, at any level) and non-learning ones (`non_learning_keys` at the
    top level, `DERIVED_NON_LEARNING_KEYS`)."""
    skip = non_learning_keys(_first(config, ALGO_KEYS)[1])
    return {
        k: v
        for k, v in _flatten(config).items()
        if PER_RUN_KEYS.isdisjoint(k.split(".")) and k not in skip and k not in DERIVED_NON_LEARNING_KEYS
    }


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by comparable config, in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg = comparable_config(run.config)
        key = json.dumps(cfg, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        configs.setdefault(key, cfg)
    return [Group(key=k, config=configs[k], runs=tuple(v)) for k, v in groups.items()]


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _first(cfg: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in cfg:
            return k, cfg[k]
    return None, None


def _differing_keys(groups: Sequence[Group]) -> list[str]:
    """Keys whose value differs between ``groups`` (missing counts as differing);
    nested keys (``schedule.num_updates``) only when no top-level key differs."""
    all_keys: list[str] = []
    for g in groups:
        all_keys.extend(k for k in g.config if k not in all_keys)
    missing = object()
    differing = [
        k
        for k in all_keys
        if len({json.dumps(g.config.get(k, missing), sort_keys=True, default=repr) for g in groups}) > 1
    ]
    top_level = [k for k in differing if "." not in k]
    return top_level or differing


def group_labels(groups: Sequence[Group]) -> list[str]:
    """Legend labels: algo and env, then `key=value` for every key whose value
    differs between groups *of the same algo and env* (comparing the configs of
    different algorithms key by key names nothing useful), then the number of
    seeds. E.g. "ppo Breakout-v5 num_envs=64 (3 seeds)"."""

    def identity(g: Group) -> tuple[str, str]:
        return tuple(json.dumps(_first(g.config, keys)[1], default=repr) for keys in (ALGO_KEYS, ENV_KEYS))

    labels = []
    for g in groups:
        peers = [h for h in groups if identity(h) == identity(g)]
        differing = _differing_keys(peers) if len(peers) > 1 else []
        parts: list[str] = []
        shown: set[str] = set()
        for keys in (ALGO_KEYS, ENV_KEYS):
            k, v = _first(g.config, keys)
            if k is not None:
                parts.append(_fmt_value(v))
                shown.add(k)
        extra = [k for k in differing if k not in shown and k in g.config]
        pairs = list(dict.fromkeys(f"{k.rsplit('.', 1)[-1]}={_fmt_value(g.config[k])}" for k in extra))
        parts.extend(pairs[:MAX_LABEL_KEYS])
        if len(pairs) > MAX_LABEL_KEYS:
            parts.append(f"+{len(pairs) - MAX_LABEL_KEYS} more")
        if not parts:  # no config at all: name the run directory
            parts.append(g.runs[0].path.name)
        seeds = [r.seed for r in g.runs]
        distinct = None not in seeds and len(set(map(str, seeds))) == len(seeds)
        word = "seed" if distinct else "run"
        n = len(g.runs)
        labels.append(f"{' '.join(parts)} ({n} {word}{'s' if n != 1 else ''})")
    return labels


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); window <= 1 is the identity."""
    if window <= 1 or y.size == 0:
        return y.astype(float)
    c = np.cumsum(np.insert(y.astype(float), 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def aggregate(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], num_points: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate each (x, y) curve (x ascending) onto a common grid over the union
    of their x ranges; no extrapolation: outside a curve's range it is NaN.

    Returns (grid, mean, std, min, max, count) with NaN where no curve covers x.
    """
    curves = [(x[np.isfinite(x)], y[np.isfinite(x)]) for x, y in curves]
    curves = [(x, y) for x, y in curves if x.size]
    if not curves:
        empty = np.array([])
        return empty, empty, empty, empty, empty, empty
    lo = min(float(x[0]) for x, _ in curves)
    hi = max(float(x[-1]) for x, _ in curves)
    grid = np.linspace(lo, hi, num_points) if hi > lo else np.array([lo])
    ys = np.full((len(curves), grid.size), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        ys[i, inside] = np.interp(grid[inside], x, y)
    count = np.sum(np.isfinite(ys), axis=0)
    with warnings.catch_warnings():  # all-NaN columns: "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
        std = np.nanstd(ys, axis=0)
        ymin = np.nanmin(ys, axis=0)
        ymax = np.nanmax(ys, axis=0)
    return grid, mean, std, ymin, ymax, count


# ----------------------------------------------------------------------------- axes


def format_steps(x: float, _pos: Any = None) -> str:
    """500 -> '500'; 5000 -> '5k'; 250000 -> '250k'; 1500000 -> '1.5M': one style for every tick."""
    a = abs(x)
    if a >= 1e9:
        return f"{x / 1e9:g}B"
    if a >= 1e6:
        return f"{x / 1e6:g}M"
    if a >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:.0f}"


def time_unit(max_seconds: float) -> tuple[str, float]:
    """Unit name and divisor for a wall-time axis reaching max_seconds."""
    if max_seconds >= 2 * 3600:
        return "hours", 3600.0
    if max_seconds >= 120:
        return "minutes", 60.0
    return "seconds", 1.0


# ----------------------------------------------------------------------------- drawing


def image_formats() -> list[str]:
    """File extensions (without the dot) matplotlib can write, sorted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def check_options(out: str | Path, *, smooth_window: int = 10, dpi: int = 120) -> None:
    """Raise PlotError naming the bad value and what is accepted, before any run is read."""
    suffix = Path(out).suffix.lower()
    formats = image_formats()
    if suffix[1:] not in formats:
        got = f"has extension {suffix!r}" if suffix else "has no extension"
        raise PlotError(
            f"--out {str(out)!r} {got}, which is not an image format matplotlib can write; "
            f"accepted: {', '.join('.' + f for f in formats)}."
        )
    for flag, value in (("--smooth", smooth_window), ("--dpi", dpi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " (1 disables smoothing)" if flag == "--smooth" else ""
            raise PlotError(f"{flag} {value!r} is not accepted: it must be an integer >= 1{hint}.")


def draw_groups(
    groups: Sequence[Group],
    *,
    x: Literal["steps", "time", "both"] = "both",
    smooth_window: int = 10,
    band: Literal["minmax", "std", "none"] = "minmax",
    title: str | None = None,
    per_game: bool = True,
):
    """The matplotlib Figure of the groups' learning curves (see `plot_groups`): one row
    of panels per game (env id, in order of first appearance), each row with its own
    y-axis, or with `per_game=False` one row for all. The legend is a figure legend
    below the panels, so it covers no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = ["steps", "time"] if x == "both" else [x]
    labels = group_labels(groups)
    ncol = max(1, min(len(groups), len(panels)))
    legend_lines = -(-len(groups) // ncol) + 2  # the entries' rows and a title of up to two lines
    game_of = [_first(g.config, ENV_KEYS)[1] if per_game else None for g in groups]
    games = list(dict.fromkeys(json.dumps(v, default=repr) for v in game_of))
    row_of = [games.index(json.dumps(v, default=repr)) for v in game_of]
    fig, axes = plt.subplots(
        len(games),
        len(panels),
        figsize=(6.4 * len(panels), 0.8 + 3.6 * len(games) + 0.2 * legend_lines),
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_time = max(
        (float(np.nanmax(r.wall_time)) for g in groups for r in g.runs if np.isfinite(r.wall_time).any()),
        default=0.0,
    )
    unit, divisor = time_unit(max_time)
    notes: set[str] = set()
    handles: dict[str, Any] = {}  # label -> the first artist drawn for it, in any panel

    for (row, ax_row), (col, panel) in ((r, c) for r in enumerate(axes) for c in enumerate(panels)):
        ax = ax_row[col]
        game = next(v for v, r in zip(game_of, row_of) if r == row)
        if game is not None:
            ax.set_title(str(game))
        for i, (g, label) in enumerate(zip(groups, labels)):
            if row_of[i] != row:
                continue
            colour = colours[i % len(colours)] if len(groups) <= len(colours) else plt.cm.turbo(i / max(len(groups) - 1, 1))
            curves = []
            for r in g.runs:
                xs = r.steps if panel == "steps" else r.wall_time / divisor
                ys = smooth(r.returns, smooth_window)
                ok = np.isfinite(xs)
                xs, ys = xs[ok], ys[ok]
                order = np.argsort(xs, kind="stable")
                curves.append((xs[order], ys[order]))
            grid, mean, std, ymin, ymax, count = aggregate(curves)
            if grid.size == 0:
                continue
            if grid.size == 1:
                (line,) = ax.plot(grid, mean, "o", color=colour)
                handles.setdefault(label, line)
                continue
            full = count == len(curves)
            (line,) = ax.plot(grid, np.where(full, mean, np.nan), color=colour, lw=1.8)
            handles.setdefault(label, line)
            partial = (count > 0) & ~full
            if partial.any():  # dashed where only some seeds reach, joined to the solid part
                partial[:-1] |= partial[1:]
                partial[1:] |= partial[:-1].copy()
                ax.plot(grid, np.where(partial, mean, np.nan), color=colour, lw=1.0, ls="--", alpha=0.7)
                notes.add("dashed: not all seeds reach this far")
            if len(g.runs) > 1 and band != "none":
                lo, hi = (ymin, ymax) if band == "minmax" else (mean - std, mean + std)
                ax.fill_between(grid, lo, hi, where=full, color=colour, alpha=0.2, lw=0)
        if panel == "steps":
            ax.set_xlabel("environment steps")
            ax.xaxis.set_major_formatter(FuncFormatter(format_steps))
        else:
            ax.set_xlabel(f"wall time ({unit})")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    for ax_row in axes:
        ax_row[0].set_ylabel("episode return" + (f" (trailing mean of {smooth_window})" if smooth_window > 1 else ""))
    band_text = {"minmax": "band: min-max over seeds", "std": "band: mean ± 1 std over seeds", "none": ""}[band]
    legend_title = "line: mean over seeds" + (f"; {band_text}" if band_text else "")
    if notes:
        legend_title += "\n" + "; ".join(sorted(notes))
    shown = [label for label in labels if label in handles]
    fig.legend(
        [handles[label] for label in shown],
        shown,
        loc="outside lower center",
        ncol=ncol,
        title=legend_title,
        fontsize="small",
        title_fontsize="small",
    )
    if title:
        fig.suptitle(title)
    return fig


def plot_groups(
    groups: Sequence[Group],
    out: str | Path,
    *,
    x: Literal["steps", "time", "both"] = "both",
    smooth_window: int = 10,
    band: Literal["minmax", "std", "none"] = "minmax",
    title: str | None = None,
    dpi: int = 120,
    per_game: bool = True,
) -> Path:
    """Draw the groups' learning curves into `out` (any format matplotlib can write,
    picked by suffix: see `image_formats`)."""
    import matplotlib.pyplot as plt

    check_options(out, smooth_window=smooth_window, dpi=dpi)
    fig = draw_groups(groups, x=x, smooth_window=smooth_window, band=band, title=title, per_game=per_game)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def load_runs(run_dirs: Sequence[str | Path], warn: Callable[[str], None] = _stderr) -> list[Run]:
    """`load_run` for each of `expand_run_dirs(run_dirs)`, skipping the runs with no
    finished episode yet (one line each to `warn`). Raises PlotError for any other
    unusable run, or (one sentence, no warnings) when no run has returns."""
    if not run_dirs:
        raise PlotError("No run directories given; pass one or more directories that contain metrics.csv.")
    runs: list[Run] = []
    empty: list[tuple[Path, NoReturnsYet]] = []
    for p in expand_run_dirs(run_dirs):
        try:
            runs.extend(runs_of(p))
        except NoReturnsYet as err:
            empty.append((p, err))
    if not runs:
        if len(empty) == 1:
            raise empty[0][1]
        names = ", ".join(str(p) for p, _ in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise PlotError(f"None of the {len(empty)} runs has episode returns yet ({names}); nothing to plot.")
    for p, err in empty:
        warn(f"warning: skipping {p}: {err}")
    return runs


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, **kwargs: Any) -> Path:
    """Check the options, load (skipping runs without returns yet), group and draw;
    raises PlotError for bad options or a missing or unusable run directory."""
    check_options(out, smooth_window=kwargs.get("smooth_window", 10), dpi=kwargs.get("dpi", 120))
    return plot_groups(group_runs(load_runs(run_dirs)), out, **kwargs)


@dataclasses.dataclass(frozen=True)
class Args:
    """Draw learning curves (return vs env steps and vs wall time) from run directories."""

    run_dirs: Annotated[
        tuple[str, ...],
        tyro.conf.arg(metavar="RUN_DIR [RUN_DIR ...]", help_behavior_hint="(one or more)"),
    ]
    """Run directories (each with metrics.csv and config.json), or parents of run directories.
    Runs with no finished episode yet are skipped with a warning."""
    out: str = "curves.png"
    """Output image; the suffix picks the format (.png, .pdf, .svg, .jpg, .eps, ...: any matplotlib writes)."""
    x: Literal["steps", "time", "both"] = "both"
    """x axis: environment steps, wall-clock time, or both side by side."""
    smooth: int = 10
    """Trailing-mean window over logged episode returns, per run, before averaging seeds; >= 1, 1 disables."""
    band: Literal["minmax", "std", "none"] = "minmax"
    """Spread across seeds: min-max, mean +- one standard deviation, or none."""
    title: str | None = None
    """Figure title."""
    dpi: int = 120
    """Resolution of raster output."""
    per_game: bool = True
    """One row of panels per game, each with its own y-axis (--no-per-game: every game on one)."""


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 on success, 2 (one line on stderr) on bad input, like scripts/<algo>.py."""
    args = tyro.cli(
        Args,
        args=argv,
        config=(tyro.conf.PositionalRequiredArgs,),
        description=Args.__doc__,
    )
    try:
        out = plot_runs(
            args.run_dirs,
            args.out,
            x=args.x,
            smooth_window=args.smooth,
            band=args.band,
            title=args.title,
            dpi=args.dpi,
            per_game=args.per_game,
        )
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
