"""
Guided and latent diffusion: classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233),
classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), latent diffusion with
cross-attention (Rombach et al. 2022, arXiv:2112.10752).

A KL-regularised autoencoder maps images to a small latent (28x28 digits -> 4x7x7); a U-Net
learns eps_theta(z_t, t, context) on the scaled latents with L_simple, cross-attending to the
context tokens of a class label or a caption (SpatialTransformer: self-attention, cross-attention,
feed-forward). Guidance steers sampling toward the condition:
  CFG         eps = eps_u + s (eps_c - eps_u)                  (Ho & Salimans Eq. 6, s = w + 1)
  classifier  eps = eps_u - s sqrt(1 - alpha_bar_t) grad log p(y | z_t)   (Dhariwal & Nichol Eq. 14)
Scale convention: s = 1 is the conditional model, s = 0 the unconditional one; the CFG paper's w is
s - 1. CFG needs one network trained with a null context (--p-uncond); classifier guidance needs a
second, noise-aware network and its gradient at every step. DDIM samples, the decoder decodes.
Images live in [-1, 1]. Left out on purpose: the AE's perceptual and GAN losses (L1 + L2 only),
LDM's GEGLU feed-forward (a GELU MLP here), pretrained text encoders (ours trains from scratch).

  python cfg_ldm.py --stage ae                       # 1. the autoencoder (and its scale factor)
  python cfg_ldm.py --stage ldm --cond class         # 2. the latent U-Net, class tokens, CFG
  python cfg_ldm.py --stage classifier               # 3. (optional) a noisy classifier
  python cfg_ldm.py --sample 100 --guidance 3        # 10 classes, DDIM-50, CFG s = 3
  python cfg_ldm.py --sample 2500 --sweep 0,1,2,3,5,7 # one samples.npz per scale + guidance.png
  python cfg_ldm.py --sample 100 --guide classifier --guidance 5
  python cfg_ldm.py --stage ldm --cond text --out runs/t2i --dataset mnist-12k        # captions
  python cfg_ldm.py --sample 20 --out runs/t2i --prompt "a thick 4|a thin seven"
  python cfg_ldm.py --stage ldm --pixel --out runs/pixel   # the same U-Net on pixels, no AE
The paper's other tasks, with the same U-Net, loop and samplers (Rombach et al. Secs. 4.3-4.5):
  --cond layout   context = one token per box (class, x0, y0, x1, y1 on a grid), cross-attention;
                  --dataset mnist-layout: 1-3 digits in boxes on a 64x64 canvas (--stage ae too)
  --cond sr       the low-res image (area-downsampled by --sr-factor) joins z_t as channels
  --cond inpaint  the masked image's latent and the mask join z_t as channels; the known pixels
                  are pasted back after decoding. Both concat tasks drop their condition with
                  --p-uncond like a context, so one network is also the unconditional model.
  python cfg_ldm.py --sample 8 --out runs/sr --input low.png     # upsample a user's image
  python cfg_ldm.py --sample 8 --out runs/inpaint --input x.png --mask m.png   # white = fill
  python cfg_ldm.py --sample 1000 --out runs/layout --layout boxes.json     # or test layouts
Add --tiny for CPU-sized networks (README: measured recipes and results).

Load the trained networks with their classes alone:
  ck = torch.load("runs/cfg_ldm/ckpt.pt")
  ldm, ae = LDM(**ck["model_args"]["ldm"]), AutoencoderKL(**ck["model_args"]["ae"])
  ldm.load_state_dict(ck["ema"]); ae.load_state_dict(ck["ae"])
"""

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# -----------------------------------------------------------------------------
# config
@dataclasses.dataclass
class Config(common.Config):
    stage: str = "ae"  # ae | ldm | classifier: into --out as ae.pt, ckpt.pt, classifier.pt
    cond: str = "class"  # ldm: none | class | text | layout | sr | inpaint (see the docstring)
    pixel: bool = False  # ldm/classifier on pixels instead of latents (no AE)
    digits: str = "mnist"  # the digits of the built-in mnist-layout: mnist | mnist-12k
    steps: int = 20000  # optimizer steps of this stage
    # autoencoder (LDM's KL-f4: z_ch x H/f x W/f latents)
    f: int = 4  # downsampling factor, a power of 2
    z_ch: int = 4  # latent channels
    ae_ch: int = 64  # AE width; --tiny: 16
    kl_weight: float = 1e-6  # weight of the KL term against L1 + L2 (summed over pixels)
    # latent U-Net (transformer blocks at the two lower levels)
    ch: int = 128  # base channels; --tiny: 32
    ch_mult: str = "1,2,2"  # channel multiplier per level
    num_res_blocks: int = 2  # per level; --tiny: 1
    heads: int = 4  # attention heads
    ctx_dim: int = 256  # context token width; --tiny: 64
    text_layers: int = 2  # caption encoder's transformer layers
    max_len: int = 48  # caption bytes kept (longer captions are cut)
    p_uncond: float = 0.1  # CFG: probability of training with the null context
    grid: int = 32  # layout: box corners quantised to grid x grid cells of the canvas
    sr_factor: int = 4  # sr: the low-res input is the image downsampled by this factor
    dropout: float = 0.0  # in every ResBlock
    # diffusion and optimisation
    T: int = 1000  # diffusion steps
    schedule: str = "scaled_linear"  # scaled_linear (LDM) | linear (DDPM)
    warmup: int = 1000  # linear LR warmup steps, capped at 5% of --steps
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.9999  # EMA of the U-Net and context encoder; samples come from it
    # sampling
    sample_steps: int = 50  # DDIM steps K
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 = DDPM posterior variance
    guide: str = "cfg"  # cfg | classifier (needs classifier.pt; on the unconditional model)
    guidance: float = 3.0  # scale s: 1 = conditional, 0 = unconditional (CFG's w = s - 1)
    sweep: str = ""  # e.g. 0,1,3: N samples per scale (same noise) in <out>/sweep/<guide>_s<S>/
    labels: str = ""  # --sample, class models: labels to cycle (default 0-9)
    prompt: str = ""  # --sample, text: prompts split on |, or a file of lines (default: held out)
    layout: str = ""  # --sample, layout: a JSON list of layouts [[label, x0, y0, x1, y1], ...]
    input: str = ""  # --sample, sr: a low-res image to upsample; inpaint: an image to complete
    mask: str = ""  # --sample, inpaint with --input: a mask image of its size, white = fill
    at_least = dict(T=2, guidance=0, z_ch=1, heads=1, max_len=1, grid=2, sr_factor=1)
    at_least |= dict(sample_steps=1, p_uncond=0)
    choices = dict(stage=("ae", "ldm", "classifier"), guide=("cfg", "classifier"))
    choices |= dict(cond=("none", "class", "text", "layout", "sr", "inpaint"))
    choices |= dict(schedule=("scaled_linear", "linear"), digits=("mnist", "mnist-12k"))


# -----------------------------------------------------------------------------
# model: blocks
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as the Transformer's: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], dim=1)


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)  # 32 groups (fewer for --tiny widths)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding (tdim > 0), GroupNorm-SiLU-dropout-conv, skip; then
    a SpatialTransformer over the context (ctx_dim > 0)."""

    def __init__(self, cin: int, cout: int, tdim=0, dropout=0.0, ctx_dim=0, heads=4):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout) if tdim else None
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = SpatialTransformer(cout, ctx_dim, heads) if ctx_dim else None

    def forward(self, x, temb=None, ctx=None, mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))
        return h if self.attn is None else self.attn(h, ctx, mask)


class Attention(nn.Module):
    """Multi-head attention: queries from x, keys and values from ctx (x itself: self-attention).
    mask (B, L): True marks a context token to attend to (padding is False)."""

    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx, mask=None):
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, D/h)
        kv = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        m = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): over keys only
        h = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=m)  # (B, h, N, D/h)
        return self.out(h.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context (if ctx_dim), feed-forward: LDM's
    BasicTransformerBlock (with a GELU MLP for its GEGLU)."""

    def __init__(self, dim: int, heads: int, ctx_dim: int = 0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, ctx_dim, heads) if ctx_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, ctx=None, mask=None, self_mask=None):
        h = self.norm1(x)
        x = x + self.attn1(h, h, self_mask)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), ctx, mask)  # keys and values: the context tokens
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's cross-attention layer: pixels as tokens through a TransformerBlock, residual;
    proj_out starts at zero, so the layer starts as the identity."""

    def __init__(self, c: int, ctx_dim: int, heads: int):
        super().__init__()
        self.norm, self.proj_in = norm(c), nn.Conv2d(c, c, 1)
        self.block = TransformerBlock(c, heads, ctx_dim)
        self.proj_out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, ctx, mask):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.block(h, ctx, mask).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Conv2d):
    def __init__(self, c: int):
        super().__init__(c, c, 3, stride=2, padding=1)

    def forward(self, x, *cond):
        return super().forward(x)


class Upsample(nn.Conv2d):
    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1)

    def forward(self, x, size):  # to the skip's size: 4 -> 7 on a 7x7 latent
        return super().forward(F.interpolate(x, size=tuple(size), mode="nearest"))


# -----------------------------------------------------------------------------
# model: the networks
class UNet(nn.Module):
    """eps_theta(z_t, t, ctx): (B, in_ch, H, W), (B,) steps, (B, L, ctx_dim) tokens, (B, L) mask
    -> (B, out_ch, H, W). LDM's U-Net: ResBlocks, SpatialTransformers at `attn_levels`."""

    def __init__(
        self,
        in_ch=4,
        out_ch=4,
        ch=128,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_levels=(1, 2),
        heads=4,
        ctx_dim=256,
        dropout=0.0,
    ):
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        blk = lambda cin, cout, attn: ResBlock(cin, cout, tdim, dropout, ctx_dim * attn, heads)
        skips, c = [ch], ch
        for i, m in enumerate(ch_mult):  # encoder: every output is kept for a skip connection
            for _ in range(num_res_blocks):
                self.down.append(blk(c, ch * m, i in attn_levels))
                c = ch * m
                skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([blk(c, c, True), blk(c, c, False)])
        for i, m in reversed(list(enumerate(ch_mult))):  # decoder: one more block per level
            for _ in range(num_res_blocks + 1):
                self.up.append(blk(c + skips.pop(), ch * m, i in attn_levels))
                c = ch * m
            if i > 0:
                self.up.append(Upsample(c))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # eps_theta starts at 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, ctx, mask=None):
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4ch)
        hs = [self.conv_in(x)]
        for blk in self.down:
            hs.append(blk(hs[-1], temb, ctx, mask))
        h = hs[-1]
        for blk in self.mid:
            h = blk(h, temb, ctx, mask)
        for blk in self.up:
            if isinstance(blk, Upsample):
                h = blk(h, hs[-1].shape[-2:])
            else:
                h = blk(torch.cat([h, hs.pop()], 1), temb, ctx, mask)
        return self.out(h)


def tokenize(texts, max_len: int = 48) -> torch.Tensor:
    """Captions -> (B, max_len) ids: a start token 1, then UTF-8 bytes + 2, cut at max_len,
    padded with 0. Any string works; there is no vocabulary file."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, s in enumerate(texts):
        b = [1] + [v + 2 for v in s.encode("utf-8")][: max_len - 1]
        ids[i, : len(b)] = torch.tensor(b)
    return ids


class Conditioner(nn.Module):
    """The context tokens the U-Net cross-attends to, and CFG's learned null context.
    kind none: the null token only; class: the label as one learned token; text: a byte-level
    transformer over the caption, trained with the U-Net from scratch; layout: one token per box,
    the sum of its class's and its four quantised corners' embeddings, through the same
    transformer without positions (a set: the order of the boxes means nothing)."""

    def __init__(self, kind="class", dim=256, n_classes=10, layers=2, heads=4, max_len=48, grid=32):
        super().__init__()
        self.kind, self.max_len, self.grid = kind, max_len, grid
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # the null context, one token
        if kind in ("class", "layout"):
            self.emb = nn.Embedding(n_classes, dim)
        if kind == "text":
            self.emb = nn.Embedding(258, dim)  # padding, start, 256 byte values
            self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        if kind == "layout":
            self.corner = nn.Embedding(4 * grid, dim)  # a table each for x0, y0, x1, y1
        if kind in ("text", "layout"):
            self.blocks = nn.ModuleList([TransformerBlock(dim, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(dim)

    def forward(self, c, drop=None):
        """c: (B,) labels, (B, L) token ids or (B, K, 5) box tokens (label, x0, y0, x1, y1 in grid
        cells; -1 rows are padding); drop: (B,) bool, True takes the null context.
        Returns ctx (B, L, dim) and mask (B, L), True where a token may be attended to."""
        B = len(c)
        if self.kind in ("none", "sr", "inpaint"):  # the null token is the only context
            return self.null.expand(B, 1, -1), torch.ones(B, 1, dtype=torch.bool, device=c.device)
        if self.kind == "class":
            ctx, mask = self.emb(c)[:, None], torch.ones(B, 1, dtype=torch.bool, device=c.device)
        else:
            if self.kind == "text":
                mask = c > 0  # the start token is never padding, so no row is empty
                ctx = self.emb(c) + self.pos[:, : c.shape[1]]  # (B, L, dim)
            else:
                mask = c[..., 0] >= 0  # (B, K)
                offset = torch.arange(4, device=c.device) * self.grid  # into the corner tables
                corners = self.corner(c[..., 1:].clamp(min=0) + offset).sum(2)  # (B, K, dim)
                ctx = self.emb(c[..., 0].clamp(min=0)) + corners
                empty = ~mask.any(1)  # a layout without boxes gets the null context
                drop = empty if drop is None else drop | empty
                mask = mask | (empty[:, None] & (torch.arange(c.shape[1], device=c.device) == 0))
            for blk in self.blocks:  # bidirectional self-attention over the real tokens
                ctx = blk(ctx, self_mask=mask)
            ctx = self.norm(ctx)
        if drop is None:
            return ctx, mask
        null = F.pad(self.null, (0, 0, 0, ctx.shape[1] - 1)).expand(B, -1, -1)  # (B, L, dim)
        first = torch.zeros_like(mask)
        first[:, 0] = True  # the null context is one token; the rest is padding
        ctx = torch.where(drop[:, None, None], null.to(ctx.dtype), ctx)  # null always in the graph
        return ctx, torch.where(drop[:, None], first, mask)


class LDM(nn.Module):
    """The trained pair: context encoder and U-Net; `ldm(z_t, t, c, drop, concat)` -> eps.
    concat (B, k, H, W), an image condition (sr, inpaint), joins z_t as input channels (LDM's
    concatenation conditioning) and is zeroed where the context is dropped."""

    def __init__(self, unet: dict, cond: dict):
        super().__init__()
        self.unet, self.cond = UNet(**unet), Conditioner(**cond)

    def forward(self, x, t, c, drop=None, concat=None):
        if concat is not None:
            keep = 1.0 if drop is None else (~drop).to(concat.dtype)[:, None, None, None]
            x = torch.cat([x, (concat * keep).to(x.dtype)], 1)  # (B, C + k, H, W)
        return self.unet(x, t, *self.cond(c, drop))


class AutoencoderKL(nn.Module):
    """LDM's first stage (KL-f): conv encoder -> mean and log-variance of a z_ch x H/f x W/f
    latent; conv decoder back to pixels. `scale_factor` (1/std of the latents, measured after
    training) maps latents to unit variance for the diffusion model."""

    def __init__(self, in_ch=1, ch=64, z_ch=4, f=4):
        super().__init__()
        enc = [nn.Conv2d(in_ch, ch, 3, padding=1)]
        dec = [nn.Conv2d(z_ch, ch, 3, padding=1), ResBlock(ch, ch)]
        for _ in range(int(math.log2(f))):
            enc += [ResBlock(ch, ch), nn.Conv2d(ch, ch, 3, stride=2, padding=1)]  # H -> H/2
            up = nn.Upsample(scale_factor=2.0)
            dec += [up, nn.Conv2d(ch, ch, 3, padding=1), ResBlock(ch, ch)]
        enc += [ResBlock(ch, ch), norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * z_ch, 3, padding=1)]
        dec += [norm(ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("scale_factor", torch.ones(()))

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, z_ch, H/f, W/f) each
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution

    def decode(self, z):
        return self.decoder(z)

    def to_latent(self, x, generator=None):
        """z ~ q(z | x), scaled: the diffusion model's x_0."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, device=x.device, generator=generator)
        return self.scale_factor * (mean + (0.5 * logvar).exp() * noise)

    def from_latent(self, z):
        return self.decode(z / self.scale_factor)

    def forward(self, x):
        """(reconstruction from z ~ q(z | x), mean, logvar), in one call that DDP can wrap."""
        mean, logvar = self.encode(x)
        return self.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean)), mean, logvar


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): the U-Net's encoder half with the time embedding, mean-pooled, linear
    (Dhariwal & Nichol's classifier, with mean pooling for their attention pooling)."""

    def __init__(self, in_ch=4, ch=64, ch_mult=(1, 2, 2), n_classes=10):
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.blocks, c = nn.ModuleList(), ch
        for i, m in enumerate(ch_mult):
            self.blocks.append(ResBlock(c, ch * m, tdim))
            c = ch * m
            if i < len(ch_mult) - 1:
                self.blocks.append(Downsample(c))
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x, t):
        temb, h = self.temb(timestep_embedding(t, self.ch)), self.conv_in(x)
        for blk in self.blocks:
            h = blk(h, temb)
        return self.fc(self.head(h))  # (B, n_classes) logits


# -----------------------------------------------------------------------------
# method: schedule, losses, guidance, DDIM
def make_schedule(T: int = 1000, kind: str = "scaled_linear", device=None) -> dict:
    """betas, alpha_bar and log alpha_bar, computed in float64 and stored as float32."""
    if kind == "scaled_linear":  # LDM: linear in sqrt(beta), 0.00085 .. 0.012
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    elif kind == "linear":  # Ho et al.: 1e-4 .. 0.02
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)
    s = dict(betas=betas, alpha_bar=log_alpha_bar.exp(), log_alpha_bar=log_alpha_bar)
    return {k: v.float().to(device) for k, v in s.items()}


def at(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped (B, 1, 1, 1) to broadcast against x."""
    return a[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def q_sample(s: dict, x0, t, eps):
    """x_t ~ q(x_t | x_0) in closed form (DDPM Eq. 4)."""
    return at(s["alpha_bar"], t, x0).sqrt() * x0 + (1 - at(s["alpha_bar"], t, x0)).sqrt() * eps


def gaussian_kl(mean, logvar):
    """KL(N(mean, e^logvar) || N(0, I)) per image, summed over latent dims, in nats."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def ae_loss(ae, x, kl_weight: float):
    """LDM's first-stage loss without the perceptual and GAN terms: L1 + L2 reconstruction summed
    over pixels, plus kl_weight * KL; mean over the batch. Returns (loss, rec, kl)."""
    x_rec, mean, logvar = ae(x)  # z reparameterised: mean + std * eps
    err = (x_rec.float() - x).flatten(1)  # (B, C*H*W)
    rec = (err.abs() + err**2).sum(1).mean()
    kl = gaussian_kl(mean.float(), logvar.float()).mean()
    return rec + kl_weight * kl, rec, kl


def ldm_loss(model, s: dict, z0, c, p_uncond: float, concat=None):
    """L_simple (DDPM Eq. 14) on latents, with the context (and the concat condition) dropped to
    the null context with probability p_uncond (Ho & Salimans Alg. 1), so one network learns
    eps_c and eps_u. Mean squared error over every element and the batch."""
    t = torch.randint(0, len(s["betas"]), (len(z0),), device=z0.device)  # t ~ Uniform({1..T})
    eps = torch.randn_like(z0)
    drop = torch.rand(len(z0), device=z0.device) < p_uncond  # Alg. 1 line 3: c <- null
    return F.mse_loss(model(q_sample(s, z0, t, eps), t, c, drop, concat).float(), eps)


def cfg_eps(unet, x, t, ctx, mask, null_ctx, null_mask, s: float, concat=None):
    """Classifier-free guidance: eps_u + s (eps_c - eps_u). s = 1 is the conditional model alone,
    s = 0 the unconditional alone; otherwise both in one doubled batch. concat: the image
    condition joined to x (zeros for eps_u)."""
    xc = x if concat is None else torch.cat([x, concat.to(x.dtype)], 1)
    xu = x if concat is None else torch.cat([x, torch.zeros_like(concat, dtype=x.dtype)], 1)
    if s == 1:
        return unet(xc, t, ctx, mask)
    if s == 0:
        return unet(xu, t, null_ctx, null_mask)
    pairs = ((xc, xu), (t, t), (ctx, null_ctx), (mask, null_mask))
    eps_c, eps_u = unet(*[torch.cat(p) for p in pairs]).chunk(2)  # one doubled batch
    return eps_u + s * (eps_c - eps_u)


def classifier_eps(sched: dict, eps, x, t, log_p, s: float):
    """Classifier guidance for DDIM (Dhariwal & Nichol Sec. 4.2, Eq. 14): the score of p(y | x_t)
    joins eps as eps - s sqrt(1 - alpha_bar_t) grad_x log p(y | x_t). log_p(x, t) -> (B,)."""
    with torch.enable_grad():  # the samplers run under no_grad; this gradient is the point
        x = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(log_p(x, t).sum(), x)[0]  # (B, C, H, W): per-image scores
    return eps - s * (1 - at(sched["alpha_bar"], t, x)).sqrt() * grad


def ddim_step(s: dict, eps, xt, t: int, t_prev: int, eta: float, clip: bool, noise=None):
    """One DDIM update (Song et al. Eq. 12) from t to t_prev (-1: to x_0), scalars in float64 from
    log alpha_bar in forms where nothing cancels (as ddim_step in ddpm_ddim.py). Latents are not
    clipped (they are not bounded); pixels are clipped to [-1, 1]."""
    la = s["log_alpha_bar"][t].item()  # log alpha_bar_t
    la_prev = s["log_alpha_bar"][t_prev].item() if t_prev >= 0 else 0.0
    one_m, one_m_prev = -math.expm1(la), -math.expm1(la_prev)  # 1 - alpha_bar
    ratio = -math.expm1(la - la_prev)  # 1 - alpha_bar_t / alpha_bar_prev
    x0 = (xt - math.sqrt(one_m) * eps) / math.exp(la / 2)  # the "predicted x_0" of Eq. 12
    if clip:  # clip x0_hat and re-derive eps from it, so eta=1 stays exactly DDPM's step
        x0 = x0.clamp(-1, 1)
        eps = (xt - math.exp(la / 2) * x0) / math.sqrt(one_m)
    sigma = eta * math.sqrt(one_m_prev / one_m * ratio)  # Eq. 16
    # the direction's weight sqrt(1 - alpha_bar_prev - sigma^2), rearranged: no term cancels
    dir2 = one_m_prev / one_m * (math.exp(la - la_prev) * one_m_prev + (1 - eta**2) * ratio)
    x = math.exp(la_prev / 2) * x0 + math.sqrt(max(dir2, 0.0)) * eps  # Eq. 12: x0, direction
    return x + sigma * noise if eta > 0 else x


@torch.no_grad()
def ddim_sample(eps_fn, s: dict, x_T, steps=50, eta=0.0, clip=False, generator=None, after=None):
    """DDIM with `steps` evenly spaced timesteps from T-1 down to 0; eps_fn(x, t) is the
    (guided) noise prediction; after(x, t_prev), if given, edits each new x (paste-back)."""
    T = len(s["betas"])
    ts = torch.linspace(0, T - 1, steps).round().long().tolist() if steps > 1 else [T - 1]
    x = x_T
    for t, t_prev in zip(reversed(ts), reversed([-1] + ts[:-1])):  # T-1 -> ... -> 0 -> x_0
        eps = eps_fn(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        noise = torch.randn(x.shape, device=x.device, generator=generator) if eta > 0 else None
        x = ddim_step(s, eps, x, t, t_prev, eta, clip, noise)
        x = x if after is None else after(x, t_prev)
    return x


# -----------------------------------------------------------------------------
# data: captions for digits (label + stroke thickness) or from a folder's metadata.jsonl
WORDS = "zero one two three four five six seven eight nine".split()
HELD_OUT = ["thick" if d % 2 == 0 else "thin" for d in range(10)]  # numeral + this: test only


def ink(x_u8: torch.Tensor) -> torch.Tensor:
    """Stroke thickness as total ink: mean brightness in [0, 1] per image."""
    return x_u8.float().flatten(1).mean(1) / 255


def ink_tertiles(x_u8, y) -> torch.Tensor:
    """(10, 2): per digit, the ink levels splitting thin / plain / thick into thirds."""
    q = torch.tensor([1 / 3, 2 / 3])
    return torch.stack([torch.quantile(ink(x_u8[y == d]), q) for d in range(10)])


def thickness(x_u8, y, tertiles) -> torch.Tensor:
    """0 thin, 1 plain, 2 thick, by the digit's tertiles (captions and scoring alike)."""
    lo, hi = tertiles[y].unbind(1)
    v = ink(x_u8)
    return (v > lo).long() + (v > hi).long()  # 0, 1 or 2 thresholds passed


def digit_caption(d: int, a: int, r: float) -> str:
    """A caption for digit d of thickness a, phrased by r in [0, 1). The held-out combinations
    (a numeral with HELD_OUT[d]) are never made: those prompts test composition."""
    attr = ("thin", "", "thick")[a]
    name = str(d) if r < 0.5 and attr != HELD_OUT[d] else WORDS[d]
    if not attr:
        return f"the digit {name}" if r % 0.5 < 0.25 else f"a {name}"
    return f"a {attr} {name}" if r % 0.5 < 0.25 else f"the {attr} digit {name}"


def prompt_digit_and_attr(p: str) -> tuple[int, int]:
    """The digit a prompt names (-1 if none) and its thickness word (0 thin, 1 none, 2 thick)."""
    words = re.findall(r"[a-z]+|\d", p.lower())
    digits = [WORDS.index(w) if w in WORDS else int(w) for w in words if w in WORDS or w.isdigit()]
    attr = 0 if "thin" in words else 1
    return (digits[0] if digits else -1), (2 if "thick" in words else attr)


def folder_metadata(path: str, key: str) -> list:
    """One value per image of a folder, in load order, from its metadata.jsonl (Hugging Face
    imagefolder: {"file_name": ..., key: ...} per line): captions ("text"), layouts ("boxes")."""
    root = Path(path)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        common.die(
            f"--cond {key}: no {meta} (a line per image: {{'file_name': ..., '{key}': ...}})"
        )
    try:
        rows = [json.loads(line) for line in open(meta) if line.strip()]
        value = {r["file_name"]: r[key] for r in rows}
    except (ValueError, KeyError, TypeError) as e:
        common.die(f"{meta}: each line must be JSON with file_name and {key} ({e})")
    files = [str(f.relative_to(root)) for f, _ in common.folder_files(path)]  # as loaded
    missing = [f for f in files if f not in value]
    if missing:
        common.die(f"{meta} has no {key} for {len(missing)} images, e.g. {missing[0]}")
    return [value[f] for f in files]


# -----------------------------------------------------------------------------
# data: layouts (digits placed in boxes on a canvas), masks, low-res inputs
def make_canvases(x_u8, y, n: int, size=64, seed=0, side=(20, 40), max_boxes=3):
    """n canvases of 1-max_boxes digits, each resized into a random box (width and height in
    `side`, no two boxes overlapping), the rest black; deterministic for a seed. Returns uint8
    (n, 1, size, size) and boxes (n, max_boxes, 5) as (label, x0, y0, x1, y1) in pixels, x1 and
    y1 exclusive, -1 rows padding. Digits are taken in a seeded order, each before any twice."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    canvas = torch.zeros(n, x_u8.shape[1], size, size, dtype=torch.uint8)
    boxes = torch.full((n, max_boxes, 5), -1, dtype=torch.long)
    order, j = torch.randperm(len(x_u8), generator=g), 0
    for i in range(n):
        k, placed = rand(1, max_boxes), []
        for _ in range(50):  # rejection: boxes that overlap one placed already are redrawn
            w, h = rand(*side), rand(*side)
            x0, y0 = rand(0, size - w), rand(0, size - h)
            if all(x0 >= b[2] or b[0] >= x0 + w or y0 >= b[3] or b[1] >= y0 + h for b in placed):
                placed.append((x0, y0, x0 + w, y0 + h))
            if len(placed) == k:
                break
        for m, (x0, y0, x1, y1) in enumerate(placed):
            d = order[j % len(order)]
            j += 1
            size_d = (y1 - y0, x1 - x0)
            digit = F.interpolate(x_u8[d : d + 1].float(), size_d, mode="bilinear", antialias=True)
            canvas[i, :, y0:y1, x0:x1] = digit[0].round().to(torch.uint8)
            boxes[i, m] = torch.tensor([int(y[d]), x0, y0, x1, y1])
    return canvas, boxes


def layout_tokens(boxes, size: int, grid: int):
    """Boxes in pixels (..., 5) -> the Conditioner's tokens: corners quantised to grid cells
    round(v / size * (grid - 1)); padding rows stay -1."""
    q = (boxes[..., 1:].float() / size * (grid - 1)).round().long().clamp(0, grid - 1)
    tokens = torch.cat([boxes[..., :1], q], -1)
    return torch.where(boxes[..., :1] >= 0, tokens, torch.full_like(tokens, -1))


def check_layouts(boxes, size: int, n_classes: int, where: str):
    """Boxes inside the canvas with x0 < x1, y0 < y1, and labels the model knows, or an error."""
    b = boxes[boxes[..., 0] >= 0]  # (M, 5): the real boxes
    inside = (b[:, 1] >= 0) & (b[:, 2] >= 0) & (b[:, 3] <= size) & (b[:, 4] <= size)
    bad = ~inside | (b[:, 1] >= b[:, 3]) | (b[:, 2] >= b[:, 4])
    if bad.any():
        common.die(f"{where}: box {b[bad][0, 1:].tolist()} is not inside the {size}x{size} canvas")
    if (b[:, 0] >= n_classes).any():
        common.die(f"{where}: label {int(b[:, 0].max())} is out of range 0-{n_classes - 1}")


def pad_layouts(layouts: list, where: str) -> torch.Tensor:
    """Lists of [label, x0, y0, x1, y1] -> (N, K, 5) long, -1 padded."""
    try:
        k = max(1, *(len(b) for b in layouts))
        rows = [[list(map(int, r)) for r in b] + [[-1] * 5] * (k - len(b)) for b in layouts]
        boxes = torch.tensor(rows, dtype=torch.long).view(len(layouts), k, 5)
    except (TypeError, ValueError, RuntimeError) as e:
        common.die(f"{where}: a layout is a list of [label, x0, y0, x1, y1] boxes ({e})")
    if (boxes[..., 0] < -1).any() or ((boxes[..., 0] >= 0) & (boxes[..., 1:] < 0).any(-1)).any():
        common.die(f"{where}: labels and coordinates must be non-negative")
    return boxes


def draw_boxes(x, boxes):
    """Images in [-1, 1] (B, C, H, W) -> RGB with each box's outline in red."""
    x = x.expand(-1, 3, -1, -1).clone()
    red = torch.tensor([1.0, -1.0, -1.0])[:, None]
    for i, b in (boxes[..., 0] >= 0).nonzero().tolist():
        _, x0, y0, x1, y1 = boxes[i, b].tolist()
        x[i, :, y0:y1, x0] = x[i, :, y0:y1, x1 - 1] = red
        x[i, :, y0, x0:x1] = x[i, :, y1 - 1, x0:x1] = red
    return x


def random_masks(n: int, size: int, generator=None, cover=(0.2, 0.6)):
    """(n, 1, size, size) holes, 1 = to fill: half rectangles, half free strokes (a random walk
    of a round brush), each covering a share of the image drawn uniformly from `cover`."""
    lo, hi = cover
    rand = lambda *shape: torch.rand(shape, generator=generator)
    yx = torch.stack(torch.meshgrid(*[torch.arange(size).float()] * 2, indexing="ij"), -1)
    target = lo + 0.02 + (hi - lo - 0.04) * rand(n)  # a margin for rounding to whole pixels
    # rectangles of the target area, aspect ratio in [1/2, 2]
    h = (target * size**2 * 2 ** (2 * rand(n) - 1)).sqrt().round().clamp(1, size)
    w = (target * size**2 / h).round().clamp(1, size)
    lo_yx = torch.stack([rand(n) * (size - h + 1), rand(n) * (size - w + 1)], 1).floor()
    rel = yx - lo_yx[:, None, None]  # (n, S, S, 2): offsets from each rectangle's corner
    rect = ((rel >= 0) & (rel < torch.stack([h, w], 1)[:, None, None])).all(-1)
    # strokes: segment after segment, each of the pixels within `radius` of p -> q, until the
    # target share is covered (a segment that would pass the upper bound is skipped)
    stroke = torch.zeros(n, size, size, dtype=torch.bool)
    p, radius = rand(n, 2) * size, size * (0.06 + 0.04 * rand(n))[:, None, None]
    for _ in range(200):
        todo = stroke.float().mean((1, 2)) < target
        if not todo.any():
            break
        angle, length = 2 * math.pi * rand(n), size * (0.2 + 0.3 * rand(n))
        q = (p + length[:, None] * torch.stack([angle.sin(), angle.cos()], 1)).clamp(0, size - 1)
        d = (q - p)[:, None, None]  # (n, 1, 1, 2)
        rel = yx - p[:, None, None]
        u = ((rel * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-6)).clamp(0, 1)  # closest point
        new = stroke | ((rel - u[..., None] * d).norm(dim=-1) <= radius)
        ok = todo & (new.float().mean((1, 2)) <= hi)
        stroke = torch.where(ok[:, None, None], new, stroke)
        p = q
    return torch.where(rand(n)[:, None, None] < 0.5, rect, stroke).float()[:, None]


def sr_condition(x, factor: int, size):
    """SR's concat input: x area-downsampled by `factor` (the low-res image), resized (bilinear)
    to the latent's `size` when it is not that size already."""
    low = F.avg_pool2d(x, factor)  # area averaging, exact for an integer factor
    return low if low.shape[-2:] == tuple(size) else F.interpolate(low, size, mode="bilinear")


def inpaint_condition(ae, x, hole):
    """Inpainting's concat input: the latent of the masked image (unknown pixels 0, mid-grey as
    LDM's) and the share of known pixels per latent cell; pixels themselves for --pixel."""
    known = 1 - hole
    z = x * known if ae is None else ae.scale_factor * ae.encode(x * known)[0]
    return torch.cat([z, F.adaptive_avg_pool2d(known, z.shape[-2:])], 1)  # (B, C + 1, h, w)


def load_split(cfg: Config, train: bool):
    """(uint8 images, labels), as common.load_images; for layouts the labels are the boxes
    (N, K, 5) in pixels: mnist-layout's canvases, or a folder's metadata.jsonl "boxes"."""
    if cfg.dataset == "mnist-layout":
        x, y = common.load_digits(cfg, train)
        n = len(x) if train else len(x) // 2  # test canvases use each test digit about once
        return make_canvases(x, y, n, seed=cfg.seed * 2 + (0 if train else 1))
    x, y = common.load_images(cfg, train)
    if cfg.cond == "layout" and cfg.dataset.startswith("folder:"):
        where = f"{cfg.dataset[7:]}/metadata.jsonl"
        y = pad_layouts(folder_metadata(cfg.dataset[7:], "boxes"), where)
        check_layouts(y, x.shape[-1], 10**9, where)
    return x, y


# -----------------------------------------------------------------------------
# training: one function per stage, each with its own checkpoint
def levels(cfg: Config) -> tuple:
    try:
        return tuple(int(v) for v in cfg.ch_mult.split(","))
    except ValueError:
        common.die(f"--ch-mult {cfg.ch_mult!r}: comma-separated integers, e.g. 1,2,2")


def ae_args(cfg: Config, in_ch: int, size: int) -> dict:
    if cfg.f < 1 or cfg.f & (cfg.f - 1) or size % cfg.f:
        common.die(f"--f {cfg.f} must be a power of 2 dividing the image size {size}")
    return {"ae": dict(in_ch=in_ch, ch=16 if cfg.tiny else cfg.ae_ch, z_ch=cfg.z_ch, f=cfg.f)}


def ldm_args(cfg: Config, ch: int, n_classes: int, concat_ch: int = 0) -> dict:
    """The LDM's constructor arguments: a U-Net on `ch` channels (+ `concat_ch` of an image
    condition at its input), and the context encoder."""
    width, blocks, dim = (32, 1, 64) if cfg.tiny else (cfg.ch, cfg.num_res_blocks, cfg.ctx_dim)
    mult = levels(cfg)  # (1, 2, 2): 7x7 -> 4x4 -> 2x2 on f-4 latents of digits
    first = 0 if cfg.cond == "layout" else 1  # where boxes are placed, attention at every level
    attn = tuple(range(first, len(mult)))  # else at the lower levels (4x4, 2x2 there)
    unet = dict(in_ch=ch + concat_ch, out_ch=ch, ch=width, ch_mult=mult, num_res_blocks=blocks)
    unet |= dict(attn_levels=attn, heads=cfg.heads, ctx_dim=dim, dropout=cfg.dropout)
    cond = dict(kind=cfg.cond, dim=dim, n_classes=n_classes, layers=cfg.text_layers)
    cond |= dict(heads=cfg.heads, max_len=cfg.max_len, grid=cfg.grid)
    return {"ldm": dict(unet=unet, cond=cond)}


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.sample_steps > cfg.T:
        common.die(f"--sample-steps {cfg.sample_steps}: must be between 1 and T={cfg.T}")
    if cfg.p_uncond > 1:
        common.die(f"--p-uncond {cfg.p_uncond}: must be between 0 and 1")
    levels(cfg)
    if cfg.stage == "ae" or cfg.sample:
        return
    layouts = cfg.dataset == "mnist-layout" or cfg.dataset.startswith("folder:")
    if cfg.cond == "layout" and not (layouts and cfg.stage == "ldm"):
        common.die("--cond layout: --stage ldm on --dataset mnist-layout or folder:PATH (boxes)")
    if cfg.dataset == "mnist-layout" and cfg.cond != "layout":
        common.die(f"--dataset mnist-layout is for --cond layout, not --cond {cfg.cond}")


def begin(cfg: Config):
    """What every stage starts with: device, the training split, resumable batches of indices
    (the stage looks up images, latents, labels and captions by index)."""
    device, autocast = common.setup(cfg)
    x, y = load_split(cfg, train=True)
    data = common.Batches(x, torch.arange(len(x)), cfg.batch_size, cfg.seed, device)
    return device, autocast, x, y.to(device), data


def restore(cfg: Config, data, name: str, modules: dict) -> int:
    """--resume: the stage's checkpoint into `modules` ({key: module or optimizer}), the data
    position and RNG (after the networks are built, so init draws nothing); the step to go on."""
    if not cfg.resume:
        return 0
    ck = common.resume(cfg, data, need=tuple(modules), name=name)
    for k, m in modules.items():
        common.load_state(m, ck[k], k)
    return ck["step"]


def load_ae(cfg: Config, device, ck=None):
    """(autoencoder, its model_args) of <out>/ae.pt, or of the copy in ckpt.pt (`ck`)."""
    if not ck:
        path = Path(cfg.out) / "ae.pt"
        if not path.is_file():
            common.die(f"--stage {cfg.stage} needs the autoencoder: run --stage ae first ({path})")
        ae_ck = common.load_ckpt(path, need=("model", "model_args", "image_shape"))
        ck = dict(ae_ck, ae=ae_ck["model"])
    args = ck["model_args"]["ae"]
    ae = AutoencoderKL(**args).to(device).eval().requires_grad_(False)
    common.load_state(ae, ck["ae"], "autoencoder")
    return ae, dict(args, image_shape=ck["image_shape"])


def first_stage(cfg: Config, device, x_u8, ck=None):
    """(autoencoder or None for --pixel, its model_args, the diffusion model's input shape)."""
    if cfg.pixel:
        return None, None, list(x_u8.shape[1:])
    ae, args = load_ae(cfg, device, ck)
    if list(x_u8.shape[1:]) != args["image_shape"]:
        shape = "x".join(map(str, args["image_shape"]))
        common.die(f"the autoencoder in {cfg.out} was trained on {shape} images, not these")
    f = args["f"]
    return ae, args, [args["z_ch"], x_u8.shape[2] // f, x_u8.shape[3] // f]


@torch.no_grad()
def latent_scale(ae, x_u8, device, n=2000) -> float:
    """LDM's scale_factor: 1 / std of latents z ~ q(z | x) of (up to n) training images."""
    ae.scale_factor.fill_(1.0)
    x, g = x_u8[:n], torch.Generator(device).manual_seed(0)  # its own noise: resumes stay exact
    z = [ae.to_latent(to_float(x[i : i + 500], device), g) for i in range(0, len(x), 500)]
    return 1.0 / torch.cat(z).float().std().item()


def to_float(x_u8, device):
    return x_u8.to(device).float() / 127.5 - 1  # [0, 255] -> [-1, 1]


@torch.no_grad()
def save_reconstructions(ae, x, path):
    """Test images (odd rows) over their reconstructions (even rows)."""
    k = min(8, len(x))
    x = x[: len(x) // k * k]
    rec = ae.decode(ae.encode(x)[0]).clamp(-1, 1)
    rows = torch.stack([x.view(-1, k, *x.shape[1:]), rec.view(-1, k, *x.shape[1:])], 1)
    common.save_grid(rows.flatten(0, 2), path, nrow=k)  # (rows, 2, k, C, H, W) -> images


@torch.no_grad()
def psnr(ae, x_u8, device) -> float:
    """Mean PSNR in dB of decode(mean of q(z | x)) on images in [0, 1]."""
    vals = []
    for i in range(0, len(x_u8), 500):
        x = to_float(x_u8[i : i + 500], device)
        mse = ((ae.decode(ae.encode(x)[0]).clamp(-1, 1) - x) / 2).square().flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse.clamp(min=1e-10)))
    return torch.cat(vals).mean().item()


def train_ae(cfg: Config):
    """Stage ae: the autoencoder by ae_loss; each checkpoint measures the scale factor."""
    device, autocast, x, y, data = begin(cfg)
    args = ae_args(cfg, x.shape[1], x.shape[-1])
    ae = AutoencoderKL(**args["ae"]).to(device)
    opt = torch.optim.AdamW(ae.parameters(), cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    start = restore(cfg, data, "ae.pt", dict(model=ae, opt=opt))
    net = common.wrap(ae, cfg, device)
    x_test = to_float(load_split(cfg, train=False)[0][:32], device)
    loop = common.Loop(cfg, data, start, name="ae.pt")
    if common.rank() == 0:
        n = sum(p.numel() for p in ae.parameters()) / 1e6
        shape = (cfg.z_ch, x.shape[2] // cfg.f, x.shape[3] // cfg.f)
        print(f"cfg_ldm: stage ae, {n:.2f}M params, images {tuple(x.shape)} -> latents {shape}")
    done = start
    for step in range(start, cfg.steps):
        done = step + 1

        # forward and backward
        xb = next(data)[0]  # the batch's images, in [-1, 1]
        with autocast:
            loss, rec, kl = ae_loss(net, xb, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()

        # log
        loop.add(loss=loss, rec=rec, kl=kl)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint, with the scale factor of the weights it holds
        if loop.flag or common.due(done, cfg.ckpt_every, cfg.steps):
            ae.scale_factor.fill_(latent_scale(ae, x, device))
        state = dict(model=ae, opt=opt, model_args=args, image_shape=list(x.shape[1:]))
        if loop.end_step(done, **state, scale_factor=ae.scale_factor.item()):
            break

        # sample a fixed-noise grid: reconstructions of fixed test images
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"recon_{done:06d}.png"
                loop.aside(save_reconstructions, ae, x_test, path)
    if common.rank() == 0 and done == cfg.steps:
        x_t = load_split(cfg, train=False)[0]
        scale = ae.scale_factor.item()
        print(f"test PSNR {psnr(ae, x_t, device):.2f} dB, scale_factor {scale:.4f}")
    return ae


def conditions(cfg: Config, x_u8, y):
    """What the context is made from: labels, or for text a caption maker; and the stage state
    the checkpoint keeps for sampling (tertiles, held-out test prompts, test layouts, ...)."""
    if cfg.cond == "layout":  # up to 2,500 test layouts, so --sample needs no data
        return None, {"test_layouts": load_split(cfg, train=False)[1][:2500].tolist()}
    if cfg.cond == "sr" and x_u8.shape[-1] % cfg.sr_factor:
        common.die(f"--sr-factor {cfg.sr_factor} does not divide the image size {x_u8.shape[-1]}")
    if cfg.cond == "inpaint":  # the mean-image baseline of --sample
        return None, {"mean_image": to_float(x_u8, "cpu").mean(0)}
    if cfg.cond != "text":
        return None, {}
    if cfg.dataset.startswith("folder:"):
        caps = [str(v) for v in folder_metadata(cfg.dataset[len("folder:") :], "text")]
        return (lambda idx, r: [caps[i] for i in idx.tolist()]), {"test_prompts": caps[:100]}
    if cfg.dataset not in ("mnist", "mnist-12k"):
        common.die(f"--cond text: no built-in captions for {cfg.dataset}; use folder:PATH")
    tert = ink_tertiles(x_u8, y.cpu())
    a = thickness(x_u8, y.cpu(), tert)
    make = lambda idx, r: [digit_caption(int(y[i]), int(a[i]), v) for i, v in zip(idx.tolist(), r)]
    prompts = [f"a {HELD_OUT[d]} {d}" for d in range(10)]
    return make, {"test_prompts": prompts, "tertiles": tert.tolist()}


def context_input(cfg_cond, captions, idx, y, device, max_len):
    """The conditioner's input for a batch of indices: labels, box tokens or caption token ids."""
    if cfg_cond != "text":
        return y[idx]
    r = torch.rand(len(idx)).tolist()  # the phrasing of each caption, from the training RNG
    return tokenize(captions(idx, r), max_len).to(device)


@torch.no_grad()
def concat_input(task: str, ae, x, factor: int, size, holes=None):
    """The image condition of a batch x in [-1, 1]: its low-res version (sr), or its masked
    latent and mask (inpaint, masks from the training RNG unless given); None for other tasks."""
    if task == "sr":
        return sr_condition(x, factor, size)
    if task == "inpaint":
        holes = random_masks(len(x), x.shape[-1]) if holes is None else holes
        return inpaint_condition(ae, x, holes.to(x.device))
    return None


def train_ldm(cfg: Config):
    """Stage ldm: the U-Net and context encoder by ldm_loss on scaled latents (or pixels)."""
    device, autocast, x, y, data = begin(cfg)
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt") if cfg.resume else {}  # its own AE copy
    ae, ae_a, shape = first_stage(cfg, device, x, ck if "ae" in ck else None)
    task, img = cfg.cond, x.shape[1:]
    labels = y[..., 0] if task == "layout" else y
    n_classes = max(int(labels.max()) + 1, 10 if cfg.dataset.startswith("mnist") else 1)
    captions, extra = conditions(cfg, x, y)
    if task == "layout":
        y = layout_tokens(y, x.shape[-1], cfg.grid)  # (N, K, 5): the context of each canvas
    args = ldm_args(cfg, shape[0], n_classes, {"sr": img[0], "inpaint": shape[0] + 1}.get(task, 0))
    if ae is not None:
        args["ae"] = {k: v for k, v in ae_a.items() if k != "image_shape"}
    model = LDM(**args["ldm"]).to(device)
    ema = common.EMA(model, cfg.ema_decay)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=0.0, fused=fused)
    start = restore(cfg, data, "ckpt.pt", dict(model=model, ema=ema.module, opt=opt))
    net = common.wrap(model, cfg, device)
    sched = make_schedule(cfg.T, cfg.schedule, device=device)
    stats = encode_all(ae, x, device) if ae is not None else None
    g = torch.Generator().manual_seed(cfg.seed)  # the fixed noise and prompts of every grid
    grid_c = torch.arange(40) % n_classes
    grid_cc = None  # sr, inpaint: the image conditions of 40 fixed test images
    if task in ("sr", "inpaint"):
        x_test = load_split(cfg, train=False)[0]
        x_grid = to_float(x_test[torch.arange(40) % len(x_test)], device)
        holes = random_masks(40, x.shape[-1], g)
        grid_cc = concat_input(task, ae, x_grid, cfg.sr_factor, shape[1:], holes)
    if task == "layout":
        layouts = torch.tensor(extra["test_layouts"])
        grid_c = layout_tokens(layouts[torch.arange(40) % len(layouts)], x.shape[-1], cfg.grid)
    if cfg.cond == "text":
        prompts = extra["test_prompts"]
        grid_c = tokenize([prompts[i % len(prompts)] for i in range(40)], cfg.max_len)
    x_T = torch.randn(40, *shape, generator=g).to(device)
    if ae is not None:
        extra |= dict(ae=ae, scale_factor=ae.scale_factor.item(), image_shape=ae_a["image_shape"])
    warmup = max(1, min(cfg.warmup, cfg.steps // 20))
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        space = "pixels" if cfg.pixel else "latents"
        print(f"cfg_ldm: stage ldm, {n:.2f}M params, cond {cfg.cond}, {space} {tuple(shape)}")
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * min(1.0, done / warmup)
        for group in opt.param_groups:
            group["lr"] = lr

        # forward and backward: z_0 ~ q(z | x) scaled (or x_0), its context, L_simple
        xb, idx = next(data)
        x0 = xb if ae is None else draw_latents(ae, stats, idx)
        c = context_input(cfg.cond, captions, idx, y, device, cfg.max_len)  # labels or token ids
        concat = concat_input(task, ae, xb, cfg.sr_factor, shape[1:])  # sr, inpaint: an image
        with autocast:
            loss = ldm_loss(net, sched, x0, c, cfg.p_uncond, concat)
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)

        # log
        loop.add(loss=loss)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=lr)

        # checkpoint (the autoencoder goes along: ckpt.pt alone samples)
        state = dict(model=model, ema=ema.module, opt=opt, model_args=args, shape=shape)
        if loop.end_step(done, **state, **extra):
            break

        # sample a fixed-noise grid (CFG s = 3, fixed labels or prompts, --sample-steps DDIM)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                s = 1.0 if cfg.cond in ("none", "sr", "inpaint") else 3.0
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                c = grid_c.to(device)
                grid = (ema.module, ae, sched, x_T, c, s, autocast, cfg.sample_steps, path)
                loop.aside(save_sample_grid, *grid, concat=grid_cc)
    return model, ema.module


def encode_all(ae, x_u8, device):
    """q(z | x) of every training image, once: (mean, std) on the device."""
    with torch.no_grad():
        stats = [ae.encode(to_float(x_u8[i : i + 500], device)) for i in range(0, len(x_u8), 500)]
    return torch.cat([m for m, _ in stats]), torch.cat([(0.5 * lv).exp() for _, lv in stats])


def draw_latents(ae, stats, idx):
    """x_0 of the diffusion model: z ~ q(z | x) of the indexed images, times the scale factor."""
    mean, std = stats[0][idx], stats[1][idx]
    return ae.scale_factor * (mean + std * torch.randn_like(mean))


def train_classifier(cfg: Config):
    """Stage classifier: p(y | x_t, t) by cross-entropy on noised latents (or pixels) at t ~ U."""
    device, autocast, x, y, data = begin(cfg)
    ae, _, shape = first_stage(cfg, device, x)
    width, n_classes = (32 if cfg.tiny else 64), int(y.max()) + 1
    args = {"classifier": dict(in_ch=shape[0], ch=width, ch_mult=levels(cfg), n_classes=n_classes)}
    clf = NoisyClassifier(**args["classifier"]).to(device)
    opt = torch.optim.AdamW(clf.parameters(), cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    start = restore(cfg, data, "classifier.pt", dict(model=clf, opt=opt))
    net = common.wrap(clf, cfg, device)
    sched = make_schedule(cfg.T, cfg.schedule, device=device)
    stats = encode_all(ae, x, device) if ae is not None else None
    loop = common.Loop(cfg, data, start, name="classifier.pt")
    if common.rank() == 0:
        n = sum(p.numel() for p in clf.parameters()) / 1e6
        print(f"cfg_ldm: stage classifier, {n:.2f}M params, inputs {tuple(shape)}")
    for step in range(start, cfg.steps):
        done = step + 1

        # forward and backward: x_t ~ q(x_t | x_0) at a random t, then cross-entropy
        xb, idx = next(data)
        x0 = xb if ae is None else draw_latents(ae, stats, idx)  # the LDM's own inputs
        t = torch.randint(0, cfg.T, (len(x0),), device=device)  # every noise level alike
        with autocast:
            logits = net(q_sample(sched, x0, t, torch.randn_like(x0)), t).float()
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        torch.nn.utils.clip_grad_norm_(clf.parameters(), cfg.grad_clip)
        opt.step()

        # log
        loop.add(loss=loss, acc=(logits.argmax(1) == y[idx]).float().mean())
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint (with the space it classifies, checked against ckpt.pt at sampling)
        space = dict(pixel=cfg.pixel, scale_factor=1.0 if ae is None else ae.scale_factor.item())
        if loop.end_step(done, model=clf, opt=opt, model_args=args, **space):
            break
    return clf


# -----------------------------------------------------------------------------
# sampling: guided DDIM, then the decoder
def guided_eps(model, ctx, mask, null_ctx, null_mask, s, autocast, sched=None, log_p=None, cc=None):
    """eps(x, t) for the sampler: CFG at scale s (cc: the concat condition); or, given
    log_p(x, t) = log p(y | x_t), the unconditional prediction with classifier guidance."""

    def f(x, t):
        with autocast:
            if log_p is None:
                return cfg_eps(model.unet, x, t, ctx, mask, null_ctx, null_mask, s, cc).float()
            eps = model.unet(x, t, null_ctx, null_mask).float()
        return classifier_eps(sched, eps, x, t, log_p, s)

    return f


@torch.no_grad()
def generate(model, ae, sched, x_T, c, s, autocast, steps=50, eta=0.0, clf=None, y=None, g=None,
             concat=None, after=None):  # fmt: skip
    """Images in [-1, 1] from noise x_T and conditions c (labels, box or token ids) and concat
    (an image condition); after(z, t_prev) edits each DDIM step's output (paste-back)."""
    ctx, mask = model.cond(c)  # computed once per batch, not per step
    null_ctx, null_mask = model.cond(c, torch.ones(len(c), dtype=torch.bool, device=c.device))
    log_p = None
    if clf is not None:  # log p(y | x_t) of the noisy classifier, per image
        log_p = lambda x, t: clf(x, t).float().log_softmax(1).gather(1, y[:, None])[:, 0]
    eps = guided_eps(model, ctx, mask, null_ctx, null_mask, s, autocast, sched, log_p, concat)
    z = ddim_sample(eps, sched, x_T, steps, eta, clip=ae is None, generator=g, after=after)
    return z if ae is None else ae.from_latent(z).clamp(-1, 1)  # z / scale_factor, decoded


def save_sample_grid(model, ae, sched, x_T, c, s, autocast, steps, path, concat=None):
    """The EMA model's DDIM samples at guidance s from fixed noise and conditions."""
    x = generate(model, ae, sched, x_T, c, s, autocast, steps, concat=concat)
    common.save_grid(x, path, nrow=10)


def load_trained(cfg: Config):
    """(EMA LDM, autoencoder or None, schedule, checkpoint, device, autocast) of <out>/ckpt.pt,
    rebuilt from its model_args: no training flag has to be repeated."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("ema", "model_args", "shape"))
    if "ldm" not in ck["model_args"]:
        common.die(f"{cfg.out}/ckpt.pt is not a cfg_ldm.py checkpoint (no LDM in its model_args)")
    if cfg.sample_steps > ck["config"]["T"]:  # the trained model's T, which may differ from --T
        common.die(f"--sample-steps {cfg.sample_steps}: this model has T={ck['config']['T']}")
    device, autocast = common.setup(cfg)
    model = LDM(**ck["model_args"]["ldm"]).to(device).eval()
    common.load_state(model, ck["ema"])
    ae = load_ae(cfg, device, ck)[0] if "ae" in ck else None
    sched = make_schedule(ck["config"]["T"], ck["config"]["schedule"], device=device)
    return model, ae, sched, ck, device, autocast


def load_classifier(cfg: Config, ck: dict, device):
    """The noisy classifier of <out>/classifier.pt, checked to share ckpt.pt's input space."""
    path = Path(cfg.out) / "classifier.pt"
    if not path.is_file():
        common.die(f"--guide classifier needs {path}: run --stage classifier first")
    cc = common.load_ckpt(path, need=("model", "model_args", "scale_factor"))
    same = cc["pixel"] == ("ae" not in ck)
    if not same or abs(cc["scale_factor"] - ck.get("scale_factor", 1.0)) > 1e-6:
        common.die(f"{path} was trained on other inputs than ckpt.pt (pixels vs another AE)")
    clf = NoisyClassifier(**cc["model_args"]["classifier"]).to(device).eval()
    common.load_state(clf, cc["model"], "classifier")
    return clf.requires_grad_(False)


def sampling_conditions(cfg: Config, ck: dict, kind: str, n_classes: int):
    """(c, labels, thickness words, cycle length) of the N samples: cycled labels or prompts;
    for layouts (box tokens, boxes in pixels, None, 0)."""
    idx = torch.arange(cfg.sample)
    if kind == "layout":
        size = (ck.get("image_shape") or ck["shape"])[-1]
        boxes = torch.tensor(ck["test_layouts"])
        if cfg.layout:
            boxes = pad_layouts(read_json(cfg.layout), cfg.layout)
            check_layouts(boxes, size, n_classes, cfg.layout)
        boxes = boxes[idx % len(boxes)]
        return layout_tokens(boxes, size, ck["model_args"]["ldm"]["cond"]["grid"]), boxes, None, 0
    if kind == "text":
        prompts = ck.get("test_prompts", [])
        if cfg.prompt:
            path = Path(cfg.prompt)
            text = path.read_text() if path.is_file() else cfg.prompt.replace("|", "\n")
            prompts = [p.strip() for p in text.splitlines() if p.strip()]
        if not prompts:
            common.die("--prompt: give at least one prompt")
        cycle = len(prompts)
        prompts = [prompts[i % cycle] for i in idx.tolist()]
        named = [prompt_digit_and_attr(p) for p in prompts]
        labels = torch.tensor([d for d, _ in named])
        ids = tokenize(prompts, ck["model_args"]["ldm"]["cond"]["max_len"])
        return ids, labels, [a for _, a in named], cycle
    if cfg.prompt:
        common.die(f"--prompt needs a text model; this one has --cond {kind}")
    try:
        wanted = [int(v) for v in cfg.labels.split(",")] if cfg.labels else list(range(n_classes))
    except ValueError:
        common.die(f"--labels {cfg.labels!r}: comma-separated integers")
    if not all(0 <= v < n_classes for v in wanted):
        common.die(f"--labels {cfg.labels}: this model has classes 0-{n_classes - 1}")
    labels = torch.tensor(wanted)[idx % len(wanted)]
    y = labels if kind == "class" or cfg.guide == "classifier" else None
    return labels, y, None, len(wanted) if kind == "class" else 0


def sample(cfg: Config):
    """--sample N: N images per guidance scale into samples.npz (arr_1: the labels asked for, or
    the digit each prompt names) and samples.png; --sweep adds guidance.png."""
    model, ae, sched, ck, device, autocast = load_trained(cfg)
    kind, n_classes = model.cond.kind, ck["model_args"]["ldm"]["cond"]["n_classes"]
    if kind in ("sr", "inpaint"):
        return sample_restoration(cfg, model, ae, sched, ck, device, autocast)
    if cfg.input or cfg.mask:
        common.die(f"--input and --mask need an sr or inpaint model; this one has --cond {kind}")
    if cfg.layout and kind != "layout":
        common.die(f"--layout needs a layout model; this one has --cond {kind}")
    if cfg.guide == "classifier" and kind == "layout":
        common.die("--guide classifier needs one label per image, not a layout")
    c, y, attrs, cycle = sampling_conditions(cfg, ck, kind, n_classes)
    clf = load_classifier(cfg, ck, device) if cfg.guide == "classifier" else None
    if clf is not None and (y is None or (y < 0).any()):
        common.die("--guide classifier needs a digit in every prompt")
    try:
        scales = [float(v) for v in cfg.sweep.split(",")] if cfg.sweep else [cfg.guidance]
    except ValueError:
        common.die(f"--sweep {cfg.sweep!r}: comma-separated scales, e.g. 0,1,2,3,5,7")
    if min(scales) < 0:
        common.die(f"--sweep {cfg.sweep}: scales must be at least 0")
    blocks = []
    for s in scales:
        g = torch.Generator(device).manual_seed(cfg.seed)  # the same noise at every scale
        xs = []  # batches of images in [-1, 1], on the CPU
        for i in range(0, cfg.sample, cfg.batch_size):
            ci = c[i : i + cfg.batch_size].to(device)
            yi = None if y is None else y[i : i + cfg.batch_size].to(device)
            x_T = torch.randn(len(ci), *ck["shape"], device=device, generator=g)
            steps = (cfg.sample_steps, cfg.eta)
            x = generate(model, ae, sched, x_T, ci, s, autocast, *steps, clf, yi, g)
            xs.append(x.cpu())
            print(f"scale {s:g}: sampled {i + len(ci)}/{cfg.sample}", flush=True)
        x = torch.cat(xs)
        out = Path(cfg.out) / "sweep" / f"{cfg.guide}_s{s:g}" if cfg.sweep else Path(cfg.out)
        common.save_samples(out, x, (y[..., 0], y) if kind == "layout" else y)
        if kind == "layout":  # arr_1 the labels, arr_2 the boxes; the picture shows the boxes
            common.save_grid(draw_boxes(x[:64], y[:64]), out / "samples.png", nrow=8)
        m = min(len(x) // max(cycle, 1), 10)
        if cycle and m:  # the picture: one row per class (or prompt), m samples each
            rows = x[: m * cycle].view(m, cycle, *x.shape[1:]).transpose(0, 1).flatten(0, 1)
            common.save_grid(rows, out / "samples.png", nrow=m)
        row = {"scale": s, "guide": cfg.guide, "n": cfg.sample, "step": ck["step"]}
        if attrs is not None and "tertiles" in ck:  # thin/thick by the captions' own measure
            u8 = ((x + 1) * 127.5).round()
            got = thickness(u8, y.clamp(min=0), torch.tensor(ck["tertiles"]))
            asked = torch.tensor(attrs)
            scored = (asked != 1) & (y >= 0)  # prompts that name a digit and a thickness
            if scored.any():
                row["attr_acc"] = round((got == asked)[scored].float().mean().item(), 4)
        print(json.dumps(row))
        blocks += [x[:40], torch.zeros(10, *x.shape[1:])]  # 4 rows of 10, then a blank row
        print(f"wrote {cfg.sample} samples ({cfg.guide}, s={s:g}) to {out}/samples.npz, .png")
    if cfg.sweep:
        path = Path(cfg.out) / f"guidance_{cfg.guide}.png"
        common.save_grid(torch.cat(blocks[:-1]), path, nrow=10)
        print(f"wrote {path}: a block per scale ({cfg.sweep}), same noise")


def read_json(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        common.die(f"cannot read {path} as JSON ({type(e).__name__}: {str(e)[:100]})")


def read_image(path: str, channels: int, size, flag: str):
    """A user's image as (1, C, H, W) in [-1, 1]; a wrong size or channel count is an error.
    channels 0: any image, read as grey (a mask)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    try:
        im = Image.open(path)
        im.load()
    except OSError as e:
        common.die(f"--{flag} {path}: cannot read the image ({e})")
    bands = len([b for b in im.getbands() if b != "A"])  # P (a palette) counts as one
    if channels and bands != channels:
        common.die(f"--{flag} {path}: {bands} channel(s), the model needs {channels}")
    if (im.height, im.width) != tuple(size):
        got, want = f"{im.height}x{im.width}", "x".join(map(str, size))
        common.die(f"--{flag} {path}: the image is {got}, it must be {want}")
    im = im.convert("L" if channels in (0, 1) else "RGB")
    return pil_to_tensor(im)[None].float() / 127.5 - 1


def psnr_db(a, b, where=None) -> torch.Tensor:
    """PSNR in dB per image of images in [-1, 1] (as [0, 1]), over the pixels `where` is 1."""
    where = torch.ones_like(a) if where is None else where.expand_as(a)
    mse = (((a - b) / 2).square() * where).flatten(1).sum(1) / where.flatten(1).sum(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def paste_known(x, hole, fill):
    """The known pixels of x exactly, `fill` in the holes (hole 1 = to fill)."""
    return torch.where(hole > 0, fill, x)


@torch.no_grad()
def restoration(model, ae, sched, ck, concat, s, autocast, cfg, g, after=None):
    """DDIM samples of the sr / inpaint model for a batch of image conditions; the context is
    the null token alone, so guidance s (1: none) weighs the image condition only."""
    x_T = torch.randn(len(concat), *ck["shape"], device=concat.device, generator=g)
    c = torch.zeros(len(concat), dtype=torch.long, device=concat.device)
    steps = (cfg.sample_steps, cfg.eta)
    return generate(model, ae, sched, x_T, c, s, autocast, *steps, g=g, concat=concat, after=after)


def repaint_paste(sched, z_known, known, g):
    """The unconditional baseline's paste-back after each DDIM step: latent cells whose pixels are
    all known take z_known noised to the step's level, q(z_t | z_known) (RePaint without its
    resampling; z_known encodes the masked image, so no unknown pixel leaks in)."""
    cells = (F.adaptive_avg_pool2d(known, z_known.shape[-2:]) == 1).to(z_known.dtype)

    def after(z, t_prev):
        if t_prev < 0:
            return cells * z_known + (1 - cells) * z
        t = torch.full((len(z),), t_prev, device=z.device)
        noise = torch.randn(z.shape, device=z.device, generator=g)
        return cells * q_sample(sched, z_known, t, noise) + (1 - cells) * z

    return after


def sr_batch(run, ae, x, factor: int, latent_size):
    """SR of test images x: {method: output} (bicubic and the AE's reconstruction, the ceiling,
    beside ours) and the picture's columns low-res | bicubic | ours | target."""
    low = F.avg_pool2d(x, factor)
    res = dict(bicubic=F.interpolate(low, scale_factor=factor, mode="bicubic").clamp(-1, 1))
    res["ae_reconstruction"] = x if ae is None else ae.decode(ae.encode(x)[0]).clamp(-1, 1)
    res["ours"] = run(sr_condition(x, factor, latent_size))
    nearest = F.interpolate(low, scale_factor=factor, mode="nearest")
    return res, [nearest, res["bicubic"], res["ours"], x]


def inpaint_batch(run, sched, ae, x, hole, mean_image, g):
    """Inpainting of test images x: {method: output} (the mean image in the holes; the
    unconditional model with paste-back; ours), every output with the known pixels pasted
    back, and the picture's columns masked | mean fill | uncond + paste | ours | target."""
    cc = inpaint_condition(ae, x, hole)
    after = repaint_paste(sched, cc[:, :-1], 1 - hole, g)  # cc[:, :-1]: the masked image's latent
    res = dict(mean_fill=paste_known(x, hole, mean_image.to(x.device)))
    res["uncond_paste"] = paste_known(x, hole, run(cc, s=0.0, after=after))  # s = 0: eps_u
    res["ours"] = paste_known(x, hole, run(cc))
    return res, [paste_known(x, hole, torch.zeros_like(x)), *res.values(), x]


def sample_restoration(cfg: Config, model, ae, sched, ck, device, autocast):
    """sr / inpaint --sample N: the first N test images (cycled), restored, beside the baselines,
    each into samples.npz (arr_1: the source digits' labels; baselines in <out>/baselines/*), PSNR
    printed (inpaint: inside the holes), and samples.png rows of input | baselines | ours |
    target. --input (and --mask): one user image instead, into <out>/<name>_<task>.png."""
    task, factor = model.cond.kind, ck["config"]["sr_factor"]
    s = cfg.guidance if "guidance" in cfg.given else 1.0  # LDM's restorations use no guidance
    C, H, W = ck.get("image_shape") or ck["shape"]
    g = torch.Generator(device).manual_seed(cfg.seed)

    def run(cc, s=s, after=None):
        return restoration(model, ae, sched, ck, cc, s, autocast, cfg, g, after)

    if task == "inpaint" and bool(cfg.input) != bool(cfg.mask):
        common.die("--input and --mask go together for an inpainting model")
    if cfg.input:  # sr: the input is the low-res image itself (a factor of 1 passes it on)
        x = read_image(
            cfg.input, C, (H // factor, W // factor) if task == "sr" else (H, W), "input"
        )
        if task == "sr":
            out = run(sr_condition(x.to(device), 1, ck["shape"][1:]))
        else:
            hole = (read_image(cfg.mask, 0, (H, W), "mask") > 0).float().to(device)  # white: fill
            x = x.to(device)
            out = paste_known(x, hole, run(inpaint_condition(ae, x, hole)))
        path = Path(cfg.out) / f"{Path(cfg.input).stem}_{task}.png"
        common.save_grid(out, path, nrow=1)
        return print(f"wrote {path}")
    x_u8, y = load_split(common.from_run(cfg, ck), train=False)
    idx = torch.arange(cfg.sample) % len(x_u8)
    holes = random_masks(cfg.sample, W, torch.Generator().manual_seed(cfg.seed))  # test masks
    outs, rows = {}, []
    for i in range(0, cfg.sample, cfg.batch_size):
        x = to_float(x_u8[idx[i : i + cfg.batch_size]], device)
        hole = holes[i : i + len(x)].to(device)
        if task == "sr":
            res, shown = sr_batch(run, ae, x, factor, ck["shape"][1:])
        else:
            res, shown = inpaint_batch(run, sched, ae, x, hole, ck["mean_image"], g)
        where = hole if task == "inpaint" else None
        for k, v in res.items():
            outs.setdefault(k, []).append((v.cpu(), psnr_db(v, x, where).cpu()))
        rows.append(torch.stack(shown, 1)[:8].cpu())  # (b, columns, C, H, W)
        print(f"{task}: restored {i + len(x)}/{cfg.sample}", flush=True)
    for k, v in outs.items():
        out = Path(cfg.out) if k == "ours" else Path(cfg.out) / "baselines" / k
        common.save_samples(out, torch.cat([a for a, _ in v]), y[idx])
        psnr = round(torch.cat([b for _, b in v]).mean().item(), 3)
        row = {"task": task, "method": k, "n": cfg.sample, "step": ck["step"], "guidance": s}
        print(json.dumps(row | {"psnr_in_holes" if task == "inpaint" else "psnr": psnr}))
    rows = torch.cat(rows)[:8]
    common.save_grid(rows.flatten(0, 1), Path(cfg.out) / "samples.png", nrow=rows.shape[1])
    print(f"wrote {cfg.out}/samples.npz (ours), baselines/*/samples.npz, samples.png (a row each)")


def train(cfg: Config):
    """Train --stage ae, ldm or classifier."""
    return {"ae": train_ae, "ldm": train_ldm, "classifier": train_classifier}[cfg.stage](cfg)


if __name__ == "__main__":
    cfg = common.parse(Config, "cfg_ldm")
    check_flags(cfg)
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
