"""fusedit as a Python library, sampling side (helper-96's notebook audit): generate and the sample folder
check their arguments as the CLI and the pipeline do, the loaders take device names as train() does, a model
in its sampling form says it cannot be exported, the shapes verifier refuses float images, truncation is
warned per generate call, and the shapes bench scores the same prompts from the library as from the CLI."""

import inspect
import logging
import math

import numpy as np
import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.checkpoints import load_model
from fusedit.cli import main
from fusedit.config import SEED_MAX, ConfigError, SampleConfig
from fusedit.data.shapes import all_prompts, render, scene_for_prompt
from fusedit.eval import shapes_bench
from fusedit.eval.fid import extract_features
from fusedit.eval.shapes_verifier import score
from fusedit.flow import sample as flow_sample
from fusedit.hub import FuseDiTTransformer2DModel
from fusedit.imaging import to_uint8
from fusedit.pipeline import FuseDiTPipeline, from_pretrained, save_pretrained
from fusedit.sampling.folder import write_sample_folder
from fusedit.sampling.generation import generate, sample_settings, to_sampling_form
from fusedit.sampling.source import load_sampling_model
from fusedit.system import build_model, count_parameters, precision_name, resolve_device, uses_bf16
from fusedit.train.checkpoint import save_checkpoint

LONG = " ".join(["a red circle"] * 10)  # past the tiny text.max_length=16
LONGER = " ".join(["two blue squares"] * 10)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    randomize(m.denoiser)
    return m.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, cfg, model):
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(root / "run", 0, cfg, model.denoiser, None, None, model.text.llm)
    return root / "run"


def one_image(model, **kwargs):
    return generate(model, ["a red circle"], **{"image_size": 16, "steps": 1, **kwargs})


def test_generate_builds_no_autograd_graph(model):
    """Sampling keeps no graph of its steps (the denoiser's weights require grad after a load): with one,
    every step's activations would stay in memory until the images are freed."""
    assert any(p.requires_grad for p in model.denoiser.parameters())
    images, cut = generate(model, ["a red circle"], image_size=16, steps=2, guidance=2.0, return_cut=True)
    assert not images.requires_grad and images.grad_fn is None


# ---- B3: prompts are a list


def test_a_bare_string_or_no_prompts_are_refused_not_sampled_per_character(model, cfg, tmp_path):
    allowed = r"prompts='a red circle' is a single string \(allowed: a list of prompts: \['a red circle'\]\)"
    with pytest.raises(TypeError, match=allowed):
        generate(model, "a red circle", image_size=16, steps=1)
    with pytest.raises(TypeError, match=allowed):
        write_sample_folder(model, cfg, "a red circle", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        ValueError, match=r"^no prompts to sample \(allowed: a list of one or more prompts\)$"
    ):
        generate(model, [], image_size=16, steps=1)
    # A tuple is a list of prompts as before.
    assert generate(model, ("a red circle", "a blue square"), image_size=16, steps=1).shape == (2, 3, 16, 16)


def test_extract_features_refuses_a_folder_name(tmp_path):
    def extractor(batch):
        raise AssertionError("nothing should be read")

    with pytest.raises(TypeError, match=r"is one path \(allowed: a list of PIL images or paths, e\.g\. "):
        extract_features(str(tmp_path), extractor, progress=False)
    with pytest.raises(TypeError, match=r"fusedit\.eval\.fid\.list_images\("):
        extract_features(tmp_path, extractor, progress=False)


# ---- B4: generate checks its arguments as sample.*, the CLI and the pipeline do


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"guidance": math.nan}, ConfigError, "guidance=nan is not allowed (allowed: a finite number >= 0)"),
        ({"guidance": -3.0}, ConfigError, "guidance=-3.0 is not allowed (allowed: a finite number >= 0)"),
        ({"guidance": True}, ConfigError, "guidance=True is not allowed (allowed: a finite number >= 0)"),
        ({"steps": 0}, ConfigError, "steps=0 is not allowed (allowed: an integer >= 1)"),
        ({"steps": 2.5}, ConfigError, "steps=2.5 is not allowed (allowed: an integer >= 1)"),
        ({"seed": -1}, ConfigError, f"seed=-1 is out of range (allowed: 0..{SEED_MAX})"),
        ({"seed": 2**70}, ConfigError, f"seed={2**70} is out of range (allowed: 0..{SEED_MAX})"),
        ({"seed": 1.5}, ConfigError, f"seed=1.5 is not an integer (allowed: 0..{SEED_MAX})"),
        (
            {"image_size": "16"},
            ConfigError,
            "image_size='16' is not allowed (allowed: a whole number of pixels >= 1, or a (height, width) pair "
            "of them)",
        ),
        ({"image_size": (16,)}, ConfigError, "image_size=(16,) is not allowed (allowed: a whole number"),
        ({"image_size": (16, 0)}, ConfigError, "image_size=(16, 0) is not allowed (allowed: a whole number"),
        ({"precision": "fp16"}, ConfigError, "precision='fp16' is not allowed (allowed: auto, fp32, bf16)"),
        (
            {"progress": 1},
            TypeError,
            "progress=1 is not allowed (allowed: True for a progress bar, False or None for none, or a function "
            "called once per step)",
        ),
    ],
)
def test_generate_refuses_bad_arguments_in_one_line(model, kwargs, error, message):
    with pytest.raises(error) as e:
        one_image(model, **kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_unknown_precision_is_refused_where_it_is_resolved():
    """It used to run, and be recorded, as fp32: uses_bf16 had no else-branch."""
    cpu = torch.device("cpu")
    for resolve in (uses_bf16, precision_name):
        with pytest.raises(
            ConfigError, match=r"^precision='fp16' is not allowed \(allowed: auto, fp32, bf16\)$"
        ):
            resolve("fp16", cpu)
    assert [precision_name(p, cpu) for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "sample.steps=0 must be > 0"),
        ({"guidance": math.nan}, "sample.guidance=nan must be a number (NaN is not)"),
        ({"guidance": -1.0}, "sample.guidance=-1.0 must be >= 0"),
        ({"precision": "fp16"}, "sample.precision='fp16' is not allowed (allowed: auto, fp32, bf16)"),
        ({"sampler": "Euler"}, "sample.sampler='Euler' is not allowed (allowed: euler, heun)"),
        ({"cache_text": "no"}, "sample.cache_text='no' must be true or false"),
        ({"image_size": "16"}, "image_size='16' is not allowed (allowed: a whole number of pixels >= 1"),
    ],
)
def test_sample_settings_checks_its_overrides(cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        sample_settings(cfg, **overrides)
    assert str(e.value).startswith(message)


def test_sample_settings_keeps_good_overrides(cfg):
    settings = sample_settings(cfg, steps=2, guidance=0.0, precision="fp32", image_size=(16, 24), shift=None)
    assert settings == {
        **sample_settings(cfg),
        "steps": 2,
        "guidance": 0.0,
        "precision": "fp32",
        "image_size": (16, 24),
    }


def test_load_sampling_model_checks_its_overrides(run):
    with pytest.raises(
        TypeError, match=r"^unknown sample setting\(s\) \['stepz'\] \(allowed: steps, guidance, "
    ):
        load_sampling_model(run, "cpu", stepz=1)
    with pytest.raises(
        ConfigError, match=r"^sample\.precision='fp16' is not allowed \(allowed: auto, fp32, bf16\)$"
    ):
        load_sampling_model(run, "cpu", precision="fp16")
    with pytest.raises(ConfigError, match=r"^sample\.steps=0 must be > 0$"):
        load_sampling_model(run, "cpu", steps=0)
    _, loaded, _ = load_sampling_model(run, "cpu", steps=2, compile="", precision=None)
    assert (loaded.sample.steps, loaded.sample.compile, loaded.sample.precision) == (2, "", "auto")


# ---- M2: the loaders take device names as train() does


def test_the_loaders_take_auto_and_refuse_bad_devices_in_one_line(cfg, run, tmp_path):
    here = resolve_device("auto")
    assert next(build_model(cfg, "auto").denoiser.parameters()).device.type == here.type
    model, _ = FuseDiTPipeline.from_fusedit(run, "auto").to_fusedit()
    assert next(model.denoiser.parameters()).device.type == here.type
    missing = tmp_path / "missing"  # the device is checked before the folder is looked at
    loaders = [
        lambda device: build_model(cfg, device),
        lambda device: load_model(missing, device),
        lambda device: load_sampling_model(missing, device),
        lambda device: FuseDiTPipeline.from_fusedit(missing, device),
        lambda device: from_pretrained(missing, device),
    ]
    for load in loaders:
        with pytest.raises(ConfigError, match=r"^device 'gpu' is not allowed \(allowed: auto, cpu, cuda, "):
            load("gpu")
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match=r"^device 'cuda' is not available: torch "):
                load("cuda")


def test_build_model_on_meta_still_counts_parameters(cfg, model):
    shapes = build_model(cfg, "meta")
    assert next(shapes.denoiser.parameters()).device.type == "meta"
    assert count_parameters(shapes.denoiser) == count_parameters(model.denoiser)


def test_load_model_takes_auto(run):
    model, _, _ = load_model(run, "auto")
    assert next(model.denoiser.parameters()).device.type == resolve_device("auto").type


# ---- M3: the sampling form says it cannot be exported


def test_a_model_in_its_sampling_form_is_not_exported_and_the_error_says_why(cfg, tmp_path):
    m = build_model(cfg)
    to_sampling_form(m, cfg)
    message = (
        r"^this denoiser is in its sampling form \(fused projections, as "
        r"fusedit\.sampling\.source\.load_sampling_model and "
        r"fusedit\.sampling\.generation\.to_sampling_form leave it\), which only "
        r"fusedit\.sampling\.generation\.generate takes: a pipeline or an export needs the model "
        r"fusedit\.checkpoints\.load_model returns$"
    )
    with pytest.raises(ValueError, match=message):
        FuseDiTTransformer2DModel.from_denoiser(m.denoiser, cfg)
    with pytest.raises(ValueError, match=message):
        save_pretrained(m, cfg, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    assert (
        "only samples" in load_sampling_model.__doc__
        and "checkpoints.load_model" in load_sampling_model.__doc__
    )


# ---- M4: the shapes verifier scores uint8 images only


def test_the_verifier_refuses_float_images_and_names_the_converter():
    prompt = all_prompts(kinds=["single"], max_objects=2)[0]
    image = render(scene_for_prompt(prompt, np.random.default_rng(0), 64))
    assert image.dtype == np.uint8 and score(prompt, image).correct
    for floats in (image / 255.0, image / 127.5 - 1, image.astype(np.float32)):
        with pytest.raises(ValueError) as e:
            score(prompt, floats)
        assert str(e.value) == (
            f"expected a uint8 (H, W, 3) image, got dtype {floats.dtype} (convert generate's (B, 3, H, W) "
            "images in [-1, 1] with fusedit.imaging.to_uint8, which gives (B, H, W, 3) uint8)"
        )
    # The named route: generate's layout and range through to_uint8 scores as the image itself.
    generated = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert score(prompt, to_uint8(generated)[0]).correct


# ---- M6: progress


def test_progress_true_shows_a_bar_and_a_function_is_called_per_step(model, capsys):
    one_image(model, steps=3, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "sample" in bar and "3/3" in bar
    one_image(model, steps=3, progress=False)
    assert capsys.readouterr().err == ""
    calls = []
    one_image(model, steps=3, sampler="heun", progress=lambda: calls.append(1))
    assert len(calls) == 3  # once per Heun step, not per velocity call
    assert "``progress``: True shows a tqdm bar" in " ".join(generate.__doc__.split())


# ---- R2: truncation is warned per generate call


def cut_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fusedit.sampling.generation"]


def test_each_generate_call_warns_about_the_prompts_it_cut(cfg, caplog):
    m = build_model(cfg).eval()
    with caplog.at_level(logging.WARNING):
        one_image(m)
        generate(m, [LONG, "a red circle"], image_size=16, steps=1)
    # The first cut is said once, as every later one is: by generate (the encoders say nothing).
    assert cut_warnings(caplog) == [
        "1 of the 2 prompts was longer than text.max_length=16 tokens: its end was cut"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(m, [LONGER, "a red circle", LONG], image_size=16, steps=1)
        generate(m, ["a red circle"], image_size=16, steps=1)  # nothing cut: nothing said
        generate(m, ["a red circle"], image_size=16, steps=1, guidance=3.0, negative_prompt=LONG)
        generate(m, [LONG], image_size=16, steps=1, guidance=3.0, negative_prompt=LONGER)
    assert cut_warnings(caplog) == [
        "2 of the 3 prompts were longer than text.max_length=16 tokens: their ends were cut",
        "the negative prompt is longer than text.max_length=16 tokens: its end was cut",
        "the prompt and the negative prompt are longer than text.max_length=16 tokens: their ends were cut",
    ]
    assert not [r for r in caplog.records if r.name == "fusedit.text.encoder"]
    # A caller that reports a total itself (`fusedit sample`, from each call's returned cut) turns it off.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, cut = generate(
            m, [LONGER, "a red circle"], image_size=16, steps=1, warn_cut=False, return_cut=True
        )
    assert not caplog.records and (cut.prompts, cut.negative) == ({0}, False)


# ---- R5: the pure sampler's shift


def test_the_pure_samplers_default_shift_is_documented_against_generates():
    assert inspect.signature(flow_sample).parameters["shift"].default == 1.0
    assert inspect.signature(generate).parameters["shift"].default == SampleConfig.shift == 3.0
    doc = " ".join(flow_sample.__doc__.split())
    assert "``shift`` defaults to 1.0" in doc and "default to 3.0" in doc and "SampleConfig.shift" in doc


# ---- B6: the shapes bench scores the same prompts from the library as from the CLI


def test_bench_settings_carry_max_objects_and_scores_record_it(cfg, model, tmp_path):
    settings = shapes_bench.bench_settings(cfg, per_category=1, steps=1, guidance=3.0, seed=0)
    assert settings["max_objects"] == cfg.data.max_objects == 2
    scores = shapes_bench.run_shapes_bench(model, out_dir=tmp_path, progress=False, **settings)
    drawn = shapes_bench.benchmark_prompts(1, cfg.data.max_objects, seed=0)
    assert [v["text"] for v in scores["verdicts"]] == [p.text for p in drawn]
    assert drawn != shapes_bench.benchmark_prompts(1, 4, seed=0)  # what the default max_objects draws
    assert scores["settings"] == {k: v for k, v in settings.items() if k != "image_size"} | {"image_size": 16}


def test_the_cli_runs_the_bench_with_bench_settings_alone(run, cfg, tmp_path, monkeypatch):
    """`fusedit eval --bench shapes` passes what bench_settings gives and nothing of its own, so that the
    library call ``run_shapes_bench(model, **bench_settings(cfg, ...))`` scores the same prompts."""
    calls = []

    def run_shapes_bench(model, out_dir, **kwargs):
        calls.append(kwargs)
        return {"overall": 0.5, "num_images": 3, "per_category": {"single": 0.5}}

    monkeypatch.setattr(shapes_bench, "run_shapes_bench", run_shapes_bench)
    args = ["eval", str(run), "--out", str(tmp_path), "--device", "cpu", "--quiet", "--per-category", "1"]
    assert main([*args, "--steps", "1"]) == 0
    library = shapes_bench.bench_settings(cfg, per_category=1, steps=1)  # the model's guidance, seed 0
    # The rest says what is scored (the row's name, the checkpoint, the kinds the run trained), not how.
    assert len(calls) == 1 and {k: calls[0][k] for k in library} == library
    assert set(calls[0]) - set(library) == {"name", "progress", "source", "trained_kinds"}


def test_cuda_graphs_asked_for_where_they_do_nothing_says_why(model, cfg, tmp_path, caplog):
    """--cuda-graphs on the CPU (or with --no-cache) sampled as without it and said nothing."""
    settings = {**sample_settings(cfg, steps=1, cuda_graphs=True), "image_size": 16}
    with caplog.at_level(logging.INFO, logger="fusedit"):
        write_sample_folder(model, cfg, ["a red circle"], tmp_path / "o", settings=settings, progress=False)
    assert [r.getMessage() for r in caplog.records if "cuda_graphs" in r.getMessage()] == [
        "sample.cuda_graphs does nothing here: the model is not on a CUDA device (it replays cached-text steps "
        "on a GPU)"
    ]


def test_a_hub_id_given_as_the_model_says_to_download_it_first(tmp_path, monkeypatch):
    from fusedit.sampling.source import check_sampling_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        check_sampling_source("you/your-model", True, None)
    assert str(e.value) == (
        "no such folder: 'you/your-model' (expected a run, checkpoint or diffusers pipeline folder; a hub id? "
        "download it first: hf download you/your-model --local-dir DIR, and use DIR)"
    )
    with pytest.raises(FileNotFoundError, match=r"pipeline folder\)$"):
        check_sampling_source(str(tmp_path / "gone"), True, None)


def test_ctrl_c_in_the_shapes_bench_says_what_is_kept(run, tmp_path, capsys, monkeypatch):
    """It printed 'stopped before the end' alone, where every other eval says what is kept and what to run."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_bench, "run_shapes_bench", interrupted)
    out = tmp_path / "bench"
    args = ["eval", str(run), "--bench", "shapes", "--per-category", "1", "--steps", "1", "--out", str(out)]
    assert main([*args, "--quiet"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: nothing is kept (the bench writes {out} at its end); rerun the same command to "
        "start again"
    )


# ---- helper-115's sampling journey: generate checks and says what the CLI checks and says


def test_a_size_past_a_fixed_ape_table_is_refused_before_the_llm_runs(monkeypatch):
    """generate has no config: the side limits come from the model, the APE table's grid included (it failed
    inside the denoiser, after the LLM, naming no allowed size)."""
    cfg = tiny_config(model={"ape_max_size": 4, "ape_base_size": 4}, data={"image_size": 8})
    model = build_model(cfg)
    monkeypatch.setattr(model, "encode_prompts", lambda *a, **k: pytest.fail("the LLM ran"))
    with pytest.raises(ConfigError) as e:
        one_image(model, image_size=(8, 10))
    assert str(e.value) == (
        "image_size=(8, 10) is not allowed (allowed: a positive multiple of 2, the VAE's downsampling x the "
        "patch size, up to 8 (the APE table's model.ape_max_size))"
    )


def test_sampler_schedule_shift_and_size_are_checked_before_the_llm_runs(model, monkeypatch):
    """They failed only after the LLM's forward (its docstring says "before any slow work"), the size with the
    patchify's "latent size 15x15 is not divisible by patch size 2" (helper-115 R6)."""

    def slow(*args, **kwargs):
        raise AssertionError("the LLM ran")

    monkeypatch.setattr(model, "encode_prompts", slow)
    cases = [
        ({"sampler": "ddim"}, ValueError, r"^unknown sampler 'ddim' \(allowed: euler, heun\)$"),
        (
            {"schedule": "karras"},
            ValueError,
            r"^unknown sampling schedule 'karras' \(allowed: uniform, diffusers\)$",
        ),
        ({"shift": 0.0}, ValueError, r"^sampling shift must be a finite number > 0 \(1 = none\), got 0.0$"),
        (
            {"image_size": 15},
            ConfigError,
            r"^image_size=15 is not allowed \(allowed: a positive multiple of 2, the VAE's "
            r"downsampling x the patch size\)$",
        ),
        ({"image_size": (16, 9)}, ConfigError, r"^image_size=\(16, 9\) is not allowed"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            one_image(model, **kwargs)


def test_settings_that_leave_a_prompt_unused_are_warned_about_once(model, caplog):
    """generate sampled the negative prompt alone at guidance 0, and accepted a negative prompt at guidance 1
    (which the CLI refuses), without a word (helper-115 M1, R5); an evaluation or training's previews call it
    again and again, so each is said once."""
    from fusedit.sampling.generation import warn_once

    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        for _ in range(2):
            one_image(model, guidance=0.0)
            one_image(model, guidance=1.0, negative_prompt="a blue square")
        one_image(model, guidance=1.0)
        one_image(model, guidance=3.0, negative_prompt="a blue square")
    assert [r.getMessage() for r in caplog.records] == [
        "guidance 0 samples the negative prompt alone: the prompt is not used",
        "guidance 1 samples the prompt alone: the negative prompt is not used",
    ]


def test_nan_images_are_counted_at_every_call(model, caplog):
    """Absurd guidance gives NaN images, which became black PNGs without a word (helper-115 R1)."""
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        x = generate(model, ["a red circle", "a blue square"], image_size=16, steps=2, guidance=1e38)
        generate(model, ["a red circle"], image_size=16, steps=2, guidance=3.0)
    assert not torch.isfinite(x).all()
    assert [r.getMessage() for r in caplog.records] == [
        "2 of the 2 images are NaN or inf (black or saturated pixels): is guidance=1e+38 too large, "
        "or do the model's weights or inputs hold non-finite or huge values?"
    ]


def test_nan_images_at_guidance_1_blame_the_weights_not_guidance(cfg, caplog):
    """Bad weights gave NaN images with a warning asking whether guidance=1 (its neutral value) was too
    large (h-sample M1): at guidance <= 1 it names the weights or inputs alone."""
    bad = build_model(cfg)
    randomize(bad.denoiser)
    with torch.no_grad():
        list(bad.denoiser.parameters())[-1].fill_(math.inf)
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        generate(bad, ["a red circle"], image_size=16, steps=2, guidance=1.0)
        generate(bad, ["a red circle", "a blue square"], image_size=16, steps=2, guidance=0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of the 1 images are NaN or inf (black or saturated pixels): do the model's weights or inputs hold "
        "non-finite or huge values? (guidance=1 cannot cause it)",
        "2 of the 2 images are NaN or inf (black or saturated pixels): do the model's weights or inputs hold "
        "non-finite or huge values? (guidance=0.5 cannot cause it)",
    ]


def test_the_docstring_says_how_to_remake_the_clis_image_i(model):
    """generate(seed=s) draws one batch tensor, while the CLI, serve and eval draw image i from seed s + i
    alone (helper-115 M5): the recipe the docstring gives makes the CLI's images."""
    from fusedit.sampling.generation import latent_shape, seeded_noise

    doc = " ".join(generate.__doc__.split())
    assert "noise=seeded_noise([s + i for i in range(B)], latent_shape(model, image_size))" in doc
    prompts = ["a red circle", "a blue square"]
    batch = generate(
        model, prompts, image_size=16, steps=2, noise=seeded_noise([7, 8], latent_shape(model, 16))
    )
    second = generate(model, prompts[1:], image_size=16, steps=2, seed=8)
    assert np.abs(to_uint8(batch)[1].astype(int) - to_uint8(second)[0].astype(int)).max() <= 1
    assert not np.array_equal(
        to_uint8(generate(model, prompts, image_size=16, steps=2, seed=7))[1], to_uint8(batch)[1]
    )
