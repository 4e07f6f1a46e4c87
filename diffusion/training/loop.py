"""One accelerate training loop for every trainer (the shape of EDM's training_loop and diffusers' example scripts).

A trainer is a Task: it builds its dataset and trainable module, computes the loss of one micro-batch, draws
validation grids and writes / exports weights. The loop owns everything else: accelerate set-up (multi-CPU gloo,
ddp_timeout, trackers), the seeded resumable data order, gradient accumulation counted in micro-batches (data
position and noise are functions of the global micro-batch index, diffusion.training.checkpoint.step_generator, so
a resumed run continues bit-exactly and N processes train as one process accumulating N micro-batches), clipping,
the non-finite guard, EMA, the diffusers LR schedule, logging (tqdm, trackers, metrics.jsonl), crash-safe
checkpoints output_dir/checkpoint-N and validation on schedule.
Under a sharded engine (FSDP, DeepSpeed ZeRO-3; docs/distributed.md) the EMA keeps full parameters on every process
and weights handed to the task (checkpoints, validation, export) are the full state dict gathered on the main one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .args import TrainingArgs
from .checkpoint import list_checkpoints, load_checkpoint, remove_incomplete, save_checkpoint, step_generator
from .config import save_yaml, to_dict
from .data import EpochBatchSampler
from .ema import EMA
from .export import open_metrics
from .grids import log_grid
from .guards import NonFiniteGuard, refuse_nonfinite
from .preflight import require_package
from .rundir import exclusive_output_dir, start_run


class Task:
    """What a trainer supplies; see the module docstring. `cfg` extends TrainingArgs."""

    name = "train"  # program name (messages, default tracker project)
    phase = ""  # names the steps in guard messages of a trainer with several phases ("VAE step 3")
    single_process = False  # True: refuse a multi-process launch
    build_writes = True  # False: build() writes nothing, so it runs before the run is vetted (model errors first)
    collate_fn = None

    def __init__(self, cfg: TrainingArgs):
        self.cfg = cfg
        self.accelerator = None

    def preflight(self) -> None:
        """Checks before anything is loaded or written (ValueError naming the flag)."""

    def build(self) -> tuple[Any, torch.nn.Module]:
        """(dataset of items, trainable module in float32) on self.accelerator; global RNG seeded with cfg.seed."""
        raise NotImplementedError

    def loss(self, model, batch, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, model, step: int) -> Optional[np.ndarray]:
        """An (H, W, 3) uint8 grid drawn with `model` (the EMA weights with --use_ema), or None (main process)."""
        return None

    def save_weights(self, directory: Path, model, ema_model, step: int) -> None:
        """Model files written into a checkpoint directory (beside the accelerate state)."""

    def export(self, model, ema_model) -> dict:
        """Final exports (main process); returns extra entries of train()'s result."""
        return {}


def multi_cpu() -> bool:
    """True for a multi-process launch without GPUs: accelerate then needs cpu=True to pick MULTI_CPU (gloo);
    otherwise (`accelerate launch --multi_gpu` on a CPU machine) every process would run alone as rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    try:
        from accelerate.utils import is_npu_available
        gpu = gpu or is_npu_available()
    except ImportError:
        pass
    return not gpu


def check_trackers(report_to: str) -> None:
    """--report_to names a tracker that is not installed: an error at start, not a warning and a silent run."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise ValueError(f"--report_to {report_to} needs the tensorboard package (pip install tensorboard); or pass "
                         f"--report_to none")
    if report_to == "wandb" and not is_wandb_available():
        raise ValueError("--report_to wandb needs the wandb package (pip install wandb); or pass --report_to "
                         "tensorboard / none")


def make_accelerator(cfg: TrainingArgs):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=multi_cpu(), mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)))
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up "
                           f"{accelerator.num_processes}; every process would act as the main one")
    if accelerator.state.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate accepts it but runs neither fp16 autocast nor its GradScaler there: a float32 run in disguise
        raise ValueError("--mixed_precision fp16 needs a GPU: on the CPU accelerate applies neither fp16 autocast nor "
                         "loss scaling (GradScaler); use --mixed_precision bf16 (autocast on the CPU) or no "
                         "(choices: no, fp16, bf16)")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def sharded(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: no process holds the full parameters of the prepared model."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def gathered(accelerator, model):
    """Context in which accelerator.unwrap_model(model) has full parameters on every process (the EMA update):
    FSDP1 summon_full_params, DeepSpeed ZeRO-3 GatheredParameters; EMA.update gathers FSDP2's DTensors itself."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    if sharded(accelerator) and accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return nullcontext()


def check_engine(accelerator, cfg: TrainingArgs) -> bool:
    """True under DeepSpeed, which steps its optimizer inside backward() on its own accumulation count: refuse what
    the loop cannot then do, and give it the micro-batch size (there is no prepared DataLoader to read it from)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    if cfg.gradient_accumulation_steps > 1:
        raise ValueError("under DeepSpeed the loop cannot accumulate gradients itself: use "
                         "--gradient_accumulation_steps 1 (raise train_batch_size or the process count), or FSDP / DDP")
    if cfg.on_nonfinite == "skip":
        raise ValueError("--on_nonfinite skip cannot drop a DeepSpeed update (it steps inside backward): use "
                         "--on_nonfinite stop, or FSDP / DDP")
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    return True


def make_optimizer(cfg: TrainingArgs, params, lr: float):
    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("--use_8bit_adam needs the optional bitsandbytes package (pip install bitsandbytes); "
                         "or leave use_8bit_adam off") from None
    return bnb.optim.AdamW8bit(params, **kw)


def total_steps(cfg: TrainingArgs, batches_per_epoch: int) -> int:
    """max_train_steps, or num_train_epochs of optimizer steps; warns when the warm-up outlasts the run."""
    steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    if cfg.lr_warmup_steps > steps and cfg.lr_scheduler != "constant":  # diffusers' constant has no warm-up
        warnings.warn(f"lr_warmup_steps={cfg.lr_warmup_steps} is longer than the run ({steps} optimizer steps): the "
                      f"learning rate never reaches learning_rate={cfg.learning_rate}; lower --lr_warmup_steps",
                      stacklevel=2)
    return steps


def _summary(accelerator, task: Task, n: int, per_epoch: int, max_steps: int, step: int) -> None:
    cfg, world = task.cfg, accelerator.num_processes
    ga, bs = cfg.gradient_accumulation_steps, cfg.train_batch_size
    accelerator.print(
        f"***** {task.name}: {n} examples, {per_epoch} batches per epoch, {math.ceil(max_steps * ga / per_epoch)} "
        f"epochs *****\n  optimizer steps {max_steps} (from step {step}), batch {bs} per process x {world} "
        f"process(es) x {ga} accumulation = {bs * world * ga} per step\n  precision {cfg.mixed_precision}, "
        f"lr {cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup {cfg.lr_warmup_steps}), EMA "
        f"{'on' if cfg.use_ema else 'off'}, trackers {cfg.report_to}")


def _init_trackers(accelerator, cfg: TrainingArgs, name: str) -> None:
    if cfg.report_to != "none" and not accelerator.trackers:
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in to_dict(cfg).items()}
        project = cfg.tracker_project_name if cfg.tracker_project_name != "train" else name
        accelerator.init_trackers(project, config=hp)


@exclusive_output_dir  # one run per output_dir (diffusion.training.rundir)
def _train(cfg: TrainingArgs, task: Task) -> dict:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    task.preflight()
    out_dir = Path(cfg.output_dir)
    accelerator = task.accelerator = make_accelerator(cfg)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if task.single_process and world > 1:
        raise ValueError(f"{task.name} runs as a single process; launch without --num_processes")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(out_dir)
    if not task.build_writes:
        set_seed(cfg.seed)
        dataset, model = task.build()
    run = start_run(accelerator, cfg, out_dir)  # checkpoint to resume (vetted: same run, readable, no pickle) or None
    if task.build_writes:  # after the vetting: a refused run leaves output_dir as it was
        set_seed(cfg.seed)
        dataset, model = task.build()
    ema = EMA(model, cfg.ema_decay).to(accelerator.device) if cfg.use_ema else None
    in_deepspeed = check_engine(accelerator, cfg)
    # sharded engine: a CPU copy on the main process receives the gathered full state dict for the task's weights
    template = copy.deepcopy(model).cpu() if sharded(accelerator) and main else None

    batches = EpochBatchSampler(len(dataset), cfg.train_batch_size, cfg.seed, rank, world)
    # own generator: the loader's per-epoch seed draw must not advance the (checkpointed) global RNG
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.dataloader_num_workers,
                        collate_fn=task.collate_fn, generator=torch.Generator().manual_seed(cfg.seed))
    ga = cfg.gradient_accumulation_steps
    max_steps = total_steps(cfg, len(batches))
    lr = cfg.learning_rate * (ga * cfg.train_batch_size * world if cfg.scale_lr else 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, lr)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps them for DTensor shards
    state_objects = {"lr_scheduler": lr_scheduler}  # not prepared: stepped once per optimizer step
    if ema is not None:
        state_objects["ema"] = ema

    step, ckpt = 0, run.checkpoint
    if ckpt is not None:
        step = int(load_checkpoint(accelerator, ckpt, state_objects, cfg.allow_pickle)["step"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no complete checkpoint in {out_dir}: starting a new run")
    if main:  # only once model, data and checkpoint are known to fit: a failed start leaves the run dir as it was
        save_yaml(cfg, out_dir / "config.yaml")
    _init_trackers(accelerator, cfg, task.name)
    if main:
        _summary(accelerator, task, len(dataset), len(batches), max_steps, step)
    metrics = open_metrics(out_dir / "metrics.jsonl", step) if main else None
    micro = step * ga  # data position and noise are functions of the micro-batch counter
    epoch, offset = divmod(micro, len(batches))

    def full_model():
        """The trained module with full parameters (call on every process; sharded engines: None but on main)."""
        if not sharded(accelerator):
            return accelerator.unwrap_model(model)
        state = accelerator.get_state_dict(model)  # gathered on the main process (FSDP full / ZeRO-3 16-bit)
        if main:
            template.load_state_dict(state)
        return template  # None on the other processes

    def validate():
        net = ema.module if ema is not None else full_model()
        if main:
            device = next(net.parameters()).device
            net.to(accelerator.device)
            was_training = net.training
            net.eval()
            grid = task.validate(net, step)
            net.train(was_training).to(device)
            if grid is not None:
                path = log_grid(accelerator, grid, out_dir, step)
                if not cfg.progress_bar:
                    accelerator.print(f"step {step}: validation grid {path}")
        accelerator.wait_for_everyone()

    losses, window, acc = [], [], torch.zeros((), device=accelerator.device)
    guard = NonFiniteGuard(cfg.on_nonfinite, task.phase)
    pbar = tqdm(total=max_steps, initial=step, disable=not (main and cfg.progress_bar), desc=task.name)
    model.train()
    while step < max_steps:
        batches.set_epoch(epoch, offset)
        offset = 0
        for batch in loader:
            # keyed by the global micro-batch index, whose data slice is the same for any process count: N processes
            # x batch b equal 1 process x batch b x N accumulation steps (same data, same noise)
            gen = step_generator(cfg.seed, micro * world + rank)
            sync = (micro + 1) % ga == 0
            with nullcontext() if sync or world == 1 else accelerator.no_sync(model):
                loss = task.loss(model, batch, gen)
                accelerator.backward(loss / ga)
            acc += loss.detach() / ga
            micro += 1
            if not sync:
                continue
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            norm = math.nan if norm is None else float(norm)  # DeepSpeed: None before its first step
            lr_now = lr_scheduler.get_last_lr()[0]
            loss_val = accelerator.reduce(acc, "mean").item()
            acc.zero_()
            # NaN/Inf: raise (stop) or drop the update (skip); fp16's GradScaler (and DeepSpeed, which has already
            # stepped) handle overflowing gradients themselves
            ok = guard.check(step + 1, loss_val, None if accelerator.scaler or in_deepspeed else norm, ckpt)
            if ok:
                optimizer.step()
                guard.check_weights(step + 1, params, ckpt)  # NaN/Inf weights from a finite update: stop
            # fp16: an overflowing update the GradScaler dropped is no update (no LR step, no EMA), as accelerate's
            # scheduler wrapper does it for diffusers' scripts
            scaler_skipped = ok and optimizer.step_was_skipped
            if not scaler_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
            if ok and not scaler_skipped and ema is not None:
                with gathered(accelerator, model):
                    ema.update(accelerator.unwrap_model(model))
            step += 1
            losses.append(loss_val)
            if ok:
                window.append(loss_val)
            if main:
                rec = {"step": step, "loss": loss_val if ok else None, "lr": lr_now,
                       "grad_norm": norm if ok and math.isfinite(norm) else None}  # strict JSON: no NaN / Infinity
                if not ok:
                    rec["skipped"] = True
                elif scaler_skipped:
                    rec["scaler_skipped"] = True
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr_now:.2e}")
            if window and (step % cfg.logging_steps == 0 or step == max_steps):
                mean = sum(window) / len(window)
                accelerator.log({"train/loss": mean, "train/lr": lr_now, "train/grad_norm": norm}, step=step)
                if not cfg.progress_bar:
                    accelerator.print(f"step {step}/{max_steps} loss {mean:.4f} lr {lr_now:.3g}")
                window = []
            if (cfg.validation_steps and step % cfg.validation_steps == 0) or step == max_steps:
                validate()  # before the checkpoint: a resumed run starts from the RNG state after validation
            if step % cfg.checkpointing_steps == 0 or step == max_steps:
                refuse_nonfinite(params, out_dir / f"checkpoint-{step:08d}", step)
                net, ema_net = full_model(), ema.module if ema else None

                def weights(d: Path):
                    task.save_weights(d, net, ema_net, step)

                ckpt = save_checkpoint(accelerator, out_dir, step, {"micro_step": micro, "epoch": epoch}, weights,
                                       cfg.checkpoints_total_limit, state_objects, run.identity)
            if step >= max_steps:
                break
        epoch += 1
    pbar.close()

    final, extra = full_model(), {}
    if main:
        metrics.close()
        extra = task.export(final, ema.module if ema else None) or {}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "checkpoint": ckpt, "model": final, "ema": ema.module if ema else None,
            "main": main, "skipped": guard.skipped, "checkpoints": [p for _, p in list_checkpoints(out_dir)], **extra}


def train(task: Task) -> dict:
    """Run (or resume) `task` -> {"step", "losses" (this run), "checkpoint", "model", "ema", ...task.export()}."""
    check_trackers(task.cfg.report_to)  # before the run lock: a refused start leaves no output_dir behind
    if task.cfg.use_8bit_adam:
        require_package("bitsandbytes", "--use_8bit_adam")
    return _train(task.cfg, task)
