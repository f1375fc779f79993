"""What `ldot index --ray` reads: folders, file lists and webdataset tar shards, local or on any fsspec URL.

A SOURCE is one of

* a local folder or image file: walked exactly as plain `ldot index` walks it (same paths, roots, sizes
  and mtimes, so both paths give the same file rows);
* a folder on an fsspec URL (``s3://bucket/photos``, ``gs://...``, ``http://host/...`` listings): every
  file under it with an image extension;
* a file list (``*.txt`` / ``*.lst``, local or a URL): one image path or URL per line (``#`` comments and
  blank lines ignored; relative paths are relative to the list's folder);
* webdataset tar shards (``*.tar``; a brace range ``shards/{00000..09999}.tar`` names many, the layout
  img2dataset writes): every member with an image extension is one image, named ``<shard>#<member>``. The
  SOURCE as given (brace range kept) is the root of its shards' file rows: the index is kept in step with
  it as with a folder (see `TarSource`).

Loose files are grouped into work units of `FILES_PER_UNIT`; a tar shard is one unit. Everything here
runs on the driver except `read_unit`, which a Ray task runs wherever the cluster puts it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from feature_extraction.images.decode import IMAGE_EXTENSIONS
from models.core.errors import LdotError
from models.core.tarfiles import read_tar

FILES_PER_UNIT = 64
LIST_SUFFIXES = (".txt", ".lst")
TAR_SUFFIXES = (".tar",)
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class SourceError(LdotError):
    """A SOURCE that cannot be read or understood."""


@dataclass(frozen=True)
class Item:
    """One image to index (the attributes the indexer's planning reads)."""

    path: str  # absolute local path, URL, or "<tar shard>#<member>"
    root: str  # the SOURCE it was found under
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Unit:
    """One piece of work for a decoding task: some loose files, or one whole tar shard."""

    id: str
    root: str
    items: tuple[Item, ...] = ()  # loose files
    tar: str | None = None  # a tar shard's path or URL
    size: int = 0  # the tar shard's size and mtime: a changed shard is read again
    mtime_ns: int = 0
    known: tuple[str, ...] = ()  # content hashes of the shard's indexed members: read, hashed, not decoded


@dataclass
class TarSource:
    """One tar SOURCE (a shard, or a brace range of them) as this run sees it.

    ``root`` is the SOURCE as given (absolute for local paths, brace range kept): the root of its members'
    file rows. Shards it names that do not exist (any more) are `missing`; shards that could not even be
    looked at (a network error) are `failed`: their rows stay as they are.
    """

    root: str
    units: list[Unit] = field(default_factory=list)  # shards that exist
    missing: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard, why)

    @property
    def named(self) -> list[str]:
        return expand_braces(self.root)


@dataclass
class Plan:
    """The SOURCEs expanded: loose files (planned per file against the index) and tar shards."""

    roots: list[str] = field(default_factory=list)  # local folders/files, walked like plain `ldot index`
    files: list[Item] = field(default_factory=list)  # loose files from URLs and lists
    file_roots: list[str] = field(default_factory=list)  # the lists and URL folders (roots of those files)
    tar_sources: list[TarSource] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)  # listed files that could not be looked at: why
    issues: list[Any] = field(default_factory=list)  # walk issues of local folders


def is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def expand_braces(source: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar a/001.tar a/002.tar`` (zero padding kept; several ranges nest)."""
    match = _BRACE.search(source)
    if not match:
        return [source]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise SourceError(f"empty range {{{lo}..{hi}}} in {source}: write the smaller number first")
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for n in range(int(lo), int(hi) + 1):
        out += expand_braces(source[: match.start()] + str(n).zfill(width) + source[match.end():])
    return out


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith("._") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _mtime_ns(info: dict[str, Any]) -> int:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified", info.get("updated"))))
    if value is None:
        return 0
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    try:
        return int(float(value) * 1e9)
    except (TypeError, ValueError):
        return 0


def _unit_id(*parts: object) -> str:
    return hashlib.sha1("\0".join(str(p) for p in parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def plan_sources(sources: list[str]) -> Plan:
    """Expand the SOURCEs (listing folders and URLs; tar shards are not opened here)."""
    plan = Plan()
    for raw in sources:
        named = expand_braces(raw)
        if all(n.lower().endswith(TAR_SUFFIXES) for n in named):
            plan.tar_sources.append(_tar_source(raw, named))
            continue
        for source in named:
            _add(plan, source)
    return plan


def tar_root(raw: str) -> str:
    """The root a tar SOURCE's rows carry: the SOURCE as given, absolute when local."""
    if is_url(raw):
        return raw
    return os.path.abspath(raw.removeprefix("file://"))


def tar_family(root: str) -> str:
    """A tar SOURCE's shards folder and name pattern, ranges left out: ``/data/shards/{}.tar``."""
    return _BRACE.sub("{}", root)


def _tar_source(raw: str, named: list[str]) -> TarSource:
    """Look at every shard the SOURCE names (size and mtime; the shards are not opened here)."""
    root = tar_root(raw)
    source = TarSource(root)
    for shard in expand_braces(root):
        try:
            if is_url(shard):
                fs, path = _fs(shard)
                info = fs.info(path)
                size, mtime_ns = int(info.get("size") or 0), _mtime_ns(info)
            else:
                st = os.stat(shard)
                size, mtime_ns = st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            source.missing.append(shard)
            continue
        except Exception as exc:  # network/auth/permission errors: this shard is not known to be gone
            source.failed.append((shard, f"cannot look at tar shard {shard} ({type(exc).__name__}: {exc})"))
            continue
        source.units.append(Unit(_unit_id("tar", shard), root, tar=shard, size=size, mtime_ns=mtime_ns))
    if not source.units and not source.failed:
        if len(named) == 1:
            raise SourceError(f"{source.missing[0]} does not exist: give a folder, a file list or tar shards to index")
        raise SourceError(f"none of the {len(named)} tar shards {root} names exists (e.g. {source.missing[0]}): "
                          "check the path and the range")
    return source


def _add(plan: Plan, source: str) -> None:
    lower = source.lower()
    if is_url(source):
        fs, path = _fs(source)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise SourceError(f"{source} does not exist (or is not readable from here)") from None
        except Exception as exc:  # network/auth errors of any fsspec backend
            raise SourceError(f"cannot read {source}: {type(exc).__name__}: {exc}") from None
        if info.get("type") == "directory":
            plan.file_roots.append(source)
            protocol = source.split("://", 1)[0]
            for name, meta in sorted(fs.find(path, detail=True).items()):
                if _is_image_name(name):
                    url = name if "://" in name else f"{protocol}://{name}"
                    plan.files.append(Item(url, source, int(meta.get("size") or 0), _mtime_ns(meta)))
        elif lower.endswith(LIST_SUFFIXES):
            _add_list(plan, source, fs.cat_file(path))
        else:
            plan.files.append(Item(source, source, int(info.get("size") or 0), _mtime_ns(info)))
        return
    local = os.path.abspath(source[len("file://"):] if source.startswith("file://") else source)
    if not os.path.exists(local):
        raise SourceError(f"{local} does not exist: give a folder, a file list or tar shards to index")
    if os.path.isfile(local) and lower.endswith(LIST_SUFFIXES):
        with open(local, "rb") as handle:
            _add_list(plan, local, handle.read())
    else:
        plan.roots.append(local)


def _add_list(plan: Plan, source: str, data: bytes) -> None:
    plan.file_roots.append(source)  # an entry taken off the list is removed from the index, even the last one
    base = source.rsplit("/", 1)[0] if is_url(source) else os.path.dirname(source)
    for number, raw in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if is_url(line):
            fs, path = _fs(line)
            try:
                info = fs.info(path)
            except FileNotFoundError:
                info = {}
            except Exception as exc:  # not known to be gone: the driver keeps what the index has of it
                plan.unknown[line] = f"cannot look at {line} ({type(exc).__name__}: {exc})"
                info = {}
            plan.files.append(Item(line, source, int(info.get("size") or 0), _mtime_ns(info)))
            continue
        path = line if os.path.isabs(line) or is_url(source) else os.path.join(base, line)
        if is_url(source) and not os.path.isabs(line):
            path = f"{base}/{line}"
            plan.files.append(Item(path, source, 0, 0))
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            plan.unknown[os.path.abspath(path)] = f"cannot look at {path} ({type(exc).__name__}: {exc})"
            st = None
        plan.files.append(Item(os.path.abspath(path), source, st.st_size if st else 0, st.st_mtime_ns if st else 0))


def file_units(items: list[Item], per_unit: int = FILES_PER_UNIT) -> list[Unit]:
    """Loose files in work units of ``per_unit`` (in order: neighbouring files share a unit)."""
    return [Unit(_unit_id("files", *(i.path for i in items[s:s + per_unit])), items[s].root,
                 items=tuple(items[s:s + per_unit])) for s in range(0, len(items), per_unit)]


# -- worker side -------------------------------------------------------------------------------------
class Refusal(str):
    """Why an image is skipped for good: the same shard skips it again (no retry), unlike an unreadable file."""


def read_unit(unit: Unit) -> Iterator[tuple[Item, bytes | None, str | None]]:
    """(item, its bytes, None) or (item, None, why not: a `Refusal` when for good) for every image of the unit.
    Every image-named member of a tar has a row of its own: a later member of an earlier member's name is
    ``SHARD#NAME#2`` (skipped: the first wins), a link member is skipped (never followed)."""
    if unit.tar is None:
        for item in unit.items:
            try:
                if is_url(item.path):
                    fs, path = _fs(item.path)
                    data = fs.cat_file(path)
                else:
                    with open(item.path, "rb") as handle:
                        data = handle.read()
            except Exception as exc:  # any backend's error is this file's
                yield item, None, f"unreadable file ({type(exc).__name__}: {exc})"
                continue
            yield item, data, None
        return
    yield from _read_tar(unit)


def _read_tar(unit: Unit) -> Iterator[tuple[Item, bytes | None, str | None]]:
    import fsspec

    if unit.tar is None:
        raise SourceError("a unit of loose files has no tar shard to read")
    try:
        handle: BinaryIO = fsspec.open(unit.tar, "rb").open() if is_url(unit.tar) else open(unit.tar, "rb")
    except Exception as exc:
        raise SourceError(f"cannot open tar shard {unit.tar}: {type(exc).__name__}: {exc}") from None
    with handle:
        try:
            size = os.fstat(handle.fileno()).st_size
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            size = unit.size
        try:
            seen: dict[str, int] = {}
            for member, data in read_tar(handle, lambda m: _is_image_name(m.name), size, links=True):
                occurrence = seen[member.name] = seen.get(member.name, 0) + 1
                path = f"{unit.tar}#{member.name}" + (f"#{occurrence}" if occurrence > 1 else "")
                item = Item(path, unit.root, int(member.size), int(member.mtime) * 1_000_000_000)
                if occurrence > 1:  # one rule, whatever the order shards are merged in: the first one wins
                    yield item, None, Refusal(f"a later member named {member.name!r} in this tar shard (member "
                                              f"{occurrence} of that name): only the first is indexed")
                elif data is None:
                    kind = "symbolic" if member.issym() else "hard"
                    yield item, None, Refusal(f"a {kind} link inside the tar shard (to {member.linkname!r}): "
                                              "links are not followed")
                else:
                    yield item, data, None
        except Exception as exc:  # a damaged tar, a network error of any fsspec backend: this shard's
            raise SourceError(f"tar shard {unit.tar} could not be read to its end ({type(exc).__name__}: {exc}); "
                              "its rows are kept: fix or remove it") from None


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A tar archive of ``name -> bytes`` (tests and tools that write webdataset shards)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
