"""Adapter: diffusers SD3Transformer2DModel behind the project's net(x, t, encoder_hidden_states, pooled_projections)."""
import torch


class SD3Backbone(torch.nn.Module):
    """diffusers SD3Transformer2DModel as net(x, t, encoder_hidden_states, pooled_projections); text
    features narrower than the transformer's are zero-padded, as SD3 pads CLIP features to T5 width."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, encoder_hidden_states, pooled_projections):
        c = self.transformer.config
        ehs, pooled = encoder_hidden_states, pooled_projections
        if ehs.shape[-1] > c.joint_attention_dim or pooled.shape[-1] > c.pooled_projection_dim:
            raise ValueError(f"text features ({ehs.shape[-1]}, pooled {pooled.shape[-1]}) are wider than the "
                             f"transformer's joint_attention_dim={c.joint_attention_dim} / "
                             f"pooled_projection_dim={c.pooled_projection_dim}")
        ehs = torch.nn.functional.pad(ehs, (0, c.joint_attention_dim - ehs.shape[-1]))
        pooled = torch.nn.functional.pad(pooled, (0, c.pooled_projection_dim - pooled.shape[-1]))
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ehs,
                                pooled_projections=pooled, return_dict=False)[0]

    def enable_gradient_checkpointing(self):
        self.transformer.enable_gradient_checkpointing()
