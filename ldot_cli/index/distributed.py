"""`ldot index SOURCE --ray [--ray-address ADDRESS]`: the same index, built on a Ray cluster (Ray Data batch inference).

The pipeline, streamed by Ray Data::

    work units (tar shards, groups of files)
      -> flat_map(decode_unit)            CPU tasks: read bytes (local or fsspec), sha256, decode, preprocess
      -> map_batches(Extractor)           an actor pool, one model copy per GPU (or per N CPUs): detector +
                                          image tower; each batch is written as one committed output shard
      -> the driver                       merges each committed shard into the index (SQLite + regions)

Ray retries tasks and restarts actors that die (a killed worker process, a lost node); a retried batch
rewrites the same shard. A killed driver leaves committed shards behind: the next run merges them first,
then plans only what is still missing (loose files by path, size and mtime as plain `ldot index` does;
tar shards by their size, mtime and recorded image count), so nothing is indexed twice or lost.

Each SOURCE is kept in step as plain `ldot index` keeps a folder: files taken off a list, tar shards that are
gone (or that a brace range no longer names) and members a changed shard no longer holds are removed; the
last only once the shard was read to its end, so a shard that cannot be read keeps its rows.

The driver needs the index folder; the workers need the shards folder (``--shards-dir``: by default the
index's own ``shards/``, fine on one machine or a shared file system; any fsspec URL otherwise) and the
models (the driver's model paths when they exist on the worker, else the worker's own ldot cache).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldot_cli.index import hooks
from ldot_cli.index import shards as shard_io
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.layout import REGIONS_DIR
from ldot_cli.index.options import LOCAL, RayOptions
from ldot_cli.index.ray_inputs import (
    TAR_SUFFIXES,
    Item,
    Refusal,
    SourceError,
    TarSource,
    Unit,
    expand_braces,
    file_units,
    plan_sources,
    read_unit,
    tar_family,
)
from ldot_cli.index.runs import IndexReport, IndexRun, Scan, excluded, file_row
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning, option


class RayError(LdotError):
    """Ray is missing, or the cluster cannot be reached or used."""


@dataclass(frozen=True)
class Layout:
    """The pool the run uses, from the cluster's resources and the overrides."""

    actors: int
    num_cpus: float
    num_gpus: float
    shard_size: int
    device: str


def plan_layout(resources: dict[str, float], options: RayOptions, device: str = "auto") -> Layout:
    """One model copy per GPU (or per ``cpus_per_actor`` cores), leaving cores for the decoding tasks."""
    gpus = float(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus >= 1 and device != "cpu":
        per = options.gpus_per_actor or 1.0
        actors = options.actors or max(1, int(gpus // per))
        return Layout(actors, 1.0, per, options.shard_size or 256, "cuda")
    if device == "cuda":
        raise RayError(f"{option('device')} is cuda, but the Ray cluster reports no GPU: use auto or cpu")
    per_cpu = options.cpus_per_actor or max(1, min(4, cpus // 4))
    decoders = max(1, cpus // 4)
    actors = options.actors or max(1, (cpus - decoders) // per_cpu)
    return Layout(actors, float(per_cpu), 0.0, options.shard_size or 32, "cpu")


def connect(options: RayOptions) -> Any:
    """Join the cluster (or start a local instance); quiet, no progress bars of Ray's own."""
    try:
        import ray
    except ImportError:
        raise RayError(f"{option('ray')} needs Ray: pip install '.[ray]' in ldot's folder") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "logging_level": "ERROR",
                                  "configure_logging": True}
        if options.address == LOCAL:
            if options.num_cpus:
                kwargs["num_cpus"] = options.num_cpus
        else:
            kwargs["address"] = options.address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise RayError(f"cannot reach the Ray cluster at {options.address!r} ({exc}): start it with "
                           f"`ray start --head`, or give its address to {option('ray_address')} (e.g. 10.0.0.1:6379)") from None
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    return ray


# -- worker side: decoding tasks -------------------------------------------------------------------
def decode_unit(row: dict[str, Any], preprocess: Any, max_pixels: int | None) -> Iterator[dict[str, Any]]:
    """One work unit -> one row per image (decoded + preprocessed, or why not), then an end row."""
    import hashlib

    from feature_extraction.errors import ImageLoadError
    from feature_extraction.images.decode import load_image_bytes
    from feature_extraction.images.pool import _as_chw_float32

    unit: Unit = pickle.loads(row["unit"])
    known = set(unit.known)
    count = 0
    members: list[str] = []
    try:
        for item, data, problem in read_unit(unit):
            count += 1
            members.append(item.path)
            out: dict[str, Any] = {"item": item, "unit": unit.id}
            if data is None:
                out.update(reason=str(problem), retry=not isinstance(problem, Refusal))
            else:
                out["hash"] = hashlib.sha256(data).hexdigest()
                if out["hash"] in known:  # an indexed member, unchanged: no decoding, no model work
                    out["known"] = True
                    yield {"unit": unit.id, "blob": pickle.dumps(out)}
                    continue
                try:
                    rgb = load_image_bytes(data, item.path, max_pixels)
                    tensor, scale = preprocess(rgb)
                    out.update(pixels=_as_chw_float32(tensor), scale=float(scale),
                               size=(int(rgb.shape[0]), int(rgb.shape[1])))
                except ImageLoadError as exc:
                    out.update(reason=exc.reason, retry=not exc.permanent)
                except MemoryError:
                    out.update(reason="not enough memory to decode", retry=True)
                except Exception as exc:  # a bug or an exotic failure: still only this image's
                    out.update(reason=f"could not load image ({type(exc).__name__}: {exc})", retry=False)
            yield {"unit": unit.id, "blob": pickle.dumps(out)}
    except SourceError as exc:  # a damaged or unreachable tar shard: the run goes on, its rows stay
        failed = {"failed": unit.id, "tar": unit.tar, "root": unit.root, "reason": str(exc)}
        yield {"unit": unit.id, "blob": pickle.dumps(failed)}
        yield {"unit": unit.id, "blob": pickle.dumps({"end": unit.id, "tar": unit.tar, "complete": False})}
        return
    end: dict[str, Any] = {"end": unit.id, "tar": unit.tar, "complete": True, "total": count}
    if unit.tar is not None:  # the driver drops the indexed members a changed shard no longer holds
        end["members"] = members
    yield {"unit": unit.id, "blob": pickle.dumps(end)}


# -- worker side: the model actors -------------------------------------------------------------------
class Extractor:
    """Detector + image tower, loaded once per actor; each call extracts, encodes and commits one shard."""

    def __init__(self, detector: str, model: str, preset: str, device: str, detector_batch: int,
                 shards_dir: str, keep_regions: bool, threads: int) -> None:
        import torch

        from feature_extraction.detector.weights import open_detector
        from feature_extraction.uniter_db import resolve_cut
        from models.hub.load import load_bi_encoder

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        # no detector for a dual encoder (it reads the pixels the decoding tasks preprocessed for it)
        self.detector = open_detector(_local_or_name(detector), device) if detector else None
        self.encoder = load_bi_encoder(_local_or_name(model), device=device, towers=("image",))
        self.preset, self.cut = preset, resolve_cut(preset)
        self.detector_batch = max(1, detector_batch)
        self.shards_dir, self.keep_regions = shards_dir, keep_regions
        hooks.fire(hooks.actor_ready)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        hooks.fire(hooks.batch_start)
        entries = [pickle.loads(blob) for blob in batch["blob"]]
        images = [e for e in entries if "pixels" in e]
        shard = shard_io.ShardRows()
        if self.detector is None:  # a dual encoder: the pixels are the model's input
            regions: list[Any] = [None] * len(images)
            if images:
                vectors = self.encoder.encode_images([e["pixels"] for e in images]).numpy()
                for entry, vector in zip(images, vectors):
                    shard.rows.append(_row(entry, vec=len(shard.vectors), boxes=0))
                    shard.vectors.append(vector)
                    shard.records.append(None)
            ok = []
        else:
            regions = self._detect(images)
            ok = [(e, r) for e, r in zip(images, regions) if not isinstance(r, str)]
        if ok:
            from feature_extraction.uniter_db import record_view, regions_to_record

            records = [regions_to_record(r, self.cut) for _, r in ok]
            vectors = self.encoder.encode_images([record_view(r) for r in records]).numpy()
            for (entry, _), record, vector in zip(ok, records, vectors):
                shard.rows.append(_row(entry, vec=len(shard.vectors), boxes=len(record["features"])))
                shard.vectors.append(vector)
                shard.records.append(record if self.keep_regions else None)
        for entry, result in zip(images, regions):
            if isinstance(result, str):
                shard.rows.append(_row(entry, reason=result, retry=True))
        for entry in entries:
            if "end" in entry or "failed" in entry:
                shard.rows.append(entry)
            elif "known" in entry:
                shard.rows.append(_row(entry, known=True))
            elif "pixels" not in entry:
                shard.rows.append(_row(entry, reason=entry["reason"], retry=entry["retry"]))
        name = shard_io.shard_id([_row_key(r) for r in shard.rows])
        info = shard_io.write(self.shards_dir, name, shard)
        return {"name": [info["name"]], "rows": [info["rows"]], "images": [len(ok)]}

    def _detect(self, images: list[dict[str, Any]]) -> list[Any]:
        """Detector output per image (an error text where it failed, alone, after a failed batch)."""
        import torch

        from feature_extraction.types import RegionFeatures

        assert self.detector is not None, "a dual encoder's actor has no detector"
        out: list[Any] = []
        for start in range(0, len(images), self.detector_batch):
            chunk = images[start:start + self.detector_batch]
            inputs = [(torch.from_numpy(e["pixels"]), e["scale"], e["size"]) for e in chunk]
            results: list[RegionFeatures | str]
            try:
                results = list(self.detector.extract(inputs, self.preset))
                if len(results) != len(chunk):
                    raise ValueError("wrong number of results")
            except Exception:
                results = []
                for one in inputs:
                    try:
                        results.append(self.detector.extract([one], self.preset)[0])
                    except Exception as exc:
                        results.append(f"detector failed ({type(exc).__name__}: {exc})")
            for result in results:
                if not isinstance(result, (RegionFeatures, str)):
                    result = f"detector returned {type(result).__name__}, not RegionFeatures"
                out.append(result)
        return out


def _row(entry: dict[str, Any], **extra: Any) -> dict[str, Any]:
    item: Item = entry["item"]
    return {"path": item.path, "root": item.root, "size": item.size, "mtime_ns": item.mtime_ns,
            "hash": entry.get("hash"), "unit": entry["unit"], **extra}


def _row_key(row: dict[str, Any]) -> str:
    if "end" in row:
        return f"end:{row['end']}"
    if "failed" in row:
        return f"failed:{row['failed']}"
    return str(row["path"])


def _local_or_name(source: str) -> str:
    """The driver's resolved model path where this worker sees it; else the name, from this worker's cache."""
    path, _, name = source.partition("\0")
    return path if path and os.path.exists(path) else (name or path)


# -- the driver ----------------------------------------------------------------------------------------
class RayExecutor:
    """Runs an `Indexer`'s model work on a Ray cluster; planning and merging run here, under the index lock."""

    def __init__(self, indexer: IndexRun, options: RayOptions) -> None:
        self.ix = indexer
        self.options = options
        self.layout: Layout | None = None
        self._tar_units: set[str] = set()

    def plan(self, paths: list[str], excludes: tuple[str, ...]) -> Any:
        """The sources (folders, file lists, tar shards, URLs), looked at before anything is created."""
        return plan_sources(paths)

    def run(self, store: IndexStore, plan: Any, excludes: tuple[str, ...], retry_failed: bool, reindex: bool,
            report: IndexReport) -> None:
        store.db.executescript(shard_io.TABLES)
        if reindex:
            shard_io.clean_temporary(self.shards_dir)
            for name in shard_io.committed(self.shards_dir):
                shard_io.remove(self.shards_dir, name)
        self._run_sources(store, plan, excludes, retry_failed, report)

    @property
    def shards_dir(self) -> str:
        return self.options.shards_dir or str(self.ix.dir / shard_io.SHARDS_DIR)

    def _run_sources(self, store: IndexStore, plan: Any, excludes: Sequence[str], retry_failed: bool,
                     report: IndexReport) -> None:
        from feature_extraction.images.walk import collect_images
        from models.core.home import ldot_home

        with self._regions() as regions:
            # what a killed run committed but did not merge: merged first, so planning sees it
            shard_io.clean_temporary(self.shards_dir)
            for name in shard_io.committed(self.shards_dir):
                self._merge(store, regions, name, report, resumed=True)
            self.ix.stage("scanning", 0, None)
            walked: list[Any] = []
            for root in plan.roots:
                for src in collect_images([root], exclude=[ldot_home()], on_issue=plan.issues.append):
                    if not excluded(src.path, src.root, excludes):
                        walked.append(src)
            files = walked + self._keep_unknown(store, plan)
            # folders, lists and URL folders are roots as in plain `ldot index`: what left them is removed
            roots = list(dict.fromkeys(plan.roots + plan.file_roots + [i.root for i in plan.files]))
            report.found = len(files) + len(plan.issues)
            self.ix.stage("scanning", len(files), len(files))
            scan = Scan(roots, files, plan.issues)
            todo = self.ix.plan_files(store, scan, retry_failed, report) if roots else []
            self.ix.record_walk_issues(store, scan, report)
            items = [Item(s.path, s.root, s.size, s.mtime_ns) for s in todo]
            tars = self._plan_tars(store, plan.tar_sources, retry_failed, report)
            units = tars + file_units(items)
            if units:
                self._extract_on_ray(store, regions, units, len(items), report)
        self.ix.collect_garbage(store)
        self.ix.save(store, report)

    def _keep_unknown(self, store: IndexStore, plan: Any) -> list[Item]:
        """Listed files that could not be looked at (a network error) are not known to have changed: those the
        index has keep their rows as they are (a warning says so); the others are read as usual."""
        files = []
        for item in plan.files:
            reason = plan.unknown.get(item.path)
            if reason is not None:
                row = store.db.execute("SELECT size, mtime_ns FROM files WHERE path = ?",
                                       (os.fsencode(item.path),)).fetchone()
                if row is not None:
                    warnings.warn(LdotWarning(f"{reason}: what the index has of it is kept"), stacklevel=2)
                    item = Item(item.path, item.root, row[0], row[1])
            files.append(item)
        return files

    def _regions(self) -> Any:
        from contextlib import nullcontext

        if not self.ix.keep_regions:
            return nullcontext(None)
        from feature_extraction.uniter_db import UniterImageDBWriter

        return UniterImageDBWriter(self.ix.dir / REGIONS_DIR, self.ix.preset)

    def _plan_tars(self, store: IndexStore, sources: list[TarSource], retry_failed: bool,
                   report: IndexReport) -> list[Unit]:
        """Keep each tar SOURCE in step, as plain `ldot index` keeps a folder; return the shards to read.

        Shards gone from the SOURCE (no longer named by it, or no longer there) lose their rows; a shard
        that could not be looked at keeps them (reported as skipped). New and changed shards are read (a
        changed shard's unchanged members by hash only); an unchanged shard whose members are all in the
        index is not read at all.
        """
        todo = []
        for source in sources:
            alive = {u.tar for u in source.units if u.tar} | {shard for shard, _ in source.failed}
            gone = set(source.missing) | (_covered_shards(store, source) - alive)
            root = os.fsencode(source.root)
            with store.transaction() as db:
                for shard in sorted(gone):
                    report.removed += _delete_shard(db, shard)
                for shard in sorted(alive):  # rows indexed under an earlier SOURCE naming this shard move here
                    lo, hi = _member_range(shard)
                    db.execute("UPDATE files SET root = ? WHERE path >= ? AND path < ? AND root != ?",
                               (root, lo, hi, root))
                # an earlier run's "could not be read" row of a shard that is there now: read, or unchanged
                db.executemany("DELETE FROM files WHERE path = ?", [(os.fsencode(u.tar),) for u in source.units if u.tar])
                for shard, reason in source.failed:
                    _shard_failed(db, shard, source.root, reason, report)
            for unit in source.units:
                lo, hi = _member_range(unit.tar or "")
                row = store.db.execute("SELECT size, mtime_ns, total FROM units WHERE id = ?", (unit.id,)).fetchone()
                indexed, skipped, again = store.db.execute(
                    "SELECT COALESCE(SUM(status = 'indexed'), 0), COALESCE(SUM(status = 'skipped'), 0), "
                    "COALESCE(SUM(status = 'skipped' AND (retry = 1 OR ?)), 0) FROM files WHERE path >= ? AND path < ?",
                    (int(retry_failed), lo, hi)).fetchone()
                if (row is not None and (row[0], row[1]) == (unit.size, unit.mtime_ns) and row[2] is not None
                        and indexed + skipped >= row[2] and not again):
                    report.found += indexed + skipped
                    report.unchanged += indexed
                    report.skipped_before += skipped
                    continue
                known = [h for (h,) in store.db.execute(
                    "SELECT DISTINCT content_hash FROM files WHERE path >= ? AND path < ? AND status = 'indexed' "
                    "AND content_hash IS NOT NULL", (lo, hi))]
                with store.transaction() as db:
                    db.execute("INSERT OR REPLACE INTO units (id, source, size, mtime_ns, total, merged) "
                               "VALUES (?, ?, ?, ?, NULL, 0)", (unit.id, unit.tar, unit.size, unit.mtime_ns))
                todo.append(dataclasses.replace(unit, known=tuple(known)))
                self._tar_units.add(unit.id)
        return todo

    def _model_sources(self) -> tuple[str, str, Any]:
        """(detector, bi-encoder, preprocess) as the workers get them: the driver's resolved paths + names. A dual
        encoder gets no detector ("") and its own image processor's preprocessing."""
        from pathlib import Path

        from feature_extraction.detector.preprocess import preprocess
        from feature_extraction.detector.weights import CONFIG_FILE, read_config
        from models.hub.load import resolve_source

        if self.ix.pixels:
            from models.hub.dual import dual_preprocess

            if self.ix.keep_regions:
                raise RayError(f"{option('ray')} indexes a model that reads pixels ({self.ix.model}) without region "
                               f"features: leave out {option('regions')} (or index without {option('ray')})")
            model_path = resolve_source(self.ix.model)
            return "", f"{model_path}\0{self.ix.model}", dual_preprocess(model_path)
        if self.ix.detector_name is None:
            raise RayError(f"{option('ray')}: no detector for the region features of {self.ix.model}")
        detector_path = Path(resolve_source(self.ix.detector_name))
        config_dir = detector_path if detector_path.is_dir() else detector_path.parent
        config = read_config(config_dir) if (config_dir / CONFIG_FILE).is_file() else None
        model_path = resolve_source(self.ix.model)
        return (f"{detector_path}\0{self.ix.detector_name}", f"{model_path}\0{self.ix.model}",
                functools.partial(preprocess, config=config))

    def _extract_on_ray(self, store: IndexStore, regions: Any, units: list[Unit], known_images: int,
                        report: IndexReport) -> None:
        ray = connect(self.options)  # ray, with ray.data imported
        self.layout = layout = plan_layout(ray.cluster_resources(), self.options, self.ix.options.device)
        detector, model, preprocess = self._model_sources()
        total = known_images if all(u.tar is None for u in units) else None
        self.ix.stage("extracting", 0, total)
        ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units], override_num_blocks=len(units))
        ds = ds.flat_map(decode_unit, fn_kwargs={"preprocess": preprocess, "max_pixels": _max_pixels()},
                         num_cpus=1)
        ds = ds.map_batches(
            Extractor, batch_size=layout.shard_size, batch_format="numpy", concurrency=layout.actors,
            num_cpus=layout.num_cpus, num_gpus=layout.num_gpus or None,
            fn_constructor_kwargs={"detector": detector, "model": model, "preset": self.ix.preset,
                                   "device": layout.device, "detector_batch": self.ix.options.batch_size,
                                   "shards_dir": self.shards_dir, "keep_regions": self.ix.keep_regions,
                                   "threads": int(layout.num_cpus)})
        done = 0
        for row in ds.iter_rows():
            done += self._merge(store, regions, str(row["name"]), report)
            self.ix.stage("extracting", done, total)
            hooks.fire(hooks.committed, done)
        self.ix.stage("extracting", done, done)

    def _merge(self, store: IndexStore, regions: Any, name: str, report: IndexReport, resumed: bool = False) -> int:
        """Merge one committed shard (idempotent); returns the file rows it held."""
        from feature_extraction.uniter_db import SourceStamp

        got = shard_io.read(self.shards_dir, name)
        if got is None:
            return 0  # not committed (or damaged): its images are planned again
        shard, info = got
        run_report = report
        if resumed:  # a killed run's shard: its files are counted by this run's planning (as unchanged), not here
            report = IndexReport(report.name)  # too; what it removed is counted (the planning cannot see it now)
        seen = store.db.execute("SELECT sha256 FROM shards WHERE id = ?", (name,)).fetchone()
        if seen is None:
            if regions is not None:
                for row in shard.rows:
                    record = shard.records[row["vec"]] if "vec" in row else None
                    if record is not None:
                        regions.put(row["hash"], record, SourceStamp(row["path"], row["size"], row["mtime_ns"]))
                regions.commit()
            with store.transaction() as db:
                if shard.vectors and store.dim is None:
                    store.update_meta(db, dim=len(shard.vectors[0]))
                files = []
                for row in shard.rows:
                    if "end" in row:
                        if row.get("complete", True):  # a read that stopped part-way leaves the shard to read again
                            db.execute("UPDATE units SET total = ? WHERE id = ?", (row["total"], row["end"]))
                        if row.get("complete") and row.get("members") is not None and row.get("tar"):
                            run_report.removed += _prune(db, row["tar"], row["members"])
                        continue
                    if "failed" in row:  # a shard that could not be read to its end: its rows stay
                        _shard_failed(db, row["tar"], row["root"], row["reason"], None if resumed else report)
                        continue
                    vid = None
                    if row.get("known"):  # unchanged content of a re-read shard: its vector is already here
                        vid = store.vector_for_hash(row["hash"])
                        if vid is None:
                            row = {**row, "reason": "its content left the index while the shard was read: "
                                                    "it is read again next run", "retry": True}
                        else:
                            before = db.execute("SELECT content_hash, status FROM files WHERE path = ?",
                                                (os.fsencode(row["path"]),)).fetchone()
                            if before is not None and tuple(before) == (row["hash"], "indexed"):
                                report.unchanged += 1
                            else:
                                report.reused += 1
                    elif "vec" in row:
                        vid = store.vector_for_hash(row["hash"])
                        if vid is None:
                            vector = np.asarray(shard.vectors[row["vec"]], dtype=np.float32)
                            vid = store.add_vector(db, row["hash"], vector, int(row["boxes"]))
                            report.encoded += 1
                        else:
                            report.reused += 1
                    files.append(_file_row(row, vid))
                    if vid is None:
                        report.skipped.append((row["path"], row["reason"]))
                store.put_files(db, files)
                db.execute("INSERT OR REPLACE INTO shards (id, sha256, bytes, rows, merged) VALUES (?, ?, ?, ?, ?)",
                           (name, info["sha256"], info["bytes"], info["rows"], time.time()))
            if not resumed:  # loose files were counted by the scan; tar members are counted as they arrive
                report.found += sum(1 for r in shard.rows if "end" not in r and r.get("unit") in self._tar_units)
        shard_io.remove(self.shards_dir, name)
        return sum(1 for r in shard.rows if "path" in r)


def _file_row(row: dict[str, Any], vector_id: int | None) -> FileRow:
    class _Src:  # the walked-file shape `file_row` reads
        path, root, size, mtime_ns = row["path"], row["root"], row["size"], row["mtime_ns"]

    return file_row(_Src, row.get("hash"), vector_id, row.get("reason"), bool(row.get("retry")))


def _member_range(tar: str) -> tuple[bytes, bytes]:
    """[lo, hi): the paths of a tar shard's members (``SHARD#MEMBER``), for an indexed range query."""
    prefix = os.fsencode(tar + "#")
    return prefix, prefix[:-1] + bytes([prefix[-1] + 1])


def _shard_of(path: bytes) -> str:
    """The tar shard a member's path names (a row of the shard itself, from an older ldot: the path)."""
    at = path.lower().find(b".tar#")
    return os.fsdecode(path[:at + 4] if at >= 0 else path)


def _covered_shards(store: IndexStore, source: TarSource) -> set[str]:
    """Shards with rows under this SOURCE, or under an earlier one of the same folder and name pattern that
    this one takes over (it names at least one of that one's shards: ``{0..9}`` then ``{0..7}``; a SOURCE
    naming none of them, ``{10..19}``, is another root, as another folder would be)."""
    named = set(source.named)
    roots = [source.root]
    for (raw,) in store.db.execute("SELECT DISTINCT root FROM files"):
        other = os.fsdecode(raw)
        if other == source.root or not other.lower().endswith(TAR_SUFFIXES) or tar_family(other) != tar_family(source.root):
            continue
        try:
            if not named.isdisjoint(expand_braces(other)):
                roots.append(other)
        except SourceError:
            continue
    shards: set[str] = set()
    for root in roots:
        for (path,) in store.db.execute("SELECT path FROM files WHERE root = ?", (os.fsencode(root),)):
            shards.add(_shard_of(path))
    return shards


def _delete_shard(db: Any, shard: str) -> int:
    """Drop every row of a shard that is gone (inside the caller's transaction); returns how many."""
    lo, hi = _member_range(shard)
    count = db.execute("DELETE FROM files WHERE path >= ? AND path < ?", (lo, hi)).rowcount
    count += db.execute("DELETE FROM files WHERE path = ?", (os.fsencode(shard),)).rowcount
    db.execute("DELETE FROM units WHERE source = ?", (shard,))
    return max(0, count)


def _shard_failed(db: Any, shard: str, root: str, reason: str, report: IndexReport | None) -> None:
    """A shard that could not be read: one skipped row of its own (`ldot status --errors` shows why; tried
    again next run) and a warning line; the rows of its members are left as they are."""
    IndexStore.put_files(db, [FileRow(os.fsencode(shard), os.fsencode(root), 0, 0, None, "skipped", reason, 1, None)])
    if report is not None:
        report.found += 1
        report.skipped.append((shard, reason))
        warnings.warn(LdotWarning(reason), stacklevel=2)


def _prune(db: Any, tar: str, members: list[str]) -> int:
    """After a complete read of a shard: drop the rows of members it no longer holds; returns how many."""
    lo, hi = _member_range(tar)
    keep = {os.fsencode(m) for m in members}
    stale = [p for (p,) in db.execute("SELECT path FROM files WHERE path >= ? AND path < ?", (lo, hi)) if p not in keep]
    stale += [p for (p,) in db.execute("SELECT path FROM files WHERE path = ?", (os.fsencode(tar),))]
    db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in stale])
    return len(stale)


def _max_pixels() -> int:
    from feature_extraction.images.decode import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS
