"""The standard FID features: clean-fid's Inception-v3 (design-space.md s.4, "FID on MJHQ-30K (clean-fid,
512 px)"), without the clean-fid package (which needs torchvision, and downloads its network at import
of a run).

What clean-fid computes in its default ``mode="clean"`` (github.com/GaParmar/clean-fid, ``resize.py``,
``inception_torchscript.py``), and what this module does the same way:

1. each image is decoded to 8-bit RGB (H, W, 3);
2. each channel is resized on its own to 299x299 as a float32 image with PIL's bicubic filter, so no
   aliasing and no rounding back to 8 bits (the point of "clean" resizing), then clipped to [0, 255];
3. the (B, 3, 299, 299) batch in [0, 255] is normalised to (x - 128) / 128;
4. the ``layers`` module of the TorchScript network StyleGAN2-ADA publishes
   (``inception-2015-12-05.pt``, a port of TensorFlow's FID Inception) gives (B, 2048) pool features.

The Frechet distance of those features is then ``fid.frechet_distance``, the same formula clean-fid
evaluates with scipy. One difference, on purpose: images are decoded as everywhere else in fusedit
(``fid.load_image``: EXIF orientation applied, transparency composited on white), where clean-fid calls
``convert("RGB")``; the two agree on MJHQ-30K's JPEGs and on fusedit's PNG samples.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.eval.fid import TransformersImageFeatures, decoded_image
from fusedit.files import files_digest
from fusedit.system import resolve_device

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_SIZE = 299
# The extractor id that names cached reference statistics: the protocol, not the file's place, so that a
# copy of the same network elsewhere reuses them (its fingerprint still tells the weights apart).
INCEPTION_ID = "clean-fid:inception-2015-12-05"


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's resize of an (H, W, 3) uint8 image: (size, size, 3) float32 in [0, 255], each channel
    resized alone as a 32-bit float image. Bicubic overshoot (values below 0 or above 255 next to sharp
    edges) is clipped, as clean-fid's ``make_resizer`` clips it: kept, it would shift the features of
    every high-contrast image away from clean-fid's and the reference statistics computed with it."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of shape {image.shape}; expected (H, W, 3) RGB")
    channels = [
        np.asarray(
            Image.fromarray(image[:, :, c].astype(np.float32)).resize(
                (size, size), resample=Image.Resampling.BICUBIC
            )
        ).clip(0, 255)
        for c in range(3)
    ]
    return np.stack(channels, axis=2)


class CleanInceptionFeatures:
    """clean-fid's Inception-v3 as a ``FeatureExtractor``: images -> (B, 2048) float32 pool features.

    ``path`` is the TorchScript file ``inception-2015-12-05.pt`` (``INCEPTION_URL``) or a folder holding
    it. It is loaded with ``torch.jit.load``; only its ``layers`` module runs, on inputs resized and
    normalised as clean-fid does (see the module docstring)."""

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None):
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / INCEPTION_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no Inception network at {str(path)!r}; allowed: the TorchScript file {INCEPTION_FILE} "
                f"that clean-fid uses, downloaded from {INCEPTION_URL}"
            )
        self.device = resolve_device(device)
        try:
            with warnings.catch_warnings():
                # The network is only published as TorchScript: jit.load is the one way to read it.
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=Warning)
                network = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"{str(path)!r} is not a TorchScript file ({reason}); allowed: clean-fid's {INCEPTION_FILE} "
                f"from {INCEPTION_URL}"
            ) from None
        layers = getattr(network, "layers", None)
        if not isinstance(layers, torch.nn.Module):
            raise ConfigError(
                f"{str(path)!r} has no `layers` module; allowed: clean-fid's {INCEPTION_FILE} from "
                f"{INCEPTION_URL}"
            )
        self.layers = layers.eval()
        self.id = INCEPTION_ID
        # The weights, not their place (the file's name, size and first MiB): with the place-free ``id``, a
        # copy of the network elsewhere reuses the cached reference statistics instead of recomputing them.
        # "+clip": the features of clean_resize's clipped resize; caches written before it (unclipped, no
        # suffix) describe other features and are recomputed.
        self.fingerprint = f"{path.name}#{files_digest(path.parent, [path], 1 << 20)[:16]}+clip"

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        batch = np.stack([clean_resize(np.asarray(decoded_image(i))) for i in images])  # (B, 299, 299, 3)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        features = self.layers((x - 128) / 128)
        return features.reshape(len(images), -1).float().cpu()


def feature_extractor(features: str, *, device=None):
    """The extractor a ``--features`` value names: a ``.pt`` file (or a folder holding
    ``inception-2015-12-05.pt``) is clean-fid's Inception, the standard FID; anything else is a transformers
    vision model by hub id or folder (FD_DINOv2, FD_CLIP, ...)."""
    place = Path(features).expanduser()
    if place.suffix == ".pt" or (place / INCEPTION_FILE).is_file():
        return CleanInceptionFeatures(place, device=device)
    if place.is_file():
        raise ConfigError(
            f"--features {features!r} is a file but not a .pt (allowed: clean-fid's Inception "
            f"{INCEPTION_FILE}, or a transformers vision model hub id or folder)"
        )
    return TransformersImageFeatures(features, device=device)
