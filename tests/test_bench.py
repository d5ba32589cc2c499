import json

from fusedit.cli import main
from fusedit.config import load_config
from fusedit.models.flops import denoiser_flops, llm_flops
from fusedit.system import build_model


def test_bench_on_cpu_writes_one_json_object_per_measurement(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    args = [
        "bench",
        "debug",
        "--batch",
        "2",
        "--steps",
        "2",
        "--prompts",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--text-tokens",
        "8",
        "--json",
        str(out),
    ]
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
