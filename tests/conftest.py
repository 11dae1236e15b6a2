"""Shared by the test modules: this directory is on ``sys.path`` (pytest puts a
conftest's directory there), so tests in subdirectories can import helpers kept
here, such as :mod:`hlo_order`.

It also points JAX's persistent compilation cache at one directory for the whole
run, shared by the xdist workers and every script the tests start (they inherit
the environment): many tests train the same small configurations, and a program
compiled once is loaded afterwards (tests/test_resume.py: 121 s -> 100 s on the
2-core CI machine). Set ``JAX_COMPILATION_CACHE_DIR`` to choose the directory.
"""

import os
import tempfile

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the controller picks it; workers and scripts inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxatari-tests-jit-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 (after the environment it reads)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
