"""The rectified-flow trainer (scripts/train_rf_dit.py) end to end: real training, exact resume,
MM-DiT on captioned shapes, the diffusers SD3 transformer backbone, latents, datasets."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.training.config import ConfigError, parse_config
from diffusion.models.text_encoder import TextEncoder
from diffusion.training.data import COLORS, DigitsDataset, ImageFolderDataset, ShapesDataset
from diffusion.losses import DiffusionLoss

ROOT = Path(__file__).resolve().parents[2]


from diffusion.training import rf_dit as T  # noqa: E402  (scripts/train_rf_dit.py is its command line)


def run(tmp_path, name="run", **kw):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # several Accelerators in one process
    base = dict(output_dir=str(tmp_path / name), model="DiT-Tiny/4", train_batch_size=16, max_train_steps=4, progress_bar=False,
                report_to="none", validation_steps=0, samples_per_class=1, validation_inference_steps=4, lr_warmup_steps=2,
                checkpointing_steps=1000)
    return T.train(T.TrainConfig(**{**base, **kw}))


# ----------------------------------------------------------------------------------------------- real training
def test_training_on_digits_reduces_loss(tmp_path):
    r = run(tmp_path, max_train_steps=200, train_batch_size=32, learning_rate=1e-3, lr_warmup_steps=20, report_to="tensorboard",
            validation_steps=100, checkpointing_steps=100, checkpoints_total_limit=1)
    losses = r["losses"]
    assert len(losses) == 200 and all(np.isfinite(losses))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.6 * first, (first, last)
    # held-out loss on a fixed (x0, t, eps) batch: the initial net outputs exactly 0 (adaLN-Zero)
    x0, y = DigitsDataset(16, "test").images[:128], DigitsDataset(16, "test").labels[:128]
    g = torch.Generator().manual_seed(0)
    t, eps = torch.rand(128, generator=g), torch.randn(x0.shape, generator=g)
    loss = DiffusionLoss(T.make_schedule(T.TrainConfig()))
    with torch.no_grad():
        before = loss(lambda x, s, y: torch.zeros_like(x), x0, t=t, eps=eps, y=y).item()
        after = loss(r["ema"], x0, t=t, eps=eps, y=y).item()
    assert after < 0.6 * before, (before, after)
    out = Path(tmp_path / "run")
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-100.png", "step-200.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # accelerate: logs/<tracker_project_name>/
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 201))
    ckpts = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-00000200"]  # keep-last-1
    # weights are safetensors with the resolved config in their metadata; reload + sample via diffusion.sample
    net, cfg, extra = T.load_trained(out)
    assert cfg.max_train_steps == 200 and extra["step"] == 200
    imgs = T.sample_images(net, cfg, extra["conditioner"], None, extra["x_shape"], labels=[3, 7], seed=1, steps=8)
    assert imgs.shape == (2, 1, 16, 16) and imgs.abs().max() <= 1
    assert torch.equal(imgs, T.sample_images(net, cfg, extra["conditioner"], None, extra["x_shape"], labels=[3, 7],
                                             seed=1, steps=8))


@pytest.mark.parametrize("ga", [1, 2])
def test_resume_is_bit_exact(tmp_path, ga):
    """6 steps == 3 steps + checkpoint + resume + 3 steps, bitwise (weights, EMA, losses), also with accumulation."""
    kw = dict(max_train_steps=6, gradient_accumulation_steps=ga, checkpointing_steps=3, train_batch_size=8, ema_decay=0.9,
              lr_scheduler="cosine", cond_dropout=0.3, checkpoints_total_limit=None)
    full = run(tmp_path, **kw)
    final = {k: v.clone() for k, v in full["model"].state_dict().items()}
    final_ema = {k: v.clone() for k, v in full["ema"].state_dict().items()}
    ckpt_root = tmp_path / "run"
    assert [p.name for p in sorted(ckpt_root.glob("checkpoint-*"))] == ["checkpoint-00000003", "checkpoint-00000006"]
    shutil.rmtree(ckpt_root / "checkpoint-00000006")  # as if the run had stopped after step 3
    (ckpt_root / ".tmp-checkpoint-00000005").mkdir()  # a crash mid-save: never picked as 'latest'
    (ckpt_root / "checkpoint-00000004").mkdir()  # incomplete (no trainer_state.json): ignored too
    resumed = run(tmp_path, **{**kw, "resume_from_checkpoint": "latest"})
    assert resumed["losses"] == full["losses"][3:]
    assert all(torch.equal(v, final[k]) for k, v in resumed["model"].state_dict().items())
    assert all(torch.equal(v, final_ema[k]) for k, v in resumed["ema"].state_dict().items())
    assert not (ckpt_root / ".tmp-checkpoint-00000005").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run(tmp_path, **{**kw, "resume_from_checkpoint": str(ckpt_root / "checkpoint-00000004")})


@pytest.mark.parametrize("schedule,prediction,sampler", [("vp_linear", "eps", "dpmpp_2m"), ("cosine", "v", "ddim"),
                                                         ("rectified_flow", "x0", "flow_heun")])
def test_other_schedules_and_predictions(tmp_path, schedule, prediction, sampler):
    """The trainer is not RF-only: eps / v / x0 objectives on VP schedules, sampled with any sampler."""
    r = run(tmp_path, schedule=schedule, prediction=prediction, sampler=sampler, density="uniform",
            weighting="min_snr", max_train_steps=3, train_batch_size=8)
    assert all(np.isfinite(r["losses"])) and (tmp_path / "run" / "validation" / "step-3.png").is_file()


def test_cli_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        parse_config(T.TrainConfig, ["--modle", "DiT-S/2"], exit_on_error=False)
    with pytest.raises(ConfigError, match="valid: .*DiT-S/2"):
        parse_config(T.TrainConfig, ["--model", "DiT-Huge/2"], exit_on_error=False)
    with pytest.raises(ConfigError, match="'density'.*valid choices"):
        parse_config(T.TrainConfig, ["--density", "normal"], exit_on_error=False)
    with pytest.raises(ConfigError, match="pretrained_transformer"):
        parse_config(T.TrainConfig, ["--backbone", "sd3", "--model", "x"], exit_on_error=False)


# ----------------------------------------------------------------------------------------------- text / SD3
def test_mmdit_on_captioned_shapes_bf16(tmp_path):
    r = run(tmp_path, backbone="mmdit", model="MMDiT-Tiny", dataset="shapes", num_shapes=64, mixed_precision="bf16",
            max_train_steps=3, train_batch_size=8)
    assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
    out = tmp_path / "run"
    assert (out / "validation" / "step-3.png").is_file() and (out / "text_encoder" / "config.json").is_file()
    net, cfg, extra = T.load_trained(out)
    imgs = T.sample_images(net, cfg, extra["conditioner"], None, extra["x_shape"],
                           texts=["red circle on blue background"], steps=2)
    assert imgs.shape == (1, 3, 16, 16)


def test_sd3_transformer_backbone(tmp_path):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                          caption_projection_dim=16, pooled_projection_dim=64,
                          pos_embed_max_size=16).save_pretrained(tmp_path / "sd3" / "transformer")
    r = run(tmp_path, backbone="sd3", pretrained_transformer=str(tmp_path / "sd3"), dataset="shapes", num_shapes=32,
            max_train_steps=3, train_batch_size=8, learning_rate=1e-3)
    assert all(np.isfinite(r["losses"]))
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "run" / "transformer_ema")
    ema = r["ema"].transformer.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())


# ----------------------------------------------------------------------------------------------- latents
def tiny_vae(path, channels=1):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
    vae.save_pretrained(path)
    return vae


def test_latent_cache_round_trip_and_latent_training(tmp_path):
    from diffusion.models.latents import VAECodec, cache_latents

    vae = tiny_vae(tmp_path / "vae")
    codec = VAECodec.from_pretrained(tmp_path / "vae")
    assert (codec.scaling_factor, codec.shift_factor) == (1.5305, 0.0609)
    ds = DigitsDataset(16, "test")
    x = ds.images[:8]
    z = codec.encode(x)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        assert z.shape == (8, 4, 8, 8) and torch.allclose(z, (mean - 0.0609) * 1.5305)
        assert torch.allclose(codec.decode(z), vae.decode(mean).sample.clamp(-1, 1), atol=1e-5)
    cached = cache_latents(ds, codec, tmp_path / "lat.safetensors", key="digits-test")
    assert len(cached) == len(ds) and torch.allclose(cached[0]["x"], z[0], atol=1e-6)
    assert cached[5]["label"] == int(ds.labels[5])

    class Boom(torch.utils.data.Dataset):  # a matching cache is reused without touching the data
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            raise AssertionError("cache was not reused")

    assert torch.equal(cache_latents(Boom(), codec, tmp_path / "lat.safetensors", key="digits-test").latents,
                       cached.latents)
    with pytest.raises(AssertionError, match="not reused"):  # another key (dataset) -> rebuilt
        cache_latents(Boom(), codec, tmp_path / "lat.safetensors", key="other")
    # the trainer on cached latents: DiT in the 4-channel 8x8 latent space, grid decoded by the VAE
    r = run(tmp_path, vae=str(tmp_path / "vae"), model="DiT-Tiny/2", max_train_steps=2, train_batch_size=8)
    assert all(np.isfinite(r["losses"])) and (tmp_path / "run" / "latents.safetensors").is_file()
    assert r["model"].in_channels == 4 and r["model"].input_size == 8
    with pytest.raises(ValueError, match="no diffusers VAE"):
        VAECodec.from_pretrained(tmp_path / "run")


# ----------------------------------------------------------------------------------------------- datasets
def test_digits_and_shapes_datasets():
    ds = DigitsDataset(16, "train")
    assert len(ds) == 1437 and len(DigitsDataset(16, "test")) == 360 and ds.images.shape[1:] == (1, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and set(ds.labels.tolist()) == set(range(10))
    shapes = ShapesDataset(20, 16, seed=3)
    for i in range(20):
        fg, shape, _, bg, _ = shapes.texts[i].split()
        img = (shapes.images[i] + 1) * 127.5
        assert shape in ("circle", "square", "triangle")
        corner = img[:, 0, 0]
        assert torch.allclose(corner, torch.tensor(COLORS[bg], dtype=torch.float32), atol=1)
        inside = img.flatten(1).T  # some pixel is exactly the foreground color
        assert (inside - torch.tensor(COLORS[fg], dtype=torch.float32)).abs().max(1).values.min() < 1
    te = TextEncoder.tiny(ShapesDataset.vocabulary())
    h, p = te(shapes.texts[:2] + [""])
    assert h.shape == (3, 16, 64) and p.shape == (3, 64) and not torch.allclose(p[0], p[2])


def test_image_folder(tmp_path):
    """Folder loading (class subfolders, metadata.jsonl captions/labels), errors naming files, and an
    unconditional DiT trained on a folder of plain images."""
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i, sub in enumerate(["cats", "cats", "dogs"]):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / sub / f"{i}.png")
    ds = ImageFolderDataset(root, size=16)
    assert len(ds) == 3 and ds.class_names == ["cats", "dogs"] and [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    assert ds[2]["x"].shape == (3, 16, 16) and torch.allclose(ds[2]["x"], torch.tensor(80 / 127.5 - 1))
    (root / "metadata.jsonl").write_text('{"file_name": "cats/0.png", "text": "a cat"}\n'
                                         '{"file_name": "dogs/2.png", "text": "a dog"}\n')
    ds = ImageFolderDataset(root, size=8, channels=1)
    assert [ds[i]["text"] for i in range(2)] == ["a cat", "a dog"] and ds[0]["x"].shape == (1, 8, 8)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(plain / f"{i}.jpg")
    r = run(tmp_path, dataset="folder", data_dir=str(plain), max_train_steps=2, train_batch_size=2, samples_per_class=1)
    assert r["model"].y_embedder is None and all(np.isfinite(r["losses"]))
    assert (tmp_path / "run" / "validation" / "step-2.png").is_file()
    (root / "cats" / "1.png").write_bytes(b"not a png")
    (root / "metadata.jsonl").write_text('{"file_name": "cats/1.png", "label": 1}\n')
    with pytest.raises(ValueError, match=r"cannot read image .*cats/1.png"):
        ImageFolderDataset(root)[0]
    (root / "metadata.jsonl").write_text('{"file_name": "cats/9.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: image .*cats/9.png .* does not exist"):
        ImageFolderDataset(root)
    (root / "metadata.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="file_name"):
        ImageFolderDataset(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_frechet_distance_closed_form():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_digits", ROOT / "scripts" / "eval_digits.py")
    E = importlib.util.module_from_spec(spec)
    sys.modules["eval_digits"] = E  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(E)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(E.frechet_distance(a, a)) < 1e-6
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, 2.0])
    assert abs(E.frechet_distance(a, b) - 8.0) < 0.3
