"""The UNITER/LightningDOT text DB (LMDB of lz4-compressed msgpack records keyed by sentence id, with
``meta.json``, ``txt2img.json`` and ``img2txts.json`` beside it): read-only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldot_cli.data.errors import DatasetError, load_json

if TYPE_CHECKING:
    import lmdb


class UniterTextDB:
    """Read a UNITER / LightningDOT text DB (LMDB of ``lz4(msgpack(dict))`` keyed by sentence id).

    ``db.ids`` (``id2len.json`` order), ``db[id]`` -> the record dict, ``db.meta`` (``meta.json``),
    ``db.txt2img`` / ``db.img2txts`` (the sidecars), ``db.input_ids(id)`` -> ``[CLS] ids [SEP]`` as the
    official ``combine_inputs`` builds it. Records are decoded by plain msgpack: nothing is unpickled.
    """

    def __init__(self, db_dir: str | Path) -> None:
        self.db_dir = Path(db_dir)
        if not (self.db_dir / "data.mdb").is_file():
            raise DatasetError(f"{self.db_dir} is not a UNITER text DB (no data.mdb: expected an LMDB folder "
                               "itm_<set>_<split>.db with meta.json, id2len.json, txt2img.json)")
        self.meta = self._sidecar("meta.json", dict, "the DB's meta: {CLS, SEP, v_range, ...}")
        for name in ("CLS", "SEP"):
            if not isinstance(self.meta.get(name), int):
                raise DatasetError(f"{self.db_dir / 'meta.json'} lacks the integer {name!r} token id")
        id2len = self._sidecar("id2len.json", dict, "{sentence id: number of word-pieces}")
        self.ids: list[str] = [str(k) for k in id2len]
        self.txt2img: dict[str, str] = self._sidecar("txt2img.json", dict, "{sentence id: image file name}")
        img2txts = self.db_dir / "img2txts.json"
        self.img2txts: dict[str, list[str]] | None = (
            self._sidecar("img2txts.json", dict, "{image file name: [sentence ids]}") if img2txts.exists() else None)
        self._env: lmdb.Environment | None = None

    def _sidecar(self, name: str, kind: type, what: str) -> Any:
        value = load_json(self.db_dir / name, what)
        if not isinstance(value, kind):
            raise DatasetError(f"{self.db_dir / name} holds a {type(value).__name__}; expected {what}")
        return value

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            import lmdb

            try:
                self._env = lmdb.open(str(self.db_dir), readonly=True, create=False, lock=False, readahead=False)
            except lmdb.Error as exc:
                raise DatasetError(f"cannot open the text DB {self.db_dir}: {exc}") from None
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> UniterTextDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, sent_id: str) -> dict[str, Any]:
        import lz4.frame
        import msgpack

        with self.env.begin(buffers=False) as txn:
            raw = txn.get(str(sent_id).encode("utf-8"))
        if raw is None:
            raise DatasetError(f"text DB {self.db_dir} lists sentence {sent_id!r} in id2len.json but has no record")
        try:
            record = msgpack.unpackb(lz4.frame.decompress(raw), raw=False, strict_map_key=False)
        except Exception as exc:  # lz4 and msgpack raise their own types
            raise DatasetError(f"text DB {self.db_dir}: record {sent_id!r} is not lz4-compressed msgpack "
                               f"({exc})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"text DB {self.db_dir}: record {sent_id!r} is not a dict")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}

    def input_ids(self, sent_id: str) -> list[int]:
        """``[CLS] word-pieces [SEP]`` of a sentence, as the official ``combine_inputs``."""
        return [self.meta["CLS"], *self[sent_id]["input_ids"], self.meta["SEP"]]


def read_uniter_text_db(db_dir: str | Path) -> tuple[list[str], list[tuple[str, str, int, tuple[int, ...]]], dict]:
    """Image names (UNITER keys) and captions of a UNITER text DB, plus its meta.json.

    Images are ordered as ``img2txts.json`` lists them (then by first appearance); captions as
    ``id2len.json``. Each caption is ``(sentence id, raw text, image index, word-piece ids)``.
    """
    with UniterTextDB(db_dir) as db:
        rows = []
        for sent_id in db.ids:
            record = db[sent_id]
            ids, fname = record.get("input_ids"), record.get("img_fname") or db.txt2img.get(sent_id)
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise DatasetError(f"text DB {db.db_dir}: record {sent_id!r} has no integer 'input_ids' list")
            if not isinstance(fname, str):
                raise DatasetError(f"text DB {db.db_dir}: record {sent_id!r} names no image ('img_fname')")
            text = record.get("raw") or record.get("sent") or record.get("caption") or ""
            rows.append((sent_id, str(text).strip(), fname, tuple(ids)))
        order = list(db.img2txts or [])
    seen = {name: i for i, name in enumerate(dict.fromkeys([*order, *(r[2] for r in rows)]))}
    names = list(seen)
    if not rows:
        raise DatasetError(f"text DB {db_dir} holds no caption (id2len.json is empty)")
    return names, [(sid, text, seen[fname], ids) for sid, text, fname, ids in rows], db.meta
