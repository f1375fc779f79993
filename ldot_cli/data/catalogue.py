"""The public benchmarks and training sets ldot can fetch: where each file is, its size, hash and terms.

Facts (URLs, pinned revisions, columns, sizes, licences) come from the project's data-sources sheet; what it
marks unverified is said so here. Hub URLs (``hf://``) honour ``HF_ENDPOINT`` like the Hugging Face tools.
No sha256 is published for these files: the first verified fetch records it in ``<home>/known_hashes.json``
(trust on first use, as for models) and later fetches and `ldot data verify` check against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HUB = "hf://datasets/"
FLICKR_1K_REPO = "nlphuji/flickr_1k_test_image_text_retrieval"
FLICKR_1K_REV = "c4a4cdc67b77fce148b45484a067957bf75ec4c3"
FLICKR_FULL_REPO = "nlphuji/flickr30k"
FLICKR_FULL_REV = "2b239befc81b6e3f035ce6bd52f5f4d60f5625f7"
COCO_KARPATHY_REPO = "yerevann/coco-karpathy"
COCO_KARPATHY_REV = "main"  # no commit in the facts sheet: the first verified fetch records each file's sha256
MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
# CLIP_benchmark's webdataset copy of the Flickr30k 1K test (jpg + txt per sample, no file names): the fallback
WDS_FLICKR_REPO = "clip-benchmark/wds_flickr30k"
WDS_FLICKR_REV = "f8af3ceee1b944bf761340682621dfafd23974d2"
# Per-image COCO hosts, tried in order (the official JSON's coco_url, then the same bucket over HTTPS).
COCO_IMAGE_HOSTS = ("http://images.cocodataset.org/", "https://s3.amazonaws.com/images.cocodataset.org/")
COCO_ZIP_HOSTS = ("http://images.cocodataset.org/zips/", "https://s3.amazonaws.com/images.cocodataset.org/zips/")
GITHUB_RAW = "https://raw.githubusercontent.com/"

FLICKR_TERMS = ("Flickr30k images: Flickr Terms of Use, for non-commercial research and education only "
                "(flickr30k_entities); the hub copy states no licence")
COCO_TERMS = ("COCO captions: CC BY 4.0; the images belong to their Flickr authors (Flickr Terms of Use, each "
              "image's own licence)")
MULTI30K_TERMS = "Multi30K captions: licence not stated (unverified); images are Flickr30k's (" + FLICKR_TERMS + ")"


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset, saved as ``downloads/<name>`` in the dataset's folder."""

    name: str
    urls: tuple[str, ...]  # mirrors, tried in order
    size: int | None = None  # published size in bytes, when known
    sha256: str | None = None  # published sha256, when known
    extract_to: str | None = None  # a zip: its images go flat into this sub-folder
    approx: int = 0  # approximate bytes when the size is not published


@dataclass(frozen=True)
class DataSplit:
    """A fetchable split of a dataset: its files, sizes, terms and the counts its data must show."""

    dataset: str  # flickr30k | coco | multi30k
    split: str  # test | train
    description: str
    files: tuple[DataFile, ...]
    terms: str
    images: int  # images the split must have (checked on the data)
    captions: int | None = None  # captions it must have, when known
    per_image_bytes: int = 0  # COCO test: images fetched one by one, about this many bytes in all
    requires: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (dataset, split) fetched first

    @property
    def licence(self) -> str:
        """The terms in a few words (the full text is `terms`)."""
        return {"flickr30k": "non-commercial", "coco": "CC BY 4.0 + Flickr",
                "multi30k": "unstated + Flickr"}[self.dataset]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def approx_bytes(self) -> int:
        return sum(f.size or f.approx for f in self.files) + self.per_image_bytes


def _hub(repo: str, rev: str, path: str) -> str:
    return f"{HUB}{repo}/resolve/{rev}/{path}"


def _multi30k(path: str) -> str:
    return f"{GITHUB_RAW}multi30k/dataset/{MULTI30K_COMMIT}/{path}"


def multi30k_files(lang: str) -> tuple[DataFile, ...]:
    return (DataFile(f"test_2016_flickr.{lang}.gz", (_multi30k(f"data/task1/raw/test_2016_flickr.{lang}.gz"),),
                     approx=30_000),
            DataFile("test_2016_flickr.txt", (_multi30k("data/task1/image_splits/test_2016_flickr.txt"),),
                     approx=15_000))


SPLITS: tuple[DataSplit, ...] = (
    DataSplit("flickr30k", "test", "Flickr30k 1K test (Karpathy split): the images zip + captions CSV",
              (DataFile("images_flickr_1k_test.zip", (_hub(FLICKR_1K_REPO, FLICKR_1K_REV, "images_flickr_1k_test.zip"),),
                        approx=141_000_000, extract_to="flickr30k-images"),
               DataFile("test_1k_flickr.csv", (_hub(FLICKR_1K_REPO, FLICKR_1K_REV, "test_1k_flickr.csv"),),
                        approx=1_130_000)),
              FLICKR_TERMS, images=1000, captions=5000),
    DataSplit("flickr30k", "train", "Flickr30k, all 31,783 images (Karpathy train 29,000 / val 1,014 / test 1,000)",
              (DataFile("flickr30k-images.zip", (_hub(FLICKR_FULL_REPO, FLICKR_FULL_REV, "flickr30k-images.zip"),),
                        approx=4_390_000_000, extract_to="flickr30k-images"),
               DataFile("flickr_annotations_30k.csv", (_hub(FLICKR_FULL_REPO, FLICKR_FULL_REV,
                                                              "flickr_annotations_30k.csv"),), approx=12_900_000)),
              FLICKR_TERMS, images=29000),
    DataSplit("coco", "test", "COCO 5K test (Karpathy split): captions parquet + its 5,000 val2014 images, one by one",
              (DataFile("test-00000-of-00001.parquet",
                        (_hub(COCO_KARPATHY_REPO, COCO_KARPATHY_REV, "data/test-00000-of-00001.parquet"),),
                        approx=1_070_000),),
              COCO_TERMS, images=5000, captions=25010, per_image_bytes=800_000_000),
    DataSplit("coco", "train", "COCO 2014 train + val zips with the Karpathy train/restval/val/test captions",
              (DataFile("train2014.zip", tuple(h + "train2014.zip" for h in COCO_ZIP_HOSTS), size=13_510_573_713,
                        extract_to="train2014"),
               DataFile("val2014.zip", tuple(h + "val2014.zip" for h in COCO_ZIP_HOSTS), size=6_645_013_297,
                        extract_to="val2014"),
               *(DataFile(f"{s}-00000-of-00001.parquet",
                          (_hub(COCO_KARPATHY_REPO, COCO_KARPATHY_REV, f"data/{s}-00000-of-00001.parquet"),),
                          approx=a)
                 for s, a in (("train", 17_000_000), ("validation", 1_070_000), ("restval", 6_320_000),
                              ("test", 1_070_000)))),
              COCO_TERMS, images=82783 + 30504),
    DataSplit("multi30k", "test", "Multi30K 2016 test captions (one per image, pinned commit) on the Flickr30k "
              "1K test images", multi30k_files("de"), MULTI30K_TERMS, images=1000, captions=1000,
              requires=(("flickr30k", "test"),)),
)
DATASETS = ("flickr30k", "coco", "multi30k")

# Another copy of a split, tried when its primary source is unreachable (not when a transfer can resume).
COCO_5K_REPO = "nlphuji/mscoco_2014_5k_test_image_text_retrieval"
COCO_5K_REV = "main"  # no commit in the facts sheet: the first verified fetch records each file's sha256
FALLBACKS: dict[str, DataSplit] = {
    "coco/test": DataSplit("coco", "test", "COCO 5K test as one zip + captions CSV (nlphuji; DataComp uses it)",
                           (DataFile("images_mscoco_2014_5k_test.zip",
                                     (_hub(COCO_5K_REPO, COCO_5K_REV, "images_mscoco_2014_5k_test.zip"),),
                                     approx=818_000_000, extract_to="val2014"),
                            DataFile("test_5k_mscoco_2014.csv", (_hub(COCO_5K_REPO, COCO_5K_REV,
                                                                      "test_5k_mscoco_2014.csv"),), approx=5_010_000)),
                           COCO_TERMS, images=5000, captions=25010),
}


def wds_flickr_url(path: str) -> str:
    """A file of the CLIP_benchmark webdataset copy of the Flickr30k test (``test/nshards.txt``, ``test/<n>.tar``)."""
    return _hub(WDS_FLICKR_REPO, WDS_FLICKR_REV, path)


WDS_FLICKR_BYTES = 145_600_000  # test/0..4.tar


def find_split(dataset: str, split: str = "test", lang: str = "de") -> DataSplit:
    """The catalogue entry of ``dataset``/``split`` (Multi30K: its files for ``lang``)."""
    from dataclasses import replace

    from ldot_cli.data.errors import DatasetError
    from models.core.errors import option

    for entry in SPLITS:
        if entry.dataset == dataset and entry.split == split:
            return replace(entry, files=multi30k_files(lang)) if dataset == "multi30k" else entry
    known = ", ".join(f"{e.dataset} {e.split}" for e in SPLITS)
    raise DatasetError(f"ldot cannot fetch the {split} split of {dataset}; it knows: {known} (or pass "
                       f"{option('data')} DIR)")
