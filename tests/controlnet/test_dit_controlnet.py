"""Tests for the DiT / MM-DiT ControlNet (controlnet/dit_controlnet.py; Zhang et al. 2023, SD3 ControlNet)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet.dit_controlnet import ControlledTransformer, DiTControlNet, map_residuals, unused_residuals
from diffusion import RectifiedFlow, classifier_free_guidance, prior_sample, sample, wrap_model
from diffusion.models.dit import build_dit
from diffusion.models.mmdit import build_mmdit

S, B, NUM_CLASSES = 8, 2, 10  # 8x8 inputs, patch 2 -> 16 tokens


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_zeros(module, std=0.05, seed=0):
    """Give all-zero parameters (adaLN-Zero, zero linears) random values so every path is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_base(arch):
    torch.manual_seed(0)
    if arch == "dit":
        model = build_dit("DiT-Tiny/2", input_size=S, num_classes=NUM_CLASSES)
    else:
        model = build_mmdit("MMDiT-Tiny", input_size=S, joint_attention_dim=24, pooled_projection_dim=12)
    return randomize_zeros(model).eval()


def base_cond(arch, b=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    if arch == "dit":
        return dict(y=torch.randint(0, NUM_CLASSES, (b,), generator=g))
    return dict(encoder_hidden_states=torch.randn(b, 5, 24, generator=g),
                pooled_projections=torch.randn(b, 12, generator=g))


def inputs(arch, cc=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 4, S, S, generator=g), torch.tensor([120.0, 870.0])
    return x, t, torch.rand(B, cc, S, S, generator=g), base_cond(arch)


def base_call(model, x, t, cond, **kw):
    return model(x, t, cond["y"], **kw) if "y" in cond else model(x, t, cond["encoder_hidden_states"],
                                                                  cond["pooled_projections"], **kw)


ARCHS = ["dit", "mmdit"]


# ----------------------------------------------------------------------------------------------- DiT/MMDiT hook
@pytest.mark.parametrize("arch", ARCHS)
def test_block_residuals_hook_adds_after_block(arch):
    model = make_base(arch)
    x, t, _, cond = inputs(arch)
    r = torch.randn(B, (S // 2) ** 2, model.hidden_size) * 0.3
    with torch.no_grad():
        ref = base_call(model, x, t, cond)
        assert torch.equal(base_call(model, x, t, cond, block_residuals=[None, None]), ref)
        out = base_call(model, x, t, cond, block_residuals=[r, None])
        # same thing by hand: a forward hook adds r to block 0's image-token output
        def add(_, __, o):
            return (o[0] + r, o[1]) if isinstance(o, tuple) else o + r
        h = model.blocks[0].register_forward_hook(add)
        manual = base_call(model, x, t, cond)
        h.remove()
    torch.testing.assert_close(out, manual, rtol=0, atol=0)
    assert not torch.allclose(out, ref)
    with pytest.raises(ValueError, match="one per block"):
        base_call(model, x, t, cond, block_residuals=[r])


# ----------------------------------------------------------------------------------------------- from_transformer
@pytest.mark.parametrize("arch,n", [("dit", 1), ("dit", 2), ("mmdit", 1), ("mmdit", 2)])
def test_from_transformer_copies_stem_and_blocks(arch, n):
    """With the condition path closed and identity residual heads, residual i == base hidden tokens after block i."""
    model = make_base(arch)
    cn = DiTControlNet.from_transformer(model, num_layers=n, conditioning_channels=3)
    assert cn.num_layers == len(cn.blocks) == len(cn.controlnet_blocks) == n
    assert not cn.cond_proj.weight.any() and not any(lin.weight.any() for lin in cn.controlnet_blocks)
    with torch.no_grad():
        for lin in cn.controlnet_blocks:
            lin.weight.copy_(torch.eye(model.hidden_size))
    x, t, image, cond = inputs(arch)
    seen = []
    hooks = [blk.register_forward_hook(lambda _, __, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for blk in model.blocks]
    with torch.no_grad():
        base_call(model, x, t, cond)
        res = cn(x, t, image, **cond)
    for h in hooks:
        h.remove()
    assert len(res) == n
    for r, h in zip(res, seen):
        assert r.shape == (B, (S // 2) ** 2, model.hidden_size)
        torch.testing.assert_close(r, h, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch):
    model = make_base(arch)
    net = ControlledTransformer(model, DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3))
    net.eval()  # train mode would drop labels (class_dropout_prob)
    x, t, image, cond = inputs(arch)
    with torch.no_grad():
        out = net(x, t, controlnet_cond=image, conditioning_scale=2.0, **cond)
        assert torch.equal(out, base_call(model, x, t, cond))


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_controlnet_changes_output_and_follows_condition(arch):
    model = make_base(arch)
    cn = randomize_zeros(DiTControlNet.from_transformer(model, conditioning_channels=3), std=0.2, seed=3)
    net = ControlledTransformer(model, cn).eval()
    x, t, image, cond = inputs(arch)
    with torch.no_grad():
        base = base_call(model, x, t, cond)
        out = net(x, t, controlnet_cond=image, **cond)
        other = net(x, t, controlnet_cond=torch.rand_like(image), **cond)
        assert (out - base).abs().max() > 1e-3 and (out - other).abs().max() > 1e-3
        assert torch.equal(net(x, t, controlnet_cond=image, conditioning_scale=0.0, **cond), base)
        assert torch.equal(net(x, t, **cond), base)  # no condition -> bare transformer
        # residuals are linear in the scale; a per-sample scale of 0 leaves that row untouched
        r1, r2 = cn(x, t, image, **cond), cn(x, t, image, conditioning_scale=0.5, **cond)
        for a, b in zip(r1, r2):
            torch.testing.assert_close(0.5 * a, b)
        mixed = net(x, t, controlnet_cond=image, conditioning_scale=torch.tensor([1.0, 0.0]), **cond)
        torch.testing.assert_close(mixed[0], out[0], rtol=0, atol=0)
        torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)
        # a batch-1 condition broadcasts over the batch
        one = net(x, t, controlnet_cond=image[:1], **cond)
        torch.testing.assert_close(one, net(x, t, controlnet_cond=image[:1].expand_as(image), **cond))


def test_map_residuals_interval_matches_diffusers_sd3_formula():
    for depth in range(1, 13):
        for n in range(1, depth + 1):
            idx = map_residuals(list(range(n)), depth, "interval")
            assert idx == [int(i / (depth / n)) for i in range(depth)]  # diffusers SD3Transformer2DModel
            assert sorted(set(idx)) == list(range(n))  # every residual is used
    assert map_residuals([7, 8], 4, "first") == [7, 8, None, None]
    with pytest.raises(ValueError, match="valid"):
        map_residuals([1], 2, "spread")
    with pytest.raises(ValueError, match="depth 2"):
        map_residuals([1, 2, 3], 2)


def test_mmdit_last_block_takes_no_residual_and_unused_residuals_warn():
    """diffusers SD3 skips the context-pre-only last block; a ControlNet residual that reaches no block warns."""
    assert map_residuals([7, 8], 2, skip_blocks=(1,)) == [7, None]
    assert map_residuals([7, 8, 9], 4, "first", skip_blocks=(3,)) == [7, 8, 9, None]
    assert unused_residuals(2, 4, "interval", (3,)) == [] and unused_residuals(3, 4, "interval", (3,)) == [2]
    model = make_base("mmdit")
    with pytest.warns(UserWarning, match=r"residual\(s\) \[1\] of 2 reach no block.*num_layers <= 1"):
        net = ControlledTransformer(model, DiTControlNet.from_transformer(model, conditioning_channels=3))
    assert net.skip_blocks == (1,)
    assert ControlledTransformer(make_base("dit"), DiTControlNet.from_transformer(
        make_base("dit"), conditioning_channels=3)).skip_blocks == ()


def test_residual_mapping_first_vs_interval():
    model = make_base("dit")
    cn = randomize_zeros(DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3), std=0.2)
    x, t, image, cond = inputs("dit")
    with torch.no_grad():
        r = cn(x, t, image, **cond)[0]
        first = ControlledTransformer(model, cn, residual_mapping="first").eval()(x, t, controlnet_cond=image, **cond)
        inter = ControlledTransformer(model, cn).eval()(x, t, controlnet_cond=image, **cond)
        torch.testing.assert_close(first, base_call(model, x, t, cond, block_residuals=[r, None]), rtol=0, atol=0)
        torch.testing.assert_close(inter, base_call(model, x, t, cond, block_residuals=[r, r]), rtol=0, atol=0)


def test_multiple_controlnets_sum_residuals():
    model = make_base("mmdit")
    a = randomize_zeros(DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3), std=0.2, seed=4)
    b = randomize_zeros(DiTControlNet.from_transformer(model, conditioning_channels=1), std=0.2, seed=5)
    x, t, image, cond = inputs("mmdit")
    edge = image[:, :1]
    both, scale = ControlledTransformer(model, [a, b]).eval(), 0.7
    with torch.no_grad():
        # the MM-DiT's last block is context-pre-only: no residual there (diffusers SD3)
        ra = map_residuals(a(x, t, image, **cond), 2, skip_blocks=(1,))
        rb = map_residuals(b(x, t, edge, conditioning_scale=scale, **cond), 2, skip_blocks=(1,))
        ref = base_call(model, x, t, cond, block_residuals=[ra[0] + rb[0], None])
        out = both(x, t, controlnet_cond=[image, edge], conditioning_scale=[1.0, scale], **cond)
        torch.testing.assert_close(out, ref)
        only_a = ControlledTransformer(model, a).eval()(x, t, controlnet_cond=image, **cond)
        torch.testing.assert_close(both(x, t, controlnet_cond=[image, edge], conditioning_scale=[1.0, 0.0], **cond),
                                   only_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per ControlNet"):
        both(x, t, controlnet_cond=[image], **cond)
    with pytest.raises(ValueError, match="list of 2"):
        both(x, t, controlnet_cond=image, **cond)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ARCHS)
def test_only_controlnet_gets_gradients(arch):
    model = make_base(arch)
    net = ControlledTransformer(model, DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3))
    net.train()
    assert not model.training and net.controlnet.training
    x, t, image, cond = inputs(arch)
    net(x, t, controlnet_cond=image, **cond).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    params = net.trainable_parameters()
    assert len(params) == len(list(net.controlnet.parameters())) and all(p.grad is not None for p in params)
    # at init only the zero residual heads receive a non-zero gradient (Zhang et al. 2023, Sec. 3.1)
    assert all(lin.weight.grad.abs().sum() > 0 for lin in net.controlnet.controlnet_blocks)
    assert not net.controlnet.cond_proj.weight.grad.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_same_gradients(arch):
    model = make_base(arch)
    x, t, image, cond = inputs(arch)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(7)  # same random cond_embedder init in both runs
        n = 1 if arch == "mmdit" else 2  # an MM-DiT's last block takes no residual: N <= depth / 2 uses them all
        cn = randomize_zeros(DiTControlNet.from_transformer(model, n, conditioning_channels=3), std=0.2)
        net = ControlledTransformer(model, cn).eval()
        net.enable_gradient_checkpointing(ckpt)
        net(x, t, controlnet_cond=image, **cond).square().mean().backward()
        grads.append([p.grad for p in net.trainable_parameters()])
    model.enable_gradient_checkpointing(False)
    assert all(g.any() for g in grads[0][-3:])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_label_dropout_is_shared_with_base():
    """In train mode one draw of dropped labels is used by base and ControlNet alike (CFG training)."""
    model = make_base("dit")
    cn = randomize_zeros(DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3), std=0.2)
    cn.y_embedder.dropout_prob = 1.0
    net = ControlledTransformer(model, cn).eval()
    x, t, image, cond = inputs("dit")
    with torch.no_grad():
        dropped = net.train()(x, t, controlnet_cond=image, **cond)
        null = net.eval()(x, t, y=torch.full((B,), NUM_CLASSES), controlnet_cond=image)
    torch.testing.assert_close(dropped, null, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- I/O and errors
@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_round_trip(arch, tmp_path):
    model = make_base(arch)
    cn = randomize_zeros(DiTControlNet.from_transformer(model, num_layers=1, conditioning_channels=3), std=0.2)
    save_file(cn.state_dict(), tmp_path / "cn.safetensors")
    fresh = DiTControlNet(**cn.config)
    fresh.load_state_dict(load_file(tmp_path / "cn.safetensors"), strict=True)
    x, t, image, cond = inputs(arch)
    with torch.no_grad():
        for a, b in zip(cn(x, t, image, **cond), fresh(x, t, image, **cond)):
            assert torch.equal(a, b)


def test_errors_name_expected_shapes():
    dit, mm = make_base("dit"), make_base("mmdit")
    cn = DiTControlNet.from_transformer(dit, num_layers=1, conditioning_channels=3)
    x, t, image, cond = inputs("dit")
    with pytest.raises(ValueError, match=r"\(2 or 1, 3, 8, 8\): conditioning_channels=3"):
        cn(x, t, image[:, :1], **cond)
    with pytest.raises(ValueError, match="same height/width"):
        cn(x, t, torch.rand(B, 3, 16, 16), **cond)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        cn(x[:, :3], t, image, **cond)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        cn(torch.randn(B, 4, 7, 7), t, torch.rand(B, 3, 7, 7), **cond)
    with pytest.raises(ValueError, match="class labels y"):
        cn(x, t, image, encoder_hidden_states=torch.randn(B, 5, 24))
    mcn = DiTControlNet.from_transformer(mm, conditioning_channels=3)
    mcond = base_cond("mmdit")
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, L, 24\)"):
        mcn(x, t, image, encoder_hidden_states=torch.randn(B, 5, 32), pooled_projections=mcond["pooled_projections"])
    with pytest.raises(ValueError, match=r"pooled_projections must be \(2, 12\)"):
        mcn(x, t, image, encoder_hidden_states=mcond["encoder_hidden_states"], pooled_projections=None)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 2\]"):
        DiTControlNet.from_transformer(dit, num_layers=3)
    with pytest.raises(ValueError, match="DiT or"):
        DiTControlNet.from_transformer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not fit the transformer"):
        ControlledTransformer(mm, cn)
    with pytest.raises(ValueError, match="residual_mapping"):
        ControlledTransformer(dit, cn, residual_mapping="all")
    with pytest.raises(ValueError, match="unknown arch"):
        DiTControlNet(arch="unet")


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_through_diffusion_sample(arch):
    model = make_base(arch)
    cn = randomize_zeros(DiTControlNet.from_transformer(model, conditioning_channels=3), std=0.2)
    net, schedule = ControlledTransformer(model, cn).eval(), RectifiedFlow()
    _, _, image, cond = inputs(arch)
    x_T = prior_sample((B, 4, S, S), schedule, generator=0)
    model_fn = wrap_model(net, schedule, prediction="velocity")
    with torch.no_grad():
        for sampler in ("flow_euler", "dpmpp_2m"):
            out = sample(model_fn, x_T, schedule, sampler=sampler, steps=3,
                         cond=dict(controlnet_cond=image, conditioning_scale=1.0, **cond))
            bare = sample(model_fn, x_T, schedule, sampler=sampler, steps=3, cond=cond)
            assert out.shape == x_T.shape and torch.isfinite(out).all()
            assert (out - bare).abs().max() > 1e-3
        if arch == "dit":  # batched CFG duplicates controlnet_cond onto the unconditional half
            guided = classifier_free_guidance(model_fn, 3.0, uncond=dict(y=torch.full((B,), NUM_CLASSES)))
            out = sample(guided, x_T, schedule, sampler="flow_heun", steps=2, cond=dict(controlnet_cond=image, **cond))
            assert out.shape == x_T.shape and torch.isfinite(out).all()
