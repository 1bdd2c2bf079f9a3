"""
Guided and latent diffusion: classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233),
classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), latent diffusion with
cross-attention (Rombach et al. 2022, arXiv:2112.10752).

A KL-regularised autoencoder maps images to a small latent (28x28 digits -> 4x7x7); a U-Net
learns eps_theta(z_t, t, context) on the scaled latents with L_simple, cross-attending to the
context tokens of a class label, a caption or a layout of boxes (SpatialTransformer:
self-attention, cross-attention, feed-forward); super-resolution and inpainting join their image
condition to z_t as input channels. Guidance steers sampling toward the condition:
  CFG         eps = eps_u + s (eps_c - eps_u)                  (Ho & Salimans Eq. 6, s = w + 1)
  classifier  eps = eps_u - s sqrt(1 - alpha_bar_t) grad log p(y | z_t)   (Dhariwal & Nichol Eq. 14)
Scale convention: s = 1 is the conditional model, s = 0 the unconditional one; the CFG paper's w is
s - 1. CFG needs one network trained with the null condition (--p-uncond); classifier guidance a
second, noise-aware network and its gradient at every step. DDIM samples, the decoder decodes.
Images live in [-1, 1]. Left out on purpose: the AE's perceptual and GAN losses (L1 + L2 only),
LDM's GEGLU feed-forward (a GELU MLP here), pretrained text encoders (ours trains from scratch).

  python cfg_ldm.py --stage ae                       # 1. the autoencoder (and its scale factor)
  python cfg_ldm.py --stage ldm --cond class         # 2. the latent U-Net, class tokens, CFG
  python cfg_ldm.py --sample 100 --guidance 3        # 10 classes, DDIM-50, CFG s = 3
Every task (text, layout, sr, inpaint, classifier guidance), with its measured recipe and results:
docs/cfg_ldm.md. Add --tiny for CPU-sized networks. Load the trained networks with their classes:
  ck = torch.load("runs/cfg_ldm/ckpt.pt")
  ldm, ae = LDM(**ck["model_args"]["ldm"]), AutoencoderKL(**ck["model_args"]["ae"])
  ldm.load_state_dict(ck["ema"]); ae.load_state_dict(ck["ae"])
"""

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# -----------------------------------------------------------------------------
# config
@dataclasses.dataclass
class Config(common.Config):
    stage: str = "ae"  # ae | ldm | classifier: into --out as ae.pt, ckpt.pt, classifier.pt
    cond: str = "class"  # ldm: none | class | text | layout | sr | inpaint (docs/cfg_ldm.md)
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
    p_uncond: float = 0.1  # CFG: probability of training with the null condition
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
    restore_guidance: float = 1.0  # sr, inpaint: s on the image condition (1: none, as LDM)
    uncond_paste: bool = False  # inpaint --sample: the unconditional model + paste-back instead
    sweep: str = ""  # e.g. 0,1,3: N samples per scale (same noise) in <out>/sweep/<guide>_s<S>/
    prompt: str = ""  # --sample, text: prompts split on |, or a file of lines (default: held out)
    layout: str = ""  # --sample, layout: a JSON list of layouts [[label, x0, y0, x1, y1], ...]
    at_least = dict(T=2, guidance=0, restore_guidance=0, z_ch=1, heads=1, max_len=1, grid=2)
    at_least |= dict(sr_factor=1, sample_steps=1, p_uncond=0)
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
    def __init__(self, c: int):  # H -> H/2 (7 -> 4 on a 7x7 latent)
        super().__init__(c, c, 3, stride=2, padding=1)


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
            down = isinstance(blk, Downsample)
            hs.append(blk(hs[-1]) if down else blk(hs[-1], temb, ctx, mask))
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
    """The context tokens the U-Net cross-attends to. kind class: the label as one learned token;
    text: a byte-level transformer over the caption, trained with the U-Net from scratch; layout:
    one token per box, the sum of its class's and its four quantised corners' embeddings, through
    the same transformer without positions (a set: the order of the boxes means nothing).
    CFG's null condition is one more id in the table, `self.null`: a dropped condition (always,
    for kinds none, sr and inpaint) is replaced by the null input before it is embedded."""

    def __init__(self, kind="class", dim=256, n_classes=10, layers=2, heads=4, max_len=48, grid=32):
        super().__init__()
        self.kind, self.grid = kind, grid
        self.null = {"class": n_classes, "layout": n_classes, "text": 258}.get(kind, 0)  # an id
        self.emb = nn.Embedding(self.null + 1, dim)  # labels (text: padding, start, 256 bytes)
        if kind == "text":
            self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        if kind == "layout":
            self.corner = nn.Embedding(4 * grid, dim)  # a table each for x0, y0, x1, y1
        if kind in ("text", "layout"):
            self.blocks = nn.ModuleList([TransformerBlock(dim, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(dim)

    def forward(self, c, drop=None):
        """c: (B,) labels, (B, L) token ids or (B, K, 5) box tokens (label, x0, y0, x1, y1 in grid
        cells; -1 rows are padding); drop: (B,) bool, True takes the null condition.
        Returns ctx (B, L, dim) and mask (B, L), True where a token may be attended to."""
        B = len(c)
        drop = torch.zeros(B, dtype=torch.bool, device=c.device) if drop is None else drop
        if self.kind in ("none", "sr", "inpaint"):  # the null token is the only context
            drop = torch.ones_like(drop)
        if self.kind == "layout":  # a layout without boxes is the null condition too
            drop = drop | (c[..., 0] < 0).all(1)
        null = torch.full_like(c, 0 if self.kind == "text" else -1)  # padding after the null id
        null.view(B, -1)[:, 0] = self.null
        c = torch.where(drop.view(B, *[1] * (c.dim() - 1)), null, c)
        if self.kind not in ("text", "layout"):  # one token: the label, or the null id
            return self.emb(c)[:, None], torch.ones(B, 1, dtype=torch.bool, device=c.device)
        if self.kind == "text":
            mask = c > 0  # the start (or null) token is never padding: no row is empty
            ctx = self.emb(c) + self.pos[:, : c.shape[1]]  # (B, L, dim)
        else:
            mask = c[..., 0] >= 0  # (B, K)
            offset = torch.arange(4, device=c.device) * self.grid  # into the corner tables
            corners = self.corner(c[..., 1:].clamp(min=0) + offset).sum(2)  # (B, K, dim)
            ctx = self.emb(c[..., 0].clamp(min=0)) + corners  # padding rows: masked out
        for blk in self.blocks:  # bidirectional self-attention over the real tokens
            ctx = blk(ctx, self_mask=mask)
        return self.norm(ctx), mask


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
            h = blk(h) if isinstance(blk, Downsample) else blk(h, temb)
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
    over pixels, plus kl_weight * KL; mean over the batch. Returns {loss, rec, kl}."""
    x_rec, mean, logvar = ae(x)  # z reparameterised: mean + std * eps
    err = (x_rec.float() - x).flatten(1)  # (B, C*H*W)
    rec = (err.abs() + err**2).sum(1).mean()
    kl = gaussian_kl(mean.float(), logvar.float()).mean()
    return dict(loss=rec + kl_weight * kl, rec=rec, kl=kl)


def ldm_loss(model, s: dict, z0, c, p_uncond: float, concat=None):
    """L_simple (DDPM Eq. 14) on latents, with the context (and the concat condition) dropped to
    the null context with probability p_uncond (Ho & Salimans Alg. 1), so one network learns
    eps_c and eps_u. Mean squared error over every element and the batch."""
    t = torch.randint(0, len(s["betas"]), (len(z0),), device=z0.device)  # t ~ Uniform({1..T})
    eps = torch.randn_like(z0)
    drop = torch.rand(len(z0), device=z0.device) < p_uncond  # Alg. 1 line 3: c <- null
    return F.mse_loss(model(q_sample(s, z0, t, eps), t, c, drop, concat).float(), eps)


def cfg_eps(unet, x, t, cond, null, s: float, concat=None):
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), cond and null each (ctx, mask). s = 1
    is the conditional model alone, s = 0 the unconditional alone; otherwise both in one doubled
    batch. concat: the image condition joined to x (zeros for eps_u)."""
    xc = x if concat is None else torch.cat([x, concat.to(x.dtype)], 1)
    xu = x if concat is None else torch.cat([x, torch.zeros_like(concat, dtype=x.dtype)], 1)
    if s == 1:
        return unet(xc, t, *cond)
    if s == 0:
        return unet(xu, t, *null)
    pairs = ((xc, xu), (t, t), (cond[0], null[0]), (cond[1], null[1]))
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
    """One DDIM update (Song et al. Eq. 12) from t to t_prev (-1: to x_0), its scalars in float64.
    Latents are not clipped (they are not bounded); pixels are clipped to [-1, 1]."""
    la = s["log_alpha_bar"][t].item()  # log alpha_t (alpha_t: Song et al.'s alpha_bar_t)
    la_prev = s["log_alpha_bar"][t_prev].item() if t_prev >= 0 else 0.0
    a, a_prev = math.exp(la), math.exp(la_prev)
    b, b_prev = -math.expm1(la), -math.expm1(la_prev)  # 1 - alpha, with no cancellation
    x0 = (xt - math.sqrt(b) * eps) / math.sqrt(a)  # the "predicted x_0"
    if clip:  # clip it and re-derive eps from it, so eta = 1 stays exactly DDPM's step
        x0 = x0.clamp(-1, 1)
        eps = (xt - math.sqrt(a) * x0) / math.sqrt(b)
    sigma = eta * math.sqrt(b_prev / b * -math.expm1(la - la_prev))  # Eq. 16
    direction = math.sqrt(max(b_prev - sigma**2, 0.0)) * eps  # "direction pointing to x_t"
    x = math.sqrt(a_prev) * x0 + direction  # Eq. 12, its first two terms
    return x + sigma * noise if eta > 0 else x  # and the third, random noise


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
    """Stroke thickness as total ink: mean brightness in [0, 1] per image, (B, 1)."""
    return x_u8.float().flatten(1).mean(1, keepdim=True) / 255


def ink_tertiles(x_u8, y) -> torch.Tensor:
    """(10, 2): per digit, the ink levels splitting thin / plain / thick into thirds."""
    q = torch.tensor([1 / 3, 2 / 3])
    return torch.stack([torch.quantile(ink(x_u8[y == d])[:, 0], q) for d in range(10)])


def thickness(x_u8, y, tertiles) -> torch.Tensor:
    """0 thin, 1 plain, 2 thick: how many of its digit's tertiles an image's ink passes."""
    return (ink(x_u8) > tertiles[y]).sum(1)


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
        common.die(f"--cond {key}: no {meta} (a line per image: {{'file_name', '{key}'}})")
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
            d, j = order[j % len(order)], j + 1
            hw = (y1 - y0, x1 - x0)
            digit = F.interpolate(x_u8[d : d + 1].float(), hw, mode="bilinear", antialias=True)
            canvas[i, :, y0:y1, x0:x1] = digit[0].round().to(torch.uint8)
            boxes[i, m] = torch.tensor([int(y[d]), x0, y0, x1, y1])
    return canvas, boxes


def layout_tokens(boxes, size: int, grid: int):
    """Boxes in pixels (..., 5) -> the Conditioner's tokens: corners quantised to grid cells
    round(v / size * (grid - 1)); padding rows stay -1."""
    q = (boxes[..., 1:].float() / size * (grid - 1)).round().long().clamp(0, grid - 1)
    tokens = torch.cat([boxes[..., :1], q], -1)
    return torch.where(boxes[..., :1] >= 0, tokens, torch.full_like(tokens, -1))


def read_layouts(layouts: list, size: int, n_classes: int, where: str) -> torch.Tensor:
    """Lists of [label, x0, y0, x1, y1] -> (N, K, 5) long, -1 padded; every box inside the
    size x size canvas with x0 < x1, y0 < y1 and a label the model knows, or a one-line error."""
    try:
        k = max(1, *(len(b) for b in layouts))
        rows = [[list(map(int, r)) for r in b] + [[-1] * 5] * (k - len(b)) for b in layouts]
        boxes = torch.tensor(rows, dtype=torch.long).view(len(layouts), k, 5)
    except (TypeError, ValueError, RuntimeError) as e:
        common.die(f"{where}: a layout is a list of [label, x0, y0, x1, y1] boxes ({e})")
    b = boxes[boxes[..., 0] != -1]  # (M, 5): the real boxes
    bad = (b[:, 1:3] < 0).any(1) | (b[:, 3:] > size).any(1) | (b[:, 1:3] >= b[:, 3:]).any(1)
    if bad.any():
        common.die(f"{where}: box {b[bad][0, 1:].tolist()} is not inside the {size}x{size} canvas")
    if ((b[:, 0] < 0) | (b[:, 0] >= n_classes)).any():
        common.die(f"{where}: a label is out of range 0-{n_classes - 1}")
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
        d, rel = (q - p)[:, None, None], yx - p[:, None, None]  # (n, 1, 1, 2), (n, S, S, 2)
        u = ((rel * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-6)).clamp(0, 1)  # closest point
        new = stroke | ((rel - u[..., None] * d).norm(dim=-1) <= radius)
        ok = todo & (new.float().mean((1, 2)) <= hi)
        stroke, p = torch.where(ok[:, None, None], new, stroke), q
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
        x, y = common.load_images(cfg, train, digits=True)
        n = len(x) if train else len(x) // 2  # test canvases use each test digit about once
        return make_canvases(x, y, n, seed=cfg.seed * 2 + (0 if train else 1))
    x, y = common.load_images(cfg, train)
    if cfg.cond == "layout" and cfg.dataset.startswith("folder:"):
        where = f"{cfg.dataset[7:]}/metadata.jsonl"
        y = read_layouts(folder_metadata(cfg.dataset[7:], "boxes"), x.shape[-1], 10**9, where)
    return x, y


# -----------------------------------------------------------------------------
# training: one loop for the three stages; each stage gives its network, loss and checkpoint
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


@dataclasses.dataclass
class Stage:
    """What a stage gives the loop: its network, the loss of a batch, what it checkpoints."""

    file: str  # its checkpoint in --out: ae.pt, ckpt.pt or classifier.pt
    model: nn.Module
    args: dict  # model_args: the constructor arguments of its networks
    loss: Callable  # (wrapped model, batch of (images, indices)) -> {"loss": minimised, ...}
    state: Callable = lambda saving: {}  # what else its checkpoint holds (saving: one is due)
    picture: Callable | None = None  # (step, the model to draw from: its EMA if any) -> a grid
    ema: float = 0.0  # EMA decay of the model; 0: none
    warmup: int = 0  # linear learning-rate warmup steps; 0: none


def run_stage(cfg: Config, st: Stage, data, device, autocast) -> int:
    """AdamW on st.loss with clipping (and EMA, warmup): logs, grids, checkpoints, exact
    --resume. Returns the last step done."""
    model, fused = st.model, device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=0.0, fused=fused)
    ema = common.EMA(model, st.ema) if st.ema else None
    modules = dict(model=model, opt=opt) | (dict(ema=ema.module) if ema else {})
    start = 0
    if cfg.resume:  # after the networks are built, so that their init draws nothing
        ck = common.resume(cfg, data, need=tuple(modules), name=st.file)
        for k, m in modules.items():
            common.load_state(m, ck[k], k)
        start = ck["step"]
    net, loop, done = common.wrap(model, cfg, device), common.Loop(cfg, data, start, st.file), start
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"cfg_ldm: stage {cfg.stage}, {n:.2f}M params, images {tuple(data.x.shape)}")
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * min(1.0, done / st.warmup) if st.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr

        # forward and backward
        with autocast:
            losses = st.loss(net, next(data))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()

        # update
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model, step)

        # log
        loop.add(**losses)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, **(dict(lr=lr) if st.warmup else {}))

        # checkpoint
        extra = st.state(loop.flag or common.due(done, cfg.ckpt_every, cfg.steps))
        if loop.end_step(done, **modules, model_args=st.args, **extra):
            break

        # sample a fixed-noise grid
        grid = st.picture and cfg.sample_every and common.rank() == 0
        if grid and common.due(done, cfg.sample_every, cfg.steps, first=200):
            loop.aside(st.picture, done, model if ema is None else ema.module)
    return done


def begin(cfg: Config):
    """A stage's device, training split, and resumable batches of indices (the stage looks
    up images, latents, labels and captions by index)."""
    device, autocast = common.setup(cfg)
    x, y = load_split(cfg, train=True)
    data = common.Batches(x, torch.arange(len(x)), cfg.batch_size, cfg.seed, device)
    return device, autocast, x, y.to(device), data


def first_stage(cfg: Config, device, ck=None, x_u8=None):
    """(autoencoder, its args, the diffusion model's input shape) of <out>/ae.pt, or of the
    copy in a ckpt.pt (`ck`); x_u8: the images it must have been trained on. --pixel: no AE."""
    if cfg.pixel and not ck:
        return None, None, list(x_u8.shape[1:])
    if not ck:
        path = Path(cfg.out) / "ae.pt"
        if not path.is_file():
            common.die(f"--stage {cfg.stage} needs the autoencoder: run --stage ae first ({path})")
        ck = common.load_ckpt(path, need=("model", "model_args", "image_shape"))
        ck = dict(ck, ae=ck["model"])
    args, (_, H, W) = ck["model_args"]["ae"], ck["image_shape"]
    if x_u8 is not None and list(x_u8.shape[1:]) != ck["image_shape"]:
        common.die(f"the autoencoder in {cfg.out} was trained on other images: {H}x{W}")
    ae = AutoencoderKL(**args).to(device).eval().requires_grad_(False)
    common.load_state(ae, ck["ae"], "autoencoder")
    return ae, args, [args["z_ch"], H // args["f"], W // args["f"]]


def to_float(x_u8, device):
    return x_u8.to(device).float() / 127.5 - 1  # [0, 255] -> [-1, 1]


@torch.no_grad()
def latents(ae, x_u8, device):
    """draw(idx): the diffusion model's x_0 for indexed training images, z ~ q(z | x) times the
    scale factor, from (mean, std) of q computed once; the images themselves for --pixel."""
    if ae is None:
        return lambda idx: to_float(x_u8[idx.cpu()], device)
    stats = [ae.encode(to_float(b, device)) for b in x_u8.split(500)]
    mean, std = torch.cat([m for m, _ in stats]), torch.cat([(0.5 * v).exp() for _, v in stats])
    return lambda idx: ae.scale_factor * (mean[idx] + std[idx] * torch.randn_like(mean[idx]))


@torch.no_grad()
def latent_scale(ae, x_u8, device, n=2000) -> float:
    """LDM's scale_factor: 1 / std of latents z ~ q(z | x) of (up to n) training images."""
    ae.scale_factor.fill_(1.0)
    g = torch.Generator(device).manual_seed(0)  # its own noise: resumes stay exact
    z = [ae.to_latent(to_float(b, device), g) for b in x_u8[:n].split(500)]
    return 1.0 / torch.cat(z).float().std().item()


def train_ae(cfg: Config):
    """Stage ae: the autoencoder by ae_loss; each checkpoint measures the scale factor."""
    device, autocast, x, _, data = begin(cfg)
    args, x_test = ae_args(cfg, x.shape[1], x.shape[-1]), load_split(cfg, train=False)[0]
    ae = AutoencoderKL(**args["ae"]).to(device)
    recon = lambda xb: ae.decode(ae.encode(xb)[0]).clamp(-1, 1)  # from the mean of q(z | x)
    loss = lambda net, batch: ae_loss(net, batch[0], cfg.kl_weight)

    def state(saving):  # the scale factor of the weights being saved
        if saving:
            ae.scale_factor.fill_(latent_scale(ae, x, device))
        return dict(image_shape=list(x.shape[1:]), scale_factor=ae.scale_factor.item())

    @torch.no_grad()
    def picture(done, _):  # test images (odd rows) over their reconstructions (even rows)
        k = min(8, len(x_test))
        xt = to_float(x_test[: 32 // k * k], device).view(-1, k, *x.shape[1:])  # (rows, k, ...)
        rows = torch.stack([xt, recon(xt.flatten(0, 1)).view_as(xt)], 1).flatten(0, 2)
        common.save_grid(rows, Path(cfg.out) / f"recon_{done:06d}.png", nrow=k)

    done = run_stage(cfg, Stage("ae.pt", ae, args, loss, state, picture), data, device, autocast)
    if done == cfg.steps and common.rank() == 0:
        with torch.no_grad():
            xt = to_float(x_test, device)
            mse = ((torch.cat([recon(b) for b in xt.split(500)]) - xt) / 2).square().flatten(1)
        psnr = (-10 * mse.mean(1).clamp(min=1e-10).log10()).mean()  # pixels as [0, 1]
        print(f"test PSNR {psnr:.2f} dB, scale_factor {ae.scale_factor.item():.4f}")
    return ae


def conditions(cfg: Config, x_u8, y):
    """c(idx): the contexts of indexed training images (labels, box tokens, or for text the
    token ids of captions phrased by draws of the training RNG), and what the checkpoint keeps
    for sampling: tertiles, held-out test prompts, test layouts, ..."""
    if cfg.cond == "layout":  # box tokens, and up to 2,500 test layouts: --sample needs no data
        test = load_split(cfg, train=False)[1][:2500].tolist()
        tokens = layout_tokens(y, x_u8.shape[-1], cfg.grid)
        return (lambda idx: tokens[idx]), {"test_layouts": test}
    if cfg.cond == "sr" and x_u8.shape[-1] % cfg.sr_factor:
        common.die(f"--sr-factor {cfg.sr_factor} does not divide the image size {x_u8.shape[-1]}")
    if cfg.cond != "text":
        return (lambda idx: y[idx]), {}
    if cfg.dataset.startswith("folder:"):
        caps = [str(v) for v in folder_metadata(cfg.dataset[7:], "text")]
        make, extra = (lambda idx, r: [caps[i] for i in idx.tolist()]), {"test_prompts": caps[:100]}
    elif cfg.dataset in ("mnist", "mnist-12k"):
        tert = ink_tertiles(x_u8, y.cpu())
        digit, attr = y.tolist(), thickness(x_u8, y.cpu(), tert).tolist()
        make = lambda idx, r: [digit_caption(digit[i], attr[i], v) for i, v in zip(idx.tolist(), r)]
        extra = {"test_prompts": [f"a {HELD_OUT[d]} {d}" for d in range(10)]}
        extra["tertiles"] = tert.tolist()
    else:
        common.die(f"--cond text: no built-in captions for {cfg.dataset}; use folder:PATH")
    tokens = lambda idx: tokenize(make(idx, torch.rand(len(idx)).tolist()), cfg.max_len)
    return (lambda idx: tokens(idx).to(y.device)), extra


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
    ae, ae_a, shape = first_stage(cfg, device, ck if "ae" in ck else None, x)
    task, labels = cfg.cond, (y[..., 0] if cfg.cond == "layout" else y)
    n_classes = max(int(labels.max()) + 1, 10 if cfg.dataset.startswith("mnist") else 1)
    context, extra = conditions(cfg, x, y)
    concat_ch = {"sr": x.shape[1], "inpaint": shape[0] + 1}.get(task, 0)
    args, extra = ldm_args(cfg, shape[0], n_classes, concat_ch), dict(extra, shape=shape)
    if ae is not None:
        args["ae"] = ae_a
        extra |= dict(ae=ae, scale_factor=ae.scale_factor.item(), image_shape=list(x.shape[1:]))
    model, sched = LDM(**args["ldm"]).to(device), make_schedule(cfg.T, cfg.schedule, device)
    draw = latents(ae, x, device)

    def loss(net, batch):  # z_0 ~ q(z | x) scaled (or x_0), its context, L_simple
        (xb, idx), x0 = batch, draw(batch[1])
        c, concat = context(idx), concat_input(task, ae, xb, cfg.sr_factor, shape[1:])
        return dict(loss=ldm_loss(net, sched, x0, c, cfg.p_uncond, concat))

    ck = dict(extra, model_args=args, config=dataclasses.asdict(cfg))
    x_test = load_split(cfg, train=False)[0][:40] if concat_ch else None

    def picture(done, ema):  # the EMA model's samples as --sample 40 draws them, fixed noise
        smp = Sampler(ema, ae, sched, autocast, cfg.sample_steps)
        path = Path(cfg.out) / f"samples_{done:06d}.png"
        if concat_ch:  # rows of input | output | original
            return common.save_grid(restore(cfg, smp, ck, x_test, device)[2], path, nrow=3)
        c, y, _, cycle = sampling_conditions(cfg, ck, 40)
        save_picture(path, generate(cfg, smp, ck, c, cfg.guidance, device), task, y, cycle)

    warmup = max(1, min(cfg.warmup, cfg.steps // 20))
    stage = Stage("ckpt.pt", model, args, loss, lambda _: extra, picture, cfg.ema_decay, warmup)
    run_stage(cfg, stage, data, device, autocast)
    return model


def train_classifier(cfg: Config):
    """Stage classifier: p(y | x_t, t) by cross-entropy on noised latents (or pixels) at t ~ U."""
    device, autocast, x, y, data = begin(cfg)
    ae, _, shape = first_stage(cfg, device, None, x)
    width, n_classes = (32 if cfg.tiny else 64), int(y.max()) + 1
    args = {"classifier": dict(in_ch=shape[0], ch=width, ch_mult=levels(cfg), n_classes=n_classes)}
    clf = NoisyClassifier(**args["classifier"]).to(device)
    sched, draw = make_schedule(cfg.T, cfg.schedule, device), latents(ae, x, device)

    def loss(net, batch):  # x_t ~ q(x_t | x_0) at a random t, then cross-entropy
        x0, idx = draw(batch[1]), batch[1]  # the LDM's own inputs
        t = torch.randint(0, cfg.T, (len(x0),), device=device)  # every noise level alike
        logits = net(q_sample(sched, x0, t, torch.randn_like(x0)), t).float()
        acc = (logits.argmax(1) == y[idx]).float().mean()
        return dict(loss=F.cross_entropy(logits, y[idx]), acc=acc)

    # with the space it classifies, checked against ckpt.pt at sampling
    space = dict(pixel=cfg.pixel, scale_factor=1.0 if ae is None else ae.scale_factor.item())
    stage = Stage("classifier.pt", clf, args, loss, lambda saving: space)
    run_stage(cfg, stage, data, device, autocast)
    return clf


# -----------------------------------------------------------------------------
# sampling: guided DDIM, then the decoder
@dataclasses.dataclass
class Sampler:
    """What guided sampling needs, in one place: the (EMA) LDM, the autoencoder (None: pixels),
    the schedule, autocast and the DDIM steps. sampler(x_T, c, s) -> images in [-1, 1]."""

    model: LDM
    ae: AutoencoderKL | None
    sched: dict
    autocast: object = contextlib.nullcontext()
    steps: int = 50
    eta: float = 0.0

    @torch.no_grad()
    def __call__(self, x_T, c, s: float, concat=None, clf=None, y=None, g=None, after=None):
        """From noise x_T and conditions c (labels, box tokens or token ids; concat: an image
        condition): CFG at scale s, or with clf, classifier guidance toward labels y on the
        unconditional model. after(z, t_prev) edits each DDIM step's output (paste-back)."""
        cond = self.model.cond(c)  # (ctx, mask), once per batch, not per step
        null = self.model.cond(c, torch.ones(len(c), dtype=torch.bool, device=c.device))

        def eps(x, t):
            with self.autocast:
                if clf is None:
                    return cfg_eps(self.model.unet, x, t, cond, null, s, concat).float()
                e = self.model.unet(x, t, *null).float()
            log_p = lambda x, t: clf(x, t).float().log_softmax(1).gather(1, y[:, None])[:, 0]
            return classifier_eps(self.sched, e, x, t, log_p, s)  # log p(y | x_t) per image

        z = ddim_sample(eps, self.sched, x_T, self.steps, self.eta, self.ae is None, g, after)
        return z if self.ae is None else self.ae.from_latent(z).clamp(-1, 1)  # z / scale, decoded


def load_trained(cfg: Config):
    """(Sampler of the EMA LDM, checkpoint, device) of <out>/ckpt.pt, from its model_args."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("ema", "model_args", "shape"))
    if "ldm" not in ck["model_args"]:
        common.die(f"{cfg.out}/ckpt.pt is not a cfg_ldm.py checkpoint (no LDM in its model_args)")
    if cfg.sample_steps > ck["config"]["T"]:  # the trained model's T, which may differ from --T
        common.die(f"--sample-steps {cfg.sample_steps}: this model has T={ck['config']['T']}")
    device, autocast = common.setup(cfg)
    model = LDM(**ck["model_args"]["ldm"]).to(device).eval()
    common.load_state(model, ck["ema"])
    ae = first_stage(cfg, device, ck)[0] if "ae" in ck else None
    sched = make_schedule(ck["config"]["T"], ck["config"]["schedule"], device=device)
    return Sampler(model, ae, sched, autocast, cfg.sample_steps, cfg.eta), ck, device


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


def sampling_conditions(cfg: Config, ck: dict, n: int):
    """(c, labels, thickness words, cycle length) of n samples of a checkpoint's model: cycled
    labels, or prompts (--prompt, else the held-out test prompts); for layouts (box tokens,
    boxes in pixels, None, 0) of --layout or the test layouts."""
    cond, idx = ck["model_args"]["ldm"]["cond"], torch.arange(n)
    if cond["kind"] == "layout":
        size, boxes = (ck.get("image_shape") or ck["shape"])[-1], torch.tensor(ck["test_layouts"])
        if cfg.layout:  # a JSON file of layouts
            try:
                layouts = json.loads(Path(cfg.layout).read_text())
            except (OSError, ValueError) as e:
                common.die(f"cannot read {cfg.layout} as JSON ({type(e).__name__}: {e})")
            boxes = read_layouts(layouts, size, cond["n_classes"], cfg.layout)
        boxes = boxes[idx % len(boxes)]
        return layout_tokens(boxes, size, cond["grid"]), boxes, None, 0
    if cond["kind"] == "text":
        prompts = ck.get("test_prompts", [])
        if cfg.prompt:
            path = Path(cfg.prompt)
            text = path.read_text() if path.is_file() else cfg.prompt.replace("|", "\n")
            prompts = [p.strip() for p in text.splitlines() if p.strip()]
        if not prompts:
            common.die("--prompt: give at least one prompt")
        cycle, prompts = len(prompts), [prompts[i % len(prompts)] for i in idx.tolist()]
        named = [prompt_digit_and_attr(p) for p in prompts]
        ids = tokenize(prompts, cond["max_len"])
        return ids, torch.tensor([d for d, _ in named]), [a for _, a in named], cycle
    labels = idx % cond["n_classes"]  # 0, 1, ..., then again
    y = labels if cond["kind"] == "class" or cfg.guide == "classifier" else None
    return labels, y, None, cond["n_classes"] if cond["kind"] == "class" else 0


def generate(cfg: Config, smp: Sampler, ck: dict, c, s: float, device, clf=None, y=None):
    """Images in [-1, 1] on the CPU for the conditions c at guidance s, --batch-size at a time,
    from one generator seeded by --seed (the same noise at every scale)."""
    g, xs = torch.Generator(device).manual_seed(cfg.seed), []
    for i in range(0, len(c), cfg.batch_size):
        ci = c[i : i + cfg.batch_size].to(device)
        yi = None if y is None else y[i : i + cfg.batch_size].to(device)
        x_T = torch.randn(len(ci), *ck["shape"], device=device, generator=g)
        xs.append(smp(x_T, ci, s, clf=clf, y=yi, g=g).cpu())
        if cfg.sample:
            print(f"scale {s:g}: sampled {i + len(ci)}/{len(c)}", flush=True)
    return torch.cat(xs)


def save_picture(path, x, kind: str, y, cycle: int):
    """Layouts with their boxes drawn; a row per class (or prompt), up to 10 each, where the
    labels cycle; else a square grid."""
    if kind == "layout":
        return common.save_grid(draw_boxes(x[:64], y[:64]), path, nrow=8)
    m = min(len(x) // max(cycle, 1), 10)
    if cycle and m:
        x = x[: m * cycle].view(m, cycle, *x.shape[1:]).transpose(0, 1).flatten(0, 1)
    common.save_grid(x[:256], path, nrow=m if cycle and m else int(math.sqrt(min(len(x), 256))))


def sample(cfg: Config):
    """--sample N: N images per guidance scale into samples.npz (arr_1: the labels asked for, or
    the digit each prompt names; layouts: arr_1 the labels, arr_2 the boxes) and samples.png;
    --sweep adds guidance_<guide>.png."""
    smp, ck, device = load_trained(cfg)
    kind = smp.model.cond.kind
    wrong = {
        "--uncond-paste is inpainting's baseline": cfg.uncond_paste and kind != "inpaint",
        "--layout needs a layout model": cfg.layout and kind != "layout",
        "--prompt needs a text model": cfg.prompt and kind != "text",
        "--guide classifier needs labels": cfg.guide == "classifier" and kind == "layout",
    }
    for msg, bad in wrong.items():
        if bad:
            common.die(f"{msg}; this model has --cond {kind}")
    if kind in ("sr", "inpaint"):
        return sample_restoration(cfg, smp, ck, device)
    c, y, attrs, cycle = sampling_conditions(cfg, ck, cfg.sample)
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
        x = generate(cfg, smp, ck, c, s, device, clf, y)
        out = Path(cfg.out) / "sweep" / f"{cfg.guide}_s{s:g}" if cfg.sweep else Path(cfg.out)
        common.save_samples(out, x, (y[..., 0], y) if kind == "layout" else y)
        save_picture(out / "samples.png", x, kind, y, cycle)
        row = {"scale": s, "guide": cfg.guide, "n": cfg.sample, "step": ck["step"]}
        if attrs is not None and "tertiles" in ck:  # thin/thick by the captions' own measure
            got = thickness(((x + 1) * 127.5).round(), y.clamp(min=0), torch.tensor(ck["tertiles"]))
            asked, scored = torch.tensor(attrs), (torch.tensor(attrs) != 1) & (y >= 0)
            if scored.any():  # prompts that name a digit and a thickness
                row["attr_acc"] = round((got == asked)[scored].float().mean().item(), 4)
        print(json.dumps(row))
        blocks += [x[:40], torch.zeros(10, *x.shape[1:])]  # 4 rows of 10, then a blank row
        print(f"wrote {cfg.sample} samples ({cfg.guide}, s={s:g}) to {out}/samples.npz, .png")
    if cfg.sweep:
        path = Path(cfg.out) / f"guidance_{cfg.guide}.png"
        common.save_grid(torch.cat(blocks[:-1]), path, nrow=10)
        print(f"wrote {path}: a block per scale ({cfg.sweep}), same noise")


def paste_known(x, hole, fill):
    """The known pixels of x exactly, `fill` in the holes (hole 1 = to fill)."""
    return torch.where(hole > 0, fill, x)


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


def restore(cfg: Config, smp: Sampler, ck: dict, x_u8, device, paste=False):
    """sr / inpaint of test images x_u8 at --restore-guidance, with the null context (guidance
    weighs the image condition alone), --batch-size at a time; paste: the unconditional model
    (s = 0) with paste-back instead. Returns (outputs, the conditions: sr the low-res inputs,
    inpaint the masks (1 = hole), and rows input | output | original for the picture)."""
    task, factor = smp.model.cond.kind, ck["config"]["sr_factor"]
    g = torch.Generator(device).manual_seed(cfg.seed)
    holes = random_masks(len(x_u8), x_u8.shape[-1], torch.Generator().manual_seed(cfg.seed))
    outs, conds, rows = [], [], None
    for i in range(0, len(x_u8), cfg.batch_size):
        x = to_float(x_u8[i : i + cfg.batch_size], device)
        hole, after = holes[i : i + len(x)].to(device), None
        if task == "sr":
            cond, cc = F.avg_pool2d(x, factor), sr_condition(x, factor, ck["shape"][1:])
            seen = F.interpolate(cond, scale_factor=factor, mode="nearest")
        else:
            cond, cc = hole, inpaint_condition(smp.ae, x, hole)  # the masked image's latent
            after = repaint_paste(smp.sched, cc[:, :-1], 1 - hole, g) if paste else None
            seen = paste_known(x, hole, torch.zeros_like(x))
        x_T = torch.randn(len(x), *ck["shape"], device=device, generator=g)
        c = torch.zeros(len(x), dtype=torch.long, device=device)  # the null context
        out = smp(x_T, c, 0.0 if paste else cfg.restore_guidance, cc, g=g, after=after)
        out = out if task == "sr" else paste_known(x, hole, out)  # the known pixels, pasted back
        outs, conds = outs + [out.cpu()], conds + [cond.cpu()]
        rows = rows if i else torch.stack([seen, out, x], 1)[:8].flatten(0, 1).cpu()
        if cfg.sample:
            print(f"{task}: restored {i + len(x)}/{len(x_u8)}", flush=True)
    return torch.cat(outs), torch.cat(conds), rows


def sample_restoration(cfg: Config, smp: Sampler, ck: dict, device):
    """sr / inpaint --sample N: the first N test images (cycled), restored, into samples.npz:
    arr_0 the outputs, arr_1 the digits' labels, arr_2 the conditions (sr: the low-res inputs;
    inpaint: the masks, 1 = hole), arr_3 the originals, which evaluate.py --restoration scores
    beside bicubic or mean fill; samples.png rows input | output | original. --uncond-paste: the
    unconditional model with paste-back instead, into <out>/uncond_paste/."""
    x_u8, y = load_split(common.from_run(cfg, ck), train=False)
    idx = torch.arange(cfg.sample) % len(x_u8)
    out, cond, rows = restore(cfg, smp, ck, x_u8[idx], device, cfg.uncond_paste)
    u8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    cond = (u8(cond) if smp.model.cond.kind == "sr" else cond.to(torch.uint8)).permute(0, 2, 3, 1)
    path = Path(cfg.out) / ("uncond_paste" if cfg.uncond_paste else "")
    common.save_samples(path, out, [y[idx], cond, x_u8[idx].permute(0, 2, 3, 1)])
    common.save_grid(rows, path / "samples.png", nrow=3)
    score = f"python evaluate.py {path}/samples.npz --restoration {smp.model.cond.kind}"
    print(f"wrote {path}/samples.npz and samples.png; score: {score}")


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
