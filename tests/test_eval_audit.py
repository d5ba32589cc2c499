"""Evaluation orchestration audit: downloads cut short or failed, UniDet's input frame, stale failure grids,
prompt files that are not UTF-8, and a study's final loss over skipped steps."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import torch
import yaml

import fusedit.eval.compbench as cb
import fusedit.eval.shapes_bench as shapes_bench
import fusedit.study.run as study_mod
from conftest import TINY
from fusedit.eval import benchmarks
from fusedit.eval.benchmarks import BenchmarkError, download, load_dpg, load_geneval
from fusedit.eval.compbench import DATASET_FILES, frame_scale
from fusedit.study.file import load_study


class _ShortBodies(http.server.BaseHTTPRequestHandler):
    """Announces 100 bytes more than it sends, then closes: a connection dropped mid-file."""

    body = b"a red ball and a blue box\n"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body) + 100))
        self.end_headers()
        self.wfile.write(self.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def short_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _ShortBodies)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_compbench_file_cut_short_is_refused_not_kept_as_the_dataset(tmp_path, monkeypatch, short_server):
    # A streamed read of a response shorter than its Content-Length ends quietly: without a length check
    # the truncated prompt files parsed as a (smaller) dataset and were kept as a complete copy.
    monkeypatch.setattr(cb, "DATASET_URL", short_server + "/{ref}/{name}")
    monkeypatch.setattr(cb, "LICENSE_URL", short_server + "/{ref}/License.txt")
    with pytest.raises(BenchmarkError) as info:
        download("t2i-compbench", tmp_path / "data", progress=False)
    message = str(info.value)
    assert "\n" not in message and "broke off" in message and short_server in message
    assert not any((tmp_path / "data" / name).exists() for name in DATASET_FILES)


def test_a_geneval_file_cut_short_is_a_one_line_error(tmp_path, monkeypatch, short_server):
    # An unbounded read of the same response raises http.client.IncompleteRead, which escaped as a traceback.
    monkeypatch.setattr(
        benchmarks,
        "GENEVAL_URLS",
        {"evaluation_metadata.jsonl": short_server + "/meta.jsonl", "LICENSE": short_server + "/LICENSE"},
    )
    with pytest.raises(
        BenchmarkError, match=r"downloading GenEval from http://127\.0\.0\.1:\d+/meta\.jsonl broke off"
    ):
        download("geneval", tmp_path / "geneval", progress=False)
    assert not (tmp_path / "geneval" / "evaluation_metadata.jsonl").exists()


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    """An offline `fusedit benchmarks download t2i-compbench --dest bdl/tc` left an empty bdl/tc."""
    import urllib.error
    import urllib.request

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(BenchmarkError, match="this machine looks offline"):
        download("t2i-compbench", tmp_path / "bdl" / "tc", progress=False)
    assert list(tmp_path.iterdir()) == []
    # A folder that was there keeps what it held, and only that.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(BenchmarkError, match="this machine looks offline"):
        download("geneval", tmp_path / "mine", progress=False)
    assert [p.name for p in tmp_path.rglob("*")] == ["mine", "notes.txt"]


def _torchvision_resize(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """The output (width, height) of torchvision's ``Resize(size, max_size=max_size)``
    (``_compute_resized_output_size``): the capped short side is derived from the uncapped new sides."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


@pytest.mark.parametrize("size", [(80, 112), (112, 80), (128, 144), (144, 464), (160, 176), (512, 768)])
def test_frame_scale_resizes_exactly_as_unidets_transform(size):
    width, height = size
    sx, sy = frame_scale(width, height, (479, 480))
    assert (round(width * sx, 6), round(height * sy, 6)) == _torchvision_resize(width, height, 479, 480)


def test_a_rerun_without_failures_drops_the_old_failure_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(
        shapes_bench, "generate", lambda model, prompts, **kw: torch.ones(len(prompts), 3, 16, 16)
    )
    shapes_bench.run_shapes_bench(None, 16, tmp_path, per_category=1, progress=False)
    assert (tmp_path / "failures.png").is_file()  # white images: every prompt fails

    real = shapes_bench.evaluate

    def all_correct(prompts, images):
        scores = real(prompts, images)
        for v in scores["verdicts"]:
            v["correct"] = True
        return scores

    monkeypatch.setattr(shapes_bench, "evaluate", all_correct)
    shapes_bench.run_shapes_bench(None, 16, tmp_path, per_category=1, progress=False)
    # The grid of the earlier model's failures must not stay beside scores that have none.
    assert not (tmp_path / "failures.png").exists()


def test_prompt_files_that_are_not_utf8_name_the_file(tmp_path):
    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(BenchmarkError, match=rf"{geneval} is not UTF-8 text"):
        load_geneval(geneval)
    prompts = tmp_path / "dpg"
    prompts.mkdir()
    (prompts / "0.txt").write_text("a red ball")
    (prompts / "1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(BenchmarkError, match=rf"{prompts / '1.txt'} is not UTF-8 text"):
        load_dpg(prompts)
    from fusedit.eval.dpg import CSV_COLUMNS, load_dpg_questions

    questions = tmp_path / "dpg_bench.csv"
    questions.write_bytes((",".join(CSV_COLUMNS) + "\n").encode() + b"caf\xe9\n")
    with pytest.raises(BenchmarkError, match=rf"{questions} is not UTF-8 text"):
        load_dpg_questions(questions)


def test_a_study_final_loss_leaves_out_skipped_steps_and_cut_lines(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    study = load_study({"designs": {"a": {"preset": str(tmp_path / "tiny.yaml")}}})
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    # 20 steps; the last tenth is steps 19 and 20, and step 20's update was skipped for a NaN loss (as
    # train.max_bad_steps allows), which metrics.jsonl logs. A kill mid-write left a cut line after it.
    lines = [json.dumps({"step": i + 1, "loss": 1.0, "sec": 0.5}) for i in range(18)]
    lines += [
        json.dumps({"step": 19, "loss": 0.25, "sec": 0.5}),
        json.dumps({"step": 20, "loss": float("nan"), "sec": 0.5}),
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')
    scores = {"overall": 0.5, "per_category": {"single": 0.5}, "counts": {}, "num_images": 2}
    result = study_mod._result(study.designs[0], run_dir, "trained", scores)
    assert result["final_loss"] == 0.25 and result["train_seconds"] == 10.0


def _saved_run(folder, **sections):
    """A run folder holding one checkpoint of an untrained tiny model made from ``tiny_config(**sections)``."""
    from conftest import tiny_config
    from fusedit.system import build_model
    from fusedit.train.checkpoint import save_checkpoint

    cfg = tiny_config(sample={"steps": 2, "precision": "fp32"}, **sections)
    model = build_model(cfg)
    save_checkpoint(folder, 0, cfg, model.denoiser, None, None, model.text.llm)
    return folder


def test_the_shapes_bench_of_a_run_never_trained_on_shapes_marks_every_category_untrained(tmp_path, capsys):
    """h-journeyG M7: a run trained on its own data keeps its preset's data.kinds (never read), and its shapes
    bench scores printed with no word that it never saw the shapes world."""
    from fusedit.cli import main
    from fusedit.eval.shapes_bench import trained_kinds as _trained_kinds

    def cache(name, data):  # a latent cache records the data it was made from in its meta.json
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"format": 2, "data": data}))
        return str(tmp_path / name)

    folder = _saved_run(tmp_path / "folder", data={"source": "folder", "root": str(tmp_path / "photos")})
    ckpt = folder / "checkpoints" / "step_00000000"
    assert _trained_kinds(ckpt) == []
    shapes_cache = cache("shapes-latents", {"source": "shapes", "kinds": ["single", "counting"]})
    on_shapes = _saved_run(tmp_path / "a", data={"source": "latents", "latents_dir": shapes_cache})
    assert _trained_kinds(on_shapes / "checkpoints" / "step_00000000") == ["single", "counting"]
    photos_cache = cache("photo-latents", {"source": "folder", "kinds": ["single"]})
    on_photos = _saved_run(tmp_path / "b", data={"source": "latents", "latents_dir": photos_cache})
    assert _trained_kinds(on_photos / "checkpoints" / "step_00000000") == []
    gone = _saved_run(tmp_path / "c", data={"source": "latents", "latents_dir": str(tmp_path / "moved")})
    assert _trained_kinds(gone / "checkpoints" / "step_00000000") is None  # unknown: nothing marked

    assert main(["eval", str(folder), "--per-category", "1", "--steps", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    out = folder / "eval" / "step_00000000-raw" / "shapes"  # saved without an EMA
    scores = json.loads((out / "scores.json").read_text())
    assert scores["untrained"] == list(scores["per_category"])
    assert printed[-1] == (
        f"overall {scores['overall']:.3f} on {scores['num_images']} held-out prompts (every category "
        f"untrained: the run never trained on data.source=shapes, the world scored here); details in {out}"
    )
    # scores.md says what the terminal says (h-review M1), not that the kinds are outside the run's data.kinds.
    assert (out / "scores.md").read_text().split("\n\n")[1:] == [
        "every category untrained: the run never trained on data.source=shapes, the world scored here\n"
    ]
