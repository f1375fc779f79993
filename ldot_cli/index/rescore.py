"""IVF-PQ's fp16 re-scoring files (``vectors.f16`` and ``vectors.f16.ids``): append-only copies of the vectors,
memory-mapped by searchers to re-score the top candidates exactly.

Each appended segment's sha256 (data and ids bytes) and the files' stamps are recorded in the meta
(`meta.RescoreRecord`); the files are checked like the FAISS files: a stat when the stamps match, else every
segment re-hashed once (then remembered in ``.verified.json``). Damaged ones are rewritten from SQLite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np

from ldot_cli.index.meta import RescoreRecord, RescoreSegment, VectorFileSet, VectorSource
from ldot_cli.index.verified import FileDamaged, FileUnrecorded, VerifiedFiles
from models.core import ann
from models.core.fileio import file_stamp, replace_file, sha256_range


class RescoreFiles:
    def __init__(self, catalogue: VectorSource, verified: VerifiedFiles) -> None:
        self.catalogue = catalogue
        self.verified = verified
        self.data = catalogue.dir / ann.RESCORE_FILE
        self.ids = catalogue.dir / ann.RESCORE_IDS

    def check(self, files: VectorFileSet) -> int:
        """The committed rows, once the files match their record. Raises FileNotFoundError, `FileUnrecorded` (an
        older ldot recorded none: rewritten once from SQLite) or `FileDamaged` (too short, a segment differs)."""
        rows, dim = files.rescore_rows, self.catalogue.dim or 0
        if not files.rescore_text:
            raise FileUnrecorded(self.data)
        record = files.rescore
        if record is None or record.rows != rows:
            raise FileDamaged(self.data)
        stamps = [file_stamp(self.data), file_stamp(self.ids)]
        if stamps == record.stamps:
            return rows
        if stamps[0][0] < rows * dim * 2 or stamps[1][0] < rows * 8:
            raise FileDamaged(self.data if stamps[0][0] < rows * dim * 2 else self.ids)
        token = hashlib.sha256(json.dumps(list(record.segments), sort_keys=True).encode()).hexdigest()
        if self.verified.matched(ann.RESCORE_FILE, stamps, token):
            return rows
        for g in record.segments:
            start, stop = g["start"], g["start"] + g["rows"]
            if sha256_range(self.data, start * dim * 2, stop * dim * 2) != g["data"]:
                raise FileDamaged(self.data)
            if sha256_range(self.ids, start * 8, stop * 8) != g["ids"]:
                raise FileDamaged(self.ids)
        self.verified.remember(ann.RESCORE_FILE, stamps, token)
        return rows

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append the vectors newer than the last committed row (a run that died before its commit may have
        appended some already: they are written over) and record the new segment."""
        files = self.catalogue.vector_file_set()
        rows = files.rescore_rows
        fresh = ids > self.last_id(rows)
        if not fresh.any():
            return
        segments = [g for g in (files.rescore.segments if files.rescore else ()) if g["start"] + g["rows"] <= rows]
        new_rows, data_sha, ids_sha = ann.write_rescore_vectors(self.data, self.ids, [(ids[fresh], vectors[fresh])],
                                                                rows)
        self._record(new_rows, [*segments, RescoreSegment(start=rows, rows=new_rows - rows, data=data_sha,
                                                          ids=ids_sha)])

    def write(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Write the files anew from ``chunks`` (temp files renamed over the old: readers keep their mapping)
        and record them."""
        data, ids = self.data.with_name(f".{self.data.name}.tmp"), self.ids.with_name(f".{self.ids.name}.tmp")
        data.unlink(missing_ok=True)
        ids.unlink(missing_ok=True)
        rows, data_sha, ids_sha = ann.write_rescore_vectors(data, ids, chunks, 0)
        replace_file(data, self.data)
        replace_file(ids, self.ids)
        self._record(rows, [RescoreSegment(start=0, rows=rows, data=data_sha, ids=ids_sha)])

    def rewrite(self) -> None:
        """Damaged or unrecorded files: rewritten from every vector in SQLite."""
        self.write(self.catalogue.iter_vectors())

    def _record(self, rows: int, segments: list[RescoreSegment]) -> None:
        stamps = [file_stamp(self.data), file_stamp(self.ids)]
        self.catalogue.record_rescore(RescoreRecord(rows, tuple(g for g in segments if g["rows"]), stamps))

    def last_id(self, rows: int) -> int:
        """The id of the last committed row (0 when none)."""
        if rows <= 0:
            return 0
        with open(self.ids, "rb") as handle:
            handle.seek((rows - 1) * 8)
            data = handle.read(8)
        return int(np.frombuffer(data, dtype="<i8")[0]) if len(data) == 8 else 0
