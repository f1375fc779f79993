"""ldot: real-time image-text retrieval with LightningDOT (command-line application)."""

from models.core.version import __version__

__all__ = ["__version__"]
