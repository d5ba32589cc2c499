import json

from fusedit.cli import main
from fusedit.config import load_config
from fusedit.models.flops import denoiser_flops, llm_flops
from fusedit.system import build_model


def bench_args(out, *points: str) -> list[str]:
    """`fusedit bench debug` at CPU size: one timed repeat, 8 text tokens, JSON to ``out``."""
    return [
        "bench",
        "debug",
        *points,
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--text-tokens",
        "8",
        "--json",
        str(out),
    ]


def test_bench_on_cpu_writes_one_json_object_per_measurement(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    args = bench_args(out, "--batch", "2", "--steps", "2", "--prompts", "1")
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "sample", "sample"]
    assert [r["text_cache"] for r in rows[1:]] == [True, False]
    train = rows[0]
    assert abs(train["images_per_s"] - 2 / train["step_s"]) < 1e-6
    model = build_model(load_config("debug"), "meta")
    expected = 3 * denoiser_flops(model.denoiser, 64, 8) + llm_flops(model.text.llm, 8)
    assert train["flops_per_image"] == expected
    assert train["mfu"] > 0 and abs(train["tflops"] * 1e12 - expected * train["images_per_s"]) < 1e3
    assert "img/s" in capsys.readouterr().out


def test_bench_sweeps_points_and_records_out_of_memory(tmp_path, monkeypatch, capsys):
    """Training points run first (sampling turns the model into its sampling form), a point that does
    not fit is a row saying so, and sampling sweeps prompts x steps."""
    import torch

    import fusedit.bench

    real = fusedit.bench.bench_train

    def bench_train(s, batch, *args):
        if batch == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(s, batch, *args)

    monkeypatch.setattr(fusedit.bench, "bench_train", bench_train)
    out = tmp_path / "bench.jsonl"
    args = bench_args(out, "--batch", "2", "3", "--steps", "1", "2", "--prompts", "1", "2", "--cached-only")
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r.get("batch"), r.get("error")) for r in rows[:2]] == [
        ("train", 2, None),
        ("train", 3, "out of memory"),
    ]
    assert [(r["prompts"], r["steps"], r["text_cache"]) for r in rows[2:]] == [
        (1, 1, True),
        (1, 2, True),
        (2, 1, True),
        (2, 2, True),
    ]
    assert all(r["fuse_projections"] for r in rows[2:])
    assert "out of memory" in capsys.readouterr().out
