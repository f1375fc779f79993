"""The "no good match" threshold and the matching regions, measured on synthetic data.

    python benchmarks/regions.py

1. Threshold: a tiny bi-encoder is fine-tuned on the planted retrieval set (tests/ldot_testing.planted_pairs:
   each image has its own feature pattern and caption word), calibrated on one caption per image (what training
   and `ldot eval` store in the model dir) and tested on the other caption: how well matching and non-matching
   pairs separate, how many true matches `--min-score auto` keeps, and how often it says "no good match" when
   the image a caption describes is not in the gallery. The same for the untrained (random) model.
2. Regions: the faithfulness check. For each shown result, is the score drop when the chosen box is removed
   larger than when a random other box is removed? Measured for the chosen box (largest measured drop among
   the candidates) and for two cheap rankings alone (gradient x input, which picks the candidates, and each
   region's projected output state dotted with the query; no removal), at the removal
   budget of k = 5, 10 and 20 results, on (a) the fine-tuned planted model and (b) a random tiny model over
   images indexed with the tests' fake detector (10-100 boxes each).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def train_planted(home: Path, steps: int):
    from ldot_testing import planted_pairs, write_vocab

    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.nn.tokenizer import Tokenizer
    from models.training.data import TrainData
    from models.training.initialization import bert_init_
    from models.training.loop import TrainConfig, train

    pairs, lookup = planted_pairs(n_images=32, captions_per_image=2, regions=12, seed=0)
    tokenizer = Tokenizer.from_path(write_vocab(home / "vocab"))
    torch.manual_seed(0)
    model = BiEncoderForPretraining(preset("tiny"), num_region_labels=11)
    bert_init_(model)
    untrained = BiEncoderForPretraining(preset("tiny"), num_region_labels=11)
    untrained.load_state_dict(model.state_dict())
    config = TrainConfig(batch_size=16, lr=1e-3, warmup=0.1, epochs=None, steps=steps, grad_clip=2.0,
                         eval_every=steps)
    start = time.perf_counter()
    train(home / "run", TrainData(pairs, lookup, val=pairs), config, model, tokenizer, device="cpu")
    print(f"fine-tuned a tiny bi-encoder on 32 planted images x 2 captions: {steps} steps, "
          f"{time.perf_counter() - start:.0f} s")
    return pairs, lookup, tokenizer, model.eval(), untrained.eval()


def threshold_figures(label: str, model, pairs, lookup, tokenizer) -> None:
    from models.training.calibration import AUTO_QUANTILE, calibrate
    from models.training.data import SpecialIds
    from models.training.loop import encode_pairs

    text, image = encode_pairs(model, pairs, lookup, SpecialIds.of(tokenizer), torch.device("cpu"), None)
    owner = np.asarray(pairs.caption_image)
    calib = np.arange(len(owner)) % 2 == 0  # caption 0 of each image: calibration; caption 1: test
    data = calibrate(text[calib], image, owner[calib], "planted, caption 0")
    level = data["auto"]["threshold"]
    test_text, test_owner = text[~calib], owner[~calib]
    scores = test_text @ image.T
    match = np.zeros_like(scores, dtype=bool)
    match[np.arange(len(test_owner)), test_owner] = True
    kept = float(np.mean(scores[match] > level))
    false_pass = float(np.mean(scores[~match] > level))
    top1 = scores.argmax(1)
    top1_right = float(np.mean(top1 == test_owner))
    top1_pass_right = float(np.mean((top1 == test_owner) & (scores.max(1) > level)))
    absent = scores.copy()
    absent[match] = -np.inf  # the described image is not in the gallery: the best remaining is a non-match
    no_match = float(np.mean(absent.max(1) <= level))
    print(f"  [{label}] calibration AUC {data['auc']:.3f}; auto level {level:.3f} = the {100 * AUTO_QUANTILE:g}% "
          f"quantile of {data['pairs']['non_match']:,} non-matching pairs")
    print(f"  [{label}] held-out captions: auto keeps {100 * kept:.1f}% of true matches, lets "
          f"{100 * false_pass:.2f}% of non-matching pairs through; top-1 right {100 * top1_right:.1f}%, "
          f"top-1 right and above the level {100 * top1_pass_right:.1f}%; the described image removed from "
          f"the gallery: 'no good match' for {100 * no_match:.1f}% of captions")


def faithfulness(label: str, bi_encoder, queries: np.ndarray, records_per_query: list[list], ks=(5, 10, 20),
                 seed: int = 0) -> None:
    from models.nn.attribution import (
        MIN_CANDIDATES,
        REMOVAL_BUDGET,
        _scores,
        gradient_proxy,
        prepare,
        region_weights,
        removal_scores,
    )

    rng = np.random.default_rng(seed)
    for k in ks:
        wins = proxy_wins = state_wins = shown = total = 0
        for q, records in zip(queries, records_per_query):
            records = records[:k]
            qs = np.repeat(q[None], len(records), 0)
            base, boxes = region_weights(bi_encoder, qs, records)
            feat, box7, valid = prepare(bi_encoder, records)
            qt = torch.as_tensor(qs)
            _, proxy = gradient_proxy(bi_encoder.img_model, qt, feat, box7, valid)
            _, state = _scores(bi_encoder.img_model, qt, feat, box7, valid)
            chosen, rand, proxy_pick, state_pick = [], [], [], []
            for b, record in enumerate(records):
                n = len(record.features)
                total += 1
                top = boxes[b][0].index if boxes[b] else None
                proxy_top = int(torch.argmax(proxy[b, :n]))
                pick = top if top is not None else proxy_top
                other = int(rng.choice([i for i in range(n) if i != pick]))
                chosen.append([pick])
                rand.append([other])
                proxy_pick.append([proxy_top])
                state_pick.append([int(torch.argmax(state[b, :n]))])
                shown += top is not None
            drop_chosen = base - removal_scores(bi_encoder.img_model, qt, feat, box7, valid, chosen)[:, 0]
            drop_rand = base - removal_scores(bi_encoder.img_model, qt, feat, box7, valid, rand)[:, 0]
            drop_proxy = base - removal_scores(bi_encoder.img_model, qt, feat, box7, valid, proxy_pick)[:, 0]
            drop_state = base - removal_scores(bi_encoder.img_model, qt, feat, box7, valid, state_pick)[:, 0]
            state_wins += int(np.sum(drop_state > drop_rand))
            wins += int(np.sum(drop_chosen > drop_rand))
            proxy_wins += int(np.sum(drop_proxy > drop_rand))
        per = max(MIN_CANDIDATES, REMOVAL_BUDGET // k)
        print(f"  [{label}, k={k}: {per} candidates per result] chosen box beats a random box on "
              f"{100 * wins / total:.1f}% of {total} results (the top candidate by gradient x input alone: "
              f"{100 * proxy_wins / total:.1f}%; by region-state similarity: {100 * state_wins / total:.1f}%); "
              f"a box shown (removal lowers the score) on {100 * shown / total:.1f}%")


def planted_faithfulness(model, pairs, lookup, tokenizer) -> None:
    from models.training.data import SpecialIds
    from models.training.loop import encode_pairs

    bi = model.bert  # the BiEncoder inside the pre-training wrapper
    text, image = encode_pairs(model, pairs, lookup, SpecialIds.of(tokenizer), torch.device("cpu"), None)
    records = [lookup[k] for k in pairs.image_keys]
    queries = text[::2][:16]
    order = [np.argsort(-(image @ q)) for q in queries]
    faithfulness("fine-tuned planted model, 12 boxes/image", bi, queries, [[records[i] for i in o] for o in order])


def random_model_faithfulness(home: Path, n_images: int = 40, n_queries: int = 8) -> None:
    from fakes import FakeDetector
    from ldot_testing import install_tiny_model, make_photos, write_vocab

    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from ldot_cli.index.search import Searcher

    os.environ["LDOT_HOME"] = str(home / "random")
    vocab = write_vocab(home / "random" / "vocab").parent
    install_tiny_model("tiny", vocab)
    make_photos(home / "random" / "photos", n_images, size=(96, 64))
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([home / "random" / "photos"])
    searcher = Searcher("default")
    words = ["a dog on the beach", "two people sitting on a bench", "a red car", "a child playing with a ball",
             "a man in the park", "white snow", "black cat near a tree", "blue sky over water"][:n_queries]
    queries, per_query = [], []
    for text in words:
        hits = searcher.search(text, k=20)
        queries.append(searcher.last_vector[0])
        per_query.append(searcher.region_records([h.vector_id for h in hits]))
    faithfulness("random tiny model, fake detector, 10-100 boxes/image", searcher.image_tower,
                 np.asarray(queries), per_query)
    searcher.close()


def main() -> None:
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    home = Path(tempfile.mkdtemp(prefix="ldot-bench-regions-"))
    os.environ["LDOT_HOME"] = str(home)
    print("== threshold (--min-score auto) ==")
    pairs, lookup, tokenizer, model, untrained = train_planted(home, steps=150)
    threshold_figures("fine-tuned", model, pairs, lookup, tokenizer)
    threshold_figures("untrained", untrained, pairs, lookup, tokenizer)
    print("== matching regions: faithfulness ==")
    planted_faithfulness(model, pairs, lookup, tokenizer)
    random_model_faithfulness(home)


if __name__ == "__main__":
    main()
