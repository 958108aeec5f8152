"""Training data (kandinsky/training/data.py): the three data formats, image preprocessing, the keyed random
draws, the data order, the original's inpainting masks, conditioning dropout and the encoder cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.components import Components
from kandinsky.training.data import (
    FEATURES,
    CachedFeatures,
    EncodedFeatures,
    Encoders,
    batch_records,
    build_cache,
    cache_description,
    draw_sample,
    epoch_order,
    inpaint_mask,
    read_records,
    training_pixels,
    with_dropout,
)
from tiny_training import CAPTIONS, RESOLUTION, write_images, write_jsonl_data


# ------------------------------------------------------------------------------------------------- records


def test_three_formats_give_the_same_records(tmp_path):
    jsonl = write_jsonl_data(tmp_path / "jsonl")
    expected = [(jsonl / f"image_{i}.png", CAPTIONS[i]) for i in range(4)]
    assert [(r.image, r.caption) for r in read_records(jsonl)] == expected

    txt = tmp_path / "txt"
    for i, path in enumerate(write_images(txt / "sub")):  # searched recursively, sorted
        path.with_suffix(".txt").write_text(CAPTIONS[i] + "\n")
    assert [(r.image.name, r.caption) for r in read_records(txt)] == [(p.name, c) for p, c in expected]

    rows = "\n".join(f"{p.name},\"{c}\"" for p, c in expected)
    (jsonl / "data.csv").write_text(f"image_name,caption\n{rows}\n")  # relative to the CSV's folder
    assert [(r.image, r.caption) for r in read_records(jsonl / "data.csv")] == expected


def test_bad_data_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        read_records(tmp_path / "missing")
    write_images(tmp_path / "plain", count=2)
    (tmp_path / "plain" / "image_0.txt").write_text("a cat")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no same-stem .txt caption.*image_1.png"):
        read_records(tmp_path / "plain")
    (tmp_path / "bad.csv").write_text("file,text\na.png,a cat\n")
    with pytest.raises(ValueError, match="needs the columns 'image_name' and 'caption'"):
        read_records(tmp_path / "bad.csv")
    folder = write_jsonl_data(tmp_path / "jsonl", count=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="do not exist.*gone.png"):
        read_records(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"image": "image_0.png"}) + "\n")
    with pytest.raises(ValueError, match="line 1: expected"):
        read_records(folder)


def test_training_pixels_center_crop_and_range():
    # left and right quarters red / blue, middle grey: the square center crop keeps only grey
    array = np.full((40, 80, 3), 128, dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 60:] = (0, 0, 255)
    pixels = training_pixels(Image.fromarray(array), 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 127.5 - 1), rtol=0, atol=1e-6)  # measured 6e-8
    assert training_pixels(Image.new("RGB", (7, 9), "white"), 8).eq(1).all()


# ------------------------------------------------------------------------------------------------- draws


def test_draws_depend_only_on_seed_step_and_index():
    first = draw_sample(3, 5, 7, (4, 2, 2), text_dropout=0.5, image_dropout=0.5, mask_size=(8, 8))
    again = draw_sample(3, 5, 7, (4, 2, 2), text_dropout=0.5, image_dropout=0.5, mask_size=(8, 8))
    assert first.timestep == again.timestep and torch.equal(first.noise, again.noise)
    assert np.array_equal(first.inpaint_mask, again.inpaint_mask)
    others = [draw_sample(*key, (4, 2, 2), text_dropout=0.5) for key in ((4, 5, 7), (3, 6, 7), (3, 5, 8))]
    assert all(not torch.equal(first.noise, o.noise) for o in others)


def test_draw_statistics():
    draws = [draw_sample(0, 0, i, (1,), text_dropout=0.5, image_dropout=0.1) for i in range(2000)]
    timesteps = np.array([d.timestep for d in draws])
    assert timesteps.min() >= 0 and timesteps.max() <= 999 and 400 < timesteps.mean() < 600
    # binomial(2000, p): 5 standard deviations are 0.056 (p = 0.5) and 0.034 (p = 0.1)
    assert abs(np.mean([d.text_dropped for d in draws]) - 0.5) < 0.056
    assert abs(np.mean([d.image_dropped for d in draws]) - 0.1) < 0.034
    assert not any(draw_sample(0, 0, i, (1,), text_dropout=0.0).text_dropped for i in range(100))


def test_data_order_is_a_fresh_permutation_per_epoch():
    count, batch = 5, 3
    positions = [i for step in range(10) for i in batch_records(11, step, batch, count)]  # 30 = 6 epochs
    epochs = [positions[e * count:(e + 1) * count] for e in range(6)]
    assert all(sorted(e) == list(range(count)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert epochs[0] == epoch_order(11, 0, count).tolist()
    # the global batch of a step is what one process would take, whatever the batch split
    assert batch_records(11, 1, 6, count) == positions[6:12]


def test_inpaint_masks_follow_the_original_recipe():
    masks = np.stack([inpaint_mask(32, 32, np.random.default_rng(seed)) for seed in range(300)])
    assert masks.shape == (300, 32, 32) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    known = masks.mean(axis=(1, 2))
    assert 0.05 < known.mean() < 0.8 and known.min() < 0.05 and known.max() > 0.3
    # the box-only case (probability 0.1): the known region is an axis-aligned square
    squares = 0
    for mask in masks:
        rows, cols = np.nonzero(mask)
        if len(rows) and mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1) and np.ptp(rows) == np.ptp(cols):
            squares += 1
    assert 10 <= squares <= 60  # binomial(300, 0.1) = 30 +- 5
    # frames keep the border: some masks are known along all four edges
    border = masks[:, [0, -1], :].min(axis=(1, 2)) * masks[:, :, [0, -1]].min(axis=(1, 2))
    assert border.sum() > 10


def test_with_dropout_replaces_the_dropped_rows():
    features = {"text_embeds": torch.arange(6.0).view(3, 2), "text_hidden_states": torch.ones(3, 4, 2),
                "image_embeds": torch.ones(3, 2), "latents": torch.ones(3, 4, 2, 2)}
    null = {"text_embeds": torch.full((1, 2), -1.0), "text_hidden_states": torch.zeros(1, 4, 2),
            "image_embeds": torch.full((1, 2), 7.0)}
    out = with_dropout(features, null, torch.tensor([True, False, False]), torch.tensor([False, False, True]))
    assert out["text_embeds"].tolist() == [[-1, -1], [2, 3], [4, 5]]
    assert out["text_hidden_states"][0].eq(0).all() and out["text_hidden_states"][1:].eq(1).all()
    assert out["image_embeds"].tolist() == [[1, 1], [1, 1], [7, 7]]
    assert out["latents"] is features["latents"]


# ------------------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def tiny_components():
    return Components.from_config("tiny")


@pytest.mark.parametrize("task", ["decoder", "prior"])
def test_cache_holds_what_the_encoders_compute(tmp_path, tiny_components, task):
    records = read_records(write_jsonl_data(tmp_path / "data"))
    encoders = Encoders(tiny_components, task, RESOLUTION)
    description = cache_description(task, records, RESOLUTION, {"source": "tiny"})
    folder = tmp_path / "cache"
    # two processes' shares (shard size 3: shards 0 and 1), the second process first; the index comes last
    build_cache(folder, records, encoders, description, shard_size=3, rank=1, world_size=2, progress=False)
    assert not (folder / "index.json").exists() and (folder / "shard-00001.safetensors").exists()
    build_cache(folder, records, encoders, description, shard_size=3, rank=0, world_size=2, progress=False)
    cached, encoded = CachedFeatures(folder), EncodedFeatures(records, encoders)
    assert len(cached) == len(encoded) == 4
    order = [3, 0, 2]
    got, expected = cached.features(order), encoded.features(order)
    assert set(got) == set(FEATURES[task])
    for key in got:
        # the cache encoded 3 + 1 images per batch, this 3: float32 rounding of other batch shapes (measured 0)
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    if task == "decoder":
        assert got["latents"].shape == (3, 4, RESOLUTION // 8, RESOLUTION // 8)
    else:
        assert got["text_mask"].dtype == torch.bool
    for key in encoded.null:
        torch.testing.assert_close(cached.null[key], encoded.null[key])
    # complete and matching: reused without encoders; other data: refused
    assert build_cache(folder, records, None, description) == folder
    with pytest.raises(ValueError, match="other data, weights or settings"):
        build_cache(folder, records[:2], None, cache_description(task, records[:2], RESOLUTION, {"source": "tiny"}))
