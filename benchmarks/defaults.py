"""The training defaults on a held-out synthetic set: recall before / after / chance for each mode.

The set (tests/bindset.py) is not the one `tests/` or `benchmarks/learn.py` use: counts, spatial relations that
live only in the boxes, and attribute binding (see its docstring). Tiny models (2 layers, 128 wide) on CPU. Modes:

- finetune: CMR, in-batch negatives, from random weights;
- finetune + HN official: ``--hard-negatives 4 --hard-negatives-gate 0`` (the official schedule: mine from the
  start, with the fresh model);
- finetune + HN default: ``--hard-negatives 4`` (the gate: in-batch negatives until validation recall clears
  chance by 10% of the gap and the mined pools spread);
- decompose T=...: a tiny cross-encoder trained on the set (the "teacher") decomposed at each temperature
  (``--temperatures``; 0.005 is VLDeformer's, 0.05 ldot's default) with ldot's other decomposition settings;
- decompose + distill: the default temperature with ``--distill-from`` the teacher (the official student).

    PYTHONPATH=.:tests python benchmarks/defaults.py                      # ~25 min on one shared core
    PYTHONPATH=.:tests python benchmarks/defaults.py --modes finetune,hn --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _fig(m: dict) -> str:
    t2i = "/".join(f"{v:5.1f}" for v in m["text_to_image"].values())
    i2t = "/".join(f"{v:5.1f}" for v in m["image_to_text"].values())
    return f"{m['mean_recall']:5.1f} (t2i {t2i}; i2t {i2t})"


def run(mode: str, model, train_pairs, val_pairs, lookup, tok, config, teacher=None) -> dict:
    """Train with validation on ``val_pairs`` (the hard-negative gate reads it); recall before / after (last
    weights) / chance on ``val_pairs``; what the run logged about negatives."""
    import learnset as L

    from models.training.data import TrainData
    from models.training.loop import train

    before = L.evaluate(model, val_pairs, lookup, tok)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp) / "run", TrainData(train_pairs, lookup, val=val_pairs), config, model, tok, device="cpu",
              teacher=teacher)
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    seconds = time.monotonic() - started
    after = L.evaluate(model, val_pairs, lookup, tok)
    chance = L.chance(len(val_pairs.image_keys))
    steps = [r for r in log if r["event"] == "step"]
    negatives = [r for r in log if r["event"] == "negatives"]
    print(f"{mode:<26} before {_fig(before)}\n{'':<26} after  {_fig(after)}\n{'':<26} chance {_fig(chance)}"
          f"   [{seconds:.0f} s; loss {steps[0]['loss']:.2f} -> {steps[-1]['loss']:.2f}]", flush=True)
    if negatives:
        mined = [r["step"] for r in negatives if r["mined"]]
        held = [r["step"] for r in negatives if not r["mined"]]
        conc = [r.get("concentration") for r in negatives if "concentration" in r]
        print(f"{'':<26} negatives mined at steps {mined or '-'}; in-batch kept at {held or '-'}; pool "
              f"concentration {', '.join(f'{c:.2f}' for c in conc) or '-'}", flush=True)
    return {"mode": mode, "before": before, "after": after, "chance": chance, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="training images (2 captions each)")
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per mode")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (tiny models from scratch)")
    parser.add_argument("--hard-negatives", type=int, default=4)
    parser.add_argument("--temperatures", default="0.005,0.02,0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="finetune,hn,decompose,distill")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ldot-defaults-"))
    os.environ["LDOT_HOME"] = str(tmp / "home")

    import bindset as B
    import learnset as L

    import models
    from models.hub.decompose import decomposed_model, read_decompose_source
    from models.training.loop import DECOMPOSE_RECIPES, TrainConfig, decompose_config

    modes = args.modes.split(",")
    tok = B.tokenizer_for(tmp / "tok")
    train_pairs, lookup, _ = B.binding_set(args.images, seed=args.seed, tokenizer=tok)
    val, more, _ = B.binding_set(args.val_images, seed=1000 + args.seed, tokenizer=tok)
    lookup.update(more)
    print(f"binding set: {args.images} training images x 2 captions, {args.val_images} held-out images; tiny "
          f"models; {args.steps} steps of batch {args.batch}, lr {args.lr:g}; CPU, {torch.get_num_threads()} "
          f"thread(s); seed {args.seed}", flush=True)
    base = TrainConfig(batch_size=args.batch, lr=args.lr, epochs=None, steps=args.steps, warmup=0.1, seed=args.seed)
    if "finetune" in modes:
        run("finetune (in-batch)", L.bi_encoder(args.seed), train_pairs, val, lookup, tok, base)
    if "hn" in modes:
        k = args.hard_negatives
        run(f"finetune + HN {k} official", L.bi_encoder(args.seed), train_pairs, val, lookup, tok,
            replace(base, hard_negatives=k, hard_negatives_gate=0.0))
        run(f"finetune + HN {k} default", L.bi_encoder(args.seed), train_pairs, val, lookup, tok,
            replace(base, hard_negatives=k))
    if "decompose" in modes or "distill" in modes:
        started = time.monotonic()
        teacher = L.train_teacher(train_pairs, lookup, tok, steps=args.teacher_steps, batch=12, seed=args.seed)
        L.install_teacher(teacher, "teacher", tmp / "tok")
        print(f"teacher: a tiny UNITER cross-encoder trained listwise for {args.teacher_steps} steps "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        config = decompose_config(batch_size=args.batch, lr=args.lr, epochs=None, steps=args.steps, warmup=0.1,
                                  seed=args.seed)
        default_t = DECOMPOSE_RECIPES["ldot"]["temperature"]

        def decomposed(temperature: float):
            return decomposed_model(read_decompose_source("teacher"), tok, tags=B.CLASS_NAMES, text_len=16,
                                    max_regions=8, temperature=temperature)

        if "decompose" in modes:
            for t in (float(x) for x in args.temperatures.split(",")):
                run(f"decompose T={t:g}", decomposed(t), train_pairs, val, lookup, tok, config)
        if "distill" in modes:
            scorer = models.load_reranker("teacher", device="cpu")
            run(f"decompose T={default_t:g} + distill", decomposed(default_t), train_pairs, val, lookup, tok,
                replace(config, distill_from="teacher"), teacher=scorer)


if __name__ == "__main__":
    main()
