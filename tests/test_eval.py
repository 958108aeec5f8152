"""``kandinsky eval`` (kandinsky/eval.py): FID, KID and CLIP score through torchmetrics, offline.

The FID Inception network is the real architecture (torch-fidelity's, ported in kandinsky.eval) with seeded random
weights saved in the weights file's format and read back through ``--inception-weights``; the CLIP model is a
tiny CLIP trained in the test (seeded, about a second) to tell four colours apart, saved as a transformers folder
and read through ``--clip-model``. The formula tests use a small random convolutional network instead (fast).
"""

from __future__ import annotations

import hashlib
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("torchmetrics")

from kandinsky import eval as evaluation  # noqa: E402
from kandinsky.cli import main  # noqa: E402
from kandinsky.hub import WeightsNotFoundError  # noqa: E402
from kandinsky.testing import randomize_  # noqa: E402
from tiny_components import tiny_clip_tokenizer  # noqa: E402

SIZE = 32  # px the sets are resized to
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


class TinyFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> (B, 24) features: two seeded random convolutions and a spatial mean."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2), nn.ReLU())
        randomize_(self, seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1).mean((2, 3))


def smooth_images(count: int, seed: int) -> list[Image.Image]:
    """Random smooth colour fields of several sizes (not square: the centre crop is exercised)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((50 + 4 * (i % 3), 40), Image.BICUBIC))
    return images


def write(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / (names[i] if names else f"{i:06d}.png"))
    return folder


def corrupt(images, level: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float64)
        noise = rng.uniform(0, 255, pixels.shape)
        out.append(Image.fromarray(((1 - level) * pixels + level * noise).round().astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write(tmp_path_factory.mktemp("reference"), smooth_images(40, seed=0))


@pytest.fixture
def offline(monkeypatch):
    """No network: HF_HUB_OFFLINE=1, and any socket connection is an error."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def metrics(generated, reference, **kwargs):
    return evaluation.evaluate(generated, reference, inception_module=TinyFeatures(), clip_source=None, size=SIZE,
                               **kwargs)


# ------------------------------------------------------------------------------------------- FID and KID


def test_fid_of_a_set_against_itself_is_zero(reference):
    result = metrics(reference, reference)
    assert result["generated_images"] == result["reference_images"] == 40
    assert abs(result["fid"]) < 1e-9  # measured 6e-16 (float64; against 8e-4 for the mildest corruption below)
    assert result["kid_subset_size"] == 40 and result["feature_extractor"] == "custom"


def test_fid_and_kid_grow_as_the_set_is_corrupted(reference, tmp_path):
    images = smooth_images(40, seed=0)
    fids, kids = [], []
    for level in (0.05, 0.15, 0.35, 0.7):
        result = metrics(write(tmp_path / f"level-{level}", corrupt(images, level)), reference, kid_subsets=10)
        fids.append(result["fid"])
        kids.append(result["kid_mean"])
    assert fids == sorted(fids) and fids[0] > 1e-4, fids  # measured 8.2e-4, 6.5e-3, 2.6e-2, 4.5e-2
    assert kids == sorted(kids), kids  # measured -2.8e-4 (unbiased: can be < 0), 3.6e-4, 2.3e-3, 3.3e-3
    # another random set from the same distribution is nearer than a heavily corrupted copy
    assert metrics(write(tmp_path / "other", smooth_images(40, seed=7)), reference)["fid"] < fids[-1]


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_agree_with_torchmetrics_used_directly(reference, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    generated = write(tmp_path / "generated", corrupt(smooth_images(40, seed=0), 0.2))
    ours = metrics(generated, reference, kid_subsets=7, kid_subset_size=25)
    load = [torch.stack([evaluation.square_pixels(Image.open(p), SIZE) for p in evaluation.image_files(folder)])
            for folder in (generated, reference)]
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    kid = KernelInceptionDistance(feature=TinyFeatures(), subsets=7, subset_size=25)
    for metric in (fid, kid):
        metric.update(load[1], real=True)
        metric.update(load[0], real=False)
    torch.manual_seed(0)  # KID draws its subsets from the global generator; ours seeds it with 0
    kid_mean, kid_std = kid.compute()
    # used directly, the library computes KID's kernels from the extractor's float32 features; we hand it float64
    # features (FID sums in float64 either way)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)  # measured 3.9e-8
    # KID is a small difference of large kernel sums, which amplifies the float32 rounding of the library's side:
    # measured 1.7e-6 on an AVX-512 Xeon, 3.5e-5 on an AVX2 EPYC (whose GEMMs round otherwise)
    assert ours["kid_mean"] == pytest.approx(float(kid_mean), rel=2e-4)
    assert ours["kid_std"] == pytest.approx(float(kid_std), rel=2e-3)  # measured 3.5e-4: a spread of small values


def test_fid_and_kid_match_their_textbook_formulas(reference, tmp_path):
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), with tr sqrt(S1 S2) = tr sqrt(R S2 R), R = S1^(1/2) from
    a symmetric eigendecomposition (the library takes the eigenvalues of S1 S2 instead); KID = the unbiased MMD^2 of
    the cubic kernel (x.y / d + 1)^3, on whole sets (every subset is the whole set: no sampling)."""
    generated = write(tmp_path / "generated", corrupt(smooth_images(30, seed=3), 0.3))
    fake = evaluation.features(evaluation.image_files(generated), TinyFeatures(), SIZE).numpy()
    real = evaluation.features(evaluation.image_files(reference), TinyFeatures(), SIZE).numpy()
    real = real[:30]
    mu1, mu2 = fake.mean(0), real.mean(0)
    s1, s2 = np.cov(fake, rowvar=False), np.cov(real, rowvar=False)

    def sqrt_psd(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root = sqrt_psd(s1)
    expected_fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(root @ s2 @ root))
    # float64 throughout: measured 6e-13
    assert evaluation.fid(torch.from_numpy(fake), torch.from_numpy(real)) == pytest.approx(expected_fid, rel=1e-9)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    m = len(fake)
    kxx, kyy, kxy = kernel(fake, fake), kernel(real, real), kernel(fake, real)
    expected_kid = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    mean, std = evaluation.kid(torch.from_numpy(fake), torch.from_numpy(real), subsets=3, subset_size=m)
    assert mean == pytest.approx(expected_kid, rel=1e-9) and std == 0  # measured equal


def test_kid_agrees_with_torch_fidelity(reference, tmp_path):
    fidelity = pytest.importorskip("torch_fidelity.metric_kid")
    generated = write(tmp_path / "generated", corrupt(smooth_images(40, seed=0), 0.3))
    fake = evaluation.features(evaluation.image_files(generated), TinyFeatures(), SIZE)
    real = evaluation.features(evaluation.image_files(reference), TinyFeatures(), SIZE)
    theirs = fidelity.kid_features_to_metric(fake, real, kid_subsets=2, kid_subset_size=40, verbose=False)
    mean, _ = evaluation.kid(fake, real, subsets=2, subset_size=40)
    assert mean == pytest.approx(theirs[fidelity.KEY_METRIC_KID_MEAN], rel=1e-9)


# ------------------------------------------------------------------------------------------- the FID Inception


def random_inception(seed: int = 0) -> evaluation.FIDInceptionV3:
    """The FID Inception-v3 with seeded random weights: He-scaled kernels (so that the 2048 features still vary
    with the image after ~100 layers), batch-norm scales, shifts and running statistics all random."""
    model = evaluation.FIDInceptionV3()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * (2 / param[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(1 + 0.2 * torch.rand(buffer.shape, generator=generator))
    return model


def save_inception_weights(model, path):
    """As torch-fidelity's converter writes weights-inception-2015-12-05-6726825d.pth: ``torch.save`` of a plain
    dict of tensors, batch norm's step counters left out."""
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return save_inception_weights(random_inception(), tmp_path_factory.mktemp("inception") / "inception-random.pth")


def test_fid_inception_is_torch_fidelitys_network(inception_weights):
    """The tensors of torch-fidelity's weights file (names and shapes as its converter writes them), and its
    features: recorded from torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (= torchmetrics 1.9's
    NoTrainInceptionV3 with antialias=False) with these random weights, which gave the same bits as ours."""
    names = evaluation.FIDInceptionV3().weight_names()
    state = torch.load(inception_weights, weights_only=True)
    assert {k: v.shape for k, v in state.items()} == names and len(names) == 472  # 94 convolutions + fc
    assert sum(shape.numel() for shape in names.values()) == 23_885_392
    assert names["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3) and names["fc.weight"] == (1008, 2048)
    assert names["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    model = evaluation.inception(inception_weights)
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        features = model(images).double()
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    direction = torch.randn(2048, generator=torch.Generator().manual_seed(4)).double()
    # the two images differ by 0.6% in these sums: 1e-4 leaves room for other CPUs' float32 kernels only
    assert features.sum(1).tolist() == pytest.approx([367.58926179021364, 369.9293990247643], rel=1e-4)
    assert (features @ direction).tolist() == pytest.approx([-10.69797689357022, -10.8817815756463], rel=1e-4)
    with pytest.raises(ValueError, match="expected uint8 images"):
        model(images.float())


def test_fid_inception_matches_torch_fidelity_when_installed(inception_weights):
    """Where torch-fidelity imports (it needs a torchvision built for this torch), the same features, bit for bit."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(inception_weights))
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(evaluation.inception(inception_weights)(images), theirs(images)[0])


def test_fid_and_kid_with_the_fid_inception_architecture(inception_weights, tmp_path, offline):
    images = smooth_images(5, seed=0)
    same = write(tmp_path / "same", images)
    other = write(tmp_path / "other", corrupt(images, 0.5))
    itself = evaluation.evaluate(same, same, inception_weights=inception_weights, clip_source=None, size=SIZE,
                                 kid_subsets=5)
    against = evaluation.evaluate(other, same, inception_weights=inception_weights, clip_source=None, size=SIZE,
                                  kid_subsets=5)
    assert itself["feature_extractor"] == against["feature_extractor"] == "inception-v3-compat"
    assert itself["inception_weights"] == str(inception_weights)
    assert itself["inception_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    # measured -1.7e-7 against 0.12: 5 images of 2048 features leave 2044 zero eigenvalues of S1 S2, whose square
    # roots (torchmetrics takes them of the non-symmetric product) carry the float64 rounding
    assert abs(itself["fid"]) < 1e-5 * against["fid"] and against["fid"] > 0.01, (itself["fid"], against["fid"])
    assert itself["kid_mean"] < against["kid_mean"] and against["kid_mean"] > 0, (itself, against)


# ------------------------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (1-layer towers, 32 px images) trained for 150 seeded steps to match "a <colour> square" with
    noisy squares of that colour, saved as a transformers folder (what --clip-model takes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting; 1 thread is much faster here
    try:
        return _train_tiny_clip(tmp_path_factory.mktemp("clip"))
    finally:
        torch.set_num_threads(threads)


def _train_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    names = list(COLORS)
    rng = np.random.default_rng(0)
    pixels = processor(images=[square(c, rng) for _ in range(8) for c in names], return_tensors="pt")["pixel_values"]
    text = tokenizer([f"a {c} square" for c in names], padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        picks = torch.randint(8, (len(names),), generator=generator) * len(names) + torch.arange(len(names))
        loss = model(**text, pixel_values=pixels[picks], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def square(color: str, rng) -> Image.Image:
    pixels = np.array(COLORS[color])[None, None] + rng.normal(0, 40, (40, 48, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_clip_score_is_higher_for_matched_than_for_shuffled_captions(tiny_clip, tmp_path):
    rng = np.random.default_rng(1)
    colors = [c for c in COLORS for _ in range(3)]
    generated = write(tmp_path / "generated", [square(c, rng) for c in colors])
    records = [{"file": f"{i:06d}.png", "prompt": f"a {c} square"} for i, c in enumerate(colors)]
    (generated / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    matched = evaluation.evaluate(generated, clip_source=str(tiny_clip), size=SIZE)
    assert matched["clip_images"] == 12 and matched["clip_model"] == str(tiny_clip) and "fid" not in matched
    shift = {c: list(COLORS)[(i + 1) % 4] for i, c in enumerate(COLORS)}  # every caption names another colour
    shuffled = evaluation.evaluate(generated, clip_source=str(tiny_clip), size=SIZE,
                                   prompts={r["file"]: f"a {shift[c]} square" for r, c in zip(records, colors)})
    # measured 83.5 against 0 (the mean cosine of mismatched pairs is negative; torchmetrics floors it at 0)
    assert matched["clip_score"] > 50 and shuffled["clip_score"] < 30


def test_clip_score_is_torchmetrics_on_the_full_images(tiny_clip, tmp_path):
    """The CLIP score sees each whole image (CLIP's own preprocessing: resize and centre crop), not the square
    resized copy FID uses: torchmetrics' CLIPScore on the images as files hold them is the reference."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = smooth_images(6, seed=3)  # 50..58 x 40: not square, other than SIZE
    generated = write(tmp_path / "generated", images)
    prompts = {f"{i:06d}.png": f"a {list(COLORS)[i % 4]} square" for i in range(6)}
    ours = evaluation.evaluate(generated, clip_source=str(tiny_clip), size=SIZE, prompts=prompts)["clip_score"]
    metric = CLIPScore(model_name_or_path=evaluation.clip_model(str(tiny_clip)))
    metric.update([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images],
                  [prompts[f"{i:06d}.png"] for i in range(6)])
    assert abs(ours - float(metric.compute())) < 1e-4


def test_clip_score_reads_projected_embeddings_from_transformers(tiny_clip):
    """transformers >= 5 returns a model output from get_image_features: the adapter hands torchmetrics the
    projected embedding, the one CLIPModel's own logits use."""
    from transformers import CLIPModel, CLIPProcessor

    import transformers

    model, processor = evaluation.clip_model(str(tiny_clip))()
    # PIL's resize whether torchvision is installed or not
    assert type(processor.image_processor).__name__ == ("CLIPImageProcessorPil" if hasattr(
        transformers, "CLIPImageProcessorPil") else "CLIPImageProcessor")
    reference, reference_processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(
        tiny_clip)
    inputs = reference_processor(text=["a red square"], images=[square("red", np.random.default_rng(0))],
                                 return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = reference(**inputs).logits_per_image[0, 0] / reference.logit_scale.exp()
        image = model.get_image_features(inputs["pixel_values"])
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(image, text)[0]
    assert isinstance(image, torch.Tensor) and cosine == pytest.approx(float(logits), abs=1e-6)


# ------------------------------------------------------------------------------------------- files and CLI


def one_line_error(capsys) -> str:
    stderr = capsys.readouterr().err
    assert stderr.startswith("kandinsky: error: ") and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_missing_feature_weights_are_one_line_errors_naming_the_file(reference, tiny_clip, tmp_path, capsys,
                                                                     monkeypatch, offline):
    url = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
    missing = tmp_path / "weights" / "inception.pth"
    with pytest.raises(WeightsNotFoundError, match=f"inception.pth; download {url} to "):
        evaluation.inception(missing)
    assert main(["eval", "--generated", str(reference), "--reference", str(reference), "--inception-weights",
                 str(missing), "--no-clip", "--no-progress"]) == 1
    stderr = one_line_error(capsys)
    assert stderr.startswith("kandinsky: error: FID Inception weights not found: ") and str(missing) in stderr
    # the default file, offline: where it goes and the option
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    default = tmp_path / "torch-hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert main(["eval", "--generated", str(reference), "--reference", str(reference), "--no-clip",
                 "--no-progress"]) == 1
    assert one_line_error(capsys).strip() == (f"kandinsky: error: FID Inception weights not found: {default}; "
                                              f"download {url} to {default} or pass --inception-weights FILE")
    # files that are not the Inception weights
    (tmp_path / "notes.pth").write_text("not weights")
    torch.save(TinyFeatures().state_dict(), tmp_path / "other.pth")
    torch.save({k: v for k, v in random_inception().state_dict().items() if not k.startswith("fc.")},
               tmp_path / "no-fc.pth")
    for name, message in (("notes.pth", "not a torch weights file"),
                          ("other.pth", "not the FID Inception-v3 weights: 472 missing tensors"),
                          ("no-fc.pth", r"not the FID Inception-v3 weights: 2 missing tensors \(fc.weight, ...\)")):
        with pytest.raises(ValueError, match=message):
            evaluation.load_inception(tmp_path / name)
        assert main(["eval", "--generated", str(reference), "--reference", str(reference), "--inception-weights",
                     str(tmp_path / name), "--no-clip", "--no-progress"]) == 1
        stderr = one_line_error(capsys)
        assert str(tmp_path / name) in stderr and "weights-inception-2015-12-05-6726825d.pth" in stderr
    # a CLIP folder without its weights
    broken = tmp_path / "clip"
    broken.mkdir()
    for path in tiny_clip.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(WeightsNotFoundError, match="has no model.safetensors or pytorch_model.bin; save a "):
        evaluation.clip_files(str(broken))
    # a CLIP folder that is not there: named as a folder, not looked up as a hub id
    generated = write(tmp_path / "generated", smooth_images(2, seed=1))
    (generated / "manifest.jsonl").write_text(json.dumps({"file": "000000.png", "prompt": "a red square"}) + "\n")
    absent = tmp_path / "no-such-clip"
    assert main(["eval", "--generated", str(generated), "--clip-model", str(absent), "--no-progress"]) == 1
    assert one_line_error(capsys).strip() == (
        f"kandinsky: error: CLIP model folder not found: {absent}; save a transformers CLIPModel and its "
        f"CLIPProcessor there (save_pretrained), or run `hf download openai/clip-vit-large-patch14 config.json "
        f"model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt "
        f"special_tokens_map.json --local-dir {absent}` where the hub is reachable")
    # a hub id offline, with an empty hub cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as error:
        evaluation.clip_files("openai/clip-vit-large-patch14")
    message = str(error.value)
    assert "config.json" in message and str(tmp_path / "hub") in message and "\n" not in message
    assert "hf download openai/clip-vit-large-patch14" in message and "--clip-model" in message


def test_a_torchvision_that_breaks_torchmetrics_is_a_one_line_error(reference, monkeypatch, capsys):
    """torchmetrics imports torchvision whenever it is installed; a torchvision wheel built for another torch
    fails there (an operator registration RuntimeError, or an OSError for libc10_cuda.so)."""
    import importlib

    real = importlib.import_module

    def broken(name, *args):
        if name.startswith("torchmetrics"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="torchmetrics cannot be imported .RuntimeError: operator torchvision::nms"):
        evaluation.fid(torch.zeros(2, 3), torch.ones(2, 3))
    assert main(["eval", "--generated", str(reference), "--no-clip", "--no-progress"]) == 1
    stderr = one_line_error(capsys)
    assert "pip uninstall torchvision torch-fidelity" in stderr and stderr.count("kandinsky21[eval]") == 1


def test_eval_command_runs_offline_from_local_files(reference, tiny_clip, inception_weights, tmp_path, capsys,
                                                    offline):
    """The whole command, no network: --inception-weights FILE (the real architecture, random weights) and
    --clip-model DIR (a transformers CLIP folder)."""
    rng = np.random.default_rng(2)
    colors = ["red", "green", "blue", "yellow"]
    generated = write(tmp_path / "generated", [square(c, rng) for c in colors])
    (generated / "manifest.jsonl").write_text("".join(json.dumps({"file": f"{i:06d}.png", "prompt": f"a {c} square"})
                                                      + "\n" for i, c in enumerate(colors)))
    few = write(tmp_path / "reference", [Image.open(p) for p in evaluation.image_files(reference)[:5]])
    code = main(["eval", "--generated", str(generated), "--reference", str(few), "--inception-weights",
                 str(inception_weights), "--clip-model", str(tiny_clip), "--size", str(SIZE), "--kid-subsets", "5",
                 "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((generated / "eval.json").read_text())
    assert set(result) >= {"fid", "kid_mean", "kid_std", "clip_score", "generated_images", "reference_images"}
    assert result["generated_images"] == result["clip_images"] == 4 and result["reference_images"] == 5
    assert result["kid_subset_size"] == 4 and result["feature_extractor"] == "inception-v3-compat"
    assert result["inception_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    assert result["fid"] > 0.01 and result["clip_model"] == str(tiny_clip)
    assert result["clip_score"] > 50  # matched captions (see the CLIP score tests above)
    for key in ("fid", "kid_mean", "kid_std", "clip_score"):
        assert f"{key}: {result[key]:.6g}" in captured.out
    assert str(generated / "eval.json") in captured.out
    # an existing --output is replaced only with --overwrite, refused before any work
    (tmp_path / "mine.json").write_text("precious")
    args = ["eval", "--generated", str(generated), "--no-clip", "--reference", str(few), "--inception-weights",
            str(inception_weights), "--size", str(SIZE), "--kid-subsets", "5", "--no-progress", "--output",
            str(tmp_path / "mine.json")]
    assert main(args) == 1 and "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "precious"
    assert main([*args, "--overwrite"]) == 0 and "fid" in json.loads((tmp_path / "mine.json").read_text())


def test_prepare_coco_writes_a_prompt_file_and_its_reference_set(tmp_path, capsys):
    from kandinsky.batch import read_prompt_file

    images = tmp_path / "val2014"
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]
    write(images, smooth_images(6, seed=4), names)
    captions = {i: [f"caption {i} a", f" caption {i}\nb "] for i in range(6)}
    annotations = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                   "annotations": [{"image_id": i, "caption": c} for i, cs in captions.items() for c in cs]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    args = ["eval", "--prepare-coco", str(tmp_path / "coco"), "--coco-captions", str(tmp_path / "captions.json"),
            "--coco-images", str(images), "--coco-count", "4", "--coco-seed", "1"]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "coco" / "prompts.jsonl"), str(tmp_path / "coco" /
                                                                                               "reference")]
    rows = [json.loads(line) for line in (tmp_path / "coco" / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    for row in rows:  # one of the image's own captions, whitespace normalised
        index = int(row["id"].rsplit("_", 1)[1])
        assert row["prompt"] in (f"caption {index} a", f"caption {index} b")
    reference = sorted(p.name for p in (tmp_path / "coco" / "reference").iterdir())
    assert reference == sorted(f"{r['id']}.jpg" for r in rows)
    assert [i.file for i in read_prompt_file(tmp_path / "coco" / "prompts.jsonl")] == [f"{r['id']}.png" for r in rows]
    first = (tmp_path / "coco" / "prompts.jsonl").read_text()
    assert main(args) == 0 and (tmp_path / "coco" / "prompts.jsonl").read_text() == first  # seeded: the same set
    capsys.readouterr()
    assert main([*args[:-4], "--coco-count", "7"]) == 1
    assert "count: expected an integer in [1, 6]" in capsys.readouterr().err
