"""User-facing errors: one line, names the file or field, says how to fix it; the CLI exits 2."""

CHECK_FAILED_EXIT = 3  # exit code of a check that ran and found a difference (fbnas quantize compare | onnx)


class FbnasError(Exception):
    """An error caused by the user's input (config, file, data). Printed as one line, exit code 2."""


class ConfigError(FbnasError):
    """A malformed or invalid config, search space, device or architecture file."""


class DataError(FbnasError):
    """A dataset that cannot be found or read."""


class LatencyTableError(FbnasError):
    """A latency table that is missing, malformed or lacks entries."""


class CheckpointError(FbnasError):
    """A checkpoint or weights file that cannot be read or does not match."""


class NonFiniteLossError(FbnasError):
    """The loss became inf or nan."""


class DistributedError(FbnasError):
    """A multi-process run that cannot start or lost a rank (rendezvous, timeout, a rank without a GPU)."""
