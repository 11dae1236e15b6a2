"""Score a trained policy on full games, and optionally record a video.

    python scripts/evaluate.py --run-dir RUN_DIR --episodes 30 [--video play.mp4]

Plays full games under the dynamics the agent trained under (the run's preset and
env options: on ``nature``, EnvPool presses FIRE after each lost life as in
training), scores them unclipped to the real game over, prints mean ± std,
min/max and how many games the step cap cut (``3 of 3 cut by the 27,000-step cap
(max_episode_steps): the policy may be stuck``), and writes ``eval.json`` into the
run directory: the options played, the mode, ``capped`` and ``warning``, and the
checkpoint actually evaluated (``checkpoint``: best or latest, ``checkpoint_step``)
after any fallback from an unreadable best. ``--preset`` and ``--env-option`` play another protocol.
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import tyro


@dataclasses.dataclass(frozen=True)
class Config:
    """Evaluate a run's policy."""

    run_dir: str
    """Run directory (or a checkpoint directory inside one)."""
    episodes: int = 30
    """Full games to play."""
    checkpoint: str = "best"
    """best (highest score; if none is readable, the newest readable latest) or latest.
    eval.json records the one actually loaded."""
    mode: str | None = None
    """sample (the policy's own distribution; PPO/A2C/BC), epsilon (epsilon-greedy) or greedy.
    Default: sample; epsilon for a Q-network (DQN, PQN)."""
    epsilon: float = 0.001
    """Epsilon for --mode epsilon (0.001: Dopamine's DQN protocol; 0.05: Nature DQN's)."""
    num_envs: int | None = None
    """Parallel envs (default: min(episodes, 8))."""
    seed: int = 10_000
    """Evaluation seed (differs from training seeds)."""
    video: str | None = None
    """Record env 0's first episode to this .mp4 or .gif (missing parent directories are created)."""
    video_episodes: int = 1
    """Episodes to record."""
    preset: str | None = None
    """Play under another env preset than the run's (e.g. machado: sticky actions)."""
    env_option: tuple[str, ...] = ()
    """EnvPool options on top of the run's, KEY=VALUE (e.g. use_fire_reset=false episodic_life=false)."""
    max_episode_steps: int | None = None
    """Cap each game at this many agent steps (EnvPool's max_episode_steps).
    A game cut there counts with its score so far; the result line and eval.json (capped) count them.
    Default: the run's own limit (Atari presets: 27,000 steps, a 15-minute video at 30 fps)."""


def main(cfg: Config) -> int:
    from jaxatari import envs, runner
    from jaxatari.checkpoint import CheckpointError
    from jaxatari.evaluate import EvalError, check_arguments, default_mode, evaluate
    from jaxatari.policy import find_run_dir, load_checkpoint

    try:
        if cfg.checkpoint not in ("best", "latest"):
            raise EvalError(f"--checkpoint {cfg.checkpoint!r} is not accepted; use best or latest.")
        check_arguments(episodes=cfg.episodes, num_envs=cfg.num_envs, mode=cfg.mode or "greedy",
                        epsilon=cfg.epsilon, video=cfg.video, video_episodes=cfg.video_episodes,
                        max_episode_steps=cfg.max_episode_steps)
        extra = envs.parse_env_options(cfg.env_option)
        pol, loaded = load_checkpoint(cfg.run_dir, cfg.checkpoint)
        c = pol.config
        if pol.is_q and cfg.mode == "sample":
            raise EvalError("--mode sample is not accepted for a DQN run: its network outputs Q-values, not a "
                            "distribution; use epsilon or greedy.")
        mode = cfg.mode or default_mode(pol.is_q)
        options = {**envs.parse_env_options(c.get("env_option", [])), **extra}
        res = evaluate(pol.policy_fn, pol.params, pol.initial_carry, env_id=c["env"],
                       preset=cfg.preset or c.get("preset"), options=options, episodes=cfg.episodes,
                       num_envs=cfg.num_envs, seed=cfg.seed, mode=mode, epsilon=cfg.epsilon,
                       video=cfg.video, video_episodes=cfg.video_episodes,
                       max_episode_steps=cfg.max_episode_steps,
                       reset_on_life_loss=pol.reset_on_life_loss)
    except (CheckpointError, EvalError, envs.EnvError, runner.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = loaded["checkpoint_step"]
    if loaded["checkpoint"] != cfg.checkpoint:
        print(f"note: no readable {cfg.checkpoint} checkpoint; evaluated the {loaded['checkpoint']} one "
              f"(env step {step}).", file=sys.stderr)
    step_text = f"{step:,}" if isinstance(step, int) else "?"
    how = f"{mode} {cfg.epsilon:g}" if mode == "epsilon" else mode
    print(f"{c['env']} ({c['algo']}, {loaded['checkpoint']} checkpoint, env step {step_text}, {how}, preset "
          f"{res.preset}): {res.format()}")
    if cfg.video:
        print(f"video: {cfg.video}")
    out = dict(res.to_json(), **loaded, checkpoint_requested=cfg.checkpoint)
    # The run directory holding the config.json just read (not the path stored in it: the run may have moved).
    target = find_run_dir(Path(cfg.run_dir)) / "eval.json"
    target.write_text(json.dumps(out, indent=2))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Config, description=__doc__)))
