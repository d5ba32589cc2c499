"""GenEval: write samples in the official layout and score them with GenEval's rules.

Layout (what GenEval's generation script writes and its evaluation script reads)::

    <out_dir>/<index:05d>/metadata.jsonl        the prompt's metadata line
    <out_dir>/<index:05d>/samples/<k:05d>.png   n_per_prompt images (4), the same seed for every prompt

So a folder written here can also be scored by the official script. The built-in scorer re-implements the
rules of GenEval's ``evaluation/evaluate_images.py`` over plain detections, so the rules are testable with
hand-made ones and the detector and colour classifier are pluggable:

* per class, detections above a confidence threshold (0.3; 0.9 for the ``counting`` task) in decreasing
  confidence (exact ties: the later detection first; upstream's order there follows numpy's unstable
  argsort and so its build), at most 16, optionally thinned by IoU (off by default, as upstream);
* ``include`` clauses must all hold: at least ``count`` objects of the class; with ``color``, that many of
  the ``count`` most confident ones classified as that colour (CLIP zero-shot on the object cropped to its
  box, with the pixels outside its mask set to grey); with ``position``, each of them in that relation to
  every object of the target clause, from box centres with a margin of 0.1 x the summed box sizes;
* any ``exclude`` clause with at least ``count`` detections fails the image (``counting`` asks for exactly
  N by including N and excluding N + 1);
* a task's score is the fraction of its images judged correct; overall is the mean of the task scores.

GenEval scores with Mask2Former (Swin-S, COCO instances) and CLIP ViT-L/14; through transformers the
closest are ``facebook/mask2former-swin-small-coco-instance`` and ``openai/clip-vit-large-patch14``, both
supported by the adapters below (any DETR-style detector also works).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusedit.config import ConfigError, check_whole, model_config
from fusedit.eval.fid import CLIP_ALLOWED, ClipEmbedder, decoded_image, model_inputs, results_file
from fusedit.files import read_json, sweep_temporaries, write_text_atomic
from fusedit.imaging import generated_image, save_png
from fusedit.system import resolve_device

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's 80 object names (COCO's classes in COCO order, spelled as in GenEval's prompts).
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# How detectors' label vocabularies spell some of those classes (COCO's own short names, VOC-style names).
LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "doughnut": "donut",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "ski": "skis",
}
COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
_SAMPLE_NAME = re.compile(r"^\d+\.png$")


def geneval_class(label: str) -> str | None:
    """GenEval's name for a detector label (case, ``_``/``-`` and known aliases normalised), or None when
    the label is not one of GenEval's 80 classes (e.g. a panoptic model's "sky")."""
    name = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    if name in OBJECT_NAMES:
        return name
    return LABEL_ALIASES.get(name) or LABEL_ALIASES.get(name.replace(" ", ""))


@dataclass(eq=False)
class Detection:
    """One detected object: GenEval class name, confidence, box (x1, y1, x2, y2) in pixels, and an
    optional boolean mask of the image's (height, width)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


# (crops of one class's objects, that class name) -> one colour name per crop.
ColorClassifier = Callable[[list[Image.Image], str], list[str]]
Detector = Callable[[Image.Image], list[Detection]]


@dataclass(frozen=True)
class GenEvalRules:
    """The knobs of GenEval's evaluation script, at its defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # IoU above which a less confident box of the same class is dropped; 1 = off
    position_margin: float = 0.1
    background: str = "#999"  # fill for the pixels outside an object's mask before colour classification
    crop: bool = True

    def __post_init__(self):
        for key in ("threshold", "counting_threshold", "max_overlap", "position_margin"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"GenEval rule {key}={value!r} is out of range; allowed: 0 <= {key} <= 1")
        check_whole("GenEval rule max_objects", self.max_objects)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (a box spans x2 - x1 + 1 pixels)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: Sequence[Detection], tag: str, rules: GenEvalRules
) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps for an image of task ``tag``, most confident first."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            by_class.setdefault(det.label, []).append(det)
    kept = {}
    for label, dets in by_class.items():
        # Upstream caps the candidates before the overlap filter, so the cap counts dropped boxes too. Its
        # order is np.argsort(scores)[::-1], whose order of equal confidences depends on numpy's sort (the
        # default argsort is not stable). Here exact ties come out last-detected first (a stable
        # descending sort of the reversed list), the same on every machine; they decide which tied boxes
        # the cap keeps and which are judged for colour and position. Real detectors' float scores
        # rarely tie exactly.
        order = sorted(reversed(dets), key=lambda d: d.score, reverse=True)[: rules.max_objects]
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1.0:
                order = [d for d in order if box_iou(best.box, d.box) < rules.max_overlap]
        kept[label] = chosen
    return kept


def relative_position(a: Detection, b: Detection, margin: float = 0.1) -> set[str]:
    """Where ``a`` is relative to ``b``: a subset of {"left of", "right of", "above", "below"}.

    The centre offset is shrunk on each axis by ``margin`` x (sum of the two boxes' sizes on that axis), so
    overlapping or nearly aligned objects have no relation on that axis; a relation holds when its axis
    carries more than half of the (unshrunk) offset's length. Image y grows downwards.
    """
    box_a, box_b = np.asarray(a.box, dtype=np.float64), np.asarray(b.box, dtype=np.float64)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    sizes = np.abs(box_a[2:] - box_a[:2]) + np.abs(box_b[2:] - box_b[:2])
    revised = np.maximum(np.abs(offset) - margin * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def object_crops(
    image: Image.Image, detections: Sequence[Detection], background: str = "#999", crop: bool = True
) -> list[Image.Image]:
    """What the colour classifier sees of each object: the image with the pixels outside the object's mask
    (when it has one) replaced by ``background``, cropped to its box."""
    image = image.convert("RGB")
    blank = image.copy() if background == "original" else Image.new("RGB", image.size, background)
    crops = []
    for det in detections:
        view = image
        if det.mask is not None:
            mask = np.asarray(det.mask, dtype=bool)
            if mask.shape != (image.height, image.width):
                raise ValueError(
                    f"detection mask has shape {mask.shape}; expected the image's (height, width) "
                    f"{(image.height, image.width)}"
                )
            view = Image.composite(image, blank, Image.fromarray(mask))
        crops.append(view.crop(tuple(det.box)) if crop else view)
    return crops


def check_prompt(
    metadata: dict,
    objects: dict[str, list[Detection]],
    colors_of: Callable[[list[Detection], str], list[str]],
    rules: GenEvalRules = GenEvalRules(),
) -> tuple[bool, str]:
    """Judge one image's kept objects (``select_objects``) against a prompt's metadata.

    ``colors_of(detections, classname)`` names the colour of each detection. Returns (correct, reason),
    where reason lists every failed clause (empty when correct).
    """
    correct = True
    reasons = []
    groups: list[list[Detection] | None] = []  # per include clause: its objects, or None when it failed
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        # Colour and position are judged on the `count` most confident objects only, as upstream.
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            colors = colors_of(found, name)
            if colors.count(clause["color"]) < count:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                reasons.append(f"expected {clause['color']} {name}>={count}, found {seen}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            targets = groups[target] if 0 <= target < len(groups) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj, target_obj in ((o, t) for o in found for t in targets):
                    found_relations = relative_position(obj, target_obj, rules.position_margin)
                    if relation not in found_relations:
                        ok = False
                        seen = " and ".join(sorted(found_relations)) or "no relation to the"
                        reasons.append(f"expected {name} {relation} target, found {seen} target")
                        break
        correct = correct and ok
        groups.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


def evaluate_image(
    image: Image.Image,
    metadata: dict,
    detections: Sequence[Detection],
    color_classifier: ColorClassifier | None,
    rules: GenEvalRules = GenEvalRules(),
) -> dict:
    """One image's verdict: correct, reason, and the kept boxes (``details``: class -> [x1, y1, x2, y2,
    score] rows), as in GenEval's results file."""
    objects = select_objects(detections, metadata["tag"], rules)

    def colors_of(dets: list[Detection], classname: str) -> list[str]:
        if color_classifier is None:
            raise ValueError(f"prompt {metadata['prompt']!r} asks for a colour; pass a color_classifier")
        crops = object_crops(image, dets, rules.background, rules.crop)
        colors = list(color_classifier(crops, classname))
        if len(colors) != len(crops):
            raise ValueError(f"color classifier returned {len(colors)} colours for {len(crops)} crops")
        return colors

    correct, reason = check_prompt(metadata, objects, colors_of, rules)
    details = {k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in objects.items()}
    return {"correct": correct, "reason": reason, "details": details}


# A prompt folder's files are made again by the same `fusedit eval` command once the folder is gone.
_REMAKE = "delete {folder} and rerun the same `fusedit eval`: it makes that prompt's images again"


def _prompt_done(folder: Path, metadata: dict, n: int) -> bool:
    meta_file = folder / "metadata.jsonl"
    if not meta_file.is_file():
        return False
    existing = read_json(meta_file, _REMAKE.format(folder=folder))
    if existing != metadata:
        raise ConfigError(
            f"{folder} holds samples of prompt {existing.get('prompt')!r}, not {metadata['prompt']!r}; "
            f"use a new output folder for a different prompt list"
        )
    return all((folder / "samples" / f"{k:05d}.png").is_file() for k in range(n))


def _extra_images(folder: Path, n: int) -> list[Path]:
    """The PNGs in ``folder``'s samples/ that are not this run's n images (an earlier run's with a larger
    n_per_prompt): GenEval's scorer would score every one of them under the folder's metadata."""
    wanted = {f"{k:05d}.png" for k in range(n)}
    return [p for p in (folder / "samples").glob("*.png") if p.name not in wanted]


def write_geneval_samples(
    metadata: Sequence[dict],
    generate: Callable[[str, int, int], Sequence[Image.Image]],
    out_dir: str | Path,
    n_per_prompt: int = 4,
    seed: int = 42,
    progress: bool = True,
) -> dict:
    """Generate ``n_per_prompt`` images per prompt into GenEval's layout; returns counts of prompts
    generated and skipped.

    ``generate(prompt, seed, n)`` returns n images (PIL, or uint8 HxWx3 arrays). Every prompt gets the
    same ``seed``, as GenEval's script reseeds before each prompt. Resumable: a prompt folder whose
    metadata matches and whose n images exist is skipped; one that holds a different prompt is an error.
    """
    check_whole("n_per_prompt", n_per_prompt)
    out = Path(out_dir)
    sweep_temporaries(out, recursive=True)  # a kill -9 mid-write leaves one; each file is written whole
    generated = skipped = 0
    for index, meta in enumerate(tqdm(metadata, desc="GenEval samples", unit="prompt", disable=not progress)):
        folder = out / f"{index:05d}"
        if _prompt_done(folder, meta, n_per_prompt) and not _extra_images(folder, n_per_prompt):
            skipped += 1
            continue
        images = list(generate(meta["prompt"], seed, n_per_prompt))
        if len(images) != n_per_prompt:
            raise ValueError(
                f"generate returned {len(images)} images for {meta['prompt']!r}; expected {n_per_prompt}"
            )
        # Incomplete until its images are all there: an earlier metadata.jsonl goes first, and images of
        # an earlier run that this one does not make.
        (folder / "metadata.jsonl").unlink(missing_ok=True)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for extra in _extra_images(folder, n_per_prompt):
            extra.unlink()
        for k, image in enumerate(images):
            save_png(generated_image(image), folder / "samples" / f"{k:05d}.png")
        # Last: a prompt folder with its metadata.jsonl is complete, to GenEval's own scorer too (it scores
        # every folder that has one), so a stop mid-prompt never leaves one with only some of its images.
        write_text_atomic(folder / "metadata.jsonl", json.dumps(meta) + "\n")
        generated += 1
    return {"generated": generated, "skipped": skipped}


def _prompt_folders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "metadata.jsonl").is_file()),
        key=lambda p: int(p.name),
    )


def summarize(results: Sequence[dict]) -> dict:
    """Scores from per-image results (dicts with tag, correct and metadata): per task, overall (the mean
    of the task scores, GenEval's headline number) and the image- and prompt-level fractions."""
    if not results:
        raise ValueError("no GenEval results to summarise")
    counts: dict[str, list[int]] = {}
    prompts: dict[str, bool] = {}
    for row in results:
        tally = counts.setdefault(row["tag"], [0, 0])
        tally[0] += bool(row["correct"])
        tally[1] += 1
        prompts[row["metadata"]] = prompts.get(row["metadata"], False) or bool(row["correct"])
    tags = [t for t in TASKS if t in counts] + [t for t in counts if t not in TASKS]
    per_task = {t: counts[t][0] / counts[t][1] for t in tags}
    return {
        "overall": float(np.mean(list(per_task.values()))),
        "per_task": per_task,
        "counts": {t: counts[t] for t in tags},
        "num_images": len(results),
        "num_prompts": len(prompts),
        "correct_images": sum(c for c, _ in counts.values()) / len(results),
        "correct_prompts": sum(prompts.values()) / len(prompts),
        "missing_tasks": [t for t in TASKS if t not in counts],
    }


def score_geneval_folder(
    folder: str | Path,
    detector: Detector,
    color_classifier: ColorClassifier | None,
    *,
    metadata: Sequence[dict] | None = None,
    out_file: str | Path | None = None,
    rules: GenEvalRules = GenEvalRules(),
    progress: bool = True,
) -> dict:
    """Score the ``<index>/samples/<k>.png`` of a GenEval folder: of the prompts ``metadata`` (the folders
    ``write_geneval_samples`` wrote them to, each checked to hold its prompt), or of every prompt folder
    there when None. Writes the per-image results as JSON lines (``out_file``, the fields of GenEval's
    results file) and returns ``summarize`` of them plus the results file's path.

    ``out_file`` defaults to ``<name>-results.jsonl`` beside ``folder`` (``fid.results_beside``): for
    ``OUT/samples``, ``OUT/samples-results.jsonl``, so that a sibling folder scored so keeps its own and
    the per-image results of ``fusedit eval`` (``OUT/results.jsonl``, which its scores.json names) stay.
    Earlier defaults were ``<folder>/results.jsonl``, among the images (a file left there is not moved;
    ``fusedit eval`` on the folder moves it out, ``eval.run.move_legacy_results``), and, on 2026-11-25,
    ``results.jsonl`` beside the folder, which sibling folders shared."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"GenEval sample folder {str(folder)!r} does not exist")
    out_path = results_file(folder, out_file)
    if metadata is None:
        # Upstream reads the file with json.load: one object, whatever the extension says.
        prompts = [
            (d, read_json(d / "metadata.jsonl", _REMAKE.format(folder=d))) for d in _prompt_folders(folder)
        ]
    else:  # another run's prompts in the folder beyond these (a longer list, no limit) are not scored
        prompts = [(folder / f"{i:05d}", meta) for i, meta in enumerate(metadata)]
        # Those whose folder is there; _prompt_done with no image asked for refuses one of another prompt.
        prompts = [(d, meta) for d, meta in prompts if _prompt_done(d, meta, 0)]
    jobs = []
    for prompt_dir, meta in prompts:
        samples = prompt_dir / "samples"
        names = (
            sorted(p.name for p in samples.iterdir() if _SAMPLE_NAME.match(p.name))
            if samples.is_dir()
            else []
        )
        jobs += [(samples / name, meta) for name in names]
    if not jobs:
        raise FileNotFoundError(
            f"no GenEval samples (<index>/samples/<k>.png with metadata.jsonl) in {str(folder)!r}"
        )
    if color_classifier is None and any("color" in c for _, m in jobs for c in m.get("include", [])):
        raise ConfigError(
            "the GenEval prompts ask for colours; pass a color_classifier (e.g. ClipColorClassifier)"
        )
    results = []
    for path, meta in tqdm(jobs, desc="GenEval scoring", unit="image", disable=not progress):
        image = decoded_image(path, _REMAKE.format(folder=path.parent.parent))
        verdict = evaluate_image(image, meta, detector(image), color_classifier, rules)
        results.append(
            {
                "filename": str(path),
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "correct": verdict["correct"],
                "reason": verdict["reason"],
                "metadata": json.dumps(meta),
                "details": json.dumps(verdict["details"]),
            }
        )
    write_text_atomic(out_path, "".join(json.dumps(r) + "\n" for r in results))
    return {**summarize(results), "results_file": str(out_path)}


def check_scoring_models(detector: str | Path | None, clip: str | Path | None) -> None:
    """The GenEval scoring models given, checked from their configs alone (no weights load) before
    anything is generated: a missing folder, an unreachable hub id or another kind of model fails in one
    line at once, not after hours of sampling."""
    if detector:
        detector_config(detector)
    if clip:
        model_config(clip, f"--clip {str(clip)!r}", CLIP_ALLOWED, ("clip",), "a CLIP folder")


_MASK_MODELS = ("mask2former", "maskformer")
_DETECTOR_ALLOWED = "an object detection or segmentation model hub id or folder"


def _geneval_labels(config) -> dict[int, str]:
    """A detector config's label ids that name GenEval classes, with those names."""
    return {
        int(i): name
        for i, label in config.id2label.items()
        if (name := geneval_class(str(label))) is not None
    }


def detector_config(model_id: str | Path):
    """The transformers config of the detector ``model_id``, refused in one line when it is not a model
    transformers reads or predicts none of GenEval's classes."""
    config = model_config(model_id, f"--detector {str(model_id)!r}", _DETECTOR_ALLOWED)
    if not _geneval_labels(config):
        labels = list(config.id2label.values())[:5]
        raise ConfigError(
            f"detector {str(model_id)!r} predicts none of GenEval's 80 COCO classes (labels like {labels}); "
            f"use a COCO detector such as facebook/mask2former-swin-small-coco-instance"
        )
    return config


class TransformersDetector:
    """A transformers object detector as a GenEval ``Detector``: image -> detections of GenEval's classes.

    ``model_id`` is a hub id or local folder. Mask2Former/MaskFormer instance models give masks (boxes are
    the masks' extents, as in mmdetection, which GenEval uses); other models load through
    ``AutoModelForObjectDetection`` (DETR, Deformable/Conditional DETR, RT-DETR, YOLOS, ...) and give boxes.
    Labels outside GenEval's 80 classes are dropped. ``min_score`` drops weak detections early; keep it at
    or below the rules' thresholds.
    """

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        min_score: float = 0.3,
        max_per_image: int = 100,
    ):
        from transformers import (
            AutoImageProcessor,
            AutoModelForObjectDetection,
            AutoModelForUniversalSegmentation,
        )

        self.model_id = str(model_id)
        self.device, self.dtype = resolve_device(device), dtype
        self.min_score, self.max_per_image = min_score, max_per_image
        config = detector_config(model_id)
        self.with_masks = config.model_type in _MASK_MODELS
        loader = AutoModelForUniversalSegmentation if self.with_masks else AutoModelForObjectDetection
        self.processor = AutoImageProcessor.from_pretrained(model_id)
        # Cast after loading: the keyword for the load dtype differs across transformers versions.
        self.model = loader.from_pretrained(model_id).to(self.device, dtype).eval()
        self.label_map = _geneval_labels(config)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> list[Detection]:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        outputs = self.model(**model_inputs(inputs, self.device, self.dtype))
        if self.with_masks:
            return self._from_masks(outputs, inputs, image.height, image.width)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=[(image.height, image.width)]
        )[0]
        detections = []
        for score, label, box in zip(
            result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
        ):
            name = self.label_map.get(int(label))
            if name is not None:
                x1, y1, x2, y2 = box
                clipped = (
                    min(max(x1, 0.0), image.width),
                    min(max(y1, 0.0), image.height),
                    min(max(x2, 0.0), image.width),
                    min(max(y2, 0.0), image.height),
                )
                detections.append(Detection(name, float(score), clipped))
        return sorted(detections, key=lambda d: d.score, reverse=True)

    def _from_masks(self, outputs, inputs, height: int, width: int) -> list[Detection]:
        """Instance post-processing as mmdetection's MaskFormer head does it: the top query-class pairs,
        score = class probability x mean mask probability inside the mask, box = the mask's extent."""
        probs = outputs.class_queries_logits[0].float().softmax(-1)[:, :-1]  # the last class is "no object"
        num_classes = probs.shape[1]
        scores, flat = probs.flatten().topk(min(self.max_per_image, probs.numel()))
        # The mask factor is <= 1, so pairs already below min_score can be dropped before upsampling.
        keep = scores >= self.min_score
        scores, flat = scores[keep], flat[keep]
        if flat.numel() == 0:
            return []
        labels, queries = flat % num_classes, flat // num_classes
        logits = outputs.masks_queries_logits[0, queries].float()[None]  # (1, k, h/4, w/4)
        pixel_values = inputs["pixel_values"]
        logits = torch.nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear")
        if "pixel_mask" in inputs:  # drop the processor's padding before resizing to the image
            valid = inputs["pixel_mask"][0].bool()
            rows, cols = int(valid.any(1).sum()), int(valid.any(0).sum())
            logits = logits[..., :rows, :cols]
        logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear")[0]
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = scores * mask_scores
        detections = []
        for j in range(len(scores)):
            name = self.label_map.get(int(labels[j]))
            if name is None or float(scores[j]) < self.min_score:
                continue
            mask = masks[j].cpu().numpy()
            ys, xs = np.nonzero(mask)
            box = (
                (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                if len(xs)
                else (0.0,) * 4
            )
            detections.append(Detection(name, float(scores[j]), box, mask))
        return sorted(detections, key=lambda d: d.score, reverse=True)


class ClipColorClassifier:
    """GenEval's colour classifier: CLIP zero-shot over ``COLORS``, each colour's text embedding the mean
    of the (normalised) embeddings of three templates ("a photo of a {color} {object}", ...), cached per
    object class. ``model_id``: a CLIP hub id or folder (GenEval uses ViT-L/14:
    ``openai/clip-vit-large-patch14``)."""

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        colors: Sequence[str] = COLORS,
        templates: Sequence[str] = COLOR_TEMPLATES,
        batch_size: int = 16,
    ):
        self.clip = ClipEmbedder(model_id, device=device, dtype=dtype)
        self.colors, self.templates, self.batch_size = tuple(colors), tuple(templates), batch_size
        self._text: dict[str, torch.Tensor] = {}

    def class_embeddings(self, classname: str) -> torch.Tensor:
        """(len(colors), D) unit text embeddings for one object class."""
        if classname not in self._text:
            texts = [t.format(color=c, object=classname) for c in self.colors for t in self.templates]
            emb = self.clip.text_embeds(texts).reshape(len(self.colors), len(self.templates), -1).mean(1)
            self._text[classname] = torch.nn.functional.normalize(emb, dim=-1)
        return self._text[classname]

    def __call__(self, crops: list[Image.Image], classname: str) -> list[str]:
        if not crops:
            return []
        weights = self.class_embeddings(classname)
        out = []
        for start in range(0, len(crops), self.batch_size):
            emb = self.clip.image_embeds(crops[start : start + self.batch_size])
            out += [self.colors[i] for i in (emb @ weights.T).argmax(-1).tolist()]
        return out
