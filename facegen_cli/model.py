"""LatentDiT: a Diffusion Transformer over VAE latents, conditioned on attribute labels.

The network predicts the rectified-flow velocity v = noise - x0 for a noisy latent x_t
(see flow.py). It follows facebookresearch/DiT: patchify -> transformer blocks with
adaLN-Zero modulation -> a modulated final layer -> unpatchify. The condition is

    c = MLP(sinusoidal(t)) + SiLU(Linear(y))

where y holds one value per attribute: +1 (asked for), -1 (asked against) or 0 (left free).
The all-zero y is the unconditional branch used by classifier-free guidance.

An inpainting model (context_channels = latent_channels + 1, as SD-inpainting and FLUX-Fill do) also sees
what is known of the latent: the mask of the region to generate and the clean latent outside it,
patchified by their own embedding and added to the tokens. That embedding starts at zero, so a model
fine-tuned from a plain one starts as exactly that model; with no context given it is told that nothing
is known, and draws whole faces as before.

A framed model (framing=True, framing.py) also takes the view it draws: a zoomed square of the canonical
crop, as three numbers (log zoom, centre offset) embedded by an MLP added to c. Its last layer starts at
zero too, and the whole face is the zero framing.

A distilled model (distilled=True, distill.py) can also be told the guidance it is to give and the step it
is to take, and then predicts in one call what its teacher's guided sampler would do: the guidance scales
(the asked attributes' and the drawn ones', guidance.composed) with which attributes are asked and which
way, and the step size d (a shortcut model's, Frans et al. 2024: the average velocity over a step of size d;
0 = the velocity itself). Both embeddings are added to c and start at zero. Called without them it is the plain
conditional model, close to the teacher's v(x, t, y). Its `guidance_gain`, measured after distillation and 1
during it, calibrates the asked scale to the teacher's: told s, it gives 1 + gain (s - 1), so that a guidance
shows an attribute as often with the student as with the teacher.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds a flow time t in [0, 1] with sinusoidal features followed by an MLP."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t, dim, max_period=10000):
        # Scale t to DiT's 0..1000 range so that the frequencies cover it as in the paper.
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class AttributeEmbedder(nn.Module):
    """Embeds the ternary attribute vector y: SiLU(Linear(y)). y = 0 embeds to SiLU(bias)."""

    def __init__(self, num_attributes, hidden_size):
        super().__init__()
        self.proj = nn.Linear(num_attributes, hidden_size)

    def forward(self, y):
        return F.silu(self.proj(y.to(self.proj.weight.dtype)))


class FramingEmbedder(nn.Module):
    """Embeds a view's framing (framing.features: log zoom, centre offset; 0 = the whole face) with an MLP
    whose last layer starts at zero."""

    def __init__(self, hidden_size, size=3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, framing):
        return self.mlp(framing.to(self.mlp[0].weight.dtype))


class GuidanceEmbedder(nn.Module):
    """Embeds the guidance a distilled model gives, by an MLP whose last layer starts at zero: the asked
    attributes' scale and the drawn ones' (each with sinusoidal features), which way each asked and each drawn
    attribute points (y where asked, y where drawn: the guidance pushes along them, away from the reference),
    and those directions times their scale less 1, so that how hard each attribute is pushed reaches the
    network in one linear layer, as classifier-free guidance's v_ref + s (v_y - v_ref) extrapolates it."""

    def __init__(self, num_attributes, hidden_size, frequency_size=64):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(2 * frequency_size + 4 * num_attributes, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, scales, asked, y):
        # scales (B, 2): 1 is no guidance; sinusoidal() reads t in [0, 1], so a scale of 1 + 10 t
        features = [TimestepEmbedder.sinusoidal((s - 1) / 10, self.frequency_size) for s in scales.unbind(1)]
        asked = asked.to(y.dtype)
        pushed = [y * asked, y * (1 - asked)]
        pushed += [p * (s[:, None] - 1) / 5 for p, s in zip(pushed, scales.unbind(1))]
        return self.mlp(torch.cat(features + pushed, dim=1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """Self-attention and MLP, each behind an adaLN-Zero modulated LayerNorm and a gate."""

    def __init__(self, hidden_size, num_heads, mlp_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            # Exact GELU: within 5e-4 of DiT's tanh approximation, and 6x faster than it on CPUs.
            nn.Linear(hidden_size, mlp_size), nn.GELU(), nn.Linear(mlp_size, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(hidden_size, grid_size):
    """Fixed 2-D sine-cosine position embedding, shape (grid_size**2, hidden_size).

    Half of the channels encode the row, half the column, each as sin/cos at geometric frequencies.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    angles_r, angles_c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    emb = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)
    return emb.float()


class LatentDiT(ModelMixin, ConfigMixin):
    """Velocity model v(x_t, t, y). Config (and so `save_pretrained`) carries the attribute names."""

    @register_to_config
    def __init__(
        self,
        attributes=(),
        latent_size=16,
        latent_channels=4,
        patch_size=2,
        hidden_size=1024,
        depth=15,
        num_heads=16,
        mlp_size=4096,
        context_channels=0,
        framing=False,
        distilled=False,
        guidance_gain=1.0,
    ):
        super().__init__()
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must divide by num_heads {num_heads} and by 4")
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} must divide by patch_size {patch_size}")
        if context_channels not in (0, latent_channels + 1):
            raise ValueError(f"context_channels {context_channels} must be 0 or latent_channels + 1 "
                             f"(the mask and the known latent)")
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        self.grid_size = latent_size // patch_size

        self.x_embedder = nn.Conv2d(latent_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.context_embedder = nn.Conv2d(context_channels, hidden_size, kernel_size=patch_size,
                                          stride=patch_size) if context_channels else None
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = AttributeEmbedder(len(attributes), hidden_size)
        self.framing_embedder = FramingEmbedder(hidden_size) if framing else None
        self.guidance_embedder = GuidanceEmbedder(len(attributes), hidden_size) if distilled else None
        self.step_embedder = TimestepEmbedder(hidden_size) if distilled else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_size) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, latent_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def xavier_linear(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.context_embedder is not None:
            nn.init.zeros_(self.context_embedder.weight)
            nn.init.zeros_(self.context_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.proj.weight, std=0.02)
        for embedder in (self.framing_embedder, self.guidance_embedder, self.step_embedder):
            if embedder is not None:
                nn.init.zeros_(embedder.mlp[-1].weight)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def attributes(self):
        return list(self.config.attributes)

    @property
    def inpainting(self):
        return self.context_embedder is not None

    @property
    def framed(self):
        return self.framing_embedder is not None

    @property
    def distilled(self):
        return self.guidance_embedder is not None

    def architecture(self):
        """The config a teacher and its distilled students share: shape and attributes, without `distilled`
        and `guidance_gain`, and without the config's private keys ("_use_default_values" of a config saved
        before `distilled` existed would make diffusers drop a student's distilled=True when it is loaded)."""
        return {key: value for key, value in self.config.items()
                if not key.startswith("_") and key not in ("distilled", "guidance_gain")}

    def unpatchify(self, x):
        """(B, N, p*p*C) tokens -> (B, C, H, W) latents."""
        p, c, g = self.patch_size, self.latent_channels, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y, context=None, framing=None, guidance=None, step=None):
        """x: (B, C, H, W) noisy latents, t: (B,) times in [0, 1], y: (B, A) attributes -> velocity.
        context: (B, C + 1, H, W) from inpainting_context, for an inpainting model (None: nothing known).
        framing: (B, 3) framing.features of the views, for a framed model (None: whole faces).
        guidance: (scales (B, 2), asked (B, A)) and step: (B,) step sizes, for a distilled model (both or
        neither; None: the plain conditional velocity)."""
        # (B, D, g, g) -> (B, N, D) tokens, made contiguous: otherwise the residual stream would keep the
        # transposed layout, and every LayerNorm would copy it. Its dtype is the embedding's (bf16 under autocast).
        embedded = self.x_embedder(x)
        if self.context_embedder is not None:
            if context is None:
                context = inpainting_context(torch.zeros_like(x), torch.ones_like(x[:, :1]))
            embedded = embedded + self.context_embedder(context.to(embedded.dtype))
        elif context is not None:
            raise ValueError("this model takes no inpainting context (context_channels is 0)")
        tokens = embedded.flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        if self.framing_embedder is not None:
            c = c + self.framing_embedder(x.new_zeros(len(x), self.framing_embedder.mlp[0].in_features)
                                          if framing is None else framing)
        elif framing is not None:
            raise ValueError("this model takes no framing (framing is False)")
        if (guidance is None) != (step is None):
            raise ValueError("a distilled model takes the guidance and the step together")
        if guidance is not None:
            if self.guidance_embedder is None:
                raise ValueError("this model takes no guidance or step (distilled is False)")
            scales, asked = guidance
            scales = torch.stack([1 + self.config.guidance_gain * (scales[:, 0] - 1), scales[:, 1]], dim=1)
            c = c + self.guidance_embedder(scales, asked, y) + self.step_embedder(step)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def inpainting_context(known, mask):
    """An inpainting model's context: the mask (B, 1, H, W), 1 where the latent is generated, and the known
    clean latent (B, C, H, W) where it is kept (zero under the mask)."""
    mask = mask.to(known.dtype).expand(known.shape[0], 1, *known.shape[2:])
    return torch.cat([mask, known * (1 - mask)], dim=1)
