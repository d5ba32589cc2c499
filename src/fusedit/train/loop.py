"""The training loop, top to bottom: build, (resume), then for each step: batch -> text context once ->
flow-matching loss -> AdamW step -> EMA -> log -> atomic checkpoint.

Everything random in a step is a function of (seed, step) and the sample's position in the step's global
batch: caption dropout and timesteps are drawn for the whole global batch from a generator seeded by
(seed, step), each sample's noise from one seeded by (seed, step, position), and the data is addressed by
step. So a run resumed from a checkpoint continues with exactly the losses of an uninterrupted run, and
how the global batch is split over processes and micro-steps changes the losses only by float rounding.

Under torchrun (``torchrun --nproc_per_node N -m fusedit train ...``) every process runs this same loop on
its share of each global batch of ``batch_size * grad_accum * N`` samples: the denoiser is wrapped by DDP
or sharded by FSDP2 (``train.parallel``), checkpoints go through Distributed Checkpoint, and rank 0 alone
logs, writes metrics and publishes checkpoints (see :mod:`fusedit.train.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusedit.config import Config, ConfigError, save_config
from fusedit.data.loader import is_stream, step_loader
from fusedit.flow import flow_loss, interpolate, sample_training_times
from fusedit.system import TextToImage, build_model
from fusedit.train import distributed
from fusedit.train.checkpoint import (
    data_state_name,
    find_checkpoint,
    load_training_state,
    save_checkpoint,
    save_distributed_checkpoint,
)
from fusedit.train.distributed import DistEnv
from fusedit.train.ema import EMA

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether train.precision resolves to bf16 here ("auto": CUDA with bf16 support)."""
    return precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights where the device supports it ("auto": CUDA with bf16)."""
    if uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of one sample's noise: a hash, so neighbouring (step, position) pairs get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_noise(seed: int, step: int, positions: range, shape: torch.Size) -> torch.Tensor:
    """Noise for the samples at ``positions`` of the step's global batch, (len(positions), *shape) on the
    CPU. One generator per sample: each rank draws only its own rows (drawing the whole global batch and
    slicing would cost every rank the global batch's noise)."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, step, p)))
            for p in positions
        ]
    )


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


@torch.no_grad()
def _preview(model: TextToImage, cfg: Config, captions: list[str], path: Path) -> None:
    """A labelled grid of this step's captions sampled with the current (not EMA) weights, fixed seed.

    Rank 0 alone runs it: the local module, no collectives (FSDP runs refuse previews, see train())."""
    from fusedit.imaging import image_grid, save_png, to_uint8
    from fusedit.sample import generate, sample_settings

    was_training = model.denoiser.training
    model.denoiser.eval()
    images = generate(model, captions, seed=cfg.sample.seed, **sample_settings(cfg))
    model.denoiser.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(list(to_uint8(images)), captions, scale=max(1, 96 // cfg.data.image_size)), path)


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step so the metrics file reads like one uninterrupted run (and a
    line cut short by a kill)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _saved_data_state(ckpt: Path, saved: dict, env: DistEnv, cfg: Config) -> dict | None:
    """This rank's data position from the checkpoint, when the run that wrote it split the data the same way
    (same world size and per-rank batch). Otherwise None: index-addressable sources derive the position from
    the step alone; a stream's saved positions cannot be mapped onto another split (a warning says so)."""
    tc = cfg.train
    per_rank = tc.batch_size * tc.grad_accum
    saved_per_rank = int(saved.get("batch_size", tc.batch_size)) * int(saved.get("grad_accum", 1))
    saved_world = int(saved.get("world_size", 1))
    if saved_world == env.world_size and saved_per_rank == per_rank:
        path = ckpt / data_state_name(env.rank)
        return json.loads(path.read_text()) if path.is_file() else None
    if not env.is_main:
        return None
    if is_stream(cfg.data):
        log.warning(
            "data: the checkpoint's stream positions are for %d processes x %d samples, this run has "
            "%d x %d; each rank re-reads its new shard of the stream from the start up to step %d (slow, "
            "and not the samples the old run would have read next)",
            saved_world,
            saved_per_rank,
            env.world_size,
            per_rank,
            int(saved["step"]),
        )
    else:
        log.info(
            "data: the checkpoint was written by another split of the batch; position derived from the step"
        )
    return None


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``cfg`` into ``run_dir``. ``stop_at`` ends early (as an interruption would) after that step.

    Under torchrun this process joins the process group (NCCL on CUDA, gloo on the CPU), trains its share
    and leaves the group at the end; a group the caller initialised is used and left up.

    Returns {"losses": [...] global mean loss of the steps run in this call, "step": last step, "run_dir",
    "model", "ema", "skipped_steps", "rank", "world_size"}.
    """
    env = distributed.setup(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        with distributed.quiet_unless_main(env):
            return _train(cfg, Path(run_dir), env, resume=resume, stop_at=stop_at, progress=progress)
    finally:
        distributed.teardown(env)


def _train(cfg: Config, run_dir: Path, env: DistEnv, *, resume: bool, stop_at: int | None, progress: bool):
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device, main = env.device, env.is_main
    parallel = distributed.resolve_parallel(tc.parallel, env)
    if tc.preview_every and parallel == "fsdp":
        raise ConfigError(
            "train.preview_every needs the whole model on rank 0, which train.parallel=fsdp shards "
            "(allowed: preview_every=0 with fsdp, or parallel=ddp)"
        )
    torch.manual_seed(tc.seed)
    model = build_model(cfg, device)
    denoiser = model.denoiser
    metrics_path = run_dir / "metrics.jsonl"

    ckpt = None
    if resume:
        try:
            ckpt = find_checkpoint(run_dir)
        except FileNotFoundError:
            if main:
                log.warning("--resume: no checkpoint in %s yet, starting from step 0", run_dir)
        found = distributed.broadcast_object(None if ckpt is None else str(ckpt), env)
        ckpt = None if found is None else Path(found)
    if ckpt is None:
        if main:
            metrics_path.unlink(missing_ok=True)
        if cfg.text.pretrain_steps and not cfg.text.model_id:
            from fusedit.data.shapes import caption_corpus
            from fusedit.text.pretrain import pretrain_llm

            corpus = caption_corpus(4096, seed=tc.seed)
            pretrain_llm(
                model.text, corpus, cfg.text.pretrain_steps, seed=tc.seed, progress=progress and main
            )

    save_llm = llm_needs_saving(cfg, model)
    sharded_llms = []
    if env.distributed:
        if save_llm:  # built at random or pretrained by every rank: rank 0's copy is the one that is saved
            distributed.broadcast_module(model.text.llm)
        if tc.shard_llm:
            for encoder in model.encoders:
                if encoder.trainable:
                    raise ConfigError(
                        "train.shard_llm=true needs a frozen LLM (this one has trainable weights)"
                    )
                distributed.shard_frozen(encoder.llm)
                sharded_llms.append(encoder.llm)
    denoiser.set_gradient_checkpointing(tc.grad_checkpointing)
    if tc.compile:
        denoiser.compile_blocks(tc.compile)
    forward = distributed.wrap_denoiser(denoiser, parallel, env, uses_bf16(tc.precision, device))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",
    )
    ema = EMA(denoiser, tc.ema_decay)

    start = 0
    data_state = None
    if ckpt is not None:
        llm = model.text.llm if save_llm else None
        saved = load_training_state(ckpt, denoiser, optimizer, ema, llm, distributed=env.distributed)
        start = int(saved["step"])
        log.info("resumed from %s (step %d)", ckpt, start)
        if main:
            _rewind_metrics(metrics_path, start)
        data_state = _saved_data_state(ckpt, saved, env, cfg)
    if main:
        save_config(cfg, run_dir / "config.yaml")

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    if cfg.data.source == "latents":
        from fusedit.data.latents import check_latents

        check_latents(cfg.data, cfg.vae)

        def to_latents(batch, rows: slice):  # pre-encoded by `fusedit cache-latents`
            return batch["latent"][rows].to(device)
    else:

        def to_latents(batch, rows: slice):
            return model.autoencoder.encode(batch["image"][rows].to(device))

    # Each rank reads its batch_size * grad_accum samples of every step (the loader's rank/world_size
    # addressing); micro-step m takes rows [m * batch_size, (m + 1) * batch_size) of them.
    micro, accum = tc.batch_size, tc.grad_accum
    per_rank = micro * accum
    global_batch = per_rank * env.world_size
    first_row = env.rank * per_rank  # this rank's rows in the step's global batch
    loader = step_loader(
        cfg.data, tc.seed, per_rank, start, end, rank=env.rank, world_size=env.world_size, state=data_state
    )
    autocast = autocast_for(tc.precision, device)
    bad_in_row = bad_total = 0
    losses: list[float] = []
    denoiser.train()
    bar = tqdm(
        total=end - start, initial=0, desc=f"train {cfg.name}", disable=not (progress and main), unit="step"
    )
    extra = {"batch_size": micro, "grad_accum": accum, "world_size": env.world_size, "parallel": parallel}
    with contextlib.ExitStack() as stack:
        metrics = stack.enter_context(metrics_path.open("a")) if main else None
        for step, batch in zip(range(start, end), loader):
            t0 = time.perf_counter()
            # The global batch's dropout and times from (seed, step), then this rank's rows: the losses are
            # the same however the global batch is split over ranks and micro-steps.
            gen = step_generator(tc.seed, step)
            keep = (torch.rand(global_batch, generator=gen) >= cfg.data.caption_dropout).tolist()
            times = sample_training_times(
                global_batch, gen, cfg.flow.logit_mean, cfg.flow.logit_std, cfg.flow.shift
            )
            loss_sum = torch.zeros((), device=device)
            for m in range(accum):
                local = slice(m * micro, (m + 1) * micro)
                rows = range(first_row + local.start, first_row + local.stop)
                captions = [
                    c if k else "" for c, k in zip(batch["caption"][local], keep[rows.start : rows.stop])
                ]
                x0 = to_latents(batch, local)
                noise = sample_noise(tc.seed, step, rows, x0.shape[1:]).to(device)
                t = times[rows.start : rows.stop].to(device)
                with distributed.gradient_sync(forward, parallel, sync=m == accum - 1):
                    text = model.encode_prompts(captions)  # one LLM forward, no autograd when frozen
                    for llm in sharded_llms:
                        distributed.reshard(llm)
                    with autocast:
                        v = forward(interpolate(x0, noise, t), t, text)
                    loss = flow_loss(v, x0, noise)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            loss_mean = distributed.mean_over_ranks(loss_sum / accum, env)
            grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
            lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.schedule, tc.steps)
            loss_value = loss_mean.item()  # the one host sync of a step (logging needs it anyway)
            # Every rank sees the same global loss and gradient norm, so all skip or all step together.
            if math.isfinite(loss_value) and math.isfinite(float(grad_norm)):
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                bad_in_row = 0
            else:  # skip the update: the weights stay as they were
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                if main:
                    log.warning(
                        "step %d: loss %s, grad norm %s: update skipped", step + 1, loss_value, grad_norm
                    )
                if bad_in_row >= tc.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} steps in a row had a NaN/inf loss or gradient (train.max_bad_steps="
                        f"{tc.max_bad_steps}) at step {step + 1}; lower train.lr or check the data"
                    )
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % tc.ema_every == 0:
                ema.update(denoiser)
            losses.append(loss_value)
            if metrics is not None:
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
                    recent = losses[-tc.log_every :]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            bar.update(1)
            if main and tc.preview_every and (step + 1) % tc.preview_every == 0:
                _preview(model, cfg, batch["caption"][:8], run_dir / "previews" / f"step_{step + 1:08d}.png")
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
                if metrics is not None:
                    metrics.flush()
                data = json.dumps(loader.state_dict())
                args = (run_dir, step + 1, cfg, denoiser, ema.state_dict(), optimizer)
                common = dict(
                    llm=model.text.llm if save_llm else None,
                    keep=tc.keep_checkpoints,
                    extra={"skipped_steps": bad_total, **extra},
                )
                if env.distributed:
                    save_distributed_checkpoint(
                        *args, rank=env.rank, rank_files={data_state_name(env.rank): data}, **common
                    )
                else:
                    save_checkpoint(*args, files={"data_state.json": data}, **common)
    bar.close()
    report = loader.skipped_report()
    if report:
        log.info("data: %s", report if env.world_size == 1 else f"rank 0: {report}")
    # Rank 0 publishes the last checkpoint before any rank returns (or leaves the process group).
    distributed.barrier(env)
    return {
        "losses": losses,
        "step": end,
        "run_dir": run_dir,
        "model": model,
        "ema": ema,
        "skipped_steps": bad_total,
        "rank": env.rank,
        "world_size": env.world_size,
    }
