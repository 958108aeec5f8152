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


# --- Kandinsky 2.2: kandinsky-2-2-decoder, -prior, -decoder-inpaint, -controlnet-depth ------------------------------

from kandinsky.pipeline import Kandinsky22  # noqa: E402

DECODER_22, PRIOR_22, INPAINT_22, CONTROLNET_22 = (f"kandinsky-community/kandinsky-2-2-{name}" for name in
                                                   ("decoder", "prior", "decoder-inpaint", "controlnet-depth"))
# kandinsky-2-2-decoder's scheduler/scheduler_config.json (as far as we know it): DDPM, the posterior variance
OFFICIAL_22_DECODER_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                     beta_end=0.012, clip_sample=False, steps_offset=1, timestep_spacing="leading",
                                     prediction_type="epsilon", variance_type="fixed_small", thresholding=False)
ARGS_22 = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, output_type="np")


def pipelines_22() -> dict:
    """diffusers' four 2.2 pipelines on tiny random components (test_k22's), as the hub repositories hold them."""
    import diffusers
    from transformers import CLIPImageProcessorPil

    from kandinsky import tiny
    from test_k22 import WIDTH, diffusers_movq, diffusers_prior, diffusers_unet

    tokenizer = tiny.clip_tokenizer()
    prior = diffusers.KandinskyV22PriorPipeline(
        prior=diffusers_prior(), tokenizer=tokenizer,
        text_encoder=tiny.clip_text_model(1, len(tokenizer), projection_dim=WIDTH, width=WIDTH),
        image_encoder=tiny.clip_vision_model(2, projection_dim=WIDTH, width=WIDTH),
        scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                            num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0),
        image_processor=CLIPImageProcessorPil(crop_size=224, size=224, resample=3))
    decoder = dict(scheduler=diffusers.DDPMScheduler(**OFFICIAL_22_DECODER_SCHEDULER), movq=diffusers_movq())
    pipes = dict(prior=prior, decoder=diffusers.KandinskyV22Pipeline(unet=diffusers_unet(6), **decoder),
                 inpaint=diffusers.KandinskyV22InpaintPipeline(unet=diffusers_unet(7, in_channels=9), **decoder),
                 controlnet=diffusers.KandinskyV22ControlnetPipeline(
                     unet=diffusers_unet(8, in_channels=8, addition_embed_type="image_hint"), **decoder))
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def same_sampling(a, b) -> bool:
    fields = ("sampler", "spacing", "offset", "options", "prev_stride")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and torch.equal(a.schedule.betas, b.schedule.betas)


@pytest.fixture(scope="module")
def fake_hub_22(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub22")
    pipes = pipelines_22()
    for name, repo in (("prior", PRIOR_22), ("decoder", DECODER_22), ("inpaint", INPAINT_22),
                       ("controlnet", CONTROLNET_22)):
        pipes[name].save_pretrained(root / repo)
    return root, pipes


def test_22_hub_repositories_load_lazily_and_sample_with_the_decoder_scheduler(fake_hub_22, tmp_path, monkeypatch):
    root, pipes = fake_hub_22
    fake = FakeSnapshots(root, tmp_path / "snapshots")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = Kandinsky22.from_pretrained(DECODER_22, cache_dir=tmp_path / "cache", progress=False)
    assert [(repo, patterns) for repo, _, patterns in fake.calls] == [(DECODER_22, ("scheduler/scheduler_config.json",))]
    sampling = pipe.decoder_sampling  # kandinsky-2-2-decoder's DDPMScheduler, not our default DDIM
    assert (sampling.sampler, sampling.offset, sampling.options["variance"]) == ("ddpm", 1, "fixed_small")
    assert pipe.components.names() == ["clip_text", "clip_vision", "prior", "unet", "unet_inpaint", "movq",
                                       "unet_controlnet", "clip_tokenizer"]
    expected = Kandinsky22.from_diffusers(pipes["prior"], pipes["decoder"], progress=False)
    images = pipe.text2img("a cat", generator=seed(1), **ARGS_22)
    assert np.array_equal(images, expected.text2img("a cat", generator=seed(1), **ARGS_22))  # the same float32 weights
    assert {repo for repo, _, _ in fake.calls} == {DECODER_22, PRIOR_22}  # text2img needs no inpaint/ControlNet UNet
    assert "text_encoder/model.safetensors" in fake.files(PRIOR_22) and "tokenizer/tokenizer.json" in fake.files(PRIOR_22)
    parts = resolve(DECODER_22, cache_dir=tmp_path / "cache")
    assert "mclip" not in parts and parts["unet_controlnet"].load().config.conditioning == "image_hint"
    assert parts["unet_inpaint"].load().config.in_channels == 9
    assert {repo for repo, _, _ in fake.calls} == {DECODER_22, PRIOR_22, INPAINT_22, CONTROLNET_22}
    cache = tmp_path / "cache" / "kandinsky-community--kandinsky-2-2-decoder@main"
    assert {p.name for p in cache.iterdir() if not p.name.startswith(".")} == set(hub.COMPONENTS_22)
    # converted once: the hub unreachable, the same pipeline again
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "unused", fail=True))
    again = Kandinsky22.from_pretrained(DECODER_22, cache_dir=tmp_path / "cache", progress=False)
    assert same_sampling(again.decoder_sampling, sampling)
    assert np.array_equal(again.text2img("a cat", generator=seed(1), **ARGS_22), images)


def test_22_errors_name_the_2_2_repositories(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(tmp_path, tmp_path / "s", fail=True))
    with pytest.raises(WeightsNotFoundError, match="scheduler_config.json") as error:
        Kandinsky22.from_pretrained(DECODER_22, cache_dir=tmp_path / "cache", progress=False)
    assert f"`hf download {DECODER_22}`" in str(error.value)
    parts = resolve(DECODER_22, cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsNotFoundError) as error:
        parts["prior"].load()
    assert all(f"`hf download {repo}`" in str(error.value) for repo in (DECODER_22, PRIOR_22, INPAINT_22, CONTROLNET_22))
    assert "ControlNet UNet, for controlnet only" in str(error.value) and "M-CLIP" not in str(error.value)
    with pytest.raises(ValueError, match="Kandinsky 2.2 has no original layout"):
        resolve(DECODER_22, layout="original")
    with pytest.raises(ValueError, match="controlnet_source: Kandinsky 2.1 has no ControlNet"):
        resolve(DECODER, controlnet_source="x/y")
    assert hub.detect_model(DECODER_22) == "2.2" and hub.detect_model(DECODER) == "2.1"


def test_22_local_diffusers_folders_and_the_cli(fake_hub_22, tmp_path, monkeypatch, capsys):
    """A local decoder folder finds its siblings by the hub's names, or takes them as options; ``kandinsky convert
    pipeline`` writes our layout with the decoder's scheduler, which loads back to the same pipeline."""
    from kandinsky.cli import main

    root, pipes = fake_hub_22
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(root, tmp_path / "s", fail=True))  # no hub
    local = root / DECODER_22
    assert hub.detect_model(local) == "2.2" and hub.detect_model(root / PRIOR_22) == "2.2"
    shutil.copytree(local, tmp_path / "mine")
    alone = resolve(tmp_path / "mine", cache_dir=tmp_path / "cache")  # 2.2 from the UNet's config, not the name
    assert alone["scheduler"].load()["variance_type"] == "fixed_small" and "mclip" not in alone
    with pytest.raises(WeightsNotFoundError, match="controlnet_source="):
        alone["unet_controlnet"].load()
    given = resolve(tmp_path / "mine", cache_dir=tmp_path / "cache", prior_source=str(root / PRIOR_22),
                    controlnet_source=str(root / CONTROLNET_22))
    assert given["unet_controlnet"].load().config.conditioning == "image_hint"
    assert given["clip_text"].load().config.projection_dim == pipes["prior"].text_encoder.config.projection_dim
    out = convert_all(tmp_path / "mine", tmp_path / "some", components=["movq", "scheduler"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["movq", "scheduler"]
    with pytest.raises(ValueError, match=r"unknown \['mclip'\] for Kandinsky 2.2"):
        convert_all(tmp_path / "mine", tmp_path / "more", components=["mclip"])
    assert main(["convert", "pipeline", str(local), str(tmp_path / "ours"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(hub.COMPONENTS_22)
    assert hub.detect_model(tmp_path / "ours") == "2.2"
    from_ours = Kandinsky22.from_pretrained(tmp_path / "ours", progress=False)
    from_folder = Kandinsky22.from_pretrained(local, cache_dir=tmp_path / "cache", progress=False)
    assert same_sampling(from_ours.decoder_sampling, from_folder.decoder_sampling)
    assert from_ours.decoder_sampling.sampler == "ddpm"
    hint = torch.rand(1, 3, 64, 64, generator=seed(3))
    assert np.array_equal(from_ours.controlnet("a cat", hint, generator=seed(2), **ARGS_22),
                          from_folder.controlnet("a cat", hint, generator=seed(2), **ARGS_22))
    # and back out: the scheduler travels into the diffusers export
    assert main(["convert", "pipeline", str(tmp_path / "ours"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    written = json.loads((tmp_path / "d" / "decoder" / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DDPMScheduler" and written["variance_type"] == "fixed_small"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["controlnet", "decoder", "inpaint",
                                                                  "kandinsky21_export.json", "prior"]
    capsys.readouterr()
