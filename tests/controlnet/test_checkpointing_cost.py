"""ControlNet gradient checkpointing recomputes what diffusers' ControlNetModel recomputes (each resnet), not the
attention layers, plus the cheap full-resolution hint encoder: diffusers' step time, less memory
(benchmarks/full_size.py)."""
import pytest
import torch
from diffusers import ControlNetModel

from controlnet import ControlNet

from .tiny import make_inputs, make_unet, randomize


def forward_calls(net, inputs, call, **granularity) -> dict:
    """Forward calls (started: a recomputation stops early) of the first resnet, attention and the hint encoder in
    one forward + backward."""
    net.train().enable_gradient_checkpointing(**granularity)
    blocks = [b for b in net.down_blocks if getattr(b, "has_cross_attention", False)]
    mods = {"resnet": net.down_blocks[0].resnets[0], "attention": blocks[0].attentions[0],
            "hint": net.controlnet_cond_embedding}
    counts = dict.fromkeys(mods, 0)
    hooks = [m.register_forward_pre_hook(lambda *a, k=k: counts.__setitem__(k, counts[k] + 1)) for k, m in mods.items()]
    down, mid = call(net, inputs)
    (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_checkpointing_recomputes_what_diffusers_recomputes(name):
    unet = make_unet(name)
    ref = randomize(ControlNetModel.from_unet(unet), seed=3)
    ours = ControlNet.from_unet(unet)
    ours.load_state_dict(ref.state_dict())
    inputs = make_inputs(name)
    theirs = forward_calls(ref, inputs, lambda n, kw: n(**kw, return_dict=False))
    mine = forward_calls(ours, inputs, lambda n, kw: n(**kw))
    assert theirs == {"resnet": 2, "attention": 1, "hint": 1}  # diffusers: resnets recomputed in backward
    assert mine == {**theirs, "hint": 2}  # and the full-resolution hint encoder (cheap; ~100 MB at 512 px)


def test_block_granularity_recomputes_whole_blocks_with_the_same_gradients():
    """granularity="block": hint encoder and attention recomputed too (fewer saved activations); same gradients."""
    unet = make_unet("sd15")
    ours = randomize(ControlNet.from_unet(unet), seed=3)
    inputs = make_inputs("sd15")
    grads = {}
    for g in ("resnet", "block"):
        ours.zero_grad(set_to_none=True)
        counts = forward_calls(ours, inputs, lambda n, kw: n(**kw), granularity=g)
        grads[g] = [p.grad.clone() for p in ours.parameters()]
    assert counts == {"resnet": 2, "attention": 2, "hint": 2}
    assert all(torch.equal(a, b) for a, b in zip(grads["resnet"], grads["block"]))
    with pytest.raises(ValueError, match="unknown granularity 'layer'; valid: resnet, block"):
        ours.enable_gradient_checkpointing(granularity="layer")
