"""An index's meta, typed: what the index holds (`IndexMeta`) and the set of vector files it committed
(`VectorFileSet`).

SQLite keeps the meta as key/value text rows, the format every ldot since index format 1 reads and writes; this
module is the one place that knows the keys. `IndexMeta.from_rows` checks every value once, when the index is
opened: a value that is not what its key holds means a damaged index, named with the way to rebuild it. The
vector-file record is another matter: it describes a cache of the catalogue, so a damaged one is no error but a
reason to rebuild the files (`VectorFileSet.damage`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from ldot_cli.index.layout import DEFAULT_PRESET, FAISS_FILE, IndexStoreError, damaged_index

if TYPE_CHECKING:
    import numpy as np

FORMAT_VERSION = 1  # of the index folder; an index written by a newer format is refused
ANN_MODES = ("auto", "exact", "ivf", "ivfpq")  # `ldot index --ann`: auto, or one of `models.core.ann.KINDS`
REGION_MODES = ("kept", "none")  # whether the index keeps region features (None: an older index, which does)
MAX_DIM = 65_536


class FileRecord(TypedDict):
    """One committed vector file: its name in the index folder, the first vector id it may hold, its rows, its
    sha256 and the (size, mtime_ns, inode, device) stamp the hash holds for (None: hash whenever opened)."""

    file: str
    first_id: int
    rows: int
    sha256: str
    stamp: list[int] | None


class RescoreSegment(TypedDict):
    """Rows appended to the fp16 re-scoring files in one go, with the sha256 of their data and ids bytes."""

    start: int
    rows: int
    data: str
    ids: str


@dataclass(frozen=True)
class RescoreRecord:
    """The committed rows of IVF-PQ's re-scoring files, their segments and the files' stamps."""

    rows: int
    segments: tuple[RescoreSegment, ...]
    stamps: list[list[int]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> RescoreRecord | None:
        """The record written as ``text``; None when there is none or it is not one (segments must tile the rows)."""
        try:
            data = json.loads(text or "null")
            if data is None:
                return None
            rows, start, segments = int(data["rows"]), 0, []
            for g in data["segments"]:
                if int(g["start"]) != start or int(g["rows"]) < 0 or not isinstance(g["data"], str) \
                        or not isinstance(g["ids"], str):
                    return None
                segments.append(RescoreSegment(start=int(g["start"]), rows=int(g["rows"]), data=g["data"],
                                               ids=g["ids"]))
                start += int(g["rows"])
            stamps = data.get("stamps", [])
            if start != rows or not isinstance(stamps, list):
                return None
            return cls(rows, tuple(segments), stamps)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def to_rows(self) -> dict[str, str]:
        return {"rescore_rows": str(self.rows), "rescore_record": json.dumps(
            {"rows": self.rows, "segments": list(self.segments), "stamps": self.stamps},
            sort_keys=True)}


def _file_record(item: Any) -> FileRecord:
    """A file record read from the meta; its name must stay in the index folder."""
    name = item["file"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
            or not isinstance(item["rows"], int) or not isinstance(item["first_id"], int) \
            or not isinstance(item.get("sha256"), str) or item["rows"] < 0:
        raise ValueError(item)
    stamp = item.get("stamp")
    if stamp is not None and not (isinstance(stamp, list) and all(isinstance(v, int) for v in stamp)):
        raise ValueError(item)
    return FileRecord(file=name, first_id=item["first_id"], rows=item["rows"], sha256=item["sha256"], stamp=stamp)


@dataclass(frozen=True)
class VectorFileSet:
    """The vector files one commit recorded, and how they are searched. ``token`` changes with every commit:
    a searcher that holds another one reloads."""

    kind: str | None = None  # exact | ivf | ivfpq; None before the first commit
    token: str | None = None  # None: no vector files yet
    parts: tuple[FileRecord, ...] = ()
    trained: FileRecord | None = None  # the trained empty index the parts are cloned from (approximate tiers)
    rows: int = 0  # vectors in all parts together
    max_id: int = 0  # the newest vector id the files hold: newer ones are searched from SQLite
    generation: int = 0  # of the newest files written (their names hold it)
    written: float | None = None  # time of the commit
    factory: str | None = None  # the FAISS factory string, for `ldot status`
    nprobe: int | None = None  # the tuned number of cells searched (approximate tiers)
    recall_at_10: float | None = None  # of the tuned nprobe against exact search, on a sample
    rescore_rows: int = 0  # IVF-PQ: committed rows of the re-scoring files
    rescore_text: str = ""  # IVF-PQ: their record as written ("" when an older ldot recorded none)
    damage: str | None = None  # why the record cannot be trusted (the files are then rebuilt from SQLite)

    @property
    def rescore(self) -> RescoreRecord | None:
        return RescoreRecord.parse(self.rescore_text)

    @property
    def committed(self) -> bool:
        return self.token is not None

    def names(self) -> list[str]:
        """The file names this set keeps (parts, the trained index)."""
        return [p["file"] for p in self.parts] + ([self.trained["file"]] if self.trained else [])

    @classmethod
    def from_rows(cls, rows: dict[str, str]) -> VectorFileSet:
        """Read leniently: what cannot be read is recorded as ``damage``, never raised."""
        token = rows.get("faiss_sha256")
        try:
            rescore_rows, rescore_text = int(rows.get("rescore_rows") or 0), rows.get("rescore_record") or ""
        except ValueError:
            rescore_rows, rescore_text = 0, ""  # an unreadable count: the re-scoring files are rewritten
        try:
            listing = rows.get("faiss_parts")
            if listing is None:
                # written before parts existed: one file, hashed whenever it is opened until it is next rewritten
                parts: tuple[FileRecord, ...] = () if token is None else (FileRecord(
                    file=FAISS_FILE, first_id=0, rows=int(rows.get("faiss_rows", "-1")), sha256=token, stamp=None),)
            else:
                parts = tuple(_file_record(p) for p in json.loads(listing))
            trained = _file_record(json.loads(rows["faiss_trained"])) if rows.get("faiss_trained") else None
            return cls(kind=rows.get("faiss_kind") or None, token=token, parts=parts, trained=trained,
                       rows=int(rows.get("faiss_rows") or 0), max_id=int(rows.get("faiss_max_id") or 0),
                       generation=int(rows.get("faiss_generation") or 0),
                       written=float(rows["faiss_written"]) if rows.get("faiss_written") else None,
                       factory=rows.get("faiss_factory") or None,
                       nprobe=int(rows["nprobe"]) if rows.get("nprobe") else None,
                       recall_at_10=float(rows["recall_at_10"]) if rows.get("recall_at_10") else None,
                       rescore_rows=rescore_rows, rescore_text=rescore_text)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return cls(kind=rows.get("faiss_kind") or None, token=token, rescore_rows=rescore_rows,
                       rescore_text=rescore_text, damage=f"unreadable record ({exc})"[:200])

    def to_rows(self) -> dict[str, str]:
        """The rows a commit writes (the re-scoring record is written apart, by `RescoreRecord.to_rows`)."""
        return {"faiss_kind": self.kind or "", "faiss_sha256": self.token or "",
                "faiss_parts": json.dumps(list(self.parts), sort_keys=True),
                "faiss_trained": json.dumps(self.trained) if self.trained else "",
                "faiss_rows": str(self.rows), "faiss_max_id": str(self.max_id),
                "faiss_generation": str(self.generation), "faiss_written": str(self.written or ""),
                "faiss_factory": self.factory or "", "nprobe": "" if self.nprobe is None else str(self.nprobe),
                "recall_at_10": "" if self.recall_at_10 is None else f"{self.recall_at_10:.4f}"}


# Keys of the index's own meta: its type, and the range or choices a value must be in.
_INTS = {"format_version": (1, 1 << 31), "dim": (1, MAX_DIM), "memory_budget": (1, 1 << 62),
         "part_rows": (1, 1 << 40)}
_CHOICES = {"ann_mode": ANN_MODES, "regions": REGION_MODES}


@dataclass(frozen=True)
class IndexMeta:
    """What an index holds and how it was built, checked once when it is opened."""

    format_version: int = FORMAT_VERSION
    created: float | None = None
    model: str | None = None  # the bi-encoder's name or folder, as given
    model_fingerprint: str | None = None  # of its weights: another name for the same model is accepted
    detector: str | None = None  # region models (and dual encoders that keep regions): the box detector
    preset: str | None = None  # the box preset of the region features
    regions: str | None = None  # "kept" | "none" (None: an older index, which keeps them)
    dim: int | None = None  # of the vectors; None until the first is stored
    ann_mode: str = "auto"  # the vector index asked for: auto, exact, ivf or ivfpq
    memory_budget: int | None = None  # bytes the vector index may take in RAM (None: half the machine's)
    part_rows: int | None = None  # most vectors in one part of an approximate index (None: `ann.part_rows`)
    vector_files: VectorFileSet = field(default_factory=VectorFileSet)

    @property
    def keeps_regions(self) -> bool:
        return self.regions != "none"

    @property
    def box_preset(self) -> str:
        return self.preset or DEFAULT_PRESET

    @classmethod
    def from_rows(cls, rows: dict[str, str], directory: Path) -> IndexMeta:
        """Every value checked: raises `IndexStoreError` naming the key, the value and the way to rebuild."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = rows.get(f.name)
            if f.name == "vector_files" or not text:
                continue
            values[f.name] = _parse(f.name, text, directory)
        return cls(**values, vector_files=VectorFileSet.from_rows(rows))

    @staticmethod
    def rows(directory: Path, **values: Any) -> dict[str, str]:
        """The meta rows that record ``values`` (fields of `IndexMeta`, each checked as when read)."""
        known = {f.name for f in fields(IndexMeta)} - {"vector_files"}
        out = {}
        for key, value in values.items():
            if key not in known:
                raise TypeError(f"IndexMeta has no field {key!r}")
            text = "" if value is None else str(value)
            if value is not None:
                _parse(key, text, directory)
            out[key] = text
        return out


def _parse(key: str, text: str, directory: Path) -> Any:
    if key in _INTS:
        low, high = _INTS[key]
        try:
            number = int(text)
        except ValueError:
            raise damaged_index(directory, f"{key} {text[:40]!r} is not a number") from None
        if not low <= number <= high:
            raise damaged_index(directory, f"{key} {number} is out of range ({low}..{high})")
        return number
    if key in _CHOICES and text not in _CHOICES[key]:
        raise damaged_index(directory, f"{key} {text[:40]!r} is not one of {', '.join(_CHOICES[key])}")
    if key == "created":
        try:
            return float(text)
        except ValueError:
            raise damaged_index(directory, f"{key} {text[:40]!r} is not a time") from None
    return text


def newer_format(name: str, version: int) -> IndexStoreError:
    from models.core.errors import option

    return IndexStoreError(f"index {name!r} was written by a newer ldot (format {version}; this ldot reads "
                           f"{FORMAT_VERSION}): upgrade ldot, or rebuild it ({option('reindex')})")


class VectorSource(Protocol):
    """What the vector files read from (and record in) the catalogue."""

    dir: Path
    name: str

    @property
    def dim(self) -> int | None: ...
    def vector_file_set(self) -> VectorFileSet: ...
    def vector_token(self) -> str | None: ...
    def commit_vector_files(self, files: VectorFileSet, removed: Sequence[int]) -> None: ...
    def record_rescore(self, record: RescoreRecord) -> None: ...
    def vector_count(self) -> int: ...
    def max_vector_id(self) -> int: ...
    def removed_ids(self) -> list[int]: ...
    def vectors(self, min_id: int = 0) -> tuple[np.ndarray, np.ndarray]: ...
    def iter_vectors(self, chunk: int = 50_000, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def sample_vectors(self, count: int) -> tuple[np.ndarray, np.ndarray]: ...
    def first_vectors(self, count: int) -> tuple[np.ndarray, np.ndarray]: ...
