"""Training data (kandinsky/training/data.py): the three data formats, image preprocessing, the keyed random
draws, the data order, the original's inpainting masks, conditioning dropout and the encoder cache; data paths
kept inside their folder, unreadable text and images named, damaged cache files found."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.components import Components
from kandinsky.images import load_image
from kandinsky.training.data import (
    FEATURES,
    BatchPlan,
    CachedFeatures,
    DrawSettings,
    EncodedFeatures,
    Encoders,
    LoaderSettings,
    Record,
    StepBatches,
    batch_records,
    build_cache,
    cache_description,
    cache_problems,
    check_images,
    draw_sample,
    epoch_order,
    inpaint_mask,
    read_records,
    remove_damaged,
    step_loader,
    training_pixels,
    with_dropout,
)
from tiny_training import CAPTIONS, RESOLUTION, corrupt_png_stream, write_images, write_jsonl_data


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


@pytest.fixture(scope="module")
def tiny_components_22():
    from kandinsky import tiny

    return Components(**tiny.components_22(0))


@pytest.mark.parametrize("task", ["decoder", "prior", "decoder_22"])
def test_cache_holds_what_the_encoders_compute(tmp_path, request, task):
    records = read_records(write_jsonl_data(tmp_path / "data"))
    components = request.getfixturevalue("tiny_components_22" if task == "decoder_22" else "tiny_components")
    encoders = Encoders(components, task, RESOLUTION)
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
        # the cache encoded 3 + 1 images per batch, this 3: float32 rounding of other batch shapes (measured 0 on
        # an AVX-512 Xeon; 1.9e-6 on latents of ~0.07 on an AVX2 EPYC, whose oneDNN kernels block batches otherwise)
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    if task != "prior":
        assert got["latents"].shape == (3, 4, RESOLUTION // 8, RESOLUTION // 8)
        assert encoded.sample_shape == cached.sample_shape == (4, RESOLUTION // 8, RESOLUTION // 8)
    else:
        assert got["text_mask"].dtype == torch.bool
        assert encoded.sample_shape == cached.sample_shape == got["image_embeds"].shape[1:]
    if task == "decoder_22":  # no text; a dropped image is the zero image's embedding, 2.2's default negative
        from kandinsky.text_encoders import zero_image_embeds

        assert set(encoded.null) == {"image_embeds"}
        torch.testing.assert_close(encoded.null["image_embeds"], zero_image_embeds(components.module("clip_vision")))
        assert got["image_embeds"].shape == (3, components.module("clip_vision").config.projection_dim)
    for key in encoded.null:
        torch.testing.assert_close(cached.null[key], encoded.null[key])
    # complete and matching: reused without encoders; other data: refused
    assert build_cache(folder, records, None, description) == folder
    with pytest.raises(ValueError, match="other data, weights or settings"):
        build_cache(folder, records[:2], None, cache_description(task, records[:2], RESOLUTION, {"source": "tiny"}))


# ------------------------------------------------------------------------------------------------- hardening (issue 29)


def test_data_paths_stay_inside_their_folder(tmp_path):
    """metadata.jsonl ``../`` and absolute paths, a CSV row with ``../``, a symbolic link out of a .txt-layout
    folder: refused with one line naming the row, unless allow_outside (--allow-outside-paths)."""
    outside = write_images(tmp_path / "elsewhere", count=1)[0]
    folder = write_jsonl_data(tmp_path / "jsonl", count=1)
    lines = (folder / "metadata.jsonl").read_text()
    for name, message in (("../elsewhere/image_0.png", "line 2: file_name: '../elsewhere/image_0.png' leaves the "
                           "folder"), (str(outside), "line 2: file_name: .* is an absolute path outside the folder")):
        (folder / "metadata.jsonl").write_text(lines + json.dumps({"file_name": name, "text": "x"}) + "\n")
        with pytest.raises(ValueError, match=message + ".*--allow-outside-paths"):
            read_records(folder)
        assert read_records(folder, allow_outside=True)[1].image.resolve() == outside.resolve()
    # an absolute path inside the folder is fine
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": str((folder / "image_0.png").resolve()),
                                                       "text": "x"}) + "\n")
    assert read_records(folder)[0].image.resolve() == (folder / "image_0.png").resolve()

    (folder / "data.csv").write_text("image_name,caption\nimage_0.png,a\n../elsewhere/image_0.png,b\n")
    with pytest.raises(ValueError, match=r"data.csv line 3: image_name: '../elsewhere/image_0.png' leaves"):
        read_records(folder / "data.csv")
    assert len(read_records(folder / "data.csv", allow_outside=True)) == 2

    txt = tmp_path / "txt"
    write_images(txt, count=1)
    (txt / "image_0.txt").write_text("a cat")
    (txt / "link.png").symlink_to(outside)
    (txt / "link.txt").write_text("a link")
    with pytest.raises(ValueError, match=r"link.png: 'link.png' leaves the folder"):
        read_records(txt)
    assert len(read_records(txt, allow_outside=True)) == 2


def test_unreadable_text_is_named_and_byte_order_marks_are_read(tmp_path):
    txt = tmp_path / "txt"
    write_images(txt, count=1)
    (txt / "image_0.txt").write_bytes("un caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"image_0.txt line 1 is not UTF-8 text"):
        read_records(txt)

    folder = write_jsonl_data(tmp_path / "jsonl", count=2)
    good = (folder / "metadata.jsonl").read_bytes()
    (folder / "metadata.jsonl").write_bytes(good.replace(b"blue", b"bl\xfce"))
    with pytest.raises(ValueError, match=r"metadata.jsonl line 2 is not UTF-8 text"):
        read_records(folder)
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + good)  # a byte-order mark
    assert [r.caption for r in read_records(folder)] == list(CAPTIONS[:2])

    # a spreadsheet's CSV: byte-order mark, CRLF line ends
    (folder / "data.csv").write_bytes(b"\xef\xbb\xbfimage_name,caption\r\nimage_0.png,\"a, cat\"\r\n")
    assert [(r.image.name, r.caption) for r in read_records(folder / "data.csv")] == [("image_0.png", "a, cat")]

    (folder / "a_folder.png").mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a_folder.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="are folders, not image files.*a_folder.png"):
        read_records(folder)


def test_16_bit_and_transparent_images_are_read_like_their_8_bit_version(tmp_path, tiny_components):
    """A 16-bit PNG (PIL's convert would clip it to white) and a grey image with an opaque alpha channel give the
    features of the 8-bit image: training reads images with kandinsky.images.load_image."""
    rng = np.random.default_rng(0)
    grey = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).resize((96, 80), Image.BICUBIC))
    paths = {"8": tmp_path / "grey8.png", "16": tmp_path / "grey16.png", "la": tmp_path / "grey_alpha.png"}
    Image.fromarray(grey).save(paths["8"])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["16"])  # mode I;16, 0..65535
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), "LA").save(paths["la"])
    assert Image.open(paths["16"]).mode.startswith("I")
    encoded = Encoders(tiny_components, "decoder", RESOLUTION).encode([Record(p, "x") for p in paths.values()])
    for key in ("latents", "image_embeds"):
        assert torch.equal(encoded[key][0], encoded[key][1]) and torch.equal(encoded[key][0], encoded[key][2]), key


def test_images_are_checked_before_training(tmp_path, monkeypatch):
    """Unreadable files and decompression bombs are one ValueError naming the file, found by opening each image
    (no decoding). A corrupt pixel stream with valid checksums passes this check and fails when decoded."""
    paths = write_images(tmp_path, count=3)
    records = [Record(p, "x") for p in paths]
    check_images(records)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image_1.png: cannot read image"):
        check_images(records)
    check_images(records, rank=0, world_size=2)  # each process its share: 0 and 2
    with pytest.raises(ValueError, match=r"image_1.png"):
        check_images(records, rank=1, world_size=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the 96 x 80 images are then "bombs" (a warning)
    with pytest.raises(ValueError, match=r"image_0.png: refused as a decompression bomb"):
        check_images(records[:1])
    monkeypatch.undo()
    corrupt_png_stream(paths[2])
    check_images(records[2:])
    with pytest.raises(ValueError, match=r"image_2.png: cannot read image"):
        load_image(paths[2])


def test_damaged_cache_files_are_found_and_encoded_again(tmp_path, tiny_components):
    records = read_records(write_jsonl_data(tmp_path / "data"))
    encoders = Encoders(tiny_components, "decoder", RESOLUTION)
    description = cache_description("decoder", records, RESOLUTION, {"source": "tiny"})
    folder = build_cache(tmp_path / "cache", records, encoders, description, shard_size=3, progress=False)
    assert cache_problems(folder, description) == []
    expected = CachedFeatures(folder).features([0, 1, 2, 3])
    shard = folder / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    (folder / "null.safetensors").write_bytes(b"{}")
    problems = cache_problems(folder, description)
    assert [p.split(":")[0] for p in problems] == ["shard-00000.safetensors", "null.safetensors"]
    assert "incomplete metadata" in problems[0] or "not fully covered" in problems[0]
    untouched = (folder / "shard-00001.safetensors").stat().st_mtime_ns
    remove_damaged(folder, problems)
    build_cache(folder, records, encoders, description, shard_size=3, progress=False)
    assert cache_problems(folder, description) == []
    assert (folder / "shard-00001.safetensors").stat().st_mtime_ns == untouched  # only the damaged shard again
    got = CachedFeatures(folder).features([0, 1, 2, 3])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    (folder / "index.json").write_text("{")
    with pytest.raises(ValueError, match=r"index.json is damaged .*delete .* to rebuild"):
        cache_problems(folder, description)


# ------------------------------------------------------------------------------------------------- behaviour (issue 25)

DRAWS = 20000
TEXT_DROPOUT, IMAGE_DROPOUT = 0.3, 0.2  # different, so that each decision shows which probability it used


@pytest.fixture(scope="module")
def many_draws():
    return [draw_sample(7, 3, i, (1,), text_dropout=TEXT_DROPOUT, image_dropout=IMAGE_DROPOUT) for i in range(DRAWS)]


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


def test_conditioning_dropout_frequencies_match_their_probabilities_drawn_independently(many_draws):
    """Each dropout's frequency is within 5 binomial standard deviations of its own probability, and the two are
    drawn independently, as the original datasets do (dataset_unclip_2_1.py: two separate
    np.random.binomial(1, p) draws for the text and the CLIP image; dataset_prior.py: the text only)."""
    text = np.array([d.text_dropped for d in many_draws])
    image = np.array([d.image_dropped for d in many_draws])
    assert _within_binomial(text.sum(), DRAWS, TEXT_DROPOUT)
    assert _within_binomial(image.sum(), DRAWS, IMAGE_DROPOUT)
    # independence: both dropped with probability p_text * p_image (not p_image: nested; not 0: exclusive), and
    # the image dropout's frequency is the same whether the text was dropped or not
    assert _within_binomial((text & image).sum(), DRAWS, TEXT_DROPOUT * IMAGE_DROPOUT)
    assert _within_binomial(image[text].sum(), int(text.sum()), IMAGE_DROPOUT)
    assert _within_binomial(image[~text].sum(), int((~text).sum()), IMAGE_DROPOUT)
    # the prior's draws: no image dropout at all (the trainer passes 0), text at its own probability
    prior = [draw_sample(7, 3, i, (1,), text_dropout=0.1, image_dropout=0.0) for i in range(2000)]
    assert not any(d.image_dropped for d in prior)
    assert _within_binomial(sum(d.text_dropped for d in prior), 2000, 0.1)


def test_training_timesteps_cover_0_to_999_and_never_1000(many_draws):
    """Uniform over the 1000 training steps 0..999 (the original's UniformSampler): every value appears in 20000
    draws (each is missed with probability (1 - 1/1000)^20000 = 2e-9), none is 1000 or more, and each tenth of
    the range holds its binomial share."""
    timesteps = np.array([d.timestep for d in many_draws])
    assert set(timesteps.tolist()) == set(range(1000))
    assert timesteps.min() == 0 and timesteps.max() == 999
    counts = np.bincount(timesteps // 100, minlength=10)
    assert len(counts) == 10 and all(_within_binomial(c, DRAWS, 0.1) for c in counts)


# ---------------------------------------------------------------------------------------------- the data loader (issue 28)


class _IndexReader:
    """Stands for the cached features: each record's index as a (1, 2, 3) latent, and one that cannot be read."""

    unreadable = 7

    def read(self, indices):
        if self.unreadable in indices:
            raise ValueError(f"data: record {self.unreadable}: cannot read image")
        return {"latents": torch.tensor(indices, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 3).clone()}


def test_step_batches_give_each_process_its_share_in_any_worker():
    """Micro-batch i of a process is step i // grad_accum's share of the global batch (batch_records: the data
    order, draw_sample: the draws keyed by the position in the global batch), the same through a DataLoader
    with 2 workers; the shares of 2 processes x 2 micro-batches are the global batch's quarters; a data error
    is an item, for the training process to raise."""
    draws = DrawSettings(seed=3, text_dropout=0.5, image_dropout=0.5, inpainting=True)
    whole = StepBatches(_IndexReader(), BatchPlan(3, 8, 1, 6), draws, (1, 2, 3))
    for rank in range(2):
        plan = BatchPlan(3, 8, 2, 6, rank=rank, world_size=2)
        shares = StepBatches(_IndexReader(), plan, draws, (1, 2, 3))
        for step in range(3):
            full = whole[step]
            for micro in range(2):
                part = shares[step * 2 + micro]
                rows = slice(rank * 4 + micro * 2, rank * 4 + micro * 2 + 2)
                for key in ("latents", "timesteps", "noise", "text_dropped", "image_dropped", "inpaint_mask"):
                    assert torch.equal(part[key], full[key][rows]), (rank, step, micro, key)
    assert [int(v) for v in whole[0]["latents"][:, 0, 0, 0]] == batch_records(3, 0, 8, 6)
    first = draw_sample(3, 1, 5, (1, 2, 3), text_dropout=0.5, image_dropout=0.5, mask_size=(2, 3))
    assert torch.equal(whole[1]["noise"][5], first.noise) and int(whole[1]["timesteps"][5]) == first.timestep
    # a DataLoader with workers: the same items, in order, from the step asked for
    loaded = list(step_loader(whole, 1, 4, LoaderSettings(workers=2, prefetch=1)))
    assert [item["step"] for item in loaded] == [1, 2, 3]
    for item, index in zip(loaded, range(1, 4)):
        direct = whole[index]
        assert "error" not in direct and all(torch.equal(item[k], direct[k]) for k in direct if k != "step"), index
    failing = next(i for i in range(20) if 7 in batch_records(3, i, 8, 8))
    item = StepBatches(_IndexReader(), BatchPlan(3, 8, 1, 8), draws, (1, 2, 3))[failing]
    assert item == {"error": "data: record 7: cannot read image", "step": failing}
