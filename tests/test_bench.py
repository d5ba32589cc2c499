import json

import pytest

from conftest import counting_backend
from fusedit.cli import main
from fusedit.config import load_config
from fusedit.models.flops import denoiser_flops, llm_flops
from fusedit.system import build_model, count_parameters


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
    # A second run into the same file adds its rows after the first run's.
    assert main([*bench_args(out, "--batch", "2"), "--what", "train"]) == 0
    assert [json.loads(line)["kind"] for line in out.read_text().splitlines()] == [
        "train",
        "sample",
        "sample",
        "train",
    ]


def test_bench_records_how_each_figure_was_made(tmp_path, monkeypatch, capsys):
    """Command, date, commit, warm-up and repeat counts, the timer, and the attention kernel that ran,
    which follows model.attention_backend (auto picks per call: here the CPU's flash kernel)."""
    import datetime

    monkeypatch.setenv("FUSEDIT_COMMIT", "abc123")
    out = tmp_path / "bench.jsonl"
    args = bench_args(out, "--batch", "2", "--steps", "1", "--prompts", "1", "--cached-only")
    assert main([*args, "model.attention_backend=math"]) == 0
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["attention_kernels"] for r in rows] == [["math"], ["math"], ["flash"], ["flash"]]
    assert {r["llm_attention"] for r in rows} == {"sdpa"}  # text.attn_implementation=auto, resolved
    # The debug preset's LLM has no model_id: its arch is timed, and the records say so (h-review M3).
    assert {(*r["llm_model_id"], *r["llm_shape_from"]) for r in rows} == {(None, "arch")}
    assert "attention math" in capsys.readouterr().out
    for r in rows:
        assert (r["warmup"], r["repeats"], r["timer"], r["commit"]) == (0, 1, "perf_counter", "abc123")
        assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None
    assert rows[0]["command"] == "fusedit " + " ".join([*args, "model.attention_backend=math"])
    assert rows[0]["peak_memory_bytes"] is None and rows[0]["peak_memory_gib"] is None  # the CPU


def test_source_commit_is_the_checkouts_and_says_when_it_differs(tmp_path, monkeypatch):
    import subprocess

    from fusedit.bench import source_commit

    monkeypatch.delenv("FUSEDIT_COMMIT", raising=False)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    source = tmp_path / "bench.py"
    source.write_text("x = 1\n")
    assert source_commit(source) is None  # a repository that does not track the file
    subprocess.run([*git, "add", "bench.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert source_commit(source) == head
    source.write_text("x = 2\n")
    assert source_commit(source) == head + "-dirty"
    monkeypatch.setenv("FUSEDIT_COMMIT", "given")
    assert source_commit(source) == "given"


def test_bench_counts_every_llm_of_a_multi_llm_model(tmp_path):
    """LI-DiT's two LLMs: each has its own text width, and the FLOP count has both LLMs and both branches."""
    out = tmp_path / "bench.jsonl"
    args = bench_args(out, "--batch", "2", "--what", "train")
    assert main([*(a if a != "debug" else "debug-lidit" for a in args)]) == 0
    (train,) = (json.loads(line) for line in out.read_text().splitlines())
    model = build_model(load_config("debug-lidit"), "meta")
    widths = [8, 8]  # --text-tokens 8 of random ids through each LLM
    assert len(model.encoders) == 2
    expected = 3 * denoiser_flops(model.denoiser, 64, widths) + sum(
        llm_flops(e.llm, w) for e, w in zip(model.encoders, widths)
    )
    assert train["flops_per_image"] == expected


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


def test_bench_with_padded_prompts_trims_them_and_counts_the_flops_of_what_ran(tmp_path):
    """--min-text-tokens draws real prompt lengths below the padded width: the encoders trim each batch to
    its longest prompt, and the FLOP count follows the trimmed widths the timed steps computed over."""
    out = tmp_path / "bench.jsonl"
    args = bench_args(out, "--batch", "2", "--steps", "1", "--prompts", "1", "--cached-only")
    assert main([*args, "--min-text-tokens", "2"]) == 0
    train, sample = (json.loads(line) for line in out.read_text().splitlines())
    assert train["min_text_tokens"] == 2 and train["trim_multiple"] == 1
    assert 2 <= train["text_width_mean"] <= 8
    model = build_model(load_config("debug"), "meta")
    full = 3 * denoiser_flops(model.denoiser, 64, 8) + llm_flops(model.text.llm, 8)
    assert train["flops_per_image"] <= full
    # guidance: one empty negative row (1 token) and one prompt of 2..8 tokens
    assert 2 <= sample["text_width_mean"] <= 8 and sample["cuda_graphs"] is False


def test_bench_prompt_lengths_and_reachable_text_widths():
    import torch

    from fusedit.bench import priming_lengths, prompt_lengths

    def text_widths(model, min_tokens, tokens):  # the text lengths the encoders can trim a batch to
        return sorted({width for width, _ in priming_lengths(model, 1, tokens, min_tokens)})

    gen = torch.Generator().manual_seed(0)
    assert prompt_lengths(3, 8, None, gen).tolist() == [8, 8, 8]
    lengths = prompt_lengths(6, 8, 2, gen, empty_rows=3)
    assert lengths[:3].tolist() == [1, 1, 1] and all(2 <= n <= 8 for n in lengths[3:].tolist())
    model = build_model(load_config("debug"), "meta")
    assert text_widths(model, None, 16) == [16]
    assert text_widths(model, 3, 8) == [3, 4, 5, 6, 7, 8]
    model.text.trim_multiple = 4
    assert text_widths(model, 3, 10) == [4, 8, 10]


def test_bench_rejects_a_minimum_prompt_length_outside_the_prompt_length(tmp_path, capsys):
    assert main([*bench_args(tmp_path / "b.jsonl", "--what", "train"), "--min-text-tokens", "9"]) != 0
    assert "--min-text-tokens 9 is not in 1..8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--repeats", "0"], "--repeats 0 is not allowed (allowed: 1 or more)"),
        (["--warmup", "-1"], "--warmup -1 is not allowed (allowed: 0 or more)"),
        (["--prompts", "4", "0"], "--prompts 0 is not allowed (allowed: 1 or more)"),
        (["--batch", "0"], "--batch 0 is not allowed (allowed: 1 or more)"),
        (["--train-points", "32x0"], "--train-points 32x0 is not allowed (allowed: a batch of 1 or more)"),
        (["--text-tokens", "0"], "--text-tokens 0 is not allowed (allowed: 1 or more)"),
        (["--steps", "25", "0"], "--steps 0 is not allowed (allowed: an integer >= 1)"),
        (["--guidance", "nan"], "--guidance nan is not allowed (allowed: a finite number >= 0)"),
        (["--resolution", "30"], "--resolution 30 is not allowed (allowed: a positive multiple of 4,"),
        (["--train-points", "18x2"], "--train-points 18 is not allowed (allowed: a positive multiple of 4,"),
        (["--train-points", "32x2", "--batch", "4"], "--batch does not apply with --train-points"),
        (
            ["--train-points", "32x2", "--resolution", "64", "--what", "train"],
            "--resolution does not apply with --train-points and --what train",
        ),
    ],
)
def test_bench_rejects_bad_flags_before_building_the_model(flags, message, tmp_path, capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the flags were checked")

    monkeypatch.setattr("fusedit.bench.setup", no_build)
    args = ["bench", "debug", *flags, "--json", str(tmp_path / "b.jsonl")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_padded_bench_compiles_every_graph_before_the_timed_steps(monkeypatch):
    """Priming runs each reachable text length with and without a padding mask, so no compile lands in
    the timed steps ("eager" traces the blocks with torch.compile, as inductor would, without codegen)."""
    import dataclasses

    import torch
    import torch._dynamo

    import fusedit.bench as bench

    cfg = load_config("debug")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, compile="eager"),
        text=dataclasses.replace(cfg.text, trim_multiple=4),
    )
    graphs = []
    torch._dynamo.reset()
    s = bench.setup(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="")), torch.device("cpu"), False
    )
    s.model.compile_parts(counting_backend(graphs), llm=False)
    real_time_it, real_cost, compiled_before_timing = bench.time_it, bench.overlapped_cost, []

    def time_it(fn, device, warmup, repeats, runs=1):
        compiled_before_timing.append(len(graphs))
        return real_time_it(fn, device, warmup, repeats, runs)

    def overlapped_cost(*args):
        compiled_before_timing.append(len(graphs))
        return real_cost(*args)

    monkeypatch.setattr(bench, "time_it", time_it)
    monkeypatch.setattr(bench, "overlapped_cost", overlapped_cost)
    row = bench.bench_train(s, 2, 32, 16, 0, 4, min_tokens=2)
    torch._dynamo.reset()
    assert row["primed_widths"] == 4  # 4, 8, 12, 16
    # Timed twice (the steps, then the EMA update beside its steps), with every graph compiled before either.
    assert compiled_before_timing == [len(graphs)] * 2 and len(graphs) > 4


def test_a_timed_step_is_a_training_step_with_the_runs_optimizer_and_ema(monkeypatch):
    """It timed uniform times, its own AdamW (lr 1e-4, clip 1.0) and no EMA: the EMA's float32 copy, held
    all run long, was missing from the peak memory, and its update from the step time."""
    import dataclasses

    import torch

    from fusedit import bench
    from fusedit.train.stages import Optimizers

    cfg = load_config("debug", ["train.ema_every=4", "train.beta2=0.9"])
    cpu = torch.device("cpu")
    s = bench.setup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="")), cpu, False)
    built, updates, timed = [], [], iter([2.0])  # the steps' median
    real_build, real_update = Optimizers.build, bench.EMA.update
    monkeypatch.setattr(Optimizers, "build", lambda *a: built.append((a, real_build(*a))) or built[-1][1])
    monkeypatch.setattr(bench.EMA, "update", lambda self, m: updates.append(m) or real_update(self, m))

    def time_it(fn, device, warmup, repeats, runs=1):
        assert runs == bench.STEPS_PER_TIMING  # steps back to back, as a run takes them
        fn()
        return next(timed)

    def overlapped_cost(start, busy, step, step_seconds, device, repeats):
        start()
        assert step_seconds == 2.0 and not busy()  # an EMA on the device is done when update returns
        return 0.5

    monkeypatch.setattr(bench, "time_it", time_it)
    monkeypatch.setattr(bench, "overlapped_cost", overlapped_cost)
    row = bench.bench_train(s, 2, 32, 8, 0, 1)
    ((args, opts),) = built
    assert args[1] is s.cfg.train and list(opts.by_module) == ["denoiser"]
    betas = {g["betas"] for o in opts.by_module.values() for g in o.param_groups}
    assert betas == {(s.cfg.train.beta1, 0.9)} and all(o.state for o in opts.by_module.values())  # stepped
    assert (row["step_s"], row["ema_update_s"], row["ema_every"]) == (2.0 + 0.5 / 4, 0.5, 4)
    assert row["images_per_s"] == 2 / 2.125 and updates == [s.model.denoiser]


def test_a_timing_spans_runs_back_to_back_and_gives_one_calls_median(monkeypatch):
    """Training steps are timed several back to back (the host's work before a step overlaps the GPU's on
    the last one, as in a run), the figure per step: the median over repeats of each span / runs."""
    import torch

    from fusedit import bench

    calls, readings = [], iter([1.0, 3.0, 3.0, 15.0, 15.0, 21.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(readings))
    seconds = bench.time_it(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3, runs=4)
    assert len(calls) == 2 + 3 * 4  # warm-up calls, then each timing's 4 calls
    assert seconds == 1.5  # spans 2, 12, 6 over 4 calls: 0.5, 3, 1.5


def test_the_synthetic_batch_hands_the_encoder_its_extent_from_the_host(monkeypatch):
    """As TextEncoder.encode does, so that the bench's step reads no lengths back from the GPU: the
    encoder gets the rows' shortest and longest length from the host."""
    import dataclasses

    import torch

    from fusedit import bench
    from fusedit.text.encoder import TextEncoder

    cfg = load_config("debug")
    s = bench.setup(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="")), torch.device("cpu"), False
    )
    real, extents = TextEncoder.forward, []
    monkeypatch.setattr(
        TextEncoder,
        "forward",
        lambda self, *a: extents.append(a[3] if len(a) > 3 else None) or real(self, *a),
    )
    context = bench.synthetic_text(s.model, torch.tensor([5, 2, 7]), 8, torch.Generator().manual_seed(0))
    assert extents == [(2, 7)] and context.mask.sum(1).tolist() == [5, 2, 7]


@pytest.mark.parametrize("min_tokens", [None, 2])
def test_sampling_encodes_the_negative_prompt_once_as_generate_does(monkeypatch, min_tokens):
    """generate encodes each distinct text once: with guidance the negative prompt is one LLM row taken for
    every image's. The bench ran the LLM on all 2 x prompts rows, more than a sampling call runs."""
    import dataclasses

    import torch

    from fusedit import bench

    cfg = load_config("debug")
    s = bench.setup(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="")), torch.device("cpu"), False
    )
    llm_rows, denoiser_rows = [], []
    s.model.text.llm.register_forward_pre_hook(
        lambda m, a, kw: llm_rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    s.model.denoiser.register_forward_pre_hook(lambda m, a: denoiser_rows.append(a[0].shape[0]))
    row = bench.bench_sample(s, 3, 32, 8, 2, 6.0, True, 0, 1, min_tokens=min_tokens)
    assert row["llm_rows"] == 4 and set(llm_rows) == {4} and set(denoiser_rows) == {6}


def test_overlapped_work_costs_what_it_adds_to_the_steps_it_runs_beside(monkeypatch):
    """The host-held EMA's update runs beside the next steps: its cost is the whole span less those steps."""
    import torch

    from fusedit import bench

    clock, left, starts = [0.0], [0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def start():
        starts.append(clock[0])
        clock[0] += 0.25  # queuing the copies
        left[0] = 3  # still running after two steps, done after the third

    def step():
        clock[0] += 1.0 + (0.1 if left[0] else 0.0)  # slowed by 0.1 s while it runs
        left[0] = max(0, left[0] - 1)

    cost = bench.overlapped_cost(start, lambda: left[0] > 0, step, 1.0, torch.device("cpu"), 3)
    assert cost == pytest.approx(0.25 + 3 * 0.1) and len(starts) == 4  # one untimed run first
    assert bench.overlapped_cost(lambda: None, lambda: False, step, 1.5, torch.device("cpu"), 1) == 0.0


def test_priming_covers_every_text_length_with_and_without_a_mask():
    """A single prompt is masked too when trimming rounds its length up; a batch of several always can be."""
    from fusedit.bench import priming_lengths

    model = build_model(load_config("debug"), "meta")
    model.text.trim_multiple = 4
    one = priming_lengths(model, 1, 8, 2)
    assert sorted(one) == [(4, False), (4, True), (8, False), (8, True)]
    assert one[(4, True)].tolist() == [2] and one[(8, False)].tolist() == [8]
    three = priming_lengths(model, 3, 8, 4)
    assert sorted(three) == [(4, False), (8, False), (8, True)]
    assert three[(8, True)].tolist() == [5, 5, 5]  # rounded up from 5: masked
    assert priming_lengths(model, 2, 8, None)[(8, False)].tolist() == [8, 8]


def _saved_llama(folder, layers: int, hidden: int) -> str:
    """A tiny random Llama folder (save_pretrained) with the built-in words as its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    config = AutoConfig.for_model(
        "llama",
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer(vocabulary()).save_pretrained(folder)
    return str(folder)


def test_bench_times_the_local_llm_a_config_names_not_the_presets_arch(tmp_path, caplog):
    """A text.model_id folder: the bench builds random weights of its config's shape (as `fusedit
    describe` counts it), says which LLM it timed, and does not warn of the built-in tokenizer that stands
    in for the LLM's (it feeds random ids)."""
    import logging

    folder = _saved_llama(tmp_path / "my-llm", layers=4, hidden=64)
    (tmp_path / "photos").mkdir()
    out = tmp_path / "bench.jsonl"
    overrides = [f"text.model_id={folder}", "data.source=folder", f"data.root={tmp_path / 'photos'}"]
    with caplog.at_level(logging.WARNING):
        assert main([*bench_args(out, "--batch", "2", "--what", "train"), *overrides]) == 0
    (train,) = (json.loads(line) for line in out.read_text().splitlines())
    real = build_model(load_config("debug", [f"text.model_id={folder}"]), "meta")
    assert train["trainable_params"] == 786224 == count_parameters(real.denoiser, trainable=True)
    assert train["flops_per_image"] == 3 * denoiser_flops(real.denoiser, 64, 8) + llm_flops(real.text.llm, 8)
    assert [train[k] for k in ("llm_family", "llm_layers", "llm_layers_run", "llm_hidden")] == [
        ["llama"],
        [4],
        [4],
        [64],
    ]
    # The record names the LLM timed: its model_id, and that its shape is that model_id's (h-review M3).
    assert (train["llm_model_id"], train["llm_shape_from"]) == ([folder], ["model_id"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_bench_gives_each_extra_llm_its_model_ids_shape_and_the_arch_where_none_is_readable(caplog):
    """extra_text too; a hub id not in the cache keeps its arch, with llm_config's warning; a model type
    the bench cannot build at random keeps the arch, with a warning naming what is timed."""
    import dataclasses
    import logging
    import tempfile

    from transformers import AutoConfig, AutoModel

    from fusedit.bench import random_init_text

    with tempfile.TemporaryDirectory() as tmp:
        folder = _saved_llama(f"{tmp}/llama", layers=5, hidden=32)
        cfg = load_config("debug-lidit", [f"extra_text.0.model_id={folder}"])
        text, shape_from = random_init_text(cfg.extra_text[0], "extra_text.0")
        assert shape_from == "model_id"
        assert (text.model_id, text.tokenizer, text.family) == ("", "", "llama")
        assert {k: text.arch[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")} == {
            "num_hidden_layers": 5,
            "hidden_size": 32,
            "vocab_size": 300,
        }
        phi3 = AutoConfig.for_model("phi3", hidden_size=32, num_hidden_layers=2)
        AutoModel.from_config(phi3).save_pretrained(f"{tmp}/phi3")
        with caplog.at_level(logging.WARNING):
            phi, phi_from = random_init_text(dataclasses.replace(cfg.text, model_id=f"{tmp}/phi3"), "text")
    assert phi_from == "arch"
    assert (phi.model_id, phi.family, phi.arch) == ("", "gemma", cfg.text.arch)
    assert caplog.records[-1].getMessage() == (
        f"text.model_id='{tmp}/phi3' is a phi3 LLM, which the bench cannot build with random weights: timing "
        "text.arch instead (gemma, 6 layers, width 64)"
    )
    hub, hub_from = random_init_text(dataclasses.replace(cfg.text, model_id="nobody/no-such-llm"), "text")
    assert (hub.model_id, hub.family, hub.arch["num_hidden_layers"], hub_from) == ("", "gemma", 6, "arch")
    assert (
        "'nobody/no-such-llm' is not in the local cache: counting text.arch"
        in caplog.records[-1].getMessage()
    )


@pytest.mark.parametrize(
    ("overrides", "trainable", "dit", "llm_extra"),
    [
        ([], "DiT", 3, 0),
        (["train.dit_lora.rank=4"], "DiT (LoRA rank 4)", 2, 0),
        (["train.trainable=[dit,llm]"], "DiT, LLM (fully, all layers)", 3, 2),
        (["train.trainable=[dit,llm]", "train.llm_lora.rank=4"], "DiT, LLM (LoRA rank 4, all layers)", 3, 1),
    ],
)
def test_the_bench_counts_the_flops_of_what_its_step_trains(tmp_path, overrides, trainable, dit, llm_extra):
    """The bench trains what train.trainable says (LoRA adapters, the LLM), so its FLOPs follow it as
    `fusedit describe`'s do: a LoRA-trained DiT costs 2x its forward, a trained LLM adds its backward (1x
    through LoRA, 2x fully), and the forwards are the architecture's, as describe counts them on a build
    without adapters. The record says what trained and counts every weight AdamW updates."""
    out = tmp_path / "bench.jsonl"
    assert main([*bench_args(out, "--batch", "2", "--what", "train"), *overrides]) == 0
    (train,) = (json.loads(line) for line in out.read_text().splitlines())
    model = build_model(load_config("debug"), "meta")
    dit_fwd, llm_fwd = denoiser_flops(model.denoiser, 64, 8), llm_flops(model.text.llm, 8)
    expected = dit * dit_fwd + llm_fwd + llm_extra * llm_fwd
    assert train["flops_per_image"] == expected
    assert train["trainable"] == trainable
    frozen = count_parameters(model.denoiser, trainable=True)
    assert (train["trainable_params"] > frozen) == bool(llm_extra)


def test_a_staged_config_is_benchmarked_as_its_first_stage(tmp_path):
    """`fusedit train` starts a staged recipe with its first stage's sections: the bench times that (its
    batch and size as the flags' defaults, what it trains), not the top-level sections the stages override."""
    import yaml

    staged = {
        "base": "debug",
        "train": {"trainable": ["dit", "llm"], "batch_size": 4},
        "stages": [
            {"steps": 2, "train": {"trainable": ["dit"], "batch_size": 3}, "data": {"image_size": 16}},
            {"steps": 2},
        ],
    }
    (tmp_path / "staged.yaml").write_text(yaml.safe_dump(staged))
    out = tmp_path / "bench.jsonl"
    args = ["bench", str(tmp_path / "staged.yaml"), "--what", "train", "--warmup", "0", "--repeats", "1"]
    assert main([*args, "--text-tokens", "8", "--json", str(out)]) == 0
    (train,) = (json.loads(line) for line in out.read_text().splitlines())
    assert (train["batch"], train["resolution"], train["trainable"]) == (3, 16, "DiT")
    # The same from Python: bench.setup is handed the staged config itself.
    import torch

    from fusedit import bench

    s = bench.setup(load_config(str(tmp_path / "staged.yaml")), torch.device("cpu"), False)
    assert (s.cfg.stages, s.cfg.train.batch_size, s.cfg.data.image_size) == ([], 3, 16)
    assert not any(p.requires_grad for p in s.model.encoders[0].llm.parameters())
