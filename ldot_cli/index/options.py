"""How one `ldot index` run works: `IndexOptions` (and `RayOptions` when the model work runs on a Ray cluster).

A light module (no numpy, no torch): the command line builds the options before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.core.errors import LdotError

LOCAL = "local"  # `--ray` with no address: a Ray instance started for this run


@dataclass(frozen=True)
class RayOptions:
    """How to run on the cluster; None: chosen from the resources Ray reports."""

    address: str = LOCAL  # "local", "auto" (the cluster this machine belongs to) or an address
    actors: int | None = None  # model copies (actor pool size)
    cpus_per_actor: int | None = None  # CPU-only clusters: cores per model copy
    gpus_per_actor: float | None = None  # GPU clusters: GPUs per model copy (1: one copy per GPU)
    shard_size: int | None = None  # images per model call and per output shard
    shards_dir: str | None = None  # where workers write shards (default: the index's shards/)
    num_cpus: int | None = None  # a local instance's cores (default: all)


@dataclass(frozen=True)
class IndexOptions:
    """`ldot index`'s choices. ``model``, ``detector`` and ``preset`` default to the ones the index was built
    with, and for a new index to the defaults (`models.hub.installed.default_bi_encoder`: flickr-ft when it is in
    the cache, else clip-vit-b32; `DEFAULT_DETECTOR`, `DEFAULT_PRESET`)."""

    model: str | None = None  # the bi-encoder: a catalogue name, a folder, a .pt or hf:ORG/NAME
    detector: str | None = None  # region detector weights (a catalogue name or a path)
    preset: str | None = None  # box selection: uniter or lxmert36
    # None: the model's way (a region model keeps its region features; a dual encoder, which reads pixels,
    # extracts none unless asked, or the index already has them)
    keep_regions: bool | None = None
    device: str = "auto"  # auto (a GPU when there is one), cpu or cuda
    batch_size: int = 8  # images per detector batch
    num_workers: int = 2  # image-decoding processes (0: decode in this process)
    ann: str | None = None  # the vector index: auto, exact, ivf or ivfpq (None: the index's own, else auto)
    memory_budget: int | None = None  # bytes the vector index may take in RAM (None: half the machine's)
    ray: RayOptions | None = None  # run the model work on a Ray cluster (None: in this process)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LdotError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.num_workers < 0:
            raise LdotError(f"num_workers must be 0 or more, not {self.num_workers}")
        if self.ann not in (None, "auto", "exact", "ivf", "ivfpq"):
            raise LdotError(f"ann must be auto, exact, ivf or ivfpq, not {self.ann!r}")
