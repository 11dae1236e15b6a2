"""Behaviour cloning: a Conv+CfC network copies an expert by supervised learning.

The workload of the ncps Atari example (Lechner, Hasani et al.): sequences of
(observation, expert action) from :mod:`jaxatari.data`, the ncps conv block
into a CfC of 64 units whose readout gives the action logits, cross-entropy
over every step of every sequence (:func:`bc_loss`, the hidden state zero at
each sequence's start), Adam 1e-4, batches of 32 sequences. After each epoch
the clone is scored on the validation split and, in closed loop, over
``eval_episodes`` full games (:func:`jaxatari.evaluate.evaluate`). The clone
is an :class:`~jaxatari.networks.ActorCritic`, so :func:`jaxatari.load_policy`
loads it like any policy; its value head is never trained (its values are
meaningless), and the workload's batch norm is the conv block's per-sample
``norm="layer"`` (no batch statistics to carry into a closed loop of batch 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxatari import configs, data, envs, rundir, runner
from jaxatari.checkpoint import Checkpointer
from jaxatari.configs import CfCFields, option
from jaxatari.errors import ConfigError, NonFiniteError
from jaxatari.evaluate import evaluate
from jaxatari.networks import ActorCritic, NetworkSpec, init_actor_critic, initial_carry

ALGO = "bc"
NETWORKS = ("cfc", "convblock", "nature", "impala")
CFC_TORSOS = ("convblock", "nature", "impala")
NCPS_CONV_CHANNELS = (64, 128, 128, 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(CfCFields):
    """Behaviour cloning on a dataset of expert sequences (scripts/collect.py or the ncps layout)."""

    data: str = option(resumable=True)
    """Dataset directory: train_<i>.npz and val_<i>.npz side by side (plus manifest.json if jaxatari wrote it)."""
    env: str | None = None
    """EnvPool game the data come from (action count, closed-loop evaluation). Default: the manifest's."""
    seed: int = option(1, range="an integer >= 0")
    """Seed for params, the shuffling and the evaluation games."""
    preset: str | None = None
    """Atari preset of the closed-loop games. Default: the manifest's, else nature."""
    env_option: tuple[str, ...] = ()
    """EnvPool option overrides for the closed-loop games, KEY=VALUE; the dataset's own options apply unless
    set here."""
    epochs: int = option(50, range="an integer >= 1", resumable=True)
    """Passes over the training sequences."""
    batch_size: int = option(32, range="an integer >= 1")
    """Sequences per gradient step."""
    learning_rate: float = option(1e-4, range="> 0")
    """Adam learning rate."""
    network: str = option("cfc", choices=NETWORKS)
    """cfc (the conv block into a CfC, the workload's network) or feed-forward: convblock, nature, impala."""
    torso: str = option("convblock", choices=CFC_TORSOS)
    """Torso under --network cfc: convblock (the ncps conv block), nature or impala."""
    conv_channels: tuple[int, ...] = NCPS_CONV_CHANNELS
    """Channels of the conv block's 5x5 stride-2 convs (one conv per entry)."""
    norm: str = option("layer", choices=("layer", "none"))
    """Conv block normalisation: layer (per-sample, the stand-in for the workload's batch norm) or none."""
    eval_episodes: int = option(10, range="an integer >= 0", resumable=True)
    """Full games the clone plays in closed loop after each epoch (0: off)."""
    eval_mode: str = option("sample", choices=("sample", "greedy"), resumable=True)
    """Closed-loop actions: sample (the clone's own distribution) or greedy."""
    keep: int = option(3, range="an integer >= 1", resumable=True)
    """How many latest checkpoints (one per epoch) to keep; the best by validation accuracy is kept separately."""
    num_workers: int = option(4, range="an integer >= 0", resumable=True)
    """Threads reading and decompressing shards ahead of training (each reads whole batches)."""
    run_dir: str | None = option(None, resumable=True)
    """Output directory. Default: runs/<env>__bc__<seed>__<timestamp>."""
    resume: str | None = None
    """Resume the run in this directory from its latest checkpoint (an epoch end, or where Ctrl-C stopped it)."""
    tensorboard: bool = option(True, resumable=True)
    """Write TensorBoard events beside metrics.csv."""


def resolve(config: Config) -> tuple[Config, dict[str, Any] | None]:
    """Fill ``env``/``preset`` from the dataset manifest and validate; returns
    ``(config, manifest)``. Raises before anything is compiled."""
    c = config
    if not Path(c.data).is_dir():
        raise data.DataError(f"--data {c.data!r} is not a directory; pass a dataset directory written by "
                             "scripts/collect.py (or the ncps layout: train_<i>.npz and val_<i>.npz).")
    manifest = data.read_manifest(c.data)
    m = manifest or {}
    if c.env is None:
        if "env" not in m:
            raise ConfigError(f"--env is needed: {c.data} has no manifest.json naming its game (the ncps "
                              "layout); pass the game the data come from, e.g. --env Breakout-v5.")
        c = dataclasses.replace(c, env=manifest["env"])
    elif m.get("env") not in (None, c.env):
        raise ConfigError(f"--env {c.env} differs from the game of the dataset in {c.data} "
                          f"({manifest['env']}); leave --env out or pass --env {manifest['env']}.")
    envs.validate_env_id(c.env)
    if not envs.is_atari(c.env):
        raise ConfigError(f"--env {c.env}: behaviour cloning takes Atari games (pixel sequences).")
    dataset_game = c.preset in (None, m.get("preset"))
    c = dataclasses.replace(c, preset=envs.resolve_preset(c.env, c.preset or m.get("preset")))
    if dataset_game and m.get("options") and not c.resume:  # a resume keeps its stored games
        # Closed-loop games are the dataset's: its options beyond the preset, each unless --env-option sets it.
        given = envs.parse_env_options(c.env_option)
        base = envs.resolve_options(c.env, c.preset)
        extra = [f"{k}={v}" for k, v in manifest["options"].items()
                 if k not in given and (k not in base or base[k] != v)]
        c = dataclasses.replace(c, env_option=tuple(extra) + tuple(c.env_option))

    configs.check(c)
    if not c.conv_channels or min(c.conv_channels) < 1:
        raise ConfigError(f"--conv-channels {c.conv_channels!r} is not accepted: give one positive channel count "
                          "per conv, e.g. 64 128 128 256.")
    return c, manifest


def network_spec(c: Config, num_actions: int) -> NetworkSpec:
    """The clone's network: ``--network cfc`` is ``--torso`` into a CfC of
    ``--cfc-units`` with the policy head as its readout to the action logits."""
    recurrent = c.network == "cfc"
    torso = c.torso if recurrent else c.network
    torso_kwargs = dict(channels=list(c.conv_channels), norm=c.norm) if torso == "convblock" else {}
    torso_kwargs["conv_impl"] = "xla"  # no convolution inside a loop: XLA's own conv is the fast one
    cfc = dict(hidden_size=c.cfc_units, mode=c.cfc_mode, backbone_units=c.cfc_backbone_units,
               backbone_layers=c.cfc_backbone_layers) if recurrent else {}
    return NetworkSpec(torso=torso, num_actions=num_actions, core="cfc" if recurrent else "none",
                       shared=True, torso_kwargs=torso_kwargs, cfc=cfc)


# --- State and init ---
@struct.dataclass
class State:
    """Everything training needs, checkpointed whole.

    ``epoch`` counts completed epochs and ``batch`` the batches done in the
    current one (non-zero only in a checkpoint taken mid-epoch on Ctrl-C); the
    running sums are the current epoch's training loss, correct predictions
    and step count, so that an epoch resumed mid-way reports what an
    uninterrupted one would.
    """

    params: Any
    opt_state: Any
    update: jax.Array  # gradient steps so far (int32)
    epoch: jax.Array  # completed epochs (int32)
    batch: jax.Array  # batches done in the current epoch (int32)
    loss_sum: jax.Array  # float32
    correct_sum: jax.Array  # float32
    count: jax.Array  # float32


def make_optimizer(c: Config) -> optax.GradientTransformation:
    """Adam at ``--learning-rate``."""
    return optax.adam(c.learning_rate)


def _zeros_f32():
    return jnp.zeros((), jnp.float32)


def init(net_spec: NetworkSpec, optimizer, obs_shape, key: jax.Array) -> State:
    """Fresh params for uint8 observations of ``obs_shape`` and their optimizer state; epoch, batch and the
    running sums at 0."""
    _, params = init_actor_critic(net_spec, key, obs_shape, jnp.uint8)
    return State(params=params, opt_state=optimizer.init(params), update=jnp.zeros((), jnp.int32),
                 epoch=jnp.zeros((), jnp.int32), batch=jnp.zeros((), jnp.int32),
                 loss_sum=_zeros_f32(), correct_sum=_zeros_f32(), count=_zeros_f32())


# --- Loss and the compiled steps ---
class BCStats(NamedTuple):
    """Sums over the unmasked steps of a batch (add them up over batches)."""

    loss_sum: jax.Array
    correct: jax.Array
    count: jax.Array


def bc_loss(params, carry0, obs: jax.Array, actions: jax.Array, mask: jax.Array, *,
            apply_fn) -> tuple[jax.Array, BCStats]:
    """Cross-entropy of the expert's actions over every step of every sequence.

    With ``pi_theta(a | o_1..o_t)`` the clone's policy after seeing the
    sequence up to step ``t`` (its state zeroed before ``t = 0``)::

        L = - 1 / (T * sum_b m_b) * sum_{t, b} m_b log pi_theta(a_{t,b} | o_{1..t, b})

    (behaviour cloning, Pomerleau 1991; the sequence loss of the ncps Atari example).

    Args:
      carry0: the recurrent state for ``B`` sequences (any value: it is reset at ``t = 0``).
      obs: ``[T, B, ...]`` observations, time-major.
      actions: ``[T, B]`` int expert actions.
      mask: ``[B]`` bool, False on padding sequences.
      apply_fn: ``(params, carry, obs, first) -> (carry, logits [T, B, A], values)``.

    Returns:
      ``(loss, BCStats)``.
    """
    chex.assert_rank(actions, 2)
    chex.assert_shape(mask, actions.shape[1:])
    T, B = actions.shape
    first = jnp.zeros((T, B), bool).at[0].set(True)
    _, logits, _ = apply_fn(params, carry0, obs, first)
    chex.assert_shape(logits, (T, B, None))
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, actions)
    w = jnp.broadcast_to(mask[None].astype(jnp.float32), (T, B))
    count = w.sum()
    loss_sum = (nll * w).sum()
    correct = ((jnp.argmax(logits, -1) == actions) * w).sum()
    return loss_sum / jnp.maximum(count, 1.0), BCStats(loss_sum, correct, count)


def _time_major(x):
    return jnp.swapaxes(x, 0, 1)


def make_train_step(net: ActorCritic, net_spec: NetworkSpec, optimizer, batch_size: int):
    """A jitted ``train_step(state, obs [B, S, ...] uint8, actions [B, S]) -> state``:
    one Adam step on :func:`bc_loss`, adding the batch's sums to the epoch's;
    ``state`` is donated."""
    carry0 = initial_carry(net_spec, batch_size)
    loss_fn = functools.partial(bc_loss, apply_fn=net.apply)

    def train_step(state: State, obs, actions) -> State:
        mask = jnp.ones(actions.shape[:1], bool)
        grads, stats = jax.grad(loss_fn, has_aux=True)(state.params, carry0, _time_major(obs),
                                                       _time_major(actions), mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state, update=state.update + 1,
            batch=state.batch + 1, loss_sum=state.loss_sum + stats.loss_sum,
            correct_sum=state.correct_sum + stats.correct, count=state.count + stats.count)

    return jax.jit(train_step, donate_argnames=("state",))


def make_eval_step(net: ActorCritic, net_spec: NetworkSpec, batch_size: int):
    """A jitted ``eval_step(params, obs [B, S, ...], actions [B, S], mask [B]) -> BCStats``."""
    carry0 = initial_carry(net_spec, batch_size)

    def eval_step(params, obs, actions, mask) -> BCStats:
        _, stats = bc_loss(params, carry0, _time_major(obs), _time_major(actions), mask, apply_fn=net.apply)
        return stats

    return jax.jit(eval_step)


def validate(eval_step, params, val: data.SequenceDataset, batch_size: int, workers: int) -> tuple[float, float]:
    """``(val_loss, val_accuracy)`` over every validation step (each sequence once)."""
    total = BCStats(0.0, 0.0, 0.0)
    for b in val.batches(batch_size, shuffle=False, drop_last=False, workers=workers):
        s = eval_step(params, b.obs, b.actions, b.mask)
        total = BCStats(*(x + y for x, y in zip(total, s)))
    loss, correct, count = (float(x) for x in jax.device_get(total))
    return loss / max(count, 1.0), correct / max(count, 1.0)


# --- Train ---
METRIC_COLUMNS = ("global_step", "epoch", "update", "wall_time", "sps", "train_loss", "train_accuracy",
                  "val_loss", "val_accuracy", "eval_return", "eval_return_std")


@dataclasses.dataclass
class Result:
    state: Any
    status: str  # "done" | "interrupted"
    epoch: int
    val_accuracy: float
    best_val_accuracy: float
    eval_return: float | None
    signal: int | None = None  # the SIGINT/SIGTERM that interrupted the run


def train(config: Config) -> Result:
    """Clone the expert as configured; returns a :class:`Result`."""
    c, manifest = resolve(config)
    env_options = envs.parse_env_options(c.env_option)
    env, spec = envs.make(c.env, 1, seed=c.seed, preset=c.preset, options=env_options)
    env.close()
    if manifest is not None and manifest.get("num_actions") not in (None, spec.num_actions):
        raise data.DataError(f"The dataset in {c.data} has {manifest['num_actions']} actions but {c.env} has "
                             f"{spec.num_actions}; was it recorded with full_action_space?")
    train_ds, val_ds = data.load_splits(c.data, num_actions=spec.num_actions)
    if c.resume:  # --data may move (a copy elsewhere), not change: the epochs and batches index this dataset
        was = rundir.load_run_config(c.resume).get("dataset") or {}
        now = dict(train_sequences=len(train_ds), seq_len=train_ds.seq_len)  # what epochs and batches index
        if any(k in was and was[k] != v for k, v in now.items()):
            raise data.DataError(
                f"--data {c.data} holds {now['train_sequences']} train sequences of {now['seq_len']} steps, but the "
                f"run being resumed trained on {was.get('train_sequences')} of {was.get('seq_len')}: another "
                "dataset would change the learning problem; pass the run's own dataset (a moved copy is fine).")
    if train_ds.obs_shape != tuple(spec.obs_shape):
        raise data.DataError(f"The dataset's frames are {list(train_ds.obs_shape)} (channels first) but {c.env} "
                             f"under preset {c.preset} gives {list(spec.obs_shape)}; pass the matching --preset "
                             "or --env-option (e.g. img_height=..).")
    if len(train_ds) < c.batch_size:
        raise ConfigError(f"The train split of {c.data} has {len(train_ds)} sequences, fewer than "
                          f"--batch-size {c.batch_size}; collect more episodes or lower --batch-size.")
    net_spec = network_spec(c, spec.num_actions)
    net = ActorCritic(net_spec)
    optimizer = make_optimizer(c)
    run_dir = rundir.run_dir_for(c, ALGO)
    afresh = rundir.start_over_if_unfinished(run_dir, resume=bool(c.resume))  # a start killed before its first save
    c = dataclasses.replace(c, run_dir=str(run_dir))
    state = init(net_spec, optimizer, spec.obs_shape, jax.random.PRNGKey(c.seed))
    S = train_ds.seq_len
    steps_per_update = c.batch_size * S
    batches_per_epoch = train_ds.num_batches(c.batch_size, drop_last=True)

    def policy_fn(params, carry, obs, first):  # one object: evaluate compiles its step once
        return net.apply(params, carry, obs, first)

    with Checkpointer(run_dir, keep=c.keep) as ckpt:
        meta: dict[str, Any] = {}
        if c.resume and not afresh:
            restored = ckpt.restore_latest(runner.abstract(state))
            state, meta = restored.state, dict(restored.meta or {})
            rundir.check_unfinished(run_dir, int(state.epoch), c.epochs, unit="epoch", flag="--epochs")
            print(f"Resumed {run_dir} at epoch {int(state.epoch)} + {int(state.batch)} batches "
                  f"(update {int(state.update):,}).", flush=True)
        rundir.write_config(run_dir, dict(
            configs.config_to_json(c), algo=ALGO, env_spec=spec.to_json(), network_spec=net_spec.to_json(),
            dataset=dict(train_sequences=len(train_ds), val_sequences=len(val_ds), seq_len=S,
                         manifest=None if manifest is None else {k: v for k, v in manifest.items()
                                                                 if k not in ("episode_log", "options")}),
            versions=rundir.versions(),
        ))
        expert = "" if manifest is None else (
            f" (expert return {_fmt((manifest.get('expert_return') or {}).get('mean'))})")
        print(f"BC on {c.env} from {c.data}: {len(train_ds):,} train / {len(val_ds):,} val sequences of {S} steps"
              f"{expert} | network {net_spec.torso}{'+cfc' if net_spec.recurrent else ''} | "
              f"{batches_per_epoch} batches of {c.batch_size} per epoch | {jax.default_backend()} | "
              f"run dir {run_dir}", flush=True)

        train_step = make_train_step(net, net_spec, optimizer, c.batch_size)
        eval_step = make_eval_step(net, net_spec, c.batch_size)
        writer = runner.MetricsWriter(run_dir, METRIC_COLUMNS, tensorboard=c.tensorboard)
        if c.resume and not afresh:
            writer.truncate_after(int(state.update) * steps_per_update)
        wall0, prev_wall = time.perf_counter(), float(meta.get("wall_time", 0.0))
        best = ckpt.best_score if ckpt.best_score is not None else -math.inf
        status, val_acc, eval_ret, received = "done", math.nan, None, None

        def wall_time():
            return prev_wall + time.perf_counter() - wall0

        def save(state, *, score=None, **extra):
            step = int(state.update) * steps_per_update
            m = dict(meta, global_step=step, epoch=int(state.epoch), update=int(state.update), wall_time=wall_time(),
                     **extra)
            ckpt.save(step, state, policy=state.params, meta=m)
            if score is not None:
                ckpt.save_best(step, state, score, policy=state.params, meta=m)

        completed = False
        try:
            with runner.Signals("batch") as sig:
                for epoch in range(int(state.epoch), c.epochs):
                    t_epoch, start = time.perf_counter(), int(state.batch)
                    bar = _EpochBar(epoch + 1, c.epochs, batches_per_epoch, start)
                    try:
                        for i, batch in enumerate(train_ds.batches(
                                c.batch_size, shuffle=True, seed=c.seed, epoch=epoch, drop_last=True,
                                start=start, workers=c.num_workers), start=start):
                            state = train_step(state, batch.obs, batch.actions)
                            bar.advance(state, i + 1)
                            if sig.received is not None:
                                status, received = "interrupted", sig.received
                                break
                    except data.DataError as e:  # a bad shard mid-epoch: keep the batches trained so far
                        if int(state.batch) > start and _finite(state.params):
                            save(state)
                            raise data.DataError(
                                f"{e} Training stopped at epoch {epoch + 1} + {int(state.batch)} batches, saved in "
                                f"{run_dir / 'checkpoints'}; replace the file and resume with "
                                f"--resume {run_dir}.") from None
                        raise
                    finally:
                        bar.close()
                    if status == "interrupted" and int(state.batch) < batches_per_epoch:
                        if _finite(state.params):
                            save(state)
                        break
                    done_batches = int(state.batch) - start
                    train_loss = _train_loss(state)
                    train_acc = float(state.correct_sum / jnp.maximum(state.count, 1.0))
                    if not (math.isfinite(train_loss) and _finite(state.params)):
                        raise NonFiniteError(
                            f"Non-finite training loss or parameters in epoch {epoch + 1}; training stopped. The "
                            f"last good checkpoint in {run_dir / 'checkpoints'} is still the latest; lower "
                            "--learning-rate or check the data.")
                    sps = done_batches * steps_per_update / max(time.perf_counter() - t_epoch, 1e-9)
                    val_loss, val_acc = validate(eval_step, state.params, val_ds, c.batch_size, c.num_workers)
                    eval_ret = eval_std = None
                    if c.eval_episodes:
                        res = evaluate(policy_fn, state.params, lambda b: initial_carry(net_spec, b), env_id=c.env,
                                       preset=c.preset, options=env_options, episodes=c.eval_episodes,
                                       seed=c.seed + 100_000, mode=c.eval_mode)
                        eval_ret, eval_std = res.mean, res.std
                    state = state.replace(epoch=jnp.asarray(epoch + 1, jnp.int32), batch=jnp.zeros((), jnp.int32),
                                          loss_sum=_zeros_f32(), correct_sum=_zeros_f32(), count=_zeros_f32())
                    writer.write(dict(global_step=int(state.update) * steps_per_update, epoch=epoch + 1,
                                      update=int(state.update), wall_time=round(wall_time(), 3), sps=round(sps, 1),
                                      train_loss=train_loss, train_accuracy=train_acc, val_loss=val_loss,
                                      val_accuracy=val_acc, eval_return=eval_ret, eval_return_std=eval_std))
                    writer.flush()
                    ret = "" if eval_ret is None else (
                        f" | return {eval_ret:.2f} ± {eval_std:.2f} ({c.eval_episodes} games)")
                    print(f"epoch {epoch + 1}/{c.epochs}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | "
                          f"val loss {val_loss:.4f} acc {100 * val_acc:.2f}%{ret} | {sps:,.0f} steps/s", flush=True)
                    save(state, score=val_acc, val_accuracy=val_acc, val_loss=val_loss, eval_return=eval_ret)
                    best = max(best, val_acc)
                    if sig.received is not None:
                        status, received = "interrupted", sig.received
                        break
                ckpt.wait()  # under the handlers: a SIGTERM now cannot kill the last save
            completed = True
        finally:
            try:
                writer.close()
            finally:
                runner._wait_keeping_the_error(ckpt, replace=completed)

    if status == "interrupted":
        print(f"\nInterrupted at epoch {int(state.epoch)} + {int(state.batch)} batches. Checkpoint saved in "
              f"{run_dir / 'checkpoints'}.\nResume with:  {rundir.resume_command(ALGO, run_dir)}", flush=True)
    else:
        print(f"Best validation accuracy {100 * best:.2f}% (checkpoint in {run_dir / 'checkpoints' / 'best'}).",
              flush=True)
    return Result(state, status, int(state.epoch), val_acc, best, eval_ret, received)


def _train_loss(state: State) -> float:
    return float(state.loss_sum / jnp.maximum(state.count, 1.0))


def _finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


class _EpochBar:
    """Progress within an epoch: a rich bar with the running training loss on a
    terminal; elsewhere (a log file, a batch job) a plain line every
    ``PLAIN_EVERY_S`` seconds, so that a long first epoch is not silent."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, epoch: int, epochs: int, total: int, start: int):
        self.bar, self.label, self.total = None, f"epoch {epoch}/{epochs}", total
        self._last = self._t0 = time.perf_counter()
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("epoch", total=total, completed=start, loss="-")
            self.bar.start()

    def advance(self, state: State, done: int) -> None:
        now = time.perf_counter()
        if self.bar is None:
            if now - self._last >= self.PLAIN_EVERY_S and done < self.total:
                self._last = now
                print(f"{self.label}: {done:,}/{self.total:,} batches, train loss {_train_loss(state):.4f} "
                      f"({now - self._t0:.0f}s)", flush=True)
        elif now - self._last > 0.5 or done == self.total:  # fetching the loss waits for the step
            self._last = now
            self.bar.update(self.task, completed=done, loss=f"{_train_loss(state):.4f}")
        else:
            self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
