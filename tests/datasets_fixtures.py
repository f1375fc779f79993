"""Miniature copies of the public dataset layouts, served from 127.0.0.1 as the hub, the COCO image host and
GitHub raw serve them: the same file names, paths and columns, a few images instead of thousands."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np
from ldot_testing import ServedFile

from ldot_cli.data import catalogue, datasets

FLICKR_IDS = ["1007129816", "1009434119", "101362133", "102617084"]  # the Karpathy test starts like this
COCO_IDS = [391895, 522418, 184613, 318219, 554625]


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 255, size=(size[1], size[0], 3))).astype(np.uint8)
    arr[:, : size[0] // 2, seed % 3] = 255  # a distinct block of colour per image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


WORDS = ["a dog on the beach", "two people sitting on a bench", "a red car in the street", "a child with a ball",
         "a man near a tree", "a woman in the snow"]


def flickr_captions(i: int) -> list[str]:
    return [f"{WORDS[(i + k) % len(WORDS)]} {k}" for k in range(5)]


def flickr_zip(ids: list[str], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("images_flickr_1k_test/", b"")
        for n, i in enumerate(ids):
            z.writestr(f"images_flickr_1k_test/{i}.jpg", jpeg(n))
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def flickr_csv(ids: list[str], splits: list[str] | None = None) -> bytes:
    """nlphuji's columns: raw (JSON list of 5), sentids, split, filename, img_id."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
    for n, i in enumerate(ids):
        writer.writerow([json.dumps(flickr_captions(n)), json.dumps(list(range(5 * n, 5 * n + 5))),
                         splits[n] if splits else "test", f"{i}.jpg", str(n)])
    return buf.getvalue().encode()


FLICKR_TRAIN = ["1000092795", "10002456", "1000268201", "1000344755", "1000366164", "1000523639"]
FLICKR_TRAIN_SPLITS = ["train", "train", "train", "train", "val", "val"]


def flickr_full_zip(ids: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, i in enumerate(ids):
            z.writestr(f"flickr30k-images/{i}.jpg", jpeg(20 + n))
    return buf.getvalue()


def coco_parquet(ids: list[int], captions_per_image: tuple[int, ...] = (5, 5, 6, 5, 7)) -> bytes:
    """yerevann/coco-karpathy's columns: filepath, filename, imgid, split, sentids, sentences, cocoid, url."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    sent = 0
    for n, cid in enumerate(ids):
        k = captions_per_image[n % len(captions_per_image)]
        name = f"COCO_val2014_{cid:012d}.jpg"
        rows.append({"filepath": "val2014", "filename": name, "imgid": n, "split": "test",
                     "sentids": list(range(sent, sent + k)),
                     "sentences": [f"{WORDS[(n + j) % len(WORDS)]} {j}" for j in range(k)], "cocoid": cid,
                     "url": f"http://images.cocodataset.org/val2014/{name}"})
        sent += k
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def wds_shard(samples: list[tuple[str, bytes, list[str]]], extra: dict[str, bytes] | None = None) -> bytes:
    """A webdataset tar: ``<key>.jpg`` + ``<key>.txt`` (captions one a line) per sample, as CLIP_benchmark's."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image, captions in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", "\n".join(captions).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wds_flickr(n_images: int = 4) -> dict[str, ServedFile]:
    """CLIP_benchmark's wds_flickr30k test split: nshards.txt and two shards."""
    base = f"/datasets/{catalogue.WDS_FLICKR_REPO}/resolve/{catalogue.WDS_FLICKR_REV}/test"
    samples = [(f"s{i:07d}", jpeg(40 + i), flickr_captions(i)) for i in range(n_images)]
    half = n_images // 2
    return {f"{base}/nshards.txt": ServedFile(b"2\n"), f"{base}/0.tar": ServedFile(wds_shard(samples[:half])),
            f"{base}/1.tar": ServedFile(wds_shard(samples[half:]))}


def coco_5k_files() -> dict[str, ServedFile]:
    """nlphuji's COCO 5K test copy: images_mscoco_2014_5k_test.zip + test_5k_mscoco_2014.csv (28 captions here)."""
    base = f"/datasets/{catalogue.COCO_5K_REPO}/resolve/{catalogue.COCO_5K_REV}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, cid in enumerate(COCO_IDS):
            z.writestr(f"images_mscoco_2014_5k_test/COCO_val2014_{cid:012d}.jpg", jpeg(10 + n))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
    sent = 0
    for n, cid in enumerate(COCO_IDS):
        k = (5, 5, 6, 5, 7)[n]
        writer.writerow([json.dumps([f"{WORDS[(n + j) % len(WORDS)]} {j}" for j in range(k)]),
                         json.dumps(list(range(sent, sent + k))), "test", f"COCO_val2014_{cid:012d}.jpg", str(n)])
        sent += k
    return {f"{base}/images_mscoco_2014_5k_test.zip": ServedFile(buf.getvalue()),
            f"{base}/test_5k_mscoco_2014.csv": ServedFile(text.getvalue().encode())}


def gz_lines(lines: list[str]) -> bytes:
    return gzip.compress(("\n".join(lines) + "\n").encode())


@dataclass
class Mini:
    files: dict[str, ServedFile]
    coco_images: dict[int, bytes]


def miniature(flickr_ids: list[str] = FLICKR_IDS, multi30k_ids: list[str] | None = None) -> Mini:
    """Every served path -> file, as the real hosts lay them out."""
    flickr = f"/datasets/{catalogue.FLICKR_1K_REPO}/resolve/{catalogue.FLICKR_1K_REV}"
    coco = f"/datasets/{catalogue.COCO_KARPATHY_REPO}/resolve/{catalogue.COCO_KARPATHY_REV}/data"
    gh = f"/gh/multi30k/dataset/{catalogue.MULTI30K_COMMIT}/data/task1"
    m30 = multi30k_ids if multi30k_ids is not None else flickr_ids
    files = {f"{flickr}/images_flickr_1k_test.zip": ServedFile(flickr_zip(flickr_ids)),
             f"{flickr}/test_1k_flickr.csv": ServedFile(flickr_csv(flickr_ids)),
             f"{coco}/test-00000-of-00001.parquet": ServedFile(coco_parquet(COCO_IDS)),
             f"{gh}/raw/test_2016_flickr.de.gz": ServedFile(gz_lines([f"ein Hund {i}" for i in range(len(m30))])),
             f"{gh}/image_splits/test_2016_flickr.txt": ServedFile(("\n".join(f"{i}.jpg" for i in m30) + "\n").encode())}
    full = f"/datasets/{catalogue.FLICKR_FULL_REPO}/resolve/{catalogue.FLICKR_FULL_REV}"
    files[f"{full}/flickr30k-images.zip"] = ServedFile(flickr_full_zip(FLICKR_TRAIN))
    files[f"{full}/flickr_annotations_30k.csv"] = ServedFile(flickr_csv(FLICKR_TRAIN, FLICKR_TRAIN_SPLITS))
    images = {}
    for n, cid in enumerate(COCO_IDS):
        images[cid] = jpeg(10 + n)
        files[f"/coco/val2014/COCO_val2014_{cid:012d}.jpg"] = ServedFile(images[cid])
    return Mini(files, images)


def point_catalogue_at(monkeypatch, url: str, coco_hosts: tuple[str, ...] | None = None) -> None:
    """The catalogue's hosts -> the local server; the expected counts -> the miniature's."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(catalogue, "GITHUB_RAW", url + "/gh/")
    monkeypatch.setattr(datasets, "COCO_IMAGE_HOSTS", coco_hosts or (url + "/coco/",))
    counts = {("flickr30k", "test"): (len(FLICKR_IDS), 5 * len(FLICKR_IDS)), ("coco", "test"): (5, 28),
              ("multi30k", "test"): (len(FLICKR_IDS), len(FLICKR_IDS)), ("flickr30k", "train"): (4, None)}
    splits = tuple(dataclasses.replace(s, images=counts[(s.dataset, s.split)][0],
                                       captions=counts[(s.dataset, s.split)][1])
                   if (s.dataset, s.split) in counts else s for s in catalogue.SPLITS)
    monkeypatch.setattr(catalogue, "SPLITS", splits)
    monkeypatch.setattr(datasets, "SPLITS", splits)
