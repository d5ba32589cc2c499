"""T2I-CompBench (Huang et al., NeurIPS 2023; github.com/Karine-Huang/T2I-CompBench): compositional prompts
in six categories, generated in the official layout and scored with the official rules. LI-DiT reports it
(design-space.md s.4: about 300 validation prompts per category).

Data (MIT): the repository's ``examples/dataset/<category>_val.txt`` (one prompt per line; the text before
a tab) for ``color``, ``shape``, ``texture``, ``spatial``, ``non_spatial``, ``complex``, and for the
complex category ``complex_val_spatial.txt`` / ``complex_val_action.txt`` (which of its prompts hold a
spatial or an action relation). ``load_compbench`` reads that folder (or a clone of the repository).

Layout (what ``GORS_finetune/inference_eval.py`` writes and every official scorer reads)::

    <out_dir>/<category>/samples/<prompt>_<NNNNNN>.png     NNNNNN = prompt index x n_per_prompt + k

10 images per prompt (``n_per_prompt``); image k of every prompt has seed ``seed + k`` (42 + k upstream).
The official scripts can score such a folder too (``--out_dir <out_dir>/<category>``). Generation resumes
per image, and each category folder records what made its images (``generation.json``, as
``eval.run.claim_folder``): a rerun with another model or other settings is refused.

Scoring, per image, as the official scripts do:

* color / shape / texture (``BLIPvqa_eval/BLIP_vqa.py``): the prompt's noun phrases (at most 8), each
  asked as "<phrase>?" (lowercased, ``.!"()*#:;~`` removed) of BLIP-VQA, whose answer is P(yes) /
  (P(yes) + P(no)) of the first answer token; the image scores the product (each factor and the product
  rounded to 4 decimals, as upstream writes them).
* spatial (``UniDet_eval/2D_spatial_eval.py``): the first and last noun; the relation is the first of
  "on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top
  of", "on top of" found in the prompt; for each noun the most confident detection of its class above
  0.5 ("girl", "boy", "man", "woman" are "person"); both found: 0.25 x (confidence 1 + confidence 2) + the
  relation's score / 2, one found: 0.25 x its confidence, then anything below 0.5 is 0. The relation's
  score compares box centres and IoU (``position_score``): left/right/top/bottom 1 when the centres are
  offset mostly along that axis in that direction and the boxes overlap with IoU < 0.1 (else 0.1 / IoU),
  near/next to/on side of 1 when the centres are within 150 px on one axis (else 150 / the larger
  offset). Pixels are those of the image resized to UniDet's input (shorter side 479, longer at most
  480), so the rule does not depend on the sampling resolution. "on top of" has no rule upstream and
  scores 0 (kept: it matters for complex prompts only).
* non_spatial (``CLIPScore_eval/CLIP_similarity.py``): the cosine similarity of the CLIP ViT-B/32 image
  and prompt embeddings (not x 100, not clipped: about 0.3).
* complex (``3_in_1_eval/3_in_1.py``): per image the mean of the attribute (BLIP-VQA) score and, for the
  prompts of ``complex_val_spatial.txt``, the spatial score, for those of ``complex_val_action.txt`` the
  CLIP score of the prompt without its adjectives, for the others both (a mean of three). The spatial part
  takes the nouns nearest before and after "on top of", "on bottom of", "on the left", "on the right",
  "next to", "on side of" or "near", and scores 0 unless exactly two were found.

A category's score is the mean over its images; ``overall`` is the mean over the scored categories (the
"T2I-CompBench avg" of LI-DiT's ablations; the benchmark itself publishes per-category numbers only).

Where fusedit differs from the official scorer (numbers are close to, not identical with, published ones):

* Noun phrases, nouns and adjectives come from spaCy's ``en_core_web_sm`` upstream, which fusedit does not
  depend on. ``RuleText`` approximates them with word lists written for the benchmark's prompt forms: it
  splits the "<phrase> and <phrase>" prompts that make up most of the attribute categories, and picks the
  nouns of "a X <relation> a Y", as a noun chunker would; the long sentences come out approximately (a
  verb may stay in a phrase, a chunk like spaCy's "top" of "on top of" is not asked; not checked against
  spaCy's output). ``text="spacy"`` (``SpacyText``) runs the official algorithms on spaCy's parse when
  spaCy and its model are installed.
* The spatial nouns are matched against the detector's COCO class names (``detector_label``: sofa ->
  couch, television -> tv, phone -> cell phone, ...) rather than UniDet's label names.
* BLIP-VQA runs through transformers (``Salesforce/blip-vqa-capfilt-large`` is upstream's
  ``model_base_vqa_capfilt_large`` checkpoint) at the processor's resolution (384; upstream 480).
* The detector is a transformers one (``eval.geneval.TransformersDetector``: COCO's 80 classes), not
  UniDet's unified label space: prompt nouns outside COCO (frog, lamp, key, balloon, ...) are never found,
  which lowers the spatial and complex scores. ``scores.json`` counts them (``outside_vocabulary``).
* CLIP runs through transformers (``openai/clip-vit-base-patch32``); prompts longer than 77 tokens are
  truncated (upstream's ``clip.tokenize`` would fail on them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusedit.config import ConfigError, check_whole
from fusedit.data.transforms import SkipSample
from fusedit.eval.benchmarks import BenchmarkError, existing_path, read_utf8
from fusedit.eval.dpg import TransformersVQA
from fusedit.eval.fid import (
    ClipEmbedder,
    SkippedImages,
    check_batch_size,
    load_image,
    model_inputs,
    results_file,
    scorer_record,
)
from fusedit.eval.geneval import Detection, geneval_class
from fusedit.files import sweep_temporaries, write_text_atomic
from fusedit.imaging import generated_image, save_png

BENCH = "t2i-compbench"
CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")
N_PER_PROMPT = 10
COMPLEX_GROUP_FILES = {"spatial": "complex_val_spatial.txt", "action": "complex_val_action.txt"}
# Every file of the official dataset folder that the protocol reads, and where the repository keeps it.
DATASET_FILES = tuple(f"{c}_val.txt" for c in CATEGORIES) + tuple(COMPLEX_GROUP_FILES.values())
DATASET_URL = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/{ref}/examples/dataset/{name}"
LICENSE_URL = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/{ref}/License.txt"
REPO_DATASET = Path("examples") / "dataset"

# The scoring models each category needs (run_compbench's keywords = the command line's flags).
SCORERS = {
    "color": ("vqa",),
    "shape": ("vqa",),
    "texture": ("vqa",),
    "spatial": ("detector",),
    "non_spatial": ("clip",),
    "complex": ("vqa", "detector", "clip"),
}
SCORER_HINTS = {
    "vqa": "BLIP-VQA, e.g. Salesforce/blip-vqa-capfilt-large",
    "detector": "a COCO detector, e.g. facebook/mask2former-swin-small-coco-instance",
    "clip": "CLIP ViT-B/32, openai/clip-vit-base-patch32",
}
MAX_PHRASES = 8  # BLIP_vqa.py's --np_num
MAX_NAME_BYTES = 255  # a file name's limit on common file systems


# --------------------------------------------------------------------------------------------------
# Data


def select_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    """``categories`` validated and in the benchmark's order; None = all six."""
    if categories is None:
        return CATEGORIES
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ConfigError(
            f"T2I-CompBench categories {list(categories)!r}; allowed: one or more of {', '.join(CATEGORIES)}"
        )
    return tuple(c for c in CATEGORIES if c in categories)


def dataset_folder(path: str | Path) -> Path:
    """The folder holding the ``*_val.txt`` files: ``path``, or ``path/examples/dataset`` for a clone."""
    path = existing_path(path, "T2I-CompBench dataset folder", BENCH)
    if not path.is_dir():
        raise BenchmarkError(
            f"T2I-CompBench dataset {str(path)!r} is a file; expected the folder of <category>_val.txt files"
        )
    if not (path / DATASET_FILES[0]).is_file() and (path / REPO_DATASET).is_dir():
        return path / REPO_DATASET
    return path


def _read_prompts(path: Path) -> list[str]:
    """The prompts of one file: per line the text before a tab, stripped; blank lines skipped."""
    if not path.is_file():
        raise BenchmarkError(
            f"no {path.name} in {str(path.parent)!r}; expected T2I-CompBench's examples/dataset folder (get "
            f"it with `fusedit benchmarks download {BENCH}`)"
        )
    lines = read_utf8(path, "one prompt per line").splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        prompt = line.split("\t")[0].strip()
        if not prompt:
            continue
        # Prompts become file names (the official layout): a separator would write outside the folder.
        if "/" in prompt or "\\" in prompt or "\0" in prompt:
            raise BenchmarkError(f"{path}:{number}: prompt {prompt[:60]!r} cannot be a file name")
        if len(sample_name(prompt, 0).encode("utf-8")) > MAX_NAME_BYTES:
            raise BenchmarkError(
                f"{path}:{number}: prompt {prompt[:60]!r}... is too long for a file name "
                f"(at most {MAX_NAME_BYTES} bytes with its _NNNNNN.png)"
            )
        prompts.append(prompt)
    if not prompts:
        raise BenchmarkError(f"{path} holds no prompts; expected one T2I-CompBench prompt per line")
    return prompts


def load_compbench(path: str | Path, categories: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The prompts of each chosen category (all six when None), in file order (the order that numbers the
    samples). ``path`` is the folder of ``<category>_val.txt`` files or a clone of the repository."""
    folder = dataset_folder(path)
    return {c: _read_prompts(folder / f"{c}_val.txt") for c in select_categories(categories)}


def complex_key(prompt: str) -> str:
    """How ``3_in_1.py`` matches a complex prompt against the group files: its text before the first
    full stop, lowercased."""
    return prompt.split(".")[0].lower().strip()


def load_complex_groups(path: str | Path) -> dict[str, str]:
    """``complex_key`` -> "spatial" or "action" for the complex prompts listed in ``complex_val_spatial.txt``
    and ``complex_val_action.txt`` (a prompt in both counts as spatial, as upstream checks it first)."""
    folder = dataset_folder(path)
    groups: dict[str, str] = {}
    for kind in ("action", "spatial"):  # spatial last: it wins
        for prompt in _read_prompts(folder / COMPLEX_GROUP_FILES[kind]):
            groups[complex_key(prompt)] = kind
    return groups


def complex_kind(prompt: str, groups: dict[str, str]) -> str:
    """Which parts score a complex prompt: "spatial" (attribute + spatial), "action" (attribute + CLIP)
    or "all" (the three)."""
    return groups.get(complex_key(prompt), "all")


# --------------------------------------------------------------------------------------------------
# Generation


def sample_name(prompt: str, index: int) -> str:
    """The official file name of a sample: ``<prompt>_<index:06d>.png``."""
    return f"{prompt}_{index:06d}.png"


def _runs(ks: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted integers as (start, length)."""
    runs: list[tuple[int, int]] = []
    for k in ks:
        if runs and runs[-1][0] + runs[-1][1] == k:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def write_compbench_samples(
    prompts: Sequence[str],
    generate: Callable[[str, int, int], Sequence[Image.Image]],
    out_dir: str | Path,
    n_per_prompt: int = N_PER_PROMPT,
    seed: int = 42,
    progress: bool = True,
    desc: str = "T2I-CompBench samples",
) -> dict:
    """Generate ``n_per_prompt`` images per prompt as ``<out_dir>/<prompt>_<NNNNNN>.png`` (NNNNNN = prompt
    index x n_per_prompt + k); returns counts of images generated and skipped.

    ``generate(prompt, seed, n)`` returns n images whose image k is the image of seed ``seed + k`` (as
    ``eval.run.ProtocolGenerator`` does), so image k of every prompt has seed ``seed + k``, as the official script
    seeds it. Resumable per image: existing images are kept and only the missing ones are generated (each
    run of consecutive missing images in one call); each is written atomically, so an existing one is
    complete.
    """
    check_whole("n_per_prompt", n_per_prompt)
    out = Path(out_dir)
    sweep_temporaries(out)  # a kill -9 mid-write leaves one; each image is written whole
    generated = skipped = 0
    for p, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
        names = [sample_name(prompt, p * n_per_prompt + k) for k in range(n_per_prompt)]
        missing = [k for k, name in enumerate(names) if not (out / name).is_file()]
        skipped += n_per_prompt - len(missing)
        for start, count in _runs(missing):
            images = list(generate(prompt, seed + start, count))
            if len(images) != count:
                raise ValueError(f"generate returned {len(images)} images for {prompt!r}; expected {count}")
            for k, image in enumerate(images, start=start):
                save_png(generated_image(image), out / names[k])
            generated += count
    return {"generated": generated, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# Text: noun phrases, the nouns of a spatial relation, adjectives

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\u2019:\-]*|[,;.!?()\"]")
_PUNCTUATION = frozenset(',;.!?()"')
DETERMINERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my", "our", "your",
    "some", "many", "several", "each", "every", "another", "one", "two", "three", "four", "five", "no",
    "any", "all", "both",
})  # fmt: skip
PREPOSITIONS = frozenset({
    "with", "on", "in", "of", "at", "by", "near", "over", "under", "above", "below", "behind", "beside",
    "besides", "beneath", "underneath", "between", "into", "onto", "from", "for", "to", "through",
    "across", "against", "along", "around", "inside", "outside", "past", "toward", "towards", "like",
    "without", "among", "amid", "upon", "within", "during", "after", "before", "about", "via",
    "throughout", "off", "out", "up", "down", "away",
})  # fmt: skip
CONJUNCTIONS = frozenset({
    "and", "or", "but", "while", "as", "which", "who", "whom", "whose", "that", "where", "when", "so",
    "then",
})  # fmt: skip
AUXILIARIES = frozenset({
    "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did",
    "can", "could", "will", "would", "shall", "should", "may", "might", "must",
})  # fmt: skip
# Verbs of the benchmark's sentences that would otherwise end a noun phrase ("a white sink" of "A cat
# sits in a white sink"); verbs directly before a determiner, and words in -ed ending a phrase, are
# recognised without a list.
VERBS = frozenset({
    "sit", "sits", "sat", "stand", "stands", "stood", "lies", "lay", "hang", "hangs", "hung", "holds",
    "held", "reads", "wrote", "writes", "sped", "flew", "fell", "shone", "shines", "swam", "ran", "drove",
    "slept", "spun", "lit", "grew", "told", "made", "makes", "woke", "strode", "features", "flash",
    "flashes", "provides", "creates", "looks", "seems", "become", "becomes", "became", "kept", "keeps",
})  # fmt: skip
ADVERBS = frozenset({
    "nearby", "together", "lazily", "gracefully", "seamlessly", "firmly", "effortlessly", "ominously",
    "deliciously", "carefully", "happily", "clumsily", "patiently", "freshly", "low", "empty", "here",
    "there", "again", "also", "very", "too", "just", "even", "not",
})  # fmt: skip
# Adjectives of the benchmark's prompts (colours, shapes, sizes, textures, common descriptions): words
# that can start or continue a noun phrase but are not its noun. Words the prompts also use as nouns
# (glass, leather, diamond, teardrop, crescent, light, ...) are left out.
ADJECTIVES = frozenset({
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
    "grey", "beige", "tan", "silver", "gold", "golden", "whitish", "dark", "bright", "colorful",
    "multicolored", "pale", "round", "square", "oval", "oblong", "rectangular", "triangular", "circular",
    "spherical", "cubic", "cylindrical", "conical", "pyramidal", "pentagonal", "hexagonal", "big", "small",
    "tall", "short", "long", "large", "tiny", "huge", "narrow", "wide", "thick", "thin", "angular",
    "curved", "straight", "flat", "metallic", "wooden", "fluffy", "furry", "fuzzy", "soft", "hard",
    "rough", "smooth", "shiny", "glossy", "matte", "sleek", "spiky", "bumpy", "jagged", "striped",
    "spotted", "checkered", "polished", "rusty", "rusted", "textured", "translucent", "transparent",
    "opaque", "iridescent", "silky", "crisp", "crunchy", "crispy", "sharp", "warm", "cool", "cold", "hot",
    "wet", "dry", "fresh", "old", "new", "clean", "dusty", "dull", "heavy", "gentle", "delicate",
    "intricate", "vibrant", "plush", "cozy", "comfortable", "sweet", "juicy", "ripe", "prickly", "slimy",
    "lumpy", "deep", "tired", "elegant", "plain", "rich", "rocky", "calm", "tender", "sticky", "greasy",
    "murky", "thorny", "fragrant", "sturdy", "stainless", "vintage", "empty",
})  # fmt: skip
# Multi-word prepositions, longest first: consumed whole, so that none of their words starts a phrase.
LOCUTIONS = tuple(
    tuple(s.split())
    for s in (
        "on the top of",
        "on the bottom of",
        "on the left of",
        "on the right of",
        "in the middle of",
        "on the edge of",
        "on top of",
        "on bottom of",
        "on side of",
        "in front of",
        "on the left",
        "on the right",
        "next to",
        "out of",
    )
)
# The relations of spatial prompts, in the order 2D_spatial_eval.py looks for them in the prompt.
LOCALITIES = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
# The prepositions whose neighbouring nouns are a complex prompt's two objects (2D_spatial_eval.py).
COMPLEX_PREPOSITIONS = (
    "on top of",
    "on bottom of",
    "on the left",
    "on the right",
    "next to",
    "on side of",
    "near",
)


def _tokens(prompt: str) -> list[str]:
    return _TOKEN.findall(prompt)


def pre_question(question: str, max_words: int = 50) -> str:
    """A question as BLIP's VQA data loader prepares it: lowercased, ``.!"()*#:;~`` removed, at most
    ``max_words`` words."""
    question = re.sub(r"[.!\"()*#:;~]", "", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


def _render(words: Sequence[str]) -> str:
    return " ".join(words).replace(" ,", ",")


def _verb_ending(word: str) -> bool:
    """A past participle or past tense by its form ("contrasted", "parked"); short words in -ed are
    nouns or adjectives often enough (bed, red, sled, tired) to be left alone."""
    return word.lower().endswith("ed") and len(word) >= 6


def _present_participle(word: str) -> bool:
    """A verb in -ing by its form ("sitting", "standing"); shorter ones are often nouns (ring, king)."""
    return word.lower().endswith("ing") and len(word) >= 7


def _participle(word: str) -> bool:
    low = word.lower()
    return (
        low.endswith(("ed", "ing", "en")) or low in VERBS or low in ADVERBS or low in ("being", "been", "not")
    )


def _content(word: str) -> bool:
    """Whether a word is no function word: a determiner, preposition, conjunction, auxiliary, known verb
    or adverb, or punctuation."""
    low = word.lower()
    return low[:1].isalnum() and not any(
        low in s for s in (DETERMINERS, PREPOSITIONS, CONJUNCTIONS, AUXILIARIES, VERBS, ADVERBS)
    )


def _noun_like(word: str) -> bool:
    """Whether a word can be the noun of a phrase: a content word, no known adjective, no verb form."""
    low = word.lower()
    return _content(low) and low not in ADJECTIVES and not (low.endswith(("ed", "ing")) and len(low) >= 6)


def _locution_at(words: Sequence[str], i: int, phrases=LOCUTIONS) -> int:
    low = [w.lower() for w in words[i : i + 4]]
    for phrase in phrases:
        if tuple(low[: len(phrase)]) == phrase:
            return len(phrase)
    return 0


class RuleText:
    """spaCy's parts of the official scorer approximated by word lists (see the module docstring)."""

    name = "rules"

    def noun_phrases(self, prompt: str) -> list[str]:
        """The prompt's noun phrases in order ("a green bench and a blue bowl" -> ["a green bench", "a blue
        bowl"]): the text split at punctuation, conjunctions, prepositions, auxiliaries and known verbs;
        "and" and commas after an adjective join ("a black and white cat", "a long, narrow kitchen"); a
        determiner starts a new phrase, dropping the word before it (a verb: "holding a ball"); a phrase's
        final word in -ed is dropped (a verb: "the cat jumped over")."""
        words = _tokens(prompt)
        phrases: list[str] = []
        current: list[str] = []

        def flush() -> None:
            while current and (current[-1] in _PUNCTUATION or current[-1].lower() in ("and", "or")):
                current.pop()
            while current and current[-1].lower() in ADVERBS:
                current.pop()
            if len(current) >= 2 and current[-2].lower() not in DETERMINERS and _verb_ending(current[-1]):
                current.pop()
            elif len(current) >= 2 and _noun_like(current[-2]) and _present_participle(current[-1]):
                current.pop()  # "a vase sitting (on a counter)"
            if any(_content(w) for w in current):
                phrases.append(_render(current))
            current.clear()

        def joins(i: int) -> bool:
            # "and"/"," at words[i] joins two adjectives of one phrase rather than two phrases.
            after = words[i + 1].lower() if i + 1 < len(words) else ""
            return (
                bool(current)
                and current[-1].lower() in ADJECTIVES
                and after not in DETERMINERS
                and after not in _PUNCTUATION
                and bool(after)
            )

        i = 0
        while i < len(words):
            word, low = words[i], words[i].lower()
            span = _locution_at(words, i)
            if span:
                flush()
                i += span
                continue
            if word in _PUNCTUATION or low in CONJUNCTIONS:
                if (word == "," or low in ("and", "or")) and joins(i):
                    current.append(word)
                else:
                    flush()
                i += 1
                continue
            if low in PREPOSITIONS or low in VERBS:
                flush()
                i += 1
                continue
            if low in AUXILIARIES:
                flush()
                i += 1
                while i < len(words) and _participle(words[i]):
                    i += 1
                continue
            if low in DETERMINERS and current and current[-1].lower() not in DETERMINERS:
                if current[-1] != ",":
                    current.pop()
                flush()
            current.append(word)
            i += 1
        flush()
        return phrases

    def spatial_objects(self, prompt: str, complex: bool = False) -> tuple[str | None, str | None]:
        """The two nouns of a spatial relation: for a spatial prompt the first and the last noun; for a
        complex one the nouns nearest before and after a preposition of ``COMPLEX_PREPOSITIONS`` (None,
        None unless exactly two were found)."""
        words = [w for w in _tokens(prompt) if w not in _PUNCTUATION]
        if not complex:
            nouns = [w for w in words if _content(w) and w.lower() not in ADJECTIVES]
            return (nouns[0], nouns[-1]) if nouns else (None, None)
        found: list[str] = []
        phrases = tuple(tuple(p.split()) for p in COMPLEX_PREPOSITIONS)
        for i in range(len(words)):
            span = _locution_at(words, i, phrases)
            if not span:
                continue
            before = next((w for w in reversed(words[:i]) if _noun_like(w)), None)
            after = next((w for w in words[i + span :] if _noun_like(w)), None)
            found += [w for w in (before, after) if w is not None]
        return (found[0], found[1]) if len(found) == 2 else (None, None)

    def without_adjectives(self, prompt: str) -> str:
        """The prompt without its adjectives, its words joined by spaces (as the official scorer joins
        spaCy's tokens for the CLIP part of complex prompts)."""
        return " ".join(w for w in _tokens(prompt) if w.lower() not in ADJECTIVES)


class SpacyText:
    """The official text processing through spaCy: ``noun_chunks`` for the VQA questions, part-of-speech
    tags for the spatial nouns and the adjectives. ``nlp`` is a loaded spaCy pipeline (or anything that
    makes documents of tokens with ``text`` and ``pos_`` and with ``noun_chunks``)."""

    name = "spacy"

    def __init__(self, nlp):
        self.nlp = nlp

    @classmethod
    def load(cls, model: str = "en_core_web_sm") -> SpacyText:
        try:
            import spacy
        except ImportError:
            raise ConfigError(
                "text='spacy' needs spaCy (pip install spacy && python -m spacy download en_core_web_sm); "
                "or use the built-in rules (text='rules')"
            ) from None
        try:
            return cls(spacy.load(model))
        except OSError:
            raise ConfigError(
                f"spaCy has no model {model!r}; install it with `python -m spacy download {model}`"
            ) from None

    def noun_phrases(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(prompt).noun_chunks]

    def spatial_objects(self, prompt: str, complex: bool = False) -> tuple[str | None, str | None]:
        tokens = [(t.text, t.pos_) for t in self.nlp(prompt)]
        if not complex:
            nouns = [text for text, pos in tokens if pos == "NOUN"]
            return (nouns[0], nouns[-1]) if nouns else (None, None)
        found: list[str] = []
        for i in range(len(tokens)):
            span = next(
                (k for k in (3, 2, 1) if " ".join(t for t, _ in tokens[i : i + k]) in COMPLEX_PREPOSITIONS), 0
            )
            if not span:
                continue
            before = next((t for t, pos in reversed(tokens[:i]) if pos in ("NOUN", "PROPN")), None)
            if before is not None:
                found.append(before)
            after = next((t for t, pos in tokens[i + span :] if pos == "NOUN"), None)
            if after is None:  # no noun after it: the first proper noun not followed by another one
                rest = tokens[i + span :]
                after = next(
                    (
                        t
                        for j, (t, pos) in enumerate(rest[:-1])
                        if pos == "PROPN" and rest[j + 1][1] != "PROPN"
                    ),
                    None,
                )
            if after is not None:
                found.append(after)
        return (found[0], found[1]) if len(found) == 2 else (None, None)

    def without_adjectives(self, prompt: str) -> str:
        return " ".join(t.text for t in self.nlp(prompt) if t.pos_ != "ADJ")


TextRules = RuleText | SpacyText
TEXTS = ("rules", "spacy")


def text_rules(kind: str = "rules") -> TextRules:
    """The text processing by name: "rules" (``RuleText``, built in) or "spacy" (``SpacyText``)."""
    if kind == "rules":
        return RuleText()
    if kind == "spacy":
        return SpacyText.load()
    raise ConfigError(f"T2I-CompBench text processing {kind!r}; allowed: {', '.join(TEXTS)}")


# --------------------------------------------------------------------------------------------------
# Rules


def attribute_questions(prompt: str, text: TextRules, max_phrases: int = MAX_PHRASES) -> list[str]:
    """The BLIP-VQA questions of an attribute-binding prompt: "<phrase>?" for its first ``max_phrases``
    noun phrases, prepared as BLIP's loader prepares them."""
    return [pre_question(f"{phrase}?") for phrase in text.noun_phrases(prompt)[:max_phrases]]


def attribute_score(p_yes: Sequence[float]) -> float:
    """The product of the answers' P(yes), each and the product rounded to 4 decimals (upstream writes
    them so); 1 for no question."""
    return round(math.prod(round(float(p), 4) for p in p_yes), 4)


@dataclass(frozen=True)
class SpatialRules:
    """The knobs of ``2D_spatial_eval.py``. ``frame``: the (shorter, longest longer) side of the image as
    UniDet sees it, the pixels the distances are measured in; None measures in the image's own pixels."""

    min_score: float = 0.5
    iou_threshold: float = 0.1
    distance_threshold: float = 150.0
    frame: tuple[int, int] | None = (479, 480)

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0 or not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(
                f"spatial rules min_score={self.min_score!r}, iou_threshold={self.iou_threshold!r}; allowed: "
                "0 <= min_score <= 1, 0 < iou_threshold <= 1"
            )
        if self.distance_threshold <= 0:
            raise ConfigError(f"spatial rule distance_threshold={self.distance_threshold!r}; allowed: > 0")


def locality_of(prompt: str) -> str | None:
    """The spatial relation of a prompt: the first of ``LOCALITIES`` it contains (as text), or None."""
    return next((word for word in LOCALITIES if word in prompt), None)


def position_score(
    locality: str | None,
    box1: Sequence[float],
    box2: Sequence[float],
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
) -> float:
    """How well ``box1`` (x1, y1, x2, y2; the subject) stands in ``locality`` to ``box2``, in [0, 1]:
    ``determine_position`` of the official scorer (image y grows downwards)."""
    a, b = [float(v) for v in box1], [float(v) for v in box2]
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union if union > 0 else 0.0
    if locality in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    along = {
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
    }
    if not along.get(locality, False):  # "on top of" and no relation have no rule: 0
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


PERSON_WORDS = ("girl", "boy", "man", "woman")
# COCO's names for prompt nouns that geneval_class does not already map (sofa -> couch, television -> tv).
NOUN_LABELS = {"phone": "cell phone", "table": "dining table"}


def detector_label(noun: str) -> str:
    """The detection label a prompt noun is matched against: "person" for girl/boy/man/woman (upstream),
    else the noun's COCO class name when it has one (``geneval_class``, ``NOUN_LABELS``), else the noun."""
    low = noun.lower()
    if low in PERSON_WORDS:
        return "person"
    low = NOUN_LABELS.get(low, low)
    return geneval_class(low) or low


def frame_scale(width: int, height: int, frame: tuple[int, int] | None) -> tuple[float, float]:
    """(x, y) factors from an image's pixels to those of the image resized as torchvision's
    ``Resize(size=frame[0], max_size=frame[1])`` resizes it (UniDet's input)."""
    if frame is None:
        return 1.0, 1.0
    short, long = min(width, height), max(width, height)
    new_short, new_long = frame[0], int(frame[0] * long / short)
    if new_long > frame[1]:
        # From the truncated uncapped sides, as torchvision computes it (frame[1] x short / long is at times
        # 1 px off).
        new_short, new_long = int(frame[1] * new_short / new_long), frame[1]
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_w / width, new_h / height


def spatial_score(
    prompt: str,
    detections: Sequence[Detection],
    image_size: tuple[int, int],
    *,
    complex: bool = False,
    text: TextRules | None = None,
    rules: SpatialRules = SpatialRules(),
) -> dict:
    """One image's spatial score (see the module docstring) and how it came about: the nouns, their
    labels, the relation, the position score and the detections used. ``image_size`` is (width, height);
    ``complex`` takes the nouns as the complex category does."""
    text = text or RuleText()
    locality = locality_of(prompt)
    nouns = text.spatial_objects(prompt, complex=complex)
    labels = [detector_label(n) if n else None for n in nouns]
    first: dict[str, Detection] = {}
    for det in sorted(detections, key=lambda d: d.score, reverse=True):
        if det.score > rules.min_score:
            first.setdefault(det.label, det)
    found = [first.get(label) if label else None for label in labels]
    sx, sy = frame_scale(*image_size, rules.frame)
    position = None
    if found[0] is not None and found[1] is not None:
        boxes = [(d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy) for d in found]
        position = position_score(locality, *boxes, rules.iou_threshold, rules.distance_threshold)
        score = 0.25 * found[0].score + 0.25 * found[1].score + position / 2
    elif found[0] is not None or found[1] is not None:
        score = 0.25 * next(d for d in found if d is not None).score
    else:
        score = 0.0
    return {
        "score": score if score >= 0.5 else 0.0,
        "nouns": list(nouns),
        "labels": labels,
        "locality": locality,
        "position": position,
        "detections": [None if d is None else [*map(float, d.box), float(d.score)] for d in found],
    }


def complex_score(kind: str, attribute: float, spatial: float | None, action: float | None) -> float:
    """``3_in_1.py``'s combination for one image of a prompt of ``kind`` ("spatial", "action", "all")."""
    if kind == "spatial":
        return (spatial + attribute) * 0.5
    if kind == "action":
        return (action + attribute) * 0.5
    return (attribute + spatial + action) / 3


# --------------------------------------------------------------------------------------------------
# Scoring models


class TransformersYesNoVQA(TransformersVQA):
    """A transformers VQA model that answers with P(yes) / (P(yes) + P(no)), as upstream's BLIP
    ``vqa_prob``: BLIP (the decoder's first answer token after its start token, the question's first
    token replaced by "[ENC]" when the tokenizer has it, as BLIP's own code does) or ViLT (its "yes" and
    "no" answer logits). ``Salesforce/blip-vqa-capfilt-large`` is T2I-CompBench's checkpoint."""

    def __init__(self, model_id: str | Path, *, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(model_id, device=device, dtype=dtype)
        if self.generative:
            tokenizer = self.processor.tokenizer
            ids = [tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no")]
            if tokenizer.unk_token_id in ids or None in ids:
                raise ConfigError(f"VQA model {self.model_id!r}: its tokenizer has no 'yes' and 'no' tokens")
            enc = tokenizer.convert_tokens_to_ids("[ENC]")
            self.enc_token_id = None if enc in (None, tokenizer.unk_token_id) else int(enc)
        else:
            label2id = {str(k).lower(): int(v) for k, v in self.model.config.label2id.items()}
            if "yes" not in label2id or "no" not in label2id:
                raise ConfigError(f"VQA model {self.model_id!r} has no 'yes' and 'no' answers")
            ids = [label2id["yes"], label2id["no"]]
            self.enc_token_id = None
        self.yes_no = ids

    @torch.no_grad()
    def yes_probabilities(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[float]:
        inputs = self.processor(
            images=[i.convert("RGB") for i in images], text=list(questions), return_tensors="pt", padding=True
        )
        inputs = model_inputs(inputs, self.device, self.dtype)
        logits = self._first_answer_logits(inputs) if self.generative else self.model(**inputs).logits
        two = logits[:, self.yes_no].float().softmax(-1)
        return two[:, 0].cpu().tolist()

    def _first_answer_logits(self, inputs: dict) -> torch.Tensor:
        model = self.model
        input_ids = inputs["input_ids"].clone()
        if self.enc_token_id is not None:
            input_ids[:, 0] = self.enc_token_id
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"])[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question = model.text_encoder(
            input_ids=input_ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )[0]
        start = torch.full((len(input_ids), 1), model.decoder_start_token_id, device=input_ids.device)
        out = model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=mask, use_cache=False
        )
        return out.logits[:, 0]


class ClipSimilarity:
    """The CLIP cosine similarity of (image, text) pairs, unscaled and unclipped, as T2I-CompBench's CLIP
    score (upstream: ViT-B/32, ``openai/clip-vit-base-patch32``)."""

    def __init__(self, model_id: str | Path, *, device=None, dtype: torch.dtype = torch.float32):
        self.clip = ClipEmbedder(model_id, device=device, dtype=dtype)
        self.model_id = self.clip.model_id

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; expected one text per image")
        return (self.clip.image_embeds(images) * self.clip.text_embeds(texts)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Scoring a folder


def missing_scorers(categories: Sequence[str], given: dict[str, object]) -> dict[str, list[str]]:
    """The scoring models (``SCORERS`` keys) that ``categories`` need and ``given`` lacks, each with the
    categories that need it."""
    missing: dict[str, list[str]] = {}
    for category in categories:
        for scorer in SCORERS[category]:
            if not given.get(scorer):
                missing.setdefault(scorer, []).append(category)
    return missing


def check_scorers(categories: Sequence[str], given: dict[str, object], flags: bool) -> None:
    """Refuse scoring ``categories`` without a model they need; ``flags`` names it as the command line's."""
    missing = missing_scorers(categories, given)
    if missing:
        scorer, needing = next(iter(missing.items()))
        name = f"--{scorer} ID" if flags else f"{scorer}="
        raise ConfigError(
            f"T2I-CompBench {', '.join(needing)} need(s) {name} ({SCORER_HINTS[scorer]}); add it, or choose "
            f"categories without it"
        )


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _yes_probabilities(vqa, images: list, questions: list[str], batch_size: int) -> list[float]:
    out: list[float] = []
    for batch, asked in zip(_chunks(images, batch_size), _chunks(questions, batch_size)):
        answers = list(vqa.yes_probabilities(batch, asked))
        if len(answers) != len(asked):
            raise ValueError(f"yes_probabilities returned {len(answers)} answers for {len(asked)} questions")
        out += [float(a) for a in answers]
    return out


def _vocabulary(detector) -> set[str] | None:
    label_map = getattr(detector, "label_map", None)
    return set(label_map.values()) if isinstance(label_map, dict) else None


# The row field that is the score of a category (the attribute categories' is "attribute"; complex
# combines them, complex_score).
CATEGORY_SCORE = {"non_spatial": "clip", "spatial": "spatial"}


def _ask_attributes(loaded: list, rows: list[dict], vqa, text: TextRules, batch_size: int) -> None:
    """BLIP-VQA's answers to each image's noun-phrase questions, and their product, into its row."""
    asked = [attribute_questions(prompt, text) for _, prompt, _ in loaded]
    p_yes = _yes_probabilities(
        vqa,
        [image for (_, _, image), qs in zip(loaded, asked) for _ in qs],
        [q for qs in asked for q in qs],
        batch_size,
    )
    for row, qs in zip(rows, asked):
        answers, p_yes = p_yes[: len(qs)], p_yes[len(qs) :]
        row["questions"], row["p_yes"] = qs, answers
        row["attribute"] = attribute_score(answers)


def _clip_cosines(
    loaded: list, rows: list[dict], kinds: list[str], category: str, clip, text: TextRules
) -> None:
    """The CLIP cosine of the images whose kind is scored by CLIP (non-spatial, and complex prompts of the
    action or all group, against the prompt without adjectives), into their rows."""
    picked = [i for i, kind in enumerate(kinds) if kind in ("non_spatial", "action", "all")]
    if not picked:
        return
    texts = [
        loaded[i][1] if category == "non_spatial" else text.without_adjectives(loaded[i][1]) for i in picked
    ]
    cosines = clip([loaded[i][2] for i in picked], texts)
    for i, t, c in zip(picked, texts, torch.as_tensor(cosines).tolist()):
        rows[i]["clip_text"], rows[i]["clip"] = t, float(c)


def _spatial_scores(
    loaded: list,
    rows: list[dict],
    kinds: list[str],
    category: str,
    detector,
    text: TextRules,
    rules: SpatialRules,
    vocabulary: set[str] | None,
) -> int:
    """The spatial score of the images whose kind has one, into their rows; returns how many named an
    object the detector cannot find (outside its vocabulary)."""
    outside = 0
    for i, kind in enumerate(kinds):
        if kind not in ("spatial", "all"):
            continue
        _, prompt, image = loaded[i]
        result = spatial_score(
            prompt, detector(image), image.size, complex=category == "complex", text=text, rules=rules
        )
        if vocabulary is not None and any(
            label is not None and label not in vocabulary for label in result["labels"]
        ):
            result["outside_vocabulary"] = True
            outside += 1
        rows[i]["spatial"] = result["score"]
        rows[i]["spatial_details"] = result
    return outside


def score_category(
    category: str,
    samples: str | Path,
    prompts: Sequence[str],
    *,
    n_per_prompt: int = N_PER_PROMPT,
    vqa=None,
    clip=None,
    detector=None,
    complex_groups: dict[str, str] | None = None,
    text: TextRules | None = None,
    rules: SpatialRules = SpatialRules(),
    batch_size: int = 32,
    out_file: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Score the images ``<samples>/<prompt>_<NNNNNN>.png`` of one category (``write_compbench_samples``'
    layout); writes one JSON line per image (``out_file``, default ``fid.results_beside(samples)``, e.g.
    ``color/samples-results.jsonl``: file, prompt, score and what made it) and returns the mean score with
    the counts of images scored, missing and unreadable (skipped with a warning, as training skips them).

    ``vqa`` has ``yes_probabilities(images, questions)``, ``clip(images, texts)`` gives cosine
    similarities, ``detector(image)`` gives ``Detection``s; ``complex_groups`` is ``load_complex_groups``'
    result (the complex category needs it)."""
    if category not in CATEGORIES:
        raise ConfigError(f"T2I-CompBench category {category!r}; allowed: {', '.join(CATEGORIES)}")
    check_batch_size(batch_size)  # a negative one would ask no question: each attribute score 1
    check_scorers([category], {"vqa": vqa, "clip": clip, "detector": detector}, flags=False)
    if category == "complex" and complex_groups is None:
        raise ConfigError("the complex category needs complex_groups (load_complex_groups of the dataset)")
    text = text or RuleText()
    samples = Path(samples)
    # Named after the folder (``<category>/samples-results.jsonl``), as GenEval's and DPG-Bench's are: sibling
    # folders keep their own, and a protocol run's ``<category>/results.jsonl`` (score_compbench) is left alone.
    out_path = results_file(samples, out_file)
    jobs = [
        (samples / sample_name(prompt, p * n_per_prompt + k), prompt)
        for p, prompt in enumerate(prompts)
        for k in range(n_per_prompt)
    ]
    present = [(path, prompt) for path, prompt in jobs if path.is_file()]
    if not present:
        raise FileNotFoundError(
            f"no T2I-CompBench {category} samples (<prompt>_<NNNNNN>.png) in {str(samples)!r}"
        )
    vocabulary = _vocabulary(detector)
    rows: list[dict] = []
    skipped, outside = SkippedImages(f"{category} images"), 0
    chunk = max(1, batch_size // MAX_PHRASES) if vqa is not None else batch_size
    with tqdm(
        total=len(present), desc=f"T2I-CompBench {category}", unit="image", disable=not progress
    ) as bar:
        for part in _chunks(present, chunk):
            loaded = []
            for path, prompt in part:
                try:
                    loaded.append((path, prompt, load_image(path)))
                except SkipSample as e:
                    skipped.add(path, e)
            part_rows = [{"file": path.name, "prompt": prompt} for path, prompt, _ in loaded]
            kinds = [
                complex_kind(prompt, complex_groups) if category == "complex" else category
                for _, prompt, _ in loaded
            ]
            if category in ATTRIBUTE_CATEGORIES or category == "complex":
                _ask_attributes(loaded, part_rows, vqa, text, batch_size)
            _clip_cosines(loaded, part_rows, kinds, category, clip, text)
            outside += _spatial_scores(loaded, part_rows, kinds, category, detector, text, rules, vocabulary)
            for row, kind in zip(part_rows, kinds):
                if category == "complex":
                    row["kind"] = kind
                    row["score"] = complex_score(kind, row["attribute"], row.get("spatial"), row.get("clip"))
                else:
                    row["score"] = row[CATEGORY_SCORE.get(category, "attribute")]
            rows += part_rows
            bar.update(len(part))
    skipped.warn(len(present))
    if not rows:
        raise ConfigError(
            f"none of the {len(present)} {category} images in {str(samples)!r} could be read (e.g. "
            f"{skipped.example})"
        )
    write_text_atomic(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "score": float(np.mean([r["score"] for r in rows])),
        "images": len(rows),
        "missing": len(jobs) - len(present),
        "unreadable": skipped.count,
        "results_file": str(out_path),
    }
    if category in ("spatial", "complex") and vocabulary is not None:
        summary["outside_vocabulary"] = outside
    return summary


def score_compbench(
    out_dir: str | Path,
    prompts: dict[str, list[str]],
    *,
    n_per_prompt: int = N_PER_PROMPT,
    vqa=None,
    clip=None,
    detector=None,
    complex_groups: dict[str, str] | None = None,
    text: TextRules | None = None,
    rules: SpatialRules = SpatialRules(),
    batch_size: int = 32,
    progress: bool = True,
    results_name: str = "results.jsonl",
) -> dict:
    """Score every category of ``prompts`` (``load_compbench``'s result) under ``<out_dir>/<category>/``,
    each image's verdict into ``<out_dir>/<category>/<results_name>``; returns what ``run_compbench``
    writes to its scores file: ``overall`` (the mean of the category scores), ``per_category``,
    per-category ``counts`` and results files, and the scoring setup: ``scorers``, each model given as
    ``fid.scorer_record`` of its ``model_id`` (the id it was built from; else its class name) and the
    noun-phrase rules' name (``text``)."""
    text = text or RuleText()
    check_scorers(list(prompts), {"vqa": vqa, "clip": clip, "detector": detector}, flags=False)
    per_category, counts, files = {}, {}, {}
    for category, category_prompts in prompts.items():
        summary = score_category(
            category,
            Path(out_dir) / category / "samples",
            category_prompts,
            n_per_prompt=n_per_prompt,
            vqa=vqa,
            clip=clip,
            detector=detector,
            complex_groups=complex_groups,
            text=text,
            rules=rules,
            batch_size=batch_size,
            progress=progress,
            out_file=Path(out_dir) / category / results_name,
        )
        per_category[category] = summary.pop("score")
        files[category] = summary.pop("results_file")
        counts[category] = summary

    return {
        "overall": float(np.mean(list(per_category.values()))),
        "per_category": per_category,
        "counts": counts,
        "n_per_prompt": n_per_prompt,
        "scorers": {
            **{
                name: scorer_record(getattr(model, "model_id", type(model).__name__), model)
                for name, model in (("vqa", vqa), ("clip", clip), ("detector", detector))
                if model is not None
            },
            "text": text.name,
        },
        "results_files": files,
    }


# --------------------------------------------------------------------------------------------------
# The protocol


def protocol_images(out_dir: str | Path, category: str) -> Path:
    """Where the protocol writes a category's images: ``<out_dir>/<category>/samples``."""
    return Path(out_dir) / category / "samples"
