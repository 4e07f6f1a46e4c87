"""Runs trainers one after another in the processes of one `accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 2` on a CPU machine (tests/diffusion/test_distributed.py).

accelerate (1.x) turns FSDP on only for accelerator devices: on CPU it sets up MULTI_CPU (DDP over gloo) and
ignores the FSDP settings. torch's FSDP2 (fully_shard) itself runs on CPU over gloo, so for a job with
"engine": "fsdp" `cpu_fsdp` switches the accelerator's state to FSDP with the plugin the launcher's FSDP_* variables
describe (from the config file); everything after that - prepare, clip_grad_norm_, get_state_dict, save_state /
load_state - is accelerate's own FSDP2 code. "engine": "ddp" leaves accelerate's MULTI_CPU set-up as it is.

argv[1]: JSON list of jobs {"engine", "script", "args", "wrap" (FSDP classes)} or {"copy": [src, dst,
names to delete in dst]} (a run directory as a stopped run leaves it).
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

from diffusion.training import loop  # noqa: E402

ENGINE = {"name": "ddp"}
_make_accelerator = loop.make_accelerator


def cpu_fsdp(cfg):
    accelerator = _make_accelerator(cfg)
    if ENGINE["name"] == "fsdp":
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* (set by accelerate launch from the config file)
        assert plugin.fsdp_version == 2, plugin.fsdp_version
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        assert accelerator.is_fsdp2
    return accelerator


loop.make_accelerator = cpu_fsdp
# one process group for all jobs: a run's end_training would close it, and the next run's re-initialisation races
# with the main process still exporting (gloo connect timeout)
PartialState.destroy_process_group = lambda self, group=None: None


def main(jobs):
    import train_controlnet
    from diffusion.training import rf_dit
    from diffusion.training.config import parse_config

    scripts = {"train_controlnet.py": train_controlnet.main,  # both return train()'s result
               "train_rf_dit.py": lambda argv: rf_dit.train(parse_config(rf_dit.TrainConfig, argv))}
    for job in jobs:
        if "copy" in job:  # a run directory as a stopped run left it: copy, drop the newer checkpoint
            src, dst, drops = job["copy"]
            AcceleratorState._reset_state(True)
            state = PartialState(cpu=True)
            if state.is_main_process:
                shutil.copytree(src, dst)
                for name in drops:
                    (shutil.rmtree if (Path(dst) / name).is_dir() else os.remove)(Path(dst) / name)
            state.wait_for_everyone()
            continue
        ENGINE["name"] = job["engine"]
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = job.get("wrap", "")
        AcceleratorState._reset_state(True)
        PartialState(cpu=True).wait_for_everyone()
        start = time.perf_counter()
        result = scripts[job["script"]](job["args"])
        print(f"job {job['script']} {job['engine']}: {time.perf_counter() - start:.1f} s", flush=True)
        if job["engine"] == "fsdp":  # the EMA holds full tensors; the trained model DTensor shards
            from torch.distributed.tensor import DTensor

            params = list(result["ema"].parameters()) if result["ema"] is not None else []
            assert params == [] or not any(isinstance(p, DTensor) for p in params)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
