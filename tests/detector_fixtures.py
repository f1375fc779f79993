"""Seeded random detector weights and synthetic images shared by the detector tests and the golden script.

Nothing here comes from the reference implementations: the weights are numpy draws in a fixed key order,
scaled so a randomly initialised R101-C4 gives sane activations (no overflow, varied objectness and class
scores, some confident classes), and the images are PIL drawings.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from feature_extraction.detector.config import DetectorConfig
from feature_extraction.detector.network import BUTDDetector, cell_anchors

DATA = Path(__file__).parent / "data"
KEYS_FILE = DATA / "frcnn-vg-finetuned.keys.txt"  # the 640 hub names and shapes of unc-nlp/frcnn-vg-finetuned


def hub_key_shapes(config: DetectorConfig) -> dict[str, tuple[int, ...]]:
    """Names/shapes of the hub layout for ``config``: ours plus BatchNorm ``num_batches_tracked`` counters."""
    with torch.device("meta"):
        model = BUTDDetector(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in model.state_dict().items():
        shapes[name] = tuple(value.shape)
        if name.endswith(".norm.running_var"):
            shapes[name[: -len("running_var")] + "num_batches_tracked"] = ()
    return shapes


def random_hub_state_dict(config: DetectorConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict in the hub layout (names, shapes, dtypes; ``num_batches_tracked`` int64).

    Conv weights are He-normal; a block's last norm has a small gain so 23 residual blocks stay bounded; the
    stem is scaled for raw BGR input (about +-128); running variances are positive. The RPN and box head
    weights are scaled so objectness, deltas and class logits vary over a useful range.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = hub_key_shapes(config)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.from_numpy((rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32))

    def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, shape).astype(np.float32))

    for name in sorted(shapes):
        shape = shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.tensor(0, dtype=torch.int64)
        elif name.endswith("cell_anchors.0"):
            out[name] = cell_anchors(config.anchor_sizes, config.anchor_ratios)
        elif ".norm." in name:
            last_in_block = ".conv3." in name or ".shortcut." in name
            if leaf == "weight":
                out[name] = uniform(shape, 0.15, 0.35) if last_in_block else uniform(shape, 0.8, 1.2)
            elif leaf == "bias":
                out[name] = normal(shape, 0.1)
            elif leaf == "running_mean":
                out[name] = normal(shape, 0.1)
            else:  # running_var
                out[name] = uniform(shape, 0.5, 1.5)
        elif name == "backbone.stem.conv1.weight":
            out[name] = normal(shape, math.sqrt(2.0 / math.prod(shape[1:])) / 60.0)
        elif name.endswith(".weight") and len(shape) == 4 and not name.startswith("proposal_generator"):
            out[name] = normal(shape, math.sqrt(2.0 / math.prod(shape[1:])))
        elif name.startswith("proposal_generator.rpn_head.conv."):
            out[name] = normal(shape, math.sqrt(2.0 / math.prod(shape[1:])) if leaf == "weight" else 0.05)
        elif name.startswith("proposal_generator.rpn_head.objectness_logits."):
            out[name] = normal(shape, 3.0 / math.sqrt(math.prod(shape[1:])) if leaf == "weight" else 0.5)
        elif name.startswith("proposal_generator.rpn_head.anchor_deltas."):
            out[name] = normal(shape, 0.4 / math.sqrt(math.prod(shape[1:])) if leaf == "weight" else 0.05)
        elif name.endswith("cls_score.weight"):
            out[name] = normal(shape, 12.0 / math.sqrt(shape[1]))
        elif name.endswith("cls_score.bias"):
            out[name] = normal(shape, 0.5)
        elif name.endswith("bbox_pred.weight"):
            out[name] = normal(shape, 3.0 / math.sqrt(shape[1]))
        elif name.endswith("cls_embedding.weight"):
            out[name] = normal(shape, 1.0)
        elif name.endswith(".weight"):  # fc_attr, attr_score
            out[name] = normal(shape, 2.0 / math.sqrt(shape[1]))
        else:  # remaining biases
            out[name] = normal(shape, 0.1)
    return out


def to_d2_payload(hub_state: dict[str, torch.Tensor], drop_stats: bool = False) -> dict:
    """The same weights as py-bottom-up-attention's ``.pkl`` payload: numpy arrays, FrozenBN (no counters).

    ``drop_stats`` removes the anchors (the loader regenerates them).
    """
    model = {k: v.numpy().copy() for k, v in hub_state.items() if not k.endswith("num_batches_tracked")}
    if drop_stats:
        model.pop("proposal_generator.anchor_generator.cell_anchors.0")
    return {"model": model, "__author__": "ldot test fixture", "matching_heuristics": False}


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 picture: a gradient background with filled shapes of random colours."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            80 + 100 * xx / max(width - 1, 1),
            60 + 120 * yy / max(height - 1, 1),
            np.full_like(xx, float(rng.integers(40, 200))),
        ],
        axis=2,
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 9))):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1 = int(min(width - 1, x0 + rng.integers(8, max(9, width // 2))))
        y1 = int(min(height - 1, y0 + rng.integers(8, max(9, height // 2))))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return np.asarray(img, dtype=np.uint8).copy()


def load_png(name: str) -> np.ndarray:
    """An RGB uint8 array from ``tests/data``."""
    from PIL import Image

    with Image.open(DATA / name) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# The committed PNGs: (file, height, width, seed) for synthetic_image. Regenerate with
#   PYTHONPATH=. python -m tests.detector_fixtures
GOLDEN_IMAGES = [("detector_img0.png", 300, 400, 100), ("detector_img1.png", 360, 270, 101),
                 ("detector_img2.png", 480, 640, 102)]


if __name__ == "__main__":
    from PIL import Image

    for name, height, width, seed in GOLDEN_IMAGES:
        Image.fromarray(synthetic_image(height, width, seed)).save(DATA / name, optimize=True)
