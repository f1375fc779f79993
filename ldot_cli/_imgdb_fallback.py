"""TEMPORARY stand-in for `feature_extraction.uniter_db.UniterImageDB` (written on the images branch).

INTEGRATION POINT: delete this file once `feature_extraction/uniter_db.py` is merged; `ldot_cli.datasets.
open_image_db` already prefers the real reader. Only what `ldot eval` needs: the ``uniter`` cut
(``feat_th0.2_max100_min10``, uncompressed msgpack or ``_compressed`` npz values), ``nbb`` json, the
read-time cut, ``key in db``, ``db[key].features`` / ``.norm_bb``. Object arrays are refused (msgpack-numpy
would unpickle them).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_DB = "feat_th0.2_max100_min10"
_NBB = "nbb_th0.2_max100_min10.json"


@dataclass
class _Record:
    features: np.ndarray  # (nbb, dim)
    norm_bb: np.ndarray  # (nbb, 6)


def _decode_array(obj: dict) -> Any:
    if b"nd" not in obj:
        return obj
    dtype = np.dtype(obj[b"type"].decode() if isinstance(obj[b"type"], bytes) else obj[b"type"])
    if obj.get(b"kind") in (b"O", b"V") or dtype.kind not in "fiub":
        raise ValueError("feature record holds a non-numeric array: refused")
    data = np.frombuffer(obj[b"data"], dtype=dtype)
    return data.reshape(obj[b"shape"]) if obj[b"nd"] is True else data[0]


class UniterImageDB:
    """Minimal read-only UNITER image DB (``uniter`` cut only)."""

    def __init__(self, img_dir: str | Path, cut: str = "uniter", *, as_float32: bool = True) -> None:
        import lmdb

        if cut != "uniter":
            raise ValueError("the fallback reader only knows the 'uniter' cut")
        self.img_dir = Path(img_dir)
        self.as_float32 = as_float32
        self.compressed = not (self.img_dir / _DB / "data.mdb").is_file()
        path = self.img_dir / (_DB + "_compressed" if self.compressed else _DB)
        if not (path / "data.mdb").is_file():
            raise FileNotFoundError(f"no {_DB} LMDB in {self.img_dir}")
        nbb = self.img_dir / _NBB
        self.name2nbb: dict[str, int] = json.loads(nbb.read_text()) if nbb.is_file() else {}
        self.env = lmdb.open(str(path), readonly=True, create=False, lock=False, readahead=False)

    def close(self) -> None:
        self.env.close()

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or key == "__keys__":
            return False
        with self.env.begin() as txn:
            return txn.get(key.encode("utf-8")) is not None

    def __getitem__(self, key: str) -> _Record:
        import msgpack

        with self.env.begin() as txn:
            raw = txn.get(key.encode("utf-8"))
        if raw is None or key == "__keys__":
            raise KeyError(key)
        if self.compressed:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                dump = {k: npz[k] for k in npz.files}
        else:
            dump = msgpack.unpackb(raw, raw=False, object_hook=_decode_array, strict_map_key=False)
            dump = {(k.decode() if isinstance(k, bytes) else k): v for k, v in dump.items()}
        conf = np.asarray(dump["conf"]).reshape(-1)
        nbb = self.name2nbb.get(key, int(min(100, max(10, int((conf > 0.2).sum())))))
        cast = (lambda a: a.astype(np.float32)) if self.as_float32 else np.asarray
        return _Record(cast(dump["features"][:nbb]), cast(dump["norm_bb"][:nbb]))
