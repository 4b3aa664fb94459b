"""The project's own error types: each carries a one-line, user-facing message."""


class BreastFusionError(Exception):
    """Base class. The CLI prints its message as one line (no traceback unless --debug)."""


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
