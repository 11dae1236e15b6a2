"""What every training script does: parse, train, turn known errors into one line."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ log level, read when JAX first logs

from jaxatari import configs  # noqa: E402
from jaxatari.errors import (  # noqa: E402
    AlreadyComplete, CheckpointError, CheckpointSaveError, ConfigError, EnvError, NonFiniteError,
)


def main(config_cls, train: Callable, *, description: str | None = None) -> None:
    """Parse ``config_cls`` (tyro; ``--resume`` aware; ``--help`` prints the grouped flags and exits 0),
    call ``train``, exit cleanly.

    Bad input (:mod:`jaxatari.errors`: ``ConfigError``, ``EnvError``, ``CheckpointError``,
    ``NonFiniteError``) prints one sentence and exits 2; a failed checkpoint write
    (``CheckpointSaveError``)
    prints one sentence and exits 1;
    an interrupted run exits 130 (SIGINT) or 143 (SIGTERM) after saving; a
    ``--resume`` of a run that is already complete says so and exits 0.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = configs.cli(config_cls, description=description)
        result = train(config)
    except AlreadyComplete as e:
        print(e, flush=True)
        sys.exit(0)
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, EnvError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nAborted (no checkpoint written since the last one).", file=sys.stderr)
        sys.exit(130)
    if result.status == "interrupted":
        sys.exit(143 if getattr(result, "signal", None) == signal.SIGTERM else 130)
