"""Checkpoints of a training run, on orbax-checkpoint: :class:`Checkpointer` keeps
the newest ``keep`` in ``RUN_DIR/checkpoints/latest/<step>/`` and the best-scoring
one in ``best/<step>/``; :func:`restore_policy` loads a policy read-only. A step
holds the orbax items ``state``, optional ``policy`` (pytrees of arrays), ``meta``
and ``format`` (JSON), written with standard handlers (nothing is pickled).

``format`` also holds a digest of every array saved (CRC-32 of its bytes,
computed on the host arrays before the write); a restore recomputes it, so a
checkpoint damaged on disk (its sizes unchanged) is caught and skipped like an
unreadable one. Checkpoints written before digests restore unverified.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath  # orbax's path type (a dependency of orbax)

from jaxatari.errors import CheckpointError, CheckpointSaveError

__all__ = ["Checkpointer", "CheckpointError", "Restored", "restore_policy"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST, BEST = "latest", "best"
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # '.orbax-checkpoint-tmp'
_MAX_LISTED = 5  # differences named in a mismatch message
DIGEST = "crc32"  # of each array's bytes, in the format item


_writing = 0  # saves and waits in progress in this process


def writing() -> bool:
    """True while this process is handing a checkpoint to orbax or waiting for one
    to be written: interrupting it there (a second Ctrl-C) would leave orbax's
    writer threads waiting for ever (:class:`jaxatari.runner.Signals` defers it)."""
    return _writing > 0


class _Writing:
    def __enter__(self):
        global _writing
        _writing += 1

    def __exit__(self, *exc):
        global _writing
        _writing -= 1


class _NoneReadable(CheckpointError):
    """Every checkpoint in a directory is unreadable (or there is none)."""


class _Damaged(Exception):
    """A checkpoint's arrays differ from the digest saved with them (its message says which)."""


class Restored(NamedTuple):
    """What a restore returns: the ``step`` saved; the ``state``, structured like the
    abstract target (None if not asked for); the ``policy`` (None unless an abstract
    policy was given); ``meta``: the caller's JSON plus ``step``, ``time`` (unix
    seconds) and ``score`` (best only), which win over the caller's keys."""

    step: int
    state: Any
    policy: Any
    meta: dict


class Checkpointer:
    """Latest-N and best checkpoints of one run, in ``run_dir/checkpoints``; the one
    writer of that directory. ``keep``: how many newest checkpoints ``latest/``
    keeps (>= 1). ``async_save``: ``save`` returns once the arrays are copied off
    the device; the write goes on in a background thread.

    Use as ``with Checkpointer(run_dir) as ckpt:``: closing waits for async saves
    and stops orbax's threads. A failed background save is raised as
    :class:`CheckpointError` by the next ``save``, ``wait`` or ``close``. Saves
    are atomic: unfinished ones left by a killed process are removed on start.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (checkpoints to keep), got {keep!r}.")
        self.directory = Path(run_dir).absolute() / "checkpoints"  # orbax refuses relative paths
        for kind in (LATEST, BEST):
            (self.directory / kind).mkdir(parents=True, exist_ok=True)
            for p in sorted((self.directory / kind).iterdir()):
                if _TMP_SUFFIX in p.name:
                    log.warning("Removing unfinished checkpoint %s (a save was interrupted; earlier ones are intact).",
                                p)
                    shutil.rmtree(p, ignore_errors=True)
        self._latest = _manager(self.directory / LATEST, keep=keep, async_save=async_save)
        try:
            # "best" is separate from "latest N": its own manager keeps 1 and is saved
            # only on a higher score, so its newest step is the best.
            self._best = _manager(self.directory / BEST, keep=1, async_save=async_save)
        except BaseException:
            self._latest.close()
            raise
        self._closed = False
        # An unreadable best must not block every later best (the next best save rotates it away).
        scores = (_score(self.directory / BEST / str(s), verify=True) for s in _list_steps(self.directory / BEST))
        self._best_score = max((s for s in scores if s is not None), default=None)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except CheckpointError as e:
            if exc_type is None:
                raise
            log.error("%s", e)  # do not mask the exception already propagating

    def latest_step(self) -> int | None:
        """Newest step in ``latest/`` (saved or being saved), or None. Not validated:
        :meth:`restore_latest` may fall back to an older step."""
        return self._latest.latest_step()

    @property
    def best_score(self) -> float | None:
        """Score of the best checkpoint (persisted in its meta), or None."""
        return self._best_score

    def save(self, step: int, state, *, policy=None, meta: dict | None = None) -> Path:
        """Save a checkpoint in ``latest/``, keeping the newest ``keep``; returns its
        step directory (it appears once an async save completes).

        ``state``/``policy``: pytrees of arrays and numbers, each leaf at its own dtype
        (Python/NumPy values at the dtype JAX gives them), restored as ``jax.Array``.
        ``meta``: plain JSON (NumPy/JAX scalars converted). Saving the newest step
        again is a no-op; an older step raises :class:`CheckpointError`.
        """
        self._check_open()
        step = _as_step(step)
        path = self.directory / LATEST / str(step)
        newest = self._latest.latest_step()
        if newest is not None and step <= newest:
            if step == newest:
                log.info("Checkpoint step %d already exists in %s; kept.", step, path.parent)
                return path
            raise CheckpointError(
                f"Cannot save step {step} in {path.parent}: it already holds the newer step {newest}; continue that "
                "run (--resume, or restore_latest() from Python) or use a new run directory.")
        self._write(self._latest, step, state, policy, _meta(step, meta))
        return path

    def save_best(self, step: int, state, score: float, *, policy=None, meta: dict | None = None) -> bool:
        """Save to ``best/`` if ``score`` beats the best so far (persisted in its meta;
        NaN never counts); True if saved. The step may be lower than the best's; a
        higher score at the same step replaces it (deleted first, so not atomic).
        """
        self._check_open()
        score = float(score)
        if math.isnan(score) or (self._best_score is not None and not score > self._best_score):
            return False
        step = _as_step(step)
        if step in self._best.all_steps():  # orbax cannot overwrite a step
            self._wait(self._best)
            self._best.delete(step)
        self._write(self._best, step, state, policy, _meta(step, meta, score=score))
        self._best_score = score
        return True

    def _write(self, manager, step: int, state, policy, meta: dict) -> None:
        if jax.process_count() > 1:
            # orbax names its cross-process barriers by step: a "latest" and a "best"
            # save of the same step in flight together would share (and break) them.
            self.wait()
        split = {"state": _split_keys(state, "state")}
        if policy is not None:
            split["policy"] = _split_keys(policy, "policy")
        fmt = {"version": FORMAT_VERSION, "items": ["state", "meta", "format", *list(split)[1:]],
               "typed_keys": {item: keys for item, (_, keys) in split.items()},
               "digest": {"hash": DIGEST, **{item: _digests(data) for item, (data, _) in split.items()}}}
        items = {item: ocp.args.StandardSave(data) for item, (data, _) in split.items()}
        args = ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta), format=ocp.args.JsonSave(fmt))
        self._wait(manager)  # a failed previous save is reported as such
        try:
            with _Writing():
                manager.save(step, args=args, force=True)  # force: we decide which steps to save
        except Exception as e:
            raise CheckpointSaveError(
                f"Saving checkpoint step {step} in {manager.directory} failed: {_reason(e)}.") from e

    def restore_latest(self, abstract_state, *, abstract_policy=None) -> Restored:
        """Restore the newest readable checkpoint of ``latest/``.

        ``abstract_state`` (and ``abstract_policy``, to also get the policy): the
        structure, shapes and dtypes, as ``jax.ShapeDtypeStruct`` (``jax.eval_shape``)
        or concrete leaves; arrays land on the default device. Unreadable newer
        steps are skipped with a warning and moved aside to ``<step>.corrupt``. A
        mismatch (tree, shape, dtype, PRNG-key type) raises :class:`CheckpointError`.
        """
        return self._restore(self._latest, LATEST, abstract_state, abstract_policy)

    def restore_best(self, abstract_state, *, abstract_policy=None) -> Restored:
        """Restore the best checkpoint (as :meth:`restore_latest`, from ``best/``)."""
        restored = self._restore(self._best, BEST, abstract_state, abstract_policy)
        self._best_score = float(restored.meta["score"])
        return restored

    def _restore(self, manager, kind: str, abstract_state, abstract_policy) -> Restored:
        self._check_open()
        self._wait(manager)
        restored, unreadable = _restore_newest(self.directory / kind, state_target=abstract_state,
                                               policy_target=abstract_policy, want_state=True)
        for step_dir in unreadable:  # moved aside so that saving continues from the restored step
            target, i = step_dir.with_name(f"{step_dir.name}.corrupt"), 0
            while target.exists():
                i += 1
                target = step_dir.with_name(f"{step_dir.name}.corrupt-{i}")
            step_dir.rename(target)
            log.warning("Moved unreadable checkpoint %s aside to %s.", step_dir, target.name)
        if unreadable:
            manager.reload()
        return restored

    def wait(self) -> None:
        """Block until background saves are complete; raise if one failed."""
        self._check_open()
        self._wait(self._latest)
        self._wait(self._best)

    def _wait(self, manager) -> None:
        try:
            with _Writing():
                manager.wait_until_finished()
        except Exception as e:
            manager.reload()  # orbax already dropped the steps it meant to rotate away; they are still there
            raise CheckpointSaveError(f"A background save in {manager.directory} failed: {_reason(e)}.") from e

    def close(self) -> None:
        """Wait for background saves and release orbax's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for manager in (self._latest, self._best):
            try:
                manager.close()
            except Exception as e:
                errors.append(f"{manager.directory}: {_reason(e)}")
                try:  # orbax raises a save error once; closing again releases the rest
                    manager.close()
                except Exception:
                    log.debug("Second close of %s failed.", manager.directory, exc_info=True)
        if errors:
            raise CheckpointSaveError(f"A background save failed ({'; '.join(errors)}).")

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"The Checkpointer for {self.directory} is closed.")


def restore_policy(path: str | os.PathLike, abstract_policy) -> tuple[Any, dict]:
    """Load the ``policy`` item of a checkpoint, read-only: ``(policy, meta)``.

    ``path``: a run directory or its ``checkpoints/`` (the best checkpoint if one is
    readable, else the newest readable one of ``latest/``); a ``latest/`` or
    ``best/`` directory (its newest readable, for best highest-scoring, checkpoint);
    or one step directory. Unreadable checkpoints are skipped with a warning
    (nothing is moved). Raises :class:`CheckpointError` if nothing is readable, the
    checkpoint was saved without ``policy=``, or ``abstract_policy`` does not match.
    """
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a run directory or a checkpoint directory.")
    path = Path(path).absolute()  # orbax refuses relative paths
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if any((path / name).exists() for name in ("state", "meta", "format", "_CHECKPOINT_METADATA")):  # one step
        with _StepReader() as reader:
            try:
                r = _read_step(reader, path, state_target=None, policy_target=abstract_policy, want_state=False)
            except CheckpointError:
                raise
            except _Damaged as e:
                raise CheckpointError(f"Checkpoint {path} is damaged ({e}) and is not loaded; load another "
                                      "checkpoint, or its run directory for the newest good one.") from None
            except Exception as e:
                raise CheckpointError(f"Checkpoint {path} is unreadable ({_reason(e, path)}).") from None
        return r.policy, r.meta
    problems = []
    for directory in [path / BEST, path / LATEST] if (path / BEST).is_dir() or (path / LATEST).is_dir() else [path]:
        try:
            r, _ = _restore_newest(directory, state_target=None, policy_target=abstract_policy, want_state=False)
            return r.policy, r.meta
        except _NoneReadable as e:
            problems.append(str(e).rstrip("."))
    problems = "; ".join(p[0].lower() + p[1:] for p in problems)
    raise CheckpointError(f"No policy could be loaded from {path}: {problems}.")


def _registry():
    return ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(),
        policy=ocp.StandardCheckpointHandler(),
        meta=ocp.JsonCheckpointHandler(),
        format=ocp.JsonCheckpointHandler(),
    )


def _manager(directory: Path, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),  # deletes old steps once the new one is complete
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # Checkpointer.__init__ does it, with a warning
    )
    return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def _list_steps(directory: Path) -> list[int]:
    """Finalized step directories, newest first (tmp and .corrupt names are not digits)."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _as_step(step) -> int:
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r}.") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return step


def _meta(step: int, meta: dict | None, **extra) -> dict:
    """The caller's meta as plain JSON plus ours (which wins)."""
    out = {**(meta or {}), "step": step, "time": time.time(), **extra}
    try:
        return json.loads(json.dumps(out, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError("meta must be plain JSON (dicts with str keys, lists, numbers, strings, None): "
                        f"{str(e).rstrip('.')}.") from None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)) and not _is_key(x):
        return np.asarray(x).tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"it holds a {type(x).__name__}")


def _score(step_dir: Path, *, verify: bool = False) -> float | None:
    """The score in a best checkpoint's meta; with ``verify``, None unless its policy
    (else its state's tree metadata: the state may be a huge replay buffer) reads."""
    try:
        with _StepReader() as reader:
            score = float(reader.json(step_dir, "meta")["score"])
            if verify:
                item = "policy" if "policy" in reader.json(step_dir, "format")["items"] else "state"
                saved = reader.tree_metadata(step_dir, item)
                if item == "policy":
                    sharding = _default_sharding()
                    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                                            saved)
                    tree = jax.block_until_ready(reader.tree(step_dir, item, abstract))
                    _verify(_flat(tree), reader.json(step_dir, "format"), item)
        return None if math.isnan(score) else score
    except Exception as e:
        log.warning("Cannot read %s (%s); it does not count as best.", step_dir, _reason(e, step_dir))
        return None


# -- digests ---------------------------------------------------------------


def _crc(a: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def _digests(tree) -> dict[str, str]:
    """{leaf name: CRC-32 of its bytes} of the leaves to be saved, from their host
    arrays; a leaf split over several processes (no process holds it whole) is left out."""
    out = {}
    for name, x in _flat(tree).items():
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                continue
            x = x.addressable_data(0)
        out[name] = _crc(np.asarray(x))
    return out


def _verify(restored: dict[str, Any], fmt: dict, item: str) -> None:
    """Raise :class:`_Damaged` if a restored leaf ({name: array}, key data unwrapped)
    differs from its saved digest. No digest (older checkpoints): nothing to verify."""
    digest = fmt.get("digest") or {}
    saved = digest.get(item) or {}
    if digest.get("hash") != DIGEST or not saved:
        return
    bad = [name for name, x in restored.items() if name in saved and _crc(np.asarray(x)) != saved[name]]
    if bad:
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise _Damaged(f"its {item} arrays differ from the digest saved with them "
                       f"({', '.join(map(repr, bad[:_MAX_LISTED]))}{more})")


# -- pytrees ---------------------------------------------------------------


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _path_name(path) -> str:
    """A key path as 'a/0/b', the way orbax names leaves."""
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _flat(tree) -> dict[str, Any]:
    return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_dtype(x, item: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a leaf, non-key dtypes as JAX canonicalises them."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        shape, dtype = tuple(x.shape), x.dtype
    elif isinstance(x, (bool, int, float, complex)):
        shape, dtype = (), np.result_type(x)
    else:
        raise TypeError(f"{item} leaf {name!r} is a {type(x).__name__}; checkpoints hold arrays and numbers only.")
    if not _is_key(x):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return shape, dtype


def _split_keys(tree, item: str):
    """Leaves orbax can save (typed PRNG keys as their key data), and {leaf name: impl}
    of those keys, to re-wrap them on restore."""
    typed = {}

    def leaf(path, x):
        name = _path_name(path)
        if _is_key(x):
            typed[name] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        if isinstance(x, jax.Array):
            return x
        _, dtype = _shape_dtype(x, item, name)
        return np.asarray(x, dtype=dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree), typed


def _key_dtype(impl: str):
    return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype


def _default_sharding() -> jax.sharding.Sharding:
    device = jax.config.jax_default_device
    if isinstance(device, str):
        device = jax.local_devices(backend=device)[0]
    return jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])  # this process's own device


def _describe(shape, dtype) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def _data_target(target, item: str, saved_keys: dict, saved_tree, where: Path):
    """ShapeDtypeStructs on the default device to restore into (keys as key data),
    so that a checkpoint written on a GPU restores on a CPU. Raises one
    CheckpointError naming the differences from the saved tree metadata."""
    sharding = _default_sharding()
    problems = {}  # leaf name -> what is wrong with it

    def leaf(path, x):
        name = _path_name(path)
        shape, dtype = _shape_dtype(x, item, name)
        if _is_key(x):
            impl = saved_keys.get(name)
            if impl is None:
                problems[name] = f"{name!r} is a typed PRNG key ({dtype}) in the target but raw data in the checkpoint"
            elif _key_dtype(impl) != dtype:
                problems[name] = f"{name!r} is a {_key_dtype(impl)} key in the checkpoint but {dtype} in the target"
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        elif name in saved_keys:
            problems[name] = (f"{name!r} is a typed PRNG key ({_key_dtype(saved_keys[name])}) in the "
                              f"checkpoint but {_describe(shape, dtype)} in the target")
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(leaf, target)
    wanted, saved = _flat(abstract), _flat(saved_tree)
    for name, want in wanted.items():
        if name in problems:
            continue
        if name not in saved:
            problems[name] = f"{name!r} is missing from the checkpoint"
        elif (tuple(saved[name].shape), np.dtype(saved[name].dtype)) != (want.shape, np.dtype(want.dtype)):
            have, need = _describe(saved[name].shape, saved[name].dtype), _describe(want.shape, want.dtype)
            problems[name] = f"{name!r} is {have} in the checkpoint but {need} in the target"
    problems.update({n: f"{n!r} is in the checkpoint but not in the target" for n in saved if n not in wanted})
    if problems:
        problems = list(problems.values())
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"Checkpoint {where} does not match the {item} being restored: "
                              + "; ".join(problems[:_MAX_LISTED]) + more
                              + ". Restore into a target built with the same network and config as the saved run.")
    return abstract


# -- reading ---------------------------------------------------------------


@functools.cache  # once per process
def _quiet_abandoned_reads() -> None:
    """Install a ``sys.unraisablehook`` that drops the ``RuntimeError: Event loop is
    closed`` tracebacks tensorstore reports for a failed read's other reads (they
    can arrive after the read returned), passing everything else on."""
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if type(e) is RuntimeError and str(e) == "Event loop is closed":
            log.debug("Dropped an abandoned checkpoint read: %r", e)
            return
        previous(unraisable)

    sys.unraisablehook = hook


class _StepReader:
    """Reads items of step directories with orbax's standard handlers (no pickle)."""

    def __enter__(self):
        _quiet_abandoned_reads()  # before any read: the noise can start while a failure is still propagating
        self._ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))
        self._tree_handler = ocp.StandardCheckpointHandler()
        return self

    def __exit__(self, *exc):
        self._tree_handler.close()
        self._ckptr.close()

    def _restore(self, step_dir: Path, item: str, args):
        return self._ckptr.restore(epath.Path(step_dir), args=ocp.args.Composite(**{item: args}))[item]

    def json(self, step_dir: Path, item: str) -> dict:
        return self._restore(step_dir, item, ocp.args.JsonRestore())

    def tree_metadata(self, step_dir: Path, item: str):
        """The saved tree: nested dicts/lists of orbax metadata with ``shape`` and ``dtype``."""
        return self._tree_handler.metadata(epath.Path(step_dir) / item).tree

    def tree(self, step_dir: Path, item: str, abstract):
        return self._restore(step_dir, item, ocp.args.StandardRestore(abstract))


def _read_step(reader: _StepReader, step_dir: Path, *, state_target, policy_target, want_state: bool) -> Restored:
    """Read one step. CheckpointError: target mismatch; anything else: unreadable."""
    fmt = reader.json(step_dir, "format")
    meta = reader.json(step_dir, "meta")
    if fmt.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {step_dir} has format version {fmt['version']}; this jaxatari "
                              f"reads up to {FORMAT_VERSION}: upgrade jaxatari.")
    trees = {"state": None, "policy": None}
    for item, target, wanted in (("state", state_target, want_state),
                                 ("policy", policy_target, policy_target is not None)):
        if not wanted:
            continue
        if item not in fmt["items"]:
            raise CheckpointError(f"Checkpoint {step_dir} has no {item}: it was saved without {item}=.")
        saved_keys = fmt["typed_keys"].get(item, {})
        saved_tree = reader.tree_metadata(step_dir, item)
        abstract = _data_target(target, item, saved_keys, saved_tree, step_dir)
        # Restore in the saved tree's structure, matched leaf by leaf name: containers may differ where no
        # leaf does (a field added since, holding None, must not make older checkpoints unreadable).
        by_name = _flat(abstract)
        on_disk = jax.tree_util.tree_map_with_path(lambda path, _: by_name[_path_name(path)], saved_tree)
        data = _flat(reader.tree(step_dir, item, on_disk))
        _verify(data, fmt, item)
        data = {name: x if name not in saved_keys else jax.random.wrap_key_data(x, impl=saved_keys[name])
                for name, x in data.items()}
        trees[item] = jax.tree_util.tree_map_with_path(lambda path, _: data[_path_name(path)], abstract)
    return Restored(int(meta["step"]), trees["state"], trees["policy"], meta)


def _restore_newest(directory: Path, *, state_target, policy_target, want_state: bool):
    """The newest readable checkpoint (best: highest score), and the unreadable ones skipped."""
    steps = _list_steps(directory)
    if not steps:
        raise _NoneReadable(f"There is no checkpoint in {directory}.")
    if directory.name == BEST:  # normally one; more if a process died between save and rotation
        scores = {s: _score(directory / str(s)) for s in steps}
        steps.sort(key=lambda s: -math.inf if scores[s] is None else scores[s], reverse=True)
    unreadable, reasons = [], []
    with _StepReader() as reader:
        for step in steps:
            step_dir = directory / str(step)
            try:
                return _read_step(reader, step_dir, state_target=state_target, policy_target=policy_target,
                                  want_state=want_state), unreadable
            except CheckpointError:
                raise
            except _Damaged as e:
                log.warning("Checkpoint step %d in %s is damaged: %s; trying the previous one.", step, directory, e)
                unreadable.append(step_dir)
                reasons.append(f"step {step}: damaged, {e}")
            except Exception as e:
                log.debug("Reading %s failed.", step_dir, exc_info=True)
                reason = _reason(e, step_dir)
                log.warning("Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                            step, directory, reason)
                unreadable.append(step_dir)
                reasons.append(f"step {step}: {reason}")
    raise _NoneReadable(f"No readable checkpoint in {directory}: {'; '.join(reasons)}.")


_STATUS = {"OUT_OF_RANGE": "truncated file", "DATA_LOSS": "corrupt file", "NOT_FOUND": "missing file"}


def _reason(e: BaseException, root: Path | None = None) -> str:
    """One line for an exception from orbax/tensorstore: its root cause, without spec
    dumps, paths relative to ``root``, at most 200 characters."""
    if isinstance(e, _Damaged):
        return f"damaged: {e}"
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0].rstrip(" .")
    if root is not None:
        line = line.replace(f"{root}{os.sep}", "").replace(str(root), ".")
    code, _, rest = line.partition(": ")
    if code in _STATUS:  # tensorstore nests context; the last two clauses say what and where
        line = f"{_STATUS[code]}: " + ": ".join(rest.split(": ")[-2:])
    else:
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."
