"""Weight-file I/O: safe reading, atomic writing, loading, and the conversion script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kandinsky.weights as weights
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models import config_from_dict
from kandinsky.models.movq import MoVQ
from kandinsky.parity import unet as unet_parity
from kandinsky.testing import max_errors, prefixed, randomize_
from kandinsky.weights import (WeightsFileError, convert_files, convert_main, load_converted, read_state_dict,
                               save_converted)

ROOT = Path(__file__).resolve().parent.parent
TINY = config_from_dict("movq", json.loads((ROOT / "configs" / "movq_tiny.json").read_text()))


@pytest.fixture(scope="module")
def tiny():
    return randomize_(MoVQ(TINY), 0).eval()


def _images():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- save / load -----------------------------------------------------------------------------------

def test_round_trip(tiny, tmp_path):
    out = save_converted(tiny, "movq", tmp_path / "movq", source_info={"note": "test"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "kandinsky21" and meta["component"] == "movq" and meta["source"] == {"note": "test"}
    loaded = load_converted(out)
    assert not loaded.training and loaded.config == TINY
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.encode(_images()), tiny.encode(_images()))


def test_channels_last_kernels_load_as_views_of_the_file(tmp_path):
    """The UNet keeps its kernels channels-last; the file stores them in that order, so loading neither
    copies nor re-lays them out (the memory-mapped bytes are the parameters)."""
    from safetensors import safe_open

    from kandinsky.models.unet import UNet

    config = config_from_dict("unet", json.loads((ROOT / "configs" / "unet_tiny.json").read_text()))
    unet = randomize_(UNet(config), 0).eval()
    folder = save_converted(unet, "unet", tmp_path / "unet")
    key = "down_blocks.0.res.conv1.weight"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        stored = file.get_tensor(key)
        assert key in json.loads(file.metadata()["channels_last"])
    assert stored.shape == (32, 3, 3, 32)  # (O, kh, kw, I): the bytes of the channels-last kernel
    loaded = load_converted(folder)
    weight = loaded.get_parameter(key)
    assert weight.shape == (32, 32, 3, 3) and weight.is_contiguous(memory_format=torch.channels_last)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the parameter's bytes lie inside the memory mapping of the file
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps.read_text().splitlines()
                  if line.endswith(str((folder / "model.safetensors").resolve()))]
        assert any(start <= weight.data_ptr() < end for start, end in ranges), ranges
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch = unet_parity.inputs(config)
    with torch.no_grad():
        assert torch.equal(unet_parity.run_ours(loaded, batch), unet_parity.run_ours(unet, batch))


@pytest.mark.parametrize("listed", ['["no.such.key"]', "not json", '["encoder.mid_attention.qkv.weight"]'])
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


def test_refuses_to_overwrite_without_force(tiny, tmp_path):
    folder = tmp_path / "movq"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(tiny, "movq", folder)
    assert (folder / "keep.txt").read_text() == "precious"
    save_converted(tiny, "movq", folder, force=True)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == ["movq"]


def test_failure_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # something was written before the failure
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(weights, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_converted(tiny, "movq", tmp_path / "movq")
    assert _leftovers(tmp_path) == []


def test_failure_during_forced_replace_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    folder = save_converted(tiny, "movq", tmp_path / "movq")
    before = (folder / "model.safetensors").read_bytes()
    monkeypatch.setattr(weights, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        save_converted(tiny, "movq", folder, force=True)
    assert (folder / "model.safetensors").read_bytes() == before
    assert _leftovers(tmp_path) == ["movq"]


def test_load_converted_rejects_other_folders(tmp_path):
    with pytest.raises(WeightsFileError, match="not a converted weights folder"):
        load_converted(tmp_path)


# --- reading checkpoints ---------------------------------------------------------------------------

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


# --- the conversion script -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, original_fixture):
    """An original-layout .ckpt (Lightning-style {"state_dict": ...}) of the tiny fixture MOVQ."""
    tensors, meta = original_fixture("movq")
    folder = tmp_path_factory.mktemp("original")
    torch.save({"state_dict": prefixed(tensors, "state_dict.")}, folder / "movq_tiny.ckpt")
    (folder / "config.json").write_text(json.dumps(meta["original_config"]))
    return folder, tensors


def test_script_converts_an_original_checkpoint(original_ckpt, tmp_path):
    folder, tensors = original_ckpt
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "movq",
                           str(folder / "movq_tiny.ckpt"), str(out), "--config", str(folder / "config.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = load_converted(out)
    with torch.no_grad():
        encoded = model.encode(tensors["input.image"])
    assert max_errors(encoded, tensors["output.encode"])[0] < 1e-5  # same bound as tests/test_movq.py
    assert json.loads((out / "config.json").read_text())["source"]["layout"] == "original"


def test_script_converts_a_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    reference = randomize_(diffusers.VQModel(**to_diffusers_config(TINY)), 0).eval()
    reference.save_pretrained(tmp_path / "movq")  # config.json + diffusion_pytorch_model.safetensors
    out = tmp_path / "converted"
    assert convert_main(["movq", str(tmp_path / "movq"), str(out), "--dtype", "float32"]) == 0
    model = load_converted(out)
    with torch.no_grad():
        ours, theirs = model.encode(_images()), reference.encode(_images()).latents
    assert max_errors(ours, theirs)[1] < 1e-4  # float32, as tests/test_movq.py


def test_script_errors_exit_2_without_traceback(original_ckpt, tmp_path, capsys):
    folder, _ = original_ckpt
    existing = tmp_path / "exists"
    existing.mkdir()
    assert convert_main(["movq", str(folder / "movq_tiny.ckpt"), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    # the official (full-size) config does not fit the tiny checkpoint: strict error, nothing written
    assert convert_main(["movq", str(folder / "movq_tiny.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_writes_nothing(tmp_path, capsys):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    assert convert_main(["movq", str(tmp_path / "bad.ckpt"), str(tmp_path / "out")]) == 2
    assert "bad.ckpt" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["bad.ckpt"]


def test_convert_files_rejects_wrong_layout(tmp_path):
    (tmp_path / "file.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="component folder"):
        convert_files("movq", tmp_path / "file.ckpt", tmp_path / "out", layout="diffusers")
