"""``scripts/ppo.py`` that kills itself (SIGKILL) at one point of a run's life, for the
preemption tests in tests/test_resume.py and benchmarks/kill_sweep.py:

    python tests/_kill_worker.py POINT[:N] [scripts/ppo.py flags ...]

It dies the ``N``-th time (default 1) the run reaches ``POINT``, with nothing
cleaned up, as a kill -9 or a lost node leaves it; before dying it prints
``KILLED POINT:N`` and what ``checkpoints/latest`` holds to stderr. ``none``
runs the script unchanged. The points, in the order a run reaches them:

* ``envs``: building the envs (nothing is written yet);
* ``config``: about to write ``config.json`` (``checkpoints/`` exists, no config);
* ``compile``: compiling the chunk (a timer fires 0.2 s into it);
* ``replay``: about to replay the action log (a resume from a checkpoint);
* ``row``: writing a ``metrics.csv`` row (mid-chunk: its actions logged, its rows partly written);
* ``save``: asked for a checkpoint (nothing of it written);
* ``saving``: a checkpoint handed to orbax, its write under way in the background;
* ``saved``: a checkpoint written;
* ``exit``: the run's last checkpoint written, before the script exits.
"""

import os
import signal
import sys
import threading
from pathlib import Path


def die(point: str) -> None:
    latest = Path(_run_dir) / "checkpoints" / "latest"
    held = sorted(p.name for p in latest.iterdir()) if latest.is_dir() else None
    print(f"KILLED {point}: checkpoints/latest holds {held}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def plant(owner, name: str, point: str, n: int, *, after=None) -> None:
    """Replace ``owner.name`` by a wrapper that dies on its ``n``-th call: before the call,
    or after it once ``after(self_or_None)`` has run, when ``after`` is given."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return original(*args, **kwargs)
        if after is None:
            die(f"{point}:{n}")
        result = original(*args, **kwargs)
        after(args[0] if args else None)
        die(f"{point}:{n}")
        return result

    setattr(owner, name, wrapper)


class _CompileKiller:
    """A jitted chunk whose ``lower(...).compile()`` is killed 0.2 s into compiling."""

    def __init__(self, jitted):
        self._jitted = jitted

    def lower(self, *args):
        lowered = self._jitted.lower(*args)

        class Lowered:
            @staticmethod
            def compile():
                threading.Timer(0.2, die, args=("compile:1",)).start()
                return lowered.compile()

        return Lowered()


def main(argv: list[str]) -> None:
    from jaxatari import checkpoint, cli, driver, rundir, runner
    from jaxatari.agents import ppo

    point, _, n = argv[0].partition(":")
    n = int(n or 1)
    if point == "envs":
        plant(driver, "make_envs", point, n)
    elif point == "config":
        plant(rundir, "write_config", point, n)
    elif point == "compile":
        make_chunk = driver.make_chunk
        driver.make_chunk = lambda *a, **k: _CompileKiller(make_chunk(*a, **k))
    elif point == "replay":
        plant(rundir, "replay_actions", point, n)
    elif point == "row":
        plant(runner.MetricsWriter, "write", point, n)
    elif point == "save":
        plant(checkpoint.Checkpointer, "save", point, n)
    elif point == "saving":
        plant(checkpoint.Checkpointer, "save", point, n, after=lambda ckpt: None)
    elif point == "saved":
        plant(checkpoint.Checkpointer, "save", point, n, after=lambda ckpt: ckpt.wait())
    elif point == "exit":
        plant(runner, "run", point, n, after=lambda _: None)
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    sys.argv = ["scripts/ppo.py", *argv[1:]]
    cli.main(ppo.Config, lambda c: driver.train(ppo.ALGORITHM, c))


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else "."


if __name__ == "__main__":
    _run_dir = _flag(sys.argv, "--resume") if "--resume" in sys.argv else _flag(sys.argv, "--run-dir")
    main(sys.argv[1:])
