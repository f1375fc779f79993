"""The product version, in the lowest layer so that every file ldot writes can record it."""

__version__ = "0.1.0"
