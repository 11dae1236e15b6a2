"""Pipelined acting (``--env-groups``): G EnvPools stepped in turn give exactly
the rollout of one pool with per-env sampling keys, train and resume exactly,
and bad combinations are refused before anything compiles."""

import csv
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import envs, parallel, rollout
from jaxatari.agents import a2c, ppo
from jaxatari.networks.policy import init_actor_critic, initial_carry, resolve_network_spec

B, T = 8, 23


def rollouts(groups, network, env_id="CartPole-v1", calls=2):
    """``calls`` consecutive rollouts of B envs in ``groups`` pools; returns their outputs."""
    env, spec = envs.make(env_id, B, seed=5, groups=groups)
    try:
        ns = resolve_network_spec(network, num_actions=spec.num_actions, atari=spec.atari,
                                  cfc=dict(hidden_size=8) if network == "cfc" else None)
        net, params = init_actor_critic(ns, jax.random.key(0), spec.obs_shape, spec.obs_dtype)
        obs, _ = env.reset()
        state, carry = envs.env_state_init(obs), initial_carry(ns, B)
        handle, step, backend = envs.make_step_fn(env, spec)
        assert backend == "xla" and isinstance(step, envs.GroupedStep) == (groups > 1)
        f = jax.jit(lambda h, s, c, k: rollout.rollout(net.apply, params, c, s, h, step, k, T,
                                                       env_index=jnp.arange(B)))
        out = []
        for i in range(calls):
            handle, state, carry, traj, ep = f(handle, state, carry, jax.random.key(i))
            out.append(jax.device_get((traj, ep, state, carry)))
        return out
    finally:
        env.close()  # every call above has finished (device_get): the pools may go


@pytest.mark.parametrize("groups,network", [(2, "auto"), (4, "cfc")])
def test_grouped_rollout_equals_one_pool_with_per_env_keys(groups, network):
    """Same actions, observations, resets, episode statistics (incl. the shared
    window of returns, filled in env order) and recurrent state as one pool."""
    for (ta, ea, sa, ca), (tb, eb, sb, cb) in zip(rollouts(1, network), rollouts(groups, network)):
        assert ta.actions.shape == (T, B)
        for name in ("obs", "first", "valid", "actions", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
        np.testing.assert_allclose(ta.log_probs, tb.log_probs, atol=1e-5)
        np.testing.assert_allclose(ta.values, tb.values, atol=1e-5)
        assert [float(x) for x in ea] == [float(x) for x in eb]
        np.testing.assert_array_equal(sa.obs, sb.obs)
        np.testing.assert_array_equal(sa.stats.window, sb.stats.window)
        assert int(sa.stats.count) == int(sb.stats.count)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), ca, cb)
    assert int(ea.count) > 0, "the test should see episodes end (resets inside the rollout)"


def test_env_groups_host_api_matches_one_pool():
    one, _ = envs.make("CartPole-v1", 6, seed=9)
    three, spec = envs.make("CartPole-v1", 6, seed=9, groups=3)
    try:
        assert isinstance(three, envs.EnvGroups) and spec.num_envs == 6 and three.group_size == 2
        (o1, i1), (o3, i3) = one.reset(), three.reset()
        np.testing.assert_array_equal(o1, o3)
        np.testing.assert_array_equal(i1["env_id"], i3["env_id"])
        rng = np.random.default_rng(0)
        for _ in range(40):
            a = rng.integers(0, 2, 6).astype(np.int32)
            s1, s3 = one.step(a), three.step(a)
            for x, y in zip(s1[:4], s3[:4]):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(s1[4]["env_id"], s3[4]["env_id"])
        with pytest.raises(envs.EnvError, match="takes 6 actions"):
            three.step(np.zeros(4, np.int32))
    finally:
        one.close()
        three.close()


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_time", "sps")} for r in csv.DictReader(f)]


def leaves(result):
    return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


@pytest.mark.slow
@pytest.mark.parametrize("mod,extra", [
    (ppo, dict(num_steps=32, network="cfc", cfc_units=8, num_minibatches=2)),
    (a2c, dict(num_steps=5)),
])
def test_env_groups_training_resumes_exactly(tmp_path, capsys, mod, extra):
    """Half a run with --env-groups 2, resumed (envs replayed from the action log)
    to the full length: the same params and metrics as one uninterrupted run."""
    steps = 4 * extra["num_steps"] * 8
    base = mod.Config(env="CartPole-v1", num_envs=4, env_groups=2, total_timesteps=steps,
                      chunk_steps=steps // 2, anneal_lr=False, tensorboard=False, devices=1, **extra)
    full = mod.train(dataclasses.replace(base, run_dir=str(tmp_path / "full")))
    assert "(2 env groups, pipelined)" in capsys.readouterr().out
    half = mod.train(dataclasses.replace(base, total_timesteps=steps // 2, run_dir=str(tmp_path / "half")))
    assert half.global_step == steps // 2
    resumed = mod.train(dataclasses.replace(base, run_dir=str(tmp_path / "half"), resume=str(tmp_path / "half")))
    assert resumed.global_step == full.global_step == steps
    for x, y in zip(leaves(full), leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    assert rows(tmp_path / "half") == rows(tmp_path / "full")


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_envs=6, env_groups=4), "--env-groups 4 is not accepted with --num-envs 6"),
    (dict(env_groups=0), "--env-groups 0 is not accepted"),
    (dict(env_groups=2, env_backend="callback"), "not accepted with --env-backend callback"),
    (dict(env_groups=2, num_agents=2), "runs on the single-device path"),
    (dict(env_groups=2, devices=2), "runs on the single-device path"),
])
@pytest.mark.parametrize("mod", [ppo, a2c])
def test_bad_env_groups_are_named_before_compiling(mod, kwargs, message):
    c = mod.Config(env="CartPole-v1", **{"num_envs": 4, **kwargs})
    with pytest.raises(parallel.ParallelError, match=message):
        mod.resolve(c)


def grouped_chunk(mod, c, env, spec, updates_per_chunk):
    """``(state, handle, jitted chunk)`` of ``mod`` (PPO or A2C) on the grouped pool ``env``."""
    from jaxatari.networks import ActorCritic

    ns = mod.network_spec(c, spec)
    net, opt = ActorCritic(ns), mod.make_optimizer(c, 100)
    obs, _ = env.reset()
    state = mod.init(c, spec, ns, opt, obs, jax.random.PRNGKey(0))
    handle, step_fn, _ = envs.make_step_fn(env, spec)
    args = (c, net, opt, step_fn, False) if mod is ppo else (c, net, opt, step_fn)
    return state, handle, mod.make_chunk(*args, updates_per_chunk, 100)


@pytest.fixture(scope="module", params=[(ppo, 3), (a2c, 2)], ids=["ppo-3groups", "a2c-2groups"])
def grouped(request):
    """Three calls of a jitted training chunk of 2 updates on ``groups`` pools of
    2 envs each. Fails here if the chunk traces twice or a call moves anything
    between host and device beyond EnvPool's own custom calls. Gives the config,
    final handle and state, last output and the compiled program's text."""
    import chex

    mod, groups = request.param
    c = mod.resolve(mod.Config(env="CartPole-v1", num_envs=2 * groups, num_steps=8, env_groups=groups, devices=1))
    env, spec = envs.make(c.env, c.num_envs, seed=0, groups=groups)
    state = None
    try:
        state, handle, chunk = grouped_chunk(mod, c, env, spec, 2)
        chex.clear_trace_counter()
        chunk = jax.jit(chex.assert_max_traces(chunk.__wrapped__, n=1), donate_argnames=("state",))
        state, handle = jax.device_put((state, handle))
        hlo = chunk.lower(state, handle).compile().as_text()  # the program the calls below run (compiled once)
        with jax.transfer_guard("disallow"):
            for _ in range(3):
                state, handle, out = chunk(state, handle)
        jax.block_until_ready(out)
    finally:
        jax.block_until_ready(state)  # the pools must outlive every call that steps them
        env.close()
    return types.SimpleNamespace(c=c, handle=handle, state=state, out=out, hlo=hlo)


def test_grouped_chunk_compiles_once_without_host_transfers(grouped):
    """The training chunk with env groups traces once, and repeated calls move
    nothing between host and device beyond EnvPool's own custom calls (checked in
    the fixture); its outputs are complete."""
    g = grouped
    assert isinstance(g.handle, tuple) and len(g.handle) == g.c.env_groups
    assert int(g.state.update) == 6
    assert g.out.actions.shape == (2 * 8, g.c.num_envs)
    assert jax.device_get(g.out.metrics["finite"]).all()


def test_groups_are_pipelined_in_the_compiled_program(grouped):
    """In the optimized, scheduled rollout step each group is received, acted for
    and sent before the next group is received (with optimization barriers alone,
    XLA received every group first and sent them all at the end: no pipelining)."""
    from hlo_order import env_step_orders

    hlo, groups = grouped.hlo, grouped.c.env_groups
    steps = [o for o in env_step_orders(hlo) if o and o[0].startswith("R")]  # the loop body: receive first
    pipelined = [tok for g in range(groups) for tok in (f"R{g}", f"S{g}")]
    assert steps and all(o == pipelined for o in steps), env_step_orders(hlo)


def test_env_groups_default_to_one_device_where_there_are_several(monkeypatch):
    """--devices defaults to all local devices; with --env-groups it means one
    (pipelined acting is single-device); an explicit --devices 2 is refused above."""
    monkeypatch.setattr(parallel.jax, "local_device_count", lambda: 2)
    for groups, devices, scaled in ((1, 2, True), (2, 1, False)):  # without groups: both devices
        c = ppo.resolve(ppo.Config(env="CartPole-v1", num_envs=4, env_groups=groups))
        c, n, got_scaled = parallel.setup(c)
        assert (n, got_scaled, c.devices) == (devices, scaled, devices)
