"""Training configs on the command line and on disk: flags, ranges, ``config.json``.

:func:`cli` parses an algorithm's ``Config`` with tyro (``--resume RUN_DIR``
starts from the stored config and refuses a change that would alter the
learning problem); :func:`check_ranges` refuses a value outside its field's
range in one sentence naming the flag; removed and meaningless flags are
refused in one sentence each.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxatari import envs
from jaxatari.errors import ConfigError
from jaxatari.networks import NetworkSpec, resolve_network_spec
from jaxatari.rundir import load_run_config

_RANGES: dict[str, Callable[[Any], bool]] = {
    ">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1,
    "an integer >= 1": lambda v: isinstance(v, int) and v >= 1,
    "an integer >= 0": lambda v: isinstance(v, int) and v >= 0,
}


def option(default: Any = dataclasses.MISSING, *, range: str | None = None, choices: Sequence[str] | None = None,
           resumable: bool = False, sweepable: bool = False):
    """A config field with its rules beside it: ``range`` (a :func:`check_ranges`
    rule), ``choices`` (the accepted strings), ``resumable`` (a resume may change
    it: it does not change the learning problem), ``sweepable`` (``--sweep`` may
    vary it across a population)."""
    rules = dict(range=range, choices=tuple(choices) if choices else None, resumable=resumable, sweepable=sweepable)
    return dataclasses.field(default=default, metadata={k: v for k, v in rules.items() if v})


def _marked(config_cls, rule: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get(rule)]


def ranges(config_cls) -> dict[str, str]:
    """``{field: range rule}`` of a config class (:func:`option`'s ``range``)."""
    return {f.name: f.metadata["range"] for f in _marked(config_cls, "range")}


def resumable(config_cls) -> tuple[str, ...]:
    """The fields a resume may change."""
    return tuple(f.name for f in _marked(config_cls, "resumable"))


def sweepable(config_cls) -> tuple[str, ...]:
    """The float fields ``--sweep`` may vary."""
    return tuple(f.name for f in _marked(config_cls, "sweepable"))


def check(config) -> None:
    """Raise :class:`ConfigError` for the first field outside its range or choices, naming the flag."""
    check_ranges(config, ranges(type(config)))
    for f in _marked(type(config), "choices"):
        value = getattr(config, f.name)
        if value is not None and value not in f.metadata["choices"]:
            raise ConfigError(f"--{f.name.replace('_', '-')} {value!r} is not accepted; use one of "
                              f"{', '.join(f.metadata['choices'])}.")


# The parts every training config shares, composed by inheritance so that flags,
# attribute access and config.json stay flat: ``class Config(ActorCriticFields,
# TrainFields)``. A subclass may redeclare a field to change its default.


@dataclasses.dataclass(frozen=True)
class EnvFields:
    env: str = "Breakout-v5"
    """EnvPool task id, e.g. Breakout-v5, Pong-v5, CartPole-v1."""
    seed: int = option(1, range="an integer >= 0")
    """Seed for params, actions and envs (env i gets seed + i)."""
    num_envs: int | None = option(None, range="an integer >= 1")
    """Parallel envs (the global batch). Default: by env kind (above)."""
    preset: str | None = None
    """Atari preset: nature (default) or machado; 'none' for classic control."""
    env_option: tuple[str, ...] = ()
    """EnvPool option overrides, KEY=VALUE (e.g. noop_max=10 repeat_action_probability=0.25)."""
    num_threads: int = option(0, range="an integer >= 0", resumable=True)
    """EnvPool worker threads (0: EnvPool's default)."""
    env_backend: str = option("auto", choices=("auto", "xla", "callback"), resumable=True)
    """auto, xla (env.xla() inside jit) or callback (host-stepped fallback)."""


@dataclasses.dataclass(frozen=True)
class RunFields:
    total_timesteps: int | None = option(None, range="an integer >= 1", resumable=True)
    """Env steps (agent steps, summed over envs). Default: by env kind (above)."""
    chunk_steps: int | None = option(None, range="an integer >= 1")
    """Env steps per compiled chunk (progress, checkpoints, Ctrl-C act between). Default: 10k Atari on CPU, else 50k."""
    checkpoint_every: int | None = option(None, range="an integer >= 0", resumable=True)
    """Env steps between checkpoints. Default: 1M Atari, 100k classic control."""
    checkpoint_minutes: float = option(10.0, range=">= 0 (0 = off)", resumable=True)
    """Minutes between checkpoints, whichever of this and --checkpoint-every comes first (0: off)."""
    keep: int = option(3, range="an integer >= 1", resumable=True)
    """How many latest checkpoints to keep (the best is kept separately)."""
    eval_every: int = option(0, range="an integer >= 0", resumable=True)
    """Env steps between evaluations of full games (0: off; 'best' then uses the training return)."""
    eval_episodes: int = option(10, range="an integer >= 1", resumable=True)
    """Episodes per periodic evaluation."""
    run_dir: str | None = option(None, resumable=True)
    """Output directory. Default: runs/<env>__<algo>__<seed>__<timestamp>."""
    resume: str | None = None
    """Resume the run in this directory from its latest good checkpoint."""
    tensorboard: bool = option(True, resumable=True)
    """Write TensorBoard events beside metrics.csv."""


@dataclasses.dataclass(frozen=True)
class ScaleFields:
    devices: int | None = option(None, resumable=True)
    """Devices per process to split the envs (and a replay buffer) over. Default: all local devices."""
    num_agents: int = option(1, range="an integer >= 1")
    """Train this many independent agents in one process (agent k: seed + k), vmapped, on one EnvPool."""
    sweep: str | None = None
    """One hyperparameter per agent, FIELD=V1,V2,... (e.g. learning_rate=1e-4,2.5e-4); sets --num-agents."""
    coordinator: str | None = option(None, resumable=True)
    """Multi-host: HOST:PORT of process 0 for jax.distributed (or JAXATARI_COORDINATOR)."""
    num_processes: int | None = option(None, resumable=True)
    """Multi-host: number of processes (or JAXATARI_NUM_PROCESSES); --num-envs is the global batch."""
    process_id: int | None = option(None, resumable=True)
    """Multi-host: this process's index (or JAXATARI_PROCESS_ID); only process 0 logs."""


@dataclasses.dataclass(frozen=True)
class TrainFields(ScaleFields, RunFields, EnvFields):
    """Env, run and scale-out fields: what the driver reads."""


@dataclasses.dataclass(frozen=True)
class CfCFields:
    cfc_units: int = option(64, range="an integer >= 1")
    """CfC hidden units (--network cfc)."""
    cfc_mode: str = option("default", choices=("default", "no_gate", "pure"))
    """CfC mode: default, no_gate or pure."""
    cfc_backbone_units: int = option(128, range="an integer >= 1")
    """CfC backbone width."""
    cfc_backbone_layers: int = option(1, range="an integer >= 0")
    """CfC backbone depth."""


@dataclasses.dataclass(frozen=True)
class ActorCriticFields(CfCFields):
    network: str = "auto"
    """auto (Nature CNN on pixels, MLP on vectors), nature, impala, mlp, or cfc (recurrent)."""
    torso: str = "auto"
    """Torso under --network cfc: auto (ncps conv block on pixels, MLP on vectors), convblock, impala, nature, mlp."""


@dataclasses.dataclass(frozen=True)
class QFields:
    eval_epsilon: float = option(0.001, range="in [0, 1]", resumable=True)
    """Exploration epsilon of the evaluation policy (0: greedy)."""


def actor_critic_spec(c: ActorCriticFields, spec: envs.EnvSpec) -> NetworkSpec:
    """The actor-critic of ``--network``/``--torso`` (and the CfC flags) for ``spec``'s observations and actions."""
    cfc = dict(hidden_size=c.cfc_units, mode=c.cfc_mode, backbone_units=c.cfc_backbone_units,
               backbone_layers=c.cfc_backbone_layers)
    try:
        return resolve_network_spec(c.network, num_actions=spec.num_actions, atari=spec.atari, torso=c.torso, cfc=cfc)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def named_preset(config, field: str, presets: dict[str, dict[str, Any]], atari: str, classic: str):
    """``(config, values)``: ``field`` (e.g. ``dqn_preset``) set to its default by the env's
    kind where it is None, checked, and a copy of the values of that preset."""
    envs.validate_env_id(config.env)
    name = getattr(config, field) or (atari if envs.is_atari(config.env) else classic)
    c = dataclasses.replace(config, **{field: name})
    check(c)  # the preset's name among the rest
    return c, dict(presets[name])


def resolve(config, atari: dict[str, Any], classic: dict[str, Any]):
    """Fill the fields left at ``None`` from ``atari`` or ``classic`` (by the env's
    kind), the preset and the chunk size; then :func:`check` every field. Raises
    before anything compiles."""
    envs.validate_env_id(config.env)
    is_atari = envs.is_atari(config.env)
    fill = {k: v for k, v in (atari if is_atari else classic).items() if getattr(config, k) is None}
    c = dataclasses.replace(config, **fill)
    c = dataclasses.replace(c, preset=envs.resolve_preset(c.env, c.preset))
    if c.chunk_steps is None:
        c = dataclasses.replace(c, chunk_steps=default_chunk_steps(is_atari))
    check(c)
    return c


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


def cli(config_cls, *, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse ``config_cls`` with tyro; ``--resume RUN_DIR`` starts from the stored config.

    On resume only the :func:`resumable` fields (and ``resume`` itself) may
    differ from the stored config; any other change is refused with a sentence
    naming the flag, since it would change the learning problem. A removed
    flag (:data:`REMOVED_FLAGS`) is refused, and so is the resume of a run
    trained with one.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    # The config's docstring states the defaults that depend on the env's kind.
    description = "\n\n".join(d for d in (description, inspect.cleandoc(config_cls.__doc__ or "")) if d)
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
    allowed = resumable(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in ("resume", *allowed):
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
                f"{', '.join('--' + r.replace('_', '-') for r in allowed if r != 'run_dir')}."
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
