"""What a config alone decides is refused before train() makes and locks the run folder: an LLM attention
kernel the family or this machine cannot run, a local Hugging Face dataset's split or columns, and an
exported pipeline's LLM folder that is gone (with the overrides that load the copy the pipeline holds). A
refusal after the folder was made left it behind, holding train.lock."""

import contextlib
import importlib.util
import shutil

import pytest

from conftest import TINY_ARCH, tiny_config
from fusedit.config import ConfigError, RunStopped, load_config
from fusedit.data.loader import PlanFailedElsewhere
from fusedit.pipeline import export_run
from fusedit.system import build_model
from fusedit.train import loop
from fusedit.train.checkpoint import save_checkpoint
from fusedit.train.distributed import DistEnv
from fusedit.train.loop import train


def test_a_kernel_the_family_lacks_is_refused_in_its_own_words_before_the_run_folder(tmp_path):
    """Gemma-2 has no sdpa kernel in transformers: the refusal came at the build, after the folder, and
    quoted transformers' message, whose example loads openai/whisper-tiny. Now one line naming the value,
    the family and its kernels, before the folder; a further LLM is named by its own section."""
    gemma2 = {"family": "gemma2", "arch": TINY_ARCH, "attn_implementation": "sdpa"}
    with pytest.raises(ConfigError) as e:
        train(tiny_config(text=gemma2, train={"steps": 1}), tmp_path / "run")
    assert str(e.value) == (
        "text.attn_implementation='sdpa' cannot run the gemma2 LLM: its transformers model has no such kernel "
        "(allowed for gemma2: auto, eager, flash_attention_2, flex_attention)"
    )
    assert not (tmp_path / "run").exists()
    lidit = {"design": "dit-cross", "refiner_depth": 1, "refiner_heads": 4}
    with pytest.raises(
        ConfigError, match=r"^extra_text.0.attn_implementation='sdpa' cannot run the gemma2 LLM: its"
    ):
        train(tiny_config(model=lidit, extra_text=[gemma2], train={"steps": 1}), tmp_path / "lidit")
    assert not (tmp_path / "lidit").exists()
    # The build's own refusal (a model built outside train(), e.g. for sampling) words it the same way.
    with pytest.raises(ConfigError) as built:
        build_model(tiny_config(text=gemma2), with_autoencoder=False)
    assert str(built.value) == str(e.value)


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is not None for p in ("flash_attn", "kernels")),
    reason="flash_attn is installed, or transformers fetches a hub kernel for it (kernels)",
)
def test_a_kernel_this_machine_cannot_run_is_refused_as_the_machines_before_the_run_folder(tmp_path):
    """Llama runs flash_attention_2, but not without the flash_attn package: the refusal says it is this
    machine, not the family (it said 'allowed: a kernel the family supports', which flash_attention_2 is)."""
    llama = {"family": "llama", "arch": TINY_ARCH, "attn_implementation": "flash_attention_2"}
    with pytest.raises(ConfigError) as e:
        train(tiny_config(text=llama, train={"steps": 1}), tmp_path / "run")
    assert str(e.value).startswith(
        "text.attn_implementation='flash_attention_2' cannot run the llama LLM on this machine: "
    )
    assert str(e.value).endswith("(allowed here: auto, eager, sdpa, flex_attention)")
    assert "installed" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def hf_sources(tmp_path):
    """A save_to_disk folder of splits train/val and a parquet file, both of columns image and text."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [None, None], "text": ["a", "b"]}, features=features)
    datasets.DatasetDict({"train": ds, "val": ds}).save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    return tmp_path / "saved", tmp_path / "rows.parquet"


@pytest.mark.parametrize(
    ("source", "data", "says"),
    [
        (
            0,
            {"hf_split": "test"},
            "data.hf_split='test' is not a split of data.hf_path={path!r} (allowed: train, val)",
        ),
        (
            0,
            {"caption_fields": ["caption"]},
            "data.caption_fields=['caption'] names no column of {path!r} (columns: image, text)",
        ),
        (
            1,
            {"image_field": "jpg"},
            "data.image_field='jpg' is not a column of {path!r} (columns: image, text)",
        ),
        (
            1,
            {"caption_fields": ["title", "json.caption"]},
            "data.caption_fields=['title', 'json.caption'] names no column of {path!r} (columns: image, text)",
        ),
    ],
    ids=["saved-split", "saved-captions", "parquet-image", "parquet-captions"],
)
def test_a_local_hf_datasets_split_and_columns_are_refused_before_the_run_folder(
    tmp_path, hf_sources, source, data, says
):
    """A save_to_disk folder's splits and columns, a parquet file's columns: read from their metadata, not
    their rows, before the folder is made (they were refused when the loader opened the dataset)."""
    path = str(hf_sources[source])
    cfg = tiny_config(
        data={"source": "hf", "hf_path": path, "caption_fields": ["text"], **data}, train={"steps": 1}
    )
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run")
    assert str(e.value) == says.format(path=path)
    assert not (tmp_path / "run").exists()


def test_an_exported_pipelines_gone_llm_folder_is_refused_with_the_copy_it_holds(tmp_path):
    """A pipeline exported from a run over a local LLM folder records that folder as text.model_id: a
    fine-tune from it elsewhere (the folder moved, another machine) met a bare 'path to nothing'. The
    refusal now gives the overrides that load the LLM and tokenizer the pipeline holds, which train."""
    from test_designs import _saved_llm

    cfg = tiny_config(text=_saved_llm(tmp_path / "llm", "llama"))
    model = build_model(cfg)
    save_checkpoint(
        tmp_path / "run", 4, cfg, model.denoiser, model.denoiser.state_dict(), None, model.text.llm
    )
    pipe = tmp_path / "pipe"
    export_run(tmp_path / "run", pipe)
    shutil.rmtree(tmp_path / "llm")
    overrides = [f"train.init_from={pipe}", "train.steps=1", "train.batch_size=2"]
    with pytest.raises(ConfigError) as e:
        train(load_config(str(pipe), overrides), tmp_path / "tuned")
    assert str(e.value) == (
        f"text.model_id={str(tmp_path / 'llm')!r} is a path to nothing (allowed: a folder written by "
        f"save_pretrained, or a hub id written org/name); train.init_from={str(pipe)!r} holds the LLM it was "
        f"exported with: give text.model_id={pipe / 'text_encoder'} text.tokenizer={pipe / 'tokenizer'}"
    )
    assert not (tmp_path / "tuned").exists()
    way_on = [f"text.model_id={pipe / 'text_encoder'}", f"text.tokenizer={pipe / 'tokenizer'}"]
    assert train(load_config(str(pipe), overrides + way_on), tmp_path / "tuned", progress=False)["step"] == 1


def test_a_plan_that_failed_elsewhere_is_not_said_to_have_waited(tmp_path, monkeypatch):
    """Ranks whose bucket planning failed tell the others at once (PlanFailedElsewhere): the line said a
    process waits train.dist_timeout_s for the others, which is for a peer that stopped answering."""
    monkeypatch.setattr(loop.distributed, "setup", lambda *a, **k: DistEnv(rank=0, world_size=2))
    monkeypatch.setattr(loop, "hold_run_folder", lambda *a, **k: contextlib.nullcontext())

    def plan_failed(*args, **kwargs):
        raise PlanFailedElsewhere("bucket planning failed on rank(s) [1]: their log says why")

    monkeypatch.setattr(loop, "_train", plan_failed)
    with pytest.raises(RunStopped) as e:
        train(tiny_config(train={"steps": 1}), tmp_path / "run")
    assert str(e.value).startswith(
        "another process of the job failed (PlanFailedElsewhere: bucket planning failed on rank(s) [1]: "
        "their log says why): that process's own error, printed above or in its log, may say why and what to "
        "change first"
    )
    assert "dist_timeout_s" not in str(e.value)


@pytest.mark.parametrize(
    ("family", "says"),
    [
        ("olmo2", "'Olmo2DecoderLayer' object has no attribute 'input_layernorm'"),
        ("stablelm", ""),  # torch's shape error, worded otherwise on the meta device
    ],
)
def test_deep_fusion_over_llm_keys_it_cannot_read_is_refused_before_the_run_folder(tmp_path, family, says):
    """OLMo-2 norms after its layers (no input_layernorm) and StableLM rotates part of each key: deep
    fusion cannot read their K/V at all, which one layer on the meta device shows by shapes alone. The
    refusal came when the run built the LLM (TextEncoder.check_kv), after the run folder was made."""
    from test_designs import _saved_llm

    text = _saved_llm(tmp_path / family, family)
    with pytest.raises(ConfigError) as e:
        train(tiny_config(text=text, train={"steps": 1}), tmp_path / "run")
    assert str(e.value).startswith(
        f"an LLM of model_type {family!r} is not supported by deep fusion: its layers' keys/values cannot be "
        f"read: {says}"
    )
    assert "(the shallow designs dit-self/dit-cross read only its hidden states; " in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_folder_that_is_not_there_is_refused_before_the_run_folder(tmp_path):
    """A text.tokenizer written as a path to nothing (a typo, an unmounted disk) was refused by the build,
    after the run folder was made and locked."""
    missing = tmp_path / "no-such-tokenizer"
    cfg = tiny_config(text={"tokenizer": str(missing)}, train={"steps": 1})
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run")
    assert str(e.value) == (
        f"text.tokenizer={str(missing)!r} is a path to nothing (allowed: a folder written by save_pretrained, "
        "or a hub id written org/name)"
    )
    assert not (tmp_path / "run").exists()


def test_deep_fusion_reads_a_dynamic_rope_llm_before_the_start(tmp_path):
    """A dynamic RoPE reads its longest position with .item(), which the meta device cannot: the early K/V
    check refused a valid Llama the build trains (it needs only the width of cos/sin)."""
    from fusedit.text.llm import check_llm
    from test_designs import _saved_llm

    text = _saved_llm(tmp_path / "llama", "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    cfg = tiny_config(text={**text, "family": "llama"}, train={"steps": 1})
    check_llm(cfg.text, deep=True)
    assert train(cfg, tmp_path / "run", progress=False)["step"] == 1


def test_a_parquet_source_without_datasets_is_the_loads_one_line(tmp_path, monkeypatch):
    """The early check read a parquet file's schema with pyarrow, which comes with the optional datasets
    package: without it, a traceback instead of the load's one line."""
    import sys

    from fusedit.data.hf import check_hf_source

    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    cfg = tiny_config(data={"source": "hf", "hf_path": str(tmp_path / "rows.parquet")})
    with pytest.raises(
        ConfigError, match=r"^data.source=hf needs the optional 'datasets' package: pip install"
    ):
        check_hf_source(cfg.data)


def test_the_kernel_check_reads_older_transformers_flash_flag(monkeypatch):
    """transformers before 4.54 named the flash flag _supports_flash_attn_2: a family that runs it was
    said to lack it."""
    from transformers import AutoConfig, LlamaModel

    from fusedit.text.llm import _family_kernels

    monkeypatch.setattr(LlamaModel, "_supports_flash_attn", False, raising=False)
    monkeypatch.setattr(LlamaModel, "_supports_flash_attn_2", True, raising=False)
    assert "flash_attention_2" in _family_kernels(AutoConfig.for_model("llama", **TINY_ARCH))


def test_every_kernel_the_config_allows_has_its_family_flags():
    """text.attn_implementation's choices and the kernel check's table of transformers flags name the same
    kernels (a kernel added to one alone would be said to run on no family, or never be checked)."""
    from fusedit.config import TextConfig, choices_of
    from fusedit.text.llm import _KERNEL_FLAGS

    assert set(choices_of(TextConfig, "attn_implementation")) - {"auto", "eager"} == set(_KERNEL_FLAGS)
