"""DPG-Bench: write 2x2 sample grids and score them by visual question answering, as ELLA's scorer does.

Layout (what ELLA's ``dpg_bench/compute_dpg_bench.py`` reads): one PNG per prompt, ``<out_dir>/<name>.png``
(name = the prompt file's stem = the CSV's ``item_id``), holding 4 square images tiled 2x2 (first row:
images 0, 1; second row: 2, 3).

Scoring, per prompt: every question of the prompt's rows of ``dpg_bench.csv`` is asked of each tile with a
pluggable ``vqa(image, question) -> str``; an answer scores 1 when it is "yes". Then, in file order, a
question with a parent proposition (``dependency``, 0 = none) that scored 0 scores 0 too (so the rule
cascades down a chain). A tile's score is the mean over its questions, a prompt's the mean over its
tiles, and the DPG-Bench score the mean over prompts (ELLA prints it x 100).

Categories (from each row's ``tuple``, e.g. "entity - whole (cabbage)" -> "entity - whole", whose first
part "entity" is the top-level category) average the questions' answers *before* the dependency rule,
as ELLA does; ELLA takes them from the last tile only, here all tiles count. ELLA's loader also skips the
CSV's first data row (an off-by-one); here every row is read.

DPG-Bench uses mPLUG-large (ModelScope), which transformers lacks; ``TransformersVQA`` runs the
transformers VQA models instead (BLIP: ``Salesforce/blip-vqa-capfilt-large``, the closest in kind;
ViLT), so its numbers are comparable with each other, not with published DPG-Bench scores.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusedit.config import ConfigError, model_config
from fusedit.eval.benchmarks import BenchmarkError, dpg_csv_path, name_order, read_utf8
from fusedit.eval.fid import check_batch_size, decoded_image, model_inputs, results_file
from fusedit.files import sweep_temporaries, write_text_atomic
from fusedit.imaging import generated_image, kept_for_prompts, save_png
from fusedit.system import resolve_device

log = logging.getLogger(__name__)

CSV_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
VQA = Callable[[Image.Image, str], str]


@dataclass(frozen=True)
class DpgQuestion:
    """One proposition of a prompt: its id, parent ids (0 dropped), question and category."""

    proposition_id: int
    parents: tuple[int, ...]
    question: str
    proposition: str  # the CSV's "tuple", e.g. "entity - whole (cabbage)"

    @property
    def category(self) -> str:
        """The detailed category, e.g. "entity - whole"."""
        return self.proposition.split("(")[0].strip()

    @property
    def top_category(self) -> str:
        """The top-level category, e.g. "entity"."""
        return self.category.split("-")[0].strip()


def _ints(text: str, where: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise BenchmarkError(
            f"{where}: dependency {text!r} is not a comma-separated list of integers"
        ) from None


def load_dpg_questions(path: str | Path) -> dict[str, list[DpgQuestion]]:
    """The questions of ``dpg_bench.csv`` (a file, or a folder holding it), per item_id, in file order."""
    path = dpg_csv_path(path)
    items: dict[str, dict[int, DpgQuestion]] = {}
    # Read whole first: a file in another encoding is then a one-line error naming it.
    with io.StringIO(read_utf8(path, "DPG-Bench's dpg_bench.csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(
                f"{path} lacks column(s) {', '.join(missing)}; expected DPG-Bench's CSV with "
                f"{', '.join(CSV_COLUMNS)}"
            )
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}:{row_number}"
            try:
                qid = int(row["proposition_id"])
            except (TypeError, ValueError):
                raise BenchmarkError(
                    f"{where}: proposition_id {row['proposition_id']!r} is not an integer"
                ) from None
            parents = tuple(p for p in _ints(row["dependency"], where) if p != 0)
            question = DpgQuestion(qid, parents, row["question_natural_language"], row["tuple"])
            # A repeated id replaces the earlier question in place, as ELLA's per-item dicts do.
            items.setdefault(str(row["item_id"]), {})[qid] = question
    if not items:
        raise BenchmarkError(f"{path} holds no questions")
    out = {}
    for item, questions in items.items():
        unknown = sorted({p for q in questions.values() for p in q.parents if p not in questions})
        if unknown:
            log.warning("DPG item %s: dependencies on unknown propositions %s are ignored", item, unknown)
            questions = {
                k: DpgQuestion(
                    q.proposition_id, tuple(p for p in q.parents if p in questions), q.question, q.proposition
                )
                for k, q in questions.items()
            }
        out[item] = list(questions.values())
    return out


def check_prompt_names(names: Sequence[str], questions: dict[str, list[DpgQuestion]], where: str) -> None:
    """Before anything is generated: a grid is scored only when its prompt file's name is an item id of the
    question file, so a folder of other prompt files (another benchmark's, renamed ones) would be generated
    in full and then scored on nothing. None named so: refused; some: warned about, naming them.
    ``where``: the question file, for the messages."""
    unknown = [n for n in names if n not in questions]
    if len(unknown) == len(names):
        raise BenchmarkError(
            f"none of the {len(names)} prompt files ({', '.join(f'{n}.txt' for n in unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}) is named after an item id of {where} "
            f"(e.g. {next(iter(questions))}.txt); expected DPG-Bench's prompts folder"
        )
    if unknown:
        log.warning(
            "%d of the %d prompt files have no questions in %s, so their grids are made but not scored: %s%s",
            len(unknown),
            len(names),
            where,
            ", ".join(f"{n}.txt" for n in unknown[:5]),
            ", ..." if len(unknown) > 5 else "",
        )


def is_yes(answer: str) -> bool:
    """Whether a VQA answer is "yes" (case, spaces and a final full stop ignored)."""
    return str(answer).strip().lower().rstrip(".!").strip() == "yes"


def apply_dependencies(answers: dict[int, bool], questions: Sequence[DpgQuestion]) -> dict[int, float]:
    """Question scores after the dependency rule: in order, a question with a parent scoring 0 scores 0."""
    scores = {q.proposition_id: float(answers[q.proposition_id]) for q in questions}
    for q in questions:
        if any(scores[p] == 0 for p in q.parents if p in scores):
            scores[q.proposition_id] = 0.0
    return scores


def make_grid(images: Sequence[Image.Image], size: int | None = None) -> Image.Image:
    """Tile 4 square images 2x2 (row-major), each resized to ``size`` x ``size`` when given."""
    if len(images) != 4:
        raise ValueError(f"a DPG-Bench grid takes 4 images, got {len(images)}")
    tiles = [img.convert("RGB") for img in images]
    if size is not None:
        tiles = [
            t.resize((size, size), Image.Resampling.BICUBIC) if t.size != (size, size) else t for t in tiles
        ]
    side = tiles[0].width
    if any(t.size != (side, side) for t in tiles):
        raise ValueError(
            f"grid tiles have sizes {[t.size for t in tiles]}; expected 4 equal squares "
            f"(pass size= to resize)"
        )
    grid = Image.new("RGB", (2 * side, 2 * side))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % 2) * side, (k // 2) * side))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The 4 tiles of a 2x2 grid, in the order ``make_grid`` placed them."""
    width, height = grid.size
    if width != height or width % 2:
        raise ConfigError(f"a DPG-Bench grid is a square of even side; got {width}x{height}")
    r = width // 2
    return [grid.crop(((k % 2) * r, (k // 2) * r, (k % 2 + 1) * r, (k // 2 + 1) * r)) for k in range(4)]


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(
            f"prompt name {name!r} cannot be a file name; use names like DPG-Bench's '0'..'1064'"
        )
    return name


def write_dpg_grids(
    prompts: Sequence[tuple[str, str]],
    generate: Callable[[str, int, int], Sequence[Image.Image]],
    out_dir: str | Path,
    seed: int = 42,
    size: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate 4 images per (name, prompt) and save them as the 2x2 grid ``<out_dir>/<name>.png``;
    returns counts of grids generated and skipped.

    ``generate(prompt, seed, n)`` returns n images (PIL, or uint8 HxWx3 arrays); every prompt gets the
    same ``seed``. ``size`` resizes the tiles (the scorer reads the tile size from the grid). Resumable:
    existing grids are kept (each is written atomically, so an existing one is complete), each checked to
    have been made for its prompt's current text (``imaging.kept_for_prompts``).
    """
    if size is not None and size < 1:
        raise ConfigError(f"size={size!r}; allowed: a positive tile side in pixels, or None")
    out = Path(out_dir)
    sweep_temporaries(out)  # a kill -9 mid-write leaves one; each grid is written whole
    # Every kept grid is checked before the first is generated: a changed prompt is found at once.
    kept = kept_for_prompts([(out / f"{_check_name(n)}.png", p) for n, p in prompts])
    todo = [item for item, keep in zip(prompts, kept) if not keep]
    generated, skipped = 0, len(prompts) - len(todo)
    for name, prompt in tqdm(todo, desc="DPG-Bench grids", unit="prompt", disable=not progress):
        path = out / f"{name}.png"
        images = list(generate(prompt, seed, 4))
        if len(images) != 4:
            raise ValueError(f"generate returned {len(images)} images for prompt {name!r}; expected 4")
        save_png(make_grid([generated_image(img) for img in images], size), path, prompt)
        generated += 1
    return {"generated": generated, "skipped": skipped}


def _ask(vqa, images: list[Image.Image], questions: list[str], batch_size: int) -> list[str]:
    """Answers for (image, question) pairs, batched when the VQA model offers ``answer_batch``."""
    batch = getattr(vqa, "answer_batch", None)
    if batch is None:
        return [str(vqa(img, q)) for img, q in zip(images, questions)]
    answers = []
    for start in range(0, len(images), batch_size):
        asked = questions[start : start + batch_size]
        chunk = list(batch(images[start : start + batch_size], asked))
        if len(chunk) != len(asked):
            raise ValueError(f"answer_batch returned {len(chunk)} answers for {len(asked)} questions")
        answers += [str(a) for a in chunk]
    return answers


# What the scores' numbers are: published DPG-Bench scores (ELLA's printout) are the overall x 100.
SCALE = "fractions in [0, 1]; DPG-Bench publishes the overall x 100"


def score_dpg_folder(
    folder: str | Path,
    questions: dict[str, list[DpgQuestion]] | str | Path,
    vqa: VQA,
    *,
    names: Sequence[str] | None = None,
    out_file: str | Path | None = None,
    tiles: int = 4,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Score the grids ``<folder>/<name>.png`` whose names have questions, of the prompts ``names`` only
    (None: every grid there); writes one JSON line per prompt (``out_file``: tile scores, score, answers)
    and returns the overall score (in [0, 1], ``scale``), the per-category scores and, as ``missing``, the
    question file's items not scored (without a grid, or not among ``names``).

    ``out_file`` defaults to ``<name>-results.jsonl`` beside ``folder`` (``fid.results_beside``): for
    ``OUT/grids``, ``OUT/grids-results.jsonl``, so that a sibling folder scored so keeps its own and the
    per-image results of ``fusedit eval`` (``OUT/results.jsonl``, which its scores.json names) stay.
    Earlier defaults were ``<folder>/dpg_results.jsonl``, among the grids, where ELLA's scorer fails on
    it (a file left there is not moved; ``fusedit eval`` on the folder moves it out,
    ``eval.run.move_legacy_results``), and, on 2026-11-25, ``results.jsonl`` beside the folder, which
    sibling folders shared.

    ``questions`` is ``load_dpg_questions``' result or the CSV's path; ``tiles`` scores only the first k
    tiles of each grid (ELLA's ``--pic-num``, 4 in its published runs).
    """
    if not 1 <= tiles <= 4:
        raise ConfigError(f"tiles={tiles!r}; allowed: 1, 2, 3 or 4")
    check_batch_size(batch_size)
    if not isinstance(questions, dict):
        questions = load_dpg_questions(questions)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DPG-Bench grid folder {str(folder)!r} does not exist")
    out_path = results_file(folder, out_file)
    # Another run's grids in the folder beyond ``names`` (a longer prompt list, no limit) are not scored.
    wanted = questions.keys() if names is None else set(names) & questions.keys()
    grids = sorted((p for p in folder.glob("*.png") if p.stem in wanted), key=lambda p: name_order(p.stem))
    if not grids:
        raise FileNotFoundError(f"no grids named after DPG-Bench item ids (e.g. 0.png) in {str(folder)!r}")
    results, by_category, top = [], {}, {}
    for path in tqdm(grids, desc="DPG-Bench scoring", unit="prompt", disable=not progress):
        qs = questions[path.stem]
        remedy = "delete it and rerun the same `fusedit eval`: it makes the grid again"
        views = split_grid(decoded_image(path, remedy))[:tiles]
        answers = _ask(
            vqa, [v for v in views for _ in qs], [q.question for _ in views for q in qs], batch_size
        )
        tile_scores, tile_answers = [], []
        for t in range(len(views)):
            said = dict(zip((q.proposition_id for q in qs), answers[t * len(qs) : (t + 1) * len(qs)]))
            raw = {k: is_yes(a) for k, a in said.items()}
            scores = apply_dependencies(raw, qs)
            tile_scores.append(sum(scores.values()) / len(scores))
            tile_answers.append({str(k): a for k, a in said.items()})
            for q in qs:
                by_category.setdefault(q.category, []).append(float(raw[q.proposition_id]))
                top.setdefault(q.top_category, []).append(float(raw[q.proposition_id]))
        results.append(
            {
                "name": path.stem,
                "score": sum(tile_scores) / len(tile_scores),
                "tile_scores": tile_scores,
                "answers": tile_answers,
            }
        )
    write_text_atomic(out_path, "".join(json.dumps(r) + "\n" for r in results))
    scored = {r["name"] for r in results}
    return {
        "overall": float(np.mean([r["score"] for r in results])),
        "per_category": {k: float(np.mean(v)) for k, v in sorted(top.items())},
        "per_subcategory": {k: float(np.mean(v)) for k, v in sorted(by_category.items())},
        "num_prompts": len(results),
        "missing": sorted(set(questions) - scored, key=name_order),
        "results_file": str(out_path),
        "scale": SCALE,
    }


VQA_TYPES = ("blip", "vilt")


def vqa_model_type(model_id: str | Path) -> str:
    """The model_type of the VQA model ``model_id`` from its config alone (no weights load), refused in one
    line when it is missing, unreachable or not one ``TransformersVQA`` runs: checked before generating."""
    allowed = f"a VQA model of model_type {', '.join(VQA_TYPES)}, e.g. Salesforce/blip-vqa-capfilt-large"
    return model_config(model_id, f"--vqa {str(model_id)!r}", allowed, kinds=VQA_TYPES).model_type


class TransformersVQA:
    """A transformers VQA model as the scorer's ``vqa``: BLIP (generative, e.g.
    ``Salesforce/blip-vqa-capfilt-large``) or ViLT (answer classification, e.g.
    ``dandelin/vilt-b32-finetuned-vqa``), loaded by hub id or folder."""

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 8,
    ):
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        self.model_id = str(model_id)
        model_type = vqa_model_type(model_id)
        self.device, self.dtype = resolve_device(device), dtype
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(model_id)
        # Cast after loading: the keyword for the load dtype differs across transformers versions.
        self.model = (
            AutoModelForVisualQuestionAnswering.from_pretrained(model_id).to(self.device, dtype).eval()
        )
        self.generative = model_type == "blip"

    @torch.no_grad()
    def answer_batch(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        inputs = self.processor(
            images=[i.convert("RGB") for i in images], text=list(questions), return_tensors="pt", padding=True
        )
        inputs = model_inputs(inputs, self.device, self.dtype)
        if self.generative:
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            return [a.strip() for a in self.processor.batch_decode(ids, skip_special_tokens=True)]
        labels = self.model(**inputs).logits.argmax(-1).tolist()
        return [self.model.config.id2label[i] for i in labels]

    def __call__(self, image: Image.Image, question: str) -> str:
        return self.answer_batch([image], [question])[0]
