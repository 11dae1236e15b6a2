"""Closed-loop evaluation: episode counting, ``first`` flags, one compile, video."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from PIL import Image, ImageSequence

from jaxatari import envs
from jaxatari.evaluate import (
    EvalError, EvalResult, FullGames, check_arguments, default_mode, episode_quotas, evaluate, gif_frame_ms, q_policy,
    random_policy, LifeResets, resets_at_life_loss, run_resets_at_life_loss,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # gymnasium's Box precision notes
    # reading videos back starts ffmpeg with subprocess (fork + exec at once)
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
]

CARTPOLE_ACTIONS = 2


def left_policy(params, carry, obs, first):
    logits = jnp.zeros(obs.shape[:2] + (CARTPOLE_ACTIONS,)).at[..., 0].set(1.0)
    return carry, logits, jnp.zeros(obs.shape[:2])


def reference_left_lengths(num_envs: int, quotas: list[int], seed: int) -> list[int]:
    """Always-push-left CartPole lengths from a plain loop over one single-env pool per
    env (env i of a batch is seeded seed + i), read off EnvPool's ``elapsed_step``."""
    out = []
    for b in range(num_envs):
        env, _ = envs.make("CartPole-v1", 1, seed=seed + b)
        env.reset()
        lengths: list[int] = []
        while len(lengths) < quotas[b]:
            _, _, term, trunc, info = env.step(np.zeros(1, np.int32))
            if term[0] or trunc[0]:
                lengths.append(int(info["elapsed_step"][0]))
                env.step(np.zeros(1, np.int32))  # EnvPool's auto-reset step
        out += lengths
    return out


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


def test_quotas_split_episodes_evenly():
    assert episode_quotas(7, 3).tolist() == [3, 2, 2]
    assert episode_quotas(8, 4).tolist() == [2, 2, 2, 2]
    assert episode_quotas(2, 4).tolist() == [1, 1, 0, 0]
    assert episode_quotas(30, 8).sum() == 30


def test_random_cartpole_counts_exactly_n_episodes():
    # 30 episodes over 4 envs: quotas 8, 8, 7, 7.
    r = evaluate(random_policy(2), None, None, env_id="CartPole-v1", episodes=30, num_envs=4,
                 mode="sample", seed=3)
    assert r.episodes == 30 == len(r.lengths)
    np.testing.assert_array_equal(r.returns, r.lengths)  # reward 1 per step
    # A uniformly random CartPole policy lasts ~22 steps on average.
    assert 12 < r.mean < 40, r.lengths
    assert r.lengths.min() >= 8 and r.lengths.max() <= 500


def test_always_left_matches_a_plain_loop():
    # 7 episodes over 3 envs: quotas 3, 2, 2, ordered by env then episode.
    r = evaluate(left_policy, None, None, env_id="CartPole-v1", episodes=7, num_envs=3, seed=11)
    expected = reference_left_lengths(3, [3, 2, 2], seed=11)
    assert r.lengths.tolist() == expected
    assert all(7 <= n <= 12 for n in expected), expected  # pushing left topples it fast


def test_q_policy_wraps_a_q_network():
    def q_apply(params, obs):  # obs [N, 4] -> q [N, 2]: always prefers "left"
        return jnp.broadcast_to(params, (obs.shape[0], CARTPOLE_ACTIONS))

    r = evaluate(q_policy(q_apply), jnp.array([1.0, 0.0]), None, env_id="CartPole-v1",
                 episodes=3, num_envs=2, seed=5, mode="epsilon", epsilon=0.0)
    assert r.lengths.tolist() == reference_left_lengths(2, [2, 1], seed=5)


# ---------------------------------------------------------------------------
# first flags and the recurrent carry
# ---------------------------------------------------------------------------


def test_first_marks_exactly_each_episode_start():
    """The carry counts steps since ``first``; the policy pushes right on odd counts.

    Replaying the same env with actions from EnvPool's own ``elapsed_step`` must
    reproduce every observation, and at every call the carry must equal the
    ``elapsed_step`` of the observation it sees (0 exactly at a first observation;
    the final observation, seen again on the ignored reset step, keeps counting).
    A ``first`` one step early or late, a carry not carried, or a carry not reset
    on the very first step (it starts at 99) all fail.
    """
    calls = []

    def record(count, first, obs):
        calls.append((np.asarray(count), np.asarray(first), np.asarray(obs)))

    def counting_policy(params, carry, obs, first):
        count = jnp.where(first[0], 0, carry)
        io_callback(record, None, count, first[0], obs[0], ordered=True)
        logits = 10.0 * jax.nn.one_hot(count % 2, CARTPOLE_ACTIONS)[None]
        return count + 1, logits, jnp.zeros(obs.shape[:2])

    B = 3
    r = evaluate(counting_policy, None, lambda b: jnp.full((b,), 99, jnp.int32),
                 env_id="CartPole-v1", episodes=6, num_envs=B, seed=21)
    assert r.episodes == 6
    assert len(calls) == r.steps

    env, _ = envs.make("CartPole-v1", B, seed=21)
    obs, info = env.reset()
    starts = 0
    for count, first, seen in calls:
        np.testing.assert_allclose(seen, obs, rtol=1e-6)
        elapsed = info["elapsed_step"]
        np.testing.assert_array_equal(count, elapsed)
        np.testing.assert_array_equal(first, elapsed == 0)
        starts += first.sum()
        obs, _, _, _, info = env.step((elapsed % 2).astype(np.int32))
    assert starts >= B + 6 - 1  # every env's start plus the later episodes' starts


# ---------------------------------------------------------------------------
# Full games under the training dynamics
# ---------------------------------------------------------------------------


def scripted_policy(actions: np.ndarray, num_actions: int):
    """Acts ``actions[t % len]`` at its ``t``-th call in every env, whatever it sees
    (the carry counts calls, EnvPool's reset steps included), so a plain loop can
    replay the same actions."""
    table = jnp.asarray(actions, jnp.int32)

    def policy(params, carry, obs, first):
        logits = 10.0 * jax.nn.one_hot(table[carry % len(table)], num_actions)[None]
        return carry + 1, logits, jnp.zeros(obs.shape[:2])

    return policy


def host_full_games(env_id: str, actions: np.ndarray, num_envs: int, seed: int, options: dict):
    """The first full-game score of each env from a plain loop over EnvPool with the
    same options: the sum of the unclipped ``info["reward"]`` up to the real game over;
    and whether any single reward was above 1."""
    env, _ = envs.make(env_id, num_envs, seed=seed, preset="nature", options=options)
    env.reset()
    ret, final, saw_big = np.zeros(num_envs), [None] * num_envs, False
    t = 0
    while any(f is None for f in final):
        _, reward, _, trunc, info = env.step(np.full(num_envs, actions[t % len(actions)], np.int32))
        t += 1
        assert not trunc.any(), "a game hit the step cap"
        assert set(np.unique(reward)) <= {-1.0, 0.0, 1.0}  # the training reward is clipped
        saw_big |= bool((info["reward"] > 1).any())
        ret += info["reward"]
        for b in np.flatnonzero(info["terminated"]):
            final[b] = ret[b] if final[b] is None else final[b]
    env.close()
    return final, saw_big


@pytest.mark.parametrize("env_id", ["Breakout-v5", "SpaceInvaders-v5"])
def test_full_games_under_the_training_dynamics_match_a_plain_loop(env_id):
    """A scripted policy (on Breakout one that never presses FIRE: NOOP, RIGHT, LEFT)
    played by ``evaluate`` under the run's ``nature`` dynamics: every game ends by
    game over, not at the cap (EnvPool presses FIRE after each lost life, as in
    training), and each score equals a plain loop's sum of the unclipped
    ``info["reward"]`` up to the real game over, points > 1 a hit included."""
    rng = np.random.default_rng(0)
    num_actions = {"Breakout-v5": 4, "SpaceInvaders-v5": 6}[env_id]
    actions = rng.choice([0, 2, 3] if env_id == "Breakout-v5" else num_actions, size=97)
    policy = scripted_policy(actions, num_actions)
    cap = 5_000
    r = evaluate(policy, None, lambda b: jnp.zeros((b,), jnp.int32), env_id=env_id, preset="nature",
                 options={"max_episode_steps": cap}, episodes=2, num_envs=2, seed=7, mode="greedy")
    assert r.options["episodic_life"] is True and r.options["use_fire_reset"] is True  # as trained
    assert r.capped == 0 and r.lengths.max() < cap and r.warning is None
    expected, saw_big = host_full_games(env_id, actions, 2, 7, {"max_episode_steps": cap})
    np.testing.assert_array_equal(r.returns, expected)
    if env_id == "SpaceInvaders-v5":
        assert saw_big  # scores above 1 per hit: a clipped sum would differ


def test_full_games_tracker_ends_games_not_lives():
    """FullGames on a hand-written EnvPool trace: a lost life (terminated, no game
    over) and its reset step neither end the game nor add to it; the policy's
    ``first`` comes after each reset step, marked a life start inside a game; a
    truncation ends the game as capped."""
    g = FullGames({"lives": np.array([2])}, 1)

    def step(reward, raw, term, trunc, game_over, lives):
        info = {"reward": np.array([raw], float), "terminated": np.array([game_over]), "lives": np.array([lives])}
        return g.step(np.array([reward], float), np.array([term]), np.array([trunc]), info)

    s = step(1.0, 7.0, False, False, False, 2)
    assert s.valid[0] and not s.ended[0] and not s.first[0]
    s = step(0.0, 0.0, True, False, False, 1)  # a life lost: EnvPool's episode ends, the game does not
    assert not s.ended[0] and s.returns[0] == 7.0
    s = step(0.0, 0.0, False, False, False, 1)  # the reset step (FIRE)
    assert not s.valid[0] and s.first[0] and s.life_start[0] and s.lengths[0] == 2
    s = step(1.0, 5.0, True, False, True, 0)  # game over
    assert s.ended[0] and not s.capped[0] and (s.returns[0], s.lengths[0]) == (12.0, 3)
    s = step(0.0, 0.0, False, False, False, 2)  # the reset step of a new game
    assert s.first[0] and not s.life_start[0] and s.returns[0] == 0.0
    s = step(0.0, 3.0, False, True, False, 2)  # the time limit
    assert s.ended[0] and s.capped[0] and s.returns[0] == 3.0


def test_capped_episodes_are_counted_and_flagged(caplog):
    """Games cut by the step cap are counted in the result, its text and its JSON,
    and a result where most are cut says so in one sentence."""
    with caplog.at_level("WARNING", logger="jaxatari.evaluate"):
        r = evaluate(left_policy, None, env_id="CartPole-v1", episodes=3, num_envs=1, max_episode_steps=4)
    assert r.capped == 3 and r.to_json()["capped"] == 3 and r.lengths.tolist() == [4, 4, 4]
    assert r.format().endswith(
        "over 3 episodes; 3 of 3 cut by the 4-step cap (max_episode_steps): the policy may be stuck")
    assert r.warning.startswith("3 of 3 episodes ended at the step cap, not by game over")
    assert r.warning in caplog.text and r.to_json()["warning"] == r.warning
    free = evaluate(left_policy, None, env_id="CartPole-v1", episodes=2, num_envs=1)
    assert free.capped == 0 and free.warning is None and "cut" not in free.format()
    assert free.to_json()["warning"] is None


def noop_breakout_policy(params, carry, obs, first):
    """Always NOOP on Breakout (4 actions): never launches the ball, as a stuck agent."""
    return carry, jnp.zeros(obs.shape[:2] + (4,)).at[..., 0].set(1.0), jnp.zeros(obs.shape[:2])


def test_stuck_breakout_policy_is_reported_as_cut_by_the_cap():
    """An agent that never launches the ball (FIRE reset off) plays every game to the
    cap: the result line, the JSON and the warning all say so, with the cap's value."""
    r = evaluate(noop_breakout_policy, None, env_id="Breakout-v5", options={"use_fire_reset": False},
                 episodes=2, num_envs=2, seed=5, mode="greedy", max_episode_steps=20)
    assert r.options["max_episode_steps"] == 20 and r.max_episode_steps == 20
    assert r.lengths.tolist() == [20, 20] and r.capped == 2
    assert r.format() == ("0.00 ± 0.00 (0 .. 0) over 2 episodes; 2 of 2 cut by the 20-step cap "
                          "(max_episode_steps): the policy may be stuck")
    d = json.loads(json.dumps(r.to_json()))
    assert (d["capped"], d["max_episode_steps"]) == (2, 20) and d["warning"].startswith("2 of 2 episodes")


def test_a_few_capped_games_are_counted_without_calling_the_policy_stuck():
    r = EvalResult(returns=np.array([1.0, 2.0, 3.0]), lengths=np.array([10, 27_000, 30]), requested=3,
                   max_episode_steps=27_000, capped=1)
    assert r.format() == "2.00 ± 0.82 (1 .. 3) over 3 episodes; 1 of 3 cut by the 27,000-step cap (max_episode_steps)"
    assert r.warning is None
    unknown = dataclasses.replace(r, max_episode_steps=None, capped=2)
    assert unknown.format().endswith("; 2 of 3 cut by the step cap (max_episode_steps): the policy may be stuck")


def test_default_mode_follows_the_protocols():
    assert default_mode(is_q=False) == "sample" and default_mode(is_q=True) == "epsilon"


@pytest.mark.parametrize("reset", [True, False])
def test_reset_on_life_loss_sets_first_exactly_after_each_life_lost(reset):
    """Breakout played without episodic life (one game, lives 5 -> 0), as a user may ask.
    The policy cycles NOOP, FIRE, RIGHT, LEFT from its carry (steps since ``first``),
    so a ``first`` one step early or late changes the game. Replaying it in a
    plain env, ``first`` must come exactly on the frame after each life-loss frame
    (where training's reset step restarted the state; with ``reset``), or only at
    the start."""
    seen = []

    def policy(params, carry, obs, first):
        count = jnp.where(first[0], 0, carry)
        io_callback(lambda f: seen.append(bool(np.asarray(f)[0])), None, first[0], ordered=True)
        return count + 1, 10.0 * jax.nn.one_hot(count % 4, 4)[None], jnp.zeros(obs.shape[:2])

    limit = 700
    r = evaluate(policy, None, lambda b: jnp.zeros((b,), jnp.int32), env_id="Breakout-v5", preset="nature",
                 options={"episodic_life": False}, episodes=1, num_envs=1, seed=3, max_episode_steps=limit,
                 reset_on_life_loss=reset)
    assert r.reset_on_life_loss is reset and r.to_json()["reset_on_life_loss"] is reset
    assert len(seen) == r.steps

    env, _ = envs.make("Breakout-v5", 1, seed=3, preset="nature",
                       options={"episodic_life": False, "max_episode_steps": limit})
    _, info = env.reset()
    lives, count, expected, pending, restarts = int(info["lives"][0]), 0, True, False, 0
    for first in seen:
        assert first is expected
        count = 0 if first else count
        _, _, term, trunc, info = env.step(np.array([count % 4], np.int32))
        count += 1
        now, done = int(info["lives"][0]), bool(term[0] or trunc[0])
        expected = reset and pending and not done
        restarts += expected
        pending, lives = not done and 0 < now < lives, now
    assert done  # the replay ended where the evaluation did
    assert restarts >= 1 or not reset  # the case under test happened


def test_life_resets_follow_episodic_life():
    """EnvPool ends a life only while lives remain (0 < lives < before); the state
    restarts on the frame after the life-loss frame, unless that step ends the game;
    a reset step (invalid) that refills the lives is no loss."""
    def info(*lives):
        return {"lives": np.array(lives)}

    r = LifeResets(info(3, 3), 2)
    yes, no = np.array([True, True]), np.array([False, False])
    steps = [  # (lives after the step, valid, done) -> expected restarts on the frame just returned
        (info(2, 3), yes, no, [False, False]),   # env 0 loses a life
        (info(2, 2), yes, no, [True, False]),    # ... restarts here; env 1 loses one
        (info(2, 1), yes, np.array([False, True]), [False, False]),  # env 1's game ends on the next step
        (info(1, 3), np.array([True, False]), no, [False, False]),    # env 1's reset step refills its lives
        (info(0, 3), yes, no, [True, False]),    # env 0: 1 -> 0 with the game going on is no life lost
        (info(0, 2), yes, no, [False, False]),
        (info(0, 2), yes, no, [False, True]),
    ]
    for i, (inf, valid, done, expected) in enumerate(steps):
        assert r.step(inf, valid, done).tolist() == expected, i
    with pytest.raises(EvalError, match=r"needs EnvPool's info\['lives'\]"):
        LifeResets({}, 2)


def test_which_runs_reset_at_life_loss():
    assert resets_at_life_loss("Breakout-v5", "nature") and not resets_at_life_loss("Breakout-v5", "machado")
    assert not resets_at_life_loss("Breakout-v5", "nature", {"episodic_life": False})
    assert not resets_at_life_loss("CartPole-v1", None)
    run = dict(algo="ppo", env="Breakout-v5", preset="nature")
    assert run_resets_at_life_loss(run, recurrent=True)
    assert not run_resets_at_life_loss(run, recurrent=False)  # feed-forward: nothing to reset
    assert run_resets_at_life_loss(dict(run, algo="a2c"), recurrent=True)
    assert not run_resets_at_life_loss(dict(run, algo="bc"), recurrent=True)  # its sequences span whole games
    assert not run_resets_at_life_loss(dict(run, env_option=["episodic_life=False"]), recurrent=True)
    with pytest.raises(EvalError, match=r"reset_on_life_loss=True is not accepted for CartPole-v1: it has no lives"):
        evaluate(left_policy, None, env_id="CartPole-v1", episodes=1, reset_on_life_loss=True)
    with pytest.raises(envs.EnvError, match=r"Unknown env id 'Breakuot-v5'"):
        evaluate(left_policy, None, env_id="Breakuot-v5", episodes=1, reset_on_life_loss=True)
    with pytest.raises(EvalError, match=r"reset_on_life_loss='yes' is not accepted; use True or False"):
        evaluate(left_policy, None, env_id="CartPole-v1", episodes=1, reset_on_life_loss="yes")


@pytest.mark.parametrize("network,preset,expected", [("cfc", "nature", True), ("cfc", "machado", False),
                                                      ("auto", "nature", False)])
def test_trainers_periodic_eval_plays_recurrent_policies_as_trained(monkeypatch, network, preset, expected):
    """--eval-every's hook (PPO, A2C, populations) asks for the life resets exactly
    for a recurrent policy trained under episodic_life."""
    evaluate_module = importlib.import_module("jaxatari.evaluate")  # the package exports evaluate(), the function
    from jaxatari.networks import ActorCritic, resolve_network_spec

    got = {}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **kw: got.update(kw) or EvalResult(
        returns=np.ones(1), lengths=np.ones(1, np.int64)))
    spec = resolve_network_spec(network, num_actions=4, atari=True)
    eval_fn = evaluate_module.actor_critic_eval_fn(ActorCritic(spec), spec, env_id="Breakout-v5", preset=preset,
                                                   options={}, episodes=1, seed=0)
    assert eval_fn(None) == 1.0 and got["reset_on_life_loss"] is expected


# ---------------------------------------------------------------------------
# Compile once
# ---------------------------------------------------------------------------


def test_policy_step_compiles_once_across_calls():
    traces = []

    def policy(params, carry, obs, first):
        traces.append(obs.shape)
        logits = jnp.broadcast_to(params["bias"], obs.shape[:2] + (CARTPOLE_ACTIONS,))
        return carry, logits, jnp.zeros(obs.shape[:2])

    params = {"bias": jnp.zeros(CARTPOLE_ACTIONS)}
    a = evaluate(policy, params, None, env_id="CartPole-v1", episodes=3, num_envs=2,
                 mode="epsilon", epsilon=0.1, seed=1)
    b = evaluate(policy, params, None, env_id="CartPole-v1", episodes=5, num_envs=2,
                 mode="epsilon", epsilon=0.5, seed=2)
    assert (a.episodes, b.episodes) == (3, 5)
    assert len(traces) == 1, traces


# ---------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------


def test_result_format_and_json():
    r = EvalResult(returns=np.array([1.0, 2.0, 3.0]), lengths=np.array([10, 20, 30]),
                   env_id="Pong-v5", requested=3)
    assert (r.mean, r.min, r.max, r.episodes) == (2.0, 1.0, 3.0, 3)
    assert r.std == pytest.approx(np.sqrt(2 / 3))
    assert r.format() == "2.00 ± 0.82 (1 .. 3) over 3 episodes"
    d = json.loads(json.dumps(r.to_json()))
    assert d["returns"] == [1.0, 2.0, 3.0] and d["lengths"] == [10, 20, 30] and d["episodes"] == 3
    empty = EvalResult(returns=np.zeros(0), lengths=np.zeros(0, int))
    assert empty.format() == "no finished episodes"
    assert json.loads(json.dumps(empty.to_json()))["mean"] is None


def test_max_steps_returns_only_finished_episodes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(left_policy, None, None, env_id="CartPole-v1", episodes=50, num_envs=2,
                     max_steps=25, seed=0)
    assert r.steps == 25 and 0 < r.episodes < 50 and r.requested == 50


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def exploding_policy(*args):
    raise AssertionError("the policy must not be traced for bad input")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(episodes=0), r"episodes=0 .* integer >= 1"),
        (dict(episodes=2.5), r"episodes=2.5 .* integer >= 1"),
        (dict(num_envs=0), r"num_envs=0 .* integer >= 1"),
        (dict(mode="argmax"), r"mode='argmax' .* greedy, sample, epsilon"),
        (dict(mode="epsilon", epsilon=1.5), r"epsilon=1.5 .* \[0, 1\]"),
        (dict(video="play.avi"), r"'play.avi' has extension '.avi'; accepted: .mp4, .gif"),
        (dict(video="play"), r"extension '\(none\)'"),
        (dict(video="play.mp4", video_fps=0), r"video_fps=0"),
        (dict(video="play.gif", video_episodes=0), r"video_episodes=0"),
        (dict(max_steps=0), r"max_steps=0"),
        (dict(max_episode_steps=0), r"max_episode_steps=0 .* integer >= 1"),
        (dict(max_episode_steps=-20), r"^max_episode_steps=-20 is not accepted: it must be an integer >= 1 or None\.$"),
        (dict(max_episode_steps=2.5), r"^max_episode_steps=2.5 is not accepted: it must be an integer >= 1 or None\.$"),
        (dict(max_episode_steps="20"), r"^max_episode_steps='20' is not accepted: it must be an integer >= 1 or None\.$"),
        (dict(max_episode_steps=True), r"^max_episode_steps=True is not accepted"),
    ],
)
def test_bad_input_raises_before_compiling(kwargs, message):
    with pytest.raises(EvalError, match=message):
        evaluate(exploding_policy, None, None, **{"env_id": "CartPole-v1", **kwargs})


def test_unknown_env_names_close_ids():
    with pytest.raises(envs.EnvError, match="Breakout-v5"):
        evaluate(exploding_policy, None, None, env_id="Breakout-v4x")


def test_wrong_policy_output_is_named():
    def three_actions(params, carry, obs, first):
        return carry, jnp.zeros(obs.shape[:2] + (3,)), None

    with pytest.raises(EvalError, match=r"shape \(1, 2, 3\); expected .* \(1, 2, 2\)"):
        evaluate(three_actions, None, None, env_id="CartPole-v1", episodes=2)
    with pytest.raises(EvalError, match="must return a tuple"):
        evaluate(lambda p, c, o, f: jnp.zeros(o.shape[:2] + (2,)), None, None,
                 env_id="CartPole-v1", episodes=2)


# ---------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------


def read_gif(path, fps) -> list[np.ndarray]:
    """All frames of a GIF, re-expanding the runs of identical frames Pillow merges."""
    out = []
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            repeat, rest = divmod(frame.info["duration"], gif_frame_ms(fps))
            assert rest == 0 and repeat >= 1
            out += [np.asarray(frame.convert("RGB"))] * repeat
    return out


def read_video(path, fps) -> list[np.ndarray]:
    if str(path).endswith(".gif"):
        return read_gif(path, fps)
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p"), meta
    return list(iio.imiter(path))


def to_obs_frame(rgb: np.ndarray) -> np.ndarray:
    """An RGB render as the agent sees it, roughly: grayscale, 84x84."""
    return np.asarray(Image.fromarray(rgb).convert("L").resize((84, 84), Image.BILINEAR), np.float32)


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_breakout_video_records_env0_in_step(tmp_path, ext):
    """One frame per env step plus the first, 210x160 RGB, and frame ``i`` is what
    env 0 showed the agent at step ``i``: grayscaled and resized it matches env 0's
    newest observation frame far better than the neighbouring steps or env 1."""
    seen = []

    def record(newest):
        seen.append(np.asarray(newest, np.float32))

    def policy(params, carry, obs, first):
        io_callback(record, None, obs[0, :, -1], ordered=True)  # obs [T, B, 4, 84, 84]
        return carry, jnp.zeros(obs.shape[:2] + (4,)), jnp.zeros(obs.shape[:2])

    path = tmp_path / "sub" / f"play.{ext}"
    r = evaluate(policy, None, None, env_id="Breakout-v5", episodes=2, num_envs=2,
                 mode="sample", seed=5, video=str(path), video_fps=30)
    assert r.video == str(path) and r.episodes == 2
    frames = read_video(path, 30)
    # Env 0's one counted game: a frame per agent step, the first, and one per reset step after each of
    # Breakout's 4 lives lost before the last (EnvPool presses FIRE there, as in training).
    assert r.capped == 0 and len(frames) == r.lengths[0] + 1 + 4
    assert frames[0].shape == (210, 160, 3) and frames[0].dtype == np.uint8

    video = np.stack([to_obs_frame(f) for f in frames])
    obs = np.stack(seen)  # [calls, B, 84, 84]
    n = min(len(video), len(obs))
    video, env0, env1 = video[:n], obs[:n, 0], obs[:n, 1]

    def mismatch(a, b):  # pixels that differ by more than resampling noise
        return float((np.abs(a - b) > 30).sum((1, 2)).mean())

    aligned = mismatch(video, env0)
    assert aligned < 0.5 * mismatch(video[1:], env0[:-1]), aligned
    assert aligned < 0.5 * mismatch(video[:-1], env0[1:]), aligned
    assert aligned < 0.5 * mismatch(video, env1), aligned


def test_cartpole_gif_covers_several_episodes_and_caps_frames(tmp_path):
    r = evaluate(left_policy, None, None, env_id="CartPole-v1", episodes=2, num_envs=1, seed=4,
                 video=tmp_path / "two.gif", video_episodes=2, video_fps=20)
    frames = read_gif(tmp_path / "two.gif", 20)
    assert len(frames) == r.lengths.sum() + 2  # each episode: its first frame + one per step
    assert frames[0].shape[2] == 3

    evaluate(left_policy, None, None, env_id="CartPole-v1", episodes=2, num_envs=1, seed=4,
             video=tmp_path / "capped.gif", video_episodes=2, max_video_frames=5)
    assert len(read_gif(tmp_path / "capped.gif", 30)) == 5


# ---------------------------------------------------------------------------
# scripts/evaluate.py
# ---------------------------------------------------------------------------


def evaluate_script(monkeypatch):
    """scripts/evaluate.py as a module, registered (for this test) so that dataclasses
    and tyro find its source."""
    spec = importlib.util.spec_from_file_location("evaluate_script", Path(__file__).parents[1] / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    return script


def fake_run(run_dir: Path) -> Path:
    """A CartPole run directory as scripts/ppo.py leaves it, without training: config.json
    and an untrained MLP actor-critic saved as latest/200 and best/100 (score 1)."""
    from jaxatari.checkpoint import Checkpointer
    from jaxatari.networks import init_actor_critic, resolve_network_spec

    spec = resolve_network_spec("auto", num_actions=CARTPOLE_ACTIONS, atari=False)
    shapes = jax.eval_shape(lambda: init_actor_critic(spec, jax.random.key(0), (4,), np.float32)[1])
    rng = np.random.default_rng(0)  # NumPy values: no per-op compiles on a loaded CPU
    params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dict(
        algo="ppo", env="CartPole-v1", run_dir=str(run_dir), network_spec=spec.to_json(),
        env_spec=dict(env_id="CartPole-v1", obs_shape=[4], obs_dtype="float32", num_actions=CARTPOLE_ACTIONS))))
    with Checkpointer(run_dir) as ckpt:
        ckpt.save(200, params, policy=params)
        ckpt.save_best(100, params, score=1.0, policy=params)
    return run_dir


def test_eval_json_goes_to_the_run_directory_evaluated(tmp_path, monkeypatch, capsys):
    """A copied (or moved) run writes eval.json into itself, not into the directory
    its config.json was first written in."""
    script = evaluate_script(monkeypatch)
    original = fake_run(tmp_path / "run")
    copy = tmp_path / "my copy"
    shutil.copytree(original, copy)
    assert script.main(script.Config(run_dir=str(copy / "checkpoints" / "latest"), episodes=1, num_envs=1,
                                     max_episode_steps=3)) == 0
    assert (copy / "eval.json").is_file() and not (original / "eval.json").exists()
    out = json.loads((copy / "eval.json").read_text())
    assert out["reset_on_life_loss"] is False  # CartPole has no lives
    assert out["mode"] == "sample" and out["options"]["max_episode_steps"] == 3  # the protocol played, recorded
    assert f"wrote {copy / 'eval.json'}" in capsys.readouterr().out
    # --env-option plays another protocol on top of the run's options, and eval.json says which.
    assert script.main(script.Config(run_dir=str(copy), episodes=1, num_envs=1, mode="greedy",
                                     env_option=("max_episode_steps=2",))) == 0
    out = json.loads((copy / "eval.json").read_text())
    assert out["mode"] == "greedy" and out["options"]["max_episode_steps"] == 2 and out["lengths"] == [2]
    assert "1 of 1 cut by the 2-step cap (max_episode_steps)" in capsys.readouterr().out


def test_mp4_without_a_usable_ffmpeg_is_refused_before_playing(monkeypatch):
    def missing():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
    with pytest.raises(EvalError, match=r"mp4 needs ffmpeg .* No ffmpeg exe could be found.* or record a .gif"):
        check_arguments(video="play.mp4")
    check_arguments(video="play.gif")  # Pillow writes gifs


def test_loaded_policy_sampling_needs_a_key(tmp_path):
    from jaxatari.policy import load_policy

    policy = load_policy(fake_run(tmp_path / "run"))
    obs = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"mode='sample' needs key="):  # not a fixed key reused every call
        policy.act(obs, mode="sample")
    keys = jax.random.split(jax.random.key(1), 8)
    draws = {tuple(np.asarray(policy.act(obs, mode="sample", key=k)[0])) for k in keys}
    assert len(draws) > 1  # fresh keys, fresh draws (8 draws of 3 coin-flip-like actions)


def test_script_records_the_checkpoint_it_loaded_and_caps_episodes(tmp_path, capsys, monkeypatch):
    script = evaluate_script(monkeypatch)
    run = fake_run(tmp_path / "run")

    from jaxatari.policy import load_checkpoint

    assert load_checkpoint(run)[1] == {"checkpoint": "best", "checkpoint_step": 100}
    assert load_checkpoint(run, "latest")[1] == {"checkpoint": "latest", "checkpoint_step": 200}

    # best/ unreadable: load_policy falls back to latest/, and eval.json says so.
    for f in (run / "checkpoints" / "best" / "100" / "policy").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    assert script.main(script.Config(run_dir=str(run), episodes=2, num_envs=1, max_episode_steps=3)) == 0
    out = json.loads((run / "eval.json").read_text())
    assert (out["checkpoint"], out["checkpoint_step"], out["checkpoint_requested"]) == ("latest", 200, "best")
    printed = capsys.readouterr()
    assert "evaluated the latest one (env step 200)" in printed.err
    # An untrained policy topples CartPole in 8+ steps; the cap of 3 ends every game first,
    # and both the printed line and eval.json say so.
    assert out["lengths"] == [3, 3] and out["max_episode_steps"] == 3 and out["capped"] == 2
    assert out["warning"].startswith("2 of 2 episodes ended at the step cap")
    assert ("over 2 episodes; 2 of 2 cut by the 3-step cap (max_episode_steps): the policy may be stuck"
            in printed.out.splitlines()[0])

    # Bad input: one line naming the value (the corrupt config.json by its path), exit 2.
    assert script.main(script.Config(run_dir=str(run), max_episode_steps=0)) == 2
    assert "max_episode_steps=0" in capsys.readouterr().err
    (run / "config.json").write_text('{"algo": "ppo", "env": "CartPole')
    assert script.main(script.Config(run_dir=str(run / "checkpoints" / "latest"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'config.json'} is not valid JSON (Unterminated string") and "\n" not in err

    with pytest.raises(SystemExit):
        script.tyro.cli(script.Config, args=["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--max-episode-steps" in usage and "parent directories are created" in usage
