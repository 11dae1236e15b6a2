"""EnvPool environments: the factory, Atari presets, stepping inside ``jit``, and
a pure episode-statistics tracker.

EnvPool conventions every agent relies on:

* Auto-reset. A step reporting ``terminated | truncated`` returns the episode's
  final observation; the next call is a "reset step" (action ignored, reward 0,
  returns the new episode's first observation). jaxatari marks it ``valid=False``:
  excluded from every loss and from episode statistics; the recurrent state is
  reset on the step after it (``first=True``).
* Episodic life. With ``episodic_life=True`` ``terminated`` fires on each lost
  life (cutting the bootstrap) but the game goes on; ``info["terminated"]`` is the
  real game over. Returns are full games of unclipped ``info["reward"]``.
* ``noop_max=0`` crashes EnvPool; ``noop_max=1`` means "no no-op starts".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxatari.errors import EnvError

log = logging.getLogger(__name__)

#: Named EnvPool option sets for Atari. Every key is set explicitly: EnvPool's
#: own defaults are not any published protocol. ``nature``: DQN-Nature / OpenAI
#: baselines (FIRE reset, no-op starts, episodic life); ``machado``: Machado et al.
#: (2018), sticky actions, no episodic life, no no-op starts.
ATARI_PRESETS: dict[str, dict[str, Any]] = {"nature": dict(
    episodic_life=True, reward_clip=True, noop_max=30, use_fire_reset=True, repeat_action_probability=0.0,
    full_action_space=False, max_episode_steps=27_000, frame_skip=4, stack_num=4, img_height=84, img_width=84,
    gray_scale=True)}
ATARI_PRESETS["machado"] = dict(ATARI_PRESETS["nature"], episodic_life=False, noop_max=1, use_fire_reset=False,
                                repeat_action_probability=0.25)

_RESERVED_OPTIONS = ("num_envs", "batch_size", "seed", "env_seed", "base_path", "task", "num_threads",
                     "max_num_players", "thread_affinity_offset", "gym_reset_return_info")


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, str]:
    import envpool.registration as reg

    return {k: v[0] for k, v in reg.registry.specs.items()}


def all_env_ids() -> list[str]:
    """Every EnvPool task id this installation ships."""
    return sorted(_registry())


def atari_env_ids() -> list[str]:
    """All Atari ids (``*-v5``)."""
    return sorted(k for k, mod in _registry().items() if mod == "envpool.atari")


def is_atari(env_id: str) -> bool:
    return _registry().get(env_id) == "envpool.atari"


def validate_env_id(env_id: str) -> None:
    """Raise :class:`EnvError` naming ``env_id`` and the closest valid ids."""
    ids = all_env_ids()
    if env_id in ids:
        return
    close = difflib.get_close_matches(env_id, ids, n=3, cutoff=0.6)
    if not close:  # try case-insensitively, e.g. 'breakout-v5'
        lower = {i.lower(): i for i in ids}
        close = [lower[c] for c in difflib.get_close_matches(env_id.lower(), list(lower), n=3)]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise EnvError(f"Unknown env id {env_id!r}.{hint} Accepted: any EnvPool task id, e.g. 'Breakout-v5', "
                   f"'Pong-v5', 'CartPole-v1' ({len(ids)} in all; see jaxatari.envs.all_env_ids()).")


def parse_env_options(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Split ``("key=value", ...)`` CLI overrides into ``{key: value}``.

    Values stay strings: :func:`resolve_options` parses each one by the type of
    that option's EnvPool default and checks its range, once the env is known.
    """
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise EnvError(f"Env option {item!r} is not of the form KEY=VALUE, e.g. 'noop_max=30'.")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in out:
            raise EnvError(f"Env option {k} is given twice ({k}={out[k]} and {k}={v.strip()}); give it once.")
        out[k] = v.strip()
    return out


def resolve_preset(env_id: str, preset: str | None) -> str:
    """``None`` -> ``"nature"`` for Atari, ``"none"`` otherwise; validate the name."""
    atari = is_atari(env_id)
    if preset is None:
        return "nature" if atari else "none"
    if atari and preset not in ATARI_PRESETS:
        raise EnvError(f"Unknown preset {preset!r} for {env_id}; accepted: {', '.join(sorted(ATARI_PRESETS))}.")
    if not atari and preset != "none":
        raise EnvError(f"Preset {preset!r} applies to Atari games only; {env_id} takes --preset none.")
    return preset


#: Ranges checked before EnvPool sees a value (EnvPool checks none; some crash
#: it): ``(low, high, note)``, ``None`` for no bound. Other options are checked
#: for the type of EnvPool's default value only.
OPTION_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "max_episode_steps": (1, None, ""),
    "noop_max": (1, None, "1 means no no-op starts; 0 crashes EnvPool"),
    "frame_skip": (1, None, ""),
    "stack_num": (1, None, ""),
    "img_height": (1, None, ""),
    "img_width": (1, None, ""),
    "mode": (-1, None, "-1 is the game's default mode"),
    "difficulty": (-1, None, "-1 is the game's default difficulty"),
    "repeat_action_probability": (0.0, 1.0, ""),
}

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1  # EnvPool's integer options are C++ ints
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@functools.lru_cache(maxsize=None)
def _option_defaults(env_id: str) -> dict[str, Any]:
    """EnvPool's default value of every option of ``env_id`` a user may set (don't mutate)."""
    import envpool

    spec = envpool.make_spec(env_id)
    return {k: v for k, v in zip(spec._config_keys, spec._default_config_values) if k not in _RESERVED_OPTIONS}


def parse_option_value(env_id: str, key: str, value: Any, default: Any) -> Any:
    """``value`` of option ``key`` as EnvPool takes it, typed like ``default``.

    Strings (from ``--env-option``) are parsed: booleans accept true/false, 1/0,
    yes/no in any case; list, tuple and dict options a Python literal. Values of
    the right type pass through. The range in :data:`OPTION_RANGES` is checked.
    Raises :class:`EnvError` naming the option, the value and what is accepted.
    """
    low, high, note = OPTION_RANGES.get(key, (None, None, ""))
    text = value.strip() if isinstance(value, str) else None

    def bad(accepted: str) -> EnvError:
        shown = value if text else repr(value)
        hint = f" ({note})" if note else ""
        return EnvError(f"Env option {key}={shown} is not accepted for {env_id}: it takes {accepted}{hint}.")

    if isinstance(default, (bool, np.bool_)):
        if isinstance(value, (int, np.integer, np.bool_)) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise bad("a boolean: true/false, 1/0 or yes/no")
    if isinstance(default, (int, float, np.integer, np.floating)):
        integer = isinstance(default, (int, np.integer))
        cast = int if integer else float
        accepted = "an integer" if integer else "a number"
        if low is not None:
            accepted += f" in [{low:g}, {high:g}]" if high is not None else f" >= {low:g}"
        numbers = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(value, numbers) and not isinstance(value, (bool, np.bool_)):
            val = cast(value)
        elif text is not None:
            try:
                val = cast(text)
            except ValueError:
                raise bad(accepted) from None
        else:
            raise bad(accepted)
        if val != val or (low is not None and not val >= low) or (high is not None and not val <= high):
            raise bad(accepted)  # NaN fails every comparison
        if integer and not _INT32_MIN <= val <= _INT32_MAX:
            raise bad(f"{accepted} that fits in 32 bits ({_INT32_MIN} to {_INT32_MAX})")
        return val
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad(f"a string, e.g. {default!r}")
        return value
    if isinstance(default, (list, tuple, dict)):
        kind = dict if isinstance(default, dict) else type(default)
        val = value
        if text is not None:
            import ast

            try:
                val = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise bad(f"a Python {kind.__name__} literal, e.g. {default!r}") from None
        if kind is dict and isinstance(val, dict):
            return val
        if kind is not dict and isinstance(val, (list, tuple)):
            return kind(val)
        raise bad(f"a Python {kind.__name__} literal, e.g. {default!r}")
    return value  # any other type is left to EnvPool


def resolve_options(env_id: str, preset: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full EnvPool option dict for ``env_id`` under ``preset`` plus ``overrides``.

    Every value (preset or override, string or typed) is parsed and checked by
    :func:`parse_option_value`; unknown option names fail with the closest valid
    names. Nothing EnvPool steps is built: what needs the game itself (ALE's
    modes and difficulties) is checked by building EnvPool's spec.
    """
    import envpool

    validate_env_id(env_id)
    preset = resolve_preset(env_id, preset)
    defaults = _option_defaults(env_id)
    options = dict(ATARI_PRESETS[preset]) if preset in ATARI_PRESETS else {}
    valid = list(defaults)
    for k, v in (overrides or {}).items():
        if k not in defaults:
            close = difflib.get_close_matches(k, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise EnvError(f"Unknown EnvPool option {k!r} for {env_id}.{hint} Accepted: {', '.join(valid)}.")
        options[k] = v
    options = {k: parse_option_value(env_id, k, v, defaults[k]) for k, v in options.items()}
    try:
        envpool.make_spec(env_id, **options)
    except (RuntimeError, ValueError) as e:
        msg = str(e).strip().rstrip(".")
        for k in ("mode", "difficulty"):  # ALE: "Invalid game mode requested"
            if k in msg and k in options:
                raise EnvError(f"Env option {k}={options[k]} is not accepted for {env_id}: EnvPool says "
                               f"{msg!r}; it takes -1 (the game's default) or a {k} this game has.") from None
        shown = " ".join(f"{k}={v}" for k, v in options.items())
        raise EnvError(f"EnvPool rejects the options of {env_id} ({shown}): {msg}.") from None
    return options


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment batch, enough to build networks."""

    env_id: str
    preset: str
    options: dict[str, Any]
    num_envs: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    atari: bool

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self), obs_shape=list(self.obs_shape), obs_dtype=str(np.dtype(self.obs_dtype)))


def make(env_id: str, num_envs: int, *, seed: int, preset: str | None = None, options: dict[str, Any] | None = None,
         num_threads: int = 0, batch_size: int | None = None, render_mode: str | None = None):
    """Build an EnvPool gymnasium batch. Returns ``(env, EnvSpec)``.

    Args:
      env_id: any EnvPool task id (``Breakout-v5``, ``CartPole-v1`` ...).
      num_envs: number of environments B.
      seed: base seed; env ``i`` is seeded ``seed + i`` by EnvPool.
      preset: Atari option preset (``nature``, ``machado``), see :data:`ATARI_PRESETS`.
      options: EnvPool option overrides applied on top of the preset.
      num_threads: EnvPool worker threads (0 = EnvPool's default).
      batch_size: < ``num_envs`` selects EnvPool's async mode.
      render_mode: ``"rgb_array"`` enables ``env.render(env_ids=[...])`` (RGB frames, for video).
    """
    if num_envs < 1:
        raise EnvError(f"num_envs={num_envs} is not accepted: it must be >= 1.")
    resolved = resolve_options(env_id, preset, options)
    env = envpool_make(env_id, env_type="gymnasium", num_envs=num_envs, batch_size=batch_size or num_envs,
                       num_threads=num_threads, seed=seed,
                       **({"render_mode": render_mode} if render_mode else {}), **resolved)
    if not hasattr(env.action_space, "n"):
        raise EnvError(f"{env_id} has a continuous action space; jaxatari's agents take discrete-action "
                       "envs (Atari, classic control such as CartPole-v1).")
    obs_space = env.observation_space
    return env, EnvSpec(env_id=env_id, preset=resolve_preset(env_id, preset), options=resolved, num_envs=num_envs,
                        obs_shape=tuple(obs_space.shape), obs_dtype=np.dtype(obs_space.dtype),
                        num_actions=int(env.action_space.n), atari=is_atari(env_id))


def envpool_make(env_id: str, **kwargs):
    """``envpool.make(env_id, **kwargs)`` without gymnasium's harmless "precision
    lowered by casting to float32" warnings."""
    import warnings

    import envpool

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*precision lowered by casting to float32", category=UserWarning)
        env = envpool.make(env_id, **kwargs)
        env.observation_space, env.action_space  # built (and warned about) on first access
    return env


class Timestep(NamedTuple):
    """What one env step returns, every field ``[B]`` except ``obs [B, *obs_shape]``.

    ``reward`` is the training reward (clipped per preset); ``raw_reward`` the
    unclipped game score. ``terminated`` cuts the bootstrap (it includes life
    losses under episodic life); ``truncated`` is the time limit;
    ``game_over`` is a real end of game (never a lost life).
    """

    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    game_over: jax.Array
    raw_reward: jax.Array


StepFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Timestep]]


def _timestep_from_envpool(obs, reward, term, trunc, info, xnp) -> Timestep:
    return Timestep(obs=obs, reward=reward.astype(xnp.float32), terminated=term.astype(bool),
                    truncated=trunc.astype(bool), game_over=info.get("terminated", term).astype(bool),
                    raw_reward=info.get("reward", reward).astype(xnp.float32))


def make_step_fn(env, spec: EnvSpec, backend: str = "auto") -> tuple[jax.Array, StepFn, str]:
    """A step function usable inside ``jax.jit`` / ``lax.scan``.

    Returns ``(handle, step, backend_used)`` with ``step(handle, actions[B]) ->
    (handle, Timestep)``. ``backend`` ``"xla"``: EnvPool's ``env.xla()`` custom call; ``"callback"``: EnvPool
    stepped on the host through ``io_callback`` (any backend); ``"auto"``: ``xla``
    if a compiled probe step succeeds, else ``callback`` with a logged reason.

    The env must have been reset (``env.reset()``) before the first step.
    """
    if backend not in ("auto", "xla", "callback"):
        raise EnvError(f"env backend {backend!r} is not accepted; use auto, xla or callback.")
    if backend in ("auto", "xla"):
        try:
            handle, _recv, _send, xla_step = env.xla()

            def step(h, actions):
                h, (obs, rew, term, trunc, info) = xla_step(h, actions)
                return h, _timestep_from_envpool(obs, rew, term, trunc, info, jnp)

            jax.jit(step).lower(handle, jnp.zeros((spec.num_envs,), jnp.int32)).compile()
            return handle, step, "xla"
        except Exception as e:  # noqa: BLE001 - any failure means: fall back
            if backend == "xla":
                raise
            log.warning("EnvPool xla() is unavailable on backend %s (%s: %s); stepping envs through a host callback "
                        "instead (slower).", jax.default_backend(), type(e).__name__, e)
    return _callback_step_fn(env, spec)


def _callback_step_fn(env, spec: EnvSpec) -> tuple[jax.Array, StepFn, str]:
    from jax.experimental import io_callback

    B = spec.num_envs
    f32, b8 = jax.ShapeDtypeStruct((B,), np.float32), jax.ShapeDtypeStruct((B,), np.bool_)
    shapes = Timestep(jax.ShapeDtypeStruct((B, *spec.obs_shape), spec.obs_dtype), f32, b8, b8, b8, f32)

    def host_step(actions):
        obs, rew, term, trunc, info = env.step(np.asarray(actions))
        ts = _timestep_from_envpool(obs, rew, term, trunc, info, np)
        return Timestep(*(np.asarray(x, dtype=s.dtype) for x, s in zip(ts, shapes)))

    def step(h, actions):
        return h, io_callback(host_step, shapes, actions, ordered=True)

    return jnp.zeros((1,), jnp.uint8), step, "callback"


@struct.dataclass
class EpisodeStats:
    """Running full-game statistics per env plus a window of recent returns.

    Shapes: ``returns, lengths [B]`` (current episodes), ``window [W]`` (the last
    W finished full-game returns, a ring), ``count`` (finished episodes so far).
    """

    returns: jax.Array
    lengths: jax.Array
    window: jax.Array
    count: jax.Array


class EpisodeOutcome(NamedTuple):
    """Episodes that ended at this step, ``[B]`` each: ``done`` says which envs
    finished; ``returns``/``lengths`` are valid where ``done``."""

    done: jax.Array
    returns: jax.Array
    lengths: jax.Array


def episode_stats_init(num_envs: int, window: int = 100) -> EpisodeStats:
    """Zero running returns and lengths ``[num_envs]`` and an empty window of the last ``window`` episodes."""
    return EpisodeStats(returns=jnp.zeros((num_envs,), jnp.float32), lengths=jnp.zeros((num_envs,), jnp.int32),
                        window=jnp.full((window,), jnp.nan, jnp.float32), count=jnp.zeros((), jnp.int32))


def ring_slots(count: jax.Array, done: jax.Array, window: int) -> jax.Array:
    """``[B]`` slots of a ``window``-long ring for the episodes ``done [B]`` ending now,
    after ``count`` earlier ones: consecutive from ``count % window`` in env order;
    ``window`` (out of range: not written) for the others. When more than ``window``
    end together only the last ``window`` get a slot, so no slot is written twice."""
    rank = jnp.cumsum(done)
    slot = (count + rank - 1) % window
    return jnp.where(done & (rank > rank[-1] - window), slot, window)


def episode_stats_update(stats: EpisodeStats, raw_reward: jax.Array, game_over: jax.Array, truncated: jax.Array,
                         valid: jax.Array) -> tuple[EpisodeStats, EpisodeOutcome]:
    """Accumulate one step of full-game statistics. Pure and jittable.

    An episode ends only on a real game over or a time-limit truncation, never on
    a lost life. Reset steps (``valid=False``, see module docstring) add neither
    reward nor length. Each finished episode is counted exactly once and its
    return written into the ``window`` ring.

    Args:
      raw_reward: ``[B]`` unclipped rewards (EnvPool's ``info["reward"]``).
      game_over: ``[B]`` real end of game.
      truncated: ``[B]`` time-limit truncation.
      valid: ``[B]`` False on reset steps.
    """
    chex.assert_equal_shape([stats.returns, raw_reward, game_over, truncated, valid])
    valid = valid.astype(bool)
    ret = stats.returns + jnp.where(valid, raw_reward, 0.0)
    length = stats.lengths + valid.astype(jnp.int32)
    done = (game_over | truncated) & valid
    window = stats.window.at[ring_slots(stats.count, done, stats.window.shape[0])].set(ret, mode="drop")
    new = EpisodeStats(returns=jnp.where(done, 0.0, ret), lengths=jnp.where(done, 0, length), window=window,
                       count=stats.count + done.sum(dtype=jnp.int32))
    return new, EpisodeOutcome(done=done, returns=ret, lengths=length)


def window_mean(stats: EpisodeStats) -> jax.Array:
    """Mean of the last (up to W) finished full-game returns; NaN before any."""
    return jnp.nanmean(stats.window) if stats.window.size else jnp.nan


@struct.dataclass
class EnvState:
    """Per-env state the compiled loop carries between steps (all ``[B, ...]``).

    ``obs`` is the current observation. ``done`` says the last step ended an
    episode, so the next step is EnvPool's reset step (invalid). ``first`` says
    ``obs`` is the first observation of an episode (reset recurrent state here).
    """

    obs: jax.Array
    done: jax.Array
    first: jax.Array
    stats: EpisodeStats


def env_state_init(obs: np.ndarray, window: int = 100) -> EnvState:
    """The env side of a training state from the first observations ``obs [B, *obs_shape]`` (``env.reset()``):
    every env at an episode's first step (``first``), no pending reset step, empty episode statistics."""
    B = obs.shape[0]
    return EnvState(obs=jnp.asarray(obs), done=jnp.zeros((B,), bool), first=jnp.ones((B,), bool),
                    stats=episode_stats_init(B, window))


class Transition(NamedTuple):
    """One step as the agents see it, fields ``[B]`` (``obs [B, ...]``).

    ``valid`` is False on EnvPool reset steps; ``first`` marks the first
    observation of an episode (``obs`` is that observation).
    """

    obs: jax.Array
    first: jax.Array
    valid: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    next_obs: jax.Array


def env_step(step_fn: StepFn, handle: jax.Array, state: EnvState,
             action: jax.Array) -> tuple[jax.Array, EnvState, Transition, EpisodeOutcome]:
    """Step the batch once and update the carried :class:`EnvState`."""
    handle, ts = step_fn(handle, action)
    valid = ~state.done
    stats, outcome = episode_stats_update(state.stats, ts.raw_reward, ts.game_over, ts.truncated, valid)
    done = (ts.terminated | ts.truncated) & valid
    transition = Transition(obs=state.obs, first=state.first, valid=valid, action=action,
                            reward=jnp.where(valid, ts.reward, 0.0), terminated=ts.terminated & valid,
                            truncated=ts.truncated & valid, next_obs=ts.obs)
    new_state = EnvState(obs=ts.obs, done=done, first=~valid, stats=stats)
    return handle, new_state, transition, outcome
