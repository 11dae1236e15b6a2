"""Shared by the test modules: this directory is on ``sys.path`` (pytest puts a
conftest's directory there), so tests in subdirectories can import helpers kept
here, such as :mod:`_scale_worker`.

One persistent XLA compilation cache per test session. Many tests start fresh
processes (scripts, multi-device and multi-process workers) that compile the
same programs again: network inits, evaluation, PRNG plumbing, and everything
of a run without EnvPool's XLA custom call (whose target name holds a
per-process id, so training chunks still compile in each process). The cache
lives in a temporary directory made here, passed to the xdist workers and to
every subprocess through ``JAX_COMPILATION_CACHE_DIR``, and removed when the
session ends; nothing persists between sessions. Only compile time changes:
a cached program is the one XLA would build. A user's own
``JAX_COMPILATION_CACHE_DIR`` is left alone.

Under ``pytest -n 2 --dist loadfile`` (the CI command) the longest files start
first: xdist's own order (most tests first) left the files with few long tests
(test_parallel.py, test_resume.py) to the end, and one worker idled while the
other finished them. `LONGEST_FIRST` holds the files over a minute,
measured on the 2-core CI machine; the others follow in xdist's order. Only
the order changes, never which tests run.
"""

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MADE_HERE = None
if _CACHE_ENV not in os.environ:  # the controller (or a plain run) makes it; xdist workers inherit it
    _MADE_HERE = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jaxatari-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the small programs add up too
    # No size limit, so no file lock: a process that reads an entry another is still writing gets JAX's
    # "Error reading persistent compilation cache entry" warning and compiles it (the result is the same).
    # A limit would lock every read and write and rescan the whole directory on each write (~3,000 entries).


LONGEST_FIRST = (  # seconds summed over each file's tests with 2 workers on 2 cores (session 13)
    "tests/test_parallel.py",  # ~200
    "tests/test_parallel_dqn.py",  # ~145
    "tests/agents/test_dqn.py",  # ~130
    "tests/test_benchmarks.py",  # ~120
    "tests/test_resume.py",  # ~115
    "tests/agents/test_ppo.py",  # ~110
    "tests/agents/test_pqn.py",  # ~105 (session 15, one worker: learning ~50, Breakout script ~55)
    "tests/agents/test_bc.py",  # ~80
    "tests/agents/test_ppo_cfc.py",  # ~80
    "tests/agents/test_a2c.py",  # ~55
    "tests/test_atari_resume.py",  # ~55
    "tests/test_exact_resume.py",  # ~50 (session 15)
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order set below
        config.option.loadscopereorder = False
    import jax  # in case a plugin imported jax before this file set the variables it reads at import

    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))


def pytest_collection_modifyitems(session, config, items):
    """The files of `LONGEST_FIRST` first, in its order; then the others by number of tests (xdist's order)."""
    def file_of(item):
        return item.nodeid.split("::", 1)[0]

    counts: dict[str, int] = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1

    def rank(item):
        f = file_of(item)
        return (LONGEST_FIRST.index(f), 0) if f in LONGEST_FIRST else (len(LONGEST_FIRST), -counts[f])

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_unconfigure(config):
    if _MADE_HERE is not None:
        shutil.rmtree(_MADE_HERE, ignore_errors=True)
