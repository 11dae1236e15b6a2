"""Training configs on the command line and on disk: flags, ranges, ``config.json``.

:func:`cli` parses an algorithm's ``Config`` with tyro (``--resume RUN_DIR``
starts from the stored config and refuses a change that would alter the
learning problem); :func:`check_ranges` refuses a value outside its field's
range in one sentence naming the flag; removed and meaningless flags are
refused in one sentence each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxatari import envs
from jaxatari.errors import ConfigError
from jaxatari.rundir import load_run_config

_RANGES: dict[str, Callable[[Any], bool]] = {
    ">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1,
    "an integer >= 1": lambda v: isinstance(v, int) and v >= 1,
    "an integer >= 0": lambda v: isinstance(v, int) and v >= 0,
}

#: The ranges of the run options the on-policy and DQN configs share (fields a config lacks are skipped).
RUN_OPTION_RANGES = {
    "total_timesteps": "an integer >= 1", "num_envs": "an integer >= 1", "chunk_steps": "an integer >= 1",
    "checkpoint_every": "an integer >= 0", "keep": "an integer >= 1", "eval_every": "an integer >= 0",
    "eval_episodes": "an integer >= 1", "num_threads": "an integer >= 0", "num_agents": "an integer >= 1",
    "cfc_units": "an integer >= 1", "cfc_backbone_units": "an integer >= 1", "cfc_backbone_layers": "an integer >= 0",
}


def _range_rule(rule: str) -> Callable[[Any], bool]:
    """The test of ``rule``: a key of ``_RANGES``, optionally followed by a note in parentheses."""
    for key in sorted(_RANGES, key=len, reverse=True):
        if rule == key or rule.startswith(key + " ("):
            return _RANGES[key]
    raise ValueError(f"Unknown range rule {rule!r}; rules are {', '.join(_RANGES)} (optionally + ' (note)').")


def check_ranges(config, ranges: dict[str, str]) -> None:
    """Raise :class:`ConfigError` naming the flag, its value and the accepted
    range for the first field of ``config`` outside its range. A rule is one of
    ``">= 1"``, ``">= 0"``, ``"> 0"``, ``"in [0, 1]"``, ``"in (0, 1]"``,
    ``"in [0, 1)"``, ``"an integer >= 1"``, ``"an integer >= 0"``, optionally
    followed by a note for the message (``">= 0 (0 = no clipping)"``). Fields
    that are None or absent from ``config`` are skipped."""
    for name, rule in ranges.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _range_rule(rule)(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not accepted: it must be {rule}.")


def config_to_json(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_from_json(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


def _flag_name(token: str) -> str:
    """``--run_dir=x`` -> ``--run-dir``; ``--no-tensorboard`` -> ``--tensorboard`` (one flag, two spellings)."""
    name = token.split("=", 1)[0].replace("_", "-")
    return "--" + name[5:] if name.startswith("--no-") else name


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--") and _flag_name(a) == flag:
            if "=" in a:
                return a.split("=", 1)[1]
            if i + 1 < len(argv):
                return argv[i + 1]
    return None


def _refuse_repeated_flags(argv: Sequence[str]) -> None:
    """tyro keeps the last of a repeated flag and drops the others without a word
    (``--env-option a=1 --env-option b=2`` would lose ``a=1``): refuse instead."""
    seen: set[str] = set()
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name = _flag_name(a)
            if name in seen:
                raise ConfigError(f"{name} is given more than once; give it once (several --env-option values "
                                  "go after one flag: --env-option noop_max=30 frame_skip=4).")
            seen.add(name)


#: Flags taken out of the agents, each with the value that left it off (a stored config may still hold them).
REMOVED_FLAGS = {"overlap_learning": False, "overlap_microbatches": 1, "env_groups": 1}


REMOVED_WHERE = "README.md, Performance: Removed speed features"


def _refuse_removed_flags(argv: Sequence[str]) -> None:
    """A removed flag gets one sentence, not tyro's usage screen."""
    for a in argv:
        name = _flag_name(a)[2:].replace("-", "_") if a.startswith("--") else ""
        if name in REMOVED_FLAGS:
            raise ConfigError(f"{_flag_name(a)} was removed: it showed no gain on the CPU measured "
                              f"({REMOVED_WHERE}); train without it.")


#: Flags whose meaning is gone, each with the sentence that says why (refused where the config lacks the field).
MEANINGLESS_FLAGS = {"sharded": "every run takes the one device-invariant path, on one device or --devices N"}


def _refuse_meaningless_flags(config_cls, argv: Sequence[str]) -> None:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for a in argv:
        name = _flag_name(a)[2:].replace("-", "_") if a.startswith("--") else ""
        if name in MEANINGLESS_FLAGS and name not in fields:
            raise ConfigError(f"{_flag_name(a)} has no meaning any more: {MEANINGLESS_FLAGS[name]}; drop it.")


def _refuse_removed_features(stored: dict[str, Any], run_dir: str) -> None:
    """A run trained with a removed flag on cannot continue exactly without it."""
    on = [f"--{k.replace('_', '-')}" + ("" if isinstance(off, bool) else f" {stored[k]}")
          for k, off in REMOVED_FLAGS.items() if stored.get(k, off) != off]
    if on:
        was, it = ("were", "them") if len(on) > 1 else ("was", "it")
        raise ConfigError(f"{run_dir} was trained with {' and '.join(on)}, which {was} removed ({REMOVED_WHERE}); "
                          f"it cannot continue exactly without {it}.")


def cli(config_cls, *, resumable: Sequence[str], argv: Sequence[str] | None = None, description: str | None = None):
    """Parse ``config_cls`` with tyro; ``--resume RUN_DIR`` starts from the stored config.

    On resume only the fields in ``resumable`` (and ``resume`` itself) may
    differ from the stored config; any other change is refused with a sentence
    naming the flag, since it would change the learning problem. A removed
    flag (:data:`REMOVED_FLAGS`) is refused, and so is the resume of a run
    trained with one.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help"} & set(argv):
        _refuse_removed_flags(argv)
        _refuse_meaningless_flags(config_cls, argv)
        _refuse_repeated_flags(argv)
    resume = _flag_value(argv, "--resume")
    if resume is None:
        return tyro.cli(config_cls, args=argv, description=description)
    given = _flag_value(argv, "--run-dir")
    if given is not None and Path(given).resolve() != Path(resume).resolve():
        raise ConfigError(f"--run-dir cannot be combined with --resume: a run continues in its own directory "
                          f"({resume}); to continue a copy elsewhere, copy the directory and resume the copy.")
    stored = load_run_config(resume)
    if "population" in stored:
        raise ConfigError(f"{resume} is agent {stored.get('agent', '?')} of the population {stored['population']}: a "
                          f"snapshot to evaluate or load, not a run; resume the population, --resume "
                          f"{stored['population']}.")
    _refuse_removed_features(stored, resume)
    algo = getattr(sys.modules.get(config_cls.__module__), "ALGO", None)
    if algo and stored.get("algo", algo) != algo:
        raise ConfigError(f"{resume} is a {stored['algo']} run, not {algo}; resume it with "
                          f"python scripts/{stored['algo']}.py --resume {resume}")
    default = config_from_json(config_cls, stored)
    default = dataclasses.replace(default, resume=resume)
    config = tyro.cli(config_cls, args=argv, default=default, description=description)
    for f in dataclasses.fields(config_cls):
        if f.name in ("resume", *resumable):
            continue
        new, old = getattr(config, f.name), getattr(default, f.name)
        if new != old and f.name == "env_option" and _same_env_options(new, old):
            config = dataclasses.replace(config, env_option=old)  # the same options in another order
            continue
        if new != old:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(
                f"{flag} {new!r} differs from the run being resumed ({old!r}); it would change the "
                f"learning problem. On resume you may change: "
                f"{', '.join('--' + r.replace('_', '-') for r in resumable if r != 'run_dir')}."
            )
    return config


def _same_env_options(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two ``--env-option`` lists set the same values (in any order, spaces around ``=`` aside)."""
    try:
        return envs.parse_env_options(list(a)) == envs.parse_env_options(list(b))
    except envs.EnvError:
        return False


def default_chunk_steps(atari: bool) -> int:
    """``--chunk-steps`` when not given: 50k env steps, 10k for Atari on a CPU,
    where the Nature CNN trains at ~150 steps/s (a 50k chunk would show the first
    progress line, and act on Ctrl-C or a preemption notice, after ~5 minutes)."""
    return 10_000 if atari and cpu_only() else 50_000


def cpu_only() -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend (a
    multi-process run must call ``jax.distributed.initialize`` first): an explicit
    ``JAX_PLATFORMS`` / ``jax_platforms`` names the platform; otherwise, whether
    no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return False
    try:
        import jax_plugins  # namespace package of PJRT plugins
    except ImportError:
        return True
    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
