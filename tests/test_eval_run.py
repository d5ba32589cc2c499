"""The benchmark protocol runners behind `fusedit eval --bench geneval|dpg` (fusedit.eval.run): inputs are
checked before any image is generated, and scores.json is written atomically."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import fusedit.eval.dpg as dpg_mod
import fusedit.eval.geneval as geneval_mod
import fusedit.eval.run as run_mod
from fusedit.config import ConfigError
from fusedit.eval.geneval import Detection
from fusedit.eval.run import run_dpg, run_geneval

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


def test_geneval_without_colour_prompts_scores_with_a_detector_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(
        geneval_mod,
        "TransformersDetector",
        lambda model_id, device: lambda image: [Detection("cow", 0.9, (0, 0, 4, 4))],
    )
    written = spy_atomic(monkeypatch)
    path = write_jsonl(tmp_path / "meta.jsonl", [COW])
    r = run_geneval(generate([]), path, tmp_path / "out", detector="det", clip=None, progress=False)
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


def test_dpg_prompt_files_without_questions_are_found_before_generating(tmp_path, caplog):
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
        run_dpg(generate(calls), prompts, tmp_path / "out", vqa="vqa", progress=False)
    assert calls == [] and not (tmp_path / "out").exists()

    (prompts / "colors.txt").unlink()
    (prompts / "0.txt").write_text("A red ball.")
    with pytest.raises(RuntimeError, match="stop at the first generation"):
        run_dpg(lambda *a: _stop(), prompts, tmp_path / "out", vqa="vqa", progress=False)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"1 of the 2 prompt files have no questions in {tmp_path / 'dpg_bench.csv'}, so their grids are made "
        "but not scored: object_names.txt"
    ]


def _stop():
    raise RuntimeError("stop at the first generation")


def test_dpg_scores_are_written_atomically(tmp_path, monkeypatch):
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
    r = run_dpg(generate([]), prompts, tmp_path / "out", vqa="vqa", progress=False)
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


def test_the_weights_fingerprint_follows_the_weights_not_the_path(tmp_path):
    import shutil

    (tmp_path / "a" / "transformer").mkdir(parents=True)
    (tmp_path / "a" / "transformer" / "model.safetensors").write_bytes(b"header" + bytes(range(200)))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert run_mod.weights_fingerprint(tmp_path / "a") == run_mod.weights_fingerprint(tmp_path / "copy")
    (tmp_path / "copy" / "transformer" / "model.safetensors").write_bytes(b"header" + bytes(range(1, 201)))
    assert run_mod.weights_fingerprint(tmp_path / "a") != run_mod.weights_fingerprint(tmp_path / "copy")


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
