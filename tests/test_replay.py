"""Tests for jaxatari.replay against a plain NumPy reference that stores full transitions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import replay

FRAME = (2, 3)  # small frames; the logic does not depend on their size


# ----------------------------------------------------------------------------- scripted envs


def _frame(env, counter):
    """A frame whose every pixel is unique to (env, counter): env*1000 + counter, times 8, plus pixel."""
    return (env * 1000 + counter) * 8 + np.arange(np.prod(FRAME), dtype=np.int32).reshape(FRAME)


class ScriptedEnvs:
    """An EnvPool-like stream of frame-stacked observations for B envs.

    ``events[env][t] = kind`` ends an episode at (0-based) step t of that env:
    "term" (terminal), "trunc" (time limit), "life_fresh" (episodic-life terminal
    whose reset stack does not continue) or "life_cont" (episodic-life terminal
    whose reset stack continues the old one). The step after any of them is a
    reset step: reward 0, valid False, next_obs the new episode's first stack.
    Actions are unique ids, so a sampled transition identifies itself.
    With ``reset_step=False`` there is no reset step (gymnasium's same-step
    autoreset): the step after a done starts from the new episode's stack.
    With probability ``p_static`` a step repeats the observation (next_obs == obs,
    a paused game), and with probability ``p_drop`` an ordinary step is marked
    invalid by the agent (so the buffer skips a transition mid-episode).
    """

    def __init__(self, num_envs, stack, events, seed=0, p_static=0.0, p_drop=0.0, reset_step=True):
        self.b, self.s, self.events, self.reset_step = num_envs, stack, events, reset_step
        self.p_static, self.p_drop = p_static, p_drop
        self.rng = np.random.default_rng(seed)
        self.counter = [0] * num_envs
        self.stacks = [self._fresh(e) for e in range(num_envs)]
        self.pending = [None] * num_envs
        self.t = 0

    def _new(self, e):
        self.counter[e] += 1
        return _frame(e, self.counter[e])

    def _fresh(self, e):
        return [self._new(e) for _ in range(self.s)]

    def _reset(self, e):
        if self.pending[e] == "life_cont":
            self.stacks[e] = self.stacks[e][1:] + [self._new(e)]
        else:
            self.stacks[e] = self._fresh(e)
        self.pending[e] = None

    def step(self):
        out = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "valid")}
        for e in range(self.b):
            if self.pending[e] is not None and not self.reset_step:
                self._reset(e)
            obs = np.stack(self.stacks[e])
            if self.pending[e] is not None:  # reset step
                self._reset(e)
                rew, term, trunc, valid = 0.0, False, False, False
            else:
                if self.rng.random() >= self.p_static:
                    self.stacks[e] = self.stacks[e][1:] + [self._new(e)]
                rew = float(self.rng.integers(-3, 4))
                kind = self.events.get(e, {}).get(self.t)
                term = kind in ("term", "life_fresh", "life_cont")
                trunc = kind == "trunc"
                valid = kind is not None or self.rng.random() >= self.p_drop
                self.pending[e] = kind
            out["obs"].append(obs)
            out["actions"].append(self.t * self.b + e)
            out["rewards"].append(rew)
            out["next_obs"].append(np.stack(self.stacks[e]))
            out["terminated"].append(term)
            out["truncated"].append(trunc)
            out["valid"].append(valid)
        self.t += 1
        return {k: np.asarray(v) for k, v in out.items()}


def _random_events(num_envs, steps, p, seed):
    rng = np.random.default_rng(seed)
    kinds = ["term", "trunc", "life_fresh", "life_cont"]
    return {
        e: {t: kinds[rng.integers(4)] for t in range(steps) if rng.random() < p}
        for e in range(num_envs)
    }


def _plain(step):
    """Plain (non-stacked) observations: the newest frame, flattened, as float32."""
    out = dict(step)
    out["obs"] = step["obs"][:, -1].reshape(step["obs"].shape[0], -1).astype(np.float32)
    out["next_obs"] = step["next_obs"][:, -1].reshape(step["obs"].shape[0], -1).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- NumPy reference


class Reference:
    """Stores full transitions per env; models only *which* transitions the buffer keeps.

    A transition is sampleable iff it is valid, among the newest T valid of its env,
    and its oldest frame is among the newest F frames the buffer pushed for that env.
    Frame pushes are counted with absolute counters: obs is pushed (S frames) unless
    it equals the previous valid next_obs; next_obs costs 1 frame if its stack
    continues obs, else S.
    """

    def __init__(self, num_envs, per_env, frames_per_env, stack):
        self.b, self.t, self.f, self.s = num_envs, per_env, frames_per_env, stack
        self.trans = [[] for _ in range(num_envs)]  # valid transitions, oldest first
        self.pushed = [0] * num_envs
        self.last_next = [None] * num_envs
        self.skipped = [False] * num_envs

    def add(self, step):
        for e in range(self.b):
            obs, nxt = step["obs"][e], step["next_obs"][e]
            if not step["valid"][e]:
                self.skipped[e] = True
                continue
            matched = self.last_next[e] is not None and np.array_equal(obs, self.last_next[e])
            if self.trans[e] and (self.skipped[e] or not matched):
                self.trans[e][-1]["cut"] = True
            if matched:
                obs_first = self.pushed[e] - self.s
            else:
                obs_first = self.pushed[e]
                self.pushed[e] += self.s
            cont = self.s == 1 or np.array_equal(nxt[:-1], obs[1:])
            self.pushed[e] += 1 if cont else self.s
            self.trans[e].append(
                dict(
                    obs=obs, next_obs=nxt, action=step["actions"][e], reward=step["rewards"][e],
                    terminated=step["terminated"][e], truncated=step["truncated"][e],
                    cut=False, obs_first=obs_first,
                )
            )
            self.last_next[e] = nxt
            self.skipped[e] = False

    def alive(self, e):
        """The sampleable transitions of env e, oldest first."""
        newest = self.trans[e][-self.t :]
        return [tr for tr in newest if tr["obs_first"] >= self.pushed[e] - self.f]

    def all_alive(self):
        return [(e, i, tr) for e in range(self.b) for i, tr in enumerate(self.alive(e))]

    def nstep(self, e, i, n, gamma):
        """n-step (rewards, discount, next_obs, n') for alive transition i of env e."""
        alive = self.alive(e)
        ret, k = 0.0, 0
        while True:
            tr = alive[i + k]
            ret += gamma**k * tr["reward"]
            k += 1
            if tr["terminated"]:
                return ret, 0.0, tr["next_obs"], k
            if tr["truncated"] or tr["cut"] or k == n or i + k == len(alive):
                return ret, gamma**k, tr["next_obs"], k


# ----------------------------------------------------------------------------- helpers


@functools.cache
def _jitted():
    add = jax.jit(replay.add)
    gather = jax.jit(replay.gather, static_argnames=("n_step",))
    sample = jax.jit(replay.sample, static_argnames=("batch_size", "n_step"))
    return add, gather, sample


def _add(state, step, fn):
    return fn(
        state, step["obs"], step["actions"], step["rewards"], step["next_obs"],
        step["terminated"], step["truncated"], step["valid"],
    )


def _check_against_reference(state, ref, gather, n_step=1, gamma=0.9):
    """Every sampleable transition, by rank, equals the reference's, in order."""
    expected = ref.all_alive()
    sizes = np.asarray(state.size)
    np.testing.assert_array_equal(sizes, [len(ref.alive(e)) for e in range(ref.b)])
    assert int(replay.num_valid(state)) == len(expected)
    batch = jax.device_get(gather(state, jnp.arange(state.capacity), n_step=n_step, gamma=gamma))
    for rank, (e, i, tr) in enumerate(expected):
        assert batch.env_ids[rank] == e
        np.testing.assert_array_equal(batch.obs[rank], tr["obs"])
        assert batch.actions[rank] == tr["action"]
        ret, disc, nxt, n_act = ref.nstep(e, i, n_step, gamma)
        np.testing.assert_array_equal(batch.next_obs[rank], nxt)
        assert batch.n_steps[rank] == n_act
        np.testing.assert_allclose(batch.rewards[rank], ret, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batch.discounts[rank], disc, rtol=1e-6)
        assert batch.terminated[rank] == (disc == 0.0)
    return batch


# ----------------------------------------------------------------------------- tests

# Env 0: assorted boundaries, including soft resets with and without stack continuation.
# Env 1: one long episode (the rings wrap many times with no frame pressure).
# Env 2: an episode ending exactly when its transition ring wraps (T=12: the 13th
#        valid add, step 12, lands in slot 0), then very short episodes.
EVENTS = {
    0: {3: "term", 9: "life_fresh", 14: "life_cont", 20: "trunc", 21: "term", 33: "life_cont", 47: "trunc"},
    2: {12: "term", 14: "trunc", 16: "life_fresh", 18: "life_cont", 30: "term", 31: "term"},
}


@pytest.mark.parametrize("headroom", [0.1, 1.0])
def test_frame_stack_rebuilds_exactly_across_wraps_and_boundaries(headroom):
    b, s, t = 3, 4, 12
    add, gather, _ = _jitted()
    state = replay.create(b * t, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s, frame_headroom=headroom)
    assert state.frames_per_env == t + max(int(t * headroom), s)
    envs = ScriptedEnvs(b, s, EVENTS, seed=1)
    ref = Reference(b, t, state.frames_per_env, s)
    for _ in range(60):
        step = envs.step()
        state = _add(state, step, add)
        ref.add(step)
        _check_against_reference(state, ref, gather)
    # Env 1 never ended an episode: all T of its newest transitions are kept.
    assert int(state.size[1]) == t


@pytest.mark.parametrize("seed,reset_step", [(0, True), (1, True), (2, False)])
def test_frame_stack_random_episodes_nstep(seed, reset_step):
    """Short random episodes (frame pressure, retirements), paused frames,
    transitions marked invalid mid-episode, and steps the agent silently never
    adds (then only the obs comparison tells that a transition's successor is
    missing); n-step sums vs NumPy."""
    b, s, t = 2, 3, 10
    add, gather, _ = _jitted()
    state = replay.create(b * t, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s, frame_headroom=0.3)
    envs = ScriptedEnvs(
        b, s, _random_events(b, 80, 0.2, seed), seed=seed, p_static=0.2, p_drop=0.1,
        reset_step=reset_step,
    )
    ref = Reference(b, t, state.frames_per_env, s)
    rng = np.random.default_rng(seed)
    for i in range(80):
        step = envs.step()
        if rng.random() < 0.1:
            continue  # never added
        state = _add(state, step, add)
        ref.add(step)
        if i % 7 == 6:
            for n in (1, 3, 5):
                _check_against_reference(state, ref, gather, n_step=n, gamma=0.9)


def test_plain_observations_nstep():
    """No frame_stack: float32 [6] observations, any episode pattern, capacity always reached."""
    b, t = 3, 8
    add, gather, _ = _jitted()
    state = replay.create(b * t, (6,), jnp.float32, num_envs=b)
    assert state.frames_per_env == 2 * t
    envs = ScriptedEnvs(b, 2, _random_events(b, 50, 0.25, 7), seed=3, p_static=0.2, p_drop=0.1)
    ref = Reference(b, t, state.frames_per_env, 1)
    for i in range(50):
        step = _plain(envs.step())
        state = _add(state, step, add)
        ref.add(step)
        assert int(replay.num_valid(state)) == sum(min(len(tr), t) for tr in ref.trans)
        if i % 5 == 4:
            for n in (1, 4):
                _check_against_reference(state, ref, gather, n_step=n, gamma=0.95)


def test_sample_never_returns_invalid_or_overwritten():
    b, s, t = 2, 4, 10
    add, _, sample = _jitted()
    state = replay.create(b * t, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s)
    envs = ScriptedEnvs(b, s, _random_events(b, 60, 0.3, 11), seed=5)
    ref = Reference(b, t, state.frames_per_env, s)
    invalid_ids, key = set(), jax.random.key(0)
    for _ in range(60):
        step = envs.step()
        invalid_ids |= set(step["actions"][~step["valid"]].tolist())
        state = _add(state, step, add)
        ref.add(step)
        key, k = jax.random.split(key)
        batch = jax.device_get(sample(state, k, 256))
        alive = {int(tr["action"]): tr for _, _, tr in ref.all_alive()}
        for j in range(256):
            tr = alive[int(batch.actions[j])]  # KeyError: not sampleable
            np.testing.assert_array_equal(batch.obs[j], tr["obs"])
            np.testing.assert_array_equal(batch.next_obs[j], tr["next_obs"])
        assert not invalid_ids & set(alive)
    assert invalid_ids  # the script did produce reset steps


def test_sampling_is_uniform_over_valid_transitions():
    b, s, t = 3, 4, 16
    add, _, sample = _jitted()
    state = replay.create(b * t, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s, frame_headroom=1.0)
    # Unequal per-env counts: env 0 has reset steps, env 2 fills its ring.
    envs = ScriptedEnvs(b, s, {0: {2: "term", 5: "trunc"}}, seed=0)
    for i in range(20):
        step = envs.step()
        if i >= 10:  # envs 0 and 1 stop adding (invalid), env 2 keeps going
            step["valid"][:2] = False
        state = _add(state, step, add)
    n = int(replay.num_valid(state))
    assert list(np.asarray(state.size)) == [8, 10, 16]
    draws = 100 * n * 20
    batch = jax.device_get(sample(state, jax.random.key(42), draws))
    _, counts = np.unique(batch.actions, return_counts=True)
    assert len(counts) == n
    expected = draws / n  # 2000; standard deviation ~44
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected


def test_jit_and_no_jit_agree():
    b, s, t = 2, 4, 6
    states, batches = [], []
    for jit in (True, False):
        add = jax.jit(replay.add) if jit else replay.add
        sample = (
            jax.jit(replay.sample, static_argnames=("batch_size", "n_step")) if jit else replay.sample
        )
        state = replay.create(b * t, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s)
        envs = ScriptedEnvs(b, s, {0: {2: "term", 5: "life_cont"}, 1: {3: "trunc"}}, seed=2)
        for _ in range(9):
            state = _add(state, envs.step(), add)
        states.append(state)
        batches.append(sample(state, jax.random.key(3), 16, n_step=3, gamma=0.9))
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6), batches[0], batches[1]
    )


def test_empty_buffer_samples_finite_garbage_inside_jit():
    _, _, sample = _jitted()
    state = replay.create(8, (4, 5, 5), jnp.uint8, num_envs=2, frame_stack=4)
    assert int(replay.num_valid(state)) == 0
    batch = sample(state, jax.random.key(0), 4, n_step=3)
    assert batch.obs.shape == (4, 4, 5, 5) and batch.next_obs.shape == (4, 4, 5, 5)
    assert np.all(np.isfinite(batch.rewards)) and np.all(np.isfinite(batch.discounts))


def test_memory_bound_atari():
    cap, per_transition_scalars = 10_000, 32
    for b in (1, 8):
        state = replay.create(cap, (4, 84, 84), jnp.uint8, num_envs=b, frame_stack=4)
        leaf_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        assert replay.nbytes(state) == leaf_bytes
        assert leaf_bytes <= 1.1 * cap * 84 * 84 + per_transition_scalars * cap
    # 1M, computed without allocating: frames 1.1e6 * 7056 B, scalars 19 B per transition.
    big = jax.eval_shape(
        lambda: replay.create(1_000_000, (4, 84, 84), jnp.uint8, num_envs=8, frame_stack=4)
    )
    assert replay.nbytes(big) <= 1.1e6 * 84 * 84 + per_transition_scalars * 1e6


def test_add_does_not_retrace():
    b, s = 2, 4
    add = jax.jit(chex.assert_max_traces(lambda *args: replay.add(*args), n=1))
    state = replay.create(8, (s, *FRAME), jnp.int32, num_envs=b, frame_stack=s)
    envs = ScriptedEnvs(b, s, {0: {1: "term"}}, seed=0)
    for _ in range(5):  # valid and invalid adds, different values: one trace
        state = _add(state, envs.step(), add)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"capacity=1000 is not divisible by num_envs=3"):
        replay.create(1000, (4,), jnp.float32, num_envs=3)
    with pytest.raises(ValueError, match=r"frame_stack=4 does not match obs_shape=\(84, 84, 4\)"):
        replay.create(1000, (84, 84, 4), jnp.uint8, frame_stack=4)
    with pytest.raises(ValueError, match=r"capacity must be a positive integer"):
        replay.create(0, (4,), jnp.float32)
    state = replay.create(8, (4,), jnp.float32, num_envs=2)
    obs = jnp.zeros((3, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"obs has shape \(3, 4\), expected .* \(2, 4\)"):
        replay.add(state, obs, jnp.zeros(3), jnp.zeros(3), obs, jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"n_step must be a positive integer"):
        replay.sample(state, jax.random.key(0), 4, n_step=0)
    good = jnp.zeros((2, 4), jnp.float32)
    with pytest.raises(TypeError, match=r"actions must be integers .* got dtype float32; a cast would truncate"):
        replay.add(state, good, jnp.array([1.7, 0.0]), jnp.zeros(2), good, jnp.zeros(2), jnp.zeros(2))
