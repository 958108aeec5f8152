"""The end-to-end benchmark (kandinsky/benchmark/pipeline.py) exercised at tiny configurations: every
measurement runs, the outputs are written, the two sides share their weights. Timings are never asserted
(this machine is shared); only that they are positive and finite.
"""

from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from kandinsky.benchmark import main, pipeline  # noqa: E402



def _args(dtype: str = "float32", no_memory: bool = True):
    return types.SimpleNamespace(repeats=1, dtype=dtype, no_memory=no_memory, config="tiny")


def _check_timings(results) -> None:
    assert results
    for result in results:
        for value in [*result.ours, *result.diffusers, result.ratio]:
            assert math.isfinite(value) and value > 0, (result.case, value)


def test_float32_run_measures_every_piece():
    results = pipeline.run(_args())
    _check_timings(results)
    cases = [r.case for r in results]
    for expected in ("prior stage", "decoder stage", "text encoding, prior stage", "text encoding, decoder stage",
                     "prior step", "decoder step", "MoVQ decode", "(extrapolated)", "load + first forward: unet",
                     "load + first forward: prior", "load + first forward: movq", "load cost: unet"):
        assert any(expected in case for case in cases), expected
    by_case = {r.case.split(",")[0]: r for r in results}
    # the prior stage shares every tensor with diffusers (fused QKV pointed back into ours)
    assert by_case["prior stage: prompt -> embeddings"].extra["ours separate GiB"] == 0
    # same weights, same float32 arithmetic up to operation order
    assert by_case["decoder step (UNet"].extra["UNet output max rel diff vs diffusers float32"] < 1e-4
    assert by_case["decoder step (UNet"].extra["ours GFLOP/s"] > 0
    # extrapolation = measured stages + the missing steps, so it exceeds the measured 2 + 2 steps
    measured = next(r for r in results if "2 + 2 steps" in r.case)
    extrapolated = next(r for r in results if "(extrapolated)" in r.case)
    assert extrapolated.ours[0] > measured.ours[0] and extrapolated.diffusers[0] > measured.diffusers[0]


def test_bfloat16_run_reports_unet_error():
    results = pipeline.run(_args("bfloat16"))
    _check_timings(results)
    unet = next(r for r in results if r.case.startswith("decoder step"))
    error = unet.extra["UNet output max rel diff vs diffusers float32"]
    # bfloat16 weights and activations against float32: about 2^-8 per operation, well above float32 noise
    assert 1e-4 < error <= pipeline.BF16_UNET_TARGET
    assert not any(r.case.startswith("load") for r in results)  # the weight files are float32 on both sides


def test_main_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CONFIG", "tiny")
    assert main(["pipeline", "--repeats", "1", "--no-memory", "--results", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("pipeline-*.json")
    (markdown_file,) = tmp_path.glob("pipeline-*.md")
    data = json.loads(json_file.read_text())
    assert data["results"] and all(r["component"] == "pipeline" for r in data["results"])
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in data["results"])
    assert "| pipeline | text2img 32px" in markdown_file.read_text()
    if os.path.exists("/proc/cpuinfo"):  # Linux: the CPU that produced the numbers is named
        assert data["machine"]["cpu_model"] and isinstance(data["machine"]["cpu_extensions"], list)


def test_memory_probes_load_from_disk_in_their_own_process(tmp_path):
    from kandinsky.benchmark import peak_rss_gib

    pipeline.write_folders(str(tmp_path), "tiny")
    assert {p.name for p in tmp_path.iterdir()} == {"ours", "diffusers-prior", "diffusers-decoder"}
    for side, offload in (("ours", ""), ("ours", "sequential"), ("diffusers", "")):
        gib = peak_rss_gib("kandinsky.benchmark.pipeline:memory_probe", side, "tiny", "float32", str(tmp_path), offload)
        assert 0 < gib < 8  # a tiny pipeline: the interpreter, torch and diffusers, not a full model


def test_share_weights_points_split_tensors_into_fused_ones():
    torch.manual_seed(0)
    theirs = nn.ModuleDict({"q": nn.Linear(4, 3), "k": nn.Linear(4, 3), "v": nn.Linear(4, 3), "other": nn.Linear(4, 4)})
    ours = nn.ModuleDict({"qkv": nn.Linear(4, 9), "other": nn.Linear(4, 4)})
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([theirs.q.weight, theirs.k.weight, theirs.v.weight]))
        ours.qkv.bias.copy_(torch.cat([theirs.q.bias, theirs.k.bias, theirs.v.bias]))
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    report = pipeline.share_weights_([ours], [theirs])
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, before[key])
    assert theirs.k.weight.untyped_storage().data_ptr() == ours.qkv.weight.untyped_storage().data_ptr()
    assert theirs.v.bias.untyped_storage().data_ptr() == ours.qkv.bias.untyped_storage().data_ptr()
    # `other` differs in value: it stays separate, and the report counts it
    assert report["ours separate GiB"] == pytest.approx(20 * 4 / 2**30)


def test_cast_copy_leaves_the_original_untouched():
    model = nn.Linear(3, 2)
    copy = pipeline._cast_copy(model, torch.bfloat16)
    assert copy.weight.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
    assert torch.equal(copy.weight, model.weight.to(torch.bfloat16))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="config"):
        pipeline.image_size("huge")
    with pytest.raises(ValueError, match="stage"):
        pipeline.build("tiny", stage="both")
    with pytest.raises(ValueError, match="stages"):
        pipeline.diffusers_pipelines("tiny", stages=("prior", "vae"))


def test_gpu_benchmark_runs_on_tiny_components():
    """The GPU benchmark's code on the CPU (tiny components, torch.compile with the eager backend): every
    case is measured, each model's single step matches diffusers, and compiling changes nothing. The GPU
    numbers come from a GPU machine."""
    from kandinsky.benchmark import gpu

    args = types.SimpleNamespace(repeats=1, dtype="float32", config="tiny", device="cpu", budget=None)
    results = gpu.run(args)
    _check_timings(results)
    cases = [r.case for r in results]
    assert [c.split(" ")[0] for c in cases] == ["decoder", "prior", "MoVQ", "text2img", "text2img"]
    for result in results[:3]:
        assert result.extra["output max rel diff"] < 1e-4
    # the whole images are not compared: random weights make the sampling trajectory chaotic (the prior's
    # float32 step differs from ours by ~1e-3, see docs/parity.md)
    assert results[4].extra["ours compiled vs eager image max abs diff"] < 1e-5


def test_float16_is_for_the_gpu_component_only(capsys):
    with pytest.raises(SystemExit):
        main(["movq", "--dtype", "float16"])
    assert "float16 is for the gpu component" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_component_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["gpu"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_profile_splits_the_unet_forward_into_categories_that_add_up(tmp_path, monkeypatch):
    from kandinsky.benchmark import profile

    monkeypatch.setattr(profile, "CONFIG", "tiny")
    results = profile.run(types.SimpleNamespace(repeats=1, dtype="float32", results=str(tmp_path)))
    _check_timings(results)
    peaks = [r for r in results if r.case.startswith("peak:")]
    assert {r.case.split(" ")[1] for r in peaks} == {"torch.mm", "direct"}
    assert all(r.extra["GFLOP/s"] > 0 for r in peaks)
    total = next(r for r in results if r.case.endswith("total (profiled)"))
    rows = [r for r in results if r not in peaks and r is not total]
    assert [r.case.split(": ", 1)[1] for r in rows] == list(profile.ROWS)
    for side in ("ours", "diffusers"):
        # every self time under the forward lands in exactly one category
        assert sum(getattr(r, side)[0] for r in rows) == pytest.approx(getattr(total, side)[0], rel=0.01)
        assert getattr(total, side)[0] <= total.extra[f"{side} wall s"]
    conv = rows[0].extra
    # the tiny UNet's 32x32 level runs oneDNN's direct convolution, its 16x16 level the GEMM path
    assert conv["ours 3x3 conv: direct s"] > 0 and conv["ours 3x3 conv: GEMM path s"] > 0
    assert conv["ours 3x3 conv: Winograd GEMM (bmm) s"] == 0
    attention = next(r for r in rows if r.case.endswith(": attention")).extra
    assert attention["GFLOP"] > 0  # the CPU attention kernel is counted (torch's flop counter has no formula)
    (text_file,) = tmp_path.glob("profile-*.txt")
    text = text_file.read_text()
    assert text.count(f"Top {profile.TOP_OPS} operators") == 2 and "3x3 conv: GEMM path" in text


@pytest.mark.parametrize("fused", [False, True])  # True: as the fused residual blocks call it (no module hooks)
def test_profile_tells_the_winograd_convolution_from_attention(fused):
    from kandinsky.benchmark import profile
    from kandinsky.ops.cpu import Conv3x3
    from kandinsky.ops.generic import swap

    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    swap(conv, Conv3x3)
    x, scale, shift = torch.randn(1, 256, 32, 32), torch.rand(1, 256) + 0.5, torch.randn(1, 256)
    query = torch.randn(1, 4, 64, 16)
    convolve = (lambda: conv.convolve_activated(x, scale, shift)) if fused else (lambda: conv(x))
    result = profile.profile_forward(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, query, query).add_(convolve().mean()), conv)
    categories = result["categories"]
    assert categories["3x3 conv: Winograd GEMM (bmm)"] > 0 and categories["3x3 conv: Winograd transforms"] > 0
    assert categories["3x3 conv: direct"] == categories["3x3 conv: GEMM path"] == 0
    assert categories["attention"] > 0
    assert [op for category, op, _ in result["rows"] if category == "attention" and op == "bmm"] == []
    assert result["flops"]["conv3x3"] == 2 * 256 * 32 * 32 * 256 * 9  # once, whichever way it was called
    assert "convolve_activated" not in vars(conv)  # unwrapped after the profile


def test_unet_benchmark_of_the_22_unets_at_tiny_configs(tmp_path, monkeypatch, capsys):
    """``kandinsky bench unet --model 2.2 [--controlnet]``: ours vs diffusers on one set of weights (the tiny 2.2
    configs here), written under a name that says the model; the options it needs are checked first."""
    from kandinsky.benchmark import unet

    monkeypatch.setattr(unet, "CONFIG", "tiny")
    for extra, name, case in (([], "unet-22-*.json", "Kandinsky 2.2, 2x4x8x8"),
                              (["--controlnet"], "unet-22-controlnet-*.json", "Kandinsky 2.2 ControlNet, 2x4x8x8")):
        assert main(["unet", "--model", "2.2", *extra, "--sizes", "8", "--repeats", "1", "--no-memory",
                     "--results", str(tmp_path)]) == 0
        (json_file,) = tmp_path.glob(name)
        data = json.loads(json_file.read_text())
        assert [r["case"] for r in data["results"]] == [f"{case} float32"]
        json_file.unlink()
    capsys.readouterr()
    for argv, needle in ((["unet", "--controlnet"], "--controlnet: only for the unet component with --model 2.2"),
                         (["movq", "--model", "2.2"], "--model 2.2: expected components among ['prior', 'unet']"),
                         (["prior", "--sizes", "64"], "--sizes: latent sides, multiples of 8, for the unet")):
        with pytest.raises(SystemExit):
            main(argv)
        assert needle in capsys.readouterr().err, argv
    assert unet.unet_config("2.2-controlnet", "full").conditioning == "image_hint"
    from kandinsky.benchmark import prior

    assert prior.prior_config("2.2").clip_dim == 1280 and prior.prior_config("2.1").clip_dim == 768
