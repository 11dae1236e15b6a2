"""Expert datasets for behaviour cloning, in the ncps Atari-cloning layout.

A dataset is one directory of ``.npz`` shards, each holding **one** sequence of
``S`` consecutive steps of one episode, as the ncps Atari behaviour-cloning
example reads them (``ncps.datasets.torch.AtariCloningDataset``: one file per
sequence, keys ``obs`` and ``actions``, files ``train_*.npz`` / ``val_*.npz``)::

    DATA_DIR/
      train_0.npz  train_1.npz ...   obs uint8 [S, H, W, C] (84x84x4 on Atari), actions int64 [S]
      val_0.npz    val_1.npz ...
      manifest.json                  jaxatari only: game, preset, expert returns, counts, episodes

Frames are stored channels-last as in ncps (the four stacked grey frames oldest
first); :class:`SequenceDataset` hands them back channels-first ``[4, 84, 84]``
as EnvPool gives them (or channels-last on request). :func:`collect` cuts each
expert episode into consecutive windows of ``S`` steps, dropping the tail shorter
than ``S`` (the layout has no mask), and splits episodes, not sequences, into
train and validation. Reading never unpickles; a malformed shard raises
:class:`DataError` naming the file and what was expected.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from jaxatari import envs, rundir
from jaxatari.errors import ConfigError, DataError
from jaxatari.evaluate import FullGames, episode_quotas
from jaxatari.policy import load_policy

__all__ = [
    "Batch", "CollectConfig", "CollectResult", "DataError", "SequenceDataset", "collect", "list_shards",
    "load_splits", "read_manifest", "read_sequence", "sequence_windows", "shard_path", "write_sequence",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
FORMAT = "ncps-atari-cloning"
FORMAT_VERSION = 1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not accepted; use train or val.")


def shard_path(directory: str | os.PathLike, split: str, index: int) -> Path:
    """``directory/<split>_<index>.npz`` (the ncps name)."""
    _check_split(split)
    return Path(directory) / f"{split}_{index}.npz"


def _shard_key(path: Path):
    m = re.fullmatch(r"[a-z]+_(\d+)\.npz", path.name)
    return (0, int(m.group(1)), "") if m else (1, 0, path.name)


def list_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """The shards of ``split`` in ``directory`` (``<split>_*.npz``, as ncps globs them),
    in index order."""
    _check_split(split)
    return sorted(Path(directory).glob(f"{split}_*.npz"), key=_shard_key)


def write_sequence(path: str | os.PathLike, obs: np.ndarray, actions: np.ndarray) -> None:
    """Write one sequence shard atomically (a temporary file renamed into place).

    Args:
      obs: ``[S, H, W, C]`` uint8, channels last (the ncps layout).
      actions: ``[S]`` integer actions, stored as int64.
    """
    obs, actions = np.asarray(obs), np.asarray(actions)
    if obs.dtype != np.uint8 or obs.ndim != 4:
        raise DataError(f"obs has dtype {obs.dtype} and shape {obs.shape}; a shard takes uint8 [S, H, W, C].")
    if actions.shape != obs.shape[:1] or not np.issubdtype(actions.dtype, np.integer):
        raise DataError(f"actions have dtype {actions.dtype} and shape {actions.shape}; a shard with "
                        f"{obs.shape[0]} frames takes integer actions [{obs.shape[0]}].")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, obs=obs, actions=actions.astype(np.int64))
    os.replace(tmp, path)


#: Serialises .npy header parsing (``ast.literal_eval``), which is not thread-safe
#: on CPython < 3.11.8 and 3.12.0 (gh-106905); decompression runs outside it.
_NPY_PARSE_LOCK = (threading.Lock() if sys.version_info < (3, 11, 8) or (3, 12, 0) <= sys.version_info < (3, 12, 1)
                   else contextlib.nullcontext())


def read_sequence(path: str | os.PathLike, *, num_actions: int | None = None,
                  channels_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one shard: ``(obs, actions)``.

    Returns ``obs`` uint8 ``[S, C, H, W]`` (``channels_first``) or ``[S, H, W, C]``
    and ``actions`` int32 ``[S]``. Raises :class:`DataError` naming the file if it
    is not an ``.npz`` archive (or needs unpickling), lacks ``obs``/``actions``, has
    the wrong dtypes or ranks, disagreeing lengths, or actions outside
    ``[0, num_actions)``.
    """
    path = Path(path)
    expected = "an .npz archive with obs uint8 [S, 84, 84, 4] and actions int64 [S] (the ncps layout)"
    try:
        with _NPY_PARSE_LOCK:  # a lone .npy file would be parsed (and loaded) here
            f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, not {expected}.")
        with f:
            missing = [k for k in ("obs", "actions") if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks {' and '.join(missing)} (it has "
                                f"{', '.join(f.files) or 'nothing'}); expected {expected}.")
            names = set(f.zip.namelist())
            raw = {k: f.zip.read(k + ".npy" if k + ".npy" in names else k) for k in ("obs", "actions")}  # inflate
        with _NPY_PARSE_LOCK:
            obs, actions = (np.lib.format.read_array(io.BytesIO(raw[k]), allow_pickle=False) for k in ("obs", "actions"))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse means a malformed shard
        raise DataError(f"{path} is not a readable shard ({type(e).__name__}: {e}); expected {expected}.") from None
    if obs.dtype != np.uint8 or obs.ndim != 4:
        raise DataError(f"{path}: obs has dtype {obs.dtype} and shape {list(obs.shape)}; expected uint8 "
                        "[S, H, W, C], e.g. [32, 84, 84, 4].")
    if obs.shape[1] in (1, 3, 4) and obs.shape[3] not in (1, 3, 4):
        raise DataError(f"{path}: obs of shape {list(obs.shape)} look channels-first [S, C, H, W]; the ncps "
                        "layout stores frames channels-last, [S, H, W, C] (e.g. [32, 84, 84, 4]): "
                        "transpose them with obs.transpose(0, 2, 3, 1).")
    S = obs.shape[0]
    if S < 1 or actions.shape != (S,) or not np.issubdtype(actions.dtype, np.integer):
        raise DataError(f"{path}: actions have dtype {actions.dtype} and shape {list(actions.shape)}; expected "
                        f"integer actions [{S}], one per frame of obs {list(obs.shape)}.")
    hi = num_actions if num_actions is not None else np.iinfo(np.int32).max
    if actions.min() < 0 or actions.max() >= hi:
        bad = int(actions[(actions < 0) | (actions >= hi)][0])
        accepted = f"0 .. {num_actions - 1}" if num_actions is not None else "non-negative ints"
        raise DataError(f"{path}: action {bad} is out of range; this game's actions are {accepted}.")
    if channels_first:
        obs = obs.transpose(0, 3, 1, 2)
    return obs, actions.astype(np.int32)


def sequence_windows(length: int, seq_len: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the consecutive windows of ``seq_len`` steps cut from an
    episode of ``length`` steps; the tail shorter than ``seq_len`` is dropped."""
    return [(i * seq_len, (i + 1) * seq_len) for i in range(length // seq_len)]


class Batch(NamedTuple):
    """A batch of sequences, batch-major as stored.

    ``obs`` uint8 ``[B, S, *obs_shape]``; ``actions`` int32 ``[B, S]``; ``mask``
    bool ``[B]``: False on padding rows (only in a final partial batch read with
    ``drop_last=False``; padding rows are zeros).
    """

    obs: np.ndarray
    actions: np.ndarray
    mask: np.ndarray


class SequenceDataset:
    """The shards of one split of a dataset directory, read lazily in batches
    (:meth:`batches` reads them in a thread pool, a few batches ahead). The first
    shard sets ``seq_len`` and the per-step ``obs_shape``; a later shard that
    disagrees raises :class:`DataError` when read.

    Args:
      directory: the dataset directory.
      split: ``train`` or ``val``.
      num_actions: if given, actions must lie in ``[0, num_actions)``.
      channels_first: ``obs`` as ``[C, H, W]`` (EnvPool, the torsos' input) or
        ``[H, W, C]`` (as stored).
    """

    def __init__(self, directory: str | os.PathLike, split: str, *, num_actions: int | None = None,
                 channels_first: bool = True):
        self.directory = Path(directory)
        self.split = split
        self.num_actions = num_actions
        self.channels_first = channels_first
        if not self.directory.is_dir():
            raise DataError(f"Dataset directory {self.directory} does not exist.")
        self.files = list_shards(self.directory, split)
        if not self.files:
            others = sorted(p.name for p in self.directory.glob("*.npz"))[:3]
            found = f" (it has {', '.join(others)} ...)" if others else ""
            inner = sorted(str(p.parent) for p in self.directory.glob(f"*/{split}_*.npz"))[:1]
            if inner:  # e.g. ncps' data_atari_seq/ instead of data_atari_seq/breakout/
                found += f"; did you mean {inner[0]}?"
            raise DataError(f"{self.directory} has no {split}_<i>.npz shards{found}; expected the ncps layout "
                            "train_<i>.npz and val_<i>.npz side by side, as scripts/collect.py writes.")
        obs, _ = read_sequence(self.files[0], num_actions=num_actions, channels_first=channels_first)
        self.seq_len = int(obs.shape[0])
        self.obs_shape = tuple(int(n) for n in obs.shape[1:])

    def __len__(self) -> int:
        return len(self.files)

    def num_batches(self, batch_size: int, *, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def order(self, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """File order for one epoch: a permutation drawn from ``(seed, epoch)`` (so an
        epoch's order is reproducible, e.g. on resume) or the index order."""
        return np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else np.arange(len(self))

    def read(self, paths: list[Path], batch_size: int | None = None) -> Batch:
        """Read ``paths`` into one :class:`Batch`, padded to ``batch_size`` rows."""
        B = batch_size or len(paths)
        obs = np.zeros((B, self.seq_len, *self.obs_shape), np.uint8)
        actions = np.zeros((B, self.seq_len), np.int32)
        mask = np.zeros((B,), bool)
        for i, p in enumerate(paths):
            o, a = read_sequence(p, num_actions=self.num_actions, channels_first=self.channels_first)
            if o.shape != obs.shape[1:]:
                raise DataError(f"{p}: obs has shape {self._stored(o.shape)} but {self.files[0].name} has "
                                f"{self._stored(obs.shape[1:])}; every shard of a dataset holds sequences of "
                                "one length and frame shape.")
            obs[i], actions[i], mask[i] = o, a, True
        return Batch(obs, actions, mask)

    def _stored(self, shape) -> list[int]:
        """A sequence's shape as the file stores it, ``[S, H, W, C]``."""
        shape = list(shape)
        return shape[:1] + shape[2:] + shape[1:2] if self.channels_first else shape

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, drop_last: bool = True,
                start: int = 0, prefetch: int | None = None, workers: int = 2) -> Iterator[Batch]:
        """Yield the batches of one epoch: ``[B, S, *obs_shape]`` observations and labels.

        Args:
          batch_size: sequences per batch ``B``.
          shuffle, seed, epoch: see :meth:`order`.
          drop_last: drop a final partial batch (training: fixed shapes, and a
            shuffled order covers every sequence over the epochs), or pad it with
            masked zero rows (validation: every sequence counts once).
          start: skip the first ``start`` batches (resuming mid-epoch).
          workers: reading threads, each reading a whole batch (``0``: read in the
            caller's thread).
          prefetch: batches read ahead (default ``2 * workers``).
        """
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} is not accepted: it must be >= 1.")
        order = self.order(shuffle=shuffle, seed=seed, epoch=epoch)
        groups = [[self.files[j] for j in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
        if drop_last and groups and len(groups[-1]) < batch_size:
            groups.pop()
        groups = groups[start:]
        if workers < 1:
            for g in groups:
                yield self.read(g, batch_size)
            return
        ahead = 2 * workers if prefetch is None else max(prefetch, 1)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxatari-data")
        it, pending = iter(groups), collections.deque()
        try:
            pending.extend(pool.submit(self.read, g, batch_size) for g in itertools.islice(it, ahead))
            while pending:
                batch = pending.popleft().result()
                pending.extend(pool.submit(self.read, g, batch_size) for g in itertools.islice(it, 1))
                yield batch
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The dataset's ``manifest.json``, or None (the ncps layout has none)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}).") from None


def load_splits(directory: str | os.PathLike, *, num_actions: int | None = None,
                channels_first: bool = True) -> tuple[SequenceDataset, SequenceDataset]:
    """``(train, val)`` of a dataset directory; both splits must exist and hold
    frames of one shape. A manifest whose counts disagree with the files on
    disk is reported with a warning (an incomplete copy?)."""
    train = SequenceDataset(directory, "train", num_actions=num_actions, channels_first=channels_first)
    val = SequenceDataset(directory, "val", num_actions=num_actions, channels_first=channels_first)
    if train.obs_shape != val.obs_shape:
        raise DataError(f"{directory}: train frames are {list(train.obs_shape)} but val frames are "
                        f"{list(val.obs_shape)}; both splits must come from one game and preset.")
    manifest = read_manifest(directory)
    if manifest:
        for ds in (train, val):
            want = manifest.get(f"{ds.split}_sequences")
            if want is not None and want != len(ds):
                log.warning("%s lists %d %s sequences but %d %s_<i>.npz files are there.",
                            Path(directory) / MANIFEST, want, ds.split, len(ds), ds.split)
    return train, val


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """Play a trained jaxatari policy and record its games as a behaviour-cloning dataset."""

    run_dir: str
    """The expert: a jaxatari run directory (PPO, A2C, DQN, BC ...) or a checkpoint directory in one."""
    out: str
    """Dataset directory to write (train_<i>.npz, val_<i>.npz, manifest.json); must not hold a dataset yet."""
    episodes: int = 100
    """Full games to record."""
    seq_len: int = 32
    """Steps per sequence (S); each episode is cut into consecutive windows, its tail shorter than S dropped."""
    val_fraction: float = 0.1
    """Fraction of the episodes held out for validation (at least one when --episodes >= 2)."""
    mode: str | None = None
    """Expert actions: sample (the policy's own distribution) or greedy (argmax). Default: sample, greedy for DQN."""
    checkpoint: str = "best"
    """best (highest score, else latest) or latest."""
    num_envs: int | None = None
    """Parallel games (default: min(episodes, 8))."""
    seed: int = 20_000
    """Seed of the games, the sampled actions and the split (differs from training and evaluation seeds)."""
    preset: str | None = None
    """Override the expert run's env preset."""
    max_episode_steps: int | None = None
    """Cap each game at this many agent steps (EnvPool's max_episode_steps; default: the preset's 27,000)."""


@dataclasses.dataclass
class CollectResult:
    status: str
    """done | interrupted"""
    manifest: dict[str, Any]


def _check_collect(cfg: CollectConfig) -> None:
    out = Path(cfg.out)
    for ok, flag, value, what in [
        (cfg.episodes >= 1, "episodes", cfg.episodes, "it must be >= 1"),
        (cfg.seq_len >= 1, "seq-len", cfg.seq_len, "it must be >= 1"),
        (0.0 <= cfg.val_fraction < 1.0, "val-fraction", cfg.val_fraction, "it must be in [0, 1)"),
        (cfg.mode in (None, "greedy", "sample"), "mode", cfg.mode, "use greedy or sample"),
        (cfg.checkpoint in ("best", "latest"), "checkpoint", cfg.checkpoint, "use best or latest"),
        (cfg.num_envs is None or cfg.num_envs >= 1, "num-envs", cfg.num_envs, "it must be >= 1"),
        (cfg.max_episode_steps is None or cfg.max_episode_steps >= 1, "max-episode-steps", cfg.max_episode_steps,
         "it must be >= 1"),
        (cfg.seed >= 0, "seed", cfg.seed, "it must be an integer >= 0"),
        (out.is_dir() or not out.exists(), "out", cfg.out, "it is a file; pass a directory"),
    ]:
        if not ok:
            raise ConfigError(f"--{flag} {value!r} is not accepted: {what}.")
    if out.is_dir() and ((out / MANIFEST).exists() or any(out.glob("train_*.npz")) or any(out.glob("val_*.npz"))):
        raise DataError(f"{out} already holds a dataset; pass a new --out directory (nothing was overwritten).")


def val_episodes(episodes: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``episodes`` episodes are validation episodes: ``round(fraction * N)``,
    at least 1 when ``N >= 2`` and ``fraction > 0``, at most ``N - 1``; drawn with ``seed``."""
    n_val = min(max(round(val_fraction * episodes), 1), episodes - 1) if episodes >= 2 and val_fraction > 0 else 0
    is_val = np.zeros(episodes, bool)
    is_val[np.random.default_rng(seed).choice(episodes, n_val, replace=False)] = True
    return is_val


def collect(cfg: CollectConfig) -> CollectResult:
    """Record ``cfg.episodes`` games of the expert in ``cfg.run_dir`` as a dataset in ``cfg.out``.

    The expert plays full games under the run's preset and env options
    (``--preset`` overrides the preset), acting by ``--mode``; a recurrent
    expert's state restarts where training restarted it (each game, and each life
    under ``episodic_life``: the episode log's ``life_starts``). Each env records a
    fixed quota of episodes (as :func:`jaxatari.evaluate.evaluate`); EnvPool's
    reset steps are not recorded. Validation sequences that repeat a training
    sequence frame for frame are dropped, with a warning. ``manifest.json`` is
    written last; a Ctrl-C writes it for the shards on disk (``"interrupted"``).
    """
    _check_collect(cfg)
    path = Path(cfg.run_dir)
    if cfg.checkpoint == "latest" and (path / "checkpoints" / "latest").is_dir():
        path = path / "checkpoints" / "latest"
    pol = load_policy(path)
    if pol.is_q and cfg.mode == "sample":
        raise ConfigError("--mode sample is not accepted for a DQN run: its network outputs Q-values, not a "
                          "distribution; use greedy.")
    cfg = dataclasses.replace(cfg, mode=cfg.mode or ("greedy" if pol.is_q else "sample"))
    c = pol.config
    env_id = c["env"]
    options = envs.parse_env_options(c.get("env_option", []))
    if cfg.max_episode_steps is not None:
        options["max_episode_steps"] = cfg.max_episode_steps
    B = cfg.num_envs or min(cfg.episodes, 8)
    env, spec = envs.make(env_id, B, seed=cfg.seed, preset=cfg.preset or c.get("preset"), options=options)
    if len(spec.obs_shape) != 3 or np.dtype(spec.obs_dtype) != np.uint8:
        env.close()
        raise ConfigError(f"{env_id} gives {np.dtype(spec.obs_dtype)} observations of shape {list(spec.obs_shape)}; "
                          "the ncps cloning layout records pixel frames, uint8 [C, H, W] (Atari *-v5 games).")

    quotas = episode_quotas(cfg.episodes, B)
    # Episode id = (env b, its k-th recorded episode), numbered env-major.
    offsets = np.concatenate([[0], np.cumsum(quotas)[:-1]])
    is_val = val_episodes(cfg.episodes, cfg.val_fraction, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    S = cfg.seq_len
    counters = {"train": 0, "val": 0}
    digests: dict[str, dict[int, str]] = {"train": {}, "val": {}}  # shard index -> content digest
    episodes: list[dict[str, Any]] = []

    k = np.zeros(B, np.int64)  # per env: frames and actions of the open sequence, shards written, life_starts
    buf_obs, buf_act, shards, life_starts = ([[] for _ in range(B)] for _ in range(4))

    def split_of(b: int) -> str:
        return "val" if is_val[offsets[b] + k[b]] else "train"

    def record(b: int, ret: float | None, length: int, truncated: bool, finished: bool) -> None:
        n = len(shards[b])
        episodes.append(dict(split=split_of(b), env=int(b), **{"return": ret}, length=length, truncated=truncated,
                             sequences=n, shards=list(shards[b]), life_starts=[t for t in life_starts[b] if t < n * S],
                             finished=finished))

    n_val = int(is_val.sum())
    print(f"Collecting {cfg.episodes} games of {env_id} (preset {spec.preset}) from {pol.config.get('algo')} expert "
          f"{cfg.run_dir} ({cfg.mode}) into {out}: sequences of {S} steps, {n_val} validation "
          f"game{'' if n_val == 1 else 's'}.", flush=True)
    progress = _EpisodeProgress(cfg.episodes)
    status = "done"
    key = jax.random.PRNGKey(cfg.seed)
    t0 = time.perf_counter()
    try:
        obs, info = env.reset()
        games = FullGames(info, B, reset_on_life_loss=pol.reset_on_life_loss)  # a no-op under the training dynamics
        carry = pol.initial_carry(B)
        first = np.ones(B, bool)
        while (k < quotas).any():
            key, k_act = jax.random.split(key)
            actions, carry = pol.act(obs, carry, first, mode=cfg.mode, key=k_act)
            actions = np.asarray(actions)
            for b in np.flatnonzero(~games.reset_step & (k < quotas)):  # a decision the expert took
                buf_obs[b].append(np.ascontiguousarray(np.asarray(obs[b]).transpose(1, 2, 0)))
                buf_act[b].append(int(actions[b]))
                if len(buf_act[b]) == S:
                    split = split_of(b)
                    seq_obs, seq_act = np.stack(buf_obs[b]), np.asarray(buf_act[b], np.int64)
                    write_sequence(shard_path(out, split, counters[split]), seq_obs, seq_act)
                    digests[split][counters[split]] = _sequence_digest(seq_obs, seq_act)
                    shards[b].append(counters[split])
                    counters[split] += 1
                    buf_obs[b], buf_act[b] = [], []
            obs, reward, term, trunc, info = env.step(actions.astype(np.int32))
            g = games.step(reward, term, trunc, info)
            for b in np.flatnonzero(g.ended):
                if k[b] < quotas[b]:
                    record(b, float(g.returns[b]), int(g.lengths[b]), bool(g.capped[b]), True)
                    progress.episode(episodes[-1])
                    k[b] += 1
                buf_obs[b], buf_act[b], shards[b] = [], [], []  # the tail shorter than S is dropped
                life_starts[b] = []
            for b in np.flatnonzero(g.life_start):  # the expert's state restarted mid-game, as in training
                life_starts[b].append(int(g.lengths[b]))  # the index of the frame just returned
            first = g.first
    except KeyboardInterrupt:
        status = "interrupted"
        for b in range(B):  # games cut short whose sequences are already on disk
            if k[b] < quotas[b] and shards[b]:
                record(b, None, int(games.len[b]), False, False)
    finally:
        progress.close()
        env.close()

    dropped = _drop_val_repeats(out, digests, episodes)
    counters["val"] -= dropped
    manifest = _manifest(cfg, pol, spec, S, episodes, counters, status, time.perf_counter() - t0, rundir.versions())
    manifest.update(val_repeats_dropped=dropped, distinct_train_sequences=len(set(digests["train"].values())))
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    er = manifest["expert_return"]
    mean = "-" if er["mean"] is None else f"{er['mean']:.2f} ± {er['std']:.2f}"
    print(f"Expert return {mean} over {er['episodes']} games. Wrote {counters['train']} train and "
          f"{counters['val']} val sequences of {S} steps to {out}.", flush=True)
    if status == "interrupted":
        print("Interrupted: the manifest lists the sequences written so far.", file=sys.stderr, flush=True)
    repeats = counters["train"] - manifest["distinct_train_sequences"]
    if dropped or repeats > 0.1 * counters["train"]:
        sticky = manifest["options"].get("repeat_action_probability", 0.0)
        log.warning("%d validation sequence(s) repeated a training sequence frame for frame and were dropped, and "
                    "%d of %d training sequences repeat another: the games %s. For varied games collect with "
                    "--preset machado (sticky actions) or --mode sample.", dropped, repeats, counters["train"],
                    f"barely differ (sticky actions {sticky:g}, {cfg.mode} expert)" if sticky or cfg.mode != "greedy"
                    else f"are deterministic (preset {spec.preset}: no sticky actions) and the expert greedy")
    if counters["train"] == 0 or counters["val"] == 0:
        log.warning("The dataset in %s has %d train and %d val sequences; behaviour cloning needs both "
                    "(more --episodes, a smaller --seq-len or a larger --val-fraction).",
                    out, counters["train"], counters["val"])
    return CollectResult(status, manifest)


def _sequence_digest(obs: np.ndarray, actions: np.ndarray) -> str:
    """A digest of one sequence's frames and actions: equal digests, equal sequences."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(obs).tobytes())
    h.update(np.ascontiguousarray(actions, np.int64).tobytes())
    return h.hexdigest()


def _drop_val_repeats(out: Path, digests: dict[str, dict[int, str]], episodes: list[dict[str, Any]]) -> int:
    """Delete the validation shards that repeat a training shard frame for frame (a
    greedy expert on a deterministic game repeats whole games) and take them out of
    ``episodes``' shard lists. Returns how many were dropped; the others keep their indices."""
    train = set(digests["train"].values())
    drop = {i for i, d in digests["val"].items() if d in train}
    for i in sorted(drop):
        shard_path(out, "val", i).unlink(missing_ok=True)
    for e in episodes:
        if e["split"] == "val":
            kept = [i for i in e["shards"] if i not in drop]
            e["repeats_dropped"] = len(e["shards"]) - len(kept)
            e["shards"], e["sequences"] = kept, len(kept)
    return len(drop)


def _manifest(cfg, pol, spec, S, episodes, counters, status, seconds, versions) -> dict[str, Any]:
    finished = [e for e in episodes if e["finished"]]
    returns = np.array([e["return"] for e in finished], np.float64)

    def stat(f):
        return float(f(returns)) if len(returns) else None

    C, H, W = spec.obs_shape
    per = {s: [e for e in episodes if e["split"] == s] for s in SPLITS}
    return dict(
        format=FORMAT, version=FORMAT_VERSION, env=spec.env_id, preset=spec.preset, options=spec.options,
        num_actions=spec.num_actions, obs_shape=[H, W, C], seq_len=S,
        expert=dict(run_dir=str(cfg.run_dir), algo=pol.config.get("algo"), checkpoint=cfg.checkpoint,
                    checkpoint_step=pol.meta.get("step"), mode=cfg.mode, reset_on_life_loss=pol.reset_on_life_loss),
        seed=cfg.seed, val_fraction=cfg.val_fraction, requested_episodes=cfg.episodes, episodes=len(finished),
        train_episodes=sum(e["finished"] for e in per["train"]), val_episodes=sum(e["finished"] for e in per["val"]),
        train_sequences=counters["train"], val_sequences=counters["val"],
        expert_return=dict(mean=stat(np.mean), std=stat(np.std), min=stat(np.min), max=stat(np.max),
                           episodes=len(finished)),
        interrupted=status == "interrupted", seconds=round(seconds, 1), episode_log=episodes, versions=versions)


class _EpisodeProgress:
    """A rich progress bar over episodes on a terminal; one line per episode otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("games"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("last return {task.fields[ret]}"), TimeElapsedColumn())
            self.task = self.bar.add_task("collect", total=total, ret="-")
            self.bar.start()

    def episode(self, e: dict[str, Any]) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, ret=f"{e['return']:.1f}")
        else:
            print(f"game {self.done}/{self.total} ({e['split']}): return {e['return']:.1f}, {e['length']} steps, "
                  f"{e['sequences']} sequences", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
