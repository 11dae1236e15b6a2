"""Score a trained policy on full games, and optionally record a video.

    python scripts/evaluate.py --run-dir RUN_DIR --episodes 30 [--video play.mp4]

Plays full games (no episodic life, unclipped rewards; sticky actions, no-op
starts and the time limit as in the run's preset, the limit overridable with
--max-episode-steps), prints mean ± std and min/max, and writes ``eval.json``
into the run directory, naming the checkpoint actually evaluated (``checkpoint``:
best or latest, ``checkpoint_step``) after any fallback from an unreadable best.
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
    mode: str = "greedy"
    """greedy, sample (from the policy's distribution; PPO/A2C/BC runs, not DQN) or epsilon (epsilon-greedy)."""
    epsilon: float = 0.001
    """Epsilon for --mode epsilon."""
    num_envs: int | None = None
    """Parallel envs (default: min(episodes, 8))."""
    seed: int = 10_000
    """Evaluation seed (differs from training seeds)."""
    video: str | None = None
    """Record env 0's first episode to this .mp4 or .gif (missing parent directories are created)."""
    video_episodes: int = 1
    """Episodes to record."""
    preset: str | None = None
    """Override the run's env preset (e.g. machado)."""
    max_episode_steps: int | None = None
    """Cap each game at this many agent steps (EnvPool's max_episode_steps).
    A game cut there counts with its score so far.
    Default: the run's own limit (Atari presets: 27,000 steps, a 15-minute video at 30 fps)."""


def main(cfg: Config) -> int:
    from jaxatari import envs, runner
    from jaxatari.checkpoint import CheckpointError, find_run_dir
    from jaxatari.evaluate import EvalError, check_arguments, evaluate, load_checkpoint

    try:
        if cfg.checkpoint not in ("best", "latest"):
            raise EvalError(f"--checkpoint {cfg.checkpoint!r} is not accepted; use best or latest.")
        check_arguments(episodes=cfg.episodes, num_envs=cfg.num_envs, mode=cfg.mode, epsilon=cfg.epsilon,
                        video=cfg.video, video_episodes=cfg.video_episodes, max_episode_steps=cfg.max_episode_steps)
        pol, loaded = load_checkpoint(cfg.run_dir, cfg.checkpoint)
        c = pol.config
        if pol.is_q and cfg.mode == "sample":
            raise EvalError("--mode sample is not accepted for a DQN run: its network outputs Q-values, not a "
                            "distribution; use greedy or epsilon.")
        options = envs.parse_env_options(c.get("env_option", []))
        res = evaluate(pol.policy_fn, pol.params, pol.initial_carry, env_id=c["env"],
                       preset=cfg.preset or c.get("preset"), options=options, episodes=cfg.episodes,
                       num_envs=cfg.num_envs, seed=cfg.seed, mode=cfg.mode, epsilon=cfg.epsilon,
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
    print(f"{c['env']} ({c['algo']}, {loaded['checkpoint']} checkpoint, env step {step_text}): {res.format()}")
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
