"""User-facing errors: one line that names the bad input and what was expected.

Every failure a user can cause (bad dataset, bad config, bad model folder, bad argument) is raised as
a ``VqbetError``; the ``vqbet`` command prints it as ``error: <message>`` and exits with status 2
instead of showing a traceback from deep inside a library.
"""


class VqbetError(Exception):
    """A problem with the user's input, reported as one clear line."""


class DatasetError(VqbetError):
    """The zarr dataset does not follow the dataset contract (DESIGN.md section 3)."""


class ConfigError(VqbetError):
    """A training / model config is missing a value or has one of the wrong kind."""


class CheckpointError(VqbetError):
    """A checkpoint folder is missing files or does not match the code."""


class ModelFolderError(VqbetError):
    """An exported model folder is incomplete or inconsistent (DESIGN.md section 4)."""
