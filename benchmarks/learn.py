"""Proof of learning: recall before and after each way to a model, and chance, on a synthetic learnable set.

Tiny models on CPU, a few minutes. The set (tests/learnset.py): images of two coloured objects in a scene, regions
built from object / colour / size / scene prototypes, captions in English words naming them; a confusable subset
of groups that differ only in one object's colour and size. Modes:

- finetune: CMR (in-batch negatives) from random weights;
- pretrain: the default pre-training recipe (itm:mlm:mrfr:mrckl 16:8:4:4, warm-up 10% of the steps);
- decompose: a small cross-encoder trained first on the set (the "teacher") decomposed into one encoder
  (VLDeformer: tags, mean pooling, cosine, InfoNCE);
- decompose+distill: the same with ``--distill-from`` the teacher;
- in-batch / hard negatives (`learnset.hard_negative_comparison`, per seed): one shared start (a fresh tiny model
  trained with in-batch negatives on ordinary images: it knows objects and scenes, and some colour/size), then the
  SAME steps, learning rate, batch and order on an all-confusable set (300 groups of 8 that differ only in the
  first object's colour and size, so a random batch rarely holds two partners) with and without
  ``--hard-negatives``; recall on held-out confusable groups, overall and within each group (does the model tell
  an item from its 7 partners?), the share of mined negatives that are partners, and the mean over seeds.
  Measured (seeds 0-7): hard negatives win clearly on 6 seeds (within-group R@1 +4.8 to +24.4 points, mean recall
  +2.9 to +13.3) and tie on 2 (seeds 5 and 7: within +0.0 / +0.8, mean +0.3 / +1.1), whose start has not begun to
  tell colours and sizes apart; so no unit test asserts a margin (one seed's margin is not a property of the
  code: another machine of this kind measured +4.4 where this one measured +15.3 on seed 0).
  At equal wall time (in-batch given 4x the steps) the result is mixed.

    PYTHONPATH=.:tests python benchmarks/learn.py                 # ~17 min on 2 shared cores
    PYTHONPATH=.:tests python benchmarks/learn.py --modes hard-negatives --hn-seeds 0,5   # ~1.5 min a seed
    PYTHONPATH=.:tests python benchmarks/learn.py --steps 100 --images 120   # quicker
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--conf-images", type=int, default=2400, help="confusable training images (groups of 8)")
    parser.add_argument("--conf-val-images", type=int, default=160)
    parser.add_argument("--start-images", type=int, default=800, help="ordinary images the shared start of the "
                        "hard-negative comparison is trained on")
    parser.add_argument("--start-steps", type=int, default=1000, help="in-batch steps of the shared start")
    parser.add_argument("--conf-steps", type=int, default=300, help="steps of each arm of the comparison")
    parser.add_argument("--conf-lr", type=float, default=5e-4, help="peak learning rate of both arms")
    parser.add_argument("--hn-seeds", default="0,1,2,3,4,5,6,7", help="seeds of the hard-negative comparison")
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
    if "finetune" in modes:
        r = L.run_mode("finetune (CMR)", L.bi_encoder(), train, val, lookup, tok,
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
    if "hard-negatives" in modes:
        _hard_negatives(args, tok)


def _hard_negatives(args: argparse.Namespace, tok: object) -> None:
    import learnset as L

    k = args.hard_negatives
    print(f"\nhard negatives: {args.conf_images} confusable training images in groups of 8, "
          f"{args.conf_val_images} held-out (other groups); shared start = {args.start_steps} in-batch steps on "
          f"{args.start_images} ordinary images; then {args.conf_steps} steps per arm (batch {args.batch}, lr "
          f"{args.conf_lr:g}), in-batch vs --hard-negatives {k}; within-group R@1: among the item's own group only "
          f"(chance 12.5)", flush=True)
    rows = []
    for seed in [int(x) for x in args.hn_seeds.split(",")]:
        c = L.hard_negative_comparison(tok, seed=seed, k=k, conf_images=args.conf_images,
                                       val_images=args.conf_val_images, start_images=args.start_images,
                                       start_steps=args.start_steps, steps=args.conf_steps, lr=args.conf_lr,
                                       batch=args.batch)
        print(f"seed {seed}: mined negatives that are the caption's group partners {100 * c.partner_share:.1f}% "
              f"(a random negative {100 * c.random_share:.2f}%): partners per caption query and step "
              f"{k * c.partner_share:.2f} appended vs {(args.batch - 1) * c.random_share:.3f} in a random batch")
        print(_row(c.start))
        for arm in c.arms:
            print(_row(arm.result))
            print(f"{'':<20} within-group R@1 {c.within_before:5.1f} -> {arm.within_after:5.1f} (chance 12.5)",
                  flush=True)
        rows.append(c)
    print(f"\n{'seed':>4} | {'start mean / within':>19} | {'in-batch mean / R@1 / within':>28} | "
          f"{'HN K=' + str(k) + ' mean / R@1 / within':>27} | {'partners':>8} | seconds IB / HN")

    def r1(m: dict) -> float:
        return (m["text_to_image"]["r1"] + m["image_to_text"]["r1"]) / 2

    sums = [0.0] * 8
    for c in rows:
        ib, hn = c.arms
        figs = [c.start.after["mean_recall"], c.within_before, ib.result.after["mean_recall"], r1(ib.result.after),
                ib.within_after, hn.result.after["mean_recall"], r1(hn.result.after), hn.within_after]
        sums = [a + b for a, b in zip(sums, figs)]
        print(f"{c.seed:>4} | {figs[0]:8.1f} / {figs[1]:8.1f} | {figs[2]:8.1f} / {figs[3]:6.1f} / {figs[4]:8.1f} | "
              f"{figs[5]:8.1f} / {figs[6]:6.1f} / {figs[7]:7.1f} | {100 * c.partner_share:7.1f}% | "
              f"{ib.result.seconds:.0f} / {hn.result.seconds:.0f}")
    m = [x / len(rows) for x in sums]
    print(f"{'mean':>4} | {m[0]:8.1f} / {m[1]:8.1f} | {m[2]:8.1f} / {m[3]:6.1f} / {m[4]:8.1f} | "
          f"{m[5]:8.1f} / {m[6]:6.1f} / {m[7]:7.1f} |   (R@1 = mean of t2i and i2t R@1)", flush=True)
    # The claim "hard negatives learn the detail faster" is a property over seeds, not of one run: count it.
    diffs = [c.arms[1].within_after - c.arms[0].within_after for c in rows]
    wins, losses = sum(d > 2 for d in diffs), sum(d < -2 for d in diffs)
    print(f"within-group R@1, hard - in-batch: {', '.join(f'{d:+.1f}' for d in diffs)}; "
          f"{wins} wins, {len(diffs) - wins - losses} ties (|diff| <= 2), {losses} losses over {len(diffs)} seeds",
          flush=True)


if __name__ == "__main__":
    main()
