"""The training loop, top to bottom: build, (resume), then for each step: batch -> text context once ->
flow-matching loss -> AdamW step -> EMA -> log -> atomic checkpoint.

Everything random in a step (caption dropout, noise, timesteps) is drawn from a generator seeded by
(seed, step), and the data is addressed by step, so a run resumed from a checkpoint continues with
exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusedit.config import Config, save_config
from fusedit.data.loader import step_loader
from fusedit.flow import drop_captions, flow_loss, interpolate, sample_training_times
from fusedit.system import TextToImage, build_model
from fusedit.train.checkpoint import find_checkpoint, load_state, load_tensors, save_checkpoint
from fusedit.train.ema import EMA

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights where the device supports it ("auto": CUDA with bf16)."""
    bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def learning_rate(step: int, base: float, warmup: int, schedule: str = "constant", total: int = 1) -> float:
    """Linear warmup, then constant (the FuseDiT recipe) or cosine decay to 0 at ``total`` steps."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base


def llm_needs_saving(cfg: Config, model: TextToImage) -> bool:
    """A random-init (or pretrained-here, or trained) LLM cannot be reloaded from a hub id."""
    return not cfg.text.model_id or model.text.trainable


def restore(model: TextToImage, ckpt: Path, ema: EMA, optimizer: torch.optim.Optimizer) -> int:
    """Load weights, EMA and optimizer state from a checkpoint; returns its step."""
    model.denoiser.load_state_dict(load_tensors(ckpt, "denoiser"))
    llm = load_tensors(ckpt, "llm")
    if llm is not None:
        model.text.llm.load_state_dict(llm)
    ema.load_state_dict(load_tensors(ckpt, "ema"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return int(load_state(ckpt)["step"])


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step so the metrics file reads like one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``cfg`` into ``run_dir``. ``stop_at`` ends early (as an interruption would) after that step.

    Returns {"losses": [...] of the steps run in this call, "step": last step, "run_dir": Path}.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = build_model(cfg, device)
    denoiser = model.denoiser
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",
    )
    ema = EMA(denoiser, tc.ema_decay)
    metrics_path = run_dir / "metrics.jsonl"

    start = 0
    ckpt = None
    if resume:
        try:
            ckpt = find_checkpoint(run_dir)
        except FileNotFoundError:
            log.warning("--resume: no checkpoint in %s yet, starting from step 0", run_dir)
    data_state = None
    if ckpt is not None:
        start = restore(model, ckpt, ema, optimizer)
        log.info("resumed from %s (step %d)", ckpt, start)
        _rewind_metrics(metrics_path, start)
        if (ckpt / "data_state.json").is_file():
            data_state = json.loads((ckpt / "data_state.json").read_text())
    else:
        metrics_path.unlink(missing_ok=True)
        if cfg.text.pretrain_steps and not cfg.text.model_id:
            from fusedit.data.shapes import caption_corpus
            from fusedit.text.pretrain import pretrain_llm

            corpus = caption_corpus(4096, seed=tc.seed)
            pretrain_llm(model.text, corpus, cfg.text.pretrain_steps, seed=tc.seed, progress=progress)
    save_config(cfg, run_dir / "config.yaml")

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    if cfg.data.source == "latents":
        from fusedit.data.latents import check_latents

        check_latents(cfg.data, cfg.vae)

        def to_latents(batch):  # pre-encoded by `fusedit cache-latents`
            return batch["latent"].to(device)
    else:

        def to_latents(batch):
            return model.autoencoder.encode(batch["image"].to(device))

    loader = step_loader(cfg.data, tc.seed, tc.batch_size, start, end, state=data_state)
    autocast = autocast_for(tc.precision, device)
    bad_in_row = bad_total = 0
    save_llm = llm_needs_saving(cfg, model)
    losses: list[float] = []
    denoiser.train()
    bar = tqdm(total=end - start, initial=0, desc=f"train {cfg.name}", disable=not progress, unit="step")
    with metrics_path.open("a") as metrics:
        for step, batch in zip(range(start, end), loader):
            t0 = time.perf_counter()
            gen = step_generator(tc.seed, step)
            captions = drop_captions(batch["caption"], cfg.data.caption_dropout, gen)
            x0 = to_latents(batch)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = sample_training_times(
                x0.shape[0], gen, cfg.flow.logit_mean, cfg.flow.logit_std, cfg.flow.shift
            ).to(device)
            text = model.encode_prompts(captions)  # one LLM forward, no autograd when frozen
            with autocast:
                v = denoiser(interpolate(x0, noise, t), t, text)
            loss = flow_loss(v, x0, noise)

            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.schedule, tc.steps)
            loss_value = loss.item()  # the one host sync of a step (logging needs it anyway)
            if math.isfinite(loss_value) and math.isfinite(float(grad_norm)):
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                bad_in_row = 0
            else:  # skip the update: the weights stay as they were
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                log.warning("step %d: loss %s, grad norm %s: update skipped", step + 1, loss_value, grad_norm)
                if bad_in_row >= tc.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} steps in a row had a NaN/inf loss or gradient (train.max_bad_steps="
                        f"{tc.max_bad_steps}) at step {step + 1}; lower train.lr or check the data"
                    )
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % tc.ema_every == 0:
                ema.update(denoiser)
            losses.append(loss_value)
            record = {
                "step": step + 1,
                "loss": loss_value,
                "grad_norm": float(grad_norm),
                "lr": lr,
                "sec": round(time.perf_counter() - t0, 4),
            }
            metrics.write(json.dumps(record) + "\n")
            if (step + 1) % tc.log_every == 0:
                metrics.flush()
                bar.set_postfix(loss=f"{sum(losses[-tc.log_every :]) / len(losses[-tc.log_every :]):.4f}")
            bar.update(1)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
                metrics.flush()
                save_checkpoint(
                    run_dir,
                    step + 1,
                    cfg,
                    denoiser,
                    ema.state_dict(),
                    optimizer,
                    model.text.llm if save_llm else None,
                    keep=tc.keep_checkpoints,
                    extra={"skipped_steps": bad_total},
                    files={"data_state.json": json.dumps(loader.state_dict())},
                )
    bar.close()
    report = loader.skipped_report()
    if report:
        log.info("data: %s", report)
    return {
        "losses": losses,
        "step": end,
        "run_dir": run_dir,
        "model": model,
        "ema": ema,
        "skipped_steps": bad_total,
    }
