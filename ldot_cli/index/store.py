"""One named index on disk: its catalogue (SQLite, the source of truth) and its vector files (FAISS, a
checksummed cache of it). The folder's layout is described in `ldot_cli.index.layout`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldot_cli.index.catalogue import Catalogue
from ldot_cli.index.layout import ANN_THRESHOLD
from ldot_cli.index.vectorfiles import VectorFiles


class IndexStore(Catalogue):
    """Open (or create) a named index. Readers and the one writer may use it at the same time."""

    def __init__(self, directory: Path, create: bool = False) -> None:
        super().__init__(directory, create)
        self.vector_files = VectorFiles(self)

    def read_faiss(self, attempts: int = 3, mmap: bool = True) -> tuple[Any, int] | None:
        """The verified vector index and the newest vector id it holds (`VectorFiles.read`)."""
        return self.vector_files.read(attempts, mmap)

    def sync_faiss(self, kind: str | None = None, rebuild: bool = False) -> str:
        """Bring the vector files up to date with the catalogue (`VectorSync.run`); only the holder of the
        index's writer lock may call this. Returns what was done."""
        from ldot_cli.index.vectorsync import VectorSync

        meta = self.reload_meta()
        return VectorSync(self.vector_files, meta.ann_mode, meta.memory_budget, meta.part_rows).run(
            ANN_THRESHOLD, kind, rebuild)
