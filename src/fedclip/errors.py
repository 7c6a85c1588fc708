"""User-facing errors: each message names the problem and what to do about it.

The CLI prints these as one line and exits with status 2; anything else is a bug.
"""


class FedclipError(Exception):
    """A problem with the user's input or environment, with a message that says the fix."""


class ConfigError(FedclipError):
    """An invalid configuration value or preset."""


class DataError(FedclipError):
    """A dataset folder that is missing, empty or does not match its spec."""


class BackboneError(FedclipError):
    """An unknown backbone spec, or one whose weights cannot be loaded."""


class ResumeError(FedclipError):
    """A checkpoint that does not match the run being resumed."""


class TrainingError(FedclipError):
    """Training diverged (a non-finite loss or weights); the last good checkpoint is kept."""


class RunFolderError(FedclipError):
    """A run folder that cannot be used: not writable, not a run, or in use by another run."""


class StorageError(FedclipError):
    """A file could not be written: the disk is full or read-only (nothing partial is left)."""
