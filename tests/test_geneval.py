"""GenEval: the official sample layout, the scoring rules on hand-made detections, and the model adapters
(plumbing only, with tiny random models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.eval.benchmarks import load_geneval
from fusedit.eval.geneval import (
    COLORS,
    OBJECT_NAMES,
    TASKS,
    ClipColorClassifier,
    Detection,
    GenEvalRules,
    TransformersDetector,
    check_prompt,
    evaluate_image,
    geneval_class,
    object_crops,
    relative_position,
    score_geneval_folder,
    select_objects,
    write_geneval_samples,
)
from test_fid import save_tiny_clip

RULES = GenEvalRules()


def shared_data() -> Path | None:
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "shared", here.parents[1] / ".." / "shared"):
        if (root / "data").is_dir():
            return (root / "data").resolve()
    return None


def det(label, score=0.95, box=(0, 0, 10, 10), mask=None):
    return Detection(label, score, tuple(float(v) for v in box), mask)


def no_colors(dets, classname):
    raise AssertionError("this prompt must not ask for colours")


def judge(metadata, detections, colors_of=no_colors):
    return check_prompt(metadata, select_objects(detections, metadata["tag"], RULES), colors_of, RULES)


COUNTING = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}


def test_select_objects_thresholds_order_cap_and_overlap():
    dets = [det("cup", 0.5), det("cup", 0.95, (20, 0, 30, 10)), det("cup", 0.2), det("dog", 0.31)]
    kept = select_objects(dets, "two_object", RULES)
    assert [d.score for d in kept["cup"]] == [0.95, 0.5] and [d.score for d in kept["dog"]] == [0.31]
    # counting keeps only confident (> 0.9) detections
    assert {k: len(v) for k, v in select_objects(dets, "counting", RULES).items()} == {"cup": 1}
    many = [det("cup", 0.99 - k / 100, (k * 20, 0, k * 20 + 10, 10)) for k in range(20)]
    assert len(select_objects(many, "single_object", RULES)["cup"]) == 16
    # overlap filtering (off by default) drops a less confident box of the same class over a kept one
    twin = [det("cup", 0.9), det("cup", 0.8, (1, 1, 10, 10)), det("cup", 0.7, (50, 50, 60, 60))]
    assert len(select_objects(twin, "single_object", RULES)["cup"]) == 3
    assert len(select_objects(twin, "single_object", GenEvalRules(max_overlap=0.5))["cup"]) == 2


def test_select_objects_puts_the_later_of_exactly_tied_detections_first():
    """fusedit's own, fixed order of equal confidences: upstream's np.argsort(scores)[::-1] orders them
    as numpy's (unstable) default sort happens to, so there fusedit need not agree with it."""
    first, second, third = det("cup", 0.8, (0, 0, 10, 10)), det("cup", 0.8, (20, 0, 30, 10)), det("cup", 0.9)
    assert select_objects([first, second, third], "single_object", RULES)["cup"] == [third, second, first]
    # So the cap keeps the later of tied boxes, and a colour or position check judges them.
    tied = [det("cup", 0.5, (k * 20, 0, k * 20 + 10, 10)) for k in range(17)]
    kept = select_objects(tied, "single_object", RULES)["cup"]
    assert kept == tied[:0:-1]  # boxes 16, 15, ..., 1


def test_counting_needs_exactly_the_count_of_confident_objects():
    two = [det("clock", 0.95, (0, 0, 10, 10)), det("clock", 0.93, (30, 0, 40, 10))]
    assert judge(COUNTING, two) == (True, "")
    ok, reason = judge(COUNTING, two[:1])
    assert not ok and reason == "expected clock>=2, found 1"
    ok, reason = judge(COUNTING, [*two, det("clock", 0.92, (60, 0, 70, 10))])
    assert not ok and reason == "expected clock<3, found 3"
    # an unconfident third clock does not count, an unconfident second one does not either
    assert judge(COUNTING, [*two, det("clock", 0.6)])[0]
    assert not judge(COUNTING, [two[0], det("clock", 0.6)])[0]


def test_single_and_two_object_rules():
    single = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
    assert judge(single, [det("cow", 0.4)])[0] and not judge(single, [det("cow", 0.29)])[0]
    assert judge(single, [det("cow"), det("cow")])[0]  # no exclude clause: extra cows are fine
    two = {
        "tag": "two_object",
        "include": [{"class": "bench", "count": 1}, {"class": "cat", "count": 1}],
        "prompt": "a photo of a bench and a cat",
    }
    assert judge(two, [det("bench"), det("cat")])[0]
    ok, reason = judge(two, [det("bench"), det("dog")])
    assert not ok and reason == "expected cat>=1, found 0"


def test_relative_position_uses_centres_with_a_margin():
    target = det("teddy bear", box=(40, 40, 60, 60))
    assert relative_position(det("dog", box=(80, 40, 100, 60)), target) == {"right of"}
    assert relative_position(det("dog", box=(0, 40, 20, 60)), target) == {"left of"}
    assert relative_position(det("dog", box=(40, 0, 60, 20)), target) == {"above"}  # image y points down
    assert relative_position(det("dog", box=(40, 90, 60, 110)), target) == {"below"}
    assert relative_position(det("dog", box=(90, 90, 110, 110)), target) == {"right of", "below"}
    # centres 3 px apart are within the margin (0.1 x (20 + 20) = 4 px): no relation at all
    assert relative_position(det("dog", box=(43, 40, 63, 60)), target) == set()
    assert relative_position(det("dog", box=(43, 40, 63, 60)), target, margin=0.0) == {"right of"}


def test_position_rule_passes_and_fails():
    meta = {
        "tag": "position",
        "include": [
            {"class": "teddy bear", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a dog right of a teddy bear",
    }
    bear = det("teddy bear", 0.9, (0, 0, 20, 20))
    assert judge(meta, [bear, det("dog", 0.9, (50, 0, 70, 20))]) == (True, "")
    ok, reason = judge(meta, [bear, det("dog", 0.9, (0, 50, 20, 70))])
    assert not ok and reason == "expected dog right of target, found below target"
    ok, reason = judge(meta, [det("dog", 0.9, (50, 0, 70, 20))])
    assert not ok and reason.splitlines() == [
        "expected teddy bear>=1, found 0",
        "no target for dog to be right of",
    ]
    # only the most confident dog is judged
    assert judge(meta, [bear, det("dog", 0.9, (50, 0, 70, 20)), det("dog", 0.5, (0, 50, 20, 70))])[0]


def solid(color, size=(40, 40)):
    return Image.new("RGB", size, color)


PALETTE = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 180, 20), "white": (250, 250, 250)}


def dominant_color(crops, classname):
    """A stand-in colour classifier: the palette colour nearest to the mean of the non-grey pixels."""
    out = []
    for crop in crops:
        px = np.asarray(crop, dtype=np.float64).reshape(-1, 3)
        px = px[np.abs(px - 153).sum(1) > 6]  # drop the #999 background that replaces unmasked pixels
        mean = px.mean(0)
        out.append(min(PALETTE, key=lambda c: np.sum((np.array(PALETTE[c]) - mean) ** 2)))
    return out


def test_object_crops_mask_out_the_background_and_crop_to_the_box():
    image = solid(PALETTE["blue"], (40, 40))
    image.paste(solid(PALETTE["red"], (6, 6)), (10, 10))
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:16, 10:16] = True
    crop_masked, crop_plain = object_crops(
        image, [det("apple", box=(5, 5, 25, 25), mask=mask), det("apple", box=(5, 5, 25, 25))]
    )
    assert crop_masked.size == (20, 20) == crop_plain.size
    assert crop_masked.getpixel((0, 0)) == (153, 153, 153) and crop_masked.getpixel((7, 7)) == PALETTE["red"]
    assert crop_plain.getpixel((0, 0)) == PALETTE["blue"]
    assert dominant_color([crop_masked, crop_plain], "apple") == ["red", "blue"]
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
        object_crops(image, [det("apple", mask=np.zeros((3, 3), dtype=bool))])


def test_colors_and_color_attr_rules_use_the_classifier_on_each_object():
    image = solid(PALETTE["white"], (100, 50))
    image.paste(solid(PALETTE["red"], (30, 30)), (10, 10))
    image.paste(solid(PALETTE["blue"], (30, 30)), (60, 10))
    left, right = (10, 10, 40, 40), (60, 10, 90, 40)
    colors = {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    }
    assert evaluate_image(image, colors, [det("car", 0.9, left)], dominant_color)["correct"]
    verdict = evaluate_image(image, colors, [det("car", 0.9, right)], dominant_color)
    assert not verdict["correct"] and verdict["reason"] == "expected red car>=1, found 1 blue"
    attr = {
        "tag": "color_attr",
        "include": [
            {"class": "bus", "count": 1, "color": "red"},
            {"class": "cup", "count": 1, "color": "blue"},
        ],
        "prompt": "a photo of a red bus and a blue cup",
    }
    good = evaluate_image(image, attr, [det("bus", 0.9, left), det("cup", 0.8, right)], dominant_color)
    assert good["correct"] and good["details"] == {"bus": [[*left, 0.9]], "cup": [[*right, 0.8]]}
    swapped = evaluate_image(image, attr, [det("bus", 0.9, right), det("cup", 0.8, left)], dominant_color)
    assert not swapped["correct"] and len(swapped["reason"].splitlines()) == 2


def oracle_detections(metadata):
    """Detections that satisfy a prompt: each include clause's objects in a cell of its own, placed so
    that every position clause holds; colours are looked up from the clause."""
    dets, colors, centres = [], {}, []
    for k, clause in enumerate(metadata["include"]):
        cx, cy = 500.0, 500.0
        if "position" in clause:
            relation, target = clause["position"]
            tx, ty = centres[target]
            dx, dy = {"left of": (-300, 0), "right of": (300, 0), "above": (0, -300), "below": (0, 300)}[
                relation
            ]
            cx, cy = tx + dx, ty + dy
        elif k:
            cx = 500.0 + 200 * k  # unrelated objects: anywhere else
        centres.append((cx, cy))
        for j in range(clause["count"]):
            box = (cx - 20 + j * 0.5, cy - 20, cx + 20 + j * 0.5, cy + 20)  # same place, still countable
            dets.append(det(clause["class"], 0.95, box))
        colors[clause["class"]] = clause.get("color")
    return dets, (lambda found, name: [colors[name]] * len(found))


def test_rules_accept_a_perfect_image_of_every_official_prompt_and_reject_a_missing_object():
    data = shared_data()
    if data is None or not (data / "geneval" / "evaluation_metadata.jsonl").is_file():
        pytest.skip("GenEval prompt copy not found at ../shared/data/geneval (see shared/data/README.md)")
    metadata = load_geneval(data / "geneval")
    assert {m["tag"] for m in metadata} == set(TASKS)
    assert {c["class"] for m in metadata for c in m["include"]} <= set(OBJECT_NAMES)
    for meta in metadata:
        dets, colors_of = oracle_detections(meta)
        assert judge(meta, dets, colors_of) == (True, ""), meta["prompt"]
        assert not judge(meta, dets[1:], colors_of)[0], meta["prompt"]


def fake_generate(calls):
    def generate(prompt, seed, n):
        calls.append((prompt, seed, n))
        return [Image.new("RGB", (16, 16), (len(calls) % 256, k, seed % 256)) for k in range(n)]

    return generate


METADATA = [
    {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
    COUNTING,
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    },
]


def test_write_geneval_samples_official_layout_and_resume(tmp_path):
    calls = []
    counts = write_geneval_samples(
        METADATA, fake_generate(calls), tmp_path, n_per_prompt=4, seed=42, progress=False
    )
    assert counts == {"generated": 3, "skipped": 0}
    assert [c[1:] for c in calls] == [(42, 4)] * 3 and [c[0] for c in calls] == [
        m["prompt"] for m in METADATA
    ]
    for index, meta in enumerate(METADATA):
        folder = tmp_path / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta
        assert sorted(p.name for p in (folder / "samples").iterdir()) == [f"{k:05d}.png" for k in range(4)]
    (tmp_path / "00001" / "samples" / "00003.png").unlink()  # an interrupted prompt is redone
    counts = write_geneval_samples(METADATA, fake_generate(calls), tmp_path, progress=False)
    assert counts == {"generated": 1, "skipped": 2} and calls[-1][0] == "a photo of two clocks"
    with pytest.raises(ConfigError, match="holds samples of prompt 'a photo of a cow', not 'a dog'"):
        write_geneval_samples(
            [{**METADATA[0], "prompt": "a dog"}], fake_generate(calls), tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="returned 1 images"):
        write_geneval_samples(
            METADATA, lambda p, s, n: [Image.new("RGB", (4, 4))], tmp_path / "x", progress=False
        )


def test_a_prompt_folder_holds_only_this_runs_images(tmp_path):
    """From Python a folder may be written again with fewer images per prompt: GenEval's scorer scores every
    PNG under a metadata.jsonl, so an earlier run's extra images go (and the folder is made again)."""
    out = tmp_path / "samples"
    write_geneval_samples(METADATA[:1], fake_generate([]), out, n_per_prompt=6, progress=False)
    calls = []
    counts = write_geneval_samples(METADATA[:1], fake_generate(calls), out, n_per_prompt=4, progress=False)
    assert counts == {"generated": 1, "skipped": 0} and len(calls) == 1
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == [f"{k:05d}.png" for k in range(4)]


def test_an_interrupted_prompt_folder_never_looks_complete_and_is_redone(tmp_path, monkeypatch):
    """metadata.jsonl is written after the images: GenEval's own scorer reads every folder that has one, and
    before, a stop mid-prompt left it beside only some of the images. The temporary files of a kill -9
    (beside the images, the metadata, and the run's record) are swept at the next start."""
    import fusedit.eval.geneval as geneval
    from fusedit.eval.run import claim_folder
    from test_files import killed_mid_write

    saved, original = [], geneval.save_png

    def stopped_at_the_sixth(*args, **kwargs):
        saved.append(1)
        if len(saved) == 6:  # prompt 1's second image
            raise KeyboardInterrupt
        original(*args, **kwargs)

    monkeypatch.setattr(geneval, "save_png", stopped_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        write_geneval_samples(METADATA, fake_generate([]), tmp_path / "samples", progress=False)
    folder = tmp_path / "samples" / "00001"
    assert sorted(p.name for p in folder.iterdir()) == ["samples"]
    assert [p.name for p in (folder / "samples").iterdir()] == ["00000.png"]
    monkeypatch.undo()
    killed_mid_write(folder / "samples" / "00001.png")
    killed_mid_write(folder / "metadata.jsonl")
    killed_mid_write(tmp_path / "generation.json")
    assert len(list(tmp_path.rglob(".*.tmp"))) == 3
    claim_folder(tmp_path, tmp_path / "samples", None, "geneval", 42)
    calls = []
    counts = write_geneval_samples(METADATA, fake_generate(calls), tmp_path / "samples", progress=False)
    assert counts == {"generated": 2, "skipped": 1} and [c[0] for c in calls] == [
        m["prompt"] for m in METADATA[1:]
    ]
    assert list(tmp_path.rglob(".*.tmp")) == []
    assert json.loads((folder / "metadata.jsonl").read_text()) == METADATA[1]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == [f"{k:05d}.png" for k in range(4)]


def test_score_geneval_folder_scores_per_task_and_overall(tmp_path):
    # Every sample is red on the left, blue on the right, and carries (prompt index, sample index) in its
    # top-left pixel, which the fake detector reads back to decide what it "sees".
    def generate_marked(index):
        def generate(prompt, seed, n):
            images = []
            for k in range(n):
                image = solid(PALETTE["red"], (32, 32))
                image.paste(solid(PALETTE["blue"], (16, 32)), (16, 0))
                image.putpixel((0, 0), (index, k, 0))
                images.append(image)
            return images

        return generate

    folder = tmp_path / "samples"  # the results go beside it, into tmp_path
    folder.mkdir()
    for index, meta in enumerate(METADATA):
        write_geneval_samples([meta], generate_marked(index), tmp_path / "tmp", progress=False)
        (tmp_path / "tmp" / "00000").rename(folder / f"{index:05d}")
    red_box, blue_box = (0, 0, 16, 32), (16, 0, 32, 32)

    def detector(image):
        index, k, _ = image.getpixel((0, 0))
        if index == 0:  # cow: found in 3 of 4 images
            return [det("cow", 0.8)] if k < 3 else []
        if index == 1:  # two clocks in every image, a third (confident) one in image 0
            return [det("clock", 0.95), det("clock", 0.95)] + ([det("clock", 0.91)] if k == 0 else [])
        return [det("car", 0.9, red_box if k % 2 == 0 else blue_box)]  # the red car in images 0 and 2

    scores = score_geneval_folder(folder, detector, dominant_color, progress=False)
    assert scores["per_task"] == {"single_object": 0.75, "counting": 0.75, "colors": 0.5}
    assert scores["overall"] == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    assert scores["num_images"] == 12 and scores["num_prompts"] == 3 and scores["correct_prompts"] == 1.0
    assert scores["missing_tasks"] == ["two_object", "position", "color_attr"]
    rows = [json.loads(line) for line in Path(scores["results_file"]).read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {
        "filename",
        "tag",
        "prompt",
        "correct",
        "reason",
        "metadata",
        "details",
    }
    assert json.loads(rows[4]["metadata"]) == COUNTING and rows[4]["reason"] == "expected clock<3, found 3"
    # Given the prompts, only theirs are scored (the first two here); a folder of another prompt is refused.
    first = score_geneval_folder(folder, detector, None, metadata=METADATA[:2], progress=False)
    assert (first["num_prompts"], first["num_images"], first["overall"]) == (2, 8, 0.75)
    with pytest.raises(
        ConfigError, match="00001 holds samples of prompt 'a photo of two clocks', not 'a dog'"
    ):
        score_geneval_folder(
            folder, detector, None, metadata=[METADATA[0], {**COUNTING, "prompt": "a dog"}], progress=False
        )
    with pytest.raises(ConfigError, match="ask for colours; pass a color_classifier"):
        score_geneval_folder(folder, detector, None, progress=False)
    with pytest.raises(FileNotFoundError, match="no GenEval samples"):
        score_geneval_folder(tmp_path / "tmp", detector, None, progress=False)
    # A file damaged since it was written is named, with the way to make it again (not PIL's bare message).
    damaged = folder / "00001" / "samples" / "00002.png"
    damaged.write_bytes(damaged.read_bytes()[:40])
    remake = (
        rf"delete {folder / '00001'} and rerun the same `fusedit eval`: it makes that prompt's images again"
    )
    with pytest.raises(ValueError, match=rf"^{damaged}: corrupt image \(.*\); {re.escape(remake)}$"):
        score_geneval_folder(folder, detector, dominant_color, progress=False)
    (folder / "00001" / "metadata.jsonl").write_text("garbage")
    with pytest.raises(
        ValueError, match=rf"metadata.jsonl' is not readable JSON \(.*; {re.escape(remake)}\)$"
    ):
        score_geneval_folder(folder, detector, dominant_color, progress=False)
    with pytest.raises(
        ValueError, match="metadata.jsonl' is not readable JSON"
    ):  # and when resuming the generation
        write_geneval_samples(METADATA, generate_marked(0), folder, progress=False)


def test_rule_values_are_validated_and_labels_mapped():
    with pytest.raises(ConfigError, match=r"threshold=1.5 is out of range; allowed: 0 <= threshold <= 1"):
        GenEvalRules(threshold=1.5)
    with pytest.raises(
        ConfigError, match=r"^GenEval rule max_objects=2.5 is not allowed \(allowed: an integer >= 1\)$"
    ):
        GenEvalRules(max_objects=2.5)
    assert geneval_class("Mouse") == "computer mouse" and geneval_class("tv-monitor") == "tv"
    assert geneval_class("dining_table") == "dining table" and geneval_class("sky-other-merged") is None
    assert geneval_class("N/A") is None and all(geneval_class(n) == n for n in OBJECT_NAMES)


LABELS = {0: "person", 1: "mouse", 2: "sky"}  # a GenEval class, an alias of one, and a non-object class


def save_tiny_detr(path):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=8,
        id2label=LABELS,
    )
    model = DetrForObjectDetection(config)
    with torch.no_grad():  # never predict the last class, so that every query is a detection to map
        model.class_labels_classifier.bias[len(LABELS) - 1] = -10.0
    model.save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(path)
    return path


def save_tiny_mask2former(path):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=16,
        dim_feedforward=16,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=6,
        id2label=LABELS,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)
    return path


def photo(width=48, height=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_transformers_detector_detr_plumbing(tmp_path):
    torch.manual_seed(0)
    detector = TransformersDetector(save_tiny_detr(tmp_path / "detr"), device="cpu", min_score=0.0)
    assert detector.label_map == {0: "person", 1: "computer mouse"} and not detector.with_masks
    image = photo()
    dets = detector(image)
    assert len(dets) == 8  # one per query: the tiny model never predicts "sky"
    assert all(
        d.mask is None and 0 <= d.box[0] <= d.box[2] <= 48 and 0 <= d.box[1] <= d.box[3] <= 40 for d in dets
    )
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    # They are the model's own post-processed detections, renamed, minus labels GenEval does not know.
    with torch.no_grad():
        outputs = detector.model(**detector.processor(images=image, return_tensors="pt"))
    raw = detector.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(40, 48)])[0]
    pairs = list(zip(raw["scores"].tolist(), raw["labels"].tolist()))
    names = {0: "person", 1: "computer mouse"}
    assert sorted((round(d.score, 5), d.label) for d in dets) == sorted(
        (round(s, 5), names[k]) for s, k in pairs
    )
    for only in (0, 1):  # whatever the tiny model predicts, a label outside the map is dropped
        detector.label_map = {only: names[only]}
        kept = sorted(round(d.score, 5) for d in detector(image))
        assert kept == sorted(round(s, 5) for s, k in pairs if k == only)


def test_transformers_detector_mask2former_gives_masks_and_their_boxes(tmp_path):
    torch.manual_seed(0)
    detector = TransformersDetector(save_tiny_mask2former(tmp_path / "m2f"), device="cpu", min_score=0.0)
    assert detector.with_masks
    dets = detector(photo())
    assert dets and all(0.0 <= d.score <= 1.0 and d.label in {"person", "computer mouse"} for d in dets)
    for d in dets:
        assert d.mask.shape == (40, 48) and d.mask.dtype == bool
        if d.mask.any():  # the box is the mask's extent
            ys, xs = np.nonzero(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # and its detections flow through the rules (crops honour the masks)
    verdict = evaluate_image(
        photo(), METADATA[2], dets, lambda crops, name: ["red"] * len(crops), GenEvalRules(threshold=0.0)
    )
    assert set(verdict) == {"correct", "reason", "details"}


def test_transformers_detector_rejects_a_model_without_geneval_classes(tmp_path):
    global LABELS
    saved, LABELS = LABELS, {0: "sky", 1: "grass"}
    try:
        path = save_tiny_detr(tmp_path / "stuff")
    finally:
        LABELS = saved
    with pytest.raises(ConfigError, match="predicts none of GenEval's 80 COCO classes"):
        TransformersDetector(path, device="cpu")


def test_clip_color_classifier_plumbing(tmp_path):
    classifier = ClipColorClassifier(save_tiny_clip(tmp_path / "clip"), device="cpu", batch_size=2)
    crops = [solid(rgb) for rgb in PALETTE.values()]
    colors = classifier(crops, "fire hydrant")
    assert len(colors) == 4 and set(colors) <= set(COLORS)
    weights = classifier.class_embeddings("fire hydrant")
    assert weights.shape == (len(COLORS), 8)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(len(COLORS)))
    assert classifier.class_embeddings("fire hydrant") is weights  # cached per class
    assert classifier([], "cup") == []


@pytest.mark.parametrize("count", [0, 2.5, True, "2"])
def test_sample_counts_are_whole_numbers_before_any_work(tmp_path, count):
    """A fractional or textual count used to pass `< 1` and fail midway in range(); each eval entry refuses
    it at the start, in one line, as config values are refused."""
    from fusedit.eval.compbench import write_compbench_samples
    from fusedit.eval.fid import check_batch_size
    from fusedit.eval.mjhq import select
    from fusedit.eval.run import first_prompts
    from fusedit.eval.shapes_bench import run_shapes_bench

    calls = []
    cases = [
        (
            "n_per_prompt",
            lambda: write_geneval_samples(METADATA, fake_generate(calls), tmp_path, n_per_prompt=count),
        ),
        ("n_per_prompt", lambda: write_compbench_samples(["a cat"], fake_generate(calls), tmp_path, count)),
        ("batch_size", lambda: check_batch_size(count)),
        ("per_category", lambda: select([{"id": "0", "category": "animals"}], count)),
        ("limit", lambda: first_prompts(["a cat"], count)),
        ("per_category", lambda: run_shapes_bench(None, 16, tmp_path, per_category=count)),
        ("batch_size", lambda: run_shapes_bench(None, 16, tmp_path, batch_size=count)),
    ]
    for name, call in cases:
        with pytest.raises(
            ConfigError, match=rf"^{name}={re.escape(repr(count))} is not allowed \(allowed: an integer >= 1"
        ):
            call()
    assert calls == [] and not list(tmp_path.iterdir())
