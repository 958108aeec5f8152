"""Finding, converting and loading weights (kandinsky.hub), offline: the "hub" is a folder the tests
write (tiny diffusers pipelines saved with save_pretrained, tiny original checkpoints from the
fixtures) and ``snapshot_download`` is replaced by a function that copies from it."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import kandinsky.hub as hub
from kandinsky.convert import from_original
from kandinsky.hub import WeightsNotFoundError, convert_all, resolve
from kandinsky.pipeline import Kandinsky21
from kandinsky.testing import load_original_fixture, prefixed
from tiny_components import tiny_clip_text_model, tiny_clip_tokenizer, tiny_clip_vision_model, tiny_mclip, \
    tiny_xlmr_tokenizer

pytest.importorskip("diffusers")
from test_pipeline import SIZE, build_reference, seed  # noqa: E402  (after the diffusers check)

DECODER, PRIOR, INPAINT = ("kandinsky-community/kandinsky-2-1", "kandinsky-community/kandinsky-2-1-prior",
                           "kandinsky-community/kandinsky-2-1-inpaint")
ARGS = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2, output_type="np")



@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A folder per repository, as the hub would serve them (diffusers save_pretrained)."""
    root = tmp_path_factory.mktemp("hub")
    reference = build_reference()
    reference["text2img"].save_pretrained(root / DECODER)
    reference["prior"].save_pretrained(root / PRIOR)
    reference["inpaint"].save_pretrained(root / INPAINT)
    return root, reference


class FakeSnapshots:
    """Stands in for huggingface_hub.snapshot_download: copies the matching files of a repository folder
    into a snapshot folder and records every call."""

    def __init__(self, root: Path, snapshots: Path, fail: bool = False):
        self.root, self.snapshots, self.fail, self.calls = root, snapshots, fail, []

    def __call__(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        self.calls.append((repo_id, revision, tuple(allow_patterns or ())))
        if self.fail:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub and we "
                                          "cannot find the requested files in the local cache.")
        source = self.root / repo_id
        if not source.is_dir():
            raise LocalEntryNotFoundError(f"Repository Not Found for url: https://huggingface.co/{repo_id}")
        snapshot = self.snapshots / repo_id / (revision or "main")
        for path in source.rglob("*"):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns or ["*"]):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / relative)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def files(self, repo_id: str) -> set[str]:
        folder = self.snapshots / repo_id
        return {p.relative_to(folder).as_posix().split("/", 1)[1] for p in folder.rglob("*") if p.is_file()}


def test_diffusers_layout_from_the_hub_then_offline(fake_hub, tmp_path, monkeypatch):
    root, reference = fake_hub
    fake = FakeSnapshots(root, tmp_path / "snapshots")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    pipe = Kandinsky21.from_pretrained(DECODER, cache_dir=tmp_path / "cache", progress=False)
    assert fake.calls == []  # lazy: nothing fetched before a task needs it
    images = pipe.text2img("the cat", generator=seed(1), **ARGS)
    expected = reference["combined"]("the cat", generator=seed(1), **ARGS).images
    assert np.abs(images - expected).max() < 2e-3  # float32, see test_pipeline
    # text2img never touches the inpainting repository, and only one weights file per component is fetched
    assert INPAINT not in {repo for repo, _, _ in fake.calls}
    assert not any(name.endswith(".bin") for name in fake.files(DECODER) | fake.files(PRIOR))
    assert "scheduler/scheduler_config.json" not in fake.files(DECODER)
    cache = tmp_path / "cache" / "kandinsky-community--kandinsky-2-1@main"
    assert {p.name for p in cache.iterdir()} == {"prior", "unet", "movq", "mclip", "mclip_tokenizer", "clip_text",
                                                 "clip_tokenizer", "clip_vision"}
    # converted once: a second pipeline works with the hub unreachable
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "unused", fail=True))
    again = Kandinsky21.from_pretrained(DECODER, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(again.text2img("the cat", generator=seed(1), **ARGS), images)


def test_inpainting_unet_comes_from_the_inpaint_repo(fake_hub, tmp_path, monkeypatch):
    root, reference = fake_hub
    fake = FakeSnapshots(root, tmp_path / "snapshots")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    parts = resolve(DECODER, cache_dir=tmp_path / "cache", revision="v1")
    unet = parts["unet_inpaint"].load()
    assert unet.config.in_channels == 9
    assert [(repo, revision) for repo, revision, _ in fake.calls] == [(INPAINT, "v1")]
    assert (tmp_path / "cache" / "kandinsky-community--kandinsky-2-1@v1" / "unet_inpaint" / "model.safetensors").is_file()


def test_unreachable_hub_error_names_repo_and_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(tmp_path, tmp_path / "s", fail=True))
    pipe = Kandinsky21.from_pretrained(DECODER, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(WeightsNotFoundError) as error:
        pipe.text2img("the cat", **ARGS)
    message = str(error.value)
    assert PRIOR in message and "--weights" in message and "LocalEntryNotFoundError" in message
    assert not (tmp_path / "cache" / "kandinsky-community--kandinsky-2-1@main" / "prior").exists()


def test_local_diffusers_folders_and_converted_layout(fake_hub, tmp_path, monkeypatch):
    root, reference = fake_hub
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "s", fail=True))  # no hub
    local = root / DECODER  # a local decoder folder; its -prior / -inpaint siblings are found beside it
    out = convert_all(local, tmp_path / "ours")
    assert hub.detect_layout(out) == "ours"
    from_folder = Kandinsky21.from_pretrained(str(local), cache_dir=tmp_path / "cache", progress=False)
    from_ours = Kandinsky21.from_pretrained(str(out), progress=False)
    a = from_folder.text2img("a dog", generator=seed(2), **ARGS)
    b = from_ours.text2img("a dog", generator=seed(2), **ARGS)
    assert np.array_equal(a, b)


def write_original_layout(folder: Path) -> dict:
    """The original repository's files, with the fixtures' tiny checkpoints, and a CLIP folder."""
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True)
    configs = {}
    for component, filename in hub.ORIGINAL_FILES.items():
        tensors, meta = load_original_fixture(component)
        torch.save(prefixed(tensors, "state_dict."), folder / filename)
        configs[component] = meta["original_config"]
        if component == "prior":
            torch.save((tensors["input.clip_mean"].reshape(-1), tensors["input.clip_std"].reshape(-1)),
                       folder / hub.CLIP_STATS_FILE)
    mclip = tiny_mclip(seed=1)
    hub.save_mclip(mclip, folder / "text_encoder")  # config.json + weights (the original ships a .bin)
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(mclip.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    tiny_xlmr_tokenizer().save_pretrained(folder / "text_encoder")
    text, vision = tiny_clip_text_model(seed=2), tiny_clip_vision_model(seed=3)
    clip = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                projection_dim=text.config.projection_dim))
    clip.text_model.load_state_dict(text.text_model.state_dict())
    clip.text_projection.load_state_dict(text.text_projection.state_dict())
    clip.vision_model.load_state_dict(vision.vision_model.state_dict())
    clip.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    clip.save_pretrained(folder.parent / "clip")
    tiny_clip_tokenizer().save_pretrained(folder.parent / "clip")
    return dict(configs=configs, mclip=mclip, text=text, vision=vision)


def test_original_layout_folder(tmp_path):
    made = write_original_layout(tmp_path / "Kandinsky_2.1")
    parts = resolve(tmp_path / "Kandinsky_2.1", cache_dir=tmp_path / "cache", clip_source=str(tmp_path / "clip"),
                    original_configs=made["configs"])
    for component in hub.ORIGINAL_FILES:
        tensors, meta = load_original_fixture(component)
        extra = {}
        if component == "prior":
            extra["clip_stats"] = (tensors["input.clip_mean"].reshape(-1), tensors["input.clip_std"].reshape(-1))
        expected = from_original(component, meta["original_config"], prefixed(tensors, "state_dict."), **extra)
        loaded = parts[component].load()
        assert loaded.state_dict().keys() == expected.state_dict().keys()
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items()), component
    ids = torch.randint(0, 70, (2, 77))
    mask = torch.ones_like(ids)
    assert torch.equal(parts["mclip"].load()(ids, mask)[0], made["mclip"](ids, mask)[0])
    clip_ids = torch.randint(0, 500, (1, 77))
    assert torch.allclose(parts["clip_text"].load()(clip_ids).text_embeds, made["text"](clip_ids).text_embeds)
    pixels = torch.randn(1, 3, 224, 224)
    assert torch.allclose(parts["clip_vision"].load()(pixels).image_embeds, made["vision"](pixels).image_embeds)
    assert parts["mclip_tokenizer"].load()("the cat").input_ids == tiny_xlmr_tokenizer()("the cat").input_ids
    assert parts["clip_tokenizer"].load()("the cat").input_ids == tiny_clip_tokenizer()("the cat").input_ids


def test_local_diffusers_folder_without_prior_beside_it(fake_hub, tmp_path):
    root, _ = fake_hub
    shutil.copytree(root / DECODER / "movq", tmp_path / "decoder" / "movq")
    shutil.copytree(root / DECODER / "unet", tmp_path / "decoder" / "unet")
    parts = resolve(tmp_path / "decoder", cache_dir=tmp_path / "cache")
    assert parts["movq"].load().config.downsample_factor == 2  # what is there loads
    with pytest.raises(WeightsNotFoundError, match="prior_source="):
        parts["prior"].load()
    with pytest.raises(WeightsNotFoundError, match="text_encoder"):
        parts["mclip"].load()


def test_original_layout_missing_file_is_reported(tmp_path):
    folder = tmp_path / "Kandinsky_2.1"
    folder.mkdir()
    (folder / "movq_final.ckpt").write_bytes(b"")
    parts = resolve(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsNotFoundError, match="decoder_fp16.ckpt"):
        parts["unet"].load()


def test_bad_sources(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        resolve(str(tmp_path / "missing" / "deeper" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="known layout"):
        resolve(tmp_path / "empty")
    with pytest.raises(ValueError, match="layout"):
        resolve(DECODER, layout="nope")
    with pytest.raises(WeightsNotFoundError, match="no unet/"):
        (tmp_path / "ours" / "movq").mkdir(parents=True)
        (tmp_path / "ours" / "movq" / "config.json").write_text('{"format": "kandinsky21"}')
        resolve(tmp_path / "ours")["unet"].load()


def test_cache_root_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KANDINSKY21_CACHE", str(tmp_path))
    assert hub.cache_root() == tmp_path
    assert hub.cache_root(tmp_path / "x") == tmp_path / "x"
