"""ControlledTransformer on an MM-DiT == diffusers' SD3Transformer2DModel(block_controlnet_hidden_states=...) on the
same weights: which blocks get a ControlNet residual (interval mapping, none after the context-pre-only last block)."""
import pytest
import torch

from controlnet.dit_controlnet import ControlledTransformer, DiTControlNet
from diffusion.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")

S, B, DEPTH, HIDDEN, HEADS, TEXT, POOLED = 8, 2, 3, 64, 2, 24, 12


def randomize(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def swap_halves(w):
    """(shift, scale) rows -> (scale, shift) rows: diffusers' AdaLayerNormContinuous chunks scale first."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def to_sd3_state_dict(m: MMDiT, ref: dict) -> dict:
    """Our MMDiT weights under diffusers' SD3Transformer2DModel names; `ref` supplies the tensors diffusers has and
    we do not (the unused context query of the context-pre-only last block)."""
    sd, out = m.state_dict(), dict(ref)

    def put(dst, src, fn=lambda w: w):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = fn(sd[f"{src}.{s}"])

    put("pos_embed.proj", "x_embedder")
    put("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    put("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    put("time_text_embed.text_embedder.linear_1", "pooled_embedder.0")
    put("time_text_embed.text_embedder.linear_2", "pooled_embedder.2")
    put("context_embedder", "context_embedder")
    put("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves)
    put("proj_out", "final_layer.linear")
    for i, blk in enumerate(m.blocks):
        o, b = f"transformer_blocks.{i}", f"blocks.{i}"
        put(f"{o}.norm1.linear", f"{b}.adaLN_modulation.1")
        put(f"{o}.norm1_context.linear", f"{b}.adaLN_modulation_context.1",
            swap_halves if blk.context_pre_only else (lambda w: w))
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            put(f"{o}.attn.{name}", f"{b}.attn.qkv", lambda w, k=k: w.chunk(3)[k])
        ctx = ("add_k_proj", "add_v_proj") if blk.context_pre_only else ("add_q_proj", "add_k_proj", "add_v_proj")
        for k, name in enumerate(ctx):
            put(f"{o}.attn.{name}", f"{b}.attn_context.qkv", lambda w, k=k: w.chunk(len(ctx))[k])
        put(f"{o}.attn.norm_q", f"{b}.attn.q_norm")
        put(f"{o}.attn.norm_k", f"{b}.attn.k_norm")
        put(f"{o}.attn.norm_added_q", f"{b}.attn_context.q_norm")
        put(f"{o}.attn.norm_added_k", f"{b}.attn_context.k_norm")
        put(f"{o}.attn.to_out.0", f"{b}.attn.proj")
        put(f"{o}.attn.to_add_out", f"{b}.attn_context.proj")
        put(f"{o}.ff.net.0.proj", f"{b}.mlp.0")
        put(f"{o}.ff.net.2", f"{b}.mlp.2")
        put(f"{o}.ff_context.net.0.proj", f"{b}.mlp_context.0")
        put(f"{o}.ff_context.net.2", f"{b}.mlp_context.2")
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = randomize(MMDiT(input_size=S, in_channels=4, depth=DEPTH, hidden_size=HIDDEN, num_heads=HEADS,
                           joint_attention_dim=TEXT, pooled_projection_dim=POOLED), seed=1).eval()
    theirs = diffusers.SD3Transformer2DModel(
        sample_size=S, patch_size=2, in_channels=4, num_layers=DEPTH, attention_head_dim=HIDDEN // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=TEXT, caption_projection_dim=HIDDEN,
        pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=None, qk_norm="rms_norm").eval()
    theirs.load_state_dict(to_sd3_state_dict(ours, theirs.state_dict()), strict=True)
    return ours, theirs


def _inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, 4, S, S, generator=g), t=torch.tensor([130.0, 905.0]),
                image=torch.rand(B, 3, S, S, generator=g),
                ehs=torch.randn(B, 5, TEXT, generator=g), pooled=torch.randn(B, POOLED, generator=g))


def test_weight_mapping_gives_the_same_bare_transformer(models):
    ours, theirs = models
    i = _inputs()
    with torch.no_grad():
        a = ours(i["x"], i["t"], i["ehs"], i["pooled"])
        b = theirs(i["x"], i["ehs"], i["pooled"], i["t"]).sample
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:controlnet 0. residual")  # N > depth / 2: the last residual reaches no block
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_controlled_mmdit_matches_diffusers_sd3_block_controlnet_hidden_states(models, num_layers):
    """Residual list of N: block i gets residual int(i / (depth / N)); the context-pre-only last block gets none."""
    ours, theirs = models
    cn = randomize(DiTControlNet.from_transformer(ours, num_layers=num_layers, conditioning_channels=3), seed=3,
                   std=0.2).eval()
    net = ControlledTransformer(ours, cn).eval()
    i = _inputs()
    with torch.no_grad():
        res = cn(i["x"], i["t"], i["image"], encoder_hidden_states=i["ehs"], pooled_projections=i["pooled"])
        assert all(r.abs().mean() > 1e-2 for r in res)  # every residual non-zero
        a = net(i["x"], i["t"], encoder_hidden_states=i["ehs"], pooled_projections=i["pooled"],
                controlnet_cond=i["image"])
        b = theirs(i["x"], i["ehs"], i["pooled"], i["t"], block_controlnet_hidden_states=res).sample
        bare = theirs(i["x"], i["ehs"], i["pooled"], i["t"]).sample
    assert (b - bare).abs().max() > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
