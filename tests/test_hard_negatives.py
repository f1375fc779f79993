"""Hard negatives end to end inside the trainer (the glue between mining, batching and the loss): the batch carries
the mined negatives of exactly its own items, the mining vectors are the training vectors, and the trainer's loss
equals one computed by hand from the model's vectors (LightningDOT's collate and loss).

Whether hard negatives then learn the detail faster than in-batch negatives depends on the training run (the start,
the seed, the machine's arithmetic), so that claim is not asserted here: `benchmarks/learn.py --modes
hard-negatives` measures it over seeds 0-7 and prints each seed, the mean and the wins/ties/losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ldot_testing import planted_pairs

from models.training.data import TrainData


def _trainer(tmp_path, tokenizer, k=2, batch_size=4):
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.initialization import bert_init_
    from models.training.loop import TrainConfig, _Trainer

    torch.manual_seed(0)
    model = BiEncoderForPretraining(preset("tiny"), 11)
    bert_init_(model)
    pairs, lookup = planted_pairs(n_images=12)
    config = TrainConfig(batch_size=batch_size, lr=1e-3, epochs=1, hard_negatives=k)
    trainer = _Trainer(tmp_path, model, tokenizer, TrainData(pairs, lookup), config, torch.device("cpu"), None)
    trainer.prefetch = False
    return trainer


@pytest.mark.slow  # ~11 s on the shared CPU (first imports of the trainer, faiss)
def test_a_batch_carries_the_mined_negatives_of_its_own_items(tmp_path, tokenizer):
    from models.training.data import batch_indices
    from models.training.loop import encode_pairs

    trainer = _trainer(tmp_path, tokenizer)
    trainer.mine()
    hn, pairs = trainer.negatives, trainer.train_pairs
    for position in range(3):  # several batches of the shuffled order
        idx = batch_indices(len(pairs), 4, trainer.config.seed, position)
        batch = trainer._next_batch("itm")
        assert batch.image_ids.tolist() == [pairs.caption_image[i] for i in idx]
        neg = batch.negatives
        # B*K negative images: item i's caption's K images, in item order, after the B positives
        assert neg.image_ids.tolist() == [int(j) for i in idx for j in hn.images[i]]
        # B*K negative captions: item i's image's K captions (rows are those captions' word-pieces)
        want_caps = [int(c) for i in idx for c in hn.captions[pairs.caption_image[i]]]
        assert neg.text_image_ids.tolist() == [pairs.caption_image[c] for c in want_caps]
        for row, c in enumerate(want_caps):
            n = len(pairs.token_ids[c])
            assert neg.input_ids[row, 1:1 + n].tolist() == list(pairs.token_ids[c])
        assert not any(pairs.caption_image[i] in hn.images[i] for i in idx)  # never the item's own image
    # the vectors mining searched are the ones training scores (eval mode, same towers)
    text, image = encode_pairs(trainer.model, pairs, trainer.features, trainer.ids, torch.device("cpu"), None)
    trainer.model.eval()
    with torch.no_grad():
        t, v = trainer.model.pair_vectors(batch)
    assert np.allclose(t.numpy(), text[idx], atol=1e-5)
    assert np.allclose(v.numpy(), image[[pairs.caption_image[i] for i in idx]], atol=1e-5)


def test_the_trainer_loss_with_hard_negatives_equals_the_hand_computed_one(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, k=3)
    trainer.mine()
    batch = trainer._next_batch("itm")
    trainer.model.eval()  # no dropout: the two computations see the same vectors
    with torch.no_grad():
        got, _ = trainer._retrieval_loss(batch)
        text, image = trainer.model.pair_vectors(batch)
        neg_text, neg_image = trainer.model.pair_vectors(batch.negatives)
    b, k = len(batch), 3
    assert neg_image.shape[0] == neg_text.shape[0] == b * k
    ids = batch.image_ids.tolist()
    keys_i, kid_i = torch.cat([image, neg_image]), ids + batch.negatives.image_ids.tolist()
    keys_t, kid_t = torch.cat([text, neg_text]), ids + batch.negatives.text_image_ids.tolist()
    want = 0.0
    for q in range(b):  # caption q vs all B(1+K) images; image q vs all B(1+K) captions; target = own index
        for query, keys, kid in ((text[q], keys_i, kid_i), (image[q], keys_t, kid_t)):
            allowed = [j for j in range(b * (1 + k)) if j == q or kid[j] != ids[q]]  # no copy of the own image
            logits = torch.stack([query @ keys[j] for j in allowed])  # raw dot products
            want += 0.5 * float(-torch.log_softmax(logits, 0)[allowed.index(q)]) / b
    assert abs(float(got) - want) < 1e-4, (float(got), want)
