"""Small retrieval benchmarks whose recalls are known by construction, in every input layout.

The bi-encoder score matrix S (captions x images) is planted from three value bands:
- "high" cells (50..51): a caption's wrong images placed above its own image;
- own cells (10..11): every caption with its own image;
- "low" cells (0..1): everything else.
So, within any fold of images, a caption's own image has rank = #highs in its row (among the fold's images),
and an image's best caption has rank = #highs in its column (among the fold's other captions).

The planted cross-encoder P scores each caption with its own image very high (image "fixable") or very low
("spoilable"), every other pair in between. Re-ranking the top M then moves a found own image to rank 0 or to
the last candidate slot: again known without ranking anything.

Writers produce the official on-disk formats with lmdb/msgpack/lz4 directly (independently of the code
under test): UNITER text DB, UNITER image DB, Karpathy split file, Multi30K files.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import torch

from models.core.progress import Progress

CLS, SEP = 101, 102
KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------ the plant
@dataclass
class Plant:
    caption_image: np.ndarray  # (n_txt,) image of each caption
    high: np.ndarray  # (n_txt, n_img) bool: S cell in the high band (never a caption's own image)
    scores: np.ndarray  # (n_txt, n_img) S, the bi-encoder's planted dot products
    fixable: np.ndarray  # (n_img,) bool: the cross-encoder loves (True) or hates (False) its true pairs
    cross: np.ndarray  # (n_txt, n_img) P, the cross-encoder's planted scores

    @property
    def n_txt(self) -> int:
        return len(self.caption_image)

    @property
    def n_img(self) -> int:
        return self.high.shape[1]

    def text(self, q: int) -> str:
        return f"caption {q} of image {int(self.caption_image[q])}"

    def token_ids(self, q: int) -> list[int]:
        """Distinct word-piece ids per caption (lengths vary), no [CLS]/[SEP]."""
        return [1000 + q] + [7] * (q % 4)


def make_plant(counts: list[int], row_highs: list[int], seed: int = 0, decay: float = 0.6) -> Plant:
    """``counts[j]`` captions for image j; caption q gets ``row_highs[q % len]`` high cells (capped at
    n_img - 1), drawn with weight ``decay ** j`` so that image ranks spread too (image 0 collects many
    highs, the last images few)."""
    rng = np.random.default_rng(seed)
    caption_image = np.repeat(np.arange(len(counts)), counts)
    n_txt, n_img = len(caption_image), len(counts)
    high = np.zeros((n_txt, n_img), bool)
    weights = decay ** np.arange(n_img)
    for q in range(n_txt):
        others = np.array([j for j in range(n_img) if j != caption_image[q]])
        k = min(row_highs[q % len(row_highs)], len(others))
        p = weights[others] / weights[others].sum()
        high[q, rng.choice(others, size=k, replace=False, p=p)] = True
    noise = rng.permutation(n_txt * n_img).reshape(n_txt, n_img) / (n_txt * n_img)  # distinct, in [0, 1)
    scores = np.where(high, 50 + noise, noise)
    scores[np.arange(n_txt), caption_image] = 10 + noise[np.arange(n_txt), caption_image]
    fixable = np.arange(n_img) % 2 == 0
    cross = 0.4 + 0.2 * rng.permutation(n_txt * n_img).reshape(n_txt, n_img) / (n_txt * n_img)
    own = cross[np.arange(n_txt), caption_image]
    cross[np.arange(n_txt), caption_image] = np.where(fixable[caption_image], 0.9 + own / 10, 0.05 + own / 10)
    return Plant(caption_image, high, scores, fixable, cross)


def expected_ranks(plant: Plant, fold: np.ndarray | None = None, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each fold caption's image, rank of each fold image's best caption), after re-ranking top m."""
    fold = np.arange(plant.n_img) if fold is None else np.asarray(fold)
    in_fold = np.isin(plant.caption_image, fold)
    caps = np.nonzero(in_fold)[0]
    t2i = []
    for q in caps:
        rank = int(plant.high[q, fold].sum())
        if m is not None and rank < m:
            rank = 0 if plant.fixable[plant.caption_image[q]] else min(m, len(fold)) - 1
        t2i.append(rank)
    i2t = []
    for j in fold:
        own = caps[plant.caption_image[caps] == j]
        others = caps[plant.caption_image[caps] != j]
        rank = int(plant.high[others, j].sum())
        if m is not None:
            slots = min(m, len(caps))
            found = int(np.clip(slots - rank, 0, len(own)))
            if found:
                rank = 0 if plant.fixable[j] else slots - found
        i2t.append(rank)
    return np.array(t2i), np.array(i2t)


def expected_recalls(plant: Plant, fold: np.ndarray | None = None, m: int | None = None) -> dict:
    t2i, i2t = expected_ranks(plant, fold, m)
    out = {"text_to_image": {f"r{k}": 100.0 * float(np.mean(t2i < k)) for k in KS},
           "image_to_text": {f"r{k}": 100.0 * float(np.mean(i2t < k)) for k in KS}}
    out["rsum"] = sum(out["text_to_image"].values()) + sum(out["image_to_text"].values())
    return out


def mean_recalls(items: list[dict]) -> dict:
    out = {d: {k: float(np.mean([it[d][k] for it in items])) for k in items[0][d]}
           for d in ("text_to_image", "image_to_text")}
    out["rsum"] = sum(out["text_to_image"].values()) + sum(out["image_to_text"].values())
    return out


# ------------------------------------------------------------------------------------------ planted models
def _rotation(dim: int, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q


class PlantedEncoder:
    """The `BiEncoder` encode_* interface, mapping each caption / image to its planted vector.

    Text vectors are rows of S, image vectors unit vectors, both rotated by one orthogonal matrix: dot
    products are S. Images are recognised by feature[0, 0] (the image index written into the DB).
    """

    def __init__(self, plant: Plant) -> None:
        rot = _rotation(plant.n_img)
        self.text_vectors = plant.scores @ rot  # (n_txt, D)
        self.image_vectors = np.eye(plant.n_img) @ rot  # (n_img, D)
        self.by_text = {plant.text(q): q for q in range(plant.n_txt)}
        self.by_ids = {(CLS, *plant.token_ids(q), SEP): q for q in range(plant.n_txt)}
        self.calls = {"text": 0, "token_ids": 0, "images": 0}

    def encode_text(self, texts, batch_size=256):
        self.calls["text"] += len(texts)
        return torch.tensor(np.stack([self.text_vectors[self.by_text[t]] for t in texts]), dtype=torch.float32)

    def encode_token_ids(self, input_ids, attention_mask=None):
        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        rows = [tuple(int(i) for i in r[m.bool()]) for r, m in zip(ids, mask)]
        self.calls["token_ids"] += len(rows)
        return torch.tensor(np.stack([self.text_vectors[self.by_ids[r]] for r in rows]), dtype=torch.float32)

    def encode_images(self, records, batch_size=64, progress=None):
        self.calls["images"] += len(records)
        out = np.stack([self.image_vectors[int(round(float(r.features[0, 0])))] for r in records])
        if progress is not None:
            progress(Progress("encoding images", len(records), len(records), "images"))
        return torch.tensor(out, dtype=torch.float32)


class PlantedReranker:
    """The re-ranker interface, returning P[caption, image]; counts the pairs it scored."""

    def __init__(self, plant: Plant) -> None:
        self.plant = plant
        self.by_text = {plant.text(q): q for q in range(plant.n_txt)}
        self.pairs = 0

    def score(self, texts, features, norm_bb, mask=None):
        assert len(texts) == len(features) == len(norm_bb)
        self.pairs += len(texts)
        images = [int(round(float(f[0, 0]))) for f in features]
        return torch.tensor([self.plant.cross[self.by_text[t], j] for t, j in zip(texts, images)])


# ------------------------------------------------------------------------------------------ writers
def region_arrays(index: int, n_boxes: int, dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Features whose column 0 holds ``index`` (what the planted models read); random otherwise."""
    rng = np.random.default_rng(seed + index)
    feat = rng.standard_normal((n_boxes, dim)).astype(np.float16)
    feat[:, 0] = index
    x1, y1 = rng.uniform(0, 0.5, n_boxes), rng.uniform(0, 0.5, n_boxes)
    w, h = rng.uniform(0.1, 0.5, n_boxes), rng.uniform(0.1, 0.5, n_boxes)
    norm_bb = np.stack([x1, y1, x1 + w, y1 + h, w, h], axis=1).astype(np.float16)
    conf = np.linspace(0.9, 0.1, n_boxes).astype(np.float16).reshape(-1, 1)
    return {"features": feat, "norm_bb": norm_bb, "conf": conf}


def write_image_db(img_dir: Path, records: dict[str, dict[str, np.ndarray]], nbb: dict[str, int] | None = None) -> Path:
    """A UNITER image DB: LMDB ``feat_th0.2_max100_min10`` of msgpack-numpy dicts + the nbb json."""
    img_dir.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(img_dir / "feat_th0.2_max100_min10"), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, rec in records.items():
            txn.put(key.encode(), msgpack.packb(rec, default=msgpack_numpy.encode, use_bin_type=True))
        txn.put(b"__keys__", json.dumps(list(records)).encode())
    env.close()
    nbb = nbb or {k: len(r["features"]) for k, r in records.items()}
    (img_dir / "nbb_th0.2_max100_min10.json").write_text(json.dumps(nbb))
    return img_dir


def write_text_db(db_dir: Path, rows: list[dict], meta: dict | None = None, img2txts: bool = True) -> Path:
    """A UNITER text DB: LMDB of lz4(msgpack(record)) keyed by sentence id, with its json sidecars."""
    db_dir.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(db_dir), map_size=1 << 26)
    id2len, txt2img, i2t = {}, {}, {}
    with env.begin(write=True) as txn:
        for row in rows:
            sid = str(row["sentid"])
            txn.put(sid.encode(), lz4.frame.compress(msgpack.packb(row, use_bin_type=True)))
            id2len[sid] = len(row["input_ids"])
            txt2img[sid] = row["img_fname"]
            i2t.setdefault(row["img_fname"], []).append(sid)
    env.close()
    meta = meta or {"CLS": CLS, "SEP": SEP, "MASK": 103, "UNK": 100, "v_range": [999, 28996],
                    "toker": "bert-base-cased"}
    for name, value in (("meta", meta), ("id2len", id2len), ("txt2img", txt2img)):
        (db_dir / f"{name}.json").write_text(json.dumps(value))
    if img2txts:
        (db_dir / "img2txts.json").write_text(json.dumps(i2t))
    return db_dir


def flickr_name(j: int) -> str:
    return f"{1000 + j}.jpg"


def flickr_key(j: int) -> str:
    return f"flickr30k_{1000 + j:012d}.npz"


def coco_file(j: int) -> str:
    return f"val2014/COCO_val2014_{500 + j:012d}.jpg"


def coco_key(j: int) -> str:
    return f"coco_val2014_{500 + j:012d}.npz"


def nbb_of(j: int) -> int:
    return 10 + (j % 4)


def uniter_layout(root: Path, plant: Plant, dataset: str = "flickr30k", dim: int = 16) -> Path:
    """``root/txt_db/itm_<set>_test.db`` + ``root/img_db/<flickr30k|coco_val2014>``. Stored regions are two
    more than nbb (the read-time cut must drop them)."""
    key = flickr_key if dataset == "flickr30k" else coco_key
    rows = [{"sentid": 7000 + q, "raw": plant.text(q), "input_ids": plant.token_ids(q),
             "img_fname": key(int(plant.caption_image[q])), "toked_caption": []} for q in range(plant.n_txt)]
    write_text_db(root / "txt_db" / f"itm_{dataset}_test_base-cased.db", rows)
    folder = "flickr30k" if dataset == "flickr30k" else "coco_val2014"
    records = {key(j): region_arrays(j, nbb_of(j) + 2, dim) for j in range(plant.n_img)}
    write_image_db(root / "img_db" / folder, records, {key(j): nbb_of(j) for j in range(plant.n_img)})
    return root


def karpathy_json(plant: Plant, dataset: str = "flickr30k", extra_splits: bool = True) -> dict:
    images = []
    if extra_splits:
        images.append({"filename": "999.jpg", "split": "train", "imgid": 0,
                       "sentences": [{"raw": "a train caption", "tokens": ["a"], "sentid": 1, "imgid": 0}]})
    for j in range(plant.n_img):
        caps = np.nonzero(plant.caption_image == j)[0]
        entry = {"split": "test", "imgid": j + 1,
                 "sentences": [{"raw": plant.text(q) + " ", "tokens": plant.text(q).split(), "sentid": 7000 + int(q),
                                "imgid": j + 1} for q in caps]}
        if dataset == "coco":
            entry.update(filepath="val2014", filename=coco_file(j).split("/")[1], cocoid=500 + j)
        else:
            entry["filename"] = flickr_name(j)
        images.append(entry)
    return {"images": images, "dataset": dataset}


def karpathy_layout(root: Path, plant: Plant, dataset: str = "flickr30k", dim: int = 16) -> Path:
    """``root/dataset_<set>.json`` + the image files (placeholders) in ``flickr30k-images/`` or ``val2014/``,
    and, since the detector is not run here, their features pre-extracted into ldot's feature cache."""
    from ldot_cli.data.features import feature_cache_dir

    root.mkdir(parents=True, exist_ok=True)
    (root / f"dataset_{dataset}.json").write_text(json.dumps(karpathy_json(plant, dataset)))
    folder = root / "flickr30k-images" if dataset == "flickr30k" else root
    files = [flickr_name(j) if dataset == "flickr30k" else coco_file(j) for j in range(plant.n_img)]
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes(b"not decoded: features are cached")
    records = {f: region_arrays(j, nbb_of(j), dim) for j, f in enumerate(files)}
    write_image_db(feature_cache_dir(folder), records)
    return root


def write_multi30k(root: Path, texts: list[str], names: list[str], lang: str = "de", gz: bool = True) -> Path:
    """The multi30k/dataset layout: data/task1/raw/test_2016_flickr.<lang>.gz, data/task1/image_splits/…txt."""
    raw = root / "data" / "task1" / "raw"
    splits = root / "data" / "task1" / "image_splits"
    raw.mkdir(parents=True, exist_ok=True)
    splits.mkdir(parents=True, exist_ok=True)
    body = "".join(t + "\n" for t in texts)
    if gz:
        with gzip.open(raw / f"test_2016_flickr.{lang}.gz", "wt", encoding="utf-8") as handle:
            handle.write(body)
    else:
        (raw / f"test_2016_flickr.{lang}").write_text(body, encoding="utf-8")
    (splits / "test_2016_flickr.txt").write_text("".join(n + "\n" for n in names))
    return root
