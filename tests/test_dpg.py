"""DPG-Bench: question CSV parsing, the dependency rule, 2x2 grids, folder scoring with a fake VQA model,
and the transformers VQA adapter (plumbing only, tiny random ViLT and BLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.eval.benchmarks import BenchmarkError, load_dpg
from fusedit.eval.dpg import (
    DpgQuestion,
    TransformersVQA,
    apply_dependencies,
    is_yes,
    load_dpg_questions,
    make_grid,
    score_dpg_folder,
    split_grid,
    write_dpg_grids,
)

HEADER = (
    "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
    "question_natural_language\n"
)
# Item 0: a ball (1), its colour (2, depends on 1), its place on a table (3, depends on 1 and 4), a table (4).
CSV = HEADER + (
    '0,"A red ball, on a table.",ball,1,0,entity,whole,entity - whole (ball),Is there a ball?\n'
    '0,"A red ball, on a table.",red,2,1,attribute,color,"attribute - color (ball, red)",Is the ball red?\n'
    '0,"A red ball, on a table.",on,3,"1,4",relation,spatial,"relation - spatial (ball, table, on)",'
    "Is the ball on the table?\n"
    '0,"A red ball, on a table.",table,4,0,entity,whole,entity - whole (table),Is there a table?\n'
    "1,A sunny sky.,sky,1,0,global,,global - (sunny),Is it sunny?\n"
)
RED, BLUE, BLACK, WHITE = (220, 20, 20), (20, 20, 220), (0, 0, 0), (255, 255, 255)


def shared_data() -> Path | None:
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "shared", here.parents[1] / ".." / "shared"):
        if (root / "data").is_dir():
            return (root / "data").resolve()
    return None


@pytest.fixture
def questions_csv(tmp_path):
    path = tmp_path / "dpg_bench.csv"
    path.write_text(CSV)
    return path


def test_load_dpg_questions_parses_dependencies_and_categories(questions_csv):
    questions = load_dpg_questions(questions_csv.parent)  # a folder holding the CSV works too
    assert list(questions) == ["0", "1"]
    ball = questions["0"]
    assert [q.proposition_id for q in ball] == [1, 2, 3, 4]
    assert [q.parents for q in ball] == [(), (1,), (1, 4), ()]
    assert ball[2] == DpgQuestion(
        3, (1, 4), "Is the ball on the table?", "relation - spatial (ball, table, on)"
    )
    assert [q.category for q in ball] == [
        "entity - whole",
        "attribute - color",
        "relation - spatial",
        "entity - whole",
    ]
    assert [q.top_category for q in ball] == ["entity", "attribute", "relation", "entity"]
    assert questions["1"][0].top_category == "global"


def test_load_dpg_questions_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,text\n0,hello\n")
    with pytest.raises(BenchmarkError, match="lacks column.*proposition_id"):
        load_dpg_questions(bad)
    bad.write_text(HEADER + "0,t,k,1,one,entity,whole,entity - whole (x),Is there x?\n")
    with pytest.raises(BenchmarkError, match=r"bad.csv:2: dependency 'one' is not"):
        load_dpg_questions(bad)
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        load_dpg_questions(tmp_path / "nowhere")
    (tmp_path / "empty" / "prompts").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no dpg_bench.csv in .*prompts' or its parent"):
        load_dpg_questions(tmp_path / "empty" / "prompts")


def test_is_yes_and_the_dependency_rule():
    assert is_yes("yes") and is_yes(" Yes. ") and not is_yes("no") and not is_yes("yes, two")
    qs = [
        DpgQuestion(1, (), "a?", "entity - whole (a)"),
        DpgQuestion(2, (1,), "b?", "attribute - color (a)"),
        DpgQuestion(3, (2,), "c?", "attribute - texture (a)"),
        DpgQuestion(4, (), "d?", "entity - whole (d)"),
    ]
    assert apply_dependencies({1: True, 2: True, 3: True, 4: False}, qs) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}
    # a failed parent zeroes its child, and through it the grandchild (in file order)
    assert apply_dependencies({1: False, 2: True, 3: True, 4: True}, qs) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_grids_tile_2x2_and_split_back():
    images = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, BLACK, WHITE)]
    grid = make_grid(images)
    assert grid.size == (16, 16)
    assert [grid.getpixel(p) for p in ((0, 0), (8, 0), (0, 8), (8, 8))] == [RED, BLUE, BLACK, WHITE]
    assert [t.getpixel((3, 3)) for t in split_grid(grid)] == [RED, BLUE, BLACK, WHITE]
    assert make_grid([Image.new("RGB", (10, 6))] * 4, size=5).size == (10, 10)
    with pytest.raises(ValueError, match="expected 4 equal squares"):
        make_grid([Image.new("RGB", (10, 6))] * 4)
    with pytest.raises(ValueError, match="got 15x16"):
        split_grid(Image.new("RGB", (15, 16)))


def colour_generate(calls, colours=(RED, RED, BLUE, BLACK)):
    def generate(prompt, seed, n):
        calls.append((prompt, seed, n))
        return [Image.new("RGB", (12, 12), c) for c in colours[:n]]

    return generate


def test_write_dpg_grids_layout_and_resume(tmp_path):
    calls = []
    prompts = [("0", "A red ball, on a table."), ("7", "A sunny sky.")]
    assert write_dpg_grids(prompts, colour_generate(calls), tmp_path, seed=42, progress=False) == {
        "generated": 2,
        "skipped": 0,
    }
    assert calls == [("A red ball, on a table.", 42, 4), ("A sunny sky.", 42, 4)]
    grid = Image.open(tmp_path / "0.png")
    assert grid.size == (24, 24) and grid.getpixel((18, 18)) == BLACK
    (tmp_path / "7.png").unlink()
    assert write_dpg_grids(prompts, colour_generate(calls), tmp_path, size=16, progress=False) == {
        "generated": 1,
        "skipped": 1,
    }
    assert Image.open(tmp_path / "7.png").size == (32, 32)
    with pytest.raises(ConfigError, match="prompt name '../x' cannot be a file name"):
        write_dpg_grids([("../x", "p")], colour_generate(calls), tmp_path, progress=False)


def test_the_temporary_file_of_a_killed_grid_write_is_swept_at_the_next_start(tmp_path):
    from test_files import killed_mid_write

    calls = []
    prompts = [("0", "A red ball, on a table."), ("7", "A sunny sky.")]
    write_dpg_grids(prompts[:1], colour_generate(calls), tmp_path, progress=False)
    killed_mid_write(tmp_path / "7.png")
    assert len(list(tmp_path.glob(".7.png.*.tmp"))) == 1
    counts = write_dpg_grids(prompts, colour_generate(calls), tmp_path, progress=False)
    assert counts == {"generated": 1, "skipped": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "7.png"]


def test_a_kept_grid_must_have_been_made_for_its_prompts_current_text(tmp_path, caplog):
    calls = []
    prompts = [("0", "A red ball."), ("1", "Un café près de la mer, 東京.")]  # non-Latin-1 text round-trips
    write_dpg_grids(prompts, colour_generate(calls), tmp_path, progress=False)
    assert Image.open(tmp_path / "1.png").info["fusedit:prompt"] == prompts[1][1]
    (tmp_path / "0.png").unlink()
    changed = [prompts[0], ("1", "Three green dogs.")]
    # Refused before any grid is generated (0.png, missing and first in order, is not made either).
    with pytest.raises(
        ConfigError, match=r"1\.png was made for the prompt 'Un café.*', not 'Three green dogs.'"
    ):
        write_dpg_grids(changed, colour_generate(calls), tmp_path, progress=False)
    assert len(calls) == 2 and not (tmp_path / "0.png").exists()
    # A grid that records no prompt (an older fusedit's, or copied in by hand) is not taken on trust, nor
    # is a damaged one: both are made again, counted in one warning each.
    damages = {
        "record no prompt": lambda p: Image.new("RGB", (24, 24)).save(p),
        "cannot be read": lambda p: p.write_bytes(b"\x89PNG garbage"),
    }
    for why, damage in damages.items():
        damage(tmp_path / "0.png")
        caplog.clear()
        with caplog.at_level("WARNING"):
            counts = write_dpg_grids(prompts, colour_generate(calls), tmp_path, progress=False)
        assert counts == {"generated": 1, "skipped": 1} and calls[-1][0] == "A red ball."
        assert Image.open(tmp_path / "0.png").info["fusedit:prompt"] == "A red ball."
        assert [r.getMessage() for r in caplog.records] == [
            f"1 images {why} (e.g. {tmp_path / '0.png'}): they are made again"
        ]


def fake_vqa(image, question):
    """Black tiles show nothing; any other tile shows a ball on a table, red only on red tiles. The answer
    about the table's ball is always yes, so on a black tile only the dependency rule zeroes it."""
    colour = image.getpixel((2, 2))
    return {
        "Is there a ball?": "no" if colour == BLACK else "yes",
        "Is the ball red?": "Yes." if colour == RED else "no",
        "Is the ball on the table?": "yes",
        "Is there a table?": "no" if colour == BLACK else "yes",
        "Is it sunny?": "yes",
    }[question]


class BatchedFakeVQA:
    def __init__(self):
        self.batches = []

    def answer_batch(self, images, questions):
        self.batches.append(len(images))
        return [fake_vqa(i, q) for i, q in zip(images, questions)]


def test_score_dpg_folder_with_a_fake_vqa(tmp_path, questions_csv):
    grids = tmp_path / "grids"
    write_dpg_grids([("0", "A red ball, on a table.")], colour_generate([]), grids, progress=False)
    Image.new("RGB", (8, 8)).save(grids / "notes.png")  # not a DPG item: ignored
    result = score_dpg_folder(grids, questions_csv, fake_vqa, progress=False)
    # tiles: red 4/4, red 4/4, blue 3/4 (not red), black 0 (the "on the table" yes is zeroed by its parents)
    assert result["overall"] == pytest.approx((1 + 1 + 0.75 + 0) / 4)
    assert result["num_prompts"] == 1 and result["missing"] == ["1"]
    # categories average the answers before the dependency rule, over all tiles
    assert result["per_category"] == {"attribute": 0.5, "entity": 0.75, "relation": 1.0}
    assert result["per_subcategory"]["relation - spatial"] == 1.0
    rows = [json.loads(line) for line in Path(result["results_file"]).read_text().splitlines()]
    assert rows[0]["name"] == "0" and rows[0]["tile_scores"] == [1.0, 1.0, 0.75, 0.0]
    assert rows[0]["answers"][0]["2"] == "Yes."
    # Given the prompt names, only their grids are scored: 1.png (another run's prompt) is left out.
    write_dpg_grids([("1", "A sunny sky.")], colour_generate([]), grids, progress=False)
    assert score_dpg_folder(grids, questions_csv, fake_vqa, progress=False)["num_prompts"] == 2
    only = score_dpg_folder(grids, questions_csv, fake_vqa, names=["0"], progress=False)
    assert (only["num_prompts"], only["missing"], only["overall"]) == (1, ["1"], result["overall"])
    (grids / "1.png").unlink()
    batched = BatchedFakeVQA()
    again = score_dpg_folder(
        grids, load_dpg_questions(questions_csv), batched, batch_size=5, tiles=2, progress=False
    )
    assert batched.batches == [5, 3] and again["overall"] == 1.0  # the two red tiles only
    batched.answer_batch = lambda images, questions: ["yes"]
    with pytest.raises(ValueError, match="answer_batch returned 1 answers for 5 questions"):
        score_dpg_folder(grids, questions_csv, batched, batch_size=5, progress=False)
    with pytest.raises(ConfigError, match="tiles=5; allowed: 1, 2, 3 or 4"):
        score_dpg_folder(grids, questions_csv, fake_vqa, tiles=5)
    (grids / "0.png").write_bytes((grids / "0.png").read_bytes()[:60])  # damaged since it was written
    with pytest.raises(
        ValueError, match=r"0\.png: corrupt image \(.*\); delete it and rerun the same `fusedit eval`"
    ):
        score_dpg_folder(grids, questions_csv, fake_vqa, progress=False)


def test_real_dpg_prompts_feed_the_grid_writer(tmp_path):
    data = shared_data()
    if data is None or not (data / "dpg_bench" / "prompts").is_dir():
        pytest.skip("DPG-Bench prompt copy not found at ../shared/data/dpg_bench (see shared/data/README.md)")
    prompts = load_dpg(data / "dpg_bench")
    assert len(prompts) == 1065 and [name for name, _ in prompts[:3]] == ["0", "1", "2"]
    calls = []
    write_dpg_grids(prompts[:2], colour_generate(calls), tmp_path, progress=False)
    assert [c[0] for c in calls] == [p for _, p in prompts[:2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png"]


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "ball", "?", "yes", "no", "red"]


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def save_tiny_vilt(path):
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    config = ViltConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        max_position_embeddings=40,
        max_image_length=-1,
        id2label={0: "yes", 1: "no"},
        label2id={"yes": 0, "no": 1},
    )
    ViltForQuestionAnswering(config).save_pretrained(path)
    image_processor = ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8)
    ViltProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(path)
    return path


def save_tiny_blip(path):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(WORDS),
            max_position_embeddings=40,
            encoder_hidden_size=16,
            bos_token_id=2,
            sep_token_id=3,
            pad_token_id=0,
            **layers,
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=8,
    )
    BlipForQuestionAnswering(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["vilt", "blip"])
def test_transformers_vqa_plumbing(tmp_path, kind):
    torch.manual_seed(0)
    path = (save_tiny_vilt if kind == "vilt" else save_tiny_blip)(tmp_path / kind)
    vqa = TransformersVQA(path, device="cpu", max_new_tokens=3)
    assert vqa.generative == (kind == "blip")
    tiles = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, BLACK)]
    answers = vqa.answer_batch(tiles, ["is there a ball?", "is a ball red?", "is there a ball?"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    if kind == "vilt":
        assert set(answers) <= {"yes", "no"}
    assert vqa(tiles[0], "is there a ball?") == answers[0]


def test_transformers_vqa_rejects_other_models(tmp_path):
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match=r"is a model of model_type 'clip' \(allowed: a VQA model of model_type blip, vilt"
    ):
        TransformersVQA(tmp_path, device="cpu")
