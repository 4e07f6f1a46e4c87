"""Latent cache: the VAE posterior N(mean, std^2) is cached and every draw is a fresh seeded sample,
as SD / SD3 trainers sample latent_dist each step (not the posterior mode)."""
import pytest
import torch


class Images(torch.utils.data.Dataset):
    def __init__(self, n=6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": i % 3}


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from diffusers import AutoencoderKL

    from diffusion.models.latents import VAECodec

    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(path)
    return VAECodec.from_pretrained(path)


def test_cache_holds_the_normalized_posterior(codec, tmp_path):
    from diffusion.models.latents import cache_latents

    ds = Images()
    with torch.no_grad():
        dist = codec.vae.encode(ds.x).latent_dist
    cached = cache_latents(ds, codec, tmp_path / "lat.safetensors", key="t", batch_size=4)
    torch.testing.assert_close(cached.latents, (dist.mean - 0.0609) * 1.5305)
    torch.testing.assert_close(cached.stds, dist.std * 1.5305)
    assert float(cached.stds.min()) > 0.05  # a real spread for the draws below
    item = cached[2]
    assert set(item) == {"x", "x_std", "label"} and item["label"] == 2


def test_draws_are_posterior_samples_deterministic_per_seed(codec, tmp_path):
    """Draws through a DataLoader: empirical mean / std over seeds = the posterior's, same generator ->
    same latents, and a draw is not the mode."""
    from diffusion.models.latents import cache_latents, sample_latents

    cached = cache_latents(Images(), codec, tmp_path / "lat.safetensors", key="t")
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=6)))
    n = 400
    draws = torch.stack([sample_latents(batch, torch.Generator().manual_seed(k)) for k in range(n)])
    mean, std = cached.latents, cached.stds
    z = (draws.mean(0) - mean) / (std / n ** 0.5)  # standardized error of the mean: N(0, 1) per element
    assert float(z.abs().max()) < 5.5
    rel = draws.std(0) / std  # sample std over 400 draws: 1 +- 0.035 per element
    assert float((rel - 1).abs().max()) < 0.2 and abs(float(rel.mean()) - 1) < 0.01
    one = sample_latents(batch, torch.Generator().manual_seed(7))
    assert torch.equal(one, sample_latents(batch, torch.Generator().manual_seed(7)))
    assert not torch.allclose(one, sample_latents(batch, torch.Generator().manual_seed(8)))
    assert float(((one - mean) / std).pow(2).mean()) == pytest.approx(1.0, abs=0.15)  # one std from the mode
    pixels = {"x": torch.zeros(2, 3, 4, 4)}  # no VAE: the batch itself
    assert sample_latents(pixels, torch.Generator()) is pixels["x"]


def test_old_mode_only_cache_is_rebuilt(codec, tmp_path):
    from safetensors.torch import save_file

    from diffusion.models.latents import LatentDataset, cache_latents

    path = tmp_path / "lat.safetensors"
    save_file({"latents": torch.zeros(6, 4, 8, 8)}, str(path), metadata={"stamp": "old"})
    with pytest.raises(ValueError, match="without posterior std"):
        LatentDataset(path)
    assert cache_latents(Images(), codec, path, key="t").stds.shape == (6, 4, 8, 8)


def test_trainer_draws_posterior_samples_with_its_step_generator(tmp_path, monkeypatch):
    """The rectified-flow task (scripts/train_rf_dit.py) with --vae trains on sample_latents(batch, step generator), not on the mode."""
    from accelerate.state import AcceleratorState
    from diffusers import AutoencoderKL

    from diffusion.training import rf_dit as T
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    from diffusion.models.latents import sample_latents
    seen = []

    def spy(batch, generator):
        x = sample_latents(batch, generator)
        seen.append((batch["x"], batch["x_std"], x))
        return x
    monkeypatch.setattr(T, "sample_latents", spy)  # absent before the trainer sampled the posterior
    AcceleratorState._reset_state(True)
    T.train(T.TrainConfig(output_dir=str(tmp_path / "run"), vae=str(tmp_path / "vae"), model="DiT-Tiny/2",
                          train_batch_size=8, max_train_steps=2, progress_bar=False, report_to="none", validation_steps=0,
                          checkpointing_steps=1000, lr_warmup_steps=1))
    assert len(seen) == 2
    for mean, std, x in seen:
        assert x.shape == mean.shape == (8, 4, 8, 8) and float(std.min()) > 0
        assert float(((x - mean) / std).pow(2).mean()) == pytest.approx(1.0, abs=0.2)
