import json
import subprocess
import sys

from conftest import TINY
from fusedit.cli import main


def test_describe_and_config_and_presets(capsys):
    assert main(["describe", "fusedit-gemma2b"]) == 0
    out = capsys.readouterr().out
    assert "trainable (DiT): 2448.4M" in out and "frozen (LLM, incl. embeddings): 2506.2M" in out
    assert main(["config", "debug", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "debug" in capsys.readouterr().out.split()


def test_bad_config_exits_2_with_one_line(capsys):
    assert main(["config", "debug", "model.pos_embed=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: model.pos_embed='nope' is not allowed") and "\n" not in err


def test_train_then_sample(tmp_path, capsys):
    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.yaml"), "train.steps=2", "--out", str(run), "--quiet"]) == 0
    assert (run / "checkpoints" / "latest").is_file()
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                str(run),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue square",
                "--steps",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    meta = json.loads((out / "00001.json").read_text())
    assert meta["prompt"] == "a blue square" and meta["steps"] == 2
    assert (out / "00000.png").is_file() and (out / "grid.png").is_file()
    assert main(["sample", str(run), "--out", str(out)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nothing"), "--prompt", "x"]) == 2


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "fusedit", "presets"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "fusedit-gemma2b" in r.stdout
