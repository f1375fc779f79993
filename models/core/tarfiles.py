"""The one tar reader of ldot: webdataset shards indexed by `ldot index --ray` and fetched by `ldot data get`.

An archive is read in one pass as a stream (no seeks, so a local file and any fsspec file object alike), and
nothing is ever written to disk by a member's name here: each member's bytes go to the caller, which decides
where they belong. Only regular files are read (links, devices and folders never are); the caller's ``select``
sees every member first, to skip it or to refuse the whole archive by raising (each caller keeps its own checks).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal, overload


@overload
def read_tar(handle: BinaryIO, select: Callable[[tarfile.TarInfo], bool], size: int | None = None,
             links: Literal[False] = False) -> Iterator[tuple[tarfile.TarInfo, bytes]]: ...


@overload
def read_tar(handle: BinaryIO, select: Callable[[tarfile.TarInfo], bool], size: int | None = None,
             links: bool = False) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]: ...


def read_tar(handle: BinaryIO, select: Callable[[tarfile.TarInfo], bool], size: int | None = None,
             links: bool = False) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """(member, its bytes) for each regular file member of the tar in ``handle`` that ``select`` accepts, in
    archive order; with ``links``, also (member, None) for each symbolic or hard link it accepts (never
    followed: the caller says why it is skipped). ``size``: the archive's length in bytes, when known; an
    uncompressed tar cut at a member boundary reads as a shorter valid one, and only its missing end-of-archive
    blocks tell: with ``size`` that is a `tarfile.ReadError`. Damaged archives raise `tarfile.TarError`,
    `OSError` or `EOFError`."""
    with tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if not select(member):
                continue
            if not member.isfile():
                if links and (member.issym() or member.islnk()):
                    yield member, None
                continue
            extracted = tar.extractfile(member)
            yield member, extracted.read() if extracted is not None else b""
        if size and getattr(tar.fileobj, "comptype", "tar") == "tar" and size - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"it ends after {tar.offset} bytes without the end-of-archive blocks: cut short?")
