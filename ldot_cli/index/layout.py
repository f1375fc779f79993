"""What lives in an index's folder, where index folders are, and the errors an index on disk raises.

Layout of ``<home>/indexes/<name>/``::

    index.sqlite        the catalogue (`catalogue.Catalogue`), WAL-mode SQLite and the source of truth: the
                        index's meta (`meta.IndexMeta`), every file seen (path, size, mtime, content hash,
                        status, skip reason, vector id, time) and every vector (float32 blob, keyed by content hash)
    vectors.faiss       the exact tier: FAISS inner-product index over the vectors, ids = vector ids
    vectors.part-G-N.faiss  the approximate tiers (IVF, IVF-PQ): parts over contiguous id ranges, at most
                        `part_rows` vectors each, all clones of vectors.trained-G.faiss (the trained empty
                        index, whose coarse quantizer they share: it is not stored in them), searched
                        together by FAISS's IndexShardsIVF. G is the generation that wrote the file: a new
                        part never overwrites a committed one.
    vectors.f16(.ids)   IVF-PQ: fp16 copies of the vectors for exact re-scoring, memory-mapped; append-only,
                        the sha256 of each appended segment and the files' stamps recorded in the meta
                        (`rescore.RescoreFiles`), checked like the FAISS files (a damaged one is rewritten
                        from SQLite)
    .verified.json      (size, mtime, inode, device) of each file when its sha256 last matched
                        (`verified.VerifiedFiles`)
    regions/            region features for re-ranking (UNITER image-DB layout, keyed by content hash)
    .lock, .lock.info   held by the one process updating the index, and who that is (`lock.writer_lock`)

The FAISS files are a checksummed cache of the catalogue (`vectorfiles.VectorFiles` reads them,
`vectorsync.VectorSync` writes them): each is written to a temp file, fsynced and renamed into place; the set
of files with each one's sha256, rows and stamp is recorded in the meta in one transaction, and each file is
checked before FAISS reads it (re-hashed only when its stamp changed; a damaged one is rebuilt from SQLite).

Crash safety: each batch (vectors + file rows) is one SQLite transaction, so kill -9 loses at most the
batch in flight. Vector ids come from AUTOINCREMENT and are never reused: vectors newer than the FAISS
files (``id > max_id``) are searched by brute force until the next flush, so searches stay complete and
correct while an index is being updated or after a crash.
"""

from __future__ import annotations

from pathlib import Path

from models.core.errors import LdotError
from models.core.home import indexes_dir

DB_FILE = "index.sqlite"
FAISS_FILE = "vectors.faiss"  # the exact tier's one file
PART_PREFIX = "vectors.part-"  # approximate tiers: vectors.part-<generation>-<n>.faiss, one per id range
TRAINED_PREFIX = "vectors.trained-"  # the trained empty index every part is cloned from
VERIFIED_FILE = ".verified.json"  # file -> (size, mtime, inode, device) stamp when its sha256 last matched
REGIONS_DIR = "regions"
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.info"  # who holds the lock: pid, host, command, since (JSON)
DEFAULT_PRESET = "uniter"  # the box preset of an index's region features unless `ldot index --preset` says
# Past this many vectors an index switches to approximate search (IVF), unless told otherwise.
ANN_THRESHOLD = 250_000


class IndexStoreError(LdotError):
    """An index is missing, damaged, from another model or from a newer ldot."""


class IndexUnrecorded(IndexStoreError):
    """A vector file an older ldot wrote without a checksum: rewritten from SQLite once, which is no damage."""


def index_path(name: str) -> Path:
    """The folder of the index called ``name`` (a checked name: it never leaves the indexes folder)."""
    from models.hub.installed import check_name

    return indexes_dir() / check_name(name, "index")


def rebuild_hint(name: str) -> str:
    return f"rebuild it with `ldot index FOLDER --name {name} --reindex`"


def damaged_index(directory: Path, problem: object) -> IndexStoreError:
    """The error for an index whose database cannot be trusted, naming the file and the way to rebuild it."""
    name = directory.name
    return IndexStoreError(f"index {name!r} is damaged ({directory / DB_FILE}: {problem}): {rebuild_hint(name)} "
                           f"(or remove it: `ldot index rm {name}`)")
