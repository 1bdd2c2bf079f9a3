"""
DDPM + DDIM: Ho et al. 2020 (arXiv:2006.11239), Song et al. 2021 (arXiv:2010.02502).

A U-Net eps_theta(x_t, t) learns to predict the noise mixed into an image,
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4), by L_simple = |eps - eps_theta|^2
(Eq. 14). Sampling runs the learned reverse chain: DDPM's ancestral sampler (Alg. 2, T steps) or
DDIM's non-Markovian one (Eq. 12, any K <= T steps; eta=0 deterministic, eta=1 is DDPM).
`--nll` measures the variational bound in bits/dim (Eq. 5). Images live in [-1, 1].
Left out on purpose: learned variances, v-prediction, classifier guidance (see cfg_ldm.py).

  python ddpm_ddim.py                               # MNIST, the paper's U-Net; one GPU
  python ddpm_ddim.py --tiny --steps 2000 --batch-size 64 --lr 1e-3  # CPU: first grid in ~2 min
  python ddpm_ddim.py --dataset cifar10 --steps 800000
  python ddpm_ddim.py --sample 64 --sampler ddim --sample-steps 50
  python ddpm_ddim.py --nll 1000                    # test bits/dim (variational bound)

Load a trained U-Net with the class alone:
  ck = torch.load("runs/ddpm_ddim/ckpt.pt")
  unet = UNet(**ck["model_args"]["unet"])
  unet.load_state_dict(ck["ema"])
"""

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# -----------------------------------------------------------------------------
# config
@dataclasses.dataclass
class Config(common.Config):
    # model (Ho et al. CIFAR-10: ch 128, 2 blocks per level, dropout 0.1, attention at 16x16)
    ch: int = 128  # base channels; --tiny: 24
    num_res_blocks: int = 2  # per level; --tiny: 1
    dropout: float = 0.1  # in every ResBlock (CIFAR-10: 0.1)
    channels_last: bool = True  # NHWC memory format (measured: +6% training img/s on CPU)
    # diffusion
    T: int = 1000  # diffusion steps
    schedule: str = "linear"  # linear (beta 1e-4..0.02) | cosine (Nichol & Dhariwal 2021)
    var: str = "large"  # reverse variance: large (sigma^2 = beta) | small (beta-tilde, Eq. 7)
    # optimisation (Adam 2e-4 from common, warmup, clip 1.0, EMA 0.9999)
    warmup: int = 5000  # linear LR warmup steps, capped at 5% of --steps for short runs
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.9999  # EMA of the weights; samples come from it
    # sampling and evaluation
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 50  # DDIM steps K (DDPM always takes T)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 = DDPM posterior variance
    nll: int = 0  # N > 0: no training; bits/dim bound on N test images
    at_least = dict(T=2, nll=0, sample_steps=1)
    choices = dict(schedule=("linear", "cosine"), var=("large", "small"), sampler=("ddim", "ddpm"))


# -----------------------------------------------------------------------------
# model: the DDPM U-Net (Ho et al. App. B), based on a Wide ResNet / PixelCNN++ backbone
UNET = {  # image size -> (channel multipliers per level, resolutions with self-attention)
    28: ((1, 2, 2), (14,)),  # 28 -> 14 -> 7: no 16x16 level, so attention at 14x14
    32: ((1, 2, 2, 2), (16,)),
    64: ((1, 2, 3, 4), (16,)),
    128: ((1, 1, 2, 3, 4), (16,)),
    256: ((1, 1, 2, 2, 4, 4), (16,)),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as the Transformer's: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], dim=1)


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)  # 32 groups as in the paper (fewer for --tiny widths)


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, residual, zero-initialised output."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)  # NIN layers
        nn.init.zeros_(self.proj.weight)  # the block starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): tokens
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, HW, C) each, one head
        h = F.scaled_dot_product_attention(q, k, v)  # last dim contiguous: the fused kernels apply
        return x + self.proj(h[:, 0]).transpose(1, 2).reshape(B, C, H, W)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, residual; attention."""

    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attn else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1): broadcast over space
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class Downsample(nn.Conv2d):
    def __init__(self, c: int):
        super().__init__(c, c, 3, stride=2, padding=1)

    def forward(self, x, temb):
        return super().forward(x)


class Upsample(nn.Conv2d):
    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1)

    def forward(self, x, temb):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W), (B,) int timesteps -> (B, C, H, W) predicted noise."""

    def __init__(
        self,
        in_ch=3,
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_res=(16,),
        dropout=0.1,
        image_size=32,
    ):
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c, res = [ch], ch, image_size
        for i, m in enumerate(ch_mult):  # encoder: every output is kept for a skip connection
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * m, tdim, dropout, attn=res in attn_res))
                c = ch * m
                skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
                res //= 2
        mid = [ResBlock(c, c, tdim, dropout, attn=True), ResBlock(c, c, tdim, dropout)]
        self.mid = nn.ModuleList(mid)
        for i, m in reversed(list(enumerate(ch_mult))):  # decoder: one more block per level
            for _ in range(num_res_blocks + 1):
                attn = res in attn_res
                self.up.append(ResBlock(c + skips.pop(), ch * m, tdim, dropout, attn=attn))
                c = ch * m
            if i > 0:
                self.up.append(Upsample(c))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # eps_theta starts at 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4ch)
        hs = [self.conv_in(x)]
        for blk in self.down:
            hs.append(blk(hs[-1], temb))
        h = hs[-1]
        for blk in self.mid:
            h = blk(h, temb)
        for blk in self.up:
            h = blk(torch.cat([h, hs.pop()], 1) if isinstance(blk, ResBlock) else h, temb)
        return self.out(h)


# -----------------------------------------------------------------------------
# method: schedules, the loss, the two samplers, the variational bound
def make_schedule(T: int = 1000, kind: str = "linear", dtype=torch.float32, device=None) -> dict:
    """All per-step constants, computed in float64 and stored as `dtype`. Index t = 0..T-1."""
    if kind == "linear":  # Ho et al. Sec. 4: beta_1 = 1e-4 .. beta_T = 0.02 (scaled for T != 1000)
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    elif kind == "cosine":  # Nichol & Dhariwal Eq. 17, s = 0.008, betas clipped at 0.999
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)  # exact where alpha_bar is near 0 or 1
    alpha_bar = log_alpha_bar.exp()
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)  # beta-tilde, Eq. 7
    s = dict(betas=betas, alpha_bar=alpha_bar, log_alpha_bar=log_alpha_bar)
    s.update(alpha_bar_prev=alpha_bar_prev, post_var=post_var)
    # log-variances with t=0 replaced by t=1 (beta-tilde_0 = 0), as in Nichol & Dhariwal
    s["logvar_small"] = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    s["logvar_large"] = torch.log(torch.cat([post_var[1:2], betas[1:]]))
    # Eq. 7: mu-tilde = post_c0 x_0 + post_ct x_t
    s["post_c0"] = betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    s["post_ct"] = (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar)
    return {k: v.to(dtype=dtype, device=device) for k, v in s.items()}


def at(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped (B, 1, 1, 1) to broadcast against x."""
    return a[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def q_sample(s: dict, x0, t, eps):
    """x_t ~ q(x_t | x_0) in closed form (Eq. 4)."""
    return at(s["alpha_bar"], t, x0).sqrt() * x0 + (1 - at(s["alpha_bar"], t, x0)).sqrt() * eps


def q_posterior(s: dict, x0, xt, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7)."""
    return at(s["post_c0"], t, xt) * x0 + at(s["post_ct"], t, xt) * xt, at(s["post_var"], t, xt)


def p_losses(eps_model, s: dict, x0):
    """L_simple (Eq. 14): E_{t, eps} |eps - eps_theta(x_t, t)|^2, mean over pixels and batch."""
    t = torch.randint(0, len(s["betas"]), (len(x0),), device=x0.device)  # t ~ Uniform({1..T})
    eps = torch.randn_like(x0)
    return F.mse_loss(eps_model(q_sample(s, x0, t, eps), t).float(), eps)


def predict_x0(s: dict, xt, t, eps, clip: bool):
    """x_0 implied by a noise prediction (Eq. 4 solved for x_0), optionally clipped to [-1, 1]."""
    ab = at(s["alpha_bar"], t, xt)
    x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    return x0.clamp(-1, 1) if clip else x0


def p_mean_logvar(eps_model, s: dict, xt, t, var="large", clip=True):
    """p_theta(x_{t-1} | x_t): mean mu-tilde(x_t, x0_hat) (Eq. 11 via Eq. 7) and a fixed
    log-variance: "large" (beta), "small" (beta-tilde), or a tensor of T log-variances."""
    x0 = predict_x0(s, xt, t, eps_model(xt, t), clip)
    logvar = s[f"logvar_{var}"] if isinstance(var, str) else var
    return q_posterior(s, x0, xt, t)[0], at(logvar, t, xt)


@torch.no_grad()
def ddpm_sample(eps_model, s: dict, x_T, var="large", clip=True, generator=None):
    """Ancestral sampling, Alg. 2: T steps, x_{t-1} = mu_theta + sigma_t z (no noise at the end)."""
    x = x_T
    for i in reversed(range(len(s["betas"]))):
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        mean, logvar = p_mean_logvar(eps_model, s, x, t, var, clip)
        z = torch.randn(x.shape, device=x.device, generator=generator) if i > 0 else 0
        x = mean + (0.5 * logvar).exp() * z
    return x


def ddim_step(s: dict, eps, xt, t: int, t_prev: int, eta: float, clip=True, noise=None):
    """One DDIM update (Song et al. Eq. 12) from t to t_prev (-1 means to x_0). The scalars are
    computed in float64 from log alpha_bar, in forms where nothing cancels: at alpha_bar ~ 1
    (t small) and ~ 0 (the cosine schedule's last steps) float32 differences lose the result."""
    la = s["log_alpha_bar"][t].item()  # log alpha_bar_t
    la_prev = s["log_alpha_bar"][t_prev].item() if t_prev >= 0 else 0.0
    one_m, one_m_prev = -math.expm1(la), -math.expm1(la_prev)  # 1 - alpha_bar
    ratio = -math.expm1(la - la_prev)  # 1 - alpha_bar_t / alpha_bar_prev
    x0 = (xt - math.sqrt(one_m) * eps) / math.exp(la / 2)
    if clip:  # clip x0_hat and re-derive eps from it, so eta=1 stays exactly DDPM's step
        x0 = x0.clamp(-1, 1)
        eps = (xt - math.exp(la / 2) * x0) / math.sqrt(one_m)
    sigma = eta * math.sqrt(one_m_prev / one_m * ratio)  # Eq. 16
    # the direction's weight sqrt(1 - alpha_bar_prev - sigma^2), rearranged: no term cancels
    dir2 = one_m_prev / one_m * (math.exp(la - la_prev) * one_m_prev + (1 - eta**2) * ratio)
    x = math.exp(la_prev / 2) * x0 + math.sqrt(max(dir2, 0.0)) * eps  # Eq. 12: x0, direction
    return x + sigma * noise if eta > 0 else x


@torch.no_grad()
def ddim_sample(eps_model, s: dict, x_T, steps=50, eta=0.0, clip=True, generator=None):
    """DDIM with `steps` evenly spaced timesteps from T-1 down to 0 (one step: from T-1)."""
    T = len(s["betas"])
    ts = torch.linspace(0, T - 1, steps).round().long().tolist() if steps > 1 else [T - 1]
    x = x_T
    for t, t_prev in zip(reversed(ts), reversed([-1] + ts[:-1])):
        eps = eps_model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        noise = torch.randn(x.shape, device=x.device, generator=generator) if eta > 0 else None
        x = ddim_step(s, eps, x, t, t_prev, eta, clip, noise)
    return x


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    ratio = (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp()
    return 0.5 * (logvar2 - logvar1 - 1 + ratio)


def log_bin_mass(lo, hi):
    """log(Phi(hi) - Phi(lo)) for standardised bin edges lo < hi, exact in the tails: the bin is
    mirrored to the left of 0, where log_ndtr keeps full precision, and the difference is taken
    as log Phi(hi) + log(1 - Phi(lo) / Phi(hi)) (as PixelCNN++ and improved-diffusion do)."""
    right = lo + hi > 0
    lo, hi = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    a, b = torch.special.log_ndtr(lo), torch.special.log_ndtr(hi)
    return b + torch.log(-torch.expm1((a - b).clamp(max=-1e-30)))


def discretized_gaussian_loglik(x, mean, logvar):
    """log of N(mean, e^logvar)'s mass on x's bin of width 2/255 in [-1, 1]; the edge bins
    extend to -inf and +inf (Ho et al. Eq. 13). Float64 throughout."""
    x, mean, inv_std = x.double(), mean.double(), (-0.5 * logvar.double()).exp()
    lo, hi = inv_std * (x - mean - 1 / 255), inv_std * (x - mean + 1 / 255)
    left, right = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo)  # the 0 and 255 bins
    return torch.where(x < -0.999, left, torch.where(x > 0.999, right, log_bin_mass(lo, hi)))


@torch.no_grad()
def vlb_terms(eps_model, s: dict, x0, var="large", clip=True, generator=None):
    """The bound of Eq. 5 per image, in nats: L_T (prior), sum_{t>1} L_{t-1} (KLs), L_0 (decoder).
    One x_t ~ q(x_t | x_0) per t: an unbiased estimate of each term."""
    B, T = len(x0), len(s["betas"])
    kls = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for i in reversed(range(T)):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        xt = q_sample(s, x0, t, torch.randn(x0.shape, device=x0.device, generator=generator))
        mean, logvar = p_mean_logvar(eps_model, s, xt, t, var, clip)
        if i == 0:  # L_0 = -log p(x_0 | x_1), discretized
            dec = -discretized_gaussian_loglik(x0, mean, logvar).flatten(1).sum(1)
        else:  # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
            q_mean, q_var = q_posterior(s, x0, xt, t)
            kls += normal_kl(q_mean, q_var.log(), mean, logvar).flatten(1).sum(1).double()
    ab_T = s["alpha_bar"][-1].double()  # L_T = KL(q(x_T | x_0) || N(0, I))
    prior = normal_kl(ab_T.sqrt() * x0.double(), (1 - ab_T).log(), 0.0, torch.zeros(()))
    return prior.flatten(1).sum(1), kls, dec


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """nats per image -> bits per dimension. Data are 8-bit, so no extra dequantisation offset:
    the decoder L_0 already assigns probability mass to each of the 256 bins."""
    return nats / (dims * math.log(2))


# -----------------------------------------------------------------------------
# training
def model_args(cfg: Config, in_ch: int, size: int) -> dict:
    """The U-Net's constructor arguments for this image size and these flags (saved in every
    checkpoint as model_args); an unsupported size is a one-line error."""
    if size not in UNET:
        common.die(f"image size {size} does not fit the U-Net ({sorted(UNET)}): set --image-size")
    mult, attn = UNET[size]
    ch, blocks = (24, 1) if cfg.tiny else (cfg.ch, cfg.num_res_blocks)  # --tiny: 0.6M params
    unet = dict(in_ch=in_ch, ch=ch, ch_mult=mult, num_res_blocks=blocks, attn_res=attn)
    return {"unet": dict(unet, dropout=cfg.dropout, image_size=size)}


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.sample_steps > cfg.T:
        common.die(f"--sample-steps {cfg.sample_steps}: must be between 1 and T={cfg.T}")


def eps_fn(model, autocast):
    """The model as the samplers call it: under autocast, returning float32."""

    def f(x, t):
        with autocast:
            return model(x, t).float()

    return f


def save_grid(ema_model, autocast, sched, x_T, path):
    """The EMA model's DDIM-50 samples from fixed noise, as a PNG grid."""
    common.save_grid(ddim_sample(eps_fn(ema_model, autocast), sched, x_T, steps=50), path)


def train(cfg: Config):
    """Train eps_theta with L_simple (Alg. 1); returns the raw model and its EMA copy."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    args = model_args(cfg, x.shape[1], x.shape[-1])
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = UNet(**args["unet"]).to(device, memory_format=fmt)
    ema = common.EMA(model, cfg.ema_decay)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=0.0, fused=fused)
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("model", "ema", "opt"))
        common.load_state(model, ck["model"])
        common.load_state(ema.module, ck["ema"], "EMA")
        common.load_state(opt, ck["opt"], "optimizer")
        start = ck["step"]
    net = common.wrap(model, cfg, device)
    sched = make_schedule(cfg.T, cfg.schedule, device=device)
    x_T = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(cfg.seed))
    x_T = x_T.to(device)  # the fixed noise of every sample grid
    warmup = max(1, min(cfg.warmup, cfg.steps // 20))
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"ddpm_ddim: {n:.2f}M params, images {tuple(x.shape)}, {device}, from step {start}")
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * min(1.0, done / warmup)  # linear warmup, from the step alone
        for g in opt.param_groups:
            g["lr"] = lr

        # forward and backward: Alg. 1 lines 2-5, x_0 ~ q(x_0), then t, eps and the gradient
        x0 = next(data)[0].contiguous(memory_format=fmt)
        with autocast:
            loss = p_losses(net, sched, x0)
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

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(model=model, ema=ema.module, opt=opt, model_args=args)
        if loop.end_step(done, **state):
            break

        # sample a fixed-noise grid (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_grid, ema.module, autocast, sched, x_T, path)
    return model, ema.module


# -----------------------------------------------------------------------------
# sampling and evaluation from a checkpoint (EMA weights)
def load_trained(cfg: Config):
    """(EMA U-Net, schedule, checkpoint, device, autocast) of <out>/ckpt.pt: the network is
    rebuilt from the checkpoint's model_args, the schedule from its flags."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("ema", "model_args"))
    device, autocast = common.setup(cfg)
    model = UNet(**ck["model_args"]["unet"]).to(device).eval()
    common.load_state(model, ck["ema"])
    sched = make_schedule(ck["config"]["T"], ck["config"]["schedule"], device=device)
    return model, sched, ck, device, autocast


@torch.no_grad()
def sample(cfg: Config):
    """--sample N: N images from the EMA model into <out>/samples.npz and samples.png."""
    model, sched, ck, device, autocast = load_trained(cfg)
    T, eps = len(sched["betas"]), eps_fn(model, autocast)
    if cfg.sample_steps > T:  # the trained model's T, which may differ from --T
        common.die(f"--sample-steps {cfg.sample_steps}: this model has T={T}")
    g = torch.Generator(device).manual_seed(cfg.seed)
    shape = (model.conv_in.in_channels, ck["model_args"]["unet"]["image_size"])
    xs = []
    for i in range(0, cfg.sample, cfg.batch_size):
        n = min(cfg.batch_size, cfg.sample - i)
        x_T = torch.randn(n, shape[0], shape[1], shape[1], device=device, generator=g)
        if cfg.sampler == "ddpm":
            xs.append(ddpm_sample(eps, sched, x_T, cfg.var, generator=g))
        else:
            xs.append(ddim_sample(eps, sched, x_T, cfg.sample_steps, cfg.eta, generator=g))
        print(f"sampled {i + n}/{cfg.sample}", flush=True)
    common.save_samples(cfg.out, torch.cat(xs))
    print(f"wrote {cfg.sample} samples ({cfg.sampler}) to {cfg.out}/samples.npz and samples.png")


def nll(cfg: Config):
    """--nll N: the variational bound in bits/dim on the first N test images."""
    model, sched, ck, device, autocast = load_trained(cfg)
    cfg = common.from_run(cfg, ck)
    cfg.image_size = ck["model_args"]["unet"]["image_size"]
    x = common.load_images(cfg, train=False)[0][: cfg.nll]
    g = torch.Generator(device).manual_seed(cfg.seed)
    parts = []
    for i in range(0, len(x), cfg.batch_size):
        x0 = x[i : i + cfg.batch_size].to(device).float() / 127.5 - 1  # [0, 255] -> [-1, 1]
        terms = vlb_terms(eps_fn(model, autocast), sched, x0, cfg.var, generator=g)
        parts.append(torch.stack(terms, 1).cpu())
        print(f"bound on {i + len(x0)}/{len(x)} images", flush=True)
    bpd = [bits_per_dim(p, x[0].numel()).mean().item() for p in torch.cat(parts).unbind(1)]
    res = {"bpd": sum(bpd), "L_T": bpd[0], "L_1..T-1": bpd[1], "L_0": bpd[2]}
    res |= {"n": len(x), "var": cfg.var, "step": ck["step"]}
    print(json.dumps(res))
    with open(Path(cfg.out) / "nll.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    cfg = common.parse(Config, "ddpm_ddim")
    check_flags(cfg)
    if not (cfg.sample or cfg.nll):
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling and --nll run in one process
        if cfg.sample:
            sample(cfg)
        else:
            nll(cfg)
