"""The training step `fusedit bench` times is the one `fusedit train` runs (train.loop's flow_backward,
finish_gradients, take_update, on the parts train.trainable trains), and neither the bench's setup nor the
demo touches the caller's global random generators."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from fusedit import bench
from fusedit.train import loop
from fusedit.train.stages import Optimizers

CPU = torch.device("cpu")


def watch_text_forwards(model, seen: list) -> None:
    """Append, at every forward of each LLM of ``model``, (autocast on, autograd on, weights trained)."""
    for enc in model.encoders:
        enc.llm.register_forward_pre_hook(
            lambda mod, args: seen.append(
                (
                    torch.is_autocast_enabled(CPU.type),
                    torch.is_grad_enabled(),
                    any(p.requires_grad for p in mod.parameters()),
                )
            )
        )


def one_call(fn, device, warmup, repeats, runs=1):
    """bench.time_it without the repeats: ``runs`` steps, as one timing takes them."""
    for _ in range(runs):
        fn()
    return 1.0


def run_bench_train(monkeypatch, cfg, bf16: bool, watch: list | None = None) -> None:
    """bench_train of ``cfg`` at batch 2 on the CPU: a priming step and one timing (STEPS_PER_TIMING)."""
    monkeypatch.setattr(bench, "time_it", one_call)
    monkeypatch.setattr(bench, "overlapped_cost", lambda *a: 0.0)
    s = bench.setup(cfg, CPU, bf16)
    if watch is not None:
        watch_text_forwards(s.model, watch)
    bench.bench_train(s, 2, cfg.data.image_size, 8, 0, 1)


def run_train(monkeypatch, cfg, out, watch: list | None = None) -> list[dict]:
    """train() of ``cfg`` into ``out``; its metrics.jsonl records."""
    build = loop.build_model

    def watching_build(cfg, device, **kwargs):
        model = build(cfg, device, **kwargs)
        watch_text_forwards(model, watch)
        return model

    if watch is not None:
        monkeypatch.setattr(loop, "build_model", watching_build)
    loop.train(cfg, out, progress=False)
    monkeypatch.setattr(loop, "build_model", build)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("train", "llm"),
    [
        ({}, (True, False, False)),  # frozen: its own dtype, no autograd
        ({"trainable": ["dit", "llm"], "llm_lora": {"rank": 2}}, (True, True, True)),
        ({"trainable": ["dit", "llm"], "llm_top_layers": 1}, (True, True, True)),
    ],
    ids=["frozen-llm", "llm-lora", "llm-top-layer"],
)
def test_the_bench_runs_the_llm_as_training_does(train, llm, tmp_path, monkeypatch):
    """The bench ran every LLM frozen, outside autocast, whatever train.trainable said: a LoRA or top-layer
    fine-tune's step was timed without the LLM's adapters, autograd and backward. Under train.precision=bf16
    (autocast on the CPU too), the LLM's forward in the bench is the run's: under the denoiser's autocast
    when it trains, in its own dtype when frozen."""
    pytest.importorskip("peft")
    cfg = tiny_config(train={"steps": 1, "precision": "bf16", **train})
    in_train, in_bench = [], []
    run_train(monkeypatch, cfg, tmp_path / "run", in_train)
    run_bench_train(monkeypatch, cfg, True, in_bench)
    autocast, grad, trained = llm
    # Frozen, the LLM runs outside the denoiser's autocast: the text forward's own is off.
    expected = {(autocast and trained, grad, trained)}
    assert set(in_train) == expected  # the run's (previews off: every forward is a step's)
    assert set(in_bench) == expected


def test_the_bench_sets_the_learning_rates_a_run_sets_at_its_first_steps(tmp_path, monkeypatch):
    """The bench never set a learning rate: its AdamW stepped at train.lr (train.llm_lr) from the first
    step, where a run warms up; the schedule's per-step set_lr went untimed."""
    pytest.importorskip("peft")
    steps = 1 + bench.STEPS_PER_TIMING  # the bench's priming step, then one timing
    cfg = tiny_config(
        train={
            "steps": steps,
            "warmup_steps": 3,
            "schedule": "cosine",
            "trainable": ["dit", "llm"],
            "llm_lora": {"rank": 2},
            "llm_lr": 5e-4,
        }
    )
    records = run_train(monkeypatch, cfg, tmp_path / "run")
    set_lrs, real_set_lr = [], Optimizers.set_lr
    monkeypatch.setattr(Optimizers, "set_lr", lambda self, lr_of: set_lrs.append(real_set_lr(self, lr_of)))
    run_bench_train(monkeypatch, cfg, False)
    ran = [{"denoiser": r["lr"], "llm": r["llm_lr"]} for r in records]
    assert set_lrs == ran
    assert ran[0] == {"denoiser": 1e-3 / 3, "llm": 5e-4 / 3}  # warming up


def test_bench_setup_leaves_the_callers_generator_as_it_was():
    """setup reseeded torch's global generator (and every GPU's) with 0 before the build: a caller's
    random draws after it were the same whatever it had seeded. Its weights are still those of seed 0."""
    cfg = tiny_config()
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.random.get_rng_state()
        s = bench.setup(cfg, CPU, False)
        assert torch.equal(torch.random.get_rng_state(), before)
        weights.append(torch.cat([p.detach().flatten() for p in s.model.denoiser.parameters()]))
    assert torch.equal(*weights)


def test_the_demo_leaves_the_callers_generator_as_it_was_and_samples_what_it_did(tmp_path):
    """run_demo reseeded the global generator with 0 before sampling, which draws from its own generators
    (generate's seeds): it changed no image, only the caller's later draws. Loading the model for the sheet
    (load_model, whatever calls it) draws the build's random weights, which the checkpoint's replace, in a
    fork of it."""
    from fusedit.checkpoints import load_model
    from fusedit.demo import run_demo

    cfg = tiny_config(train={"steps": 2}, sample={"steps": 2})
    sheets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.random.get_rng_state()
        result = run_demo(cfg, tmp_path / "demo", progress=False, overwrite=True)
        assert torch.equal(torch.random.get_rng_state(), before)
        sheets.append(result["samples"].read_bytes())
    assert sheets[0] == sheets[1]
    before = torch.random.get_rng_state()
    load_model(tmp_path / "demo")
    assert torch.equal(torch.random.get_rng_state(), before)
