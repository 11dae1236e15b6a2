"""Tests for jaxatari.checkpoint: round trips, rotation, best, corruption, kills, mismatches."""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxatari.checkpoint import CheckpointError, Checkpointer, CheckpointSaveError, restore_policy


@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32 []
    obs: jax.Array  # uint8 [B, H, W, C]
    done: jax.Array  # bool [B]
    key: jax.Array  # typed threefry keys [3]
    rbg_key: jax.Array  # typed rbg key []
    raw_key: jax.Array  # uint32 [2], old-style
    unused: None = None  # an empty node


def make_state(seed: int = 0, width: int = 8) -> TrainState:
    """A small but complete training state whose every leaf depends on ``seed``.

    Built from NumPy values (no per-op compiles: the tests stay fast on a loaded
    CPU): a flax-style params dict for Dense(5 -> width) -> Dense(width -> 2) and a
    real optax Adam state with non-zero moments.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    params = {"params": {
        "layers_0": {"kernel": normal(5, width), "bias": normal(width)},
        "layers_2": {"kernel": normal(width, 2), "bias": normal(2)},
    }}
    opt_shape = jax.eval_shape(optax.adam(1e-3).init, params)  # (ScaleByAdamState, EmptyState)
    opt_state = jax.tree_util.tree_map(
        lambda x: jnp.asarray(seed + 1, x.dtype) if x.dtype == jnp.int32 else normal(*x.shape), opt_shape
    )

    def key_data(*shape):
        return rng.integers(0, 2**32, shape, dtype=np.uint32)

    return TrainState(
        params=params,
        opt_state=opt_state,
        step=jnp.int32(seed),
        obs=jnp.asarray(rng.integers(0, 256, (2, 6, 6, 4), dtype=np.uint8)),
        done=jnp.asarray([seed % 2 == 0, True]),
        key=jax.random.wrap_key_data(key_data(3, 2), impl="threefry2x32"),
        rbg_key=jax.random.wrap_key_data(key_data(4), impl="rbg"),
        raw_key=jnp.asarray(key_data(2)),
    )


def assert_trees_equal(a, b):
    """Same structure, dtypes and values; typed keys compared by impl and key data."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# When orbax's restore fails on one array, tensorstore may complete the other
# reads just after orbax closed its asyncio loop, and report "Event loop is
# closed" as an unraisable exception (possibly during the next test). Harmless:
# the failure itself is handled. Tests here read corrupt data on purpose.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def abstract(tree):
    return jax.eval_shape(lambda: tree)


def step_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def data_files(step_dir: Path, item: str = "state") -> list[Path]:
    """The tensorstore data files of one item of a checkpoint (not its JSON metadata)."""
    return [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]


# ----------------------------------------------------------------------------- round trips


def _threads_after_close(before, timeout=10.0):
    """The live threads once any extra ones have finished exiting (up to ``timeout``):
    an idle asyncio executor thread can take a moment to end after close() returns."""
    deadline = time.monotonic() + timeout
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return set(threading.enumerate())


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_identical(tmp_path, async_save):
    threads_before = set(threading.enumerate())
    state = make_state(3)
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        path = ckpt.save(7, state, policy=state.params, meta={"lr": np.float32(0.5), "tag": "a", "ret": None})
        ckpt.wait()
        assert path == tmp_path / "checkpoints" / "latest" / "7" and path.is_dir()
        assert ckpt.latest_step() == 7

        # Target from ShapeDtypeStructs (jax.eval_shape) ...
        step, restored, policy, meta = ckpt.restore_latest(abstract(state),
                                                           abstract_policy=abstract(state.params))
        assert step == 7
        assert_trees_equal(restored, state)
        assert_trees_equal(policy, state.params)
        assert type(restored.opt_state[0]) is type(state.opt_state[0])  # optax's ScaleByAdamState
        assert restored.key.dtype == state.key.dtype and restored.rbg_key.dtype == state.rbg_key.dtype
        assert restored.raw_key.dtype == jnp.uint32
        assert {x.sharding for x in jax.tree_util.tree_leaves(restored)} == {
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
        }
        assert meta["step"] == 7 and meta["lr"] == 0.5 and meta["tag"] == "a" and meta["ret"] is None
        assert isinstance(meta["time"], float)

        # ... or from concrete arrays of the right shapes; the policy is optional.
        restored2 = ckpt.restore_latest(make_state(0))
        assert_trees_equal(restored2.state, state)
        assert restored2.policy is None
    assert _threads_after_close(threads_before) <= threads_before  # no orbax thread outlives close()


def test_async_save_copies_the_state_before_returning(tmp_path):
    """The host loop donates the state to the next chunk right after save()."""
    state, expected = make_state(1), jax.device_get(make_state(1))
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        for leaf in jax.tree_util.tree_leaves(state):
            leaf.delete()  # what donation does to the buffers
        ckpt.wait()
        restored = ckpt.restore_latest(abstract(make_state(1))).state
    assert_trees_equal(restored, jax.device_put(expected))


def test_python_and_numpy_leaves_restore_at_jax_dtypes(tmp_path):
    state = {"count": 3, "lr": 0.25, "flag": True,
             "buf": np.arange(4, dtype=np.float64), "u8": np.ones(2, np.uint8)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore_latest(state).state
    assert restored["count"].dtype == jnp.int32 and int(restored["count"]) == 3
    assert restored["buf"].dtype == jnp.float32  # as jnp.asarray would give with x64 off
    assert restored["u8"].dtype == jnp.uint8 and restored["flag"].dtype == jnp.bool_


# ----------------------------------------------------------------------------- rotation and best


def test_rotation_keeps_latest_n_and_never_touches_best(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.save_best(1, make_state(1), score=10.0)
        for step in range(1, 6):
            ckpt.save(step, make_state(step))
        ckpt.wait()
        assert step_dirs(tmp_path / "checkpoints" / "latest") == ["4", "5"]
        assert step_dirs(tmp_path / "checkpoints" / "best") == ["1"]
        best = ckpt.restore_best(abstract(make_state()))
        assert best.step == 1 and best.meta["score"] == 10.0
        assert_trees_equal(best.state, make_state(1))

        # And vice versa: replacing the best leaves latest alone.
        assert ckpt.save_best(5, make_state(5), score=11.0)
        ckpt.wait()
        assert step_dirs(tmp_path / "checkpoints" / "best") == ["5"]
        assert step_dirs(tmp_path / "checkpoints" / "latest") == ["4", "5"]


def test_best_only_replaced_on_a_higher_score_and_persists(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.best_score is None
        assert not ckpt.save_best(1, make_state(1), score=float("nan"))  # NaN is never best
        assert ckpt.save_best(2, make_state(2), score=np.float32(5.0))
        assert not ckpt.save_best(3, make_state(3), score=5.0)  # equal is not better
        assert not ckpt.save_best(4, make_state(4), score=-1.0)
        assert not ckpt.save_best(5, make_state(5), score=float("nan"))
        assert ckpt.best_score == 5.0
    with Checkpointer(tmp_path) as ckpt:  # a restart
        assert ckpt.best_score == 5.0
        assert not ckpt.save_best(6, make_state(6), score=4.0)
        # After a resume the step may go back below the best's step: still replaced.
        assert ckpt.save_best(1, make_state(1), score=6.0)
        ckpt.wait()
        assert step_dirs(tmp_path / "checkpoints" / "best") == ["1"]
        assert ckpt.restore_best(abstract(make_state())).meta["score"] == 6.0


def test_an_unreadable_best_does_not_block_later_bests(tmp_path, caplog):
    """A best checkpoint whose meta reads but whose arrays do not (a truncated file)
    does not count: a lower score than its own becomes the best, and rotates it away."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save_best(3, make_state(3), score=3.0, policy=make_state(3).params)
    for f in data_files(tmp_path / "checkpoints" / "best" / "3", "policy"):
        os.truncate(f, f.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="jaxatari.checkpoint"), Checkpointer(tmp_path) as ckpt:
        assert ckpt.best_score is None
        assert ckpt.save_best(4, make_state(4), score=2.5, policy=make_state(4).params)
        ckpt.wait()
    assert step_dirs(tmp_path / "checkpoints" / "best") == ["4"]
    assert any("best/3" in r.getMessage() and "does not count as best" in r.getMessage() for r in caplog.records)
    with Checkpointer(tmp_path) as ckpt:  # a readable best keeps its score across restarts
        assert ckpt.best_score == 2.5


def test_saving_an_existing_or_older_step(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, make_state(5))
        assert ckpt.save(5, make_state(6)) == tmp_path / "checkpoints" / "latest" / "5"  # kept
        with pytest.raises(CheckpointError, match=r"Cannot save step 4 .* newer step 5"):
            ckpt.save(4, make_state(4))
        assert_trees_equal(ckpt.restore_latest(abstract(make_state())).state, make_state(5))


def test_bad_arguments_are_reported_before_saving(tmp_path):
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        Checkpointer(tmp_path, keep=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="meta must be plain JSON.*set"):
            ckpt.save(1, make_state(), meta={"bad": {1, 2}})
        with pytest.raises(TypeError, match="leaf 'name' is a str"):
            ckpt.save(1, {"name": "x"})
        assert ckpt.latest_step() is None


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage", ["truncate data", "delete data", "delete meta"])
def test_corrupt_latest_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step))
    newest = tmp_path / "checkpoints" / "latest" / "3"
    if damage == "truncate data":
        for f in data_files(newest):
            os.truncate(f, f.stat().st_size // 2)
    elif damage == "delete data":
        for f in data_files(newest):
            f.unlink()
    else:
        (newest / "meta" / "metadata").unlink()

    with caplog.at_level(logging.WARNING, logger="jaxatari.checkpoint"), Checkpointer(tmp_path, keep=3) as ckpt:
        restored = ckpt.restore_latest(abstract(make_state()))
        assert restored.step == 2
        assert_trees_equal(restored.state, make_state(2))
        # The bad one is moved aside (not deleted) so the run can save step 3 again.
        assert ckpt.latest_step() == 2
        ckpt.save(3, make_state(33))
        ckpt.wait()
        assert ckpt.restore_latest(abstract(make_state())).step == 3
    assert step_dirs(tmp_path / "checkpoints" / "latest") == ["1", "2", "3", "3.corrupt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and "unreadable" in w for w in warnings), warnings


def flip_bytes_in_largest_file(step_dir: Path, n: int = 64) -> Path:
    """Invert ``n`` bytes in the middle of the largest file of a checkpoint, its size unchanged."""
    big = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    size = big.stat().st_size
    big.write_bytes(bytes(data))
    assert big.stat().st_size == size
    return big


def test_damaged_arrays_are_caught_by_their_digest(tmp_path, caplog):
    """Bytes flipped inside the newest checkpoint's array data (sizes unchanged) read without an error;
    the digest saved with it catches them: the restore names the step and continues from the previous
    one, and restore_policy refuses that step in one sentence. The best is not counted either."""
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step, width=512), policy=make_state(step, width=512).params)
    newest = tmp_path / "checkpoints" / "latest" / "2"
    assert "state" in flip_bytes_in_largest_file(newest).parts
    flip_bytes_in_largest_file(newest / "policy")
    target = abstract(make_state(width=512))
    with caplog.at_level(logging.WARNING, logger="jaxatari.checkpoint"), Checkpointer(tmp_path, keep=3) as ckpt:
        restored = ckpt.restore_latest(target)
        assert restored.step == 1
        assert_trees_equal(restored.state, make_state(1, width=512))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"Checkpoint step 2 in {newest.parent} is damaged: its state arrays differ from the "
                            "digest saved with them") and w.endswith("trying the previous one.")
               for w in warnings), warnings
    assert step_dirs(newest.parent) == ["1", "2.corrupt"]
    with pytest.raises(CheckpointError, match=r"^Checkpoint .*2.corrupt is damaged \(its policy arrays differ "
                                              r"from the digest saved with them \('params/"):
        restore_policy(newest.parent / "2.corrupt", abstract(make_state(width=512).params))


def test_checkpoints_without_a_digest_restore_unverified(tmp_path, monkeypatch, caplog):
    """A checkpoint written before digests (no digest in its format item) restores, and nothing is said."""
    from jaxatari import checkpoint

    monkeypatch.setattr(checkpoint, "_digests", lambda tree: {})
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), policy=make_state(1).params)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
        assert_trees_equal(ckpt.restore_latest(abstract(make_state())).state, make_state(1))
    policy, _ = restore_policy(tmp_path, abstract(make_state().params))
    assert_trees_equal(policy, make_state(1).params)
    assert not caplog.records


def test_all_corrupt_raises_one_clear_error(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step))
    latest = tmp_path / "checkpoints" / "latest"
    for f in data_files(latest / "1") + data_files(latest / "2"):
        os.truncate(f, f.stat().st_size // 2)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as info:
        ckpt.restore_latest(abstract(make_state()))
    message = str(info.value)
    assert message.startswith(f"No readable checkpoint in {latest}: step 2: truncated file")
    assert "step 1: truncated file" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no orbax traceback
    assert step_dirs(latest) == ["1", "2"]  # nothing moved when nothing is usable


def test_empty_run_dir_raises_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None and ckpt.best_score is None
        with pytest.raises(CheckpointError, match=r"There is no checkpoint in .*latest\.$"):
            ckpt.restore_latest(abstract(make_state()))
        with pytest.raises(CheckpointError, match=r"There is no checkpoint in .*best\.$"):
            ckpt.restore_best(abstract(make_state()))


_KILLED_MID_SAVE = """
import os, sys
import orbax.checkpoint as ocp
sys.path.insert(0, {tests!r})
from test_checkpoint import make_state
from jaxatari.checkpoint import Checkpointer

ckpt = Checkpointer({run_dir!r}, async_save=True)
ckpt.save(1, make_state(1))
ckpt.wait()

async def die(self, *args, **kwargs):  # the data is written; the process dies before the rename
    os._exit(17)

ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = die
ckpt.save(2, make_state(2))
ckpt.wait()
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, caplog):
    script = _KILLED_MID_SAVE.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    latest = tmp_path / "checkpoints" / "latest"
    leftovers = [name for name in step_dirs(latest) if name.startswith("2.orbax-checkpoint-tmp")]
    assert leftovers, step_dirs(latest)

    with caplog.at_level(logging.WARNING, logger="jaxatari.checkpoint"), Checkpointer(tmp_path) as ckpt:
        assert step_dirs(latest) == ["1"]  # the unfinished save is cleaned up
        assert ckpt.latest_step() == 1
        restored = ckpt.restore_latest(abstract(make_state()))
        assert restored.step == 1
        assert_trees_equal(restored.state, make_state(1))
        ckpt.save(2, make_state(2))  # and saving that step again works
    assert any("Removing unfinished checkpoint" in r.getMessage() for r in caplog.records)


def test_a_failed_background_save_is_reported_and_keeps_the_previous(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.wait()

        async def disk_full(self, *args, **kwargs):
            raise OSError("No space left on device")

        monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
        ckpt.save(2, make_state(2))
        with pytest.raises(CheckpointSaveError, match=r"save in .*latest failed: OSError: No space left"):
            ckpt.wait()
        monkeypatch.undo()
        # keep=1, yet step 1 was not rotated away by the failed save ...
        assert ckpt.latest_step() == 1
        restored = ckpt.restore_latest(abstract(make_state()))
        assert restored.step == 1
        assert_trees_equal(restored.state, make_state(1))
        ckpt.save(2, make_state(2))  # ... and saving goes on.
        ckpt.wait()
        assert ckpt.restore_latest(abstract(make_state())).step == 2


def test_restores_a_checkpoint_written_on_another_device(tmp_path):
    """Nothing device-specific is needed to read: a GPU run's checkpoint loads on a CPU."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), policy=make_state(1).params)
    for item in ("state", "policy"):
        sharding_file = tmp_path / "checkpoints" / "latest" / "1" / item / "_sharding"
        text = sharding_file.read_text()
        assert "cpu:0" in text
        sharding_file.write_text(text.replace("cpu:0", "cuda:0"))  # as written by a GPU run
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore_latest(abstract(make_state()), abstract_policy=abstract(make_state().params))
    assert_trees_equal(restored.state, make_state(1))
    assert restored.state.obs.devices() == {jax.devices()[0]}
    assert_trees_equal(restore_policy(tmp_path, abstract(make_state().params))[0], make_state(1).params)


# ----------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param(lambda s: make_state(0, width=16),
                     r"'params/params/layers_0/kernel' is float32\[5,8\] in the checkpoint "
                     r"but float32\[5,16\] in the target", id="wider network"),
        pytest.param(lambda s: s.replace(step=jnp.float32(0)),
                     r"'step' is int32\[\] in the checkpoint but float32\[\] in the target", id="dtype"),
        pytest.param(lambda s: s.replace(unused=jnp.zeros(3)),
                     r"'unused' is missing from the checkpoint", id="new leaf"),
        pytest.param(lambda s: s.replace(params={}),
                     r"'params/params/layers_0/bias' is in the checkpoint but not in the target",
                     id="removed leaf"),
        pytest.param(lambda s: s.replace(raw_key=jax.random.wrap_key_data(s.raw_key)),
                     r"'raw_key' is a typed PRNG key \(key<fry>\) in the target but raw data in the checkpoint",
                     id="raw key now typed"),
        pytest.param(lambda s: s.replace(key=jax.random.key_data(s.key)),
                     r"'key' is a typed PRNG key \(key<fry>\) in the checkpoint but uint32\[3,2\] in the "
                     r"target",
                     id="typed key now raw"),
        pytest.param(lambda s: s.replace(rbg_key=jax.random.wrap_key_data(s.raw_key)),
                     r"'rbg_key' is a key<rbg> key in the checkpoint but key<fry> in the target",
                     id="key impl"),
    ],
)
def test_structure_mismatch_is_a_clear_error(tmp_path, change, expected):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, make_state(2))
        with pytest.raises(CheckpointError) as info:
            ckpt.restore_latest(abstract(change(make_state())))
        assert info.match(rf"^Checkpoint .*latest/2 does not match the state being restored: .*{expected}")
        assert str(info.value).endswith("built with the same network and config as the saved run.")
        assert step_dirs(tmp_path / "checkpoints" / "latest") == ["1", "2"]  # a mismatch is not corruption


@flax.struct.dataclass
class NewerTrainState(TrainState):
    """TrainState with a field added since the checkpoint was written, None in this run
    (or, read the other way, a field removed since that held None)."""

    pending: dict | None = None


def test_a_field_added_since_that_holds_none_restores_older_checkpoints(tmp_path):
    """Containers may differ where no leaf does: the saved leaves restore by name."""
    state = make_state(4)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
        target = NewerTrainState(**{f: getattr(make_state(0), f) for f in TrainState.__dataclass_fields__})
        restored = ckpt.restore_latest(abstract(target)).state
        assert type(restored) is NewerTrainState and restored.pending is None
        assert_trees_equal(TrainState(**{f: getattr(restored, f) for f in TrainState.__dataclass_fields__}), state)
        # ... and a checkpoint of the newer class (the field None) restores into the older one.
        ckpt.save(4, NewerTrainState(**{f: getattr(state, f) for f in TrainState.__dataclass_fields__}))
        assert_trees_equal(ckpt.restore_latest(abstract(make_state(0))).state, state)
        # A leaf the target has and the checkpoint lacks is still a clear error.
        with pytest.raises(CheckpointError, match=r"'pending/x' is missing from the checkpoint"):
            ckpt.restore_latest(abstract(target.replace(pending={"x": jnp.zeros(3)})))


# ----------------------------------------------------------------------------- restore_policy


def test_restore_policy_from_run_dir_and_its_parts(tmp_path, caplog):
    target = abstract(make_state().params)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), policy=make_state(1).params)
        ckpt.save_best(1, make_state(1), score=3.0, policy=make_state(1).params)
        ckpt.save(2, make_state(2), policy=make_state(2).params, meta={"note": "last"})
        ckpt.save(3, make_state(3))  # no policy

    checkpoints = tmp_path / "checkpoints"
    policy, meta = restore_policy(tmp_path, target)  # run dir: the best
    assert meta["step"] == 1 and meta["score"] == 3.0
    assert_trees_equal(policy, make_state(1).params)
    assert restore_policy(checkpoints, target)[1]["step"] == 1
    assert restore_policy(checkpoints / "best", target)[1]["step"] == 1
    policy, meta = restore_policy(checkpoints / "latest" / "2", target)  # one step dir
    assert meta == {"note": "last", "step": 2, "time": meta["time"]}
    assert_trees_equal(policy, make_state(2).params)
    with pytest.raises(CheckpointError, match=r"latest/3 has no policy: it was saved without policy="):
        restore_policy(checkpoints / "latest", target)

    # An unreadable best falls back to the latest with a warning.
    (checkpoints / "latest" / "3" / "format" / "metadata").unlink()
    for f in data_files(checkpoints / "best" / "1", "policy"):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="jaxatari.checkpoint"):
        policy, meta = restore_policy(tmp_path, target)
    assert meta["step"] == 2
    assert_trees_equal(policy, make_state(2).params)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 1 in" in w and "best is unreadable" in w for w in warnings), warnings
    assert step_dirs(checkpoints / "best") == ["1"]  # a reader moves nothing

    with pytest.raises(CheckpointError, match=r"not a directory"):
        restore_policy(tmp_path / "nope", target)
