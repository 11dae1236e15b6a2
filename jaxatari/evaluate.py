"""Closed-loop evaluation of a policy on full games, with optional video.

:func:`evaluate` plays ``episodes`` full games under the dynamics the agent trained
under (preset and env options, unless overridden), scores them unclipped and
returns an :class:`EvalResult`; :class:`FullGames` is the per-step bookkeeping it
shares with :func:`jaxatari.data.collect`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxatari import envs
from jaxatari.errors import EvalError
from jaxatari.networks import initial_carry

log = logging.getLogger(__name__)

MODES = ("greedy", "sample", "epsilon")
EVAL_EPSILON = 0.001
"""A Q-network's evaluation epsilon (Dopamine's protocol; the Nature DQN paper used 0.05)."""
VIDEO_EXTENSIONS = (".mp4", ".gif")
DEFAULT_MAX_NUM_ENVS = 8

PolicyFn = Callable[..., tuple]
"""``policy_fn(params, carry, obs [T, B, ...], first [T, B]) -> (carry, logits_or_q [T, B, A], ...)``."""


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per-episode full-game returns and lengths, plus how they were obtained.

    ``returns [N]`` (unclipped scores) and ``lengths [N]`` (agent steps) are ordered
    by env, then by episode within an env. ``requested`` is the ``episodes``
    argument; ``N`` is smaller only if ``max_steps`` cut the run short. ``steps``
    counts batched env steps; ``capped`` the counted episodes that ended at the
    time limit ``max_episode_steps`` rather than a game over (:meth:`format` and
    :meth:`to_json` report them; :attr:`warning` when most were); ``options`` holds
    the EnvPool options played under. ``std`` is the population std (ddof=0).
    """

    returns: np.ndarray
    lengths: np.ndarray
    env_id: str = ""
    preset: str = ""
    mode: str = "greedy"
    epsilon: float | None = None
    seed: int = 0
    num_envs: int = 0
    requested: int = 0
    steps: int = 0
    video: str | None = None
    max_episode_steps: int | None = None
    reset_on_life_loss: bool = False
    capped: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def episodes(self) -> int:
        return int(len(self.returns))

    def _stat(self, fn, values=None) -> float:
        return float(fn(self.returns if values is None else values)) if self.episodes else math.nan

    mean = property(lambda self: self._stat(np.mean))
    std = property(lambda self: self._stat(np.std))
    min = property(lambda self: self._stat(np.min))
    max = property(lambda self: self._stat(np.max))
    mean_length = property(lambda self: self._stat(np.mean, self.lengths))

    def format(self) -> str:
        """``"mean ± std (min .. max) over N episodes"``, plus how many the step cap cut,
        e.g. ``"; 3 of 3 cut by the 27,000-step cap (max_episode_steps): the policy may be
        stuck"`` (the last words when most were cut, as :attr:`warning`)."""
        if not self.episodes:
            return "no finished episodes"
        n = self.episodes
        cap = f"the {self.max_episode_steps:,}-step cap" if self.max_episode_steps else "the step cap"
        stuck = ": the policy may be stuck" if self.warning else ""
        capped = f"; {self.capped} of {n} cut by {cap} (max_episode_steps){stuck}" if self.capped else ""
        return (
            f"{self.mean:.2f} ± {self.std:.2f} ({self.min:g} .. {self.max:g}) "
            f"over {n} episode{'s' if n != 1 else ''}{capped}"
        )

    @property
    def warning(self) -> str | None:
        """One sentence when most counted episodes hit the step cap (a stuck policy,
        e.g. one waiting for a FIRE nobody presses); ``None`` otherwise."""
        if not self.episodes or 2 * self.capped <= self.episodes:
            return None
        return (f"{self.capped} of {self.episodes} episodes ended at the step cap, not by game over: the policy "
                "may be stuck (idle or looping); the mean is the score it reached before the cap.")

    __str__ = format

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return dict(
            env_id=self.env_id, preset=self.preset, mode=self.mode, epsilon=self.epsilon, seed=self.seed,
            num_envs=self.num_envs, requested=self.requested, episodes=self.episodes, steps=self.steps,
            reset_on_life_loss=self.reset_on_life_loss, mean=num(self.mean), std=num(self.std),
            min=num(self.min), max=num(self.max), mean_length=num(self.mean_length),
            returns=[float(r) for r in self.returns], lengths=[int(n) for n in self.lengths],
            video=self.video, max_episode_steps=self.max_episode_steps, capped=self.capped, warning=self.warning,
            options=self.options,
        )


class _ById:
    """Hashes an unhashable policy callable by identity so it can be a static arg."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


@functools.partial(jax.jit, static_argnames=("policy_fn", "mode", "num_actions"))
def _act(params, carry, obs, first, key, epsilon, *, policy_fn, mode: str, num_actions: int):
    """One policy step on ``obs [B, ...]``, ``first [B]``: ``-> (carry, action [B], key)``."""
    B = obs.shape[0]
    out = policy_fn(params, carry, obs[None], first[None])
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise EvalError("The policy must return a tuple (carry, logits_or_q [T, B, A], ...); got "
                        f"{type(out).__name__}. Wrap a Q-network with jaxatari.evaluate.q_policy.")
    carry, logits = out[0], out[1]
    if getattr(logits, "shape", None) != (1, B, num_actions):
        raise EvalError(f"The policy's second output has shape {getattr(logits, 'shape', None)}; expected [T, B, A] "
                        f"= (1, {B}, {num_actions}) (logits or Q-values for the env's {num_actions} actions).")
    logits = logits[0].astype(jnp.float32)
    key, k_sample, k_explore = jax.random.split(key, 3)
    greedy = jnp.argmax(logits, axis=-1)
    if mode == "greedy":
        action = greedy
    elif mode == "sample":
        action = jax.random.categorical(k_sample, logits, axis=-1)
    else:  # epsilon
        explore = jax.random.uniform(k_explore, (B,)) < epsilon
        random = jax.random.randint(k_sample, (B,), 0, num_actions)
        action = jnp.where(explore, random, greedy)
    return carry, action.astype(jnp.int32), key


def default_mode(is_q: bool) -> str:
    """The evaluation protocol's action choice for a policy: ``epsilon`` (with
    :data:`EVAL_EPSILON`) for a Q-network (``is_q``), ``sample`` (its own action
    distribution, as it acted in training) for an actor-critic or cloned policy."""
    return "epsilon" if is_q else "sample"


def q_policy(q_apply: Callable[[Any, jax.Array], jax.Array]) -> PolicyFn:
    """Adapt a Q-network ``q_apply(params, obs [N, ...]) -> q [N, A]`` (e.g.
    ``QNetwork(spec).apply``) to the policy interface; its carry is ``()``.

    Returns a function usable as ``evaluate``'s ``policy_fn``. Call it once and
    reuse the result so the compiled step is reused across evaluations.
    """

    def policy_fn(params, carry, obs, first):
        T, B = obs.shape[:2]
        q = q_apply(params, obs.reshape(T * B, *obs.shape[2:])).reshape(T, B, -1)
        return carry, q, q.max(axis=-1)

    return policy_fn


@functools.lru_cache(maxsize=None)
def random_policy(num_actions: int) -> PolicyFn:
    """Uniform logits over ``num_actions``: with ``mode="sample"`` a uniformly random
    agent, the baseline a trained policy must beat. Cached, so it compiles once."""

    def policy_fn(params, carry, obs, first):
        T, B = obs.shape[:2]
        return carry, jnp.zeros((T, B, num_actions)), jnp.zeros((T, B))

    return policy_fn


class _VideoWriter:
    """Streams RGB frames ``[H, W, 3] uint8`` to an ``.mp4`` or collects them for a ``.gif``."""

    def __init__(self, path: Path, fps: float):
        self.path = path
        self.fps = fps
        self.ext = path.suffix.lower()
        self.frames = 0
        self._writer = None
        self._gif: list = []

    def add(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self.ext == ".mp4":
            h, w = frame.shape[:2]
            if h % 2 or w % 2:  # yuv420p needs even sides: pad with black
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
            if self._writer is None:
                import imageio.v2 as iio

                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = iio.get_writer(
                    str(self.path), format="FFMPEG", mode="I", fps=self.fps,
                    codec="libx264", pixelformat="yuv420p", macro_block_size=1,
                    ffmpeg_log_level="error", output_params=["-movflags", "+faststart"],
                )
            # The first frame starts ffmpeg (fork + exec at once), which JAX's fork warning does not concern.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                self._writer.append_data(frame)
        else:
            from PIL import Image

            self._gif.append(Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._gif:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._gif[0].save(self.path, save_all=True, append_images=self._gif[1:],
                              duration=gif_frame_ms(self.fps), loop=0)
            self._gif = []


def gif_frame_ms(fps: float) -> int:
    """The per-frame GIF delay used for ``fps``: a multiple of 10 ms (GIF's unit), at
    least 20 ms (browsers slow down shorter delays)."""
    return 10 * max(2, round(100.0 / fps))


def _render0(env, env_id: str) -> np.ndarray:
    try:
        frames = env.render(env_ids=[0])
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"Video needs an env EnvPool can render as RGB (Atari *-v5, classic control); "
                        f"{env_id} failed to render: {type(e).__name__}: {e}") from e
    frame = np.asarray(frames)[0]
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise EvalError(f"{env_id} rendered a frame of shape {frame.shape}; video needs [H, W, 3] RGB.")
    return frame


def episode_quotas(episodes: int, num_envs: int) -> np.ndarray:
    """Episodes counted per env: ``ceil`` for the first ``episodes % num_envs`` envs,
    ``floor`` for the rest, summing to ``episodes``."""
    q, r = divmod(episodes, num_envs)
    return np.array([q + (i < r) for i in range(num_envs)], np.int64)


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        none = " or None" if optional else ""
        raise EvalError(f"{name}={value!r} is not accepted: it must be an integer >= {minimum}{none}.")


def check_arguments(*, episodes: int = 30, num_envs: int | None = None, mode: str = "greedy",
                    epsilon: float = EVAL_EPSILON, video: str | Path | None = None, video_fps: float = 30,
                    video_episodes: int = 1, max_video_frames: int | None = None, max_steps: int | None = None,
                    max_episode_steps: int | None = None) -> None:
    """Raise :class:`EvalError` naming the first bad argument of :func:`evaluate` (same
    names and defaults) and what is accepted. Cheap: a CLI calls it before loading a policy."""
    _check_int("episodes", episodes, 1)
    _check_int("num_envs", num_envs, 1, optional=True)
    _check_int("max_steps", max_steps, 1, optional=True)
    _check_int("max_episode_steps", max_episode_steps, 1, optional=True)
    if mode not in MODES:
        raise EvalError(f"mode={mode!r} is not accepted; use one of {', '.join(MODES)}.")
    if mode == "epsilon" and not (isinstance(epsilon, (int, float)) and 0.0 <= epsilon <= 1.0):
        raise EvalError(f"epsilon={epsilon!r} is not accepted: it must be a number in [0, 1].")
    if video is not None:
        suffix = Path(video).suffix.lower()
        if suffix not in VIDEO_EXTENSIONS:
            raise EvalError(f"video={str(video)!r} has extension {suffix or '(none)'!r}; accepted: "
                            f"{', '.join(VIDEO_EXTENSIONS)}.")
        if suffix == ".mp4":
            try:  # before any game is played: the writer needs imageio-ffmpeg's ffmpeg binary
                import imageio_ffmpeg

                imageio_ffmpeg.get_ffmpeg_exe()
            except (ImportError, RuntimeError) as e:
                raise EvalError(f"video={str(video)!r}: mp4 needs ffmpeg through imageio-ffmpeg, which is not usable "
                                f"here ({type(e).__name__}: {e}); pip install imageio-ffmpeg, or record a .gif.") from None
        if not (isinstance(video_fps, (int, float)) and video_fps > 0):
            raise EvalError(f"video_fps={video_fps!r} is not accepted: it must be a number > 0.")
        _check_int("video_episodes", video_episodes, 1)
        _check_int("max_video_frames", max_video_frames, 1, optional=True)


def evaluate(
    policy_fn: PolicyFn,
    params: Any,
    initial_carry: Callable[[int], Any] | Any = None,
    *,
    env_id: str,
    preset: str | None = None,
    options: dict[str, Any] | None = None,
    episodes: int = 30,
    num_envs: int | None = None,
    seed: int = 0,
    mode: str = "greedy",
    epsilon: float = EVAL_EPSILON,
    video: str | Path | None = None,
    video_fps: float = 30,
    video_episodes: int = 1,
    max_video_frames: int | None = None,
    max_steps: int | None = None,
    max_episode_steps: int | None = None,
    reset_on_life_loss: bool = False,
) -> EvalResult:
    """Play ``episodes`` full games with ``policy_fn`` and return their :class:`EvalResult`.

    The env steps under the given ``preset`` and ``options`` unchanged: on the
    ``nature`` preset that includes ``episodic_life`` with ``use_fire_reset``, so
    EnvPool presses FIRE after each lost life, as in training. Scores are full
    games, unclipped, whatever the dynamics (:class:`FullGames`): the sum of
    ``info["reward"]`` up to the real game over (not a lost life) or the time limit
    ``max_episode_steps`` (such a game counts with its score so far and in
    ``EvalResult.capped``). Lengths count agent steps; EnvPool's reset steps are
    played but not counted. Env ``i`` of ``num_envs`` counts only its first
    ``episode_quotas(episodes, num_envs)[i]`` games, so short games are not favoured.
    ``first`` is set after each EnvPool reset step (a new game, or a new life under
    ``episodic_life``) and the recurrent carry flows across steps. The policy step
    is jitted once per (policy, mode, shapes) and reused by later calls.

    Args:
      policy_fn: ``(params, carry, obs [T, B, ...], first [T, B]) -> (carry,
        logits_or_q [T, B, A], ...)``, e.g. ``ActorCritic.apply`` or
        :func:`q_policy`. Must be a pure function (it is jitted).
      params: the policy's parameters.
      initial_carry: ``initial_carry(batch_size)`` -> the zero recurrent state, or
        the state itself for ``num_envs`` envs; ``None`` means ``()`` (feed-forward).
      env_id, preset, options: as in :func:`jaxatari.envs.make`: the dynamics the
        games are played under (``EvalResult.options`` records them). Pass the
        training run's (``LoadedPolicy.env_kwargs``) to measure the agent as it trained.
      episodes: finished episodes to count.
      num_envs: parallel envs; default ``min(episodes, 8)``.
      seed: env seed (env ``i`` gets ``seed + i``) and the action-sampling key.
        Use seeds different from training.
      mode: ``greedy`` (argmax), ``sample`` (categorical on the logits) or
        ``epsilon`` (argmax, uniform random with probability ``epsilon``); see
        :func:`default_mode`.
      video: ``*.mp4`` (H.264, yuv420p, padded to even size) or ``*.gif`` path:
        env 0 itself is rendered (RGB) after every agent step, so the video is the
        game scored; its first ``video_episodes`` episodes are written (at most
        ``max_video_frames`` frames), one frame per agent step plus each episode's
        first; missing parent directories are created. Env 0 keeps playing until
        they are recorded even if its quota is met. A GIF's delay is
        :func:`gif_frame_ms`, and Pillow merges identical consecutive frames.
      video_fps: frames per second of the video (one frame per agent step).
      max_steps: safety cap on batched env steps; episodes unfinished by then are
        dropped (with a warning) and ``EvalResult.episodes < episodes``.
      max_episode_steps: EnvPool's per-episode time limit in agent steps, set on top
        of ``options``; an episode reaching it ends (truncated) and counts with its
        score so far. ``None``: the env's own limit (``options``, else the preset's:
        27,000 for the Atari presets; EnvPool's default otherwise, e.g. 500 for
        CartPole-v1).
      reset_on_life_loss: also set ``first`` on the observation after each frame
        that lost a life with lives left (EnvPool's ``info["lives"]``), so a
        recurrent carry restarts there as it did in training under
        ``episodic_life`` (:class:`LifeResets`); pass
        :func:`resets_at_life_loss` of the training options. Feed-forward policies
        ignore ``first``. Refused for envs without ``info["lives"]``.
    """
    check_arguments(episodes=episodes, num_envs=num_envs, mode=mode, epsilon=epsilon, video=video,
                    video_fps=video_fps, video_episodes=video_episodes, max_video_frames=max_video_frames,
                    max_steps=max_steps, max_episode_steps=max_episode_steps)
    if not isinstance(reset_on_life_loss, (bool, np.bool_)):
        raise EvalError(f"reset_on_life_loss={reset_on_life_loss!r} is not accepted; use True or False.")
    if reset_on_life_loss:
        envs.validate_env_id(env_id)  # a mistyped id is named as such, not as a game without lives
        if not envs.is_atari(env_id):
            raise EvalError(f"reset_on_life_loss=True is not accepted for {env_id}: it has no lives (Atari games do).")
    reset_on_life_loss = bool(reset_on_life_loss)
    num_envs = num_envs or min(episodes, DEFAULT_MAX_NUM_ENVS)
    opts = dict(options or {})
    if max_episode_steps is not None:
        opts["max_episode_steps"] = int(max_episode_steps)
    env, spec = envs.make(env_id, num_envs, seed=seed, preset=preset, options=opts,
                          render_mode="rgb_array" if video is not None else None)
    limit = getattr(getattr(getattr(env, "spec", None), "config", None), "max_episode_steps", None)
    writer = _VideoWriter(Path(video), float(video_fps)) if video is not None else None

    try:
        try:
            hash(policy_fn)
        except TypeError:
            policy_fn = _ById(policy_fn)
        act = functools.partial(_act, policy_fn=policy_fn, mode=mode, num_actions=spec.num_actions)
        carry = initial_carry(num_envs) if callable(initial_carry) else (
            () if initial_carry is None else initial_carry)
        key = jax.random.key(seed)
        eps = jnp.float32(epsilon if mode == "epsilon" else 0.0)

        returns, lengths, capped, steps = _play(
            env, act, params, carry, key, eps, quotas=episode_quotas(episodes, num_envs), writer=writer,
            env_id=env_id, video_episodes=video_episodes, max_video_frames=max_video_frames,
            max_steps=max_steps, reset_on_life_loss=reset_on_life_loss)
    finally:
        if writer is not None:
            writer.close()
        env.close()

    if len(returns) < episodes:
        log.warning("max_steps=%d reached with %d of %d episodes finished on %s; the result counts "
                    "only the finished ones.", max_steps, len(returns), episodes, env_id)
    result = EvalResult(
        returns=np.asarray(returns, np.float64), lengths=np.asarray(lengths, np.int64), env_id=env_id,
        preset=spec.preset, mode=mode, epsilon=float(epsilon) if mode == "epsilon" else None, seed=int(seed),
        num_envs=num_envs, requested=episodes, steps=steps, video=str(video) if video is not None else None,
        max_episode_steps=None if limit is None else int(limit), reset_on_life_loss=reset_on_life_loss,
        capped=int(capped), options=dict(spec.options),
    )
    if result.warning:
        log.warning("%s: %s", env_id, result.warning)
    return result


def _play(env, act, params, carry, key, eps, *, quotas, writer, env_id, video_episodes,
          max_video_frames, max_steps, reset_on_life_loss=False):
    """The host loop. Returns ``(returns, lengths, capped, steps)``, ordered by env then episode."""
    B = len(quotas)
    obs, info = env.reset()
    games = FullGames(info, B, reset_on_life_loss=reset_on_life_loss)
    first = np.ones(B, bool)
    counted = np.zeros(B, np.int64)
    per_env: list[list[tuple[float, int, bool]]] = [[] for _ in range(B)]
    video_done, video_cap = 0, max_video_frames if max_video_frames is not None else math.inf
    if recording := writer is not None:
        writer.add(_render0(env, env_id))
        recording = writer.frames < video_cap
    steps = 0
    while (counted < quotas).any() or recording:
        if max_steps is not None and steps >= max_steps:
            break
        carry, action, key = act(params, carry, obs, first, key, eps)
        obs, reward, term, trunc, info = env.step(np.asarray(action))
        steps += 1
        g = games.step(reward, term, trunc, info)
        for b in np.flatnonzero(g.ended):
            if counted[b] < quotas[b]:
                per_env[b].append((float(g.returns[b]), int(g.lengths[b]), bool(g.capped[b])))
                counted[b] += 1
        first = g.first
        if recording:
            # a valid step shows the frame after the action; a reset step the new game's (or life's) first
            writer.add(_render0(env, env_id))
            video_done += int(g.ended[0])
            recording = video_done < video_episodes and writer.frames < video_cap
    episodes = [ep for env_eps in per_env for ep in env_eps]
    return [r for r, _, _ in episodes], [n for _, n, _ in episodes], sum(c for _, _, c in episodes), steps


class GameStep(NamedTuple):
    """What one env step did to the full games of a batch, each field ``[B]``.

    ``first``: the observation just returned starts an episode for the policy: a new
    game, a new life under ``episodic_life`` (as in training), or a :class:`LifeResets` restart.
    """

    valid: np.ndarray  # an agent step, not EnvPool's reset step (after a game or, under episodic_life, a life)
    ended: np.ndarray  # a full game ended here: the real game over or the time limit, never a lost life
    capped: np.ndarray  # of ended, the games cut by the time limit (truncated without a game over)
    returns: np.ndarray  # full-game return so far, unclipped (the final score where ended)
    lengths: np.ndarray  # agent steps so far (the game's length where ended)
    first: np.ndarray
    life_start: np.ndarray  # of first, those inside a game (a new life), not at a new game


class FullGames:
    """Full-game bookkeeping for a host loop over an EnvPool batch, under any dynamics.

    The host twin of :func:`jaxatari.envs.episode_stats_update`: sums EnvPool's
    unclipped ``info["reward"]`` and ends a game only at the real game over
    (``info["terminated"]``) or the time limit, whether or not ``episodic_life``
    ends an EnvPool episode at each lost life. EnvPool's reset steps add neither
    reward nor length. Shared by :func:`evaluate` and
    :func:`jaxatari.data.collect`::

        games = FullGames(info, B)                 # info of env.reset()
        obs, reward, term, trunc, info = env.step(actions)
        g = games.step(reward, term, trunc, info)  # GameStep, [B] each
    """

    def __init__(self, info: dict[str, Any], num_envs: int, *, reset_on_life_loss: bool = False):
        self.reset_step = np.zeros(num_envs, bool)   # the next step is EnvPool's (action-ignoring) reset step
        self.new_game = np.zeros(num_envs, bool)     # ... and it starts a new game (not a new life)
        self.ret = np.zeros(num_envs, np.float64)
        self.len = np.zeros(num_envs, np.int64)
        self.life_resets = LifeResets(info, num_envs) if reset_on_life_loss else None

    def step(self, reward, term, trunc, info: dict[str, Any]) -> GameStep:
        """Account for one ``env.step``'s outputs."""
        term, trunc = np.asarray(term, bool), np.asarray(trunc, bool)
        game_over = np.asarray(info["terminated"], bool) if "terminated" in info else term
        raw = np.asarray(info["reward"] if "reward" in info else reward, np.float64)
        valid = ~self.reset_step
        self.ret += np.where(valid, raw, 0.0)
        self.len += valid
        ended = (game_over | trunc) & valid
        returns, lengths = self.ret.copy(), self.len.copy()
        self.ret[ended], self.len[ended] = 0.0, 0
        first = ~valid
        life_start = first & ~self.new_game
        if self.life_resets is not None:
            restart = self.life_resets.step(info, valid, ended)
            first, life_start = first | restart, life_start | restart
        self.reset_step, self.new_game = (term | trunc) & valid, ended
        return GameStep(valid=valid, ended=ended, capped=ended & trunc & ~game_over, returns=returns,
                        lengths=lengths, first=first, life_start=life_start)


def lives_of(info: dict[str, Any], num_envs: int) -> np.ndarray:
    """EnvPool's ``info["lives"]`` as ``[num_envs]``; :class:`EvalError` if the env reports none."""
    if "lives" not in info:
        raise EvalError("reset_on_life_loss needs EnvPool's info['lives'], which this env does not report.")
    return np.asarray(info["lives"]).reshape(num_envs)


class LifeResets:
    """Where a policy trained under ``episodic_life`` had its recurrent state restart
    mid-game, for a host loop playing full games.

    In training, a step that loses a life (EnvPool ends a life only while lives
    remain: ``0 < lives < before``) ends the episode: its frame is still acted on
    with the old state (EnvPool's reset step, whose action is ignored) and the
    state restarts on the frame after. Here the game goes on, so the state
    restarts on the frame after the life-loss frame too: :meth:`step` returns
    ``[B]`` True for the envs whose just-returned frame is that one. (The action
    taken on the life-loss frame counts here; in training it was ignored.)
    """

    def __init__(self, info: dict[str, Any], num_envs: int):
        self.lives = lives_of(info, num_envs)
        self.pending = np.zeros(num_envs, bool)

    def step(self, info: dict[str, Any], valid: np.ndarray, done: np.ndarray) -> np.ndarray:
        """After one env step (``valid``: not EnvPool's reset step; ``done``: it ended the game)."""
        going_on = valid & ~done
        start = self.pending & going_on
        now = lives_of(info, len(self.lives))
        self.pending = going_on & (now < self.lives) & (now > 0)
        self.lives = now
        return start


def resets_at_life_loss(env_id: str, preset: str | None, options: dict[str, Any] | None = None) -> bool:
    """Whether training under ``preset`` + ``options`` ended an "episode" at each life
    lost (EnvPool's ``episodic_life``; the ``nature`` preset does, ``machado`` does
    not), so a recurrent policy's carry restarted there: the ``reset_on_life_loss``
    that plays it as trained. ``False`` for envs without lives."""
    if not envs.is_atari(env_id):
        return False
    return bool(envs.resolve_options(env_id, preset, options).get("episodic_life", False))


def run_resets_at_life_loss(config: dict[str, Any], recurrent: bool) -> bool:
    """:func:`resets_at_life_loss` for a run's ``config.json``: a recurrent PPO or A2C
    policy trained under ``episodic_life``. BC is not: it learns the expert's
    sequences, which run through whole games."""
    if not recurrent or config.get("algo") not in ("ppo", "a2c"):
        return False
    options = envs.parse_env_options(config.get("env_option", []))
    return resets_at_life_loss(config["env"], config.get("preset"), options)


def actor_critic_eval_fn(net, spec, *, env_id: str, preset, options, episodes: int, seed: int):
    """``params -> mean full-game return``: the trainers' ``--eval-every`` hook for an
    ``ActorCritic`` built from ``spec`` (recurrent or not), played under the
    training dynamics with the policy's own distribution (:func:`default_mode`)."""
    reset = spec.recurrent and resets_at_life_loss(env_id, preset, options)

    def eval_fn(params) -> float:
        return evaluate(net.apply, params, lambda b: initial_carry(spec, b), env_id=env_id, preset=preset,
                        options=options, episodes=episodes, seed=seed, mode=default_mode(is_q=False),
                        reset_on_life_loss=reset).mean

    return eval_fn
