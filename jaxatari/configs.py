"""Training configs on the command line and on disk: flags, ranges, ``config.json``.

:func:`cli` parses an algorithm's ``Config`` with tyro (``--resume RUN_DIR``
starts from the stored config and refuses a change that would alter the
learning problem); :func:`check_ranges` refuses a value outside its field's
range in one sentence naming the flag; removed and meaningless flags are
refused in one sentence each. :func:`normalize_argv` checks the flags before tyro
(integers as ``1e6``, ``1_000_000`` or ``10M``; any bad flag or value is one sentence) and
:func:`help_text` is ``--help``: the flags by field group, each with one doc line and one default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import difflib
import inspect
import io
import json
import os
import re
import shutil
import sys
import textwrap
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxatari import envs
from jaxatari.errors import ConfigError
from jaxatari.networks import NetworkSpec, resolve_network_spec
from jaxatari.rundir import load_run_config, resume_command

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


# --- Parsing argv before tyro: one sentence per bad flag, integers as 1e6 / 10M, and a grouped --help. ---

_INT = re.compile(r"[+-]?\d+(?:_\d+)*(?:\.\d+)?(?:[eE][+-]?\d+)?[kKmMgGbB]?")
_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
INT_EXAMPLES = "an integer (e.g. 1000000, 1e6, 1M)"
FLOAT_EXAMPLES = "a number (e.g. 0.5, 2.5e-4)"


def parse_int(text: str) -> int | None:
    """``text`` as an integer (``1000000``, ``1_000_000``, ``1e6``, ``1.5e3``, ``10M``, ``500k``), or None
    where it is not exactly one."""
    if not _INT.fullmatch(text):
        return None
    scale = _SUFFIX.get(text[-1].lower(), 1) if text[-1].isalpha() and text[-1] not in "eE" else 1
    number = decimal.Decimal((text[:-1] if scale > 1 else text).replace("_", "")) * scale
    return int(number) if number == number.to_integral_value() else None


@dataclasses.dataclass(frozen=True)
class _Flag:
    name: str  # field name
    kind: str  # int, float, str, bool, ints, strs
    optional: bool  # accepts None
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def accepted(self) -> str:
        choices = self.field.metadata.get("choices")
        if choices:
            return f"one of {', '.join(choices)}"
        return {"int": INT_EXAMPLES, "float": FLOAT_EXAMPLES, "str": "a string", "ints": "integers (e.g. 64 128)",
                "strs": "strings"}.get(self.kind, "no value")


def _flags(config_cls) -> dict[str, _Flag]:
    hints = typing.get_type_hints(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        t = hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        if optional:
            (t,) = [a for a in args if a is not type(None)]
        if typing.get_origin(t) is tuple:
            kind = "ints" if typing.get_args(t)[0] is int else "strs"
        else:
            kind = {int: "int", float: "float", bool: "bool"}.get(t, "str")
        out[f.name] = _Flag(f.name, kind, optional, f)
    return out


def _is_flag_token(token: str) -> bool:
    """Whether ``token`` is a flag rather than a value (a negative number is a value)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token.replace("_", ""))
        return False
    except ValueError:
        return parse_int(token) is None


def _scalar(flag: _Flag, value: str) -> str:
    """``value`` of ``flag`` as tyro reads it, or :class:`ConfigError` in one sentence."""
    if flag.optional and flag.kind != "str" and value in ("None", "none"):
        return "None"
    if flag.kind in ("int", "ints"):
        n = parse_int(value)
        if n is None:
            raise ConfigError(f"{flag.flag} {value} is not accepted: it must be {INT_EXAMPLES}.")
        return str(n)
    if flag.kind == "float":
        try:
            float(value.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{flag.flag} {value} is not accepted: it must be {FLOAT_EXAMPLES}.") from None
        return value.replace("_", "")
    return value


def normalize_argv(config_cls, argv: Sequence[str], *, require: bool = True) -> list[str]:
    """``argv`` checked against ``config_cls``'s fields and rewritten for tyro (``--flag value ...``, integers
    plain, ``--x``/``--no-x`` of an optional bool as ``--x True``/``--x False``). Raises :class:`ConfigError`
    in one sentence for an unknown flag, a missing or extra value, or a value of the wrong type."""
    flags = _flags(config_cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not _is_flag_token(token):
            raise ConfigError(f"{token!r} is not accepted here: every value follows its flag "
                              "(e.g. --env Pong-v5); --help lists the flags.")
        spelled, eq, inline = token.partition("=")
        name = spelled.lstrip("-").replace("-", "_")
        negated = name.startswith("no_") and name[3:] in flags and flags[name[3:]].kind == "bool"
        flag = flags.get(name[3:] if negated else name) if spelled.startswith("--") else None
        if flag is None:
            known = [f.flag for f in flags.values()]
            near = difflib.get_close_matches(spelled.replace("_", "-"), known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"{spelled} is not a flag here; {hint}--help lists the flags.")
        values = [inline] if eq else []
        if flag.kind in ("strs", "ints") or not eq:
            while i < len(argv) and not _is_flag_token(argv[i]) and (flag.kind in ("strs", "ints") or not values):
                values.append(argv[i])
                i += 1
        given = flag.flag if not negated else "--no-" + flag.flag[2:]
        if flag.kind == "bool":
            if values and not (flag.optional and not negated and values[0] in ("True", "False", "None")):
                raise ConfigError(f"{given} takes no value ({values[0]!r} given); use {flag.flag} or "
                                  f"--no-{flag.flag[2:]}.")
            out += [flag.flag, values[0] if values else str(not negated)] if flag.optional else [given]
        elif flag.kind in ("strs", "ints"):
            out += [flag.flag, *(_scalar(flag, v) for v in values)]
        elif not values:
            raise ConfigError(f"{flag.flag} needs a value: {flag.accepted()}.")
        else:
            out += [flag.flag, _scalar(flag, values[0])]
    missing = [f.flag for f in flags.values()
               if f.field.default is dataclasses.MISSING and f.field.default_factory is dataclasses.MISSING
               and f.flag not in out]
    if missing and require:
        raise ConfigError(f"{missing[0]} is required: {_doc(config_cls, missing[0][2:].replace('-', '_'))}")
    return out


def _check_stored(config_cls, stored: dict[str, Any], where: str) -> None:
    """A value of ``config.json`` that no flag could give is refused in one sentence (not by tyro's warning)."""
    for flag in _flags(config_cls).values():
        if flag.name not in stored:
            continue
        v = stored[flag.name]
        ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
              "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
              "ints": lambda x: isinstance(x, list) and all(isinstance(e, int) for e in x),
              "strs": lambda x: isinstance(x, list) and all(isinstance(e, str) for e in x)}[flag.kind]
        if not ((v is None and flag.optional) or ok(v)):
            what = {"bool": "true or false", "strs": "a list of strings", "ints": "a list of integers",
                    "int": "an integer"}.get(flag.kind, flag.accepted())
            raise ConfigError(f"{flag.flag} {v!r} in {where} is not accepted: it must be {what}.")


def _run_tyro(config_cls, argv: list[str], **kw):
    """tyro on an argv :func:`normalize_argv` has checked: no warning printed; should tyro still refuse,
    its first line becomes a :class:`ConfigError` instead of a boxed panel."""
    import tyro
    from tyro._warnings import TyroWarning

    err = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            warnings.simplefilter("ignore", TyroWarning)
            return tyro.cli(config_cls, args=argv, **kw)
    except SystemExit:
        lines = [ln.strip(" │╭╮╰╯─") for ln in err.getvalue().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("For full helptext", "Argument helptext"))]
        raise ConfigError(lines[1] if len(lines) > 1 and lines[0].endswith(("error", "options", "argument"))
                          else (lines[0] if lines else "the flags could not be parsed; --help lists them.")) from None


_GROUPS = {"EnvFields": "common/env", "RunFields": "run", "ScaleFields": "scale-out", "CfCFields": "network",
           "ActorCriticFields": "network", "QFields": "algorithm"}
_GROUP_ORDER = ("common/env", "run", "algorithm", "network", "scale-out")


def _group(name: str) -> str:
    """The help section of a field: the field group that declares it (by name), else the algorithm's own."""
    for cls_name, group in _GROUPS.items():
        if name in globals()[cls_name].__dict__.get("__annotations__", {}):
            return group
    return "algorithm"


def _section(config_cls, group: str) -> str:
    """A config without an ``ALGO`` (scripts/collect.py's) calls its own fields options."""
    has_algo = hasattr(sys.modules.get(config_cls.__module__), "ALGO")
    return "options" if group == "algorithm" and not has_algo else group


def _doc(config_cls, name: str) -> str:
    from tyro._docstrings import get_field_docstring

    for cls in config_cls.__mro__:
        if name in cls.__dict__.get("__annotations__", {}):
            doc = get_field_docstring(cls, name, ())
            if doc:
                return " ".join(doc.split())
    return ""


_DEFAULT_CLAUSE = re.compile(r"\s*(?:\(default:?\s+(?P<p>[^)]*(?:\([^)]*\))?[^)]*)\)\.?|Default:?\s+(?P<s>.*?)\.?"
                             r"|;\s*default:?\s+(?P<q>[^()]*)\)\.?)$")


def _default(config_cls, flag: _Flag, doc: str) -> tuple[str, str]:
    """``(doc, default)``: the field's doc without a default it states, and the default, said once."""
    m = _DEFAULT_CLAUSE.search(doc)
    stated = None
    if m:
        stated = (m.group("p") or m.group("s") or m.group("q")).strip()
        doc = doc[:m.start()].rstrip() + (")." if m.group("q") else "")
        doc = doc if doc.endswith(".") or not doc else doc + "."
        stated = re.sub(r"by env kind \(above\)", "by env kind", stated)
    f = flag.field
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return doc, "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is not None:
        if isinstance(value, bool):
            return doc, "on" if value else "off"
        if isinstance(value, tuple):
            return doc, " ".join(map(str, value)) if value else "none"
        return doc, (str(value) if value != "" else '""')
    if stated:
        return doc, stated
    if "(default)" in doc:  # e.g. --preset: "nature (default) or machado; 'none' for classic control"
        return doc, "by env kind"
    module = sys.modules.get(config_cls.__module__)
    for attr, presets in vars(module).items() if module else ():
        if attr.endswith("_PRESETS") and isinstance(presets, dict):
            preset_field = next((g.name for g in dataclasses.fields(config_cls)
                                 if g.metadata.get("choices") == tuple(presets)), None)
            if preset_field == flag.name:
                return doc, "by env kind"
            if preset_field and any(flag.name in p for p in presets.values()):
                return doc, f"by --{preset_field.replace('_', '-')}"
    if any(flag.name in getattr(module, d, {}) for d in ("ATARI_DEFAULTS", "CLASSIC_DEFAULTS")):
        return doc, "by env kind"
    return doc, "none"


def _type(flag: _Flag) -> str:
    if flag.kind == "bool":
        return ""
    return {"int": "INT", "float": "FLOAT", "str": "STR", "ints": "INT...", "strs": "STR..."}[flag.kind]


def help_text(config_cls, description: str | None = None, prog: str | None = None, width: int | None = None) -> str:
    """``--help``: the description, then the flags by group, each with its type, one-line doc and default."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    prog = prog or os.path.basename(sys.argv[0]) or "script"
    rows: dict[str, list[tuple[str, str]]] = {g: [] for g in _GROUP_ORDER}
    for flag in _flags(config_cls).values():
        doc, default = _default(config_cls, flag, _doc(config_cls, flag.name))
        head = (f"{flag.flag}/--no-{flag.flag[2:]}" if flag.kind == "bool" else f"{flag.flag} {_type(flag)}")
        # The default is kept on one line (no-break spaces are not wrapped at).
        rows[_group(flag.name)].append((head, f"{doc} (default: {default})".strip().replace(" (default: ", " (default:\xa0")))
    col = min(max(len(h) for g in rows.values() for h, _ in g) + 4, 34)
    text = [f"usage: {prog} [--FLAG VALUE ...]", ""]
    if description:
        text += [description.replace("``", "").strip(), ""]
    for group, items in rows.items():
        if not items:
            continue
        text.append(f"{_section(config_cls, group)}:")
        for head, doc in items:
            first = f"  {head}".ljust(col) + ("" if len(head) + 2 < col else "  ")
            wrapped = textwrap.wrap(doc, max(width - col, 30), break_on_hyphens=False, break_long_words=False)
            text.append(first + (wrapped[0] if wrapped else "").replace("\xa0", " "))
            text += [" " * col + w.replace("\xa0", " ") for w in wrapped[1:]]
        text.append("")
    return "\n".join(text).rstrip() + "\n"


def cli(config_cls, *, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse ``config_cls`` with tyro; ``--resume RUN_DIR`` starts from the stored config.

    On resume only the :func:`resumable` fields (and ``resume`` itself) may
    differ from the stored config; any other change is refused with a sentence
    naming the flag, since it would change the learning problem. A removed
    flag (:data:`REMOVED_FLAGS`) is refused, and so is the resume of a run
    trained with one.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The config's docstring states the defaults that depend on the env's kind.
    description = "\n\n".join(d.strip() for d in (description, inspect.cleandoc(config_cls.__doc__ or "")) if d)
    if {"-h", "--help"} & set(argv):
        print(help_text(config_cls, description), end="")
        raise SystemExit(0)
    _refuse_removed_flags(argv)
    _refuse_meaningless_flags(config_cls, argv)
    _refuse_repeated_flags(argv)
    resume = _flag_value(argv, "--resume")
    argv = normalize_argv(config_cls, argv, require=resume is None)
    if resume is None:
        return _run_tyro(config_cls, argv, description=description)
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
                          f"{resume_command(stored['algo'], resume)}")
    _check_stored(config_cls, stored, str(Path(resume) / "config.json"))
    default = config_from_json(config_cls, stored)
    default = dataclasses.replace(default, resume=resume)
    config = _run_tyro(config_cls, argv, default=default, description=description)
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
