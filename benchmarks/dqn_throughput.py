"""DQN throughput: the compiled loop with parallel envs against a one-env Python-loop DQN
at the same replay ratio.

    python benchmarks/dqn_throughput.py                          # Pong-v5, 1 and 8 envs
    python benchmarks/dqn_throughput.py --env CartPole-v1 --num-envs 1 4 16
    python benchmarks/dqn_throughput.py --seconds 5 --num-envs 8 # quick

Writes `dqn_throughput_<kind>_<env>.json` and `.md` under `--out-dir`
(default benchmarks/results/), `<kind>` being the machine slug of
`machine.kind()` (`cpu-2core`, `nvidia-h200-16core`).

Rows (agent steps per second summed over envs, measured after compilation and
after learning has started, so that every timed step pays for learning):

* **python-loop, 1 env**: the CleanRL `dqn_atari_jax.py` structure. EnvPool is
  stepped on the host one env at a time; the greedy action is a jitted forward
  pass fetched to the host each step (skipped on exploring steps, as in
  CleanRL); transitions go into a NumPy ring buffer; every `train_frequency`
  steps `gradient_steps` minibatches are drawn with NumPy and sent to one
  jitted update (the same `jaxatari.ops.td.dqn_loss` and optimizer as the
  compiled agent); the target is synced by step count with a jitted copy.
* **compiled, B envs**: `benchmarks.train_sps.benchmark(dqn.ALGORITHM, ...)`,
  DQN on the training driver (`jaxatari.driver`) on one device: act, EnvPool
  step (`env.xla()`), buffer insert, sampling and updates in one compiled
  chunk of one metrics row.

Both use the `--dqn-preset` hyperparameters (network, batch, loss, optimizer,
`gradient_steps / train_frequency` updates per env step) with epsilon held at
its final value (`exploration_steps=1`: the regime of most of training) and
learning after `--learning-starts` (1000) env steps; timing starts after that. The speedup column is compiled SPS / the
Python loop's SPS at the same replay ratio.

The replay ratio bounds both: at `G/F` updates per env step, SPS <= (updates/s)
x F/G. On a CPU the Nature-CNN update dominates (tens of ms) and the two loops
end up within a small factor; the host-loop overhead the compiled loop removes
(a device round trip per env step, a host->device batch copy per update) is
what dominates on a GPU, and on small networks (CartPole).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import machine  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Args:
    """DQN steps/s: compiled with parallel envs vs a one-env Python loop, same replay ratio."""

    env: str = "Pong-v5"
    """EnvPool task id."""
    num_envs: tuple[int, ...] = (1, 8)
    """Env counts of the compiled rows."""
    dqn_preset: str | None = None
    """DQN hyperparameters (default: nature on Atari, classic otherwise)."""
    train_frequency: int | None = None
    """Override the preset's train frequency (env steps per training event)."""
    gradient_steps: int = 1
    """Gradient steps per training event."""
    batch_size: int | None = None
    """Override the preset's minibatch size."""
    buffer_size: int = 50_000
    """Replay capacity of both loops (the speed hardly depends on it)."""
    learning_starts: int = 1000
    """Env steps before learning, in both loops (timing starts once learning runs)."""
    seconds: float = 30.0
    """Timed seconds per row, after compilation and warm-up."""
    threads: int = 0
    """EnvPool threads of the compiled rows (0: min(num_envs, usable cores)); the Python loop uses 1."""
    baseline: bool = True
    """Measure the one-env Python-loop baseline."""
    out_dir: str = str(RESULTS_DIR)
    """Where to write the JSON and Markdown results."""


def _overrides(a: Args) -> dict[str, Any]:
    o: dict[str, Any] = dict(buffer_size=a.buffer_size, gradient_steps=a.gradient_steps, exploration_steps=1,
                             learning_starts=a.learning_starts)
    if a.dqn_preset is not None:
        o["dqn_preset"] = a.dqn_preset
    if a.train_frequency is not None:
        o["train_frequency"] = a.train_frequency
    if a.batch_size is not None:
        o["batch_size"] = a.batch_size
    return o


def python_loop_dqn(env_id: str, seconds: float, **overrides) -> dict[str, Any]:
    """A one-env DQN with the host in the loop (CleanRL's dqn_atari_jax structure); SPS after warm-up."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxatari import envs
    from jaxatari.agents import dqn
    from jaxatari.networks import QNetwork
    from jaxatari.ops.td import DQNBatch, dqn_loss

    c = dqn.resolve(dqn.Config(env=env_id, num_envs=1, total_timesteps=10**9, **overrides))
    env, spec = envs.make(env_id, 1, seed=c.seed, preset=c.preset, num_threads=1)
    qnet = QNetwork(dqn.network_spec(c, spec))
    optimizer = dqn.make_optimizer(c)
    params = qnet.init(jax.random.PRNGKey(c.seed), jnp.zeros((1, *spec.obs_shape), spec.obs_dtype))
    target_params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    loss_fn = functools.partial(dqn_loss, apply_fn=qnet.apply, double_q=c.double_q, loss=c.loss,
                                huber_delta=c.huber_delta)

    @jax.jit
    def act(params, obs):
        return jnp.argmax(qnet.apply(params, obs), axis=-1)

    @jax.jit
    def update(params, target_params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, target_params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    sync = jax.jit(lambda t, p: jax.tree.map(lambda a, b: (1 - c.tau) * a + c.tau * b, t, p))

    cap = c.buffer_size
    buf_obs = np.zeros((cap, *spec.obs_shape), spec.obs_dtype)
    buf_next = np.zeros_like(buf_obs)
    buf_act = np.zeros(cap, np.int32)
    buf_rew = np.zeros(cap, np.float32)
    buf_disc = np.zeros(cap, np.float32)
    rng = np.random.default_rng(c.seed)
    eps = c.epsilon_schedule

    obs, _ = env.reset()
    reset_step = False
    size = pos = step = updates = 0
    warm_updates = 20  # compile and settle before timing
    t0 = timed_from = None
    while True:
        epsilon = float(eps(step))
        if rng.random() < epsilon:
            action = np.array([rng.integers(spec.num_actions)], np.int32)
        else:
            action = np.asarray(jax.device_get(act(params, obs)), np.int32)
        next_obs, reward, term, trunc, _ = env.step(action)
        if not reset_step:  # EnvPool's reset step is not a transition
            buf_obs[pos], buf_next[pos], buf_act[pos] = obs[0], next_obs[0], action[0]
            buf_rew[pos], buf_disc[pos] = reward[0], c.gamma * (1.0 - float(term[0]))
            pos, size = (pos + 1) % cap, min(size + 1, cap)
        reset_step = bool(term[0] or trunc[0]) and not reset_step
        obs = next_obs
        step += 1
        if step >= c.learning_starts and step % c.train_frequency == 0 and size:
            for _ in range(c.gradient_steps):
                idx = rng.integers(0, size, c.batch_size)
                batch = DQNBatch(buf_obs[idx], buf_act[idx], buf_rew[idx], buf_disc[idx], buf_next[idx])
                params, opt_state, loss = update(params, target_params, opt_state, batch)
                updates += 1
            if updates >= warm_updates and t0 is None:
                jax.block_until_ready(params)
                t0, timed_from = time.perf_counter(), (step, updates)
        if step % c.target_network_frequency == 0:
            target_params = sync(target_params, params)
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            jax.block_until_ready(params)
            break
    dt = time.perf_counter() - t0
    steps, n_updates = step - timed_from[0], updates - timed_from[1]
    return dict(sps=steps / dt, updates_per_s=n_updates / dt, steps=steps, num_envs=1,
                replay_ratio=c.updates_per_env_step, batch_size=c.batch_size, dqn_preset=c.dqn_preset)


def measure(a: Args, log=print) -> dict[str, Any]:
    from benchmarks import train_sps
    from jaxatari.agents import dqn

    cores = machine.usable_cores()
    doc: dict[str, Any] = dict(machine=machine.describe(), env=a.env, seconds=a.seconds,
                               overrides=_overrides(a), rows=[])
    if a.baseline:
        log(f"python-loop DQN, 1 env on {a.env} ...")
        r = python_loop_dqn(a.env, a.seconds, **_overrides(a))
        doc["rows"].append(dict(kind="python-loop", **r))
        log(f"  {r['sps']:,.0f} SPS, {r['updates_per_s']:,.1f} updates/s")
    for b in a.num_envs:
        threads = a.threads or min(b, cores)
        log(f"compiled DQN, {b} envs, {threads} threads on {a.env} ...")
        r = train_sps.benchmark(dqn.ALGORITHM, a.env, b, threads, a.seconds, **_overrides(a))
        doc["rows"].append(dict(kind="compiled", num_envs=b, threads=threads, **r))
        log(f"  {r['sps']:,.0f} SPS, {r['updates_per_s']:,.1f} updates/s (compiled in {r['compile_s']:.1f}s)")
    base = next((r["sps"] for r in doc["rows"] if r["kind"] == "python-loop"), None)
    for r in doc["rows"]:
        r["speedup"] = r["sps"] / base if base else None
    doc["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return doc


def to_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    rows = doc["rows"]
    ratio = rows[0]["replay_ratio"] if rows else float("nan")
    lines = [
        f"# DQN throughput on {machine.kind(m)}: {doc['env']}",
        "",
        f"**Machine:** {machine.summary(m)}",
        "",
        f"DQN preset {rows[0]['dqn_preset'] if rows else '-'}, replay ratio {ratio:g} gradient updates "
        f"per env step (batch {rows[0]['batch_size'] if rows else '-'}), epsilon at its final value, "
        f"learning running. Agent steps/s summed over envs, {doc['seconds']:g} s timed per row "
        "after compilation and warm-up. Speedup = SPS / the one-env Python loop's SPS at the same "
        "replay ratio.",
        "",
    ]
    load0, load1 = m.get("load_avg_1m"), m.get("load_avg_1m_end")
    cores = m.get("usable_cores") or 1
    if load0 is not None and max(load0, load1 or 0) > 0.5 * cores:
        lines += [f"**Note:** other work was using the machine (1-minute load average {load0} at start, "
                  f"{load1} at end, on {cores} usable cores): the figures are lower bounds.", ""]
    lines += ["| loop | envs | EnvPool threads | steps/s | updates/s | compile (s) | speedup |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"| {r['kind']} | {r['num_envs']} | {r.get('threads', 1)} | {r['sps']:,.0f} | "
                     f"{r['updates_per_s']:,.1f} | {compile_s} | {speedup} |")
    return "\n".join(lines) + "\n"


def write_results(doc: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dqn_throughput_{machine.kind(doc['machine'])}_{doc['env'].lower().replace('-', '_')}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(doc, indent=2, default=str))
    md.write_text(to_markdown(doc))
    return js, md


def check(a: Args) -> None:
    """Raise ``ValueError`` naming the first bad argument, before anything is measured or compiled:
    every compiled row's config is resolved as :func:`benchmarks.train_sps.benchmark` will resolve it."""
    from benchmarks import train_sps
    from jaxatari import envs
    from jaxatari.agents import dqn

    if not a.seconds > 0:
        raise ValueError(f"--seconds {a.seconds} is not accepted: it must be > 0.")
    if not a.num_envs:
        raise ValueError("--num-envs needs one or more env counts, e.g. --num-envs 1 8.")
    if a.threads < 0:
        raise ValueError(f"--threads {a.threads} is not accepted: it must be >= 0 (0 = min(num_envs, cores)).")
    envs.validate_env_id(a.env)
    for b in a.num_envs:
        if isinstance(b, bool) or b < 1:
            raise ValueError(f"--num-envs {b} is not accepted: every env count must be >= 1.")
        dqn.resolve(dqn.Config(env=a.env, num_envs=b, num_threads=a.threads, total_timesteps=10**9,
                               **{**train_sps.EXTRAS[dqn.ALGO].defaults, **_overrides(a)}))


def main(argv=None) -> int:
    import tyro

    a = tyro.cli(Args, args=argv)
    try:
        check(a)
    except ValueError as e:  # ConfigError and EnvError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc = measure(a)
    js, md = write_results(doc, a.out_dir)
    print(md.read_text())
    print(f"Wrote {js} and {md}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
