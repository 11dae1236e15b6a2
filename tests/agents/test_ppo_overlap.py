"""PPO ``--overlap-learning``: the learner's SGD steps run between EnvPool's send
and recv during the next rollout. Its micro-batched SGD equals the plain
update's, the rollout around it is the plain (split-step) rollout, the policy
lags by exactly one update, runs resume exactly, CartPole learns, and bad
combinations are refused before anything compiles."""

import contextlib
import csv
import dataclasses
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari import envs, parallel, rollout, runner
from jaxatari.agents import ppo
from jaxatari.networks import ActorCritic
from jaxatari.networks.policy import init_actor_critic, initial_carry, resolve_network_spec


def synthetic(c: ppo.Config, recurrent: bool, seed=0):
    """A made-up rollout on CartPole-shaped observations: ``(state, traj, env_state, carry, net)``."""
    T, B = c.num_steps, c.num_envs
    ns = resolve_network_spec("cfc" if recurrent else "mlp", num_actions=2, atari=False,
                              cfc=dict(hidden_size=8) if recurrent else None)
    net, params = init_actor_critic(ns, jax.random.key(seed), (4,), np.float32)
    ks = jax.random.split(jax.random.key(seed + 1), 6)
    valid = jax.random.uniform(ks[0], (T, B)) > 0.1  # some reset steps, masked out of the losses
    done = jax.random.uniform(ks[1], (T, B)) < 0.05
    traj = rollout.Trajectory(
        obs=jax.random.normal(ks[2], (T, B, 4)), first=jnp.roll(done, 1, axis=0), valid=valid,
        actions=jax.random.randint(ks[3], (T, B), 0, 2), log_probs=jnp.log(jnp.full((T, B), 0.5)) +
        0.1 * jax.random.normal(ks[4], (T, B)), values=jax.random.normal(ks[5], (T, B)),
        rewards=jnp.ones((T, B)), terminated=done, truncated=jnp.zeros((T, B), bool))
    opt = ppo.make_optimizer(c, 10)
    state = ppo.State(params=params, opt_state=opt.init(params), env=envs.env_state_init(np.zeros((B, 4), np.float32)),
                      carry=initial_carry(ns, B), key=jax.random.key(7), update=jnp.zeros((), jnp.int32))
    carry_end = initial_carry(ns, B)
    env_state = envs.env_state_init(np.asarray(jax.random.normal(ks[0], (B, 4))))
    return state, traj, env_state, carry_end, net, opt


@pytest.mark.parametrize("recurrent,norm_adv,Ks", [(False, True, (1, 4)), (False, False, (2,)), (True, True, (2,))])
def test_microbatched_sgd_equals_the_plain_update(recurrent, norm_adv, Ks):
    """E x M SGD steps done as K accumulated micro-batches each (advantages
    normalised per minibatch up front, micro losses weighted by their share of
    the minibatch's valid samples) give the plain update's params and metrics,
    for each K in ``Ks`` (one plain update serves them all)."""
    c = ppo.Config(env="CartPole-v1", num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2,
                   clip_coef=0.2, norm_adv=norm_adv, overlap_learning=True, network="cfc" if recurrent else "mlp")
    state, traj, env_state, carry_end, net, opt = synthetic(c, recurrent)
    ep = rollout.EpisodeMetrics(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    k_sgd = jax.random.key(3)
    plain, m = jax.jit(lambda s: ppo.learn(s, traj, ep, env_state, carry_end, s.key, k_sgd, c=c, net=net,
                                           optimizer=opt, recurrent=recurrent))(state)
    batch = ppo.rollout_batch(net.apply, state.params, traj, state.carry, carry_end, env_state, c)
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(plain.params),
                                                             jax.tree.leaves(state.params)))
    assert moved > 1e-3, "the update should move the params"
    steps = c.update_epochs * c.num_minibatches
    for K in Ks:
        ck = dataclasses.replace(c, overlap_microbatches=K)
        w = jax.jit(lambda s: ppo.sgd_by_microbatches(s.params, s.opt_state, batch, k_sgd, c=ck, net=net,
                                                      optimizer=opt, recurrent=recurrent))(state)
        chex.assert_trees_all_close(w.params, plain.params, atol=2e-6, rtol=1e-5)
        chex.assert_trees_all_close(w.opt_state, plain.opt_state, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(float(w.loss) / steps, float(m["loss"]), rtol=1e-5, atol=1e-6, err_msg=f"K={K}")
        np.testing.assert_allclose(float(w.gnorm) / steps, float(m["grad_norm"]), rtol=1e-5, err_msg=f"K={K}")
        for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
            np.testing.assert_allclose(float(getattr(w.info, name)) / steps, float(m[name]), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name}, K={K}")


def test_sgd_plan_covers_every_sample_once_per_epoch():
    c = ppo.Config(env="CartPole-v1", num_envs=8, num_steps=16)  # the shapes above: their eager ops are compiled
    state, traj, env_state, carry_end, net, _ = synthetic(c, False)
    batch = ppo.rollout_batch(net.apply, state.params, traj, state.carry, carry_end, env_state, c)
    plan = ppo.sgd_plan(batch, jax.random.key(0), epochs=3, minibatches=2, microbatches=4, recurrent=False,
                        norm_adv=True)
    assert plan.index.shape == (3, 2, 4, 16)
    for e in range(3):
        assert sorted(np.asarray(plan.index[e]).ravel()) == list(range(128))
    np.testing.assert_allclose(np.asarray(plan.weight.sum(-1)), 1.0, rtol=1e-6)  # micro shares of a minibatch


def test_rollout_with_work_is_the_plain_rollout_with_the_work_on_schedule():
    """Same pool state, same key: the rollout with work gives exactly the plain
    split-step rollout, and the work runs once per block of ``every`` env steps
    with n = 0, 1, 2, ... (where in the program: test_the_learner_runs_after_the_send)."""
    B, T, every = 4, 40, 5

    def work(w, n):  # a record of the calls: (count, sum of n, sum of n^2)
        return w + jnp.stack([1, n, n * n]).astype(jnp.float32)

    results = []
    for with_work in (False, True):
        env, spec = envs.make("CartPole-v1", B, seed=11)
        try:
            ns = resolve_network_spec("mlp", num_actions=spec.num_actions, atari=False)
            net, params = init_actor_critic(ns, jax.random.key(0), spec.obs_shape, spec.obs_dtype)
            obs, _ = env.reset()
            handle, step, _ = envs.make_step_fn(env, spec, split=True)
            assert isinstance(step, envs.GroupedStep)
            if with_work:
                f = jax.jit(lambda h, s, k: rollout.rollout_with_work(net.apply, params, (), s, h, step, k, T, work,
                                                                      jnp.zeros(3), every=every))
                with pytest.raises(ValueError, match="every=3 must be >= 1 and divide num_steps=40"):
                    rollout.rollout_with_work(net.apply, params, (), envs.env_state_init(obs), handle, step,
                                              jax.random.key(0), T, work, jnp.zeros(3), every=3)
            else:
                f = jax.jit(lambda h, s, k: rollout.rollout(net.apply, params, (), s, h, step, k, T))
            results.append(jax.device_get(f(handle, envs.env_state_init(obs), jax.random.key(4))))
        finally:
            env.close()
    (_, sa, _, ta, ea), (_, sb, _, tb, eb, w) = results
    jax.tree.map(np.testing.assert_array_equal, ta, tb)
    assert [float(x) for x in ea] == [float(x) for x in eb]
    np.testing.assert_array_equal(sa.obs, sb.obs)
    assert ta.terminated.any(), "the test should see episodes end inside the rollout"
    assert ta.actions.shape == (T, B) and ta.obs.shape == (T, B, 4)
    n = np.arange(T // every)
    np.testing.assert_allclose(w, [len(n), n.sum(), (n * n).sum()])


def small_run(network="mlp", **kw):
    extra = dict(network="cfc", cfc_units=8) if network == "cfc" else {}
    base = dict(env="CartPole-v1", num_envs=4, num_steps=16, num_minibatches=2, update_epochs=2,
                overlap_learning=True, devices=1, tensorboard=False)
    return ppo.Config(**{**base, **extra, **kw})


@contextlib.contextmanager
def training(c: ppo.Config):
    """The run's EnvPool (closed on exit), network, optimizer, initial state and split step."""
    env, spec = envs.make(c.env, c.num_envs, seed=0, groups=c.env_groups)
    try:
        ns = ppo.network_spec(c, spec)
        net, opt = ActorCritic(ns), ppo.make_optimizer(c, 100)
        obs, _ = env.reset()
        state = ppo.init(c, spec, ns, opt, obs, jax.random.PRNGKey(0))
        handle, step_fn, _ = envs.make_step_fn(env, spec, split=True)
        yield types.SimpleNamespace(ns=ns, net=net, opt=opt, state=state, handle=handle, step_fn=step_fn)
    finally:
        env.close()


@pytest.fixture(scope="module", params=[("mlp", 1, 1), ("cfc", 1, 1), ("mlp", 2, 2)],
                ids=["mlp-K1", "cfc-K1", "mlp-groups2-K2"])
def overlapped(request):
    """Six overlapped updates (network, env groups, micro-batches K), one per call
    of the jitted chunk. Fails here if the chunk traces twice or a call moves
    anything between host and device beyond EnvPool's own custom calls. Gives the
    config, network, optimizer, pools, the compiled program's text, ``states[k]``
    (after update k; ``states[0]`` the initial one) and each call's output."""
    network, groups, K = request.param
    c = ppo.resolve(small_run(network, env_groups=groups, overlap_microbatches=K))
    with training(c) as t:
        chex.clear_trace_counter()
        chunk = ppo.make_chunk(c, t.net, t.opt, t.step_fn, t.ns.recurrent, 1, 100)
        chunk = jax.jit(chex.assert_max_traces(chunk.__wrapped__, n=1), donate_argnames=("state",))
        state, handle = jax.device_put((t.state, t.handle))
        hlo = chunk.lower(state, handle).compile().as_text()  # the program the calls below run (compiled once)
        states, outs = [jax.tree.map(jnp.copy, state)], []
        try:
            for _ in range(6):
                with jax.transfer_guard("disallow"):
                    state, handle, out = chunk(state, handle)
                states.append(jax.tree.map(jnp.copy, state))  # the next call donates `state`
                outs.append(out)
        finally:
            jax.block_until_ready((states, outs))  # the pool must outlive every call that steps it
    return types.SimpleNamespace(c=c, ns=t.ns, net=t.net, opt=t.opt, pools=len(handle), hlo=hlo, states=states,
                                 outs=outs)


def test_overlapped_update_learns_the_previous_rollout_with_a_one_update_lag(overlapped):
    """Update 1 only collects; update k + 1 collects with update k's params and
    takes exactly the SGD of rollout k (sgd_by_microbatches on the pending batch)."""
    o, c = overlapped, overlapped.c
    s0, s1, s2 = o.states[:3]
    chex.assert_trees_all_equal(s1.params, s0.params)  # nothing pending yet: no learning
    assert bool(s1.has_pending) and not bool(s0.has_pending)
    assert float(o.outs[0].metrics["loss"][0]) == 0.0 and float(o.outs[1].metrics["loss"][0]) != 0.0
    assert s1.pending.actions.shape == (c.num_steps, c.num_envs)
    _, _, k_sgd = jax.random.split(s1.key, 3)
    sgd = functools.partial(ppo.sgd_by_microbatches, c=c, net=o.net, optimizer=o.opt, recurrent=o.ns.recurrent)
    want = jax.jit(sgd)(s1.params, s1.opt_state, s1.pending, k_sgd)
    chex.assert_trees_all_close(s2.params, want.params, atol=1e-6, rtol=1e-5)
    # The new rollout was collected by update 2's acting policy: s1.params; its log-probs say so.
    lp = jax.jit(functools.partial(_log_probs, o.net, o.ns.recurrent))
    np.testing.assert_allclose(s2.pending.log_probs, lp(s1.params, s2.pending), atol=1e-5)
    assert not np.allclose(s2.pending.log_probs, lp(s2.params, s2.pending), atol=1e-5)


def _log_probs(net, recurrent, params, batch):
    from jaxatari.ops.losses import categorical_log_prob

    logits, _ = ppo.make_apply(net, recurrent)(params, batch if recurrent else
                                               jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]),
                                                            batch._replace(extras=None)))
    return categorical_log_prob(logits, batch.actions.reshape(logits.shape[:-1])).reshape(batch.actions.shape)


def test_overlapped_chunk_compiles_once_without_host_transfers(overlapped):
    """The chunk traced once and moved nothing to or from the host (checked in the
    fixture); with --env-groups 2 too. Its outputs over six updates are complete."""
    o, c = overlapped, overlapped.c
    assert o.pools == c.env_groups
    assert int(o.states[-1].update) == 6 and o.outs[-1].actions.shape == (c.num_steps, c.num_envs)
    assert all(jax.device_get(out.metrics["finite"]).all() for out in o.outs)
    # Updates 2..6 took SGD steps (update 1 had nothing to learn on); the rate anneals over the 99
    # updates of 100 that learn, and each row logs the rate its SGD steps used.
    counts = {int(x) for x in jax.tree.leaves(o.states[-1].opt_state) if jnp.issubdtype(x.dtype, jnp.integer)}
    assert counts == {5 * c.update_epochs * c.num_minibatches}
    rates = np.concatenate([out.metrics["learning_rate"] for out in o.outs])
    np.testing.assert_allclose(rates, c.learning_rate * (1 - np.array([0, 0, 1, 2, 3, 4]) / 99), rtol=1e-6)


def test_the_learner_runs_after_the_send(overlapped):
    """In the optimized, scheduled program no learner instruction (backward pass;
    constant broadcasts aside) runs before the send of its env step, the last
    group's send with --env-groups (with an optimization barrier alone, XLA
    scheduled part of it between recv and send)."""
    from hlo_order import env_step_orders

    orders = env_step_orders(overlapped.hlo, lambda line: "transpose(jvp" in line and "broadcast" not in line)
    with_work = [o for o in orders if "W" in o]
    last_send = f"S{overlapped.pools - 1}"
    assert with_work, orders
    for order in with_work:
        assert last_send in order and order.index("W") > order.index(last_send), orders


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_time", "sps")} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_overlapped_training_resumes_exactly(tmp_path, capsys):
    """Half a run, resumed (envs replayed, the pending rollout restored from the
    checkpoint) to the full length: the same params and metrics as one run."""
    steps = 8 * 16 * 4
    base = dataclasses.replace(small_run(overlap_microbatches=2), total_timesteps=steps, chunk_steps=steps // 2,
                               anneal_lr=False)
    full = ppo.train(dataclasses.replace(base, run_dir=str(tmp_path / "full")))
    assert "learning overlaps env steps (2 micro-batches per SGD step" in capsys.readouterr().out
    ppo.train(dataclasses.replace(base, total_timesteps=steps // 2, run_dir=str(tmp_path / "half")))
    resumed = ppo.train(dataclasses.replace(base, run_dir=str(tmp_path / "half"), resume=str(tmp_path / "half")))
    assert resumed.global_step == full.global_step == steps
    for x, y in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert rows(tmp_path / "half") == rows(tmp_path / "full")
    # Trained overlapped: update 1 had nothing to learn on (the plain update learns on its own rollout).
    losses = [float(r["loss"]) for r in rows(tmp_path / "full")]
    assert losses[0] == 0.0 and all(losses[1:]), losses


@pytest.mark.slow
def test_overlapped_ppo_learns_cartpole(tmp_path):
    """The one-update policy lag still learns: CartPole's 100-episode mean passes
    400 within the default 500k steps (random play scores ~22)."""
    r = ppo.train(ppo.Config(env="CartPole-v1", overlap_learning=True, overlap_microbatches=2, tensorboard=False,
                             run_dir=str(tmp_path / "run")))
    with open(tmp_path / "run" / "metrics.csv") as f:
        best = max(float(row["return_mean100"]) for row in csv.DictReader(f) if row["return_mean100"])
    assert r.global_step >= 500_000
    assert best >= 400, f"mean of the last 100 returns peaked at {best:.1f}"


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_steps=100), r"--num-steps 100 must be a multiple of 16"),
    (dict(overlap_microbatches=3), r"--overlap-microbatches 3 is not accepted: .* \(--num-steps / 16 = 8\)"),
    (dict(overlap_microbatches=0), r"--overlap-microbatches 0 is not accepted"),
    (dict(network="cfc", overlap_microbatches=2, num_envs=4), r"the envs per minibatch .* = 1\) must be divisible"),
    (dict(env_backend="callback"), "not accepted with --env-backend callback"),
    (dict(devices=2), r"single-device path; it is not accepted with --devices 2"),
    (dict(num_agents=2), r"not accepted with --num-agents 2"),
    (dict(sharded=True), r"not accepted with --sharded"),
    (dict(num_processes=2), r"not accepted with --num-processes 2"),
    (dict(overlap_learning=False, overlap_microbatches=2), r"--overlap-microbatches 2 is only accepted with "
                                                          r"--overlap-learning"),
])
def test_bad_overlap_settings_are_named_before_compiling(kwargs, message):
    c = ppo.Config(env="CartPole-v1", **{"overlap_learning": True, **kwargs})
    with pytest.raises(runner.ConfigError, match=message):
        ppo.resolve(c)


def test_overlap_refuses_a_multi_process_launch(monkeypatch):
    """Several processes given through the environment (not --num-processes) are refused in setup."""
    c = ppo.resolve(ppo.Config(env="CartPole-v1", overlap_learning=True))
    monkeypatch.setattr(parallel.jax, "process_count", lambda: 2)
    monkeypatch.setattr(parallel, "initialize_distributed", lambda *a: None)
    monkeypatch.setattr(parallel, "resolve_devices", lambda n, b: 1)
    with pytest.raises(parallel.ParallelError, match=r"--overlap-learning runs on the single-device path.* 2 "
                                                     r"process\(es\)"):
        parallel.setup(c)
