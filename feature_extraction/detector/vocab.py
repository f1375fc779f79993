"""The detector's Visual Genome object vocabulary: class id (0..1599, background excluded) -> its name.

The file (``objects_vocab.txt``, one class a line, synonyms after commas, e.g. ``tennis racket,tennis racquet``)
lives beside the detector's weights; `ldot models download butd-r101-vg` fetches it. A decomposed model copies the
names into its config, so encoding needs no detector files.
"""

from __future__ import annotations

from pathlib import Path

from feature_extraction.errors import DetectorError
from models.core.errors import option
from models.hub.catalogue import DEFAULT_DETECTOR, OBJECT_VOCAB_FILE

NUM_OBJECTS = 1600


def read_object_vocab(path: str | Path) -> tuple[str, ...]:
    """The names of an ``objects_vocab.txt`` (the first synonym of each line), in class order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DetectorError(f"cannot read the object vocabulary {path} ({exc.strerror or exc})") from None
    names = tuple(line.split(",")[0].strip() for line in lines if line.strip())
    if not names or any(not n for n in names):
        raise DetectorError(f"{path} is not an object vocabulary (one class name a line)")
    return names


def object_vocab(detector: str | Path = DEFAULT_DETECTOR) -> tuple[str, ...]:
    """The object names of a detector in the cache (or a detector directory / vocabulary file)."""
    from models.core.home import models_dir

    path = Path(detector).expanduser()
    if not path.exists():
        path = models_dir() / str(detector)
    if path.is_dir():
        path = path / OBJECT_VOCAB_FILE
    if not path.is_file():
        raise DetectorError(f"no object vocabulary at {path}: run `ldot models download {detector}` (it fetches "
                            f"{OBJECT_VOCAB_FILE} beside the weights), or train with {option('no_tags')}")
    return read_object_vocab(path)
