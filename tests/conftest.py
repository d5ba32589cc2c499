"""Tiny, offline building blocks for the tests: random-init LLMs of every supported family."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from fusedit.config import VARIANTS, config_from_dict
from fusedit.flow import SAMPLERS, SCHEDULES
from fusedit.layers.modulation import TIMESTEP_CONDITIONING
from fusedit.layers.position import POSITION_SCHEMES
from fusedit.models import DESIGNS
from fusedit.models.base import POOLED_TEXT
from fusedit.text.refiner import CONCATS
from fusedit.text.templates import TEMPLATES

FAMILIES = ("gemma", "gemma2", "qwen2", "qwen3", "llama", "mistral")
POSITIONS = ("ape", "1d-rope", "2d-rope", "m-rope")

TINY_ARCH = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
}

# A random-init CLIP text model (FuseDiT clip-mod's pooled encoder).
TINY_CLIP_ARCH = {
    "vocab_size": 64,
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
    "projection_dim": 20,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

TINY = {
    "name": "tiny",
    "model": {"dit_hidden_size": 32, "patch_size": 2},
    "text": {"family": "gemma", "arch": TINY_ARCH, "max_length": 16},
    "data": {"image_size": 16, "max_objects": 2, "kinds": ["single", "two", "position"]},
    "flow": {"shift": 1.0},
    "train": {
        "steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "checkpoint_every": 3,
        "log_every": 1,
        "ema_every": 1,
        "warmup_steps": 0,
    },
    "sample": {"steps": 3, "guidance": 3.0, "shift": 1.0},
}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(**sections):
    """The tiny config with per-section overrides, e.g. tiny_config(model={"pos_embed": "2d-rope"})."""
    return config_from_dict(_merge(TINY, sections))


# Each registry-backed setting and the registry its names build from.
REGISTRIES = {
    "model.design": DESIGNS,
    "model.pos_embed": POSITION_SCHEMES,
    "model.timestep_conditioning": TIMESTEP_CONDITIONING,
    "model.pooled_text": POOLED_TEXT,
    "model.refiner_concat": CONCATS,
    "text.template": TEMPLATES,
    "sample.sampler": SAMPLERS,
    "sample.schedule": SCHEDULES,
}


@pytest.fixture(autouse=True)
def restore_registries():
    """Registrations live for the process: each test's are undone, so that other tests see the built-ins."""
    saved = {key: (dict(VARIANTS[key].traits), dict(REGISTRIES[key])) for key in REGISTRIES}
    modules = set(sys.modules)
    yield
    for key, (names, implementations) in saved.items():
        VARIANTS[key].traits.clear()
        VARIANTS[key].traits.update(names)
        REGISTRIES[key].clear()
        REGISTRIES[key].update(implementations)
    for name in set(sys.modules) - modules:
        if name.startswith("registry_plugin"):
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(module: torch.nn.Module, std: float = 0.1) -> None:
    """Give zero-initialised parameters (adaLN-Zero, output projection) random values, so that tests
    compare real computations rather than outputs that are zero by construction."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def watch_llm_forwards(monkeypatch) -> list[bool]:
    """Make training build models whose LLM appends, at every forward, whether autograd was on."""
    from fusedit.train import loop

    calls = []
    build = loop.build_model

    def watching_build(cfg, device, **kwargs):
        model = build(cfg, device, **kwargs)
        model.text.llm.register_forward_hook(lambda mod, args, out: calls.append(torch.is_grad_enabled()))
        return model

    monkeypatch.setattr(loop, "build_model", watching_build)
    return calls


class CtrlCAtStep:
    """While armed, training's loss raises KeyboardInterrupt at its ``step``-th call (1-based) since arming,
    as a Ctrl+C at that step would."""

    def __init__(self, monkeypatch, step: int):
        from fusedit.train import loop

        self.monkeypatch, self.loop, self.step = monkeypatch, loop, step
        self.real, self.calls = loop.flow_loss, 0
        self.arm()

    def arm(self) -> None:
        self.calls = 0
        self.monkeypatch.setattr(self.loop, "flow_loss", self._loss)

    def disarm(self) -> None:
        self.monkeypatch.setattr(self.loop, "flow_loss", self.real)

    def _loss(self, *args):
        self.calls += 1
        if self.calls == self.step:
            raise KeyboardInterrupt
        return self.real(*args)


def counting_backend(graphs: list):
    """A torch.compile backend that records each graph it is handed and runs it as is."""

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def rmtree_dying_after_one_weight_file(real, kill: BaseException, name: str = "denoiser.safetensors"):
    """shutil.rmtree that, given a folder holding a file ``name`` (a glob pattern) anywhere beneath,
    deletes that file and raises ``kill``: a kill in the middle of a deletion, which goes in no set order."""

    def rmtree(path, *args, **kwargs):
        weights = next(Path(path).rglob(name), None) if Path(path).is_dir() else None
        if weights is None:
            return real(path, *args, **kwargs)
        weights.unlink()
        raise kill

    return rmtree


def tiny_vae(**config):
    """A random-init diffusers AutoencoderKL: 4 latent channels, 2x downsampling, a few thousand weights."""
    from diffusers import AutoencoderKL

    kw = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
    )
    return AutoencoderKL(**{**kw, **config})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder of an untrained tiny model that samples in 2 fp32 steps: for the benchmark commands."""
    from fusedit.system import build_model
    from fusedit.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config(sample={"steps": 2, "precision": "fp32"})
    model = build_model(cfg)
    save_checkpoint(root / "run", 0, cfg, model.denoiser, None, None, model.text.llm)
    return root / "run"
