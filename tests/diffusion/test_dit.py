"""Tests for the DiT / MMDiT networks (diffusion/models/dit.py, diffusion/models/mmdit.py)."""
import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.models.dit import DIT_MODELS, DiT, build_dit, sincos_pos_embed_2d, timestep_embedding
from diffusion.models.mmdit import MMDIT_MODELS, MMDiT, build_mmdit

ROOT = Path(__file__).resolve().parents[2]


def randomize_zero_params(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give the adaLN-Zero (all-zero) parameters random values so every path is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_dit(**kw) -> DiT:
    torch.manual_seed(0)
    return build_dit("DiT-Tiny/2", **{"input_size": 16, "num_classes": 10, **kw})


def tiny_mmdit(**kw) -> MMDiT:
    torch.manual_seed(0)
    return build_mmdit("MMDiT-Tiny", **{"input_size": 16, "joint_attention_dim": 24, "pooled_projection_dim": 12,
                                        **kw})


def mm_inputs(b=2, c=4, s=16, L=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, c, s, s, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, L, 24, generator=g), torch.randn(b, 12, generator=g))


# ----------------------------------------------------------------------------------------------- shapes / factories
@pytest.mark.parametrize("patch,channels,learn_sigma,size", [(2, 4, False, 16), (4, 3, False, 16), (8, 4, True, 32),
                                                             (2, 16, False, 8)])
def test_dit_output_shapes(patch, channels, learn_sigma, size):
    model = randomize_zero_params(build_dit(f"DiT-Tiny/{patch}", input_size=size, in_channels=channels,
                                            num_classes=10, learn_sigma=learn_sigma))
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0.0, 999.0]), torch.tensor([1, 10]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)
    # non-configured (non-square) size: positions computed on the fly; scalar t broadcasts
    assert model(torch.randn(1, channels, size, 2 * size), 500.0).shape[-2:] == (size, 2 * size)


@pytest.mark.parametrize("patch,channels", [(2, 4), (4, 16)])
def test_mmdit_output_shapes(patch, channels):
    model = randomize_zero_params(tiny_mmdit(patch_size=patch, in_channels=channels))
    x, t, ehs, pooled = mm_inputs(c=channels)
    assert model(x, t, ehs, pooled).shape == x.shape


def test_factories_and_paper_sizes():
    paper = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (d, h, nh) in paper.items():
        for p in (2, 4, 8):
            kw = DIT_MODELS[f"DiT-{size}/{p}"].keywords
            assert (kw["depth"], kw["hidden_size"], kw["num_heads"], kw["patch_size"]) == (d, h, nh, p)
    assert "DiT-Tiny/2" in DIT_MODELS and "MMDiT-Tiny" in MMDIT_MODELS
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="MMDiT-Tiny"):
        build_mmdit("MMDiT-huge")
    s2 = build_dit("DiT-S/2", learn_sigma=True)  # DiT Table 4: 33.0M params (incl. 0.1M frozen pos-embed)
    assert 32.5e6 < sum(p.numel() for p in s2.parameters()) < 33.0e6
    m = build_dit("DiT-Tiny/4", input_size=8, in_channels=3, num_classes=0)
    assert m.y_embedder is None and m.patch_size == 4 and m.out_channels == 3
    mm = MMDIT_MODELS["MMDiT-d24"].keywords
    assert mm["depth"] == 24
    d = build_mmdit("MMDiT-Tiny")
    assert d.hidden_size == 64 * d.depth and d.blocks[0].attn.num_heads == d.depth


# ----------------------------------------------------------------------------------------------- adaLN-Zero
def test_dit_adaln_zero_identity_at_init():
    model = tiny_dit(qk_norm=True)
    seen = []

    def hook(module, args, out):
        seen.append(torch.equal(args[0], out))

    for block in model.blocks:
        block.register_forward_hook(hook)
    out = model(torch.randn(3, 4, 16, 16), torch.rand(3) * 1000, torch.tensor([0, 5, 10]))
    assert seen == [True] * len(model.blocks)
    assert torch.equal(out, torch.zeros_like(out))


def test_mmdit_adaln_zero_identity_at_init():
    model = tiny_mmdit()
    x, t, ehs, pooled = mm_inputs()
    results = []

    def hook(module, args, out):
        results.append((torch.equal(args[0], out[0]), out[1] is None or torch.equal(args[1], out[1])))

    for block in model.blocks:
        block.register_forward_hook(hook)
    out = model(x, t, ehs, pooled)
    assert results == [(True, True)] * len(model.blocks)
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------- embeddings
def test_pos_embed_closed_form():
    D, h, w = 32, 3, 5
    pe = sincos_pos_embed_2d(D, h, w).view(h, w, D)  # tokens are row-major
    # first half depends only on the column, second half only on the row
    assert torch.allclose(pe[:, :, : D // 2], pe[:1, :, : D // 2].expand(h, w, D // 2))
    assert torch.allclose(pe[:, :, D // 2:], pe[:, :1, D // 2:].expand(h, w, D // 2))
    q = D // 4
    for r, c in [(0, 0), (2, 3), (1, 4)]:
        for k in (0, 1, q - 1):
            om = 10000.0 ** (-k / q)
            assert math.isclose(pe[r, c, k], math.sin(c * om), abs_tol=1e-6)
            assert math.isclose(pe[r, c, q + k], math.cos(c * om), abs_tol=1e-6)
            assert math.isclose(pe[r, c, 2 * q + k], math.sin(r * om), abs_tol=1e-6)
            assert math.isclose(pe[r, c, 3 * q + k], math.cos(r * om), abs_tol=1e-6)
    model = tiny_dit()
    assert not model.pos_embed.requires_grad and "pos_embed" not in model.state_dict()
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(64, 8, 8))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 250.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    assert torch.allclose(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))


# ----------------------------------------------------------------------------------------------- QK norm / CFG
def test_qk_norm_present_and_inert_at_init():
    plain, normed = tiny_dit(), tiny_dit(qk_norm=True)
    assert all(isinstance(b.attn.q_norm, torch.nn.RMSNorm) and isinstance(b.attn.k_norm, torch.nn.RMSNorm)
               for b in normed.blocks)
    assert all(isinstance(b.attn.q_norm, torch.nn.Identity) for b in plain.blocks)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.tensor([1, 2])
    assert torch.equal(plain(x, t, y), normed(x, t, y))  # both exactly zero at init
    randomize_zero_params(plain), randomize_zero_params(normed)
    assert not torch.allclose(plain(x, t, y), normed(x, t, y))  # but the norm is really applied
    mm = tiny_mmdit()
    assert all(isinstance(b.attn.q_norm, torch.nn.RMSNorm) and isinstance(b.attn_context.k_norm, torch.nn.RMSNorm)
               for b in mm.blocks)


def test_null_class_and_label_dropout():
    model = randomize_zero_params(tiny_dit(class_dropout_prob=0.5)).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([100.0, 700.0])
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    cond, uncond = model(x, t, y), model(x, t, null)
    assert (cond - uncond).abs().max() > 1e-4
    assert torch.equal(model(x, t), uncond)  # y=None -> null class
    assert torch.equal(model(x, t, y), cond)  # eval mode: no random dropout
    mixed = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(mixed[0], uncond[0], atol=1e-6) and torch.allclose(mixed[1], cond[1], atol=1e-6)
    model.train()
    model.y_embedder.dropout_prob = 1.0
    assert torch.allclose(model(x, t, y), uncond, atol=1e-6)
    model.eval()
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5)
    assert torch.allclose(model.forward_with_cfg(x, t, y, 0.0), uncond, atol=1e-5)


# ----------------------------------------------------------------------------------------------- training
def _grads(model, loss_fn):
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_gradient_checkpointing_identical_grads(kind):
    if kind == "dit":
        model = randomize_zero_params(tiny_dit(qk_norm=True, class_dropout_prob=0.0))
        x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.tensor([1, 4])
        loss_fn = lambda m: m(x, t, y).square().mean()  # noqa: E731
    else:
        model = randomize_zero_params(tiny_mmdit())
        inputs = mm_inputs()
        loss_fn = lambda m: m(*inputs).square().mean()  # noqa: E731
    ref = _grads(model, loss_fn)
    model.enable_gradient_checkpointing()
    ckpt = _grads(model, loss_fn)
    assert ref.keys() == ckpt.keys() and len(ref) == len(list(model.parameters()))
    for n in ref:
        assert torch.equal(ref[n], ckpt[n]), n


def test_tiny_dit_overfits_one_batch():
    torch.manual_seed(0)
    model = build_dit("DiT-Tiny/2", input_size=8, num_classes=4, class_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, y = torch.rand(4, generator=g) * 1000, torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# ----------------------------------------------------------------------------------------------- MMDiT structure
def test_mmdit_last_block_pre_only():
    model = tiny_mmdit()
    *body, last = model.blocks
    assert last.context_pre_only and not hasattr(last, "mlp_context") and not hasattr(last, "norm2_context")
    assert last.attn_context.proj is None and last.attn_context.q_norm is None  # contributes K, V only
    assert last.adaLN_modulation_context[-1].out_features == 2 * model.hidden_size
    assert not any("blocks.1.mlp_context" in n for n, _ in model.named_parameters())
    for b in body:
        assert not b.context_pre_only and hasattr(b, "mlp_context") and b.attn_context.proj is not None


def test_mmdit_text_conditioning_changes_output():
    model = randomize_zero_params(tiny_mmdit())
    x, t, ehs, pooled = mm_inputs()
    base = model(x, t, ehs, pooled)
    assert (model(x, t, ehs + torch.randn_like(ehs), pooled) - base).abs().max() > 1e-4  # token text via attention
    assert (model(x, t, ehs, pooled + torch.randn_like(pooled)) - base).abs().max() > 1e-4  # pooled text via adaLN
    assert (model(x, t + 100, ehs, pooled) - base).abs().max() > 1e-4


def test_mmdit_streams_have_separate_weights():
    model = tiny_mmdit()
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(list(model.named_parameters(remove_duplicate=False)))
    for b in model.blocks:
        assert b.attn.qkv.weight.data_ptr() != b.attn_context.qkv.weight.data_ptr()
        assert b.adaLN_modulation[-1].weight.data_ptr() != b.adaLN_modulation_context[-1].weight.data_ptr()
    assert model.blocks[0].mlp[0].weight.data_ptr() != model.blocks[0].mlp_context[0].weight.data_ptr()


# ----------------------------------------------------------------------------------------------- independence
def test_network_does_not_import_noise_schedule():
    for path in sorted((ROOT / "diffusion" / "models").glob("*.py")):  # every network / adapter file
        name = path.name
        tree = ast.parse(path.read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any("schedul" in m or "sampler" in m for m in mods), (name, mods)
    # import the networks without running diffusion/__init__.py (owned elsewhere) and check sys.modules
    code = (
        "import sys, types; pkg = types.ModuleType('diffusion'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['diffusion'] = pkg; import diffusion.models.dit, diffusion.models.mmdit;"
        "bad = [m for m in sys.modules if m.startswith('diffusion.') and not m.startswith('diffusion.models')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT / "diffusion")], check=True, cwd=ROOT)
