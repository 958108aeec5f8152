"""Weight files: safe reading, the atomic writer, our converted format, every component kind, base.json and
the conversion of official files. (The ``kandinsky convert`` command is tested in test_cli.py.)"""

import ctypes
import errno
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kandinsky.weights as weights
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models import config_from_dict
from kandinsky.models.movq import MoVQ
from kandinsky.models.unet import UNet
from kandinsky.parity import unet as unet_parity
from kandinsky.testing import max_errors, prefixed, randomize_
from kandinsky.weights import (STALE_SECONDS, WeightsFileError, atomic_folder, convert_files, load_component,
                               load_converted, read_base, read_state_dict, save_component, save_converted, write_base)
from tiny_components import (tiny_clip_text_model, tiny_clip_tokenizer, tiny_clip_vision_model, tiny_mclip,
                             tiny_mclip_config, tiny_xlmr_tokenizer)

ROOT = Path(__file__).resolve().parent.parent
TINY = config_from_dict("movq", json.loads((ROOT / "configs" / "movq_tiny.json").read_text()))
TINY_UNET = config_from_dict("unet", json.loads((ROOT / "configs" / "unet_tiny.json").read_text()))


@pytest.fixture(scope="module")
def tiny():
    return randomize_(MoVQ(TINY), 0).eval()


def _images():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _write_marker(text: str):
    """A writer of a folder that overwrite may replace: it carries an export's provenance file."""
    def write(folder: Path) -> None:
        (folder / "marker.txt").write_text(text)
        (folder / weights.EXPORT_FILE).write_text("{}")

    return write


# --- the atomic writer ------------------------------------------------------------------------------

def test_refuses_to_overwrite_unless_asked(tiny, tmp_path):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    before = (folder / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(tiny, "movq", folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    save_converted(tiny, "movq", folder, overwrite=True)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == ["movq"]


def test_overwrite_never_replaces_a_folder_this_package_did_not_write(tiny, tmp_path):
    """Once, `convert SRC OUT --force` deleted whatever folder OUT was."""
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("precious")
    (tmp_path / "file").write_text("precious")
    (tmp_path / "link").symlink_to(save_converted(tiny, "movq", tmp_path / "ours"))
    for path in (precious, tmp_path / "file", tmp_path / "link"):
        with pytest.raises(FileExistsError, match="refusing to replace .*not a folder this package wrote"):
            save_converted(tiny, "movq", path, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "precious" and (tmp_path / "file").read_text() == "precious"
    # a foreign config.json is not ours; the component folders of our layout are, each recognised by its config
    (precious / "config.json").write_text('{"format": "something else"}')
    assert not weights.replaceable(precious, "movq") and not weights.replaceable(precious, "clip_text")
    for name, component in (("clip_tokenizer", tiny_clip_tokenizer()), ("clip_text", tiny_clip_text_model()),
                            ("mclip", tiny_mclip())):
        folder = save_component(name, component, tmp_path / name)
        assert weights.replaceable(folder, name) and not weights.replaceable(folder)
        save_component(name, component, folder, overwrite=True)
    (tmp_path / "empty").mkdir()
    for ours in (tmp_path / "ours", tmp_path / "empty", atomic_folder(tmp_path / "export", _write_marker("x"))):
        save_converted(tiny, "movq", ours, overwrite=True)
        assert weights.is_converted(ours)
    assert _leftovers(tmp_path) == ["clip_text", "clip_tokenizer", "documents", "empty", "export", "file", "link",
                                    "mclip", "ours"]


def test_convert_files_never_replaces_its_source(original_ckpt, tiny, tmp_path):
    checkpoint, config, _ = original_ckpt
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "movq.ckpt").write_bytes(checkpoint.read_bytes())
    (folder / weights.EXPORT_FILE).write_text("{}")  # a folder overwrite could replace, but it holds the source
    with pytest.raises(ValueError, match="is the source .* or holds it"):
        convert_files("movq", folder / "movq.ckpt", folder, config=config, overwrite=True)
    ours = save_converted(tiny, "movq", tmp_path / "ours")
    with pytest.raises(ValueError, match="is the source"):
        convert_files("movq", ours, ours, layout="diffusers", overwrite=True)
    assert (folder / "movq.ckpt").read_bytes() == checkpoint.read_bytes() and weights.is_converted(ours)


def test_a_folder_created_meanwhile_wins(tmp_path):
    """Without overwrite, a folder another process creates while ours is written is kept, ours discarded."""
    folder = tmp_path / "part"

    def racing(content: str):
        def write(temporary: Path) -> None:
            folder.mkdir()  # the other process, finishing first
            (folder / "theirs.txt").write_text(content)
            (temporary / "ours.txt").write_text("ours")
        return write

    with pytest.raises(FileExistsError, match="another writer.*theirs is kept"):
        atomic_folder(folder, racing("theirs"))
    assert _leftovers(folder) == ["theirs.txt"] and _leftovers(tmp_path) == ["part"]
    # with overwrite, what appeared is replaced only if this package wrote it: not here
    shutil.rmtree(folder)
    with pytest.raises(FileExistsError, match="not a folder this package wrote"):
        atomic_folder(folder, racing("theirs again"), overwrite=True)
    assert (folder / "theirs.txt").read_text() == "theirs again" and _leftovers(tmp_path) == ["part"]


def test_rename_onto_a_folder_that_appeared_is_reported_and_cleaned(tmp_path, monkeypatch):
    """The last gap: a folder appearing between the check and the rename makes the rename fail."""
    folder = tmp_path / "part"
    real_rename = Path.rename

    def rename(self, target):
        if self.name.endswith(".tmp"):
            Path(target).mkdir()
            (Path(target) / "theirs.txt").write_text("theirs")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(FileExistsError, match="another writer"):
        atomic_folder(folder, _write_marker("ours"))
    assert _leftovers(folder) == ["theirs.txt"] and _leftovers(tmp_path) == ["part"]


def test_ctrl_c_during_an_overwrite_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_converted(tiny, "movq", folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and _leftovers(tmp_path) == ["movq"]


def test_disk_full_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # something was written before the failure
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(weights, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_converted(tiny, "movq", tmp_path / "movq")
    assert _leftovers(tmp_path) == []


def test_disk_full_during_an_overwrite_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(weights, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_converted(tiny, "movq", folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _leftovers(tmp_path) == ["movq"]


def test_failed_rename_of_the_new_folder_restores_the_old_one(tmp_path, monkeypatch):
    folder = atomic_folder(tmp_path / "part", _write_marker("old"))
    real_rename = Path.rename

    def rename(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EIO, "simulated rename failure")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        atomic_folder(folder, _write_marker("new"), overwrite=True)
    assert (folder / "marker.txt").read_text() == "old"
    assert _leftovers(tmp_path) == ["part"]


def test_overwrite_replaces_only_once_the_new_folder_is_complete(tmp_path):
    folder = atomic_folder(tmp_path / "part", _write_marker("old"))
    seen = []

    def write(temporary: Path) -> None:
        seen.append((folder / "marker.txt").read_text())  # the old folder is intact while the new one is written
        (temporary / "marker.txt").write_text("new")

    atomic_folder(folder, write, overwrite=True)
    assert seen == ["old"] and (folder / "marker.txt").read_text() == "new"
    assert _leftovers(tmp_path) == ["part"]


def test_a_killed_writers_old_folder_is_restored_or_removed(tmp_path):
    aside = tmp_path / f".part.old-{_dead_pid()}"  # killed after moving the old folder aside
    aside.mkdir()
    _write_marker("old")(aside)
    with pytest.raises(FileExistsError):  # the old folder is back, so this is not a fresh write
        atomic_folder(tmp_path / "part", _write_marker("new"))
    assert (tmp_path / "part" / "marker.txt").read_text() == "old"
    assert _leftovers(tmp_path) == ["part"]

    aside.mkdir()  # killed after renaming the new folder in, before deleting the old one
    atomic_folder(tmp_path / "part", _write_marker("newer"), overwrite=True)
    assert (tmp_path / "part" / "marker.txt").read_text() == "newer"
    assert _leftovers(tmp_path) == ["part"]


def test_live_writers_and_fresh_temporaries_are_left_alone_stale_ones_removed(tmp_path):
    live = tmp_path / f".part.old-{os.getppid()}"
    live.mkdir()
    fresh, stale = tmp_path / ".part.fresh.tmp", tmp_path / ".part.stale.tmp"
    for temporary in (fresh, stale):
        temporary.mkdir()
        (temporary / "model.safetensors").write_bytes(b"half")
    old = time.time() - STALE_SECONDS - 60
    for path in (stale, stale / "model.safetensors"):
        os.utime(path, (old, old))
    atomic_folder(tmp_path / "part", _write_marker("new"))
    assert _leftovers(tmp_path) == [fresh.name, live.name, "part"]


def test_folders_and_files_honour_the_umask(tiny, tmp_path):
    previous = os.umask(0o027)
    try:
        folder = save_converted(tiny, "movq", tmp_path / "movq")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o640}


# --- our converted format ---------------------------------------------------------------------------

def test_round_trip(tiny, tmp_path):
    out = save_converted(tiny, "movq", tmp_path / "movq", source_info={"note": "test"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "kandinsky21" and meta["component"] == "movq" and meta["source"] == {"note": "test"}
    loaded = load_converted(out)
    assert not loaded.training and loaded.config == TINY
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
        assert loaded.state_dict()[key].is_contiguous(), key  # the state dict as it is, no layout of the file's own
    with torch.no_grad():
        assert torch.equal(loaded.encode(_images()), tiny.encode(_images()))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(),
                    reason="posix_fadvise and /proc (Linux)")
def test_load_converted_has_the_kernel_read_the_whole_file_first(tiny, tmp_path, monkeypatch):
    """The weights are memory-mapped: the load has the kernel read the whole file first, piece by piece (one
    WILLNEED reads only the file's start), so that a cold load and first forward do not fault each layer in as they
    run."""
    out = save_converted(tiny, "movq", tmp_path / "movq")
    file = out / "model.safetensors"
    chunk = 4096
    monkeypatch.setattr(weights, "READ_AHEAD_CHUNK", chunk)
    advice = []
    real = os.posix_fadvise

    def record(fd, offset, length, flag):
        advice.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, flag))
        return real(fd, offset, length, flag)

    monkeypatch.setattr(os, "posix_fadvise", record)
    load_converted(out)
    size = file.stat().st_size
    assert size > 4 * chunk
    assert advice == [(str(file.resolve()), offset, chunk, os.POSIX_FADV_WILLNEED) for offset in range(0, size, chunk)]


def _page_cache_fraction(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache (``mincore`` on a private mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size, page = path.stat().st_size, mmap.PAGESIZE
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
    try:
        start = ctypes.c_char.from_buffer(mapped)
        failed = libc.mincore(ctypes.addressof(start), size, pages)
        del start  # the mapping cannot close while ctypes holds a view of it
    finally:
        mapped.close()
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(flag & 1 for flag in pages) / len(pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and the page cache as Linux has them")
def test_the_read_ahead_brings_the_whole_file_into_the_page_cache(tmp_path):
    """On the kernel itself: a file much larger than one WILLNEED reads (the device's read_ahead_kb or
    max_sectors_kb; 8 MiB on the virtio disks seen) ends up wholly in the page cache."""
    path = tmp_path / "model.safetensors"
    with path.open("wb") as f:
        f.write(os.urandom(48 * 2**20))
        f.flush()
        os.fsync(f.fileno())  # only clean pages can be dropped
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _page_cache_fraction(path) > 0.5:
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
    weights._read_ahead(path)
    deadline = time.monotonic() + 30  # the reads it started may still be on their way
    while _page_cache_fraction(path) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _page_cache_fraction(path) == 1


def test_files_hold_the_state_dict_as_it_is_and_load_as_views_of_the_file(tmp_path):
    """Whatever the memory format of the kernels, the file holds the state dict in the module's own shapes
    (kernels (O, I, kh, kw), contiguous, no layout metadata), and loading hands the model those tensors as the
    memory-mapped bytes (no copy). Physical layouts are ops.optimize's business (tested in test_ops.py)."""
    unet = randomize_(UNet(TINY_UNET), 0).eval()
    first = save_converted(unet.to(memory_format=torch.contiguous_format), "unet", tmp_path / "first")
    last = save_converted(unet.to(memory_format=torch.channels_last), "unet", tmp_path / "last")
    unet.to(memory_format=torch.contiguous_format)
    kernels = [k for k, v in unet.state_dict().items() if v.ndim == 4 and v.is_floating_point()]
    key = "down_blocks.0.res.conv1.weight"
    with safe_open(str(first / "model.safetensors"), framework="pt") as a, \
            safe_open(str(last / "model.safetensors"), framework="pt") as b:
        assert a.metadata() == b.metadata() == {"format": "kandinsky21", "component": "unet"}
        assert sorted(a.keys()) == sorted(b.keys()) == sorted(unet.state_dict())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # the same, from either format
        assert all(a.get_tensor(k).shape == v.shape for k, v in unet.state_dict().items())
        assert key in kernels and a.get_tensor(key).shape == (32, 32, 3, 3)  # (O, I, kh, kw)
    loaded = load_converted(first)
    weight = loaded.get_parameter(key)
    assert all(v.is_contiguous() for v in loaded.state_dict().values())
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the parameter's bytes lie inside the memory mapping of the file
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps.read_text().splitlines()
                  if line.endswith(str((first / "model.safetensors").resolve()))]
        assert any(start <= weight.data_ptr() < end for start, end in ranges), ranges
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch = unet_parity.inputs(TINY_UNET)
    with torch.no_grad():  # same weights, same memory format: the same result to the bit
        assert torch.equal(unet_parity.run_ours(loaded, batch), unet_parity.run_ours(unet, batch))


def _write_channels_last_file(module, folder: Path, keys=None) -> None:
    """Rewrite ``folder/model.safetensors`` as the earlier versions of save_converted wrote it: the kernels
    ``keys`` (default: every floating-point 4-D tensor) stored as (O, kh, kw, I), listed under the metadata key
    "channels_last" (None: no such key, as before that layout)."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": "kandinsky21", "component": "movq"}
    if keys is not None:
        keys = [k for k, v in state.items() if v.ndim == 4 and v.is_floating_point()] if keys == "all" else keys
        for key in keys:
            state[key] = state[key].permute(0, 2, 3, 1).contiguous()
        metadata["channels_last"] = json.dumps(keys)
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)


@pytest.mark.parametrize("listed", ["all", "first", None], ids=["channels-last file", "partial list", "no list"])
def test_folders_written_by_earlier_versions_load_to_the_same_weights(tiny, tmp_path, listed):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    kernels = [k for k, v in tiny.state_dict().items() if v.ndim == 4]
    _write_channels_last_file(tiny, folder, kernels[:1] if listed == "first" else listed)
    if listed == "all":
        with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
            out, inp, kh, kw = tiny.state_dict()[kernels[0]].shape
            assert file.get_tensor(kernels[0]).shape == (out, kh, kw, inp)  # as those versions stored it
    loaded = load_converted(folder)
    for key, value in tiny.state_dict().items():
        tensor = loaded.state_dict()[key]
        # the standard strides too (a 1x1 kernel with permuted ones is contiguous, and convolutions take it as
        # channels-last: another kernel, other roundings on some CPUs)
        assert tensor.shape == value.shape and tensor.stride() == value.stride() and torch.equal(tensor, value), key
    with torch.no_grad():  # the same weights in the same layout: the same result to the bit
        assert torch.equal(loaded.encode(_images()), tiny.encode(_images()))
    again = save_converted(loaded, "movq", tmp_path / "again")  # re-saved: the current format
    with safe_open(str(again / "model.safetensors"), framework="pt") as file:
        assert "channels_last" not in file.metadata()
        assert all(file.get_tensor(k).shape == v.shape for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("listed", ['["no.such.key"]', "not json", '["encoder.mid_attention.qkv.weight"]',
                                    '{"encoder.conv_in.weight": 1}', "[1]"])
def test_bad_channels_last_metadata_is_a_clear_error(tiny, tmp_path, listed):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    state = read_state_dict(folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "kandinsky21", "component": "movq", "channels_last": listed})
    with pytest.raises(WeightsFileError, match="channels_last"):
        load_converted(folder)


def test_load_with_dtype(tiny, tmp_path):
    loaded = load_converted(save_converted(tiny, "movq", tmp_path / "movq"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_load_converted_rejects_other_folders(tmp_path):
    with pytest.raises(WeightsFileError, match="not a converted weights folder"):
        load_converted(tmp_path)


# --- every component kind ---------------------------------------------------------------------------

def test_every_component_kind_round_trips(tiny, tmp_path):
    modules = {"movq": tiny, "mclip": tiny_mclip(seed=1), "clip_text": tiny_clip_text_model(seed=2),
               "clip_vision": tiny_clip_vision_model(seed=3)}
    tokenizers = {"clip_tokenizer": tiny_clip_tokenizer(), "mclip_tokenizer": tiny_xlmr_tokenizer()}
    for name, component in {**modules, **tokenizers}.items():
        assert save_component(name, component, tmp_path / name) == tmp_path / name
    for name, module in modules.items():
        loaded = load_component(name, tmp_path / name)
        assert not loaded.training and loaded.state_dict().keys() == module.state_dict().keys()
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items()), name
    for name, tokenizer in tokenizers.items():
        assert load_component(name, tmp_path / name)("the cat").input_ids == tokenizer("the cat").input_ids
    assert _leftovers(tmp_path) == sorted([*modules, *tokenizers])
    assert {p.dtype for p in load_component("mclip", tmp_path / "mclip", dtype=torch.bfloat16).parameters()} == \
        {torch.bfloat16}
    with pytest.raises(FileExistsError):
        save_component("mclip", modules["mclip"], tmp_path / "mclip")
    save_component("mclip", tiny_mclip(seed=4), tmp_path / "mclip", overwrite=True)
    assert torch.equal(load_component("mclip", tmp_path / "mclip").LinearTransformation.weight,
                       tiny_mclip(seed=4).LinearTransformation.weight)
    with pytest.raises(ValueError, match="name: expected one of"):
        save_component("vae", tiny, tmp_path / "vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsFileError, match="no usable tokenizer"):
        load_component("clip_tokenizer", tmp_path / "empty")


def test_mclip_folders_of_both_official_layouts_load(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_components import tiny_diffusers_mclip

    theirs = tiny_diffusers_mclip(seed=1)
    input_ids = torch.randint(0, 75, (2, 77), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        reference = theirs(input_ids=input_ids, attention_mask=attention_mask)[0]
    # diffusers' text_encoder/ folder: config.json with the M-CLIP keys + model.safetensors
    (tmp_path / "config.json").write_text(json.dumps({**tiny_mclip_config(), "architectures": ["MultilingualCLIP"]}))
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        loaded = load_component("mclip", tmp_path)(input_ids, attention_mask)[0]
    torch.testing.assert_close(loaded, reference, atol=1e-6, rtol=0)  # measured 0: same weights and operations
    # the original folder: pytorch_model.bin, which may carry the position_ids buffer
    (tmp_path / "model.safetensors").unlink()
    torch.save({**state, "transformer.embeddings.position_ids": torch.arange(80)[None]}, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        loaded = load_component("mclip", tmp_path)(input_ids, attention_mask)[0]
    torch.testing.assert_close(loaded, reference, atol=1e-6, rtol=0)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(WeightsFileError, match="no model.safetensors or pytorch_model.bin"):
        load_component("mclip", tmp_path)


def test_base_file_round_trip_and_errors(tmp_path):
    assert read_base(tmp_path) is None
    path = write_base(tmp_path / "trained", "kandinsky-community/kandinsky-2-1", revision="v1")
    assert path == tmp_path / "trained" / "base.json"
    assert read_base(tmp_path / "trained") == {"source": "kandinsky-community/kandinsky-2-1", "revision": "v1"}
    assert _leftovers(tmp_path / "trained") == ["base.json"]
    path.write_text('{"revision": "v1"}')
    with pytest.raises(WeightsFileError, match="source"):
        read_base(tmp_path / "trained")
    path.write_text("[1, 2")
    with pytest.raises(WeightsFileError, match="base.json"):
        read_base(tmp_path / "trained")


# --- reading checkpoints ----------------------------------------------------------------------------

def test_read_unwraps_state_dict_and_reads_safetensors(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 3}, tmp_path / "x.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "x.ckpt")["a"], torch.ones(2))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "x.safetensors")["b"], torch.zeros(3))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsFileError, match="evil.ckpt.*pickled objects"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not (tmp_path / "should-never-exist").exists()


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        torch.save({"a": torch.zeros(1000)}, path)
    else:
        save_file({"a": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=f"{name}.*truncated or corrupt"):
        read_state_dict(path)


def test_non_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsFileError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")


# --- converting official files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, original_fixture):
    """An original-layout .ckpt (Lightning-style {"state_dict": ...}) of the tiny fixture MOVQ."""
    tensors, meta = original_fixture("movq")
    folder = tmp_path_factory.mktemp("original")
    torch.save({"state_dict": prefixed(tensors, "state_dict.")}, folder / "movq_tiny.ckpt")
    return folder / "movq_tiny.ckpt", meta["original_config"], tensors


def test_converts_an_original_checkpoint(original_ckpt, tmp_path):
    checkpoint, config, tensors = original_ckpt
    out = convert_files("movq", checkpoint, tmp_path / "converted", config=config)
    model = load_converted(out)
    with torch.no_grad():
        encoded = model.encode(tensors["input.image"])
    assert max_errors(encoded, tensors["output.encode"])[0] < 1e-5  # same bound as tests/test_movq.py
    assert json.loads((out / "config.json").read_text())["source"]["layout"] == "original"


def test_converts_a_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    reference = randomize_(diffusers.VQModel(**to_diffusers_config(TINY)), 0).eval()
    reference.save_pretrained(tmp_path / "movq")  # config.json + diffusion_pytorch_model.safetensors
    out = convert_files("movq", tmp_path / "movq", tmp_path / "converted", dtype="float32")
    model = load_converted(out)
    with torch.no_grad():
        ours, theirs = model.encode(_images()), reference.encode(_images()).latents
    assert max_errors(ours, theirs)[1] < 1e-4  # float32, as tests/test_movq.py


def test_conversion_errors_write_nothing(original_ckpt, tmp_path):
    checkpoint, _, _ = original_ckpt
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_files("movq", checkpoint, tmp_path / "exists")
    # the official (full-size) config does not fit the tiny checkpoint: strict error, nothing written
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_files("movq", checkpoint, tmp_path / "out")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsFileError, match="bad.ckpt"):
        convert_files("movq", tmp_path / "bad.ckpt", tmp_path / "out")
    assert _leftovers(tmp_path) == ["bad.ckpt", "exists"]


def test_convert_files_rejects_wrong_layout(tmp_path):
    (tmp_path / "file.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="component folder"):
        convert_files("movq", tmp_path / "file.ckpt", tmp_path / "out", layout="diffusers")


# --- bad files: one clear WeightsFileError naming the file ----------------------------------------------

def _rewrite_tensor(folder: Path, change) -> None:
    """Rewrite folder/model.safetensors with ``change(tensors)`` applied, keeping its metadata."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_tensors_are_refused(tiny, original_ckpt, tmp_path, dtype):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    _rewrite_tensor(folder, lambda tensors: tensors.update({"codebook.weight": tensors["codebook.weight"].to(dtype)}))
    with pytest.raises(WeightsFileError, match=f"movq/model.safetensors: .*codebook.weight \\({dtype}\\)"):
        load_converted(folder)
    checkpoint, config, tensors = original_ckpt
    state = prefixed(tensors, "state_dict.")
    key = next(k for k in state if k.endswith("quantize.embedding.weight"))
    torch.save({**state, key: state[key].to(dtype)}, tmp_path / "movq.ckpt")
    with pytest.raises(WeightsFileError, match=f"movq.ckpt: .*not floating point"):
        convert_files("movq", tmp_path / "movq.ckpt", tmp_path / "out", config=config)
    mclip = save_component("mclip", tiny_mclip(), tmp_path / "mclip")
    _rewrite_tensor(mclip, lambda tensors: tensors.update(
        {"LinearTransformation.weight": tensors["LinearTransformation.weight"].to(dtype)}))
    with pytest.raises(WeightsFileError, match="mclip/model.safetensors: .*LinearTransformation.weight"):
        load_component("mclip", mclip)
    assert _leftovers(tmp_path) == ["mclip", "movq", "movq.ckpt"]


def test_a_tensor_in_another_dtype_is_read_as_float32(tiny, tmp_path):
    """One tensor cast by hand once loaded as given and failed only in the forward pass."""
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    _rewrite_tensor(folder, lambda tensors: tensors.update({"codebook.weight": tensors["codebook.weight"].half()}))
    loaded = load_converted(folder)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}
    with torch.no_grad():
        error = max_errors(loaded.decode(loaded.encode(_images())), tiny.decode(tiny.encode(_images())))[0]
    assert error < 1e-3  # only the float16 rounding of the codebook (relative 4.9e-4); measured 2.0e-5
    assert {t.dtype for t in load_converted(folder, dtype=torch.bfloat16).state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["clip_text", "mclip"])
def test_text_encoder_pickles_with_code_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    folder = save_component(name, tiny_mclip() if name == "mclip" else tiny_clip_text_model(), tmp_path / name)
    (folder / "model.safetensors").unlink()
    torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsFileError, match=f"refusing to load .*{name}/pytorch_model.bin.*pickled objects"):
        load_component(name, folder)
    assert not (tmp_path / "should-never-exist").exists()


@pytest.mark.parametrize("name", ["clip_text", "clip_vision", "mclip"])
def test_truncated_text_encoder_files_are_a_clear_error(tmp_path, name):
    model = {"mclip": tiny_mclip, "clip_text": tiny_clip_text_model, "clip_vision": tiny_clip_vision_model}[name]()
    folder = save_component(name, model, tmp_path / name)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=f"{name}/model.safetensors \\(truncated or corrupt\\?\\)"):
        load_component(name, folder)


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("component"), "has no \\['component'\\]"),
    (lambda meta: meta.update(component=["movq"]), "\"component\" must be one of"),
    (lambda meta: meta.update(config="tiny"), "\"config\" must be a JSON object"),
    (lambda meta: meta["config"].update(channels="32"), "config.channels must be of the type of 128, got '32'"),
    (lambda meta: meta["config"].update(channels=32.5), "config.channels must be of the type of 128"),
    (lambda meta: meta["config"].update(channel_mult=2), "config.channel_mult must be of the type of \\(1, 2, 2, 4\\)"),
    (lambda meta: meta["config"].update(channel_mult=[1, True]), "config.channel_mult"),
    (lambda meta: meta["config"].update(num_res_blocks=False), "config.num_res_blocks"),
    (lambda meta: meta["config"].update(depth=3), "unknown movq config fields \\['depth'\\]"),
    (lambda meta: meta["config"].update(channels=48), "does not fit .*config.json"),
], ids=["no component", "component list", "config string", "str", "float", "int for tuple", "bool in tuple",
        "bool for int", "unknown field", "config of another model"])
def test_malformed_config_json_is_a_clear_error(tiny, tmp_path, change, message):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsFileError, match=message) as error:
        load_component("movq", folder)
    assert "movq/" in str(error.value) and "\n" not in str(error.value).split("does not fit")[0]


def test_a_folder_holding_another_component_is_refused(tiny, tmp_path):
    movq = save_converted(tiny, "movq", tmp_path / "unet")  # a MoVQ where the UNet belongs
    with pytest.raises(WeightsFileError, match="unet holds a 'movq' component, not the 'unet' expected here"):
        load_component("unet", movq)
    assert isinstance(load_converted(movq), MoVQ)  # without an expectation, whatever it holds
    mclip = save_component("mclip", tiny_mclip(), tmp_path / "mclip")
    with pytest.raises(WeightsFileError, match="does not hold a CLIP text tower: .* weights are missing"):
        load_component("clip_text", mclip)  # transformers would fill a default-size tower with random weights
    clip_text = save_component("clip_text", tiny_clip_text_model(), tmp_path / "clip_text")
    with pytest.raises(WeightsFileError, match="clip_text does not hold an M-CLIP text encoder"):
        load_component("mclip", clip_text)
    with pytest.raises(WeightsFileError, match="does not hold a CLIP vision tower"):
        load_component("clip_vision", clip_text)


# --- Kandinsky 2.2: the ControlNet UNet and the decoder's scheduler config as components --------------------------


def test_the_controlnet_unet_is_a_component_of_its_own(tmp_path):
    """``unet_controlnet`` folders hold a ControlNet UNet (conditioning "image_hint") and nothing else, bit for bit;
    it converts from a diffusers folder as such; it has no original layout."""
    from kandinsky import tiny
    from kandinsky.convert import from_original

    controlnet = randomize_(UNet(tiny.UNET_22_CONTROLNET), 0).eval()
    folder = save_component("unet_controlnet", controlnet, tmp_path / "unet_controlnet")
    loaded = load_component("unet_controlnet", folder)
    assert loaded.config == tiny.UNET_22_CONTROLNET and loaded.state_dict().keys() == controlnet.state_dict().keys()
    assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert json.loads((folder / "config.json").read_text())["component"] == "unet_controlnet"
    with pytest.raises(WeightsFileError, match="holds a 'unet_controlnet' component, not the 'unet' expected"):
        load_component("unet", folder)
    plain = UNet(tiny.UNET_22).eval()  # its weights do not matter: refused by its config
    with pytest.raises(ValueError, match="'unet_controlnet' is Kandinsky 2.2's ControlNet UNet .* 'image'"):
        save_component("unet_controlnet", plain, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    diffusers = pytest.importorskip("diffusers")
    from kandinsky.convert import from_diffusers, to_diffusers

    config, state = to_diffusers("unet", controlnet)
    reference = diffusers.UNet2DConditionModel(**config)
    reference.load_state_dict(state)
    reference.save_pretrained(tmp_path / "diffusers")
    out = convert_files("unet_controlnet", tmp_path / "diffusers", tmp_path / "converted")
    assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in load_converted(out).state_dict().items())
    with pytest.raises(ValueError, match="conditioning 'image'"):
        from_diffusers("unet_controlnet", *to_diffusers("unet", plain))
    with pytest.raises(ValueError, match="'unet_controlnet' has no original layout"):
        from_original("unet_controlnet", {}, {})


def test_the_scheduler_config_is_a_component(tmp_path):
    config = {"_class_name": "DDPMScheduler", "variance_type": "fixed_small", "steps_offset": 1,
              "trained_betas": None}
    folder = save_component("scheduler", config, tmp_path / "scheduler")
    assert _leftovers(folder) == ["scheduler_config.json"] and load_component("scheduler", folder) == config
    with pytest.raises(FileExistsError):
        save_component("scheduler", config, folder)
    save_component("scheduler", {**config, "steps_offset": 0}, folder, overwrite=True)  # ours: replaceable
    assert load_component("scheduler", folder)["steps_offset"] == 0
    with pytest.raises(ValueError, match="expected a diffusers scheduler config"):
        save_component("scheduler", {"steps_offset": 1}, tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsFileError, match="holds no scheduler"):
        load_component("scheduler", tmp_path / "empty")
    (tmp_path / "empty" / "scheduler_config.json").write_text("[1]")
    with pytest.raises(WeightsFileError, match="expected a JSON object"):
        load_component("scheduler", tmp_path / "empty")
