"""
Glow: Kingma & Dhariwal 2018 (arXiv:1807.03039). RealNVP: Dinh, Sohl-Dickstein & Bengio 2017
(arXiv:1605.08803).

A normalizing flow is an invertible network z = f(x) whose Jacobian determinant is cheap, so the
change of variables gives the exact likelihood (Glow Eq. 1-3, RealNVP Eq. 3):
    log p(x) = log p(z) + log|det(dz/dx)| = log p(z) + sum_i log|det(dh_i/dh_{i-1})|.
Training is plain maximum likelihood and sampling is one pass of f^-1. Glow's step is ActNorm ->
invertible 1x1 conv -> affine coupling; RealNVP's steps are affine couplings on checkerboard and
channel masks. Both are multi-scale: after each level half the variables are factored out, under
their own prior (Glow: learned, conditioned on the other half; RealNVP: N(0, I)).
Pixels: u in {0..2^n - 1} -> x = (u + U[0, 1)) / 2^n in [0, 1] (uniform dequantization). Glow
models x - 1/2, RealNVP logit(alpha + (1 - 2 alpha) x); bits/dim counts both (see bits_per_dim).
Left out on purpose: Glow's additive coupling and reverse/shuffle permutations, RealNVP's
batch-norm layers and ResNet coupling nets (both use Glow's 3-layer CNN here), class conditioning.
Expect (README): `--depth 8 --width 128`, 8,000 steps, 42 CPU minutes -> 1.75 test bits/dim on
MNIST; the published 1.05 takes the full model, 60,000 digits and days of GPU time.

  python flow.py --dataset mnist-12k                  # Glow on MNIST (L=2 levels at 28x28)
  python flow.py --arch realnvp --out runs/realnvp
  python flow.py --nll 2500                           # test bits/dim, interpolation.png
  python flow.py --sample 64 --temperature 1.0        # samples.npz and samples.png
  python flow.py --tiny --steps 2000                  # a CPU-sized run
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
    steps: int = 50000
    batch_size: int = 64  # Glow's n_batch_train
    lr: float = 1e-3  # Adam after a linear warmup (Glow)
    arch: str = "glow"  # glow | realnvp
    levels: int = 0  # L; 0: as many squeezes as the size allows, up to 3 (2 for MNIST's 28)
    depth: int = 0  # glow: K steps per level (0: 32); realnvp: couplings per mask (0: 3); tiny 4/2
    width: int = 0  # hidden channels of each coupling network (0: 512 glow, 64 realnvp); --tiny 32
    lu: bool = False  # the LU-decomposed 1x1 convolution (Glow Eq. 10)
    n_bits: int = 8  # bits kept per pixel before dequantization (Glow's CelebA runs: 5)
    alpha: float = 0.05  # realnvp's logit pre-processing margin (RealNVP Sec. 4.1)
    temperature: float = 0.7  # sampling: z ~ N(mu, (T sigma)^2) (Glow Sec. 5, Fig. 8)
    init_batch: int = 512  # images for ActNorm's data-dependent initialisation
    warmup: int = 1000  # linear learning-rate warmup steps (at most steps / 20)
    grad_clip: float = 50.0  # clip the gradient norm: a guard against rare spikes
    nll: int = 0  # N > 0: no training; test bits/dim of <out>/ckpt.pt on N test images
    at_least = dict(nll=0, levels=0, depth=0, width=0, init_batch=1, temperature=0, n_bits=1)
    choices = dict(arch=("glow", "realnvp"))


# -----------------------------------------------------------------------------
# model: bijections with forward(x) -> (y, log|det dy/dx| per image) and inverse(y) -> x
class Squeeze(nn.Module):
    """Each 2x2 patch becomes 4 channels (RealNVP Fig. 3): a permutation, log-det 0."""

    def forward(self, x):  # (B, C, H, W) -> (B, 4C, H/2, W/2)
        B, C, H, W = x.shape
        x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return x.reshape(B, C * 4, H // 2, W // 2), x.new_zeros(B)

    def inverse(self, y):  # (B, 4C, H, W) -> (B, C, 2H, 2W)
        B, C, H, W = y.shape
        y = y.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)  # (B, C/4, H, 2, W, 2)
        return y.reshape(B, C // 4, H * 2, W * 2)


class ActNorm(nn.Module):
    """y = (x + b) * exp(logs) per channel; log|det| = H W sum(logs) (Glow Sec. 3.1, Table 1).
    Data-dependent init: b and logs are set so the first batch leaves with zero mean and unit
    variance per channel. The `initialized` buffer is saved, so a loaded model is never reset."""

    def __init__(self, ch: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.init_pending = False  # set by Flow.initialize for exactly one forward pass

    def forward(self, x):
        if self.init_pending:  # per-channel statistics over batch and pixels: (1, C, 1, 1)
            with torch.no_grad():
                self.b.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.logs.copy_(-x.std((0, 2, 3), keepdim=True, unbiased=False).add(1e-6).log())
                self.initialized.fill_(True)
            self.init_pending = False
        logdet = self.logs.sum() * x.shape[2] * x.shape[3]  # the same scale at every pixel
        return (x + self.b) * self.logs.exp(), logdet.expand(len(x))

    def inverse(self, y):
        return y * (-self.logs).exp() - self.b


class InvConv2d(nn.Module):
    """y = W x at every pixel, a learned channel mixing that generalises a permutation (Glow
    Sec. 3.2): log|det| = H W log|det W| (Eq. 9). --lu: W = P L (U + diag(s)) with P fixed, so
    log|det W| = sum log|s| costs O(C) (Eq. 10). Runs in float32 even under autocast."""

    def __init__(self, ch: int, lu: bool = False):
        super().__init__()
        w = torch.linalg.qr(torch.randn(ch, ch))[0]  # a random rotation: log|det| = 0 at init
        self.lu = lu
        if not lu:
            self.weight = nn.Parameter(w)
            return
        P, L, U = torch.linalg.lu(w)
        s = U.diagonal()
        self.register_buffer("P", P)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower", torch.tril(torch.ones(ch, ch), -1))  # strictly lower mask
        self.L, self.U = nn.Parameter(L), nn.Parameter(U.triu(1))
        self.log_s = nn.Parameter(s.abs().log())

    def matrix(self):
        """(W, log|det W|)."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)
        eye = torch.eye(len(self.P), dtype=self.P.dtype, device=self.P.device)
        L = self.L * self.lower + eye  # unit lower-triangular
        U = self.U * self.lower.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.P @ L @ U, self.log_s.sum()

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            W, logdet = self.matrix()
            y = F.conv2d(x, W.to(x.dtype)[:, :, None, None])  # W (C, C) as a 1x1 kernel
        return y, (logdet * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y):
        with torch.autocast(y.device.type, enabled=False):
            W = torch.linalg.inv(self.matrix()[0].double()).to(y.dtype)  # inverted in float64
            return F.conv2d(y, W[:, :, None, None])


class ZeroConv2d(nn.Module):
    """A 3x3 conv that starts at zero, output scaled by exp(3 logs) (Glow's conv2d_zeros)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
        return self.conv(x) * (3 * self.logs).exp()


class AffineCoupling(nn.Module):
    """x_a passes unchanged and sets (t, h) = NN(x_a) for the other half x_b:
        glow:    y_b = (x_b + t) * sigmoid(h + 2)       (Glow Table 1 and its code)
        realnvp: y_b = x_b * exp(s) + t, s = c tanh(h)  (RealNVP Eq. 7, c learned per channel)
    log|det| = sum of log-scales over x_b. Halves are channel halves ("channel") or the squares of
    a checkerboard ("checker", RealNVP Fig. 3); `parity` swaps them. NN's last layer starts at
    zero, so t = 0 and h = 0 at init: realnvp starts as the identity, glow as x_b * sigmoid(2) =
    0.88 x_b (Glow Sec. 3.3 calls it the identity; its code, and ours, add the +2)."""

    def __init__(self, ch: int, width: int, mask="channel", parity=0, kind="glow"):
        super().__init__()
        self.mask, self.parity, self.kind = mask, parity, kind
        cin = ch // 2 if mask == "channel" else ch  # the checkerboard's NN sees the masked x
        cb = ch - cin if mask == "channel" else ch  # channels that get (t, log s)
        self.nn = nn.Sequential(  # NN() of Glow Sec. 3.3: conv 3x3, ReLU, conv 1x1, ReLU, zero conv
            nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.ReLU(),
            ZeroConv2d(width, 2 * cb),
        )  # fmt: skip
        self.c = nn.Parameter(torch.ones(1, cb, 1, 1)) if kind == "realnvp" else None

    def split(self, x):
        """(x_a, x_b, b): b masks x_b's parameters (checker) or is 1 (channel)."""
        if self.mask == "checker":  # b (1, 1, H, W): 1 on the squares that get transformed
            i, j = (torch.arange(n, device=x.device) for n in x.shape[2:])
            b = ((i[:, None] + j[None] + self.parity) % 2).to(x.dtype)[None, None]
            return x * (1 - b), x, b
        x_a, x_b = x.chunk(2, 1)
        return (x_b, x_a, 1) if self.parity else (x_a, x_b, 1)

    def params(self, x_a, b):
        h = self.nn(x_a).to(x_a.dtype)
        t, h = h[:, 0::2] * b, h[:, 1::2]  # shift and scale interleaved, as Glow's split_cross
        log_s = F.logsigmoid(h + 2) if self.kind == "glow" else self.c * torch.tanh(h)
        return t, log_s * b  # zero on the pass-through squares: there y = x

    def join(self, x_a, y_b):
        if self.mask == "checker":
            return y_b
        return torch.cat([y_b, x_a] if self.parity else [x_a, y_b], 1)

    def forward(self, x):
        x_a, x_b, b = self.split(x)
        t, log_s = self.params(x_a, b)
        y_b = (x_b + t) * log_s.exp() if self.kind == "glow" else x_b * log_s.exp() + t
        return self.join(x_a, y_b), log_s.flatten(1).sum(1)

    def inverse(self, y):
        y_a, y_b, b = self.split(y)  # y_a == x_a: the pass-through half
        t, log_s = self.params(y_a, b)
        x_b = y_b * (-log_s).exp() - t if self.kind == "glow" else (y_b - t) * (-log_s).exp()
        return self.join(y_a, x_b)


class Chain(nn.ModuleList):
    """Bijections in sequence: the log-dets add (the chain rule, Glow Eq. 3)."""

    def forward(self, x):
        logdet = x.new_zeros(len(x))
        for f in self:
            x, ld = f(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for f in reversed(self):
            y = f.inverse(y)
        return y


def log_normal(x, mu, logs):
    """log N(x; mu, exp(logs)^2), summed over all but the batch dim."""
    log_density = -0.5 * (math.log(2 * math.pi) + 2 * logs + (x - mu) ** 2 * (-2 * logs).exp())
    return log_density.flatten(1).sum(1)


class Split(nn.Module):
    """Factor out z2, the second half of the channels, under p(z2 | z1) = N(mu, sigma^2) with
    (mu, log sigma) = ZeroConv(z1) (Glow's split2d; learned=False: N(0, I) as RealNVP)."""

    def __init__(self, ch: int, learned: bool = True):
        super().__init__()
        self.prior = ZeroConv2d(ch // 2, ch) if learned else None

    def prior_params(self, z1):
        """(mu, log sigma) of z2 given z1, each (B, C/2, H, W)."""
        if self.prior is None:
            return torch.zeros_like(z1), torch.zeros_like(z1)
        h = self.prior(z1).to(z1.dtype)  # (B, C, H, W): mu and log sigma interleaved
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x):
        z1, z2 = x.chunk(2, 1)  # (B, C/2, H, W) each: z1 goes on, z2 is scored here
        return z1, z2, log_normal(z2, *self.prior_params(z1))

    def inverse(self, z1, z2=None, temperature=1.0, generator=None):
        if z2 is None:  # draw from the prior at temperature T
            mu, logs = self.prior_params(z1)
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z2 = mu + temperature * logs.exp() * eps
        return torch.cat([z1, z2], 1)


class Flow(nn.Module):
    """A multi-scale flow (RealNVP Sec. 3.6, Glow Fig. 2b): L levels, each a Chain of bijections,
    after all but the last a Split; the last level's output is scored by the top prior.
    glow level: squeeze, then K x (ActNorm, InvConv2d, AffineCoupling).
    realnvp level: K checkerboard couplings, squeeze, K channel couplings; last: K+1 checker."""

    def __init__(self, in_ch, size, levels=2, depth=32, width=512, arch="glow", lu=False):
        super().__init__()
        C, S, glow = in_ch, size, arch == "glow"
        self.levels, self.splits = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            last = i == levels - 1
            if glow:
                C, S = C * 4, S // 2
                layers = [Squeeze()]
                for _ in range(depth):
                    layers += [ActNorm(C), InvConv2d(C, lu), AffineCoupling(C, width)]
            else:
                layers = []
                for j in range(depth + last):
                    layers.append(AffineCoupling(C, width, "checker", j % 2, "realnvp"))
                if not last:
                    C, S = C * 4, S // 2
                    layers.append(Squeeze())
                    for j in range(depth):
                        layers.append(AffineCoupling(C, width, "channel", j % 2, "realnvp"))
            self.levels.append(Chain(layers))
            if not last:
                self.splits.append(Split(C, learned=glow))
                C //= 2
        # top prior: Glow's learntop, a learned (mu, log sigma) per variable; RealNVP: N(0, I)
        self.top = nn.Parameter(torch.zeros(1, 2 * C, S, S), requires_grad=glow)

    def forward(self, x):
        """x -> (zs, log|det dz/dx|, log p(z)): log p(x) = log p(z) + log|det| (Glow Eq. 2)."""
        logdet, logpz, zs = x.new_zeros(len(x)), x.new_zeros(len(x)), []
        for i, level in enumerate(self.levels):
            x, ld = level(x)  # each level halves H and W and quadruples C (its squeeze)
            logdet = logdet + ld
            if i < len(self.splits):  # half the channels leave here, scored by their prior
                x, z, lp = self.splits[i](x)
                zs.append(z)
                logpz = logpz + lp
        zs.append(x)  # what reaches the top, scored by the top prior
        return zs, logdet, logpz + log_normal(x, *self.top_params(x.dtype))

    def top_params(self, dtype=torch.float32):
        return self.top[:, 0::2].to(dtype), self.top[:, 1::2].to(dtype)

    def inverse(self, zs=None, n=1, temperature=1.0, generator=None):
        """z -> x. With zs from forward this reconstructs x exactly; without, it samples, drawing
        every factored-out z from its prior at temperature T (Glow Sec. 5)."""
        if zs is None:
            mu, logs = self.top_params()
            eps = torch.randn((n, *mu.shape[1:]), generator=generator, device=mu.device)
            x = mu + temperature * logs.exp() * eps
        else:
            x = zs[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x = self.splits[i].inverse(x, zs[i] if zs else None, temperature, generator)
            x = self.levels[i].inverse(x)
        return x

    @torch.no_grad()
    def initialize(self, x):
        """ActNorm's data-dependent init: one forward pass over a batch, skipping every layer
        already initialised (a loaded checkpoint keeps its values)."""
        for m in self.modules():
            if isinstance(m, ActNorm) and not m.initialized:
                m.init_pending = True
        self(x)


# -----------------------------------------------------------------------------
# method: dequantization, pre-processing, bits/dim
def dequantize(x, n_bits: int = 8, generator=None):
    """Loader pixels in [-1, 1] (u / 127.5 - 1, u in 0..255) -> x = (u_n + v) / 2^n in [0, 1],
    u_n = floor(u / 2^(8 - n)) the n-bit value and v ~ U[0, 1)^D (uniform dequantization)."""
    u = torch.floor(((x + 1) * 127.5).round() / 2 ** (8 - n_bits))  # 0 .. 2^n - 1
    v = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u + v) / 2**n_bits


def preprocess(x01, arch: str, alpha: float = 0.05):
    """[0, 1] -> the flow's input, with log|det| of the map per image:
    glow: y = x - 1/2, log-det 0; realnvp: y = logit(p), p = alpha + (1 - 2 alpha) x, whose
    log-det is sum log((1 - 2 alpha) / (p (1 - p))) (RealNVP Sec. 4.1)."""
    if arch == "glow":
        return x01 - 0.5, x01.new_zeros(len(x01))
    p = alpha + (1 - 2 * alpha) * x01
    logdet = (math.log(1 - 2 * alpha) - p.log() - (-p).log1p()).flatten(1).sum(1)
    return p.log() - (-p).log1p(), logdet


def postprocess(y, arch: str, alpha: float = 0.05):
    """The inverse of preprocess: the flow's space -> [0, 1]."""
    return y + 0.5 if arch == "glow" else (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


def bits_per_dim(log_px: torch.Tensor, dims: int, n_bits: int) -> torch.Tensor:
    """Bits/dim of the discrete n-bit data from the density log p(x) of the dequantized x in
    [0, 1]^D. Each pixel value owns a bin of width 2^-n, so P(u) >= E_v[p(x)] 2^(-nD) (Jensen:
    the dequantization bound of Theis et al. 2016) and
        bits/dim = -(log p(x) - D n log 2) / (D log 2) = -log p(x) / (D log 2) + n."""
    return -log_px / (dims * math.log(2)) + n_bits


def nll_bits(flow, x, n_bits: int, arch: str, alpha: float, generator=None):
    """Per-image bits/dim of a loader batch in [-1, 1]: dequantize, pre-process, flow."""
    y, logdet_pre = preprocess(dequantize(x, n_bits, generator), arch, alpha)
    _, logdet, logpz = flow(y)
    return bits_per_dim(logpz + logdet + logdet_pre, x[0].numel(), n_bits)


def to_images(y, n_bits: int, arch: str, alpha: float):
    """Flow outputs -> images in [-1, 1] on the n-bit grid (each pixel's bin, as 8-bit values)."""
    x01 = postprocess(y.float(), arch, alpha).clamp(0, 1 - 1e-6)
    return torch.floor(x01 * 2**n_bits) * 2 ** (8 - n_bits) / 127.5 - 1


# -----------------------------------------------------------------------------
# training
def model_args(cfg: Config, in_ch: int, size: int) -> dict:
    """The flow's constructor arguments (saved as model_args), with --levels, --depth, --width
    resolved; an image size the squeezes cannot take is a one-line error."""
    glow = cfg.arch == "glow"
    # squeezes: as many as the size allows, up to 3 (Glow squeezes at every level, RealNVP not
    # at its last)
    squeezes = 3 if size % 8 == 0 else 2
    if cfg.levels:
        squeezes = cfg.levels - (not glow)
    if size % 2**squeezes:
        common.die(
            f"image size {size} cannot be squeezed {squeezes} times (each halves it): use "
            f"an --image-size divisible by {2**squeezes}, or fewer --levels"
        )
    if cfg.tiny:
        depth, width = (4, 32) if glow else (2, 32)
    else:
        depth, width = (32, 512) if glow else (3, 64)
    depth, width = cfg.depth or depth, cfg.width or width  # 0: the architecture's default
    levels = squeezes + (not glow)
    flow = dict(in_ch=in_ch, size=size, levels=levels, depth=depth, width=width)
    return {"flow": dict(flow, arch=cfg.arch, lu=cfg.lu)}


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.n_bits > 8:
        common.die(f"--n-bits {cfg.n_bits}: must be between 1 and 8")
    if not 0 < cfg.alpha < 0.5:
        common.die(f"--alpha {cfg.alpha}: must be in (0, 0.5)")


@torch.no_grad()
def save_pictures(model, cfg, x_test, name="samples_final.png", n=64):
    """Samples at the run's temperature (fixed noise) and a z-interpolation between test images."""
    was, out = model.training, Path(cfg.out)
    model.eval()
    img = lambda y: to_images(y, cfg.n_bits, cfg.arch, cfg.alpha)  # flow space -> [-1, 1]
    g = torch.Generator(x_test.device).manual_seed(cfg.seed)
    common.save_grid(img(model.inverse(n=n, temperature=cfg.temperature, generator=g)), out / name)
    pairs = x_test[: min(16, len(x_test)) // 2 * 2]  # even: row i joins images 2i and 2i + 1
    y = preprocess(dequantize(pairs, cfg.n_bits, g), cfg.arch, cfg.alpha)[0]
    zs = model(y)[0]  # encode: exact, so the ends of each row are the test images themselves
    w = torch.linspace(0, 1, 8, device=y.device).view(1, 8, *[1] * (y.dim() - 1))
    mix = [((1 - w) * z[0::2, None] + w * z[1::2, None]).flatten(0, 1) for z in zs]  # (64, ...)
    common.save_grid(img(model.inverse(mix)), out / "interpolation.png", nrow=8)
    model.train(was)


def train(cfg: Config):
    """Maximise log p(x) (minimise bits/dim) with Adam; returns the model."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    x_test = common.load_images(cfg, train=False)[0][:16].to(device).float() / 127.5 - 1
    args = model_args(cfg, x.shape[1], x.shape[-1])
    model = Flow(**args["flow"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("model", "opt"))
        common.load_state(model, ck["model"])
        common.load_state(opt, ck["opt"], "optimizer")
        start = ck["step"]
    else:  # ActNorm's data-dependent init, before DDP: its broadcast gives every rank rank 0's
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        idx = idx[: cfg.init_batch]  # a fixed random subset, drawn without touching the RNGs
        x_init = x[idx].to(device).float() / 127.5 - 1
        model.initialize(preprocess(dequantize(x_init, cfg.n_bits), cfg.arch, cfg.alpha)[0])
    net = common.wrap(model, cfg, device)
    warmup = max(1, min(cfg.warmup, cfg.steps // 20))
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        a = args["flow"]
        print(
            f"flow: {cfg.arch} L={a['levels']} K={a['depth']} width={a['width']}, {n:.2f}M "
            f"params, {len(x)} images {tuple(x.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * min(1.0, done / warmup)  # linear warmup, from the step alone
        for group in opt.param_groups:
            group["lr"] = lr

        # forward and backward: -log p(x) in bits/dim, averaged over the batch
        with autocast:
            loss = nll_bits(net, next(data)[0], cfg.n_bits, cfg.arch, cfg.alpha).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        # log
        loop.add(bpd=loss)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=lr)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        if loop.end_step(done, model=model, opt=opt, model_args=args):
            break

        # pictures (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                loop.aside(save_pictures, model, cfg, x_test, f"samples_{done:06d}.png")
    return model


# -----------------------------------------------------------------------------
# sampling and evaluation from a checkpoint
def load_trained(cfg: Config):
    """The flow of <out>/ckpt.pt, rebuilt from its model_args, and the checkpoint; `cfg` takes
    the run's pre-processing flags (--n-bits, --alpha, --arch)."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("model", "model_args"))
    if "flow" not in ck["model_args"]:
        common.die(f"{cfg.out}/ckpt.pt is not a flow.py checkpoint")
    for k in ("n_bits", "alpha", "arch"):
        setattr(cfg, k, ck["config"][k])
    device, _ = common.setup(cfg)
    model = Flow(**ck["model_args"]["flow"]).to(device).eval()
    common.load_state(model, ck["model"])
    return model, ck, device


@torch.no_grad()
def sample(cfg: Config):
    """--sample N: N images at --temperature into <out>/samples.npz and samples.png."""
    model, ck, device = load_trained(cfg)
    g = torch.Generator(device).manual_seed(cfg.seed)
    xs = []
    for i in range(0, cfg.sample, cfg.batch_size):
        n = min(cfg.batch_size, cfg.sample - i)
        xs.append(model.inverse(n=n, temperature=cfg.temperature, generator=g))
        print(f"sampled {i + n}/{cfg.sample}", flush=True)
    common.save_samples(cfg.out, to_images(torch.cat(xs), cfg.n_bits, cfg.arch, cfg.alpha))
    print(
        f"wrote {cfg.sample} samples (T={cfg.temperature}) to {cfg.out}/samples.npz and samples.png"
    )


@torch.no_grad()
def nll(cfg: Config):
    """--nll N: test bits/dim on the first N test images (one dequantization draw each), and
    samples at --temperature plus a z-interpolation between test images, as PNGs."""
    model, ck, device = load_trained(cfg)
    cfg = common.from_run(cfg, ck)
    cfg.image_size = ck["model_args"]["flow"]["size"]
    x = common.load_images(cfg, train=False)[0][: cfg.nll]
    x = x.to(device).float() / 127.5 - 1  # uint8 -> the loader's [-1, 1]
    g = torch.Generator(device).manual_seed(cfg.seed)
    bits = []
    for xb in x.split(cfg.batch_size):
        bits.append(nll_bits(model, xb, cfg.n_bits, cfg.arch, cfg.alpha, g).cpu())
        print(f"bits/dim of {sum(map(len, bits))}/{len(x)} images", flush=True)
    bits = torch.cat(bits)
    res = {"bpd": bits.mean().item(), "sem": (bits.std() / len(bits) ** 0.5).item()}
    res |= {"n": len(x), "n_bits": cfg.n_bits, "arch": cfg.arch, "step": ck["step"]}
    print(json.dumps(res))
    with open(Path(cfg.out) / "nll.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    save_pictures(model, cfg, x[:16], f"samples_T{cfg.temperature}.png")


if __name__ == "__main__":
    cfg = common.parse(Config, "flow")
    check_flags(cfg)
    if not (cfg.sample or cfg.nll):
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling and --nll run in one process
        if cfg.sample:
            sample(cfg)
        else:
            nll(cfg)
