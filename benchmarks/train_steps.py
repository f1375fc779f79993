"""Optimizer steps per second and peak memory of `models.training.loop` on planted data (random weights, no
downloads), for fine-tuning, decomposition, distillation and hard negatives; with an estimated wall time of a
Flickr30k run (145k pairs; 15 epochs fine-tuning, or --epochs).

    PYTHONPATH=.:tests python benchmarks/train_steps.py --preset tiny --batch 96 --steps 10
    PYTHONPATH=.:tests python benchmarks/train_steps.py --preset base --batch 8 --regions 36 --steps 3
    # the GPU figures (one script): base at batch 96 in fp16 and bf16, decomposition at 300, distillation
    for p in fp16 bf16; do python benchmarks/train_steps.py --preset base --batch 96 --precision $p --steps 20; done
    python benchmarks/train_steps.py --preset base --mode decompose --batch 300 --steps 10
    python benchmarks/train_steps.py --preset base --batch 96 --distill --steps 10
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
    parser.add_argument("--mode", default="finetune", choices=("finetune", "decompose"))
    parser.add_argument("--distill", action="store_true", help="distil a random cross-encoder of the preset's size")
    parser.add_argument("--hard-negatives", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=145_000, help="pairs of the run to estimate (Flickr30k: 145k)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the run to estimate")
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
    if args.mode == "decompose":
        from models.nn.config import DecomposedConfig
        from models.nn.decomposed import DecomposedEncoder

        model = DecomposedEncoder(DecomposedConfig(body=config.image, img_dim=config.img_dim, cls_token_id=2,
                                                   sep_token_id=3, pad_token_id=0, max_regions=args.regions),
                                  tokenizer)
    else:
        model = BiEncoderForPretraining(config)
    bert_init_(model)
    tasks = tuple((t, 1.0) for t in args.tasks.split(","))
    times: list[float] = []

    def progress(p):
        if p.event in ("start", "step"):
            times.append(time.perf_counter())

    teacher = None
    if args.distill:
        from dataclasses import replace

        from models.core.device import pick_device
        from models.nn.config import CROSS_PRESETS
        from models.nn.cross_encoder import CrossEncoder, UniterReranker

        cross = CrossEncoder(replace(CROSS_PRESETS[args.preset], img_dim=config.img_dim))
        bert_init_(cross)
        device = pick_device(args.device)
        cross = cross.to(device, torch.float16 if device.type == "cuda" else torch.float32).eval()
        teacher = UniterReranker(cross, tokenizer)
    cfg = TrainConfig(tasks=tasks, batch_size=args.batch, steps=args.steps, epochs=None, eval_every=10**9,
                      checkpoint_every=10**9, precision=args.precision, hard_negatives=args.hard_negatives,
                      distill_from="random-teacher" if args.distill else None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(tmp / "run", TrainData(pairs, lookup), cfg, model, tokenizer, device=args.device, progress=progress,
          teacher=teacher)
    per_step = np.diff(times)[1:] if len(times) > 2 else np.diff(times)  # first step warms up
    step_s = float(np.median(per_step))
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        import resource

        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    run_steps = args.pairs // args.batch * args.epochs
    print(f"{args.preset} {args.mode}{' +distill' if args.distill else ''}"
          f"{f' +{args.hard_negatives} hard negatives' if args.hard_negatives else ''} batch {args.batch} regions "
          f"{args.regions} tasks {args.tasks} precision {args.precision} threads {torch.get_num_threads()} device "
          f"{next(model.parameters()).device}: {1 / step_s:.3f} steps/s (median of {len(per_step)} steps, "
          f"{step_s:.3f} s/step); {peak}; {args.pairs} pairs x {args.epochs} epochs = {run_steps} steps ~ "
          f"{run_steps * step_s / 3600:.1f} h (without validation and mining)")


if __name__ == "__main__":
    main()
