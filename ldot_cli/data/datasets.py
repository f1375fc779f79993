"""Public benchmarks and training sets fetched into ``<home>/datasets/<name>/``, verified, ready for `locate`.

Layout of a dataset folder::

    downloads/                 the files as published (zip, csv, parquet, .gz), ``.part`` while downloading
    flickr30k-images/          Flickr30k images, flat (``<id>.jpg``)
    val2014/, train2014/       COCO images, flat (``COCO_val2014_<id>.jpg``)
    dataset_<name>.json        the Karpathy split file, written from the published CSV / parquet files
    data/task1/...             Multi30K files in the multi30k/dataset layout
    ldot-data-<split>.json     written LAST, once the split is verified: files and their sha256, counts

A split is present only when its marker is there, so an interrupted fetch is never read as complete: the next
run resumes the ``.part`` files, skips what is in place, and re-checks everything before writing the marker.
Checks on the data: the counts of images and captions the catalogue states (COCO 5K test: 5,000 / 25,010),
every image file present (JPEG/PNG bytes), and Multi30K's image list against the Karpathy Flickr30k test.
"""

from __future__ import annotations

import ast
import csv
import json
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldot_cli.data.archive import safe_extract
from ldot_cli.data.catalogue import (
    COCO_IMAGE_HOSTS,
    SPLITS,
    WDS_FLICKR_BYTES,
    DataFile,
    DataSplit,
    find_split,
    wds_flickr_url,
)
from ldot_cli.data.errors import DatasetError
from ldot_cli.data.retrieval_sets import DataPaths
from models.core.download import (
    Job,
    UnreachableError,
    download_file,
    download_many,
    known_hash,
    record_hash,
)
from models.core.errors import LdotWarning, option
from models.core.fileio import SHARED, atomic_write_bytes, atomic_write_json, atomic_writer, sha256_file
from models.core.home import datasets_dir
from models.core.progress import Progress, ProgressFn, report
from models.hub.catalogue import expand_url

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
KARPATHY_SPLITS = {"test": ("test",), "train": ("train", "restval", "val")}  # what a fetched split must hold


class SourceUnreachable(DatasetError):
    """No mirror of a file answered (the message says which URLs and what to do by hand)."""

    resumable = False  # bytes of it are kept: the next run resumes (no reason to switch sources)
    # the download that failed: (file name, URLs tried, each failure, destination), for a fallback's message
    detail: tuple[str, list[str], list[str], Path] | None = None


def dataset_dir(dataset: str) -> Path:
    return datasets_dir() / dataset


def _marker(entry: DataSplit, lang: str = "de") -> Path:
    suffix = f"-{lang}" if entry.dataset == "multi30k" else ""
    return dataset_dir(entry.dataset) / f"ldot-data-{entry.split}{suffix}.json"


def read_marker(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("complete") is True else {}


def is_fetched(dataset: str, split: str = "test", lang: str = "de") -> bool:
    return bool(read_marker(_marker(find_split(dataset, split, lang), lang)))


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What fetching a split needs: the splits in order (requirements first), bytes left, terms, folders."""

    splits: list[DataSplit]
    missing_bytes: int  # approximate bytes still to download
    lang: str = "de"

    @property
    def folders(self) -> list[Path]:
        return list(dict.fromkeys(dataset_dir(e.dataset) for e in self.splits))

    @property
    def terms(self) -> list[str]:
        return list(dict.fromkeys(e.terms for e in self.splits))

    @property
    def done(self) -> bool:
        return all(read_marker(_marker(e, self.lang)) for e in self.splits)


def _missing_bytes(entry: DataSplit, lang: str) -> int:
    if read_marker(_marker(entry, lang)):
        return 0
    downloads = dataset_dir(entry.dataset) / "downloads"
    left = 0
    for f in entry.files:
        whole = f.size or f.approx
        if (downloads / f.name).is_file():
            continue
        part = downloads / (f.name + ".part")
        left += max(whole - (part.stat().st_size if part.is_file() else 0), 0)
    if entry.per_image_bytes:
        folder = dataset_dir(entry.dataset) / "val2014"
        have = sum(1 for _ in folder.glob("*.jpg")) if folder.is_dir() else 0
        left += int(entry.per_image_bytes * max(entry.images - have, 0) / entry.images)
    return left


def plan(dataset: str, split: str = "test", lang: str = "de") -> Plan:
    entry = find_split(dataset, split, lang)
    chain = [find_split(d, s, lang) for d, s in entry.requires] + [entry]
    return Plan(chain, sum(_missing_bytes(e, lang) for e in chain), lang)


# ------------------------------------------------------------------------------------------ fetch
class _Bytes:
    """One progress stage for a whole fetch: bytes over the plan's estimate, whatever file is downloading."""

    def __init__(self, progress: ProgressFn | None, stage: str, total: int) -> None:
        self.progress, self.stage, self.total, self.offset = progress, stage, total, 0

    def file(self) -> ProgressFn:
        def callback(p: Progress) -> None:
            info = dict(p.info) if p.info else {}
            report(self.progress, self.stage, self.offset + p.done, max(self.total, self.offset + p.done), "bytes",
                   **info)
        return callback

    def add(self, n: int) -> None:
        self.offset += n


def fetch(dataset: str, split: str = "test", lang: str = "de", progress: ProgressFn | None = None,
          workers: int = 8, retries: int = 3, backoff: float = 1.0, timeout: float = 30.0) -> Path:
    """Fetch, verify and assemble ``dataset``/``split`` (and what it needs first); returns its folder.

    Resumes whatever an earlier run left. Raises `DatasetError` with the URL tried, the mirror tried next and
    the manual steps when a source is unreachable; nothing is marked complete unless it checked out.
    """
    p = plan(dataset, split, lang)
    meter = _Bytes(progress, f"{dataset} {split}", p.missing_bytes)
    for entry in p.splits:
        if not read_marker(_marker(entry, lang)):
            _fetch_split(entry, lang, meter, progress, workers, retries, backoff, timeout)
    report(progress, meter.stage, meter.offset, meter.offset, "bytes", event="done")  # the estimate -> what it was
    return dataset_dir(dataset)


def _fetch_split(entry: DataSplit, lang: str, meter: _Bytes, progress: ProgressFn | None, workers: int,
                 retries: int, backoff: float, timeout: float) -> None:
    from filelock import FileLock

    folder = dataset_dir(entry.dataset)
    downloads = folder / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".fetch.lock")):
        digests: dict[str, dict[str, Any]] = {}
        try:
            for f in entry.files:
                dest = downloads / f.name
                digests[f"downloads/{f.name}"] = _download(entry, f, dest, meter, retries, backoff, timeout)
        except SourceUnreachable as exc:
            if exc.resumable or entry.key not in ("flickr30k/test", "coco/test"):
                raise  # a transfer that stopped half-way resumes instead of switching sources
            if entry.key == "coco/test":
                counts = _fetch_coco_zip(entry, folder, meter, exc, progress, retries, backoff, timeout)
            else:
                counts = _fetch_wds_flickr(entry, folder, meter, exc, retries, backoff, timeout)
            atomic_write_json(_marker(entry, lang), {"dataset": entry.dataset, "split": entry.split, "complete": True,
                                                     "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                     **counts})
            return
        for f in entry.files:
            if f.extract_to:
                safe_extract(downloads / f.name, folder / f.extract_to, progress=progress)
        assemble = {"flickr30k": _assemble_flickr, "coco": _assemble_coco, "multi30k": _assemble_multi30k}
        counts = assemble[entry.dataset](entry, folder, lang, meter, progress, workers, retries, backoff, timeout,
                                         digests)
        for f in entry.files:  # trust on first use, once the data checked out
            key = _hash_key(entry, f)
            if f.sha256 is None and known_hash(key) is None:
                record_hash(key, digests[f"downloads/{f.name}"]["sha256"])
        atomic_write_json(_marker(entry, lang), {"dataset": entry.dataset, "split": entry.split, "complete": True,
                                                 "lang": lang if entry.dataset == "multi30k" else None,
                                                 "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                 **counts, "files": digests}, indent=1)


def _hash_key(entry: DataSplit, f: DataFile) -> str:
    return f"datasets/{entry.dataset}/{f.name}"


def _download(entry: DataSplit, f: DataFile, dest: Path, meter: _Bytes, retries: int, backoff: float,
              timeout: float) -> dict[str, Any]:
    key = _hash_key(entry, f)
    expected = f.sha256 or known_hash(key)
    if dest.is_file():  # fetched earlier, or put there by hand: check it as a download would be
        if f.size is not None and dest.stat().st_size != f.size:
            raise DatasetError(f"{dest} is {dest.stat().st_size:,} bytes, expected {f.size:,}: delete it and run "
                               "the same command again")
        digest = sha256_file(dest)
        if expected and digest != expected:
            raise DatasetError(f"{dest} has sha256 {digest[:12]}…, expected {expected[:12]}…: delete it and run the "
                               "same command again")
        return {"sha256": digest, "size": dest.stat().st_size}
    urls = [expand_url(u) for u in f.urls]
    try:
        digest = download_file(urls, dest, f.sha256, f.size, meter.file(), hash_key=key, retries=retries,
                               backoff=backoff, timeout=timeout, record=False, stage=meter.stage)
    except UnreachableError as exc:
        error = SourceUnreachable(_offline(entry, f.name, urls, exc.failures, dest))
        part = dest.with_name(dest.name + ".part")
        error.resumable = part.is_file() and part.stat().st_size > 0
        error.args = (str(error),)
        error.detail = (f.name, urls, exc.failures, dest)
        raise error from None
    size = dest.stat().st_size
    meter.add(size)
    return {"sha256": digest, "size": size}


def _fallback_unreachable(entry: DataSplit, primary: SourceUnreachable,
                          fallback: SourceUnreachable) -> SourceUnreachable:
    """The error when a split's fallback is unreachable too: the primary download's line, naming the fallback's
    failures."""
    why = "; ".join(fallback.detail[2]) if fallback.detail else str(fallback)
    if primary.detail is None:  # not raised by `_download` (never today): its own message, then the fallback's
        return SourceUnreachable(f"{primary}; then the fallback {why}")
    name, urls, failures, dest = primary.detail
    return SourceUnreachable(_offline(entry, name, urls, failures, dest, fallback=why))


def _offline(entry: DataSplit, name: str, urls: list[str], failures: list[str], dest: Path,
             fallback: str = "") -> str:
    """One line: the URL tried, the mirror (or fallback) tried next, and which files to put where by hand."""
    tried = failures[0] if failures else urls[0]
    mirror = f", then the mirror {failures[1]}" if len(failures) > 1 else ""
    mirror += f", then the fallback {fallback}" if fallback else ("" if mirror else " (no mirror known)")
    part = dest.with_name(dest.name + ".part")
    kept = f"; {part.stat().st_size:,} bytes kept: run the same command again to resume" \
        if part.is_file() and part.stat().st_size else ""
    downloads = dest.parent
    by_hand = "; ".join(f"{expand_url(f.urls[0])} as {downloads / f.name}" for f in entry.files
                        if not (downloads / f.name).is_file())
    return (f"could not fetch {name} for {entry.dataset} {entry.split}: tried {tried}{mirror}{kept}. Without a "
            f"network: download {by_hand}, then run `ldot data get {entry.dataset} --split {entry.split}` again "
            f"(or pass {option('data')} with your own copy)")


# ------------------------------------------------------------------------------------------ caption files
def _listish(value: Any) -> list[Any]:
    """A CSV cell holding a JSON / Python list (or one plain string) as a list."""
    if isinstance(value, list):
        return value
    if hasattr(value, "tolist"):
        return list(value.tolist())
    text = str(value).strip()
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return parsed
    return [text] if text else []


def _column(row: dict[str, Any], names: Iterable[str], path: Path) -> Any:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    raise DatasetError(f"{path} has none of the columns {', '.join(names)} (columns: {', '.join(row)}): the published "
                       f"file changed; pass {option('data')} with your own copy")


def checked_name(value: object, source: Path, where: str, nested: bool = False) -> str:
    """A file name read from a downloaded file, as is, once it cannot leave the folder it is joined to.

    It must be a plain file name (``nested``: a relative path of plain names, like ``val2014``): no absolute
    path, drive, ``..``, ``.``, empty part or control character. Raises `DatasetError` (one line) otherwise, so
    nothing outside the dataset folder is ever read, written or deleted because of a published file.
    """
    text = str(value)
    parts = text.replace("\\", "/").split("/")
    if (not text or len(text) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in text) or (len(text) > 1 and text[1] == ":")
            or any(p in ("", ".", "..") for p in parts) or (len(parts) > 1 and not nested)):
        kind = "a relative path inside the dataset folder" if nested else "a plain file name"
        raise DatasetError(f"{source}: {where} names {text[:200]!r}, not {kind}: refused, nothing written or "
                           "deleted (this is not the published file: delete it and run the same command again)")
    return text


def karpathy_from_rows(rows: Iterable[dict[str, Any]], path: Path, default_split: str, filepath: str | None = None
                       ) -> list[dict[str, Any]]:
    """Karpathy ``images[]`` entries from CSV / parquet rows (nlphuji and yerevann columns).

    The rows are network data: every ``filename`` must be a plain file name and every ``filepath`` a relative
    path inside the dataset folder (`checked_name`)."""
    images = []
    next_sent = 0
    for n, row in enumerate(rows):
        filename = checked_name(_column(row, ("filename", "file_name", "image"), path), path, f"row {n + 1}")
        raws = [str(r).strip() for r in _listish(_column(row, ("raw", "sentences", "captions", "caption"), path))]
        sentids = _listish(row["sentids"]) if row.get("sentids") not in (None, "") else []
        if len(sentids) != len(raws):
            sentids = list(range(next_sent, next_sent + len(raws)))
        next_sent = max([next_sent, *(int(s) + 1 for s in sentids if str(s).isdigit())])
        split = str(row.get("split") or default_split)
        entry = {"filename": filename, "split": split, "imgid": row.get("imgid", row.get("img_id", n)),
                 "sentences": [{"raw": r, "sentid": int(s) if str(s).isdigit() else s} for r, s in zip(raws, sentids)]}
        fp = row.get("filepath") or filepath
        if fp:
            entry["filepath"] = checked_name(fp, path, f"row {n + 1} (filepath)", nested=True)
        if row.get("cocoid") is not None:
            entry["cocoid"] = int(row["cocoid"])
        images.append(entry)
    return images


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} ({exc}): delete it and run the same command again") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading the COCO Karpathy parquet files needs pyarrow: pip install '.[data]' in ldot's folder") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's ArrowInvalid and OS errors
        raise DatasetError(f"cannot read {path} ({exc}): delete it and run the same command again") from None


def _write_karpathy(folder: Path, dataset: str, images: list[dict[str, Any]]) -> Path:
    unique: dict[str, dict[str, Any]] = {}
    for image in images:
        unique.setdefault(f"{image.get('filepath', '')}/{image['filename']}", image)
    path = folder / f"dataset_{dataset}.json"
    atomic_write_json(path, {"dataset": dataset, "images": list(unique.values())})
    return path


def _split_counts(images: list[dict[str, Any]], splits: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    chosen = [im for im in images if im["split"] in set(splits)]
    return chosen, sum(len(im["sentences"]) for im in chosen)


def _check_counts(entry: DataSplit, n_images: int, n_captions: int, source: Path) -> None:
    if n_images != entry.images or (entry.captions is not None and n_captions != entry.captions):
        want = f"{entry.images:,} images" + (f" and {entry.captions:,} captions" if entry.captions else "")
        raise DatasetError(f"the fetched {entry.dataset} {entry.split} split ({source}) has {n_images:,} images and "
                           f"{n_captions:,} captions, expected {want}: not marked complete (the published file "
                           f"changed?); pass {option('data')} with your own copy")


def _check_images(entry: DataSplit, folder: Path, files: Iterable[str]) -> int:
    """Every image present and JPEG/PNG; the ones that are not are deleted (only inside ``folder``)."""
    missing, bad = [], []
    count = 0
    for name in files:
        path = folder / checked_name(name, folder, "the image list", nested=True)
        count += 1
        if not path.is_file():
            missing.append(path)
            continue
        with open(path, "rb") as handle:
            head = handle.read(8)
        if not head.startswith(IMAGE_MAGIC):
            bad.append(path)
    if bad:
        for path in bad:
            path.unlink(missing_ok=True)
        raise DatasetError(f"{len(bad)} fetched {entry.dataset} image(s) are not JPEG/PNG (first: {bad[0]}): deleted; "
                           "run the same command again")
    if missing:
        raise DatasetError(f"{len(missing)} of the {count:,} {entry.dataset} {entry.split} images are missing (first: "
                           f"{missing[0]}): the archive lacks them; delete {folder / 'downloads'} and fetch again, or "
                           f"pass {option('data')} with your own copy")
    return count


# ------------------------------------------------------------------------------------------ per dataset
def _assemble_flickr(entry: DataSplit, folder: Path, lang: str, meter: _Bytes, progress: ProgressFn | None,
                     workers: int, retries: int, backoff: float, timeout: float, digests: dict) -> dict[str, Any]:
    downloads = folder / "downloads"
    sources = [downloads / n for n in ("flickr_annotations_30k.csv", "test_1k_flickr.csv") if (downloads / n).is_file()]
    images: list[dict[str, Any]] = []
    for path in sources:  # the full file first: its Karpathy split wins
        images += karpathy_from_rows(_read_csv(path), path, "test")
    karpathy = _write_karpathy(folder, "flickr30k", images)
    chosen, n_captions = _split_counts(images, ("test",) if entry.split == "test" else ("train",))
    _check_counts(entry, len(chosen), n_captions if entry.captions else 0, karpathy)
    _check_images(entry, folder / "flickr30k-images", [im["filename"] for im in chosen])
    return {"images": len(chosen), "captions": n_captions, "karpathy": karpathy.name}


def _assemble_coco(entry: DataSplit, folder: Path, lang: str, meter: _Bytes, progress: ProgressFn | None,
                   workers: int, retries: int, backoff: float, timeout: float, digests: dict) -> dict[str, Any]:
    downloads = folder / "downloads"
    images: list[dict[str, Any]] = []
    for name in ("train", "restval", "validation", "test"):
        path = downloads / f"{name}-00000-of-00001.parquet"
        if path.is_file():
            images += karpathy_from_rows(_read_parquet(path), path, name)
    karpathy = _write_karpathy(folder, "coco", images)
    chosen, n_captions = _split_counts(images, KARPATHY_SPLITS[entry.split] if entry.split == "train" else ("test",))
    if entry.split == "test":
        _check_counts(entry, len(chosen), n_captions, karpathy)
        target = folder / "val2014"
        target.mkdir(parents=True, exist_ok=True)
        names = [im["filename"] for im in chosen]
        jobs = [Job(tuple(f"{host}val2014/{n}" for host in COCO_IMAGE_HOSTS), target / n) for n in names]
        result = download_many(jobs, meter.file(), meter.stage, workers=workers, retries=retries, backoff=backoff,
                               timeout=timeout, expected_bytes=None)
        meter.add(sum(jobs[i].dest.stat().st_size for i in range(len(jobs)) if jobs[i].dest in result.digests))
        if result.failures:
            dest, exc = next(iter(result.failures.items()))
            raise DatasetError(f"{len(result.failures):,} of the {len(jobs):,} COCO test images could not be fetched "
                               f"(first, {dest.name}: {exc}); the {len(jobs) - len(result.failures):,} fetched are "
                               f"kept: run the same command again to fetch the rest. Without a network: put the val2014 "
                               f"images (val2014.zip from cocodataset.org) in {target}/")
        _check_images(entry, target, names)
        for n in names:
            path = target / n
            digests[f"val2014/{n}"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    else:
        _check_counts(entry, len(chosen), n_captions, karpathy)
        _check_images(entry, folder, [f"{im.get('filepath', '')}/{im['filename']}".lstrip("/") for im in chosen])
    return {"images": len(chosen), "captions": n_captions, "karpathy": karpathy.name}


def _assemble_multi30k(entry: DataSplit, folder: Path, lang: str, meter: _Bytes, progress: ProgressFn | None,
                       workers: int, retries: int, backoff: float, timeout: float, digests: dict) -> dict[str, Any]:
    from ldot_cli.data.retrieval_sets import read_karpathy, read_multi30k

    downloads = folder / "downloads"
    raw, splits = folder / "data" / "task1" / "raw", folder / "data" / "task1" / "image_splits"
    raw.mkdir(parents=True, exist_ok=True)
    splits.mkdir(parents=True, exist_ok=True)
    captions, image_list = raw / f"test_2016_flickr.{lang}.gz", splits / "test_2016_flickr.txt"
    for src, dest in ((downloads / captions.name, captions), (downloads / image_list.name, image_list)):
        with open(src, "rb") as source, atomic_writer(dest, SHARED) as out:
            shutil.copyfileobj(source, out)
    files, rows = read_multi30k(captions, image_list, lang)
    for n, name in enumerate(files, start=1):
        checked_name(name, image_list, f"image {n}")
    _check_counts(entry, len(files), len(rows), image_list)
    flickr = dataset_dir("flickr30k")
    karpathy_files, _ = read_karpathy(flickr / "dataset_flickr30k.json", "test")
    ours, theirs = set(files), set(karpathy_files)
    if ours != theirs:
        warnings.warn(LdotWarning(
            f"Multi30K's {len(ours):,} test images are not the Karpathy Flickr30k test images: {len(ours - theirs):,} "
            f"only in Multi30K (e.g. {sorted(ours - theirs)[:1]}), {len(theirs - ours):,} only in Karpathy"), stacklevel=2)
    _check_images(entry, flickr / "flickr30k-images", files)
    return {"images": len(files), "captions": len(rows), "same_images_as_karpathy_test": ours == theirs}


def _fetch_coco_zip(entry: DataSplit, folder: Path, meter: _Bytes, primary: SourceUnreachable,
                    progress: ProgressFn | None, retries: int, backoff: float, timeout: float) -> dict[str, Any]:
    """The fallback of the COCO 5K test: nlphuji's images zip + captions CSV (instead of the Karpathy parquet and
    5,000 per-image requests)."""
    from dataclasses import replace

    from ldot_cli.data.catalogue import FALLBACKS

    alt = replace(FALLBACKS[entry.key], images=entry.images, captions=entry.captions)
    warnings.warn(LdotWarning(f"{str(primary).split('. Without a network')[0]}; trying the fallback "
                              f"{expand_url(alt.files[0].urls[0]).rsplit('/', 1)[0]}/"), stacklevel=2)
    downloads = folder / "downloads"
    digests: dict[str, dict[str, Any]] = {}
    for f in alt.files:
        try:
            digests[f"downloads/{f.name}"] = _download(alt, f, downloads / f.name, meter, retries, backoff, timeout)
        except SourceUnreachable as exc:
            raise _fallback_unreachable(entry, primary, exc) from None
    safe_extract(downloads / alt.files[0].name, folder / "val2014", progress=progress)
    csv_path = downloads / alt.files[1].name
    images = karpathy_from_rows(_read_csv(csv_path), csv_path, "test", filepath="val2014")
    for name in ("train", "restval", "validation"):  # keep what the training split's parquets hold
        path = downloads / f"{name}-00000-of-00001.parquet"
        if path.is_file():
            images += karpathy_from_rows(_read_parquet(path), path, name)
    karpathy = _write_karpathy(folder, "coco", images)
    chosen, n_captions = _split_counts(images, ("test",))
    _check_counts(alt, len(chosen), n_captions, karpathy)
    _check_images(alt, folder / "val2014", [im["filename"] for im in chosen])
    for key, info in digests.items():  # trust on first use, once the data checked out
        hkey = f"datasets/{entry.dataset}/{key.rsplit('/', 1)[1]}"
        if known_hash(hkey) is None:
            record_hash(hkey, info["sha256"])
    return {"images": len(chosen), "captions": n_captions, "karpathy": karpathy.name, "source": "nlphuji-5k",
            "files": digests}


def _fetch_wds_flickr(entry: DataSplit, folder: Path, meter: _Bytes, primary: SourceUnreachable, retries: int,
                      backoff: float, timeout: float) -> dict[str, Any]:
    """The fallback of the Flickr30k 1K test: CLIP_benchmark's webdataset shards (``test/nshards.txt``, then
    ``test/<n>.tar`` holding ``<key>.jpg`` + ``<key>.txt``, one caption a line). The images have no Flickr file
    names there, so they are saved as ``<key>.jpg`` (and Multi30K cannot be aligned with them)."""
    warnings.warn(LdotWarning(f"{str(primary).split('. Without a network')[0]}; trying the fallback "
                              f"{expand_url(wds_flickr_url('test/'))}"), stacklevel=2)
    downloads = folder / "downloads" / "wds"
    digests: dict[str, dict[str, Any]] = {}

    def get(path: str, approx: int) -> Path:
        f = DataFile(path.replace("/", "-"), (wds_flickr_url(path),), approx=approx)
        dest = downloads / f.name
        try:
            digests[f"downloads/wds/{f.name}"] = _download(entry, f, dest, meter, retries, backoff, timeout)
        except SourceUnreachable as exc:
            raise _fallback_unreachable(entry, primary, exc) from None
        return dest

    try:
        shards = int(get("test/nshards.txt", 2).read_text().strip())
    except ValueError:
        raise DatasetError(f"{downloads / 'test-nshards.txt'} is not a number of shards: delete it and fetch again") \
            from None
    if not 0 < shards <= 1000:
        raise DatasetError(f"{downloads / 'test-nshards.txt'} says {shards} shards: not a webdataset count")
    images_dir = folder / "flickr30k-images"
    images: list[dict[str, Any]] = []
    for n in range(shards):
        tar = get(f"test/{n}.tar", WDS_FLICKR_BYTES // 5)
        for key, captions in read_wds(tar, images_dir):
            images.append({"filename": f"{key}.jpg", "split": "test", "imgid": len(images),
                           "sentences": [{"raw": c, "sentid": 5 * len(images) + i} for i, c in enumerate(captions)]})
    karpathy = _write_karpathy(folder, "flickr30k", images)
    chosen, n_captions = _split_counts(images, ("test",))
    _check_counts(entry, len(chosen), n_captions, karpathy)
    _check_images(entry, images_dir, [im["filename"] for im in chosen])
    for key in digests:  # trust on first use, once the data checked out
        name = key.rsplit("/", 1)[1]
        hkey = f"datasets/{entry.dataset}/{name}"
        if known_hash(hkey) is None:
            record_hash(hkey, digests[key]["sha256"])
    return {"images": len(chosen), "captions": n_captions, "karpathy": karpathy.name, "source": "wds",
            "files": digests}


def read_wds(tar_path: Path, images_dir: Path, max_member: int = 200 << 20) -> list[tuple[str, list[str]]]:
    """The samples of one webdataset shard: each ``<key>.jpg`` saved as ``images_dir/<key>.jpg`` (whole files only),
    with the captions of ``<key>.txt``. Links, devices, paths outside the folder and huge members refuse the shard."""
    import tarfile
    from pathlib import PurePosixPath

    from models.core.tarfiles import read_tar

    def select(member: tarfile.TarInfo) -> bool:
        name = member.name
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise DatasetError(f"{tar_path}: member {name!r} is a path outside the folder: refused")
        if member.isdir():
            return False
        if not member.isfile():
            raise DatasetError(f"{tar_path}: member {name!r} is a link or device: refused")
        if member.size > max_member:
            raise DatasetError(f"{tar_path}: member {name!r} is {member.size:,} bytes: refused")
        key, _, ext = PurePosixPath(name).name.partition(".")
        return bool(key) and ext in ("txt", "jpg", "jpeg")

    images_dir.mkdir(parents=True, exist_ok=True)
    captions: dict[str, list[str]] = {}
    order: list[str] = []
    try:
        with open(tar_path, "rb") as handle:
            for member, data in read_tar(handle, select):
                key, _, ext = PurePosixPath(member.name).name.partition(".")
                if ext == "txt":
                    lines = data.decode("utf-8", errors="replace").splitlines()
                    captions[key] = [line.strip() for line in lines if line.strip()]
                else:
                    target = images_dir / f"{key}.jpg"
                    if not (target.is_file() and target.stat().st_size == member.size):
                        atomic_write_bytes(target, data, SHARED)
                    order.append(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{tar_path} is not a readable tar ({exc}): delete it and fetch again") from None
    return [(key, captions[key]) for key in dict.fromkeys(order) if captions.get(key)]


# ------------------------------------------------------------------------------------------ use
def eval_paths(dataset: str, lang: str = "de") -> DataPaths:
    """The inputs of `ldot eval` on a fetched test split (`fetch` first)."""
    folder = dataset_dir(dataset)
    if dataset == "multi30k":
        return DataPaths(data=folder, images=dataset_dir("flickr30k") / "flickr30k-images")
    return DataPaths(data=folder)


@dataclass
class SplitStatus:
    entry: DataSplit
    present: bool
    partial_bytes: int  # bytes on disk for a split not (yet) complete
    folder: Path


def status() -> list[SplitStatus]:
    """Every fetchable split: present or not, and how much an interrupted fetch left."""
    def present(entry: DataSplit) -> bool:
        folder = dataset_dir(entry.dataset)
        return folder.is_dir() and any(read_marker(p) for p in folder.glob(f"ldot-data-{entry.split}*.json"))

    here = {entry.key: present(entry) for entry in SPLITS}
    out = []
    for entry in SPLITS:
        folder = dataset_dir(entry.dataset)
        partial = 0
        if not here[entry.key] and (folder / "downloads").is_dir():
            shared = {f.name for e in SPLITS if e.dataset == entry.dataset and here[e.key] for f in e.files}
            partial = sum((folder / "downloads" / (f.name + s)).stat().st_size for f in entry.files
                          if f.name not in shared  # a file of a present split (COCO's test parquet) is not partial
                          for s in ("", ".part") if (folder / "downloads" / (f.name + s)).is_file())
        out.append(SplitStatus(entry, here[entry.key], partial, folder))
    return out


def verify(datasets: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Re-hash every file a fetched split recorded; returns ``dataset/split`` -> problems (empty when intact)."""
    out: dict[str, list[str]] = {}
    wanted = set(datasets or ())
    for marker in sorted(datasets_dir().glob("*/ldot-data-*.json")) if datasets_dir().is_dir() else []:
        dataset = marker.parent.name
        if wanted and dataset not in wanted:
            continue
        data = read_marker(marker)
        key = f"{dataset}/{marker.stem[len('ldot-data-'):]}"
        if not data:
            out[key] = [f"{marker}: not a complete fetch record: run `ldot data get {dataset}` again"]
            continue
        problems = []
        for rel, info in (data.get("files") or {}).items():
            path = marker.parent / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != info.get("size"):
                problems.append(f"{rel}: {path.stat().st_size} bytes, expected {info.get('size')}")
            elif sha256_file(path) != info.get("sha256"):
                problems.append(f"{rel}: sha256 mismatch (corrupted)")
        out[key] = problems
    missing = wanted - {k.split("/")[0] for k in out}
    if missing:
        raise DatasetError(f"not fetched: {', '.join(sorted(missing))} (see `ldot data list`)")
    return out


def remove(dataset: str) -> Path:
    """Delete a fetched dataset's folder (downloads, images, captions). Cached features are kept."""
    from ldot_cli.data.catalogue import DATASETS

    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = dataset_dir(dataset)
    if not folder.is_dir():
        raise DatasetError(f"{dataset} is not fetched ({folder} does not exist)")
    shutil.rmtree(folder)
    return folder
