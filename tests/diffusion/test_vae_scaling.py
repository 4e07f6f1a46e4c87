"""VAEScaling: the one latents = (z - shift) * scale helper, as diffusers' pipelines apply the VAE config."""
from types import SimpleNamespace

import torch

from diffusion.models.latents import VAECodec, VAEScaling


def test_round_trip_and_closed_form():
    s = VAEScaling(scale=1.5305, shift=0.0609)  # SD3's VAE
    z = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(s.normalize(z), (z - 0.0609) * 1.5305, rtol=0, atol=0)
    torch.testing.assert_close(s.denormalize(s.normalize(z)), z, rtol=1e-15, atol=1e-15)


def test_of_reads_a_vae_or_its_config_and_defaults_the_shift():
    sd = SimpleNamespace(scaling_factor=0.18215)  # SD1/2/XL configs have no shift_factor
    assert VAEScaling.of(sd) == VAEScaling(0.18215, 0.0)
    assert VAEScaling.of(SimpleNamespace(scaling_factor=0.18215, shift_factor=None)).shift == 0.0
    assert VAEScaling.of(SimpleNamespace(config=SimpleNamespace(scaling_factor=1.5, shift_factor=0.1))) == \
        VAEScaling(1.5, 0.1)


def test_matches_diffusers_sd3_latent_convention_and_the_codec():
    """diffusers' SD3 pipeline decodes latents / scaling_factor + shift_factor; VAECodec and the pipelines use it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, scaling_factor=1.5,
                        shift_factor=0.25, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",)).eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    codec = VAECodec(vae)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        latents = codec.encode(x)
        torch.testing.assert_close(latents, (z - 0.25) * 1.5)
        torch.testing.assert_close(codec.decode(latents), vae.decode(latents / 1.5 + 0.25).sample.clamp(-1, 1))
    assert (codec.scaling_factor, codec.shift_factor) == (1.5, 0.25)
