"""Proof of learning: recall before and after each way to a model, and chance, on a synthetic learnable set.

Tiny models on CPU, a few minutes. The set (tests/learnset.py): images of two coloured objects in a scene, regions
built from object / colour / size / scene prototypes, captions in English words naming them; a confusable subset
of groups that differ only in one object's colour and size. Modes:

- finetune: CMR (in-batch negatives) from random weights;
- pretrain: the default pre-training recipe (itm:mlm:mrfr:mrckl 16:8:4:4, warm-up 10% of the steps);
- decompose: a small cross-encoder trained first on the set (the "teacher") decomposed into one encoder
  (VLDeformer: tags, mean pooling, cosine, InfoNCE);
- decompose+distill: the same with ``--distill-from`` the teacher;
- in-batch / hard negatives: a fine-tuned model trained on with and without ``--hard-negatives`` on the confusable
  set, recall on held-out confusable groups.

    PYTHONPATH=.:tests python benchmarks/learn.py                 # ~5 min on 2 shared cores
    PYTHONPATH=.:tests python benchmarks/learn.py --steps 100 --images 120   # quicker
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch


def _row(result: object) -> str:
    def fig(m: dict) -> str:
        t2i = "/".join(f"{v:5.1f}" for v in m["text_to_image"].values())
        i2t = "/".join(f"{v:5.1f}" for v in m["image_to_text"].values())
        return f"{m['mean_recall']:5.1f} (t2i {t2i}; i2t {i2t})"

    r = result
    return (f"{r.mode:<20} before {fig(r.before)}\n{'':<20} after  {fig(r.after)}\n{'':<20} chance {fig(r.chance)}"
            f"   [{r.seconds:.0f} s]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="training images (2 captions each)")
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per mode")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (tiny models from scratch)")
    parser.add_argument("--temperature", type=float, default=0.05, help="decomposition InfoNCE temperature")
    parser.add_argument("--hard-negatives", type=int, default=4)
    parser.add_argument("--no-tags", action="store_true", help="decompose without object tags (harder: the tags "
                        "name the objects and the scene)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="finetune,pretrain,decompose,distill,hard-negatives")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ldot-learn-"))
    os.environ["LDOT_HOME"] = str(tmp / "home")

    import learnset as L

    from models.hub.decompose import decomposed_model, read_decompose_source
    from models.training.loop import TrainConfig, decompose_config, pretrain_config

    modes = args.modes.split(",")
    tok = L.tokenizer_for(tmp / "tok")
    train, lookup, _ = L.learnable_set(args.images, seed=0, tokenizer=tok)
    val, more, _ = L.learnable_set(args.val_images, seed=1, tokenizer=tok)
    lookup.update(more)
    print(f"synthetic set: {args.images} training images x 2 captions, {args.val_images} held-out images; "
          f"tiny models (2 layers, 128 wide); {args.steps} steps of batch {args.batch}; CPU, "
          f"{torch.get_num_threads()} thread(s)")
    base = None
    if "finetune" in modes or "hard-negatives" in modes:
        base = L.bi_encoder()
        r = L.run_mode("finetune (CMR)", base, train, val, lookup, tok,
                       TrainConfig(batch_size=args.batch, lr=args.lr, epochs=None, steps=args.steps, warmup=0.1))
        print(_row(r), flush=True)
    if "pretrain" in modes:
        r = L.run_mode("pretrain (all tasks)", L.bi_encoder(), train, val, lookup, tok,
                       pretrain_config(steps=args.steps, batch_size=args.batch, lr=args.lr))
        print(_row(r), flush=True)
    if "decompose" in modes or "distill" in modes:
        started = time.monotonic()
        teacher = L.train_teacher(train, lookup, tok, steps=args.teacher_steps, batch=12)
        L.install_teacher(teacher, "teacher", tmp / "tok")
        print(f"teacher: a tiny UNITER cross-encoder trained listwise for {args.teacher_steps} steps "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        config = decompose_config(batch_size=args.batch, lr=args.lr, epochs=None, steps=args.steps, warmup=0.1)
        for mode, extra in (("decompose", {}), ("decompose+distill", {"distill_from": "teacher"})):
            if (mode == "decompose" and "decompose" not in modes) or (mode != "decompose" and "distill" not in modes):
                continue
            import models

            model = decomposed_model(read_decompose_source("teacher"), tok,
                                     tags=() if args.no_tags else L.CLASS_NAMES, text_len=16,
                                     max_regions=8, temperature=args.temperature)
            scorer = models.load_reranker("teacher", device="cpu") if extra else None
            from dataclasses import replace

            r = L.run_mode(mode + (" (no tags)" if args.no_tags else ""), model, train, val, lookup, tok,
                           replace(config, **extra), teacher=scorer)
            print(_row(r), flush=True)
    if "hard-negatives" in modes and base is not None:
        conf_train, conf_lookup, _ = L.learnable_set(args.images, seed=2, confusable=args.images, tokenizer=tok)
        conf_val, more, _ = L.learnable_set(args.val_images, seed=3, confusable=args.val_images, tokenizer=tok)
        conf_lookup.update(more)
        conf_lookup.update(lookup)
        for k in (0, args.hard_negatives):
            name = f"+{args.steps} steps, " + (f"hard negatives K={k}" if k else "in-batch")
            r = L.run_mode(name, copy.deepcopy(base), conf_train, conf_val, conf_lookup, tok,
                           TrainConfig(batch_size=args.batch, lr=args.lr / 2, epochs=None, steps=args.steps,
                                       warmup=0.1, hard_negatives=k))
            r.mode = "confusable " + ("HN" if k else "in-batch")
            print(name + " (on the confusable set, from the fine-tuned model)")
            print(_row(r), flush=True)


if __name__ == "__main__":
    main()
