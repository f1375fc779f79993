"""ldot: real-time image-text retrieval with LightningDOT (command-line application)."""

__version__ = "0.1.0"
