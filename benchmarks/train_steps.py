"""Optimizer steps per second of `models.training.loop` on planted data (random weights, no downloads).

    PYTHONPATH=.:tests python benchmarks/train_steps.py --preset tiny --batch 96 --steps 10
    PYTHONPATH=.:tests python benchmarks/train_steps.py --preset base --batch 8 --regions 36 --steps 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "base"))
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", default="itm", help="comma-separated, equal ratios")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldot_testing import planted_pairs, write_vocab

    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.nn.tokenizer import Tokenizer
    from models.training.data import PairSet, TrainData
    from models.training.initialization import bert_init_
    from models.training.loop import TrainConfig, train

    config = preset(args.preset)
    pairs, lookup = planted_pairs(n_images=args.batch * 2, regions=args.regions, img_dim=config.img_dim, labels=1601)
    rng = np.random.default_rng(0)  # 12-word captions, as Flickr30k's typical length
    pairs = PairSet([tuple(rng.integers(10, 128, size=12)) for _ in pairs.token_ids], pairs.caption_image,
                    pairs.image_keys)
    tmp = Path(tempfile.mkdtemp())
    tokenizer = Tokenizer.from_path(write_vocab(tmp / "tok"))
    model = BiEncoderForPretraining(config)
    bert_init_(model)
    tasks = tuple((t, 1.0) for t in args.tasks.split(","))
    times: list[float] = []

    def progress(p):
        if p.event in ("start", "step"):
            times.append(time.perf_counter())

    cfg = TrainConfig(tasks=tasks, batch_size=args.batch, steps=args.steps, epochs=None, eval_every=10**9,
                      checkpoint_every=10**9, precision=args.precision)
    train(tmp / "run", TrainData(pairs, lookup), cfg, model, tokenizer, device=args.device, progress=progress)
    per_step = np.diff(times)[1:] if len(times) > 2 else np.diff(times)  # first step warms up
    print(f"{args.preset} batch {args.batch} regions {args.regions} tasks {args.tasks} threads "
          f"{torch.get_num_threads()} device {next(model.parameters()).device}: "
          f"{1 / np.median(per_step):.3f} steps/s (median of {len(per_step)} steps, {np.median(per_step):.3f} s/step)")


if __name__ == "__main__":
    main()
