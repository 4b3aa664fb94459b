"""The project's own error types, each with a one-line, user-facing message, and the exit codes
of the command line (documented in the README)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # an unexpected error (a bug): Python's traceback
    USAGE = 2  # the command line itself is wrong (click: unknown option, missing argument, bad KEY=VALUE)
    INPUT = 3  # an input cannot be used: manifest, config, image, weights, cohort; the run folder is in use;
    # no room to write (StorageError)
    PARTIAL = 4  # the command finished and wrote its outputs, but some of the work could not be done


class BreastFusionError(Exception):
    """Base class. The CLI prints its message as one line (no traceback unless --debug) and
    exits with `exit_code`."""

    exit_code = ExitCode.INPUT


class ManifestError(BreastFusionError):
    """A manifest that cannot be used as it is (the message lists every problem found)."""


class ConfigError(BreastFusionError):
    """A configuration value or file that is not valid."""


class WeightsError(BreastFusionError):
    """Pretrained or trained weights that are missing, unsafe or do not fit the model."""


class InputImageError(BreastFusionError):
    """An image file that cannot be read or used."""


class CohortError(BreastFusionError):
    """A manifest without the cases a configuration needs (e.g. no US image for a US model)."""


class PartialFailure(BreastFusionError):
    """Outputs were written, but part of the work was not done (rows not run, patients not
    predicted); the message says what."""

    exit_code = ExitCode.PARTIAL


class StorageError(BreastFusionError):
    """A file could not be written because the storage is full (ENOSPC), the file would exceed
    the size a process may write (EFBIG, e.g. `ulimit -f`) or a disk quota is used up (EDQUOT).
    The message names the file and the reason; the file was not written (writes are atomic), so
    rerunning the command once there is space again continues from the completed work."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason

    def __reduce__(self):  # crosses process boundaries (fold worker processes) whole
        return type(self), (str(self), self.path, self.reason)


class RunLockedError(BreastFusionError):
    """A run folder that another live process is writing into (its lock file names it)."""
