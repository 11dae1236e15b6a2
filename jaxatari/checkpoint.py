"""Checkpoints of a training run, on orbax-checkpoint.

Layout of a run directory::

    RUN_DIR/checkpoints/
      latest/<step>/        the newest ``keep`` checkpoints, rotated
      best/<step>/          the one checkpoint with the highest score so far
      latest/<step>.corrupt a checkpoint found unreadable and moved aside (rare)

Each ``<step>/`` holds orbax items written with orbax's standard handlers only
(tensorstore arrays and JSON; nothing is pickled, so loading never runs code):

* ``state``:  the complete training state, any pytree of arrays (params,
  optimiser state, counters, PRNG keys, env observations ...);
* ``policy``: optional small pytree (e.g. the inference params) so that a policy
  loads without knowing the optimiser structure (:func:`restore_policy`);
* ``meta``:   JSON: whatever the caller passed (NumPy/JAX scalars converted),
  plus ``step``, ``time`` (unix seconds) and ``score`` (best only), which win
  over the caller's keys of the same name;
* ``format``: JSON: format version, which items exist, and which leaves were
  new-style typed PRNG keys (``jax.random.key``) with their impl. Typed keys are
  stored as ``jax.random.key_data`` and re-wrapped with
  ``jax.random.wrap_key_data(data, impl=...)`` on restore; raw ``uint32`` keys
  are ordinary arrays.

Guarantees:

* **Atomic saves.** orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it
  when complete; a process killed mid-save leaves the previous checkpoints
  intact. :class:`Checkpointer` removes such unfinished directories when it
  starts (with a warning). Rotation deletes old steps only after the new one is
  complete, and ``best/`` and ``latest/`` never rotate each other's steps.
* **Async saves** (default) return once the arrays are copied off the device,
  so the caller may donate or overwrite the state at once; the write continues
  in the background, is waited for before the next save, by :meth:`wait` and by
  :meth:`close` (use ``with Checkpointer(...) as ckpt:``). No thread outlives
  ``close()``. A save that fails in the background (disk full) is raised as
  :class:`CheckpointError` by the next ``save``, ``wait`` or ``close``; the
  checkpoints before it are kept.
* **Device-independent.** Restores go into an abstract target: each leaf
  becomes a ``jax.ShapeDtypeStruct`` on the current default device, so a
  checkpoint written on a GPU restores on a CPU-only machine.
* **Corruption is survivable.** A checkpoint that cannot be read (truncated or
  missing files) is reported with ``logging`` (a warning naming the step and the
  reason) and the previous one is used. If none is readable, or the target does
  not match what was saved (changed network: different tree, shape, dtype or
  PRNG-key type), :class:`CheckpointError` says so in one sentence.

Leaves are saved with their own dtype (uint8 obs, int32 counters, float32
params, bool flags). Python and NumPy scalars and NumPy arrays are saved at the
dtype JAX would give them (``int`` -> int32 unless ``jax_enable_x64``) and come
back as ``jax.Array``.

One :class:`Checkpointer` per run directory at a time (it is the writer); any
number of readers may call :func:`restore_policy`.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import sys
import time
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


_writing = 0  # saves and waits in progress in this process (see writing())


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


class Restored(NamedTuple):
    """What a restore returns."""

    step: int
    """The step the checkpoint was saved at."""
    state: Any
    """The training state, structured like the abstract target (None if not asked for)."""
    policy: Any
    """The policy pytree, if an abstract policy was given, else None."""
    meta: dict
    """The JSON metadata: ``step``, ``time``, ``score`` (best only) and the caller's keys."""


class Checkpointer:
    """Latest-N and best checkpoints of one run, in ``RUN_DIR/checkpoints``.

    Usage::

        with Checkpointer(run_dir, keep=3) as ckpt:
            if ckpt.latest_step() is not None:
                step, state, _, meta = ckpt.restore_latest(abstract_state)
            ...
            ckpt.save(step, state, policy=state.params, meta={"return": r})
            ckpt.save_best(step, state, score=r, policy=state.params)

    Args:
      run_dir: the run directory; checkpoints go in ``run_dir/checkpoints``.
      keep: how many of the newest checkpoints ``latest/`` keeps (>= 1).
      async_save: write in a background thread (the arrays are copied off the
        device before ``save`` returns).
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (checkpoints to keep), got {keep!r}.")
        self.directory = Path(run_dir).absolute() / "checkpoints"  # orbax refuses relative paths
        self._closed = True  # until both managers exist
        for kind in (LATEST, BEST):
            (self.directory / kind).mkdir(parents=True, exist_ok=True)
            _remove_unfinished(self.directory / kind)
        self._latest = _manager(self.directory / LATEST, keep=keep, async_save=async_save)
        try:
            # One best checkpoint: LatestN(1) deletes the previous best only once
            # the new one is complete. Saves are made only on a higher score, so
            # the newest is the best even when steps go backwards after a resume.
            self._best = _manager(self.directory / BEST, keep=1, async_save=async_save)
        except BaseException:
            self._latest.close()
            raise
        self._closed = False
        self._best_score = _best_score_on_disk(self.directory / BEST)

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception already propagating
            self.close()
        except CheckpointError as e:
            log.error("%s", e)

    # -- queries -------------------------------------------------------------

    def latest_step(self) -> int | None:
        """Newest step in ``latest/`` (saved or being saved), or None.

        Not validated: :meth:`restore_latest` may fall back to an older step.
        """
        return self._latest.latest_step()

    @property
    def best_score(self) -> float | None:
        """Score of the best checkpoint (persisted in its meta), or None."""
        return self._best_score

    # -- saving --------------------------------------------------------------

    def save(self, step: int, state, *, policy=None, meta: dict | None = None) -> Path:
        """Save a checkpoint in ``latest/``, keeping the newest ``keep``.

        Returns the step directory (it appears once an async save completes).
        Saving the newest step again is a no-op returning the existing path (the
        final save of a run often lands on a step just saved). A step older than
        the newest raises :class:`CheckpointError`: continue from
        :meth:`restore_latest`, or use a new run directory.
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
                f"Cannot save step {step} in {path.parent}: it already holds the newer step "
                f"{newest}; continue that run (--resume, or restore_latest() from Python) or use a new run directory."
            )
        self._write(self._latest, step, state, policy, _meta(step, meta))
        return path

    def save_best(self, step: int, state, score: float, *, policy=None, meta: dict | None = None) -> bool:
        """Save to ``best/`` if ``score`` beats the best so far; True if saved.

        NaN never counts as best. The best score persists in the checkpoint's
        meta, so a new Checkpointer on the same run directory keeps it. The
        step may be lower than the current best's (after a resume); a higher
        score at the very same step replaces that step (deleted first: the one
        case where a kill at the wrong moment can lose the best).
        """
        self._check_open()
        score = float(score)
        if math.isnan(score) or (self._best_score is not None and not score > self._best_score):
            return False
        step = _as_step(step)
        if step in self._best.all_steps():
            # A higher score at a step already saved as best (a re-evaluation):
            # orbax cannot overwrite a step, so the old one goes first.
            self._wait(self._best, BEST)
            self._best.delete(step)
        self._write(self._best, step, state, policy, _meta(step, meta, score=score))
        self._best_score = score
        return True

    def _write(self, manager, step: int, state, policy, meta: dict) -> None:
        if jax.process_count() > 1:
            # orbax names its cross-process barriers by step: a "latest" and a "best"
            # save of the same step in flight together would share (and break) them.
            self._wait(self._latest, LATEST)
            self._wait(self._best, BEST)
        state_data, state_keys = _split_keys(state, "state")
        items = {"state": ocp.args.StandardSave(state_data)}
        fmt = {"version": FORMAT_VERSION, "items": ["state", "meta", "format"],
               "typed_keys": {"state": state_keys}}
        if policy is not None:
            policy_data, policy_keys = _split_keys(policy, "policy")
            items["policy"] = ocp.args.StandardSave(policy_data)
            fmt["items"].append("policy")
            fmt["typed_keys"]["policy"] = policy_keys
        items["meta"] = ocp.args.JsonSave(meta)
        items["format"] = ocp.args.JsonSave(fmt)
        self._wait(manager, manager.directory.name)  # a failed previous save is reported as such
        try:
            # force: we decide which steps to save (see save/save_best).
            with _Writing():
                manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise CheckpointSaveError(
                f"Saving checkpoint step {step} in {manager.directory} failed: {_reason(e)}."
            ) from e

    # -- restoring -----------------------------------------------------------

    def restore_latest(self, abstract_state, *, abstract_policy=None) -> Restored:
        """Restore the newest readable checkpoint of ``latest/``.

        ``abstract_state`` (and ``abstract_policy``, to also get the policy) give
        the structure, shapes and dtypes: ``jax.ShapeDtypeStruct`` leaves (e.g.
        from ``jax.eval_shape``) or concrete arrays. Unreadable newer steps are
        skipped with a warning and moved aside to ``<step>.corrupt`` so that
        saving continues from the restored step.
        """
        return self._restore(self._latest, LATEST, abstract_state, abstract_policy)

    def restore_best(self, abstract_state, *, abstract_policy=None) -> Restored:
        """Restore the best checkpoint (as :meth:`restore_latest`, from ``best/``)."""
        restored = self._restore(self._best, BEST, abstract_state, abstract_policy)
        self._best_score = float(restored.meta["score"])
        return restored

    def _restore(self, manager, kind: str, abstract_state, abstract_policy) -> Restored:
        self._check_open()
        self._wait(manager, kind)
        restored, unreadable = _restore_newest(self.directory / kind, kind, state_target=abstract_state,
                                               policy_target=abstract_policy, want_state=True)
        if unreadable:
            for step_dir in unreadable:
                _move_aside(step_dir)
            manager.reload()
        return restored

    # -- lifecycle -------------------------------------------------------------

    def wait(self) -> None:
        """Block until background saves are complete; raise if one failed."""
        self._check_open()
        self._wait(self._latest, LATEST)
        self._wait(self._best, BEST)

    def _wait(self, manager, kind: str) -> None:
        try:
            with _Writing():
                manager.wait_until_finished()
        except Exception as e:
            manager.reload()  # orbax already dropped the steps it meant to rotate away; they are still there
            raise CheckpointSaveError(f"A background save in {self.directory / kind} failed: {_reason(e)}.") from e

    def close(self) -> None:
        """Wait for background saves and release orbax's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for kind, manager in ((LATEST, self._latest), (BEST, self._best)):
            try:
                manager.close()
            except Exception as e:
                errors.append(f"{self.directory / kind}: {_reason(e)}")
                try:  # orbax raises a save error once; closing again releases the rest
                    manager.close()
                except Exception:
                    log.debug("Second close of %s failed.", self.directory / kind, exc_info=True)
        if errors:
            raise CheckpointSaveError(f"A background save failed ({'; '.join(errors)}).")

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"The Checkpointer for {self.directory} is closed.")


def restore_policy(path: str | os.PathLike, abstract_policy) -> tuple[Any, dict]:
    """Load the ``policy`` item of a checkpoint: ``(policy, meta)``; read-only.

    ``path`` may be:

    * a run directory or its ``checkpoints/``: the best checkpoint if ``best/``
      has a readable one, else the newest readable one of ``latest/``;
    * a ``latest/`` or ``best/`` directory: its newest readable (best: highest
      score) checkpoint;
    * one step directory: exactly that checkpoint.

    Unreadable checkpoints are skipped with a warning (nothing is moved).
    Raises :class:`CheckpointError` if nothing is readable, the checkpoint was
    saved without ``policy=``, or ``abstract_policy`` does not match it.
    """
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a run directory or a checkpoint directory.")
    path = Path(path).absolute()  # orbax refuses relative paths
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if _is_step(path):
        with _StepReader() as reader:
            try:
                r = _read_step(reader, path, state_target=None, policy_target=abstract_policy, want_state=False)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"Checkpoint {path} is unreadable ({_reason(e, path)}).") from None
        return r.policy, r.meta
    if (path / BEST).is_dir() or (path / LATEST).is_dir():
        candidates = [(path / BEST, BEST), (path / LATEST, LATEST)]
    else:
        candidates = [(path, BEST if path.name == BEST else LATEST)]
    problems = []
    for directory, kind in candidates:
        try:
            r, _ = _restore_newest(directory, kind, state_target=None, policy_target=abstract_policy,
                                   want_state=False)
            return r.policy, r.meta
        except _NoneReadable as e:
            problems.append(str(e).rstrip("."))
    problems = "; ".join(p[0].lower() + p[1:] for p in problems)
    raise CheckpointError(f"No policy could be loaded from {path}: {problems}.")


# ---------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------


def _registry():
    return ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(),
        policy=ocp.StandardCheckpointHandler(),
        meta=ocp.JsonCheckpointHandler(),
        format=ocp.JsonCheckpointHandler(),
    )


def _manager(directory: Path, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        # Unfinished tmp dirs are removed synchronously by _remove_unfinished.
        cleanup_tmp_directories=False,
    )
    return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def _remove_unfinished(directory: Path) -> None:
    """Delete orbax tmp dirs left by a process killed mid-save."""
    for p in sorted(directory.iterdir()):
        if _TMP_SUFFIX in p.name:
            log.warning("Removing unfinished checkpoint %s (a save was interrupted; earlier ones are intact).",
                        p)
            shutil.rmtree(p, ignore_errors=True)


def _move_aside(step_dir: Path) -> None:
    target = step_dir.with_name(f"{step_dir.name}.corrupt")
    i = 1
    while target.exists():
        target = step_dir.with_name(f"{step_dir.name}.corrupt-{i}")
        i += 1
    step_dir.rename(target)
    log.warning("Moved unreadable checkpoint %s aside to %s.", step_dir, target.name)


def _list_steps(directory: Path) -> list[int]:
    """Finalized step directories, newest first (tmp and .corrupt names are not digits)."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _is_step(path: Path) -> bool:
    """A step directory holds orbax items, not step directories."""
    return any((path / name).exists() for name in ("state", "meta", "format", "_CHECKPOINT_METADATA"))


def _as_step(step) -> int:
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r}.") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return step


def _meta(step: int, meta: dict | None, **extra) -> dict:
    """The caller's meta as plain JSON (NumPy/JAX scalars converted) plus ours."""
    out = dict(meta or {})
    out.update(step=step, time=time.time(), **extra)
    try:
        return json.loads(json.dumps(out, default=_json_default))
    except (TypeError, ValueError) as e:
        problem = str(e).rstrip(".")
        raise TypeError(
            f"meta must be plain JSON (dicts with str keys, lists, numbers, strings, None): {problem}."
        ) from None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)) and not _is_key(x):
        return np.asarray(x).tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"it holds a {type(x).__name__}")


def _best_score_on_disk(directory: Path) -> float | None:
    """The highest score among the best checkpoints whose policy can be read in
    full: an unreadable one (a truncated file) must not block every later best
    (it is replaced by the next best save, which rotates it away)."""
    scores = [_score(directory / str(step), verify=True) for step in _list_steps(directory)]
    return max((s for s in scores if s is not None), default=None)


def _score(step_dir: Path, *, verify: bool = False) -> float | None:
    """The score in a best checkpoint's meta; with ``verify``, None unless its policy
    (else its state's tree metadata) reads in full."""
    try:
        with _StepReader() as reader:
            score = float(reader.json(step_dir, "meta")["score"])
            if verify:
                item = "policy" if "policy" in reader.json(step_dir, "format")["items"] else "state"
                saved = reader.tree_metadata(step_dir, item)
                if item == "policy":  # params: small; the state may hold a GiB replay buffer
                    sharding = _default_sharding()
                    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                                            saved, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
                    jax.block_until_ready(reader.tree(step_dir, item, abstract))
        return None if math.isnan(score) else score
    except Exception as e:
        log.warning("Cannot read %s (%s); it does not count as best.", step_dir, _reason(e, step_dir))
        return None


# -- pytrees ---------------------------------------------------------------


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _path_name(path) -> str:
    """A key path as 'a/0/b', the way orbax names leaves (dict keys, fields, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts) or "<root>"


def _flat(tree) -> dict[str, Any]:
    return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_dtype(x, item: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a leaf, non-key dtypes as JAX canonicalises them."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        shape, dtype = tuple(x.shape), x.dtype
    elif isinstance(x, (bool, int, float, complex)):
        shape, dtype = (), np.result_type(x)
    else:
        raise TypeError(
            f"{item} leaf {name!r} is a {type(x).__name__}; checkpoints hold arrays and numbers only."
        )
    if not _is_key(x):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return shape, dtype


def _split_keys(tree, item: str):
    """Leaves orbax can save, and {leaf name: impl} of the typed PRNG keys."""
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
    """ShapeDtypeStructs on the default device to restore into (keys as key data).

    Compares them with the saved tree metadata first and raises one
    CheckpointError naming the differences.
    """
    sharding = _default_sharding()
    problems = {}  # leaf name -> what is wrong with it

    def leaf(path, x):
        name = _path_name(path)
        shape, dtype = _shape_dtype(x, item, name)
        if _is_key(x):
            impl = saved_keys.get(name)
            if impl is None:
                problems[name] = (f"{name!r} is a typed PRNG key ({dtype}) in the target "
                                  "but raw data in the checkpoint")
            elif _key_dtype(impl) != dtype:
                problems[name] = (f"{name!r} is a {_key_dtype(impl)} key in the checkpoint "
                                  f"but {dtype} in the target")
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        elif name in saved_keys:
            problems[name] = (f"{name!r} is a typed PRNG key ({_key_dtype(saved_keys[name])}) in the "
                              f"checkpoint but {_describe(shape, dtype)} in the target")
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(leaf, target)
    wanted = _flat(abstract)
    saved = _flat(saved_tree)
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
        raise CheckpointError(
            f"Checkpoint {where} does not match the {item} being restored: "
            + "; ".join(problems[:_MAX_LISTED]) + more
            + ". Restore into a target built with the same network and config as the saved run."
        )
    return abstract


# -- reading ---------------------------------------------------------------


_quiet_installed = False


def _quiet_abandoned_reads() -> None:
    """When a read fails, orbax's event loop is closed while tensorstore still
    completes the step's other reads; each then reports ``RuntimeError: Event
    loop is closed`` as an unraisable exception, tens of tracebacks on stderr
    after the one-line warning. Installs (once per process, at the first read) a
    ``sys.unraisablehook`` that drops exactly those (logged at debug level) and
    passes everything else on. The noise can arrive after the read has returned,
    so the hook stays."""
    global _quiet_installed
    if _quiet_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if type(e) is RuntimeError and str(e) == "Event loop is closed":
            log.debug("Dropped an abandoned checkpoint read: %r", e)
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _quiet_installed = True


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


def _read_step(reader: _StepReader, step_dir: Path, *, state_target, policy_target, want_state: bool
               ) -> Restored:
    """Read one step. CheckpointError: target mismatch; anything else: unreadable."""
    fmt = reader.json(step_dir, "format")
    meta = reader.json(step_dir, "meta")
    if fmt.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {step_dir} has format version {fmt['version']}; this jaxatari "
                              f"reads up to {FORMAT_VERSION}: upgrade jaxatari.")
    trees = {}
    wanted = {"state": want_state, "policy": policy_target is not None}
    for item, target in (("state", state_target), ("policy", policy_target)):
        if not wanted[item]:
            trees[item] = None
            continue
        if item not in fmt["items"]:
            raise CheckpointError(f"Checkpoint {step_dir} has no {item}: it was saved without {item}=.")
        saved_keys = fmt["typed_keys"].get(item, {})
        saved_tree = reader.tree_metadata(step_dir, item)
        abstract = _data_target(target, item, saved_keys, saved_tree, step_dir)
        # Restore in the saved tree's own structure, matched to the target leaf by leaf name: the containers
        # may differ where no leaf does (a field added or removed since that holds None must not make older
        # checkpoints unreadable).
        by_name = _flat(abstract)
        on_disk = jax.tree_util.tree_map_with_path(lambda path, _: by_name[_path_name(path)], saved_tree)
        data = _flat(reader.tree(step_dir, item, on_disk))
        trees[item] = jax.tree_util.tree_map_with_path(
            lambda path, _: _rewrap(data[_path_name(path)], saved_keys.get(_path_name(path))), abstract)
    return Restored(int(meta["step"]), trees["state"], trees["policy"], meta)


def _rewrap(data, impl: str | None):
    return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


def _restore_newest(directory: Path, kind: str, *, state_target, policy_target, want_state: bool):
    """The newest readable checkpoint (best: highest score), and the unreadable ones skipped."""
    steps = _list_steps(directory)
    if not steps:
        raise _NoneReadable(f"There is no checkpoint in {directory}.")
    if kind == BEST:  # normally one; more if a process died between save and rotation
        scores = {s: _score(directory / str(s)) for s in steps}
        steps.sort(key=lambda s: -math.inf if scores[s] is None else scores[s], reverse=True)
    unreadable, reasons = [], []
    with _StepReader() as reader:
        for step in steps:
            step_dir = directory / str(step)
            try:
                restored = _read_step(reader, step_dir, state_target=state_target,
                                      policy_target=policy_target, want_state=want_state)
            except CheckpointError:
                raise
            except Exception as e:
                reason = _reason(e, step_dir)
                log.debug("Reading %s failed.", step_dir, exc_info=True)
                log.warning("Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                            step, directory, reason)
                unreadable.append(step_dir)
                reasons.append(f"step {step}: {reason}")
                continue
            return restored, unreadable
    raise _NoneReadable(f"No readable checkpoint in {directory}: {'; '.join(reasons)}.")


# tensorstore status codes, in words
_STATUS = {"OUT_OF_RANGE": "truncated file", "DATA_LOSS": "corrupt file", "NOT_FOUND": "missing file"}


def _reason(e: BaseException, root: Path | None = None) -> str:
    """One line for an exception from orbax/tensorstore: its root cause, without spec dumps."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0].rstrip(" .")
    if root is not None:  # paths relative to the step directory
        line = line.replace(f"{root}{os.sep}", "").replace(str(root), ".")
    code, _, rest = line.partition(": ")
    if code in _STATUS:  # tensorstore nests context; the last two clauses say what and where
        line = f"{_STATUS[code]}: " + ": ".join(rest.split(": ")[-2:])
    else:
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."
