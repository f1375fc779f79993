"""CPU throughput of the BUTD detector, step by step through the runtime optimisations.

Full-size R101-C4 with seeded random weights (``tests.detector_fixtures``), synthetic 600x800 images, 300
proposals. Each step adds one switch to the previous; steps are interleaved round by round (one image per call)
so load from other processes hits them alike; medians are reported. max|dF| is the largest feature difference to
the plain port with proposals paired by box (the golden tolerance is 1e-4). Peak memory comes from fresh
processes (random-weight generation adds about 1 GiB to both).

    PYTHONPATH=. python benchmarks/extract.py [--images 2] [--threads 2] [--size 600x800]
    PYTHONPATH=. python benchmarks/extract.py --half-fidelity [--images 2]   # fp16 vs fp32 (what --half costs)

``--half-fidelity`` runs on CUDA when present; without one it runs fp16 on the CPU (slow: oneDNN converts to
fp32 for each op and stores activations in fp16), which bounds the rounding of fp16 storage, not the GPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_extraction.detector.config import DetectorConfig, RuntimeOptions  # noqa: E402
from feature_extraction.detector.network import BUTDDetector, StageTimes  # noqa: E402
from feature_extraction.detector.preprocess import preprocess  # noqa: E402
from feature_extraction.detector.selection import LXMERT36, UNITER  # noqa: E402
from feature_extraction.detector.weights import load_detector  # noqa: E402
from tests.detector_fixtures import random_hub_state_dict, synthetic_image  # noqa: E402

PLAIN = RuntimeOptions.plain()
STEPS: list[tuple[str, RuntimeOptions, bool]] = [
    ("plain port, no_grad", PLAIN, False),
    ("+ inference_mode", PLAIN, True),
    ("+ fold BN into convs", dataclasses.replace(PLAIN, fold_bn=True), True),
    ("+ channels_last", dataclasses.replace(PLAIN, fold_bn=True, channels_last=True), True),
    ("+ res5 in chunks of 32 RoIs", dataclasses.replace(PLAIN, fold_bn=True, channels_last=True, roi_chunk=32), True),
    ("+ polyphase res5 (4 x 7x7 maps)", RuntimeOptions(dedup_res5=False), True),
    ("+ dedup identical pooled phases", RuntimeOptions(), True),
]


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it is not inherited across fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _paired(a: torch.Tensor, b: torch.Tensor, tol: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ia, ib) pairing rows of two box sets whose coordinates all agree within ``tol`` pixels."""
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    dist = torch.cdist(a.double(), b.double(), p=float("inf"))
    best, ib = dist.min(dim=1)
    ia = torch.nonzero(best <= tol).flatten()
    return ia, ib[ia]


def matched_feature_diff(raws_a, raws_b) -> float:
    """Largest feature difference between two runs, pairing proposals by box (near-tied objectness may swap)."""
    worst = 0.0
    for a, b in zip(raws_a, raws_b):
        ia, ib = _paired(a.proposals, b.proposals, tol=1e-2)
        if len(ia) != len(a.proposals) or len(a.proposals) != len(b.proposals) or len(set(ib.tolist())) != len(ib):
            return float("nan")
        worst = max(worst, (a.features - b.features[ib]).abs().max().item())
    return worst


def timed_detect(model: BUTDDetector, images, inference_mode: bool):
    timings = StageTimes()
    start = time.perf_counter()
    if inference_mode:
        raws = model.detect(images, timings)
    else:
        with torch.no_grad():
            raws = BUTDDetector.detect.__wrapped__(model, images, timings)  # same code without inference_mode
    return raws, time.perf_counter() - start, dict(timings.seconds)


def selection_seconds(model: BUTDDetector, raws) -> dict[str, float]:
    out = {}
    for name, preset in (("uniter", UNITER), ("lxmert36", LXMERT36)):
        t = time.perf_counter()
        for raw in raws:
            preset.select(raw, model.config)
        out[name] = (time.perf_counter() - t) / len(raws)
    return out


def memory_run(step: int, images: int, size: str, threads: int) -> float:
    """Peak RSS (GiB) of a fresh process that loads one model and extracts ``images`` images."""
    cmd = [sys.executable, __file__, "--memory-of", str(step), "--images", str(images), "--size", size,
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def half_fidelity(state, cfg: DetectorConfig, images) -> None:
    """fp16 against fp32 on the same weights and images: proposals, features and both presets' outputs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m32 = load_detector(state, cfg, device=device)
    m16 = (load_detector(state, cfg, device=device, dtype=torch.float16) if device == "cuda"
           else load_detector(state, cfg).to(torch.float16))  # CPU: emulation, see the module docstring
    print(f"fp16 vs fp32 on {device} ({'GPU kernels' if device == 'cuda' else 'CPU emulation of fp16 storage'}), "
          f"{len(images)} images, {cfg.rpn_post_nms_topk} proposals")
    rows = []
    for image in images:
        t = time.perf_counter()
        (a,) = m32.detect([image])
        t32 = time.perf_counter() - t
        t = time.perf_counter()
        (b,) = m16.detect([image])
        t16 = time.perf_counter() - t
        ia, ib = _paired(a.proposals, b.proposals.float())
        fa, fb = a.features[ia].float(), b.features[ib].float()
        sel = {}
        for name, preset in (("uniter", UNITER), ("lxmert36", LXMERT36)):
            ra, rb = preset.select(a, m32.config), preset.select(b, m16.config)
            ja, jb = _paired(torch.from_numpy(ra.boxes), torch.from_numpy(rb.boxes.astype("float32")))
            same_ids = (ra.object_ids[ja.numpy()] == rb.object_ids[jb.numpy()]).mean() if len(ja) else float("nan")
            sel[name] = (len(ja) / max(ra.num_boxes, rb.num_boxes, 1), float(same_ids),
                         float(abs(ra.conf[ja.numpy()] - rb.conf[jb.numpy()]).max()) if len(ja) else float("nan"))
        rows.append((len(ia) / len(a.proposals), (fa - fb).abs().max().item(), fa.abs().max().item(),
                     ((fa - fb).norm(dim=1) / fa.norm(dim=1).clamp_min(1e-12)).max().item(), sel, t32, t16))
    for i, (matched, dmax, fmax, rel, sel, t32, t16) in enumerate(rows):
        print(f"  image {i}: proposals matched within 1 px {100 * matched:.1f}%; features max|dF| {dmax:.2e} "
              f"(max|F| {fmax:.2f}), worst relative L2 error {rel:.2e}; fp32 {t32:.1f} s, fp16 {t16:.1f} s")
        for name, (boxes_same, ids_same, conf_diff) in sel.items():
            print(f"    {name:8s}: boxes in common {100 * boxes_same:.1f}%, same object id on those "
                  f"{100 * ids_same:.1f}%, max|d conf| {conf_diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="distinct synthetic images (one per call, alternating)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; steps are interleaved within a round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="600x800", help="HxW of the synthetic images")
    parser.add_argument("--memory-of", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--half-fidelity", action="store_true", help="compare fp16 with fp32 instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    cfg = DetectorConfig()
    state = random_hub_state_dict(cfg, seed=0)
    images = [preprocess(synthetic_image(h, w, 200 + i), cfg) for i in range(args.images)]
    if args.half_fidelity:
        half_fidelity(state, cfg, images)
        return
    if args.memory_of:
        _, options, inference = STEPS[args.memory_of - 1]
        model = load_detector(state, cfg, options=options)
        del state
        timed_detect(model, images, inference)
        print(peak_rss_gb())
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {args.images} images {h}x{w} -> "
          f"{images[0].scale.resized_size}, {cfg.rpn_post_nms_topk} proposals, {args.rounds} interleaved rounds\n")
    models = [load_detector(state, cfg, options=opt) for _, opt, _ in STEPS]
    for model, (_, _, inference) in zip(models, STEPS):
        timed_detect(model, images[:1], inference)  # warm-up: oneDNN primitive creation
    times: list[list[float]] = [[] for _ in STEPS]
    stages: list[dict[str, float]] = [defaultdict(float) for _ in STEPS]
    outputs: list[list | None] = [None] * len(STEPS)
    sel = {}
    for r in range(args.rounds):
        order = list(range(len(STEPS)))
        order = order[r % len(order):] + order[: r % len(order)]  # rotate so no step always runs first
        batch = [images[r % len(images)]]  # one image per call, alternating between the images
        for k in order:
            raws, seconds, st = timed_detect(models[k], batch, STEPS[k][2])
            times[k].append(seconds)
            for name, v in st.items():
                stages[k][name] += v / args.rounds
            if r == 0:
                outputs[k] = raws
            if k == len(STEPS) - 1:
                sel = selection_seconds(models[k], raws)
    base = statistics.median(times[0])
    print(f"{'step':34s} {'s/img':>6s} {'min':>6s} {'uniter img/s':>12s} {'lxmert36 img/s':>14s} {'vs plain':>8s} "
          f"{'max|dF|':>8s}  median-round stages s/img")
    for k, (name, _, _) in enumerate(STEPS):
        med = statistics.median(times[k])
        diff = matched_feature_diff(outputs[0], outputs[k])
        stage_txt = " ".join(f"{n}={v:.2f}" for n, v in stages[k].items())
        print(f"{name:34s} {med:6.2f} {min(times[k]):6.2f} {1 / (med + sel['uniter']):12.3f} "
              f"{1 / (med + sel['lxmert36']):14.3f} {base / med:7.2f}x {diff:8.1e}  {stage_txt}", flush=True)
    print(f"\nselection per image: uniter {sel['uniter']:.3f}s, lxmert36 {sel['lxmert36']:.3f}s")
    del models
    for k in (1, len(STEPS)):
        print(f"peak RSS (VmHWM), fresh process, {args.images} images in one batch, step {k} ({STEPS[k - 1][0].strip('+ ')}): "
              f"{memory_run(k, args.images, args.size, args.threads):.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
