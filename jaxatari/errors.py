"""The errors a user sees. Every module raises these; this one imports nothing of jaxatari.

Bad input (a :class:`ConfigError` or one of its kind) is raised before anything compiles and
names the bad value and what is accepted; the scripts print its sentence and exit 2.
"""


class ConfigError(ValueError):
    """Bad configuration, raised before anything is compiled."""


class EnvError(ValueError):
    """Bad environment id or option, raised before anything is compiled."""


class EvalError(ValueError):
    """Bad evaluation argument or policy output, raised before anything is compiled."""


class DataError(ConfigError):
    """A dataset directory or shard is missing or malformed; the message names it."""


class ParallelError(ConfigError):
    """Bad scale-out configuration, raised before anything is compiled."""


class AlreadyComplete(Exception):
    """``--resume`` of a run whose checkpoint already covers the requested
    steps (or epochs): nothing to train. The CLI prints it and exits 0."""


class NonFiniteError(RuntimeError):
    """A loss or parameter became NaN or infinite; the run stops with its last good checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored; the message says why."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a lost mount): not the user's
    input, so the scripts exit 1 for it rather than 2."""
