"""Reading an index's vector files: the committed FAISS files, each verified against its record before FAISS
reads it, opened as one searchable index (`VectorFiles.read`). Writing them is `vectorsync.VectorSync`'s job.

What the files need from the catalogue is the `meta.VectorSource` interface: the committed record of the files and
the vectors themselves (SQLite is the source of truth; the files are a checksummed cache of it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldot_cli.index.layout import FAISS_FILE, PART_PREFIX, TRAINED_PREFIX, IndexStoreError, IndexUnrecorded
from ldot_cli.index.meta import FileRecord, VectorFileSet, VectorSource
from ldot_cli.index.rescore import RescoreFiles
from ldot_cli.index.verified import FileDamaged, FileUnrecorded, VerifiedFiles
from models.core import ann


class VectorFiles:
    """The vector files of one index."""

    def __init__(self, source: VectorSource) -> None:
        self.source = source
        self.dir = source.dir
        self.verified = VerifiedFiles(source.dir)
        self.rescore = RescoreFiles(source, self.verified)

    def parts(self) -> list[FileRecord]:
        """The committed files of the vector index: (file, first_id, rows, sha256, stamp) each; [] when none."""
        files = self.source.vector_file_set()
        self._raise_damage(files)
        return list(files.parts)

    def paths(self) -> list[Path]:
        """Every file of the vector index (parts, the trained empty index, the fp16 re-scoring files)."""
        files = self.source.vector_file_set()
        self._raise_damage(files)
        names = files.names() + ([ann.RESCORE_FILE, ann.RESCORE_IDS] if files.kind == ann.PQ else [])
        return [self.dir / n for n in names if (self.dir / n).is_file()]

    def _raise_damage(self, files: VectorFileSet) -> None:
        if files.damage:
            raise IndexStoreError(f"the vector file list of index {self.source.name!r} is damaged ({files.damage})")

    def load(self, record: FileRecord, mmap: bool, trained: Callable[[], Any] | None = None) -> Any:
        """A verified FAISS file; a part is given the coarse quantizer of ``trained()`` (it is stored without)."""
        import faiss

        path = self.verified.check(record)
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            raise FileDamaged(path) from None
        if index.ntotal != record["rows"]:
            raise FileDamaged(path)
        if record["file"].startswith(PART_PREFIX):
            if trained is None:
                raise FileDamaged(path)  # a part needs the trained index's quantizer
            ann.attach_quantizer(index, trained())
        return index

    def open(self, files: VectorFileSet, mmap: bool, parts: Sequence[FileRecord] | None = None) -> ann.Searchable:
        """The parts (by default the committed ones) as one index (`ann.shards`: they share the trained index's
        coarse quantizer), with the tuned nprobe; IVF-PQ wrapped for exact re-scoring."""
        cache: list[Any] = []

        def trained() -> Any:
            if not cache:
                if files.trained is None:
                    raise FileDamaged(self.dir)
                cache.append(self.load(files.trained, mmap=False))
            return cache[0]

        loaded = [self.load(p, mmap, trained) for p in (files.parts if parts is None else parts)]
        index = ann.shards([p for p in loaded if p.ntotal] or loaded[:1])
        if files.nprobe:
            ann.set_nprobe(index, files.nprobe)
        if files.kind != ann.PQ:
            return index
        rows = self.rescore.check(files)
        try:
            return ann.open_rescored(index, self.dir, rows, self.source.dim or 0)
        except ValueError:  # shorter than its rows (changed after the check)
            raise FileDamaged(self.rescore.data) from None

    def read(self, attempts: int = 3, mmap: bool = True) -> tuple[Any, int] | None:
        """The verified vector index (its parts searched together) and the newest vector id it holds; None
        when there is none yet.

        Raises `IndexStoreError` when a file does not match its recorded checksum (damaged: the caller
        rebuilds it from SQLite), `IndexUnrecorded` for re-scoring files an older ldot wrote without one.
        A concurrent writer replacing files is told apart by re-reading.
        """
        for attempt in range(attempts):
            files = self.source.vector_file_set()
            if not files.committed:
                return None
            self._raise_damage(files)
            try:
                index = self.open(files, mmap)
                if index.ntotal != files.rows:
                    raise FileDamaged(self.dir)
                return index, files.max_id
            except FileUnrecorded:
                raise IndexUnrecorded(f"the re-scoring vectors of index {self.source.name!r} were written by an "
                                      "older ldot that recorded no checksum") from None
            except (FileNotFoundError, FileDamaged):
                pass
            if self.source.vector_token() == files.token:  # nobody rewrote it meanwhile: damaged
                break
            time.sleep(0.05 * (attempt + 1))
        raise IndexStoreError(f"the vector file of index {self.source.name!r} is damaged or truncated")

    def collect(self) -> None:
        """Delete vector files the committed set no longer names (replaced parts, a crash's leftovers)."""
        files = self.source.vector_file_set()
        if files.damage:
            return  # nothing is known to be unused
        keep = set(files.names())
        if files.kind == ann.PQ:
            keep.add(ann.RESCORE_FILE)  # its verified stamp (the file itself is not a FAISS file)
        for path in self.dir.iterdir():
            name = path.name
            if name not in keep and (name == FAISS_FILE or (name.startswith((PART_PREFIX, TRAINED_PREFIX))
                                                            and name.endswith(".faiss"))):
                path.unlink(missing_ok=True)
        self.verified.keep_only(keep)
