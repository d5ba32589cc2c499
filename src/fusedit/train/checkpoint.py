"""Checkpoints: one folder per save, written under a temporary name and renamed into place, so a run
killed while saving keeps its previous checkpoint intact. ``latest`` names the newest complete one.

A checkpoint folder holds:
  denoiser.safetensors  the trained DiT         ema.safetensors   its EMA (what sampling uses)
  llm.safetensors       the LLM, only when it is not reloadable from text.model_id unchanged
  optimizer.pt          optimizer state          state.json        step and bookkeeping
  config.yaml           the resolved config
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusedit.config import Config, load_config, save_config


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    cfg: Config,
    denoiser: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    llm: torch.nn.Module | None,
    extra: dict | None = None,
    keep: int = 2,
    files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``files`` are extra text files (e.g. the data position)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(denoiser.state_dict()), tmp / "denoiser.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
    if llm is not None:
        save_file(_contiguous(llm.state_dict()), tmp / "llm.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_config(cfg, tmp / "config.yaml")
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest one of a run folder; a clear error when there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints"
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / "state.json").is_file():
        return root / latest.read_text().strip()
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    if not done:
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r} (expected a run folder or a checkpoint folder)"
        )
    return done[-1]


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def load_checkpoint_config(ckpt: Path) -> Config:
    return load_config(ckpt / "config.yaml")


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor] | None:
    f = ckpt / f"{name}.safetensors"
    return load_file(f) if f.is_file() else None


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """A trained model from a run folder or checkpoint folder, EMA weights by default, in eval mode.

    Returns (model, config, checkpoint folder).
    """
    from fusedit.system import build_model

    ckpt = find_checkpoint(path)
    cfg = load_checkpoint_config(ckpt)
    model = build_model(cfg, device)
    weights = (load_tensors(ckpt, "ema") if use_ema else None) or load_tensors(ckpt, "denoiser")
    model.denoiser.load_state_dict(weights)
    llm = load_tensors(ckpt, "llm")
    if llm is not None:
        model.text.llm.load_state_dict(llm)
    return model.eval(), cfg, ckpt
