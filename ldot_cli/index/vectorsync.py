"""Writing an index's vector files: bringing them up to date with the catalogue after vectors were added or
removed, or rebuilding them. Only the process holding the index's writer lock does this.

The exact tier is one file; the approximate tiers are parts of at most `part_rows` vectors, so adding
vectors rewrites only the last part and removing some only the parts that held them. Every file is written
to a temp file, fsynced and renamed to a name no committed file has, then the new set is committed in one
transaction (`Catalogue.commit_vector_files`): a crash before the commit leaves the old set intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ldot_cli.index.layout import FAISS_FILE, PART_PREFIX, TRAINED_PREFIX, IndexStoreError
from ldot_cli.index.meta import FileRecord, VectorFileSet
from ldot_cli.index.vectorfiles import VectorFiles
from ldot_cli.index.verified import FileDamaged, FileUnrecorded
from models.core import ann
from models.core.errors import LdotWarning
from models.core.fileio import file_stamp, replace_file, sha256_file


class VectorSync:
    """One update of the vector files of an index (`run`)."""

    def __init__(self, files: VectorFiles, ann_mode: str = "auto", memory_budget: int | None = None,
                 part_rows: int | None = None) -> None:
        self.files = files
        self.source = files.source
        self.dir = files.dir
        self.ann_mode = ann_mode
        self.memory_budget = memory_budget
        self.configured_part_rows = part_rows

    @property
    def dim(self) -> int:
        return self.source.dim or 0

    def run(self, threshold: int, kind: str | None = None, rebuild: bool = False) -> str:
        """Add newer vectors, drop removed ones; rebuild from SQLite when asked, when a file is missing or
        damaged, or when the kind changes (``kind`` None: the index's ann mode; "auto": `ann.choose_kind`:
        exact up to ``threshold`` vectors, approximate past it, IVF-PQ past the memory budget). Returns what
        was done."""
        total = self.source.vector_count()
        current = self.source.vector_file_set()
        want = self._kind(kind or self.ann_mode, total, threshold)
        removed = self.source.removed_ids()
        action = None
        if not rebuild and current.kind == want and not current.damage:
            try:
                action = self._update_exact(removed) if want == ann.EXACT else self._update_parts(current, removed)
            except (IndexStoreError, FileNotFoundError, FileDamaged):
                action = None  # damaged or missing: rebuilt from SQLite below
        if action is None:
            action = self._rebuild(want, total, removed, current)
        self.files.collect()
        return action

    def _kind(self, want: str, total: int, threshold: int) -> str:
        if want == "auto":
            want = ann.choose_kind(total, self.dim, threshold, self.memory_budget)
        if want != ann.EXACT and total == 0:
            return ann.EXACT  # nothing to train an approximate index on yet
        if want == ann.PQ and total < ann.pq_min_training(self.dim, total):
            warnings.warn(LdotWarning(
                f"index {self.source.name!r}: IVF-PQ needs at least {ann.pq_min_training(self.dim, total):,} vectors "
                f"to train its codebooks and this index has {total:,}: searched exactly until it has (the ivfpq "
                "choice is kept)"), stacklevel=3)
            return ann.EXACT
        return want

    def part_rows(self, kind: str) -> int:
        """Most vectors in one part of an approximate index (as configured, else `ann.part_rows`)."""
        return self.configured_part_rows or ann.part_rows(kind, self.dim)

    # -- updating in place -----------------------------------------------------------------------
    def _update_exact(self, removed: list[int]) -> str | None:
        """Add newer vectors to the exact index file; None when it must be rebuilt (it cannot drop vectors)."""
        if removed:
            return None
        loaded = self.files.read(mmap=False)
        if loaded is None:
            return None
        index, max_id = loaded
        ids, vectors = self.source.vectors(min_id=max_id)
        ann.add(index, ids, vectors)
        self._commit(ann.EXACT, [self._write(index, FAISS_FILE, 0)], None, removed)
        return f"added {len(ids)}, removed 0"

    def _update_parts(self, current: VectorFileSet, removed: list[int]) -> str | None:
        """Drop removed vectors from the parts that held them and add newer ones to the last part (new parts,
        cloned from the trained empty index, past `part_rows`); only those parts are rewritten, and a damaged
        or missing part is rebuilt alone from its id range."""
        kind, max_id = current.kind or ann.EXACT, current.max_id
        parts: list[FileRecord] = list(current.parts)
        if not parts:
            return None
        generation = self._next_generation(current)
        trained_record = current.trained
        changed: dict[int, Any] = {}
        loaded: dict[str, Any] = {}

        def trained() -> Any:
            nonlocal trained_record
            if "trained" not in loaded:
                loaded["trained"], trained_record = self._trained(trained_record, parts[0], generation)
            return loaded["trained"]

        def part(j: int) -> Any:
            if j not in changed:
                changed[j] = self.files.load(parts[j], mmap=False, trained=trained)
            return changed[j]

        if trained_record is not None:
            self.files.verified.check(trained_record)  # damaged: every part's quantizer is lost, rebuilt whole
        repaired = 0
        for j, record in enumerate(parts):  # a stat each; a part re-hashed only when its stamp changed
            try:
                self.files.verified.check(record)
                if record.get("stamp") is None:
                    part(j)  # the one file of an index written before parts: rewritten as a part
                continue
            except (FileNotFoundError, FileDamaged):
                if trained_record is None:
                    return None  # written before parts existed: rebuilt whole
            stop = parts[j + 1]["first_id"] if j + 1 < len(parts) else max_id + 1
            changed[j] = ann.clone(trained())
            for ids, vectors in self.source.iter_vectors(start=record["first_id"], stop=min(stop, max_id + 1)):
                ann.add(changed[j], ids, vectors)
            repaired += 1
        dropped = self._drop(parts, part, removed, max_id)
        rescored = self._check_rescore() if kind == ann.PQ else ""
        ids, vectors = self.source.vectors(min_id=max_id)
        if kind == ann.PQ and len(ids):
            self.files.rescore.append(ids, vectors)
        self._append(parts, changed, part, trained, ids, vectors, self.part_rows(kind))
        for j, index in sorted(changed.items()):
            parts[j] = self._write(index, _part_name(generation, j), parts[j]["first_id"])
        kept = [p for j, p in enumerate(parts) if p["rows"] or j == len(parts) - 1]  # empty parts go
        self._commit(kind, kept, trained_record, removed, generation if changed else None)
        return (f"added {len(ids)}, removed {dropped}" + (f", repaired {repaired} damaged part(s)" if repaired else "")
                + {"damaged": ", re-scoring vectors rebuilt from the index database (they were damaged)",
                   "recorded": ", re-scoring vectors of an older ldot rewritten from the index database and recorded",
                   "": ""}[rescored]
                + (f" ({len(changed)} of {len(kept)} parts rewritten)" if len(kept) > 1 else ""))

    @staticmethod
    def _drop(parts: list[FileRecord], part: Any, removed: list[int], max_id: int) -> int:
        """Remove the deleted ids from the parts holding them (ids newer than the files never got in)."""
        gone = np.asarray(sorted(i for i in removed if i <= max_id), dtype=np.int64)
        if not len(gone):
            return 0
        starts = np.asarray([p["first_id"] for p in parts], dtype=np.int64)
        slots = np.maximum(np.searchsorted(starts, gone, side="right") - 1, 0)
        dropped = 0
        for j in np.unique(slots).tolist():
            index = part(j)
            before = index.ntotal
            ann.remove(index, gone[slots == j])
            dropped += before - index.ntotal
        return dropped

    @staticmethod
    def _append(parts: list[FileRecord], changed: dict[int, Any], part: Any, trained: Any, ids: np.ndarray,
                vectors: np.ndarray, limit: int) -> None:
        """Add vectors to the last part, starting new parts (clones of the trained index) when it is full."""
        pos = 0
        while pos < len(ids):
            last = len(parts) - 1
            rows_now = changed[last].ntotal if last in changed else parts[last]["rows"]
            if rows_now >= limit:
                parts.append(FileRecord(file="", first_id=int(ids[pos]), rows=0, sha256="", stamp=None))
                changed[len(parts) - 1] = ann.clone(trained())
                continue
            take = min(len(ids) - pos, limit - rows_now)
            ann.add(part(last), ids[pos:pos + take], vectors[pos:pos + take])
            pos += take

    def _check_rescore(self) -> str:
        """Re-scoring files that fail their check are rewritten from SQLite: "damaged", "recorded" (an older
        ldot's, recorded now) or "" (they were fine)."""
        try:
            self.files.rescore.check(self.source.vector_file_set())
            return ""
        except (FileNotFoundError, FileDamaged) as exc:
            self.files.rescore.rewrite()  # every vector SQLite holds, the ones added next included
            return "recorded" if isinstance(exc, FileUnrecorded) else "damaged"

    def _trained(self, record: FileRecord | None, first_part: FileRecord, generation: int) -> tuple[Any, FileRecord]:
        """The trained empty index all parts are cloned from (an index written before parts existed: made from
        its one part, emptied, and written beside it)."""
        if record is not None:
            return self.files.load(record, mmap=False), record
        trained = self.files.load(first_part, mmap=False)  # one file with its own quantizer
        trained.reset()
        return trained, self._write(trained, _trained_name(generation), 0)

    # -- rebuilding from SQLite ------------------------------------------------------------------
    def _rebuild(self, kind: str, total: int, removed: list[int], current: VectorFileSet) -> str:
        factory = ann.factory_string(kind, total, self.dim)
        if kind == ann.EXACT:
            ids, vectors = self.source.vectors()
            record = self._write(ann.build(ids, vectors, ann.EXACT), FAISS_FILE, 0)
            self._commit(kind, [record], None, removed, factory=factory, nprobe=None, recall=None)
            return f"built {kind} index of {len(ids)} vectors"
        generation = self._next_generation(current)
        parts, trained_record, nprobe, recall = self._build_parts(kind, total, generation)
        self._commit(kind, parts, trained_record, removed, generation, factory=factory, nprobe=nprobe, recall=recall)
        return f"built {kind} index of {sum(p['rows'] for p in parts)} vectors" + (
            f" in {len(parts)} parts" if len(parts) > 1 else "")

    def _build_parts(self, kind: str, total: int, generation: int
                     ) -> tuple[list[FileRecord], FileRecord, int | None, float | None]:
        """Train one empty IVF or OPQ + IVF-PQ index on a spread sample, then stream every vector from SQLite
        into clones of it, `part_rows` a part, each part written when full (one part in RAM at a time). IVF-PQ
        also writes the fp16 re-scoring files beside them. nprobe is then tuned once over all the parts."""
        size = ann.pq_training_size(total) if kind == ann.PQ else 64 * ann.ivf_cells(total)
        sample = self.source.sample_vectors(size)[1]
        if kind == ann.PQ and len(sample) < ann.pq_min_training(self.dim, total):  # ids with gaps: the first ones
            sample = self.source.first_vectors(size)[1]
        trained = ann.train_empty(kind, self.dim, total, sample)
        trained_record = self._write(trained, _trained_name(generation), 0)
        limit = self.part_rows(kind)
        parts: list[FileRecord] = []
        state: dict[str, Any] = {"index": ann.clone(trained), "first": 0}

        def flush() -> None:
            parts.append(self._write(state["index"], _part_name(generation, len(parts)), state["first"]))

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for ids, vectors in self.source.iter_vectors():
                pos = 0
                while pos < len(ids):
                    if state["index"].ntotal >= limit:
                        flush()
                        state["index"], state["first"] = ann.clone(trained), int(ids[pos])
                    take = min(len(ids) - pos, limit - state["index"].ntotal)
                    ann.add(state["index"], ids[pos:pos + take], vectors[pos:pos + take])
                    pos += take
                yield ids, vectors

        if kind == ann.PQ:
            self.files.rescore.write(chunks())
        else:
            for _ in chunks():
                pass
        flush()
        del state["index"]
        if not total:
            return parts, trained_record, None, None
        files = dataclasses.replace(self.source.vector_file_set(), kind=kind, parts=tuple(parts),
                                    trained=trained_record, nprobe=None)
        index = self.files.open(files, mmap=True)
        queries = self.source.sample_vectors(ann.RECALL_QUERIES)[1]
        nprobe, recall = ann.tune_nprobe(index, self.source.iter_vectors, queries)
        return parts, trained_record, nprobe, recall

    # -- files and the commit --------------------------------------------------------------------
    def _next_generation(self, current: VectorFileSet) -> int:
        """One past the newest generation recorded or on disk (a damaged record cannot name it)."""
        on_disk = [int(m.group(1)) for p in self.dir.iterdir()
                   if (m := re.match(r"vectors\.(?:part|trained)-(\d+)", p.name))]
        return max([current.generation, *on_disk]) + 1

    def _write(self, index: Any, name: str, first_id: int) -> FileRecord:
        """Write one FAISS file atomically (temp, fsync, rename); its record with the stamp its hash holds for."""
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        try:
            ann.write(index, str(tmp), without_quantizer=name.startswith(PART_PREFIX))  # parts share the trained one
            digest = sha256_file(tmp)
            replace_file(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)
        return FileRecord(file=name, first_id=int(first_id), rows=int(index.ntotal), sha256=digest,
                          stamp=file_stamp(self.dir / name))

    def _commit(self, kind: str, parts: list[FileRecord], trained: FileRecord | None, removed: list[int],
                generation: int | None = None, **tuned: Any) -> None:
        """Record the new set of files (``tuned``: factory, nprobe and recall of a rebuild; else kept)."""
        current = self.source.vector_file_set()
        listing = json.dumps(parts, sort_keys=True)
        rescore = current.rescore_text if kind == ann.PQ else ""  # new re-scoring rows: searchers reload too
        token = hashlib.sha256((listing + json.dumps(trained, sort_keys=True) + rescore).encode()).hexdigest()
        files = dataclasses.replace(
            current, kind=kind, token=token, parts=tuple(parts), trained=trained, rows=sum(p["rows"] for p in parts),
            max_id=self.source.max_vector_id(), written=time.time(), damage=None,
            generation=current.generation if generation is None else generation,
            **({"factory": tuned["factory"], "nprobe": tuned["nprobe"], "recall_at_10": tuned["recall"]}
               if tuned else {}))
        self.source.commit_vector_files(files, removed)


def _part_name(generation: int, number: int) -> str:
    return f"{PART_PREFIX}{generation:06d}-{number:05d}.faiss"


def _trained_name(generation: int) -> str:
    return f"{TRAINED_PREFIX}{generation:06d}.faiss"
