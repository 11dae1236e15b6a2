"""Envs: presets, errors, stepping backends and the full-game episode tracker."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import envs


# ---------------------------------------------------------------------------
# The episode tracker on a scripted sequence
# ---------------------------------------------------------------------------


def test_tracker_scripted_life_losses_game_over_and_truncation():
    # One env. Per step: (raw_reward, game_over, truncated, valid).
    # Episode 1: rewards 1, 2, (life lost: terminated but not game over -> nothing ends), 3, game over.
    # Then EnvPool's reset step (valid=False, its reward must be ignored), then
    # episode 2: 5, 5, time-limit truncation with reward 1; reset step; episode 3 in progress: 7.
    script = [
        (1.0, False, False, True),
        (2.0, False, False, True),   # a life is lost here: not an episode end
        (0.0, False, False, False),  # soft reset after the lost life: invalid, adds nothing
        (3.0, True, False, True),    # game over: return 6, length 3
        (99.0, False, False, False), # reset step
        (5.0, False, False, True),
        (5.0, False, False, True),
        (1.0, False, True, True),    # truncation: return 11, length 3
        (0.0, False, False, False),  # reset step
        (7.0, False, False, True),
    ]
    stats = envs.episode_stats_init(1, window=4)
    finished = []
    for r, go, tr, v in script:
        stats, out = envs.episode_stats_update(
            stats, jnp.array([r]), jnp.array([go]), jnp.array([tr]), jnp.array([v]))
        if out.done[0]:
            finished.append((float(out.returns[0]), int(out.lengths[0])))
    assert finished == [(6.0, 3), (11.0, 3)]
    assert int(stats.count) == 2
    assert float(stats.returns[0]) == 7.0 and int(stats.lengths[0]) == 1
    np.testing.assert_allclose(envs.window_mean(stats), 8.5)


def test_tracker_many_envs_finishing_together_fill_the_window_once_each():
    stats = envs.episode_stats_init(3, window=5)
    for _ in range(2):
        stats, _ = envs.episode_stats_update(stats, jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3, bool),
                                             jnp.zeros(3, bool), jnp.ones(3, bool))
    stats, out = envs.episode_stats_update(stats, jnp.array([0.0, 0.0, 0.0]), jnp.array([True, False, True]),
                                           jnp.zeros(3, bool), jnp.ones(3, bool))
    assert out.done.tolist() == [True, False, True]
    assert int(stats.count) == 2
    np.testing.assert_allclose(np.sort(np.asarray(stats.window)[:2]), [2.0, 6.0])
    assert np.isnan(np.asarray(stats.window)[2:]).all()


def test_more_episodes_ending_on_one_step_than_the_window_keep_the_last_in_env_order():
    """12 envs end together into a window of 5 (after 3 earlier episodes): each slot is
    written once (a repeated scatter index would leave the winner unspecified, on a GPU
    run to run), holding the last 5 in env order; the count includes all 15."""
    stats = envs.episode_stats_init(3, window=5)
    stats, _ = envs.episode_stats_update(stats, jnp.array([-1.0, -2.0, -3.0]), jnp.ones(3, bool),
                                         jnp.zeros(3, bool), jnp.ones(3, bool))
    big = envs.episode_stats_init(12, window=5).replace(window=stats.window, count=stats.count)
    returns = jnp.arange(12, dtype=jnp.float32)
    big, out = jax.jit(envs.episode_stats_update)(big, returns, jnp.ones(12, bool), jnp.zeros(12, bool),
                                                  jnp.ones(12, bool))
    assert int(big.count) == 15 and out.done.all()
    # Slots continue the ring at count 3: envs 7..11 land in slots 0, 1, 2, 3, 4 (rank 8..12).
    slots = np.asarray(envs.ring_slots(jnp.int32(3), jnp.ones(12, bool), 5))
    assert slots.tolist() == [5] * 7 + [0, 1, 2, 3, 4]  # each slot once; 5 = not written
    slots = np.asarray(envs.ring_slots(jnp.int32(9), jnp.array([True, False, True, True]), 5))
    assert slots.tolist() == [4, 5, 0, 1]
    np.testing.assert_array_equal(np.asarray(big.window), [7.0, 8.0, 9.0, 10.0, 11.0])
    np.testing.assert_allclose(envs.window_mean(big), 9.0)


def test_tracker_is_jittable():
    f = jax.jit(envs.episode_stats_update)
    stats = envs.episode_stats_init(2)
    stats, out = f(stats, jnp.ones(2), jnp.array([True, False]), jnp.zeros(2, bool), jnp.ones(2, bool))
    assert out.done.tolist() == [True, False]


# ---------------------------------------------------------------------------
# Errors and presets
# ---------------------------------------------------------------------------


def test_unknown_env_id_suggests_closest():
    with pytest.raises(envs.EnvError, match=r"Unknown env id 'Breakuot-v5'.*'Breakout-v5'"):
        envs.validate_env_id("Breakuot-v5")


def test_unknown_option_and_bad_noop_max():
    with pytest.raises(envs.EnvError, match=r"noop_mx.*noop_max"):
        envs.resolve_options("Pong-v5", "nature", {"noop_mx": 3})
    with pytest.raises(envs.EnvError, match=r"noop_max=0"):
        envs.resolve_options("Pong-v5", "nature", {"noop_max": 0})


def test_presets_are_explicit():
    nature = envs.resolve_options("Breakout-v5", "nature")
    machado = envs.resolve_options("Breakout-v5", "machado")
    for key in ("episodic_life", "reward_clip", "repeat_action_probability", "noop_max"):
        assert key in nature and key in machado
    assert nature["episodic_life"] and nature["noop_max"] == 30 and nature["repeat_action_probability"] == 0
    assert not machado["episodic_life"] and machado["repeat_action_probability"] == 0.25
    assert envs.resolve_options("Breakout-v5", "nature", {"noop_max": 10})["noop_max"] == 10
    with pytest.raises(envs.EnvError, match="Atari games only"):
        envs.resolve_preset("CartPole-v1", "nature")
    with pytest.raises(envs.EnvError, match="accepted: machado, nature"):
        envs.resolve_preset("Pong-v5", "natur")


def test_parse_env_options():
    # Values stay strings here; resolve_options parses them by each option's type.
    assert envs.parse_env_options(["a=1", "b = 0.5", "c=x=y"]) == {"a": "1", "b": "0.5", "c": "x=y"}
    with pytest.raises(envs.EnvError, match="KEY=VALUE"):
        envs.parse_env_options(["noop_max"])


# (env, --env-option, what the one-line error must say). Before values were
# checked: a bare int() traceback, pybind TypeErrors, a C++ length error, a
# segfault (stack_num=0) and a silently accepted probability of 1.5.
BAD_OPTIONS = [
    ("Breakout-v5", "noop_max=abc", r"noop_max=abc .*an integer >= 1"),
    ("Breakout-v5", "noop_max=-3", r"noop_max=-3 .*an integer >= 1"),
    ("Breakout-v5", "noop_max=2.5", r"noop_max=2.5 .*an integer >= 1"),
    ("Breakout-v5", "max_episode_steps=abc", r"max_episode_steps=abc .*an integer >= 1"),
    ("Breakout-v5", "max_episode_steps=0", r"max_episode_steps=0 .*an integer >= 1"),
    ("Breakout-v5", "max_episode_steps=99999999999", r"max_episode_steps=99999999999 .*32 bits"),
    ("Breakout-v5", "episodic_life=maybe", r"episodic_life=maybe .*true/false, 1/0 or yes/no"),
    ("Breakout-v5", "gray_scale=2", r"gray_scale=2 .*true/false, 1/0 or yes/no"),
    ("Breakout-v5", "img_height=-1", r"img_height=-1 .*an integer >= 1"),
    ("Breakout-v5", "img_width=0", r"img_width=0 .*an integer >= 1"),
    ("Breakout-v5", "stack_num=0", r"stack_num=0 .*an integer >= 1"),
    ("Breakout-v5", "frame_skip=0", r"frame_skip=0 .*an integer >= 1"),
    ("Breakout-v5", "repeat_action_probability=1.5", r"repeat_action_probability=1.5 .*a number in \[0, 1\]"),
    ("Breakout-v5", "repeat_action_probability=-0.1", r"repeat_action_probability=-0.1 .*\[0, 1\]"),
    ("Breakout-v5", "repeat_action_probability=nan", r"repeat_action_probability=nan .*\[0, 1\]"),
    ("Breakout-v5", "mode=-2", r"mode=-2 .*an integer >= -1"),
    ("Breakout-v5", "mode=99", r"mode=99 .*Invalid game mode.*-1 \(the game's default\)"),
    ("Breakout-v5", "difficulty=99", r"difficulty=99 .*Invalid difficulty"),
    ("CartPole-v1", "max_episode_steps=abc", r"max_episode_steps=abc .*CartPole-v1.*an integer >= 1"),
    ("CartPole-v1", "reward_threshold=high", r"reward_threshold=high .*a number"),
]


@pytest.mark.parametrize("env_id,item,match", BAD_OPTIONS, ids=[f"{e}:{i}" for e, i, _ in BAD_OPTIONS])
def test_bad_option_values_fail_in_one_line(env_id, item, match):
    with pytest.raises(envs.EnvError, match=match) as info:
        envs.resolve_options(env_id, None, envs.parse_env_options([item]))
    assert "\n" not in str(info.value)


def test_option_values_are_parsed_by_type():
    opts = envs.resolve_options("Breakout-v5", "nature", envs.parse_env_options(
        ["episodic_life=FALSE", "reward_clip=no", "use_fire_reset=Yes", "full_action_space=1", "gray_scale=0",
         "noop_max=7", "repeat_action_probability=1", "img_height=42", "mode=0"]))
    assert opts["episodic_life"] is False and opts["reward_clip"] is False and opts["use_fire_reset"] is True
    assert opts["full_action_space"] is True and opts["gray_scale"] is False
    assert opts["noop_max"] == 7 and type(opts["noop_max"]) is int and opts["img_height"] == 42 and opts["mode"] == 0
    assert opts["repeat_action_probability"] == 1.0 and type(opts["repeat_action_probability"]) is float
    # Typed values from the Python API pass through (np scalars become Python ones).
    opts = envs.resolve_options("CartPole-v1", None, {"max_episode_steps": np.int64(50), "reward_threshold": 10})
    assert opts == {"max_episode_steps": 50, "reward_threshold": 10.0}
    # List/tuple/dict options (other EnvPool families) take a Python literal.
    assert envs.parse_option_value("X-v0", "pos", "(2, 3)", (1, 1)) == (2, 3)
    assert envs.parse_option_value("X-v0", "pos", [2, 3], (1, 1)) == (2, 3)
    with pytest.raises(envs.EnvError, match=r"pos=2, 3\) .*a Python tuple literal, e.g. \(1, 1\)"):
        envs.parse_option_value("X-v0", "pos", "2, 3)", (1, 1))


def test_option_values_are_checked_on_every_path_before_envpool_is_built(monkeypatch):
    import envpool

    def no_pool(*args, **kwargs):
        raise AssertionError("an EnvPool was built before the options were checked")

    monkeypatch.setattr(envpool, "make", no_pool)
    # The Python API, with typed values.
    for bad in ({"stack_num": 0}, {"episodic_life": "maybe"}, {"repeat_action_probability": 1.5},
                {"noop_max": True}, {"img_height": 84.0}):
        with pytest.raises(envs.EnvError, match=next(iter(bad))):
            envs.make("Breakout-v5", 2, seed=0, options=bad)
    with pytest.raises(envs.EnvError, match="stack_num=0"):  # a string, as --env-option gives it
        envs.make("Breakout-v5", 4, seed=0, options={"stack_num": "0"})
    # A preset's own values go through the same check.
    monkeypatch.setitem(envs.ATARI_PRESETS, "nature", dict(envs.ATARI_PRESETS["nature"], stack_num=0))
    with pytest.raises(envs.EnvError, match="stack_num=0"):
        envs.make("Breakout-v5", 2, seed=0)


def test_atari_factory_shapes():
    env, spec = envs.make("Breakout-v5", 2, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert spec.obs_shape == (4, 84, 84) and spec.num_actions == 4 and spec.atari
    assert len(envs.atari_env_ids()) >= 100


# ---------------------------------------------------------------------------
# Stepping: reset-step semantics, and xla vs callback agree
# ---------------------------------------------------------------------------


def _run(backend, steps=300):
    env, spec = envs.make("CartPole-v1", 3, seed=3)
    obs, _ = env.reset()
    handle, step_fn, used = envs.make_step_fn(env, spec, backend)
    assert used == backend
    state = envs.env_state_init(obs)

    def body(c, a):
        h, s = c
        h, s, tr, out = envs.env_step(step_fn, h, s, a)
        return (h, s), (tr, out)

    actions = jnp.asarray(np.random.default_rng(0).integers(0, 2, (steps, 3)), jnp.int32)
    (_, state), (tr, out) = jax.jit(lambda h, s: jax.lax.scan(body, (h, s), actions))(handle, state)
    return jax.device_get((state, tr, out))


def test_reset_step_follows_every_done_and_xla_matches_callback():
    state, tr, out = _run("xla")
    done = np.asarray(tr.terminated | tr.truncated)
    valid = np.asarray(tr.valid)
    first = np.asarray(tr.first)
    assert done.sum() > 5
    # The step after a done is invalid; the step after that starts an episode.
    t, b = np.nonzero(done[:-2])
    assert not valid[t + 1, b].any()
    assert first[t + 2, b].all()
    assert first[0].all() and valid[0].all()
    # Invalid steps carry no reward; each real episode end is counted once.
    assert (np.asarray(tr.reward)[~valid] == 0).all()
    assert out.done.sum() == done.sum()
    np.testing.assert_array_equal(np.asarray(out.lengths)[np.asarray(out.done)] > 0, True)
    cb_state, cb_tr, cb_out = _run("callback")
    np.testing.assert_array_equal(np.asarray(tr.obs), np.asarray(cb_tr.obs))
    np.testing.assert_array_equal(np.asarray(out.returns), np.asarray(cb_out.returns))


def test_bad_backend():
    env, spec = envs.make("CartPole-v1", 1, seed=0)
    with pytest.raises(envs.EnvError, match="auto, xla or callback"):
        envs.make_step_fn(env, spec, "gpu")


def test_make_does_not_warn_about_classic_control_bounds():
    """gymnasium's "precision lowered by casting to float32" on EnvPool's float64
    CartPole bounds is silenced where the env is made (library users included)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env, spec = envs.make("CartPole-v1", 2, seed=0)
        env.observation_space, env.action_space
    assert spec.obs_shape == (4,)
    assert not [w for w in caught if "precision lowered" in str(w.message)], [str(w.message) for w in caught]


# ---------------------------------------------------------------------------
# Atari step semantics through the compiled step, against a plain host loop
# ---------------------------------------------------------------------------

# (game, preset, EnvPool option overrides, steps): a seeded random action script
# for 3 envs, long enough to lose lives, end games and score (each case ends 3-5
# games). The time limit of 150 steps also ends Breakout games by truncation
# (random play loses its 5 lives in ~120-280 steps); SpaceInvaders scores more
# than 1 per hit.
ATARI_CASES = [
    ("Breakout-v5", "nature", {"max_episode_steps": 150}, 320),
    ("SpaceInvaders-v5", "nature", {}, 600),
    ("Breakout-v5", "machado", {}, 340),
    ("SpaceInvaders-v5", "machado", {}, 450),
]
ATARI_IDS = [f"{g.split('-')[0]}-{p}{'-limit' if o else ''}" for g, p, o, _ in ATARI_CASES]
BACKENDS = ("xla", "callback")


def _atari_env(case):
    game, preset, options, _ = case
    return envs.make(game, 3, seed=11, preset=preset, options=options)


def _host_play(case):
    """EnvPool stepped by a plain host loop through a seeded random action script.
    Returns ``(actions [T, B], what EnvPool reports per step: {name: [T, B]})``
    (``digest``: the observation's pixel sum)."""
    env, spec = _atari_env(case)
    env.reset()
    actions = np.random.default_rng(5).integers(0, spec.num_actions, (case[3], spec.num_envs)).astype(np.int32)
    keys = ("reward", "terminated", "truncated", "game_over", "raw", "elapsed", "digest")
    out = {k: [] for k in keys}
    for a in actions:
        obs, r, te, tr, info = env.step(a)
        for k, v in zip(keys, (r, te, tr, info["terminated"], info["reward"], info["elapsed_step"],
                               obs.reshape(spec.num_envs, -1).sum(1, dtype=np.int64))):
            out[k].append(np.asarray(v))
    out = {k: np.stack(v) for k, v in out.items()}
    for k in ("terminated", "truncated", "game_over"):
        out[k] = out[k].astype(bool)
    return actions, out


def _compiled_play(case, backend, actions):
    """The same actions through ``make_step_fn`` + ``env_step`` in one jitted ``lax.scan``
    on a separately made env (same seed and options). Returns ``(Transition [T, B] with
    obs/next_obs replaced by pixel sums, EpisodeOutcome [T, B], final EpisodeStats)``."""
    env, spec = _atari_env(case)
    obs, _ = env.reset()
    handle, step_fn, used = envs.make_step_fn(env, spec, backend)
    assert used == backend

    def digest(o):
        return jnp.sum(o, axis=tuple(range(1, o.ndim)), dtype=jnp.int32)

    def body(c, a):
        h, s = c
        h, s, tr, out = envs.env_step(step_fn, h, s, a)
        return (h, s), (tr._replace(obs=digest(tr.obs), next_obs=digest(tr.next_obs)), out)

    play = jax.jit(lambda h, s, acts: jax.lax.scan(body, (h, s), acts))
    (_, state), (tr, out) = play(handle, envs.env_state_init(obs), jnp.asarray(actions))
    return jax.device_get((tr, out, state.stats))


@pytest.fixture(scope="module", params=ATARI_CASES, ids=ATARI_IDS)
def atari(request):
    """``(case, host, {backend: compiled})``: one case played by the host loop and
    through both compiled backends, once for all the tests below."""
    actions, host = _host_play(request.param)
    return request.param, host, {b: _compiled_play(request.param, b, actions) for b in BACKENDS}


def _reset_steps(host):
    """``[T, B]``: the steps that follow ``terminated | truncated`` (EnvPool's reset steps)."""
    ended = host["terminated"] | host["truncated"]
    return np.concatenate([np.zeros_like(ended[:1]), ended[:-1]])


def _full_games(host):
    """Reference: the running full-game score at every step ``[T, B]`` (the sum of
    EnvPool's unclipped ``info["reward"]`` since the game began) and the games that
    end (``info["terminated"]`` or the time limit) as ``(t, b, return)`` in time
    then env order."""
    T, B = host["raw"].shape
    score, running, ended = np.zeros(B, np.float64), np.zeros((T, B)), []
    for t in range(T):
        score += host["raw"][t]
        running[t] = score
        for b in np.nonzero(host["game_over"][t] | host["truncated"][t])[0]:
            ended.append((t, int(b), float(score[b])))
            score[b] = 0.0
    return running, ended


def test_atari_training_reward_is_clipped_and_returns_are_unclipped_full_games(atari):
    """Transition.reward is EnvPool's clipped training reward; EpisodeOutcome and
    EpisodeStats report full games scored with the unclipped ``info["reward"]``,
    as a plain host loop sums it. (Random Breakout scores 1 per brick, so only
    SpaceInvaders tells the clipped reward from the score.)"""
    case, host, plays = atari
    running, ended = _full_games(host)
    assert ended and host["raw"].any()
    np.testing.assert_array_equal(host["reward"], np.sign(host["raw"]))  # the presets clip
    if case[0].startswith("SpaceInvaders"):
        assert host["raw"].max() > 1 and (running > np.cumsum(host["raw"] > 0, axis=0)).any()
    valid = ~_reset_steps(host)
    for backend, (tr, out, stats) in plays.items():
        r = np.asarray(tr.reward)
        assert set(np.unique(r)) <= {-1.0, 0.0, 1.0}, backend
        np.testing.assert_array_equal(r, np.where(valid, host["reward"], 0.0), err_msg=backend)
        np.testing.assert_array_equal(out.returns, running, err_msg=backend)
        assert list(zip(*np.nonzero(out.done))) == [(t, b) for t, b, _ in ended], backend
        assert [float(out.returns[t, b]) for t, b, _ in ended] == [g for _, _, g in ended], backend
        assert int(stats.count) == len(ended) <= stats.window.shape[0]
        np.testing.assert_array_equal(stats.window[:len(ended)], [g for _, _, g in ended], err_msg=backend)
        np.testing.assert_array_equal(stats.returns, np.where(out.done[-1], 0.0, running[-1]), err_msg=backend)


def test_atari_terminated_at_each_lost_life_episodes_end_at_game_over_or_truncation(atari):
    """Under the nature preset ``terminated`` (the bootstrap cut) fires at each
    lost life, but an episode ends only at the real game over
    (``info["terminated"]``) or the time limit, which ends the whole game; episode
    lengths are EnvPool's own ``elapsed_step`` (counted across lives). Under
    machado (no episodic life, sticky actions) ``terminated`` is the game over."""
    (game, preset, options, _), host, plays = atari
    lost_life = host["terminated"] & ~host["game_over"]
    if preset == "nature":
        assert lost_life.sum() > 2 * host["game_over"].sum() > 0  # several lives per game
    else:
        assert envs.ATARI_PRESETS[preset]["repeat_action_probability"] > 0
        np.testing.assert_array_equal(host["terminated"], host["game_over"])
        assert host["game_over"].any()
    limit = options.get("max_episode_steps")
    if limit:
        assert host["truncated"].any() and (host["elapsed"][host["truncated"]] == limit).all()
    valid = ~_reset_steps(host)
    for backend, (tr, out, stats) in plays.items():
        np.testing.assert_array_equal(tr.terminated, host["terminated"] & valid, err_msg=backend)
        np.testing.assert_array_equal(tr.truncated, host["truncated"] & valid, err_msg=backend)
        np.testing.assert_array_equal(out.done, (host["game_over"] | host["truncated"]) & valid, err_msg=backend)
        assert tr.terminated[lost_life].all() and not out.done[lost_life].any(), backend
        np.testing.assert_array_equal(out.lengths, host["elapsed"], err_msg=backend)
        if limit:
            assert out.done[host["truncated"]].all() and (out.lengths[host["truncated"]] == limit).all()
        np.testing.assert_array_equal(stats.lengths, np.where(out.done[-1], 0, host["elapsed"][-1]),
                                      err_msg=backend)


def test_atari_reset_step_after_each_lost_life_and_game_is_masked(atari):
    """The step after ``terminated | truncated`` (a lost life or a game end) is
    EnvPool's reset step: ``valid=False``, reward 0, no episode end, no length
    (EnvPool's ``elapsed_step`` does not count it either); the step after it
    starts an episode (``first``) for the recurrent state."""
    (game, preset, options, _), host, plays = atari
    reset = _reset_steps(host)
    assert reset.any()
    if preset == "nature":  # reset steps after lost lives (EnvPool presses FIRE; the game goes on)
        assert (reset[1:] & ~host["game_over"][:-1] & ~host["truncated"][:-1]).any()
    assert (host["raw"][reset] == 0).all() and (host["reward"][reset] == 0).all()  # EnvPool's
    for backend, (tr, out, stats) in plays.items():
        valid = np.asarray(tr.valid)
        np.testing.assert_array_equal(valid, ~reset, err_msg=backend)
        np.testing.assert_array_equal(tr.first, np.concatenate([np.ones_like(valid[:1]), reset[:-1]]),
                                      err_msg=backend)
        assert (np.asarray(tr.reward)[reset] == 0).all() and not np.asarray(out.done)[reset].any(), backend
        t, b = np.nonzero(reset[1:])  # a reset step adds no length: the step before's, or 0 after a game end
        assert (out.lengths[t + 1, b] == np.where(out.done[t, b], 0, out.lengths[t, b])).all(), backend


def test_atari_xla_and_callback_backends_agree_exactly(atari):
    """Both backends step the envs as the host loop does (the same observations)
    and report the same transitions, outcomes and statistics, bit for bit."""
    case, host, plays = atari
    xla, callback = plays["xla"], plays["callback"]
    np.testing.assert_array_equal(xla[0].next_obs, host["digest"])
    for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(callback), strict=True):
        np.testing.assert_array_equal(a, b)
