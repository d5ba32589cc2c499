"""The randomness of a training step, and the lock that keeps train() calls' draws apart.

Everything random in a step is a function of (seed, step) and the sample's position in the step's global
batch: caption dropout and timesteps are drawn for the whole global batch from a generator seeded by
(seed, step), each sample's noise from one seeded by (seed, step, position), and the data is addressed by
step. So a run resumed from a checkpoint continues with exactly the losses of an uninterrupted run, and
how the global batch is split over processes and micro-steps changes the losses only by float rounding.

Built models draw their initial weights from torch's global generator: :func:`global_generator` gives a
train() call that generator to itself, seeded, and hands it back as it found it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch

from fusedit.system import seeded

# torch has one global generator per process (per device), which train() calls in threads share: a call
# draws from it only with this lock held and inside a fork of it (global_generator), so that one call's
# draws never land in another's seeded build and the caller's generator is left as it was. (Only train()
# calls take the lock: a build_model in another thread meanwhile still draws from the same generator.)
_GLOBAL_GENERATOR = threading.Lock()


@contextlib.contextmanager
def global_generator(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """The block has torch's global generator (CPU, and ``device``'s when it is a GPU) to itself among
    train() calls, seeded with ``seed`` when given; afterwards it is back to the state the block found."""
    with _GLOBAL_GENERATOR, seeded(seed, device):
        yield


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_seed(seed: int, step: int, position: int, stream: str = "") -> int:
    """Seed of one sample's noise: a hash, so neighbouring (step, position) pairs get unrelated streams;
    ``stream`` names another draw of the same sample (the VAE posterior's: "vae/")."""
    digest = hashlib.blake2b(f"{stream}{seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generators(seed: int, step: int, positions: range, stream: str = "") -> list[torch.Generator]:
    """One CPU generator per sample at ``positions`` of the step's global batch: each rank draws only its
    own rows (drawing the whole global batch and slicing would cost every rank the global batch's)."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, p, stream)) for p in positions]


def sample_noise(seed: int, step: int, positions: range, shape: torch.Size) -> torch.Tensor:
    """Noise for the samples at ``positions`` of the step's global batch, (len(positions), *shape) on the
    CPU."""
    return torch.stack([torch.randn(shape, generator=g) for g in sample_generators(seed, step, positions)])
