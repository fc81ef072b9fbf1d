"""fedcare: federated learning for hospitals (the ``fedcare`` command lives in ``cli``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedcare")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
