"""``kandinsky batch`` (kandinsky/batch.py and its CLI) on tiny weights the test writes to a folder: prompt files,
per-item noise, atomic writes and resumption, torchrun; and ``kandinsky bench batch`` at a tiny configuration.

Images are compared in [0, 1]. Between batch sizes only float rounding of batched arithmetic differs (measured
below); at the same batch size runs are bit-identical whatever the number of processes, given the same thread
count (every process here runs one intra-op thread: the test session by conftest, the children by
OMP_NUM_THREADS=1, torchrun's own default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky import batch
from kandinsky.cli import main
from kandinsky.pipeline import Kandinsky21
from kandinsky.png import png_metadata, save_png

pytest.importorskip("diffusers")
from test_pipeline import SIZE, random_image, save_reference_weights  # noqa: E402

FAST = ["--height", SIZE, "--width", SIZE, "--steps", 2, "--prior-steps", 2, "--no-progress", "--device", "cpu"]
PROMPTS = ["the cat", "a dog", "red fish", "blue sky", "green tree", "the cat at night", "a small house"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_reference_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def pipe(weights):
    return Kandinsky21.from_pretrained(str(weights), progress=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")  # a blank line is skipped
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def uninterrupted(weights, prompts, tmp_path_factory):
    """One process, batch size 2: the reference every other run is compared with. One thread, as in the tests
    (module fixtures run before conftest's per-test thread setting) and in the child processes."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in ("batch", prompts, "-o", out, "--weights", weights, "--batch-size", 2,
                                      *FAST)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def pixels(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            out[path.name] = np.asarray(image)
    return out


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / batch.MANIFEST).read_text().splitlines()]


def leftovers(folder: Path) -> list[str]:
    """Everything but the PNGs and the manifest: partial files, manifest parts."""
    return sorted(p.name for p in folder.iterdir() if not (p.suffix == ".png" and not p.name.startswith("."))
                  and p.name not in (batch.MANIFEST, batch.MARKER, f"{batch.MARKER}.lock"))


# ------------------------------------------------------------------------------------------- prompt files


def test_prompt_files_in_every_format_give_the_same_items(tmp_path):
    rows = [{"prompt": "the cat", "id": "cat", "seed": 11, "steps": 3}, {"prompt": "a dog, at night"},
            {"prompt": "red fish", "negative_prompt": "blurry", "guidance": 5}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "p.csv").write_text('prompt,id,seed,steps,negative_prompt,guidance\nthe cat,cat,11,3,,\n'
                                    '"a dog, at night",,,,,\nred fish,,,,blurry,5\n')
    settings = batch.Settings(steps=2)
    jsonl = batch.read_prompt_file(tmp_path / "p.jsonl", settings, seed=100)
    csv = batch.read_prompt_file(tmp_path / "p.csv", settings, seed=100)
    assert [(i.file, i.prompt, i.seed, i.settings) for i in jsonl] == [(i.file, i.prompt, i.seed, i.settings)
                                                                        for i in csv]
    assert [i.file for i in jsonl] == ["cat.png", "000001.png", "000002.png"]
    assert [i.seed for i in jsonl] == [11, 101, 102]  # own seed, else --seed + index
    assert [i.settings.steps for i in jsonl] == [3, 2, 2]
    assert jsonl[2].settings.negative_prompt == "blurry" and jsonl[2].settings.guidance == 5.0
    assert [i.line for i in csv] == [2, 3, 4]
    # batches: consecutive items with the same settings, at most batch_size; the 3-step item and the one with a
    # negative prompt cannot share a call with the others
    assert [[i.index for i in b] for b in batch.batches(jsonl, 8)] == [[0], [1], [2]]
    txt = tmp_path / "p.txt"
    txt.write_text("a\nb\n\nc\nd\ne\n")
    items = batch.read_prompt_file(txt, settings)
    assert [i.line for i in items] == [1, 2, 4, 5, 6]
    assert [[i.prompt for i in b] for b in batch.batches(items, 2)] == [["a", "b"], ["c", "d"], ["e"]]


BAD_FILES = {
    "missing column": ("p.jsonl", '{"prompt": "a"}\n{"id": "b"}\n', "p.jsonl:2: missing 'prompt'"),
    "bad JSON line": ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', "p.jsonl:3: not valid JSON"),
    "empty file": ("p.txt", "\n \n", "p.txt: no prompts"),
    "unknown column": ("p.csv", "prompt,colour\na,red\n", "p.csv:1: unknown column(s) ['colour']"),
    "bad type": ("p.csv", "prompt,steps\na,2\nb,many\n", "p.csv:3: steps: expected an integer, got 'many'"),
    "bad setting": ("p.jsonl", '{"prompt": "a", "sampler": "magic"}\n', "p.jsonl:1: sampler: expected one of"),
    "repeated id": ("p.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
                    "p.jsonl:2: id 'x' repeats line 1"),
    "path in id": ("p.jsonl", '{"prompt": "a", "id": "../x"}\n', "p.jsonl:1: id: expected a file name"),
    "unreadable image": ("p.jsonl", '{"prompt": "a", "image": "cat.png"}\n{"prompt": "b", "image": "gone.png"}\n',
                         "p.jsonl:2: image: no such file"),
    "not an image": ("p.jsonl", '{"prompt": "a", "image": "p.jsonl"}\n', "p.jsonl:1: image: cannot read image"),
    "image outside": ("p.jsonl", '{"prompt": "a", "image": "../cat.png"}\n',
                      "p.jsonl:1: image: '../cat.png' leaves the prompt file's folder"),
    "absolute image": ("p.jsonl", '{"prompt": "a", "image": "/etc/passwd"}\n',
                       "p.jsonl:1: image: '/etc/passwd' leaves the prompt file's folder"),
    "csv image outside": ("p.csv", "prompt,image\na,cat.png\nb,sub/../../cat.png\n",
                        "p.csv:3: image: 'sub/../../cat.png' leaves"),
    "bounds without abs": ("p.jsonl", '{"prompt": "a", "guidance": -1e30}\n', "p.jsonl:1: guidance: expected a number"),
    "huge bound": ("p.jsonl", '{"prompt": "a", "prior_guidance": 1e30}\n', "p.jsonl:1: prior_guidance: expected"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_prompt_files_fail_before_any_work_naming_the_line(case, tmp_path, capsys):
    name, text, message = BAD_FILES[case]
    random_image(0).save(tmp_path / "cat.png")
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    task = ["--task", "img2img"] if "image" in case else []
    # weights that do not exist: the prompt file must fail first, before any loading or generating
    code, _, stderr = run(capsys, "batch", tmp_path / name, "-o", out, "--weights", tmp_path / "no-weights",
                          *task, *FAST)
    assert code == 1
    assert stderr.startswith("kandinsky: error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_csv_with_a_byte_order_mark_and_outside_paths_when_allowed(tmp_path):
    random_image(0).save(tmp_path / "cat.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.csv").write_bytes("\ufeffprompt,image\na,../cat.png\n".encode("utf-8"))  # as Excel saves it
    settings = batch.Settings(task="img2img", steps=2)
    with pytest.raises(batch.PromptFileError, match="leaves the prompt file's folder"):
        batch.read_prompt_file(tmp_path / "sub" / "p.csv", settings)
    items = batch.read_prompt_file(tmp_path / "sub" / "p.csv", settings, allow_outside=True)
    assert items[0].prompt == "a" and items[0].image.resolve() == (tmp_path / "cat.png").resolve()
    (tmp_path / "sub" / "link.png").symlink_to(tmp_path / "cat.png")  # a link out of the folder leaves it too
    (tmp_path / "sub" / "q.jsonl").write_text('{"prompt": "a", "image": "link.png"}\n')
    with pytest.raises(batch.PromptFileError, match="q.jsonl:1: image: 'link.png' leaves"):
        batch.read_prompt_file(tmp_path / "sub" / "q.jsonl", settings)


def test_a_folder_is_written_by_one_run_at_a_time_and_a_users_manifest_is_kept(tmp_path):
    from filelock import FileLock

    items = batch.read_prompt_file(_prompt_file(tmp_path), batch.Settings(steps=2, height=64, width=64))
    out = tmp_path / "out"
    out.mkdir()
    loads = []
    with FileLock(str(out / f"{batch.MARKER}.lock")):  # another run is writing there
        with pytest.raises(ValueError, match="being written by another kandinsky batch run"):
            batch.run(items, out, lambda: loads.append(1))
    assert loads == [] and not list(out.glob("*.png"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / batch.MANIFEST).write_text("my own notes\n")
    with pytest.raises(ValueError, match="was not written by kandinsky batch"):
        batch.run(items, mine, lambda: loads.append(1))
    assert (mine / batch.MANIFEST).read_text() == "my own notes\n" and loads == []


def _prompt_file(folder: Path) -> Path:
    path = folder / "p.txt"
    path.write_text("a cat\n")
    return path


# ------------------------------------------------------------------------------------------- per-item noise


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "p_sampler", "euler_a"])
def test_an_image_does_not_depend_on_its_batch(pipe, tmp_path, sampler):
    """Batch of 3 against one at a time. ddim draws only the start noise; the others also draw noise at every
    step (and p_sampler thresholds x0 per image here, not by the first image of the batch)."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n")
    settings = batch.Settings(steps=3, prior_steps=3, height=SIZE, width=SIZE, sampler=sampler,
                              negative_prompt="ugly")
    items = batch.read_prompt_file(tmp_path / "p.txt", settings, seed=5)
    together = batch.generate(pipe, items, output_type="np")
    alone = np.concatenate([batch.generate(pipe, [item], output_type="np") for item in items])
    # measured 5.5e-5 (ddim), 8.9e-8 (ddpm), 1.8e-7 (p_sampler), 2.1e-4 (euler_a)
    assert np.abs(together - alone).max() < 2e-3
    assert np.abs(alone[0] - alone[1]).max() > 0.05  # different items, different images
    # one at a time with a single generator: exactly what `kandinsky generate --seed` makes (no negative prompt:
    # the prior draws the negative prompt's rows one by one from a list of generators)
    plain = dict(num_inference_steps=3, prior_num_inference_steps=3, height=SIZE, width=SIZE, sampler=sampler,
                 output_type="np", sampler_options={"threshold": "per_sample"} if sampler == "p_sampler" else None)
    item = batch.read_prompt_file(tmp_path / "p.txt", dataclasses.replace(settings, negative_prompt=None), seed=5)[1]
    expected = pipe.text2img(item.prompt, generator=torch.Generator().manual_seed(6), **plain)
    assert np.array_equal(batch.generate(pipe, [item], output_type="np"), expected)


def test_a_list_of_generators_draws_each_row_from_its_own():
    from kandinsky.schedulers import randn

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (1, 2)]

    rows = randn((4, 3, 5), generators(), "cpu")  # rows 2 and 3 (the prior's negative-prompt rows) cycle
    first, second = generators()
    expected = [randn((1, 3, 5), g, "cpu") for g in (first, second, first, second)]
    assert torch.equal(rows, torch.cat(expected))
    with pytest.raises(ValueError, match="one generator per image"):
        randn((3, 2), generators(), "cpu")
    with pytest.raises(ValueError, match="a list of them"):
        Kandinsky21()._generator([torch.Generator(), 7])


def test_batch_size_changes_pngs_by_at_most_one_level(weights, prompts, uninterrupted, tmp_path, capsys):
    code, stdout, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", weights, "--batch-size", 3,
                               *FAST)
    assert code == 0, stderr
    assert f"{len(PROMPTS)} of {len(PROMPTS)} images" in stdout
    ours, reference = pixels(tmp_path), pixels(uninterrupted)
    assert sorted(ours) == sorted(reference) == [f"{i:06d}.png" for i in range(len(PROMPTS))]
    # float differences of ~1e-4 can move a pixel across a rounding boundary of the 8-bit PNG
    assert max(np.abs(ours[n].astype(int) - reference[n].astype(int)).max() for n in ours) <= 1  # measured 1


def test_two_processes_under_torchrun_write_identical_pngs(weights, prompts, uninterrupted, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "kandinsky", "batch", prompts, "-o", tmp_path, "--weights", weights, "--batch-size", 2, *FAST]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, reference = pixels(tmp_path), pixels(uninterrupted)
    assert sorted(ours) == sorted(reference)
    assert all(np.array_equal(ours[name], reference[name]) for name in ours)
    records = manifest(tmp_path)
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    assert {r["rank"] for r in records} == {0, 1}  # batch k on rank k % 2
    assert [r["seed"] for r in records] == [r["seed"] for r in manifest(uninterrupted)]
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- files


def test_png_metadata_is_what_generate_writes(uninterrupted):
    record = manifest(uninterrupted)[3]
    with Image.open(uninterrupted / record["file"]) as image:
        text = dict(image.text)
    assert text["prompt"] == PROMPTS[3] and text["seed"] == "3" and text["image_index"] == "3"
    assert text["Software"].startswith("kandinsky21 ")
    settings = json.loads(text["settings"])
    assert settings == record["settings"]
    assert settings["num_inference_steps"] == 2 and settings["sampler"] == "ddim" and settings["task"] == "text2img"
    assert settings["batch"]["command"] == "batch" and settings["batch"]["index"] == 3
    assert record["prompt"] == PROMPTS[3] and record["line"] == 5 and record["seconds"] > 0  # line 4 is blank


def test_killed_run_resumes_to_the_uninterrupted_result(weights, prompts, uninterrupted, tmp_path, capsys):
    command = [sys.executable, "-m", "kandinsky", "batch", prompts, "-o", tmp_path, "--weights", weights,
               "--batch-size", 2, *FAST]
    child = subprocess.Popen([str(c) for c in command], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("*.png")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    first = pixels(tmp_path)
    assert 0 < len(first) < len(PROMPTS), "the run was not stopped midway"
    code, stdout, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", weights, "--batch-size", 2,
                               *FAST)
    assert code == 0, stderr
    resumed, reference = pixels(tmp_path), pixels(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    assert all(np.array_equal(resumed[name], reference[name]) for name in resumed)
    assert all(np.array_equal(first[name], resumed[name]) for name in first)  # finished images were kept
    assert [r["index"] for r in manifest(tmp_path)] == list(range(len(PROMPTS)))  # complete, no duplicates
    assert leftovers(tmp_path) == []  # no partial PNG, no manifest parts


def test_rerun_skips_finished_images_and_refuses_other_settings(weights, prompts, uninterrupted, tmp_path, capsys):
    for path in uninterrupted.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    # nothing to do: no weights are loaded (they do not exist here)
    code, stdout, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", tmp_path / "gone",
                               "--batch-size", 2, *FAST)
    assert code == 0, stderr
    assert f"0 made by this process, {len(PROMPTS)} already there" in stdout
    code, _, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", weights, *FAST, "--steps", 3)
    assert code == 1 and "000000.png was made from another item or settings (steps: 2 there, 3 now)" in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", weights, *FAST, "--seed", 5)
    assert code == 1 and "000000.png was made from another item or settings (seed: '0' there, '5' now)" in stderr
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")} == before
    (tmp_path / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")  # does not read back: made again
    code, stdout, stderr = run(capsys, "batch", prompts, "-o", tmp_path, "--weights", weights, "--batch-size", 2,
                               *FAST)
    assert code == 0 and "1 made by this process" in stdout, stderr
    assert np.array_equal(pixels(tmp_path)["000004.png"], pixels(uninterrupted)["000004.png"])


def test_save_png_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    image = random_image(0)

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(image, tmp_path / "x.png", png_metadata("p", 0, 0, {}))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- image tasks


def test_img2img_and_inpaint_items_match_the_pipeline(pipe, weights, tmp_path, capsys):
    random_image(1, 40).save(tmp_path / "a.png")
    random_image(2, 40).save(tmp_path / "b.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    rows = [{"prompt": "the cat", "image": "a.png", "mask": "m.png", "seed": 3},
            {"prompt": "a dog", "image": str(tmp_path / "b.png"), "mask": "m.png", "id": "dog"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "batch", tmp_path / "p.jsonl", "-o", out, "--task", "inpaint", "--weights", weights,
                          "--batch-size", 1, *FAST)
    assert code == 0, stderr
    assert [r["file"] for r in manifest(out)] == ["000000.png", "dog.png"]
    with Image.open(tmp_path / "a.png") as image, Image.open(tmp_path / "m.png") as mask_image:
        expected = pipe.inpaint("the cat", image.convert("RGB"), mask_image.convert("L"), num_inference_steps=2,
                                prior_num_inference_steps=2, height=SIZE, width=SIZE,
                                generator=torch.Generator().manual_seed(3))[0]
    assert np.array_equal(pixels(out)["000000.png"], np.asarray(expected))
    (tmp_path / "q.jsonl").write_text('{"prompt": "a frog", "image": "a.png", "strength": 0.5}\n')
    code, _, stderr = run(capsys, "batch", tmp_path / "q.jsonl", "-o", tmp_path / "out2", "--task", "img2img",
                          "--weights", weights, *FAST)
    assert code == 0, stderr
    with Image.open(tmp_path / "a.png") as image:
        expected = pipe.img2img("a frog", image.convert("RGB"), strength=0.5, num_inference_steps=2,
                                prior_num_inference_steps=2, height=SIZE, width=SIZE,
                                generator=torch.Generator().manual_seed(0))[0]
    assert np.array_equal(pixels(tmp_path / "out2")["000000.png"], np.asarray(expected))


# ------------------------------------------------------------------------------------------- benchmark


def test_bench_batch_runs_both_sides_at_a_tiny_config(monkeypatch):
    from kandinsky.benchmark import batch as bench

    monkeypatch.setattr(bench, "PROMPTS", bench.PROMPTS[:2])
    monkeypatch.setattr(bench, "STEPS", (2, 1))  # diffusers' UnCLIPScheduler cannot take one step
    monkeypatch.setattr(bench, "BATCH_SIZE", 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = bench.run(types.SimpleNamespace(repeats=1, dtype="float32", config="tiny"))
    assert [r.case.split(" (")[0] for r in results] == ["generation s", "process wall s, loading included"]
    for result in results:  # timings are never asserted (a shared machine): only that they are measured
        assert all(math.isfinite(v) and v > 0 for v in [*result.ours, *result.diffusers, result.ratio])
    assert "2 prompts, 32px, 2 + 1 steps" in results[0].case
    assert results[0].extra["throughput ours / diffusers"] == pytest.approx(1 / results[0].ratio)


def test_the_manifest_follows_an_edited_prompt_file(weights, tmp_path, capsys):
    """Rows moved, one removed, one added: the rerun makes only the new image, and the manifest has exactly one
    record per row of the edited file, in its order, with its index and line; the removed row's record goes."""
    rows = [{"prompt": "the cat", "id": "cat", "seed": 1}, {"prompt": "a dog", "id": "dog", "seed": 2},
            {"prompt": "red fish", "id": "fish", "seed": 3}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run(capsys, "batch", prompts, "-o", out, "--weights", weights, *FAST)[0] == 0
    edited = [rows[2], {"prompt": "blue sky", "id": "sky", "seed": 4}, rows[0]]  # fish first, dog removed
    prompts.write_text("\n" + "".join(json.dumps(r) + "\n" for r in edited))  # a blank first line: lines move too
    code, stdout, stderr = run(capsys, "batch", prompts, "-o", out, "--weights", weights, *FAST)
    assert code == 0 and "1 made by this process, 2 already there" in stdout, stderr
    records = manifest(out)
    assert [(r["file"], r["index"], r["line"], r["prompt"]) for r in records] == [
        ("fish.png", 0, 2, "red fish"), ("sky.png", 1, 3, "blue sky"), ("cat.png", 2, 4, "the cat")]


# ------------------------------------------------------------------------------------------- Kandinsky 2.2

TINY_22 = ["--weights", "tiny", "--model", "2.2", *FAST]


def test_22_tasks_and_controlnet_rows_match_the_pipeline(tmp_path, capsys):
    """--model 2.2 on the tiny 2.2 pipeline: ControlNet rows name a hint (hints of two sizes: two batches), an
    item is the API's image for its seed, the PNGs record model 2.2; controlnet_img2img and 2.2's img2img
    (guidance 4 by default, 2.1's 7)."""
    from kandinsky.pipeline import Kandinsky22

    random_image(1, 40).save(tmp_path / "h1.png")
    random_image(2, 48).save(tmp_path / "h2.png")
    random_image(3, 40).save(tmp_path / "a.png")
    rows = [{"prompt": "a robot", "hint": "h1.png", "seed": 3}, {"prompt": "a cat", "hint": "h2.png"},
            {"prompt": "a dog", "hint": "h1.png", "image": "a.png"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "ci.jsonl").write_text(json.dumps(rows[2]) + "\n")
    (tmp_path / "i.csv").write_text("prompt,image,seed\na frog,a.png,4\n")
    out = {name: tmp_path / name for name in ("controlnet", "controlnet_img2img", "img2img")}
    for task, prompts in (("controlnet", "c.jsonl"), ("controlnet_img2img", "ci.jsonl"), ("img2img", "i.csv")):
        code, _, stderr = run(capsys, "batch", tmp_path / prompts, "-o", out[task], "--task", task, "--batch-size", 4,
                              *TINY_22)
        assert code == 0, stderr
    records = manifest(out["controlnet"])
    assert [r["batch_size"] for r in records] == [1, 1]  # hints of two sizes cannot share a call
    pipe = Kandinsky22.from_config("tiny", seed=0, progress=False)
    size = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    with Image.open(tmp_path / "h1.png") as hint, Image.open(tmp_path / "a.png") as image:
        hint, image = hint.convert("RGB"), image.convert("RGB")
        expected = {"controlnet": pipe.controlnet("a robot", hint, generator=torch.Generator().manual_seed(3), **size),
                    "controlnet_img2img": pipe.controlnet_img2img("a dog", image, hint,
                                                                  generator=torch.Generator().manual_seed(0), **size),
                    "img2img": pipe.img2img("a frog", image, generator=torch.Generator().manual_seed(4), **size)}
    for task, folder in out.items():
        assert np.array_equal(pixels(folder)["000000.png"], np.asarray(expected[task][0])), task
        settings = manifest(folder)[0]["settings"]
        assert settings["task"] == task and settings["weights"] == {"source": "tiny:0", "model": "2.2"}, task
        assert settings["guidance_scale"] == 4.0, task
    assert manifest(out["controlnet"])[0]["settings"]["batch"]["hint"] == str(tmp_path / "h1.png")
    # a rerun with the other model is refused, nothing loaded
    code, _, stderr = run(capsys, "batch", tmp_path / "i.csv", "-o", out["img2img"], "--task", "img2img",
                          "--weights", "tiny", *FAST)
    assert code == 1 and "000000.png was made from another item or settings (model: '2.2' there, '2.1' now)" in stderr


ERRORS_22 = [
    (["--task", "controlnet", "--weights", "tiny"], [{"prompt": "a", "hint": "h.png"}],
     "--task controlnet: needs Kandinsky 2.2 weights; tiny are 2.1"),
    (["--task", "controlnet", *TINY_22], [{"prompt": "a", "image": "h.png"}],
     "p.jsonl:1: image: only used with --task img2img, inpaint or controlnet_img2img (this run: controlnet)"),
    (["--task", "controlnet_img2img", *TINY_22], [{"prompt": "a", "image": "h.png"}],
     "p.jsonl:1: missing 'hint' (--task controlnet_img2img needs image and hint)"),
    (TINY_22, [{"prompt": "a", "hint": "h.png"}],
     "p.jsonl:1: hint: only used with --task controlnet or controlnet_img2img (this run: text2img)"),
    (["--task", "controlnet", *TINY_22], [{"prompt": "a", "hint": "gone.png"}], "p.jsonl:1: hint: no such file"),
]


def test_22_argument_and_row_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import kandinsky.cli as cli

    monkeypatch.setattr(cli, "_pipeline", lambda args: pytest.fail("a model was loaded"))
    random_image(1, 8).save(tmp_path / "h.png")
    for argv, rows, needle in ERRORS_22:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        code, stdout, stderr = run(capsys, "batch", tmp_path / "p.jsonl", "-o", tmp_path / "out", *argv)
        assert needle in stderr and len(stderr.strip().splitlines()) == 1 and not stdout, (needle, stderr)
        assert code == (2 if needle.startswith("--task") else 1), needle

    # the settings behind the command: 2.2's img2img guides at 4 by default, the ControlNet tasks need 2.2
    assert batch.Settings(task="img2img").guidance == 7.0 and batch.Settings(task="img2img", model="2.2").guidance == 4
    assert batch.Settings(task="controlnet_img2img", model="2.2").task_settings().strength == 0.3
    with pytest.raises(ValueError, match=r"task: controlnet needs Kandinsky 2.2 \(model '2.2'\), got model '2.1'"):
        batch.Settings(task="controlnet").check()
    with pytest.raises(ValueError, match=r"model: expected one of \['2.1', '2.2'\], got '3'"):
        batch.Settings(model="3").check()
