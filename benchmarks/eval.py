"""Full-size `ldot eval` timing with random weights: 1,000 images x 5,000 captions by default.

A base-size bi-encoder (``models.nn.config.preset("base")``, random init) and a base UNITER cross-encoder
(random init) run the real evaluation path (`ldot_cli.eval.evaluation.evaluate`): region features read from a
UNITER image DB (36 random regions per image), captions as word-piece ids (as from a UNITER text DB),
FAISS flat IP search both ways, optional top-M re-ranking, and the cross-encoder's full-matrix time
extrapolated from a sample of pairs. Recalls are meaningless here (random weights); timings are not.

    python benchmarks/eval.py                      # 1,000 x 5,000 (GPU when present)
    python benchmarks/eval.py --images 100 --device cpu
    python benchmarks/eval.py --images 1000 --rerank-k 10 --rerank-k 100 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 28996  # bert-base-cased
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(directory: Path) -> Path:
    """A WordPiece vocab of the base size: specials, then w5 … w28995 (one word = one token)."""
    path = directory / "vocab.txt"
    path.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)]) + "\n")
    return path


def build_set(root: Path, n_images: int, per_image: int, regions: int, seed: int = 0):
    """A RetrievalSet over a UNITER image DB of random regions and random 8-20 word-piece captions."""
    import lmdb
    import msgpack
    import msgpack_numpy

    from ldot_cli.data.retrieval_sets import Caption, EvalImage, RetrievalSet

    rng = np.random.default_rng(seed)
    db = root / "img_db"
    db.mkdir(parents=True)
    env = lmdb.open(str(db / "feat_th0.2_max100_min10"), map_size=1 << 36)
    keys = [f"flickr30k_{i:012d}.npz" for i in range(n_images)]
    with env.begin(write=True) as txn:
        for key in keys:
            xy = rng.uniform(0, 0.6, (regions, 2))
            wh = rng.uniform(0.05, 0.4, (regions, 2))
            record = {"features": np.abs(rng.standard_normal((regions, 2048))).astype(np.float16),
                      "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float16),
                      "conf": np.full((regions, 1), 0.5, np.float16)}
            txn.put(key.encode(), msgpack.packb(record, default=msgpack_numpy.encode, use_bin_type=True))
    env.close()
    (db / "nbb_th0.2_max100_min10.json").write_text(json.dumps({k: regions for k in keys}))
    captions = []
    for j in range(n_images):
        for _ in range(per_image):
            ids = rng.integers(len(SPECIALS), VOCAB, int(rng.integers(8, 21)))
            captions.append(Caption(str(len(captions)), " ".join(f"w{i}" for i in ids), j, tuple(int(i) for i in ids)))
    images = [EvalImage(k, k) for k in keys]
    return RetrievalSet("flickr30k", "test", images, captions, image_db=db, text_meta={"CLS": 2, "SEP": 3})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images (captions: 5 per image)")
    parser.add_argument("--per-image", type=int, default=5, help="captions per image")
    parser.add_argument("--regions", type=int, default=36, help="regions per image")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="model dtype (default: float16 on GPU, float32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rerank-k", type=int, action="append", default=[], help="re-rank top M (repeatable)")
    parser.add_argument("--cross-sample", type=int, default=64, help="pairs timed for the full-matrix estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()

    import torch

    from ldot_cli.eval.evaluation import evaluate
    from models.nn.bi_encoder import BiEncoder
    from models.nn.config import CROSS_PRESETS, preset
    from models.nn.cross_encoder import CrossEncoder, UniterReranker
    from models.nn.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory(prefix="ldot-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        rset = build_set(root, args.images, args.per_image, args.regions)
        setup_s = time.perf_counter() - t0
        torch.manual_seed(0)
        encoder = BiEncoder(preset("base")).to(device=device, dtype=dtype).eval()
        cross = CrossEncoder(CROSS_PRESETS["base"]).to(device=device, dtype=dtype).eval()
        reranker = UniterReranker(cross, Tokenizer.from_path(write_vocab(root)))
        print(f"# {args.images} images x {len(rset.captions)} captions, {args.regions} regions; {device} {dtype}, "
              f"{torch.get_num_threads()} CPU threads; data written in {setup_s:.1f} s", file=sys.stderr)
        report = evaluate(rset, encoder, reranker=reranker, rerank_ks=args.rerank_k, batch_size=args.batch_size,
                          cross_sample=args.cross_sample, progress=_printer())
    rep = report.to_dict()
    if args.json:
        print(json.dumps(rep["timing"], indent=2))
        return
    from ldot_cli.commands.eval import render_timings

    render_timings(rep)
    t = rep["timing"]
    n_txt = rep["num_captions"]
    print(f"per caption query (text encoding + search, images pre-indexed): "
          f"{1000 * (t['text_encoding_s'] + t['search_s'] / 2) / n_txt:.2f} ms; "
          f"images encoded at {rep['num_images'] / t['image_encoding_s']:.1f}/s, "
          f"captions at {n_txt / t['text_encoding_s']:.1f}/s")


def _printer():
    last = {}

    def progress(p) -> None:  # a models.core.progress.Progress
        now = time.monotonic()
        if p.done == p.total or now - last.get(p.stage, 0) > 5:
            last[p.stage] = now
            print(f"  {p.stage}: {p.done}/{p.total}", file=sys.stderr)

    return progress


if __name__ == "__main__":
    main()
