import pytest
import torch

from conftest import tiny_vae
from fusedit.config import ConfigError, VAEConfig
from fusedit.vae import DiffusersAutoencoder, IdentityAutoencoder, load_autoencoder


def test_identity_autoencoder_is_pixel_space():
    ae = IdentityAutoencoder()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert ae.decode(torch.full((1, 3, 2, 2), 5.0)).max() == 1.0


def test_diffusers_vae_applies_its_shift_and_scale():
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.25)
    ae = DiffusersAutoencoder(vae)
    assert (ae.channels, ae.downsample, ae.scale, ae.shift) == (4, 2, 1.5, 0.25)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    z = ae.encode(x)
    torch.manual_seed(0)
    raw = vae.encode(x).latent_dist.sample()
    torch.testing.assert_close(z, (raw - 0.25) * 1.5)
    torch.testing.assert_close(ae.decode(z), vae.decode(raw).sample.clamp(-1, 1))
    assert z.shape == (1, 4, 8, 8) and not any(p.requires_grad for p in vae.parameters())


def test_a_vae_path_to_nothing_is_named_as_one(tmp_path):
    """Not taken for a hub id (whose error would be about the hub being unreachable)."""
    cfg = VAEConfig(kind="diffusers", model_id=str(tmp_path / "novae"), latent_channels=4, downsample=8)
    with pytest.raises(ConfigError) as e:
        load_autoencoder(cfg)
    assert str(e.value) == (
        f"vae.model_id={str(tmp_path / 'novae')!r} is a path to nothing (allowed: a folder written by "
        "save_pretrained, or a hub id written org/name)"
    )
