"""Finding, converting and loading weights (kandinsky.hub), offline: the "hub" is a folder the tests
write (tiny diffusers pipelines saved with save_pretrained, tiny original checkpoints from the
fixtures) and ``snapshot_download`` is replaced by a function that copies from it."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import kandinsky.hub as hub
from kandinsky.convert import from_original
from kandinsky.hub import WeightsNotFoundError, convert_all, resolve
from kandinsky.models import config_from_dict
from kandinsky.models.unet import UNet
from kandinsky.pipeline import Kandinsky21
from kandinsky.testing import load_original_fixture, prefixed, randomize_
from kandinsky.weights import load_component, save_component, write_base
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
    written = {"prior", "unet", "movq", "mclip", "mclip_tokenizer", "clip_text", "clip_tokenizer", "clip_vision"}
    assert {p.name for p in cache.iterdir()} == written | {f".{name}.lock" for name in written}  # + the fill locks
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
    # every repository the pipeline needs, and today's command to fetch each (huggingface-cli is gone)
    assert all(f"`hf download {repo}`" in message for repo in (DECODER, PRIOR, INPAINT))
    assert "huggingface-cli" not in message and "inpaint only" in message and "\n" not in message
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
    save_component("mclip", mclip, folder / "text_encoder")  # config.json + weights (the original ships a .bin)
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


# --- base.json: a folder of trained components on top of a base -------------------------------------------


def _tiny_unet(seed: int) -> UNet:
    config = json.loads((Path(__file__).resolve().parent.parent / "configs" / "unet_tiny.json").read_text())
    return randomize_(UNet(config_from_dict("unet", config)), seed).eval()


def _same_weights(a, b) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_missing_components_come_from_the_base(tmp_path):
    base_unet, trained_unet, mclip = _tiny_unet(0), _tiny_unet(1), tiny_mclip(seed=2)
    save_component("unet", base_unet, tmp_path / "base" / "unet")
    save_component("mclip", mclip, tmp_path / "base" / "mclip")
    save_component("mclip_tokenizer", tiny_xlmr_tokenizer(), tmp_path / "base" / "mclip_tokenizer")
    save_component("unet", trained_unet, tmp_path / "runs" / "trained" / "unet")
    write_base(tmp_path / "runs" / "trained", "../../base")  # relative to the trained folder
    assert hub.detect_layout(tmp_path / "runs" / "trained") == "ours"
    parts = resolve(tmp_path / "runs" / "trained")
    assert _same_weights(parts["unet"].load(), trained_unet)
    assert _same_weights(parts["mclip"].load(), mclip)
    assert parts["mclip_tokenizer"].load()("the cat").input_ids == tiny_xlmr_tokenizer()("the cat").input_ids
    with pytest.raises(WeightsNotFoundError, match="has no movq/"):  # neither folder has it: the base says so
        parts["movq"].load()
    pipe = Kandinsky21.from_pretrained(str(tmp_path / "runs" / "trained"), progress=False)
    assert _same_weights(pipe.module("unet"), trained_unet) and _same_weights(pipe.module("mclip"), mclip)
    # a folder holding only base.json is a pointer to its base
    write_base(tmp_path / "pointer", str(tmp_path / "base"))
    assert _same_weights(resolve(tmp_path / "pointer")["unet"].load(), base_unet)


def test_base_options_are_passed_to_resolve(tmp_path, monkeypatch):
    fake = FakeSnapshots(tmp_path / "hub", tmp_path / "snapshots", fail=True)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    write_base(tmp_path / "trained", DECODER, revision="v2")
    parts = resolve(tmp_path / "trained", cache_dir=tmp_path / "cache")
    assert "kandinsky-community--kandinsky-2-1@v2" in repr(parts["movq"])
    with pytest.raises(WeightsNotFoundError):
        parts["movq"].load()
    assert fake.calls and {revision for _, revision, _ in fake.calls} == {"v2"}


def test_bad_base_files(tmp_path):
    write_base(tmp_path / "a", DECODER, revison="v2")
    with pytest.raises(ValueError, match="unknown keys \\['revison'\\]"):
        resolve(tmp_path / "a")
    write_base(tmp_path / "b", str(tmp_path / "c"))
    write_base(tmp_path / "c", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="cycle"):
        resolve(tmp_path / "b")
    write_base(tmp_path / "d", str(tmp_path / "d"))
    with pytest.raises(ValueError, match="cycle"):
        resolve(tmp_path / "d")


def test_a_component_already_written_is_kept(fake_hub, tmp_path, monkeypatch):
    """As when another process converted the same component first: its copy stays."""
    root, _ = fake_hub
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "snapshots"))
    origin = hub.Origin(DECODER, "diffusers")
    origin.write("mclip_tokenizer", tmp_path / "out" / "mclip_tokenizer")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "mclip_tokenizer").iterdir()}
    origin.write("mclip_tokenizer", tmp_path / "out" / "mclip_tokenizer")  # already there: kept as it is
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "mclip_tokenizer").iterdir()} == before
    assert load_component("mclip_tokenizer", tmp_path / "out" / "mclip_tokenizer")("the cat").input_ids


def test_save_pretrained_round_trip_and_overwrite(fake_hub, tmp_path):
    _, reference = fake_hub
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], inpaint_pipeline=reference["inpaint"],
                                      progress=False)
    pipe.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(hub.COMPONENTS)
    loaded = Kandinsky21.from_pretrained(str(tmp_path / "ours"), progress=False)
    expected = pipe.text2img("the cat", generator=seed(3), **ARGS)
    assert np.array_equal(loaded.text2img("the cat", generator=seed(3), **ARGS), expected)
    before = (tmp_path / "ours" / "movq" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "movq" / "model.safetensors").stat().st_mtime_ns == before  # nothing rewritten
    again = Kandinsky21.from_pretrained(str(tmp_path / "ours"), progress=False)  # lazy: reads the folder it replaces
    again.save_pretrained(tmp_path / "ours", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(hub.COMPONENTS)
    reloaded = Kandinsky21.from_pretrained(str(tmp_path / "ours"), progress=False)
    assert np.array_equal(reloaded.text2img("the cat", generator=seed(3), **ARGS), expected)


def test_offline_error_of_the_original_layout_names_its_repositories(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(tmp_path, tmp_path / "s", fail=True))
    parts = resolve("ai-forever/Kandinsky_2.1", cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsNotFoundError) as error:
        parts["clip_text"].load()
    message = str(error.value)
    assert "`hf download ai-forever/Kandinsky_2.1`" in message and "`hf download openai/clip-vit-large-patch14`" in message


def test_processes_filling_the_same_component_convert_it_once(fake_hub, tmp_path, monkeypatch):
    """Two writers of one cache folder: the second waits for the first (file lock) and keeps its copy,
    instead of converting again and deleting the other's folder."""
    import threading
    import time

    root, _ = fake_hub
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "snapshots"))
    conversions, real_convert = [], hub.convert_files

    def slow_convert(*args, **kwargs):
        conversions.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other writer to arrive while this one works
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(hub, "convert_files", slow_convert)
    out, errors = tmp_path / "cache" / "movq", []

    def fill():
        try:
            hub.Origin(DECODER, "diffusers").write("movq", out)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    writers = [threading.Thread(target=fill) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == [] and len(conversions) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [".movq.lock", "movq"]
    assert load_component("movq", out).config.in_channels == 3


def test_a_writer_killed_while_replacing_leaves_the_component_restorable(fake_hub, tmp_path, monkeypatch):
    """The cache folder moved aside by a killed writer comes back instead of being converted again."""
    root, _ = fake_hub
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "snapshots"))
    origin = hub.Origin(DECODER, "diffusers")
    origin.write("mclip_tokenizer", tmp_path / "cache" / "mclip_tokenizer")
    (tmp_path / "cache" / "mclip_tokenizer").rename(tmp_path / "cache" / ".mclip_tokenizer.old-999999999")
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "unused", fail=True))
    origin.write("mclip_tokenizer", tmp_path / "cache" / "mclip_tokenizer")  # no download: restored
    assert load_component("mclip_tokenizer", tmp_path / "cache" / "mclip_tokenizer")("the cat").input_ids


def test_save_pretrained_overwrite_refuses_folders_it_did_not_write_before_writing(fake_hub, tmp_path):
    _, reference = fake_hub
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    (tmp_path / "ours" / "unet").mkdir(parents=True)
    (tmp_path / "ours" / "unet" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace .*unet"):
        pipe.save_pretrained(tmp_path / "ours", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["unet"]  # nothing written before the refusal
    assert (tmp_path / "ours" / "unet" / "notes.txt").read_text() == "precious"
