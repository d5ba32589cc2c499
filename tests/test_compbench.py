"""T2I-CompBench: the dataset loader, the official sample layout and its resume, the text rules on the
benchmark's prompt forms, the spatial and 3-in-1 rules on hand-made detections, the VQA / CLIP adapters
(tiny random models with known outputs), and run_compbench end to end with stub scorers."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import fusedit.eval.compbench as cb
import fusedit.eval.geneval
from fusedit.config import ConfigError
from fusedit.eval.benchmarks import BenchmarkError
from fusedit.eval.compbench import (
    CATEGORIES,
    ClipSimilarity,
    RuleText,
    SpacyText,
    SpatialRules,
    TransformersYesNoVQA,
    attribute_questions,
    attribute_score,
    complex_kind,
    complex_score,
    detector_label,
    frame_scale,
    load_compbench,
    load_complex_groups,
    locality_of,
    position_score,
    pre_question,
    sample_name,
    score_category,
    spatial_score,
    text_rules,
    write_compbench_samples,
)
from fusedit.eval.fid import ClipEmbedder
from fusedit.eval.geneval import Detection
from fusedit.eval.run import check_compbench_folder, run_compbench
from test_dpg import save_tiny_blip, save_tiny_vilt
from test_fid import save_tiny_clip

# A few prompts of each official file (examples/dataset/<category>_val.txt), in their real forms.
DATA = {
    "color_val.txt": "a green bench and a blue bowl\n\na red ball and a blue box\t(extra column)\n",
    "shape_val.txt": "an oblong cucumber and a teardrop plum\n",
    "texture_val.txt": "a plastic toy and a glass bottle\n",
    "spatial_val.txt": "a dog on the left of a cat\n",
    "non_spatial_val.txt": "A person is looking at a rainbow and marveling at its beauty.\n",
    "complex_val.txt": (
        "The red hat was next to the brown box.\nThe black phone was resting on the brown charger.\n"
        "The yellow cone was suspended in mid-air near the orange pyramid and the green cylinder.\n"
    ),
    "complex_val_spatial.txt": "The red hat was next to the brown box.\n",
    "complex_val_action.txt": "The black phone was resting on the brown charger.\n",
}


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "t2i-compbench"
    folder.mkdir()
    for name, text in DATA.items():
        (folder / name).write_text(text)
    return folder


# --------------------------------------------------------------------------------------------------
# Data


def test_loader_reads_each_category_in_order_and_picks_a_subset(dataset, tmp_path):
    prompts = load_compbench(dataset)
    assert tuple(prompts) == CATEGORIES
    # the text before a tab, blank lines skipped
    assert prompts["color"] == ["a green bench and a blue bowl", "a red ball and a blue box"]
    assert load_compbench(dataset, ["spatial", "color"]).keys() == {"color", "spatial"}
    assert list(load_compbench(dataset, ["spatial", "color"])) == ["color", "spatial"]
    # a clone of the repository works too
    clone = tmp_path / "T2I-CompBench"
    (clone / "examples").mkdir(parents=True)
    dataset.rename(clone / "examples" / "dataset")
    assert load_compbench(clone, ["shape"]) == {"shape": ["an oblong cucumber and a teardrop plum"]}


def test_loader_errors_are_one_line_and_name_the_path(dataset, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"nowhere' does not exist; get a copy with `fusedit benchmarks "
    ):
        load_compbench(tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match=r"color_val.txt' is a file; expected the folder"):
        load_compbench(dataset / "color_val.txt")
    (dataset / "shape_val.txt").unlink()
    with pytest.raises(
        BenchmarkError, match=r"^no shape_val.txt in '.*t2i-compbench'; expected T2I-CompBench"
    ):
        load_compbench(dataset)
    assert list(load_compbench(dataset, ["color"])) == ["color"]  # only the chosen files are read
    (dataset / "texture_val.txt").write_text("\n  \n")
    with pytest.raises(BenchmarkError, match=r"texture_val.txt holds no prompts"):
        load_compbench(dataset, ["texture"])
    (dataset / "texture_val.txt").write_text("a cat\na red/blue cat\n")
    with pytest.raises(
        BenchmarkError, match=r"texture_val.txt:2: prompt 'a red/blue cat' cannot be a file name"
    ):
        load_compbench(dataset, ["texture"])
    with pytest.raises(
        ConfigError, match=r"allowed: one or more of color, shape, texture, spatial, non_spatial"
    ):
        load_compbench(dataset, ["colour"])


def test_complex_groups_follow_3_in_1(dataset):
    groups = load_complex_groups(dataset)
    prompts = load_compbench(dataset, ["complex"])["complex"]
    assert [complex_kind(p, groups) for p in prompts] == ["spatial", "action", "all"]
    # matched as 3_in_1.py matches: the text before the first full stop, case ignored
    assert complex_kind("THE RED HAT WAS NEXT TO THE BROWN BOX. It is old.", groups) == "spatial"
    assert complex_score("spatial", attribute=0.4, spatial=0.8, action=None) == pytest.approx(0.6)
    assert complex_score("action", attribute=0.4, spatial=None, action=0.3) == pytest.approx(0.35)
    assert complex_score("all", attribute=0.4, spatial=0.8, action=0.3) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# Generation


def seeded_generate(calls, size=8):
    """A fake generator: image k of a call is grey level (seed + k) % 256, so each image names its seed."""

    def generate(prompt, seed, n):
        calls.append((prompt, seed, n))
        return [Image.new("RGB", (size, size), ((seed + k) % 256,) * 3) for k in range(n)]

    return generate


def test_samples_use_the_official_names_seeds_and_resume_per_image(tmp_path):
    prompts = ["a green bench and a blue bowl", "a red ball and a blue box"]
    calls = []
    counts = write_compbench_samples(
        prompts, seeded_generate(calls), tmp_path, n_per_prompt=3, progress=False
    )
    assert counts == {"generated": 6, "skipped": 0}
    assert calls == [(prompts[0], 42, 3), (prompts[1], 42, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{prompts[0]}_00000{i}.png" for i in range(3)] + [f"{prompts[1]}_00000{i}.png" for i in range(3, 6)]
    )
    assert sample_name(prompts[1], 4) == "a red ball and a blue box_000004.png"
    assert Image.open(tmp_path / sample_name(prompts[1], 5)).getpixel((0, 0)) == (44, 44, 44)  # seed 42 + 2
    # Only the missing images are made again, each with its own seed.
    (tmp_path / sample_name(prompts[1], 4)).unlink()
    (tmp_path / sample_name(prompts[1], 5)).unlink()
    counts = write_compbench_samples(
        prompts, seeded_generate(calls), tmp_path, n_per_prompt=3, progress=False
    )
    assert counts == {"generated": 2, "skipped": 4} and calls[2:] == [(prompts[1], 43, 2)]
    assert Image.open(tmp_path / sample_name(prompts[1], 4)).getpixel((0, 0)) == (43, 43, 43)
    assert (
        write_compbench_samples(prompts, seeded_generate(calls), tmp_path, 3, progress=False)["generated"]
        == 0
    )
    with pytest.raises(ValueError, match="generate returned 1 images for 'a cat'; expected 2"):
        write_compbench_samples(
            ["a cat"], lambda p, s, n: [Image.new("RGB", (4, 4))], tmp_path, 2, progress=False
        )
    with pytest.raises(ConfigError, match=r"^n_per_prompt=0 is not allowed \(allowed: an integer >= 1\)$"):
        write_compbench_samples(prompts, seeded_generate(calls), tmp_path, 0)


def test_the_temporary_file_of_a_killed_image_write_is_swept_at_the_next_start(tmp_path):
    from test_files import killed_mid_write

    prompts = ["a green bench and a blue bowl"]
    killed_mid_write(tmp_path / sample_name(prompts[0], 1))
    assert len(list(tmp_path.glob(".*.tmp"))) == 1
    counts = write_compbench_samples(prompts, seeded_generate([]), tmp_path, n_per_prompt=2, progress=False)
    assert counts == {"generated": 2, "skipped": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [sample_name(prompts[0], k) for k in range(2)]


# --------------------------------------------------------------------------------------------------
# Text


@pytest.mark.parametrize(
    ("prompt", "phrases"),
    [
        ("a green bench and a blue bowl", ["a green bench", "a blue bowl"]),
        ("rubber sole shoes and fluffy clouds", ["rubber sole shoes", "fluffy clouds"]),
        ("a red apple and yellow bananas", ["a red apple", "yellow bananas"]),
        ("a red orange and a brown sheep", ["a red orange", "a brown sheep"]),
        ("an oblong cucumber and a teardrop plum", ["an oblong cucumber", "a teardrop plum"]),
        (
            "a cubic block and a cylindrical container of hand cream",
            ["a cubic block", "a cylindrical container", "hand cream"],
        ),
        ("A bathroom with white tile and a beige toilet.", ["A bathroom", "white tile", "a beige toilet"]),
        ("A black and white cat sits in a white sink.", ["A black and white cat", "a white sink"]),
        (
            "A long, narrow yellow kitchen with black and white floor tiles.",
            ["A long, narrow yellow kitchen", "black and white floor tiles"],
        ),
        (
            "two white sheep, a black goat and a white goat in a field",
            ["two white sheep", "a black goat", "a white goat", "a field"],
        ),
        ("A black motorcycle is parked on grey cobblestones.", ["A black motorcycle", "grey cobblestones"]),
        (
            "The fresh omelet cooked the fluffy eggs and the crisp vegetables.",
            ["The fresh omelet", "the fluffy eggs", "the crisp vegetables"],
        ),
        (
            "A man in a gray jacket standing in a kitchen next to a black dog.",
            ["A man", "a gray jacket", "a kitchen", "a black dog"],
        ),
        ("a painting on the top of a rabbit", ["a painting", "a rabbit"]),
    ],
)
def test_noun_phrases_of_the_benchmark_prompt_forms(prompt, phrases):
    assert RuleText().noun_phrases(prompt) == phrases


def test_questions_are_prepared_as_blip_prepares_them():
    assert pre_question('The "Red" Hat (old): ok!?') == "the red hat old ok?"
    text = RuleText()
    assert attribute_questions("A bathroom with white tile and a beige toilet.", text) == [
        "a bathroom?",
        "white tile?",
        "a beige toilet?",
    ]
    many = " and ".join(
        f"a {c} ball" for c in ("red", "blue", "green", "pink", "black", "white", "gold", "tan", "gray")
    )
    assert len(attribute_questions(many, text)) == 8  # BLIP_vqa.py's np_num
    assert attribute_score([0.9, 0.5]) == 0.45 and attribute_score([]) == 1.0
    assert (
        attribute_score([0.123456, 1.0]) == 0.1235
    )  # each answer rounded to 4 decimals, as upstream writes it


def test_spatial_nouns_and_adjectives():
    text = RuleText()
    assert text.spatial_objects("a girl on the top of a frog") == ("girl", "frog")
    assert text.spatial_objects("a bird on side of a airplane") == ("bird", "airplane")
    # complex prompts: the nouns nearest the preposition, compounds keep their first noun (as spaCy's NOUN)
    assert text.spatial_objects("The fluffy cat is on the left of the soft pillow.", complex=True) == (
        "cat",
        "pillow",
    )
    assert text.spatial_objects("The red hat was on top of the brown coat rack.", complex=True) == (
        "hat",
        "coat",
    )
    assert text.spatial_objects("The warm yellow light shone down on the red armchair.", complex=True) == (
        None,
        None,
    )
    assert text.without_adjectives("The black phone was resting on the brown charger.") == (
        "The phone was resting on the charger ."
    )
    assert (
        locality_of("a mouse near a bowl") == "near" and locality_of("a cat on top of a car") == "on top of"
    )
    assert locality_of("a girl on the top of a frog") == "on the top of" and locality_of("two cats") is None


class TaggedDoc:
    """A spaCy-like document from "word/POS" tokens, with its noun chunks written between [ and ]."""

    def __init__(self, tagged: str):
        words = tagged.replace("[", "").replace("]", "").split()
        self.tokens = [SimpleNamespace(text=w.split("/")[0], pos_=w.split("/")[1]) for w in words]
        chunks = [part.split("]")[0].split() for part in tagged.split("[")[1:]]
        self.noun_chunks = [SimpleNamespace(text=" ".join(w.split("/")[0] for w in c)) for c in chunks]

    def __iter__(self):
        return iter(self.tokens)


def test_spacy_text_follows_the_official_algorithms_on_tagged_prompts():
    docs = {
        "p1": "[The/DET red/ADJ hat/NOUN] was/AUX on/ADP [top/NOUN] of/ADP [the/DET brown/ADJ coat/NOUN rack/NOUN] ./PUNCT",
        "p2": "[Anna/PROPN] sat/VERB next/ADV to/ADP [Big/PROPN Ben/PROPN] ./PUNCT",
        "p3": "[a/DET dog/NOUN] near/ADP [a/DET cat/NOUN] and/CCONJ next/ADV to/ADP [a/DET cow/NOUN]",
    }
    text = SpacyText(lambda prompt: TaggedDoc(docs[prompt]))
    assert text.noun_phrases("p1") == ["The red hat", "top", "the brown coat rack"]
    assert text.spatial_objects("p1", complex=True) == ("hat", "coat")
    assert text.spatial_objects("p1") == ("hat", "rack")  # simple prompts: the first and the last noun
    # no noun after the preposition: the first proper noun not followed by another one
    assert text.spatial_objects("p2", complex=True) == ("Anna", "Ben")
    assert text.spatial_objects("p3", complex=True) == (None, None)  # four objects: not exactly two
    assert text.without_adjectives("p1") == "The hat was on top of the coat rack ."
    with pytest.raises(ConfigError, match=r"T2I-CompBench text processing 'nltk'; allowed: rules, spacy"):
        text_rules("nltk")
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"text='spacy' needs spaCy \(pip install spacy"):
            text_rules("spacy")


# --------------------------------------------------------------------------------------------------
# Spatial and complex rules


def test_position_score_on_hand_made_boxes():
    left, right = (0, 0, 100, 100), (200, 0, 300, 100)
    assert position_score("on the left of", left, right) == 1.0
    assert position_score("on the right of", right, left) == 1.0
    assert position_score("on the right of", left, right) == 0.0
    assert position_score("on the top of", (0, 0, 100, 100), (0, 300, 100, 400)) == 1.0
    assert position_score("on the bottom of", (0, 0, 100, 100), (0, 300, 100, 400)) == 0.0
    assert position_score("on the bottom of", (0, 300, 100, 400), (0, 0, 100, 100)) == 1.0
    # mostly vertical offset: not left of, however far right the other box is
    assert position_score("on the left of", (0, 0, 10, 10), (20, 100, 30, 110)) == 0.0
    # overlapping boxes: 0.1 / IoU (here IoU = 50 x 100 / (2 x 100 x 100 - 5000) = 1/3)
    assert position_score("on the left of", (0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(0.3)
    # near: within 150 px on one axis, else 150 / the larger offset
    assert position_score("near", (0, 0, 10, 10), (100, 500, 110, 510)) == 1.0
    assert position_score("next to", (0, 0, 10, 10), (300, 600, 310, 610)) == pytest.approx(0.25)
    # "on top of" has no rule upstream (nor has no relation)
    assert position_score("on top of", (0, 0, 100, 100), (0, 300, 100, 400)) == 0.0
    assert position_score(None, left, right) == 0.0


def test_frame_scale_is_unidets_input_size():
    assert frame_scale(479, 479, (479, 480)) == (1.0, 1.0)
    assert frame_scale(958, 958, (479, 480)) == (0.5, 0.5)
    sx, sy = frame_scale(1024, 512, (479, 480))  # the longer side is capped at 480
    assert (round(1024 * sx), round(512 * sy)) == (480, 240)
    assert frame_scale(300, 200, None) == (1.0, 1.0)


def test_spatial_score_combines_confidences_and_position():
    dog, cat = Detection("dog", 0.9, (0, 0, 100, 100)), Detection("cat", 0.8, (300, 0, 400, 100))
    size = (479, 479)
    result = spatial_score("a dog on the left of a cat", [cat, dog], size)
    assert result["score"] == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5)
    assert (
        result["nouns"] == ["dog", "cat"]
        and result["locality"] == "on the left of"
        and result["position"] == 1
    )
    # the wrong side: 0.425 < 0.5 -> 0
    assert spatial_score("a dog on the right of a cat", [cat, dog], size)["score"] == 0.0
    # one object only: 0.25 x its confidence, below 0.5 -> 0
    assert spatial_score("a dog on the left of a cow", [cat, dog], size)["score"] == 0.0
    # girl/boy/man/woman are persons; the most confident detection of a class counts; 0.5 and below do not
    man = [Detection("person", 0.95, (0, 0, 100, 100)), Detection("person", 0.99, (400, 0, 479, 100))]
    weak_cat = Detection("cat", 0.5, (400, 0, 479, 100))
    r = spatial_score("a man on the left of a cat", [*man, cat, weak_cat], size)
    assert r["labels"] == ["person", "cat"] and r["detections"][0][4] == 0.99
    assert r["score"] == 0.0  # the 0.99 person is right of the cat: position 0, 0.25 x (0.99 + 0.8) < 0.5
    assert spatial_score("a cat on the left of a man", [*man, cat], size)["score"] == pytest.approx(
        0.25 * 1.79 + 0.5
    )
    # distances are measured in UniDet's 479-px frame: 400 px apart in a 958-px image is 200 px there
    near = [Detection("dog", 0.8, (0, 0, 100, 100)), Detection("cat", 0.8, (400, 400, 500, 500))]
    assert spatial_score("a dog near a cat", near, (958, 958))["score"] == pytest.approx(0.4 + 0.75 / 2)
    plain = SpatialRules(frame=None)
    assert spatial_score("a dog near a cat", near, (958, 958), rules=plain)["score"] == pytest.approx(
        0.4 + 0.375 / 2
    )


def test_detector_labels_of_prompt_nouns():
    assert [detector_label(n) for n in ("girl", "Woman", "sofa", "television", "phone", "frog")] == [
        "person",
        "person",
        "couch",
        "tv",
        "cell phone",
        "frog",
    ]


# --------------------------------------------------------------------------------------------------
# Scoring models (tiny random models whose outputs are fixed by hand)


RED, BLUE = (220, 20, 20), (20, 20, 220)


def test_blip_yes_probability_is_yes_over_yes_plus_no_of_the_first_answer_token(tmp_path):
    torch.manual_seed(0)
    vqa = TransformersYesNoVQA(save_tiny_blip(tmp_path / "blip"), device="cpu")
    assert vqa.generative and vqa.enc_token_id is None  # the tiny tokenizer has no [ENC]
    tokenizer = vqa.processor.tokenizer
    yes, no, red = (tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no", "red"))
    images = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE)]
    questions = ["is there a ball?", "is a ball red?"]
    free = vqa.yes_probabilities(images, questions)
    assert all(0.0 < p < 1.0 for p in free)
    decoder = vqa.model.text_decoder.cls.predictions
    with torch.no_grad():  # the logits become the bias alone: P(yes) = 3 / (3 + 1), whatever else scores
        decoder.decoder.weight.zero_()
        decoder.decoder.bias.zero_()
        decoder.decoder.bias[yes] = torch.log(torch.tensor(3.0))
        decoder.decoder.bias[red] = 50.0
    assert vqa.yes_probabilities(images, questions) == pytest.approx([0.75, 0.75], abs=1e-6)
    with torch.no_grad():
        decoder.decoder.bias[no] = torch.log(torch.tensor(9.0))
    assert vqa.yes_probabilities(images[:1], questions[:1]) == pytest.approx([0.25], abs=1e-6)


def test_vilt_yes_probability_uses_its_yes_and_no_answers(tmp_path):
    torch.manual_seed(0)
    vqa = TransformersYesNoVQA(save_tiny_vilt(tmp_path / "vilt"), device="cpu")
    assert not vqa.generative
    head = vqa.model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, torch.log(torch.tensor(4.0))]))  # labels: 0 yes, 1 no
    assert vqa.yes_probabilities([Image.new("RGB", (20, 20), RED)], ["is there a ball?"]) == pytest.approx(
        [0.2], abs=1e-6
    )


def test_clip_similarity_is_the_plain_cosine(tmp_path):
    path = save_tiny_clip(tmp_path / "clip")
    images = [Image.new("RGB", (24, 24), c) for c in (RED, BLUE, (0, 0, 0))]
    texts = ["a red ball", "blue", "zzz"]
    cosines = ClipSimilarity(path, device="cpu")(images, texts)
    embed = ClipEmbedder(path, device="cpu")
    expected = (embed.image_embeds(images) * embed.text_embeds(texts)).sum(-1)
    assert torch.allclose(cosines, expected, atol=1e-6) and cosines.abs().max() <= 1.0
    with pytest.raises(ValueError, match="3 images but 1 texts"):
        ClipSimilarity(path, device="cpu")(images, texts[:1])


# --------------------------------------------------------------------------------------------------
# Folders and the protocol, with stub scorers


class StubVQA:
    """P(yes) by question: "a red ..." 0.9 when the image is red (else 0.2); anything else 0.5."""

    def __init__(self, model_id="stub-vqa", **kwargs):
        self.model_id, self.batches = model_id, []  # as TransformersYesNoVQA: the id it was built from

    def yes_probabilities(self, images, questions):
        self.batches.append(len(images))
        return [
            (0.9 if image.getpixel((0, 0)) == RED else 0.2) if q.startswith("a red") else 0.5
            for image, q in zip(images, questions)
        ]


def colour_generate(calls, colour=RED):
    def generate(prompt, seed, n):
        calls.append(prompt)
        return [Image.new("RGB", (8, 8), colour) for _ in range(n)]

    return generate


def test_score_category_multiplies_the_answers_per_image(tmp_path):
    samples = tmp_path / "color" / "samples"
    prompts = ["a red ball and a blue box", "a green bench and a blue bowl"]
    write_compbench_samples(prompts, colour_generate([]), samples, n_per_prompt=2, progress=False)
    (samples / sample_name(prompts[1], 3)).unlink()  # missing
    (samples / sample_name(prompts[1], 2)).write_bytes(b"not a png")  # unreadable
    vqa = StubVQA()
    summary = score_category("color", samples, prompts, n_per_prompt=2, vqa=vqa, batch_size=3, progress=False)
    assert summary["score"] == pytest.approx(0.45) and summary["images"] == 2
    assert (summary["missing"], summary["unreadable"]) == (1, 1)
    # Named after the folder: a sibling folder, or the protocol's color/results.jsonl, keeps its own.
    assert not (tmp_path / "color" / "results.jsonl").exists()
    rows = [
        json.loads(line) for line in (tmp_path / "color" / "samples-results.jsonl").read_text().splitlines()
    ]
    assert rows[0] == {
        "file": sample_name(prompts[0], 0),
        "prompt": prompts[0],
        "questions": ["a red ball?", "a blue box?"],
        "p_yes": [0.9, 0.5],
        "attribute": 0.45,
        "score": 0.45,
    }
    assert max(vqa.batches) <= 3
    with pytest.raises(ConfigError, match=r"T2I-CompBench color need\(s\) vqa= \(BLIP-VQA"):
        score_category("color", samples, prompts, n_per_prompt=2, progress=False)
    with pytest.raises(FileNotFoundError, match="no T2I-CompBench color samples"):
        score_category("color", tmp_path / "empty", prompts, vqa=vqa, progress=False)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_score_category_refuses_a_batch_size_below_one(tmp_path, batch_size):
    samples = tmp_path / "color" / "samples"
    write_compbench_samples(["a red ball"], colour_generate([]), samples, n_per_prompt=1, progress=False)
    with pytest.raises(
        ConfigError, match=rf"^batch_size={batch_size} is not allowed \(allowed: an integer >= 1\)$"
    ):
        score_category(
            "color", samples, ["a red ball"], n_per_prompt=1, vqa=StubVQA(), batch_size=batch_size,
            progress=False,
        )  # fmt: skip


def test_run_compbench_refuses_batch_size_zero(dataset, tmp_path, monkeypatch):
    """Before generating: a bad scoring batch would surface only after every image was sampled."""
    monkeypatch.setattr(cb, "TransformersYesNoVQA", StubVQA)
    calls = []
    with pytest.raises(ConfigError, match=r"^batch_size=0 is not allowed \(allowed: an integer >= 1\)$"):
        run_compbench(
            colour_generate(calls), dataset, tmp_path / "out", vqa="blip", clip=None, detector=None,
            n_per_prompt=1, categories=["color"], progress=False, batch_size=0,
        )  # fmt: skip
    assert calls == []


@pytest.mark.parametrize(
    ("categories", "given", "message"),
    [
        (None, {"vqa": "v"}, r"T2I-CompBench spatial, complex need\(s\) --detector ID \(a COCO detector"),
        (["non_spatial"], {"vqa": "v"}, r"non_spatial need\(s\) --clip ID \(CLIP ViT-B/32"),
        (["color", "spatial"], {"detector": "d"}, r"color need\(s\) --vqa ID"),
        (["color"], {"vqa": "./no/such/blip"}, r"--vqa './no/such/blip' is a path to nothing"),
    ],
)
def test_run_compbench_refuses_missing_scorers_before_generating(
    dataset, tmp_path, categories, given, message
):
    calls = []
    scorers = {"vqa": None, "clip": None, "detector": None, **given}
    with pytest.raises(ConfigError, match=message):
        run_compbench(
            colour_generate(calls),
            dataset,
            tmp_path / "out",
            categories=categories,
            progress=False,
            **scorers,
        )
    assert calls == [] and not (tmp_path / "out").exists()


def test_run_compbench_generates_without_scorers_and_refuses_another_generation(dataset, tmp_path):
    out, calls = tmp_path / "out", []
    record = {"checkpoint": "step_100", "steps": 25}
    r = run_compbench(
        colour_generate(calls), dataset, out, vqa=None, clip=None, detector=None, n_per_prompt=2,
        categories=["color", "spatial"], progress=False, record=record,
    )  # fmt: skip
    assert (r["generated"], r["skipped"], r["unit"], len(calls)) == (6, 0, "images", 3) and "scores" not in r
    saved = json.loads((out / "color" / "generation.json").read_text())
    assert saved == {
        **record,
        "bench": "t2i-compbench",
        "seed": 42,
        "noise": "seed+k per image",
        "n_per_prompt": 2,
    }
    assert (out / "spatial" / "samples" / "a dog on the left of a cat_000001.png").is_file()
    check_compbench_folder(out, record, n_per_prompt=2, categories=["color", "spatial"])
    with pytest.raises(
        ConfigError, match=r"color holds images made with n_per_prompt=2, not n_per_prompt=10"
    ):
        check_compbench_folder(out, record, categories=["color"])
    with pytest.raises(
        ConfigError, match=r"holds images made with checkpoint='step_100', not checkpoint='step_200'"
    ):
        run_compbench(
            colour_generate(calls), dataset, out, vqa=None, clip=None, detector=None, n_per_prompt=2,
            categories=["spatial"], progress=False, record={**record, "checkpoint": "step_200"},
        )  # fmt: skip
    assert len(calls) == 3


class StubDetector:
    """Boxes in an 8-px image: the dog left of the cat, the hat and the box side by side (same row)."""

    label_map = {0: "dog", 1: "cat", 2: "person"}  # "hat" and "box" are outside its vocabulary

    def __init__(self, model_id="stub-detector", **kwargs):
        self.model_id = model_id

    def __call__(self, image):
        return [
            Detection("dog", 0.8, (0, 0, 3, 8)),
            Detection("cat", 0.8, (5, 0, 8, 8)),
            Detection("hat", 0.8, (0, 0, 4, 8)),
            Detection("box", 0.8, (3, 0, 7, 8)),
        ]


class StubClip:
    def __init__(self, model_id="stub-clip", **kwargs):
        self.model_id, self.texts = model_id, []

    def __call__(self, images, texts):
        self.texts += list(texts)
        return torch.full((len(images),), 0.3)


def test_run_compbench_scores_every_category_into_scores_json(dataset, tmp_path, monkeypatch):
    clips = []

    def make_clip(*args, **kwargs):
        clips.append(StubClip(*args, **kwargs))
        return clips[-1]

    monkeypatch.setattr(cb, "TransformersYesNoVQA", StubVQA)
    monkeypatch.setattr(cb, "ClipSimilarity", make_clip)
    monkeypatch.setattr(fusedit.eval.geneval, "TransformersDetector", StubDetector)
    out = tmp_path / "out"
    r = run_compbench(
        colour_generate([], colour=BLUE), dataset, out, vqa="blip", clip="clip", detector="det",
        n_per_prompt=2, progress=False,
    )  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())
    assert scores == r["scores"]
    # color: 0.2 x 0.5 (blue images), then 0.5 x 0.5; two-phrase prompts elsewhere: 0.25; non_spatial: CLIP 0.3;
    # spatial: 0.25 x (0.8 + 0.8) + 1 / 2; complex: (spatial 0.9 + 0.25) / 2, (CLIP 0.3 + 0.25) / 2, and the
    # third prompt (all three parts: four noun phrases; its pair, mid-air and pyramid, is never detected)
    # scores (0.5 ** 4 + 0 + 0.3) / 3
    expected = {
        "color": (0.1 + 0.25) / 2,
        "shape": 0.25,
        "texture": 0.25,
        "spatial": 0.9,
        "non_spatial": 0.3,
        "complex": (0.575 + 0.275 + (0.5**4 + 0.3) / 3) / 3,
    }
    assert scores["per_category"] == pytest.approx(expected)
    assert scores["overall"] == pytest.approx(sum(expected.values()) / 6)
    assert scores["counts"]["color"] == {"images": 4, "missing": 0, "unreadable": 0}
    # images whose nouns the detector cannot name: hat/box and mid-air/pyramid, 2 images each
    assert scores["counts"]["complex"]["outside_vocabulary"] == 4
    assert scores["counts"]["spatial"] == {
        "images": 2,
        "missing": 0,
        "unreadable": 0,
        "outside_vocabulary": 0,
    }
    # As the other benches record them: the ids as given, with a fingerprint; the results relative to out.
    assert scores["scorers"] == {
        "vqa": {"id": "blip", "fingerprint": "blip"},
        "clip": {"id": "clip", "fingerprint": "clip"},
        "detector": {"id": "det", "fingerprint": "det"},
        "text": "rules",
    }
    assert scores["results_files"] == {c: f"{c}/results.jsonl" for c in CATEGORIES}
    # the CLIP part of complex prompts reads them without their adjectives
    assert "The phone was resting on the charger ." in clips[0].texts
    rows = [json.loads(line) for line in (out / "complex" / "results.jsonl").read_text().splitlines()]
    assert [row["kind"] for row in rows] == ["spatial", "spatial", "action", "action", "all", "all"]
    # scoring again reuses every image
    again = run_compbench(
        colour_generate(calls := [], colour=BLUE), dataset, out, vqa="blip", clip="clip", detector="det",
        n_per_prompt=2, categories=["spatial"], progress=False,
    )  # fmt: skip
    assert calls == [] and again["skipped"] == 2 and again["scores"]["per_category"] == {"spatial": 0.9}
    # ... into its own scores and results files: the full run's stay as they were.
    assert again["scores_file"] == str(out / "scores-spatial.json")
    assert again["scores"]["results_files"] == {"spatial": "spatial/results-spatial.jsonl"}
    assert json.loads((out / "scores.json").read_text()) == scores
    assert (out / "spatial" / "results.jsonl").read_text() == (
        out / "spatial" / "results-spatial.jsonl"
    ).read_text()


def test_a_replaced_category_record_takes_the_scores_it_fed_aside(dataset, tmp_path, monkeypatch, caplog):
    """color's images were deleted and made again with other settings: the top-level scores files holding
    color's score of the deleted images go aside with its record; those without color stay."""
    monkeypatch.setattr(cb, "TransformersYesNoVQA", StubVQA)
    monkeypatch.setattr(fusedit.eval.geneval, "TransformersDetector", StubDetector)
    out, record = tmp_path / "out", {"checkpoint": "step_100", "steps": 2}
    for categories in (["color", "spatial"], ["spatial"]):
        run_compbench(
            colour_generate([]), dataset, out, vqa="blip", clip=None, detector="det", n_per_prompt=2,
            categories=categories, progress=False, record=record,
        )  # fmt: skip
    (out / "scores.json").write_text("{}")  # as a full run's would be
    shutil.rmtree(out / "color" / "samples")
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_compbench(
            colour_generate([]), dataset, out, vqa=None, clip=None, detector=None, n_per_prompt=2,
            categories=["color"], progress=False, record={**record, "steps": 3},
        )  # fmt: skip
    aside = out / "color" / "replaced-1"
    assert sorted(p.name for p in aside.iterdir()) == [
        "generation.json",
        "results-color-spatial.jsonl",
        "scores-color-spatial.json",
        "scores.json",
    ]
    assert sorted(p.name for p in out.glob("scores*")) == ["scores-spatial.json"]
    assert caplog.messages[-1].endswith(f"which are gone: moved it and 3 scores/results file(s) to {aside}")


# --------------------------------------------------------------------------------------------------
# Commands


def test_fusedit_eval_t2i_compbench_writes_the_official_layout(tiny_run, dataset, tmp_path, capsys):
    from fusedit.cli import main

    out = tmp_path / "eval"
    args = ["eval", str(tiny_run), "--bench", "t2i-compbench", "--prompts", str(dataset), "--out", str(out)]
    picked = ["--categories", "color", "spatial", "--per-prompt", "2", "--device", "cpu", "--quiet"]
    assert main([*args, *picked]) == 0
    assert "t2i-compbench: wrote" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "color/samples/a green bench and a blue bowl_000000.png",
        "color/samples/a green bench and a blue bowl_000001.png",
        "color/samples/a red ball and a blue box_000002.png",
        "color/samples/a red ball and a blue box_000003.png",
        "spatial/samples/a dog on the left of a cat_000000.png",
        "spatial/samples/a dog on the left of a cat_000001.png",
    ]
    record = json.loads((out / "color" / "generation.json").read_text())
    assert (record["bench"], record["seed"], record["n_per_prompt"], record["steps"]) == (
        "t2i-compbench",
        42,
        2,
        2,
    )
    # Another generation into the same folder is refused before the model loads.
    assert main([*args, *picked, "--steps", "3"]) == 2
    assert "holds images made with steps=2, not steps=3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bench, flags, message",
    [
        ("geneval", ["--categories", "color"], "--categories does not apply to --bench geneval"),
        ("dpg", ["--per-prompt", "2"], "--per-prompt does not apply to --bench dpg"),
        ("t2i-compbench", ["--per-prompt", "0"], "--per-prompt 0 is not allowed (allowed: 1 or more)"),
        ("t2i-compbench", [], "--bench t2i-compbench needs --prompts PATH"),
    ],
)
def test_fusedit_eval_t2i_compbench_flags_are_checked_first(tiny_run, capsys, bench, flags, message):
    from fusedit.cli import main

    prompts = ["--prompts", "p"] if flags else []  # the last case leaves it out
    assert main(["eval", str(tiny_run), "--bench", bench, *prompts, *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedit: error: ") and err.count("\n") == 1 and message in err, err


def test_download_t2i_compbench_from_the_repository_layout(dataset, tmp_path, monkeypatch):
    from fusedit.eval import benchmarks

    source = tmp_path / "repo" / "main"
    (source / "examples" / "dataset").mkdir(parents=True)
    for name, text in DATA.items():
        (source / "examples" / "dataset" / name).write_text(text)
    (source / "License.txt").write_text("MIT")
    base = (tmp_path / "repo").as_uri()
    monkeypatch.setattr(cb, "DATASET_URL", base + "/{ref}/examples/dataset/{name}")
    monkeypatch.setattr(cb, "LICENSE_URL", base + "/{ref}/License.txt")
    dest = benchmarks.download("t2i-compbench", tmp_path / "data", progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*DATA, "LICENSE", "SOURCE.json"])
    assert load_compbench(dest) == load_compbench(dataset)
    (source / "examples" / "dataset" / "color_val.txt").write_text("")
    with pytest.raises(BenchmarkError):
        benchmarks.download("t2i-compbench", tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "color_val.txt").exists()
