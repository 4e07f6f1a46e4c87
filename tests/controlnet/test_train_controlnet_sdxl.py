"""SDXL ControlNet training (controlnet.training_sdxl) on the tiny SDXL fixture: the loss as diffusers'
train_controlnet_sdxl.py computes it, learning, exact resume with EMA, a 2-process gloo launch whose output loads in
diffusers' ControlNetModel (identical residuals) and drives our SDXL pipeline and cn-sample, preflight errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from controlnet import ControlledUNet, ControlNet
from controlnet.data import collate
from controlnet.training import TrainControlNetConfig, build_dataset, denoising_loss, train
from controlnet.training_sdxl import SDXLControlNetTask
from diffusion.training.checkpoint import step_generator

from .sd_fixtures import fill_data, tiny_sd, tiny_sdxl
from .test_train_controlnet import assert_same_weights, launch_two_processes, state

import train_controlnet as script  # noqa: E402  (scripts/ is on sys.path via sd_fixtures)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PROMPT = "red circle with blue background"


def make_cfg(out, **kw) -> TrainControlNetConfig:
    base = dict(pretrained_model_name_or_path=str(tiny_sdxl()), train_data_dir=str(fill_data()), output_dir=str(out),
                resolution=32, train_batch_size=2, learning_rate=1e-2, lr_warmup_steps=0, report_to="none",
                logging_steps=1000, checkpointing_steps=1000, progress_bar=False)
    return TrainControlNetConfig(**{**base, **kw})


def built_task(cfg) -> SDXLControlNetTask:
    """The task with its frozen parts loaded (a stand-in accelerator on the CPU), without a run."""
    task = SDXLControlNetTask(cfg)
    task.accelerator = type("Acc", (), {"device": torch.device("cpu"), "is_main_process": True})()
    return task


def test_loss_is_diffusers_train_controlnet_sdxl(tmp_path):
    """Our loss on a batch == the loss written as diffusers' script computes it with its modules (ControlNetModel,
    StableDiffusionXLPipeline.encode_prompt, add_time_ids (resolution, crop h/w, resolution)) on the same draws."""
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionXLPipeline

    from .tiny import randomize

    cfg = make_cfg(tmp_path, crops_coords_top_left_h=4, crops_coords_top_left_w=8)
    task = built_task(cfg)
    _, cn = task.build()
    randomize(cn, seed=3)  # non-zero zero convolutions: the residuals count
    batch = collate([build_dataset(cfg)[i] for i in range(3)])
    ours = denoising_loss(task.pipe, ControlledUNet(task.pipe.unet, cn), batch, step_generator(7, 0), 0.0,
                          task.encode_text)

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl(), local_files_only=True)
    theirs_cn = ControlNetModel.from_unet(ref.unet)
    theirs_cn.load_state_dict(cn.state_dict())
    g = step_generator(7, 0)  # the draw order of denoising_loss: caption dropout, posterior, noise, timesteps
    torch.rand(3, generator=g)
    latents = ref.vae.encode(batch["pixel_values"]).latent_dist.sample(g) * ref.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (3,), generator=g)
    noisy = DDPMScheduler.from_config(ref.scheduler.config).add_noise(latents, noise, timesteps)  # as the script
    emb, _, pooled, _ = ref.encode_prompt(list(batch["text"]), do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 4, 8, 32, 32]]).repeat(3, 1)}
    down, mid = theirs_cn(noisy, timesteps, encoder_hidden_states=emb, added_cond_kwargs=added,
                          controlnet_cond=batch["conditioning_pixel_values"], return_dict=False)
    pred = ref.unet(noisy, timesteps, encoder_hidden_states=emb, added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    theirs = torch.nn.functional.mse_loss(pred, noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert task.pipe.vae.dtype == torch.float32


def test_resumes_exactly_with_ema(tmp_path):
    """4 steps straight == 2 steps + resume + 2 (losses, ControlNet and EMA bitwise; accumulation 2 over an epoch of
    3 micro-batches, caption dropout, crop coordinates); outputs: final ControlNet, controlnet_ema,
    checkpoint-N/controlnet."""
    kw = dict(max_train_samples=6, gradient_accumulation_steps=2, max_train_steps=4, proportion_empty_prompts=0.25,
              crops_coords_top_left_w=4, use_ema=True, ema_decay=0.9, checkpointing_steps=2)
    a = train(make_cfg(tmp_path / "a", **kw))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-00000002", tmp_path / "b" / "checkpoint-00000002")
    b = train(make_cfg(tmp_path / "b", resume_from_checkpoint="latest", **kw))
    assert b["step"] == 4 and b["losses"] == a["losses"][2:]
    assert_same_weights(state(a["controlnet"]), state(b["controlnet"]))
    assert_same_weights(state(a["ema"]), state(b["ema"]))

    out = tmp_path / "a"
    assert_same_weights(state(ControlNet.from_pretrained(out)), state(a["controlnet"]))
    assert_same_weights(state(ControlNet.from_pretrained(out / "controlnet_ema")), state(a["ema"]))
    assert_same_weights(state(ControlNet.from_pretrained(out / "checkpoint-00000004" / "controlnet")),
                        state(a["controlnet"]))

    # trained: the zero convolutions moved, so the ControlNet now changes the UNet's prediction (a short run on the
    # random-weight base does not lower the loss measurably; benchmarks/controlnet_sdxl_edges.py measures learning)
    cn = a["controlnet"].eval()
    assert cn.controlnet_mid_block.weight.abs().max() > 0 and np.isfinite(a["losses"]).all()


def test_bf16_keeps_the_base_vae_float32(tmp_path):
    """--mixed_precision bf16: UNet and text encoders in bf16, the base's own VAE in float32 (as diffusers), a
    --pretrained_vae_model_name_or_path VAE in bf16; a step with validation runs on the replacement VAE."""
    assert built_task(make_cfg(tmp_path, mixed_precision="bf16")).load_frozen(torch.bfloat16)["vae"].dtype == \
        torch.float32
    vae = shutil.copytree(tiny_sdxl() / "vae", tmp_path / "vae")
    res = train(make_cfg(tmp_path / "run", mixed_precision="bf16", pretrained_vae_model_name_or_path=str(vae),
                         max_train_steps=1, validation_prompt=[PROMPT], validation_steps=1,
                         validation_inference_steps=2, num_validation_images=1))
    pipe = res["pipeline"]
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.bfloat16}
    assert res["controlnet"].dtype == torch.float32 and np.isfinite(res["losses"]).all()
    assert (tmp_path / "run" / "validation" / "step-1.png").is_file()


def test_two_process_launch_output_loads_in_diffusers_and_samples(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU) with the SDXL flags; the final ControlNet loads in
    diffusers' ControlNetModel with the same residuals as ours, and drives SDXLControlNetPipeline and cn-sample."""
    from diffusers import ControlNetModel

    from controlnet.cli import main as cn_sample
    from controlnet.pipeline_sdxl import SDXLControlNetPipeline

    from .tiny import assert_residuals_close

    out = tmp_path / "mp"
    log = launch_two_processes(
        tmp_path, "--pretrained_model_name_or_path", str(tiny_sdxl()), "--train_data_dir", str(fill_data()),
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-2", "--checkpointing_steps", "1", "--crops_coords_top_left_h", "8",
        "--validation_steps", "2", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--logging_steps", "1")
    assert log.count("done: step 2") == 1 and "train_controlnet_sdxl" in log
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    for step in (1, 2):
        ck = out / f"checkpoint-{step:08d}"
        assert (ck / "random_states_0.pkl").is_file() and (ck / "random_states_1.pkl").is_file()
    assert (out / "validation" / "step-2.png").is_file()

    ours, theirs = ControlNet.from_pretrained(out).eval(), ControlNetModel.from_pretrained(out).eval()
    assert_same_weights(state(ControlNetModel.from_pretrained(out / "checkpoint-00000002" / "controlnet")),
                        state(theirs))
    assert ours.controlnet_mid_block.weight.abs().max() > 0
    pipe = SDXLControlNetPipeline.from_pretrained(tiny_sdxl(), controlnet=out)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, 4, 4, generator=g), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=torch.randn(2, 77, 48, generator=g),
                  controlnet_cond=torch.rand(2, 3, 32, 32, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 24, generator=g),
                                     "time_ids": torch.tensor([[32.0, 32, 8, 0, 32, 32]] * 2)})
    with torch.no_grad():
        assert_residuals_close(ours(**inputs), theirs(**inputs, return_dict=False), atol=0)
        theirs.save_pretrained(tmp_path / "back")  # and back: diffusers' save loads in ours, same residuals
        assert_residuals_close(ControlNet.from_pretrained(tmp_path / "back").eval()(**inputs), ours(**inputs), atol=0)
        cond = inputs["controlnet_cond"][:1]
        with_cn = pipe(PROMPT, cond, steps=2, seed=0, output_type="latent").images
        pipe.controlnet = None
        without = pipe(PROMPT, steps=2, seed=0, output_type="latent").images
    assert (with_cn - without).abs().max() > 1e-3  # the trained ControlNet steers the sampler
    from PIL import Image
    Image.fromarray(np.uint8(cond[0].permute(1, 2, 0).numpy() * 255)).save(tmp_path / "cond.png")
    assert cn_sample(["--condition", str(tmp_path / "cond.png"), "--model", str(tiny_sdxl()), "--controlnet",
                      str(out), "--steps", "2", "--no_progress", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "sample_00.png").is_file()


# ----------------------------------------------------------------------------------------------- checks and CLI
def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        f, changes = edit
        p = dst / f
        p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return dst


@pytest.mark.parametrize("case, message", [
    ("sdxl_flag_on_sd", "SDXL only"),
    ("no_tokenizer_2", "tokenizer_2"),
    ("parts_do_not_fit", "projection_class_embeddings_input_dim"),
    ("vae_does_not_fit", "latent_channels"),
])
def test_preflight_names_the_problem(tmp_path, case, message):
    """Before anything loads: SDXL flags on an SD base, a missing SDXL part, parts that do not fit, a foreign VAE."""
    kw = {}
    if case == "sdxl_flag_on_sd":
        kw = dict(pretrained_model_name_or_path=str(tiny_sd()), crops_coords_top_left_h=4)
    elif case == "no_tokenizer_2":
        model = _copy(tiny_sdxl(), tmp_path / "m")
        shutil.rmtree(model / "tokenizer_2")
        kw = dict(pretrained_model_name_or_path=str(model))
    elif case == "parts_do_not_fit":
        model = _copy(tiny_sdxl(), tmp_path / "m", ("text_encoder_2/config.json", {"projection_dim": 8}))
        kw = dict(pretrained_model_name_or_path=str(model))
    else:
        vae = _copy(tiny_sdxl() / "vae", tmp_path / "vae", ("config.json", {"latent_channels": 16}))
        kw = dict(pretrained_vae_model_name_or_path=str(vae))
    with pytest.raises(ValueError, match=message):
        train(make_cfg(tmp_path / "run", **kw))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_help_lists_the_sdxl_flags(capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("pretrained_vae_model_name_or_path", "crops_coords_top_left_h", "crops_coords_top_left_w"):
        assert f"--{name} " in text and "(SDXL only)" in text, name
    with pytest.raises(ValueError, match="crops_coords_top_left_w must be >= 0"):
        make_cfg("unused", crops_coords_top_left_w=-1)
