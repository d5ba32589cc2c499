"""The benchmark protocol runners behind `fusedit eval --bench geneval|dpg` (fusedit.eval.run): inputs are
checked before any image is generated, and scores.json is written atomically."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from PIL import Image

import fusedit.eval.dpg as dpg_mod
import fusedit.eval.geneval as geneval_mod
import fusedit.eval.run as run_mod
from fusedit.checkpoints import weights_fingerprint
from fusedit.config import ConfigError
from fusedit.eval.benchmarks import BenchmarkError, load_dpg
from fusedit.eval.geneval import Detection
from fusedit.eval.run import run_dpg, run_geneval
from test_dpg import save_tiny_vilt, shared_data
from test_geneval import save_tiny_detr

COW = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
RED_CAR = {
    "tag": "colors",
    "include": [{"class": "car", "count": 1, "color": "red"}],
    "prompt": "a photo of a red car",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate(calls):
    def run(prompt, seed, n):
        calls.append(prompt)
        return [Image.new("RGB", (8, 8), (200, 20, 20)) for _ in range(n)]

    return run


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random scoring models: the protocols read their configs before generating."""
    root = tmp_path_factory.mktemp("scorers")
    return {"detector": str(save_tiny_detr(root / "detr")), "vqa": str(save_tiny_vilt(root / "vilt"))}


def spy_atomic(monkeypatch) -> list[str]:
    written = []

    def write(path, text):
        written.append(path.name)
        path.write_text(text)

    monkeypatch.setattr(run_mod, "write_text_atomic", write)
    return written


@pytest.mark.parametrize(
    ("prompts", "detector", "clip", "message"),
    [
        (
            [COW, RED_CAR],
            "det",
            None,
            r"--detector needs --clip ID: 1 of the 2 GenEval prompts ask for colours",
        ),
        ([COW], None, "clip", "--clip clip scores GenEval colours only together with --detector ID"),
    ],
)
def test_geneval_scoring_models_are_checked_before_generating(tmp_path, prompts, detector, clip, message):
    calls = []
    path = write_jsonl(tmp_path / "meta.jsonl", prompts)
    with pytest.raises(ConfigError, match=message):
        run_geneval(generate(calls), path, tmp_path / "out", detector=detector, clip=clip, progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_geneval_without_colour_prompts_scores_with_a_detector_alone(tmp_path, monkeypatch, scorers):
    monkeypatch.setattr(
        geneval_mod,
        "TransformersDetector",
        lambda model_id, device: lambda image: [Detection("cow", 0.9, (0, 0, 4, 4))],
    )
    written = spy_atomic(monkeypatch)
    path = write_jsonl(tmp_path / "meta.jsonl", [COW])
    r = run_geneval(
        generate([]), path, tmp_path / "out", detector=scorers["detector"], clip=None, progress=False
    )
    assert r["scores"]["overall"] == 1.0 and r["generated"] == 1
    assert written == ["scores.json"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["per_task"] == {"single_object": 1.0}


def test_dpg_question_file_is_found_before_generating(tmp_path):
    prompts = tmp_path / "dpg" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "0.txt").write_text("A red ball.")
    calls = []
    with pytest.raises(
        FileNotFoundError,
        match=r"^no dpg_bench.csv in .* or copy ELLA's dpg_bench/dpg_bench.csv into '.*prompts'$",
    ):
        run_dpg(generate(calls), prompts, tmp_path / "out", vqa="vqa", progress=False)
    assert calls == [] and not (tmp_path / "out").exists()
    # Without --vqa the grids are only written, and no question file is needed.
    assert run_dpg(generate(calls), prompts, tmp_path / "out", vqa=None, progress=False)["generated"] == 1


QUESTIONS = (
    "item_id,proposition_id,dependency,tuple,question_natural_language\n"
    "0,1,0,entity - whole (ball),Is there a ball?\n"
    "1,1,0,entity - whole (cube),Is there a cube?\n"
)


def test_dpg_prompt_files_without_questions_are_found_before_generating(tmp_path, caplog, scorers):
    """Only grids named after an item id of the question file are scored: another benchmark's folder of
    *.txt files was generated in full and scored on nothing. Refused when none matches, warned when some
    do not, before anything is generated."""
    (tmp_path / "dpg_bench.csv").write_text(QUESTIONS)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "object_names.txt").write_text("cow")
    (prompts / "colors.txt").write_text("red")
    calls = []
    with pytest.raises(
        ConfigError,
        match=r"^none of the 2 prompt files \(colors.txt, object_names.txt\) is named after an item id of "
        r".*dpg_bench.csv \(e.g. 0.txt\); expected DPG-Bench's prompts folder$",
    ):
        run_dpg(generate(calls), prompts, tmp_path / "out", vqa=scorers["vqa"], progress=False)
    assert calls == [] and not (tmp_path / "out").exists()

    (prompts / "colors.txt").unlink()
    (prompts / "0.txt").write_text("A red ball.")
    with pytest.raises(RuntimeError, match="stop at the first generation"):
        run_dpg(lambda *a: _stop(), prompts, tmp_path / "out", vqa=scorers["vqa"], progress=False)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"1 of the 2 prompt files have no questions in {tmp_path / 'dpg_bench.csv'}, so their grids are made "
        "but not scored: object_names.txt"
    ]


def _stop():
    raise RuntimeError("stop at the first generation")


def test_dpg_scores_are_written_atomically(tmp_path, monkeypatch, scorers):
    prompts = tmp_path / "dpg" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "0.txt").write_text("A red ball.")
    (tmp_path / "dpg" / "dpg_bench.csv").write_text(
        "item_id,proposition_id,dependency,tuple,question_natural_language\n"
        "0,1,0,entity - whole (ball),Is there a ball?\n"
    )

    class YesVQA:
        def __init__(self, model_id, device):
            pass

        def __call__(self, image, question):
            return "yes"

    monkeypatch.setattr(dpg_mod, "TransformersVQA", YesVQA)
    written = spy_atomic(monkeypatch)
    r = run_dpg(generate([]), prompts, tmp_path / "out", vqa=scorers["vqa"], progress=False)
    assert r["scores"]["overall"] == 1.0 and written == ["scores.json"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["per_category"] == {"entity": 1.0}


def test_a_rerun_reuses_images_only_of_the_same_generation(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [COW])
    out = tmp_path / "out"
    record = {"checkpoint": "step_00000100", "ema": True, "steps": 25, "image_size": (16, 16)}
    calls = []
    run_geneval(generate(calls), path, out, detector=None, clip=None, progress=False, record=record)
    assert calls == [COW["prompt"]]
    saved = json.loads((out / run_mod.RECORD).read_text())
    assert saved == {
        **record,
        "image_size": [16, 16],
        "bench": "geneval",
        "seed": 42,
        "noise": "seed+k per image",
        "n_per_prompt": 4,
    }
    r = run_geneval(generate(calls), path, out, detector=None, clip=None, progress=False, record=record)
    assert (r["generated"], r["skipped"], len(calls)) == (0, 1, 1)
    later = {**record, "checkpoint": "step_00000200"}
    with pytest.raises(ConfigError, match="holds images made with checkpoint='step_00000100', not "):
        run_geneval(generate(calls), path, out, detector=None, clip=None, progress=False, record=later)
    with pytest.raises(ConfigError, match="seed=42, not seed=7"):
        run_geneval(
            generate(calls), path, out, detector=None, clip=None, seed=7, progress=False, record=record
        )
    # A folder of the earlier noise draw (one stream for a prompt's images; its record has no "noise").
    (out / run_mod.RECORD).write_text(json.dumps({k: v for k, v in saved.items() if k != "noise"}))
    with pytest.raises(ConfigError, match="made with noise=None, not noise='seed\\+k per image'"):
        run_geneval(generate(calls), path, out, detector=None, clip=None, progress=False, record=record)
    (out / run_mod.RECORD).write_text("{")  # damaged: named, not the parser's bare position
    with pytest.raises(ValueError, match=r"generation.json' is not readable JSON \(.*; give a new --out"):
        run_geneval(generate(calls), path, out, detector=None, clip=None, progress=False, record=record)
    assert len(calls) == 1


def test_images_without_a_record_are_not_reused(tmp_path):
    prompts = tmp_path / "dpg"
    prompts.mkdir()
    (prompts / "7.txt").write_text("a cow")
    out = tmp_path / "out"
    calls = []
    run_dpg(generate(calls), prompts, out, vqa=None, progress=False)  # a caller's generator: no record
    assert not (out / run_mod.RECORD).exists()
    with pytest.raises(ConfigError, match="grids holds images without a record of what made them"):
        run_dpg(generate(calls), prompts, out, vqa=None, progress=False, record={"steps": 25})
    assert len(calls) == 1


def test_a_record_without_images_is_replaced(tmp_path):
    """A run that stopped before its first image (out of memory at a large --size) locks nothing."""
    path = write_jsonl(tmp_path / "p.jsonl", [COW])
    out = tmp_path / "out"

    def fail(prompt, seed, n):
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        run_geneval(fail, path, out, detector=None, clip=None, progress=False, record={"image_size": 1024})
    calls = []
    run_geneval(
        generate(calls), path, out, detector=None, clip=None, progress=False, record={"image_size": 512}
    )
    assert calls == [COW["prompt"]] and json.loads((out / run_mod.RECORD).read_text())["image_size"] == 512


def save_weights(folder, tensors: dict, form: str = "safetensors") -> None:
    """``tensors`` as a checkpoint's denoiser file, or as its Distributed Checkpoint (section "model")."""
    if form == "safetensors":
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file(tensors, folder / "denoiser.safetensors")
        return
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group: meant here
        dcp.save({"model": tensors}, checkpoint_id=folder / "dcp", no_dist=True)


def first_difference(a, b) -> int:
    x, y = a.read_bytes(), b.read_bytes()
    return next(i for i in range(min(len(x), len(y))) if x[i] != y[i])


@pytest.mark.parametrize("form", ["safetensors", "dcp"])
def test_the_weights_fingerprint_follows_a_retrained_tensor_past_the_first_mib(tmp_path, form):
    """Only the last blocks retrained (top LLM layers, late DiT blocks, refiners): their bytes lie past the
    first MiB of the file, which is all the fingerprint read, so a retrain kept the name and fingerprint
    of the model before it and its stale images were scored as the new model's."""
    torch.manual_seed(0)
    weights = {
        "blocks.0.weight": torch.randn(1024, 512),
        "blocks.9.weight": torch.randn(64, 64),
    }  # 2 MiB first
    save_weights(tmp_path / "a", weights, form)
    save_weights(tmp_path / "same", {k: v.clone() for k, v in weights.items()}, form)
    retrained = {**weights, "blocks.9.weight": weights["blocks.9.weight"] + 0.01}
    save_weights(tmp_path / "retrained", retrained, form)
    file = "denoiser.safetensors" if form == "safetensors" else "dcp/__0_0.distcp"
    assert first_difference(tmp_path / "a" / file, tmp_path / "retrained" / file) > 1 << 20

    fingerprint = weights_fingerprint
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "same")
    assert fingerprint(tmp_path / "retrained") != fingerprint(tmp_path / "a")


def test_the_weights_fingerprint_follows_the_weights_not_the_path(tmp_path):
    weights = {"proj.weight": torch.arange(12.0).reshape(3, 4)}
    save_weights(tmp_path / "a" / "transformer", weights)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "transformer")
    save_weights(tmp_path / "copy" / "transformer", {"proj.weight": weights["proj.weight"] + 1})
    assert weights_fingerprint(tmp_path / "a") != weights_fingerprint(tmp_path / "copy")
    # A damaged weight file is named in one line, as when the model loads.
    (tmp_path / "copy" / "transformer" / "denoiser.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(
        ValueError, match=r"denoiser.safetensors' is not a readable safetensors file \(header"
    ):
        weights_fingerprint(tmp_path / "copy")


def single_objects(*names) -> list[dict]:
    return [
        {"tag": "single_object", "include": [{"class": n, "count": 1}], "prompt": f"a photo of a {n}"}
        for n in names
    ]


FIVE = single_objects("cow", "dog", "cat", "horse", "sheep")


def sees_a_cow(monkeypatch) -> None:
    monkeypatch.setattr(
        geneval_mod,
        "TransformersDetector",
        lambda model_id, device: lambda image: [Detection("cow", 0.9, (0, 0, 4, 4))],
    )


def test_geneval_scores_only_the_prompts_given(tmp_path, monkeypatch, scorers):
    """The out folder holds the images of 5 prompts (an earlier run of a longer list); scoring the first 2
    scores those 2, not every prompt folder there."""
    sees_a_cow(monkeypatch)
    out = tmp_path / "out"
    run_geneval(
        generate([]), write_jsonl(tmp_path / "5.jsonl", FIVE), out, detector=None, clip=None, progress=False
    )
    calls = []
    two = write_jsonl(tmp_path / "2.jsonl", FIVE[:2])
    r = run_geneval(generate(calls), two, out, detector=scorers["detector"], clip=None, progress=False)
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["num_prompts"], scores["num_images"], scores["overall"]) == (2, 8, 0.5)  # the cow's 4
    assert (r["generated"], r["skipped"], r["unit"], calls) == (0, 2, "prompts", [])


def test_geneval_limit_takes_the_first_prompts_and_scores_those(tmp_path, monkeypatch, scorers):
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "5.jsonl", FIVE), tmp_path / "out"
    calls = []
    r = run_geneval(
        generate(calls), path, out, detector=scorers["detector"], clip=None, limit=2, progress=False
    )
    assert calls == ["a photo of a cow", "a photo of a dog"] and (r["generated"], r["unit"]) == (2, "prompts")
    scores = json.loads((out / "scores-first2.json").read_text())
    assert (scores["num_prompts"], scores["limit"], scores["overall"]) == (2, 2, 0.5)
    assert r["scores_file"] == str(out / "scores-first2.json") and not (out / "scores.json").exists()
    # The rest later, into the same folder: the first prompts' images are kept, all five scored.
    r = run_geneval(generate(calls), path, out, detector=scorers["detector"], clip=None, progress=False)
    assert (r["generated"], r["skipped"], len(calls)) == (3, 2, 5)
    assert (r["scores"]["num_prompts"], r["scores"]["limit"]) == (5, None)
    # A quick subset again does not replace the whole benchmark's scores.
    run_geneval(generate(calls), path, out, detector=scorers["detector"], clip=None, limit=1, progress=False)
    assert json.loads((out / "scores.json").read_text())["num_prompts"] == 5
    assert json.loads((out / "scores-first1.json").read_text())["num_prompts"] == 1
    for limit in (0, 2.0):
        with pytest.raises(
            ConfigError, match=rf"^limit={limit!r} is not allowed \(allowed: an integer >= 1, or None"
        ):
            run_geneval(
                generate(calls), path, tmp_path / "new", detector=None, clip=None, limit=limit, progress=False
            )
    assert len(calls) == 5 and not (tmp_path / "new").exists()


def dpg_folder(root, names, questions=None):
    """DPG-Bench prompt files ``names`` under ``root/prompts`` and a question file for the items
    ``questions`` (default: the same names; empty: no question file)."""
    prompts = root / "prompts"
    prompts.mkdir(parents=True)
    for n in names:
        (prompts / f"{n}.txt").write_text(f"prompt {n}")
    items = names if questions is None else questions
    if items:
        rows = "".join(f"{n},1,0,entity - whole (ball),Is there a ball?\n" for n in items)
        (root / "dpg_bench.csv").write_text(QUESTIONS.splitlines(keepends=True)[0] + rows)
    return prompts


def test_dpg_scores_only_the_prompts_given_and_limit_takes_the_first(tmp_path, monkeypatch, scorers):
    monkeypatch.setattr(dpg_mod, "TransformersVQA", lambda model_id, device: lambda image, q: "yes")
    five, out = dpg_folder(tmp_path / "five", range(5)), tmp_path / "out"
    run_dpg(generate([]), five, out, vqa=None, progress=False)
    calls = []
    two = dpg_folder(tmp_path / "two", range(2), questions=range(5))  # DPG-Bench's whole question file
    r = run_dpg(generate(calls), two, out, vqa=scorers["vqa"], progress=False)
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["num_prompts"], scores["missing"]) == (2, ["2", "3", "4"])
    assert (r["generated"], r["skipped"], r["unit"], calls, scores["limit"]) == (0, 2, "prompts", [], None)

    r = run_dpg(generate(calls), five, tmp_path / "new", vqa=scorers["vqa"], limit=3, progress=False)
    assert calls == ["prompt 0", "prompt 1", "prompt 2"] and r["generated"] == 3
    assert (r["scores"]["num_prompts"], r["scores"]["missing"], r["scores"]["limit"]) == (3, ["3", "4"], 3)


def test_dpg_without_questions_refuses_prompt_files_that_are_not_dpg_benchs(tmp_path):
    """Without a question file naming them, any folder of *.txt files was taken for DPG-Bench's prompts:
    GenEval's object-name lists (80 lines each) were generated as two prompts."""
    geneval = tmp_path / "geneval"
    geneval.mkdir()
    (geneval / "object_names.txt").write_text("person\nbicycle\ncar\n")
    allowed = (
        r"\(allowed: DPG-Bench's prompts/\*\.txt, named like 0\.txt or partiprompts12\.txt, one prompt on "
        r"one line each; other prompt files with --vqa and a dpg_bench\.csv that names them\)$"
    )
    calls = []
    with pytest.raises(
        BenchmarkError,
        match=rf"^{re.escape(str(geneval / 'object_names.txt'))} is not a DPG-Bench prompt file: its name is "
        rf"not a source name and a number {allowed}",
    ):
        run_dpg(generate(calls), geneval, tmp_path / "out", vqa=None, progress=False)
    lines = dpg_folder(tmp_path / "lines", ["0", "partiprompts7"], questions=[])
    (lines / "partiprompts7.txt").write_text("a red ball\na blue box\n")
    with pytest.raises(
        BenchmarkError,
        match=rf"^{re.escape(str(lines / 'partiprompts7.txt'))} holds 2 lines, not a DPG-Bench prompt of one "
        rf"line {allowed}",
    ):
        run_dpg(generate(calls), lines, tmp_path / "out", vqa=None, progress=False)
    assert calls == [] and not (tmp_path / "out").exists()
    data = shared_data()
    if data is not None and (data / "dpg_bench" / "prompts").is_dir():  # the real copies, when there
        from fusedit.eval.benchmarks import check_dpg_files

        check_dpg_files(data / "dpg_bench", load_dpg(data / "dpg_bench"))
        with pytest.raises(BenchmarkError, match="detector_object_names.txt is not a DPG-Bench prompt file"):
            check_dpg_files(data / "geneval", load_dpg(data / "geneval"))


@pytest.mark.parametrize(
    ("bench", "flags", "message"),
    [
        (
            "geneval",
            {"detector": "missing"},
            r"^--detector '.*missing' is a path to nothing \(allowed: a model",
        ),
        ("geneval", {"detector": "detector", "clip": "missing"}, r"^--clip '.*missing' is a path to nothing"),
        ("geneval", {"detector": "vqa"}, r"^detector '.*vilt' predicts none of GenEval's 80 COCO classes"),
        ("dpg", {"vqa": "missing"}, r"^--vqa '.*missing' is a path to nothing"),
        (
            "dpg",
            {"vqa": "detector"},
            r"^--vqa '.*detr' is a model of model_type 'detr' \(allowed: a VQA model",
        ),
    ],
)
def test_scoring_models_are_read_before_any_image(tmp_path, scorers, bench, flags, message):
    """A missing or wrong scoring model failed only after every image was generated (hours at 512 px)."""
    places = {**scorers, "missing": str(tmp_path / "missing")}
    given = {k: places[v] for k, v in flags.items()}
    calls = []
    with pytest.raises(ConfigError, match=message):
        if bench == "geneval":
            path = write_jsonl(tmp_path / "p.jsonl", [COW])
            run_geneval(generate(calls), path, tmp_path / "out", **{"clip": None, **given}, progress=False)
        else:
            run_dpg(generate(calls), dpg_folder(tmp_path, ["0"]), tmp_path / "out", **given, progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_the_protocol_generator_draws_image_k_of_a_batch_from_seed_plus_k(tiny_run):
    """What the per-image resumes (T2I-CompBench's missing images, GenEval's) rely on: image k of
    ``gen(prompt, s, n)`` is the image ``gen(prompt, s + k, 1)`` makes (up to the rounding of batch sizes)."""
    import numpy as np

    from fusedit.checkpoints import load_model

    model, _, _ = load_model(tiny_run)
    gen = run_mod.ProtocolGenerator(model, dict(image_size=16, steps=2, guidance=3.0, precision="fp32"))
    batch = [np.asarray(im, dtype=int) for im in gen("a red circle", 42, 3)]
    for k in range(3):
        alone = np.asarray(gen("a red circle", 42 + k, 1)[0], dtype=int)
        assert np.abs(batch[k] - alone).max() <= 1, k
    assert np.abs(batch[2] - np.asarray(gen("a red circle", 43, 1)[0], dtype=int)).max() > 1
    assert (gen.prompts, gen.truncated) == (5, 0)
    gen(" ".join(["a red circle"] * 100), 42, 3)  # cut: counted once, not once per image
    assert (gen.prompts, gen.truncated) == (6, 1)


def test_the_protocol_generator_warns_of_words_the_builtin_tokenizer_reads_as_unk(tiny_run, caplog):
    """`fusedit eval --bench geneval` fed a shapes-world model "a photo of a bench" without a word, where
    `fusedit sample` warns of the words read as <unk>: the first such prompt is warned about as it comes,
    the calls counted for the total `fusedit eval` gives at the end."""
    import logging

    from fusedit.checkpoints import load_model

    model, cfg, _ = load_model(tiny_run)
    settings = dict(image_size=16, steps=1, guidance=3.0, precision="fp32", negative_prompt="")
    gen = run_mod.ProtocolGenerator(model, settings, cfg)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        for prompt in ("a red circle", "a photo of a bench", "a photo of a cat"):
            gen(prompt, 42, 1)
    assert (gen.prompts, gen.unknown) == (3, 2)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("the built-in word tokenizer reads 'photo', 'bench' of the prompt as <unk>")
    assert message.endswith("; the benchmark's other prompts are counted at the end")
    assert run_mod.ProtocolGenerator(model, settings).unknown == 0  # no config: nothing to check against
    # A negative prompt the tokenizer cannot read is said once, not counted as every prompt's.
    caplog.clear()
    gen = run_mod.ProtocolGenerator(model, {**settings, "negative_prompt": "blurry photo"}, cfg)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        for _ in range(2):
            gen("a red circle", 42, 1)
    assert gen.unknown == 0
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        "the built-in word tokenizer reads 'blurry', 'photo' of the negative prompt as <unk>"
    )
