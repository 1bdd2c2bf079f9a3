"""
Progressive GAN: Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability,
and Variation" (arXiv:1710.10196); StyleGAN's generator: Karras et al. 2019 (arXiv:1812.04948).

G and D start at 4x4 and grow together, one resolution at a time (Sec. 3): each new block is faded
in over --phase-kimg thousand images (G's output and D's input blend the new path with the old,
upsampled or downsampled, by alpha 0 -> 1; the reals are blended the same way), then trained for
as many images more. Most of the run is spent at low resolution, where steps are cheap. The
paper's stabilisers: equalised learning rate (weights ~ N(0, 1) scaled at run time by He's
constant, Sec. 4.1), PixelNorm in G (Sec. 4.2), minibatch standard deviation in D (Sec. 3), WGAN-GP
with a drift term (App. A.1). `--arch style` swaps in StyleGAN's generator (mapping network to w,
a learned constant, AdaIN styles, noise inputs, style mixing, truncation), `--arch style2` its
StyleGAN2 layers (weight demodulation instead of AdaIN), on ProGAN's D and schedule; `--loss
logistic` is StyleGAN's loss (non-saturating, lazy R1). G's output is linear; images in [-1, 1];
samples come from an EMA of G with a half-life of 10k images (--ema-kimg, NVlabs').

  python progan.py --tiny --dataset mnist-12k                # MNIST padded to 32x32, CPU-sized
  python progan.py --tiny --arch style2 --loss logistic --dataset mnist-12k  # docs/progan.md
  python progan.py --dataset folder:ffhq --image-size 256 --phase-kimg 600 \\
      --batch-sizes 4:128,8:128,16:128,32:64,64:32,128:16,256:8   # the paper's 1-GPU schedule
  python progan.py --sample 2500                             # EMA G at the resolution reached
"""

import dataclasses
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
    image_size: int = 32  # final resolution: a power of two >= 8 (MNIST's 28 padded to 32)
    steps: int = 0  # 0: until the final resolution's stable phase ends
    batch_size: int = 16  # for each resolution --batch-sizes leaves out
    batch_sizes: str = "4:64,8:64,16:32,32:32"  # per resolution, res:batch (paper: 4:128 ... 512:4)
    phase_kimg: float = 40.0  # thousands of images per fade and per stable phase (paper: 600)
    lr: float = 1e-3  # Adam, G and D (Sec. A.1)
    beta1: float = 0.0  # Adam (Sec. A.1)
    beta2: float = 0.99  # Adam (Sec. A.1)
    loss: str = "wgan-gp"  # wgan-gp (ProGAN) | logistic (StyleGAN: non-saturating, R1 on reals)
    lambda_gp: float = 10.0  # wgan-gp: the gradient penalty's weight
    eps_drift: float = 0.001  # wgan-gp: drift term eps E[D(x)^2] (App. A.1)
    r1_gamma: float = 10.0  # logistic: R1's gamma (StyleGAN's FFHQ configuration)
    r1_every: int = 16  # logistic: R1 on every N-th D step, weighted N times (StyleGAN2's lazy R1)
    ema_kimg: float = 10.0  # G's EMA half-life in thousands of images (NVlabs' G_smoothing_kimg)
    arch: str = "pro"  # pro (ProGAN's G) | style (StyleGAN's) | style2 (StyleGAN2's demodulation)
    z_dim: int = 512  # latent size (and w's, for style); --tiny: 128
    fmap_base: int = 8192  # channels at resolution r: min(2 fmap_base / r, fmap_max); --tiny: 256
    fmap_max: int = 512  # --tiny: 64 (64, 64, 32, 16 channels at 4, 8, 16, 32 px)
    mbstd_group: int = 4  # minibatch stddev group size (Sec. 3)
    mixing: float = 0.9  # style: style mixing probability (StyleGAN Sec. 3.1)
    map_layers: int = 8  # style: depth of the mapping network z -> w
    map_lr: float = 0.01  # style: the mapping network's learning-rate multiplier
    psi: float = 1.0  # style, --sample: truncation toward the mean w (1: none)
    noise: bool = True  # style: per-pixel noise inputs (Sec. 3.2); --no-noise: scales frozen at 0
    at_least = dict(z_dim=1, fmap_max=1, mbstd_group=1, mixing=0, ema_kimg=0, map_layers=1)
    at_least |= dict(map_lr=1e-6, r1_gamma=0, r1_every=1)
    choices = dict(arch=("pro", "style", "style2"), loss=("wgan-gp", "logistic"))


# -----------------------------------------------------------------------------
# model: the paper's layers (Sec. 4, Table 2)
SQRT2 = math.sqrt(2)  # He's gain for (leaky) ReLU layers


class EqualizedLinear(nn.Module):
    """y = x (c w)^T + lr_mul b, w stored ~ N(0, 1 / lr_mul^2), c = lr_mul gain / sqrt(fan_in)
    applied at run time (Sec. 4.1): every weight has the same dynamic range, so Adam's normalised
    steps move all layers at the same rate; lr_mul < 1 slows a layer down (StyleGAN's mapping)."""

    def __init__(self, fan_in: int, fan_out: int, gain=SQRT2, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(fan_out))
        self.c, self.lr_mul = lr_mul * gain / math.sqrt(fan_in), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.c, self.bias * self.lr_mul)


class EqualizedConv2d(nn.Module):
    """A k x k convolution (stride 1, same padding) with the equalised learning rate."""

    def __init__(self, cin: int, cout: int, k: int, gain=SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))  # N(0, 1), scaled at run time
        self.bias = nn.Parameter(torch.zeros(cout))
        self.c = gain / math.sqrt(cin * k * k)  # He's constant: fan_in = cin k^2

    def forward(self, x):
        return F.conv2d(x, self.weight * self.c, self.bias, padding=self.weight.shape[-1] // 2)


def pixel_norm(x, eps=1e-8):
    """Sec. 4.2: each pixel's feature vector to unit mean square: a / sqrt(mean_j a_j^2 + eps)."""
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)


lrelu = lambda x: F.leaky_relu(x, 0.2)  # the paper's slope


def minibatch_stddev(x, group=4):
    """Sec. 3: one feature map more, the standard deviation of each feature at each pixel over a
    group of samples (biased: the mean square deviation), averaged over features and pixels. Sample
    b = g M + m belongs to group m, as the paper's code reshapes; the batch divides by the group."""
    B, C, H, W = x.shape
    g = min(group, B)
    y = x.to(torch.promote_types(x.dtype, torch.float32)).view(g, -1, C, H, W)  # (g, M, C, H, W)
    y = (y - y.mean(0)).pow(2).mean(0)  # (M, C, H, W): biased variance within each group
    y = (y + 1e-8).sqrt().mean((1, 2, 3))  # (M,): averaged over features and pixels
    y = y.to(x.dtype).view(-1, 1, 1, 1).repeat(g, 1, H, W)  # (B, 1, H, W): sample g M + m gets y[m]
    return torch.cat([x, y], 1)


# channels at resolution r, as the paper's code: fmap_base / 2^(log2 r - 1), at most fmap_max
channels = lambda r, fmap_base, fmap_max: min(2 * fmap_base // r, fmap_max)
resolutions = lambda size: [4 << i for i in range(int(math.log2(size)) - 1)]  # 4, 8, ..., size
upsample = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")


class GBlock(nn.Module):
    """Upsample x2 (nearest), [conv3x3, LReLU, PixelNorm] twice (Table 2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = EqualizedConv2d(cin, cout, 3), EqualizedConv2d(cout, cout, 3)

    def forward(self, h):
        h = pixel_norm(lrelu(self.conv1(upsample(h))))
        return pixel_norm(lrelu(self.conv2(h)))


class Generator(nn.Module):
    """ProGAN's G: z (B, z_dim) -> images (B, img_ch, res, res) at any resolution reached so far,
    the newest block faded in (Fig. 2): alpha toRGB(new) + (1 - alpha) upsample(toRGB(old))."""

    def __init__(self, z_dim=512, size=32, img_ch=3, fmap_base=8192, fmap_max=512):
        super().__init__()
        res = resolutions(size)
        c = [channels(r, fmap_base, fmap_max) for r in res]
        # "conv 4x4" on the 1x1 latent, as a dense layer; gain sqrt(2)/4 as the paper's code
        self.dense = EqualizedLinear(z_dim, c[0] * 16, gain=math.sqrt(2) / 4)
        self.conv = EqualizedConv2d(c[0], c[0], 3)
        self.blocks = nn.ModuleList([GBlock(a, b) for a, b in zip(c, c[1:])])  # 8, ..., size
        self.to_rgb = nn.ModuleList([EqualizedConv2d(ch, img_ch, 1, gain=1) for ch in c])

    def forward(self, z, res: int, alpha=1.0):
        h = self.dense(pixel_norm(z)).view(len(z), -1, 4, 4)  # (B, c, 4, 4)
        h = pixel_norm(lrelu(self.conv(pixel_norm(lrelu(h)))))
        return grow(h, self.blocks, self.to_rgb, res, alpha)


def grow(h, blocks, to_rgb, res: int, alpha: float, *extra):
    """G's blocks from 4x4 up to `res` (each block called on h and `extra`), then toRGB, the
    newest block faded in: lerp(upsample(toRGB_old(h_old)), toRGB_new(h), alpha)."""
    k = int(math.log2(res)) - 2  # blocks in use
    old = None
    for i in range(k):
        if i == k - 1 and alpha < 1:
            old = upsample(to_rgb[i](h))  # the previous resolution's image, upsampled
        h = blocks[i](h, *extra)
    y = to_rgb[k](h)
    return y if old is None else old + alpha * (y - old)  # alpha 0: exactly the old path


class Discriminator(nn.Module):
    """x (B, img_ch, res, res) -> critic scores (B,): fromRGB at res, blocks [conv3x3, LReLU,
    conv3x3, LReLU, avgpool] down to 4x4 (the newest faded in by alpha against fromRGB of the
    downsampled input), minibatch stddev, conv3x3, dense, dense (Table 2)."""

    def __init__(self, size=32, img_ch=3, fmap_base=8192, fmap_max=512, group=4):
        super().__init__()
        c = [channels(r, fmap_base, fmap_max) for r in resolutions(size)]
        self.from_rgb = nn.ModuleList([EqualizedConv2d(img_ch, ch, 1) for ch in c])
        self.blocks = nn.ModuleList(  # blocks[i]: resolution 8 << i down to 4 << i
            nn.Sequential(
                EqualizedConv2d(b, b, 3), nn.LeakyReLU(0.2),
                EqualizedConv2d(b, a, 3), nn.LeakyReLU(0.2), nn.AvgPool2d(2),
            ) for a, b in zip(c, c[1:])
        )  # fmt: skip
        self.conv = EqualizedConv2d(c[0] + 1, c[0], 3)  # + 1: the stddev map
        self.dense1, self.dense2 = EqualizedLinear(c[0] * 16, c[0]), EqualizedLinear(c[0], 1, 1)
        self.group = group

    def forward(self, x, alpha=1.0):
        k = int(math.log2(x.shape[-1])) - 2
        h = lrelu(self.from_rgb[k](x))
        if k > 0:
            h = self.blocks[k - 1](h)  # (B, c, res/2, res/2)
            if alpha < 1:  # the old path: the input downsampled into the previous fromRGB
                old = lrelu(self.from_rgb[k - 1](F.avg_pool2d(x, 2)))
                h = old + alpha * (h - old)
            for block in reversed(self.blocks[: k - 1]):
                h = block(h)
        h = lrelu(self.conv(minibatch_stddev(h, self.group)))  # (B, c, 4, 4)
        return self.dense2(lrelu(self.dense1(h.flatten(1)))).squeeze(1)


# --- StyleGAN's generator (Karras et al. 2019, Fig. 1b)
def blur(x):
    """The [1, 2, 1] binomial filter after each upsampling (StyleGAN Sec. 2: bilinear sampling)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)  # (C, 1, 3, 3): per channel
    return F.conv2d(x, k, padding=1, groups=x.shape[1])


class StyleLayer(nn.Module):
    """StyleGAN: [upsample, blur,] conv3x3 (none on the constant), + per-pixel noise times learned
    per-channel scales (B in Fig. 1b, zero at init), LReLU, AdaIN: instance norm, x y_s + y_b, (y_s,
    y_b) an affine map of w (A in Fig. 1b, y_s biased to 1): every channel's mean becomes y_b.
    demod, StyleGAN2 (Sec. 2.2): the conv's weights modulated by s(w), w' = s_i w_ijk (Eq. 1), and
    demodulated to unit norm per output channel (Eq. 3); noise, bias, LReLU times sqrt(2)."""

    def __init__(self, cin: int, cout: int, w_dim: int, up=False, conv=True, demod=False):
        super().__init__()
        self.up, self.conv = up, EqualizedConv2d(cin, cout, 3) if conv or demod else None
        self.noise_scale = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.demod = demod
        self.style = EqualizedLinear(w_dim, cin if demod else 2 * cout, gain=1)
        with torch.no_grad():
            self.style.bias[: cin if demod else cout] = 1  # s, y_s start at 1

    def forward(self, x, w, noise=None):
        if self.up:
            x = blur(upsample(x))
        if self.demod:  # per-sample weights (B, cout, cin, 3, 3), as one grouped convolution
            B, cin, H, W = x.shape
            wt = demodulate(self.conv.weight * self.conv.c, self.style(w))
            x = F.conv2d(x.reshape(1, B * cin, H, W), wt.flatten(0, 1), padding=1, groups=B)
            x = x.view(B, -1, H, W) + self.conv.bias[:, None, None]  # (B, cout, H, W)
        elif self.conv is not None:
            x = self.conv(x)
        if noise is None:
            noise = torch.randn(len(x), 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        x = lrelu(x + self.noise_scale * noise)  # (B, C, H, W) + (1, C, 1, 1) (B, 1, H, W)
        if self.demod:  # StyleGAN2's bias_act gain: demodulation took He's sqrt(2) out of the conv
            return x * SQRT2
        ys, yb = self.style(w)[:, :, None, None].chunk(2, 1)  # (B, C, 1, 1) each
        return F.instance_norm(x.float(), eps=1e-8).to(x.dtype) * ys + yb


def demodulate(weight, s):
    """Weights (cout, cin, k, k) modulated by styles s (B, cin), w' = s_i w_ijk (StyleGAN2 Eq. 1),
    then scaled to unit L2 norm per sample and output channel (Eq. 3): (B, cout, cin, k, k)."""
    wt = weight[None] * s[:, None, :, None, None]
    return wt * torch.rsqrt(wt.float().pow(2).sum((2, 3, 4), keepdim=True) + 1e-8).to(wt.dtype)


def ema_decay(batch: int, ema_kimg: float) -> float:
    """The EMA's decay for one batch: 0.5 per ema_kimg thousand images, whatever the batch."""
    return 0.5 ** (batch / (1000 * ema_kimg)) if ema_kimg > 0 else 0.0


class StyleBlock(nn.Module):
    """The two StyleLayers of resolution 4 << i, styled by ws[2 i], ws[2 i + 1] (noise alike)."""

    def __init__(self, cin: int, cout: int, w_dim: int, i: int, demod=False):
        super().__init__()
        self.l1 = StyleLayer(cin, cout, w_dim, up=i > 0, conv=i > 0, demod=demod)  # 4x4: const
        self.l2 = StyleLayer(cout, cout, w_dim, demod=demod)
        self.i = i

    def forward(self, x, ws, noise=None):
        n1, n2 = (None, None) if noise is None else noise[2 * self.i : 2 * self.i + 2]
        return self.l2(self.l1(x, ws[2 * self.i], n1), ws[2 * self.i + 1], n2)


class StyleGenerator(nn.Module):
    """StyleGAN's G on ProGAN's schedule: z -> n_mlp-layer mapping MLP (learning rate x map_lr)
    -> w; a learned 4x4 constant; two StyleLayers per resolution, each styled by its own w (style
    mixing: layers from a random cutoff on take w2); truncation w_avg + psi (w - w_avg) on every
    layer at sampling; the same toRGB and fade-in as ProGAN. demod: StyleGAN2's layers."""

    def __init__(self, z_dim=512, size=32, img_ch=3, fmap_base=8192, fmap_max=512, n_mlp=8,
                 map_lr=0.01, demod=False, noise=True):  # fmt: skip
        super().__init__()
        c = [channels(r, fmap_base, fmap_max) for r in resolutions(size)]
        mlp = [EqualizedLinear(z_dim, z_dim, lr_mul=map_lr) for _ in range(n_mlp)]  # w_dim = z_dim
        self.mapping = nn.ModuleList(mlp)
        self.const = nn.Parameter(torch.ones(1, c[0], 4, 4))
        self.first = StyleBlock(c[0], c[0], z_dim, 0, demod)
        self.blocks = nn.ModuleList(
            [StyleBlock(a, b, z_dim, i + 1, demod) for i, (a, b) in enumerate(zip(c, c[1:]))]
        )
        self.to_rgb = nn.ModuleList([EqualizedConv2d(ch, img_ch, 1, gain=1) for ch in c])
        self.register_buffer("w_avg", torch.zeros(z_dim))  # tracked mean of w, for truncation
        for m in (m for m in self.modules() if isinstance(m, StyleLayer)):  # noise False: the
            m.noise_scale.requires_grad_(noise)  # scales stay at their initial zero

    def map(self, z):
        w = pixel_norm(z)
        for layer in self.mapping:
            w = lrelu(layer(w))
        return w  # (B, w_dim)

    def forward(self, z, res: int, alpha=1.0, psi=1.0, z2=None, cutoff=0, noise=None):
        w = self.map(z)
        if self.training:  # StyleGAN's code: w_avg <- lerp(w_avg, mean w, 1 - 0.995)
            with torch.no_grad():
                self.w_avg.lerp_(w.detach().float().mean(0), 0.005)
        n = 2 * (int(math.log2(res)) - 1)  # layers in use: two per resolution
        ws = [w] * n
        if z2 is not None:  # style mixing: layers cutoff, ..., n - 1 take the second w
            ws = ws[:cutoff] + [self.map(z2)] * (n - cutoff)
        return self.synthesis([self.truncate(v, psi) for v in ws], res, alpha, noise)

    def truncate(self, w, psi=1.0):
        """The truncation trick in W (StyleGAN Sec. 4.1): w_avg + psi (w - w_avg)."""
        return w if psi == 1 else self.w_avg + psi * (w - self.w_avg)

    def synthesis(self, ws: list, res: int, alpha=1.0, noise=None):
        """One w (B, w_dim) per layer in use -> images (B, img_ch, res, res); noise: one (B, 1,
        r, r) map per layer (None: drawn afresh)."""
        h = self.first(self.const.expand(len(ws[0]), -1, -1, -1), ws, noise)  # (B, c, 4, 4)
        return grow(h, self.blocks, self.to_rgb, res, alpha, ws, noise)

    @staticmethod
    def noise(n: int, res: int, generator=None, device=None) -> list:
        """The noise inputs of n samples at resolution res: (n, 1, r, r) per layer, 2 per r."""
        rs = [r for r in resolutions(res) for _ in range(2)]
        return [torch.randn(n, 1, r, r, generator=generator, device=device) for r in rs]


# -----------------------------------------------------------------------------
# method: the schedule, the losses
def phase(nimg: int, size: int, phase_kimg: float, batches: dict, batch=16, lr=1e-3):
    """The growth schedule as a pure function of the images shown: 4x4 stable for phase_kimg
    thousand images, then for each next resolution a fade (alpha 0 -> 1) and a stable phase of as
    many images; the final resolution stays stable. Returns (resolution, alpha, batch, lr)."""
    n = max(1, round(phase_kimg * 1000))
    i, grows = nimg // n, int(math.log2(size)) - 2  # phase index; resolutions added
    k = min((i + 1) // 2, grows)  # i = 2k - 1: fading into 4 * 2^k; i = 2k: stable there
    alpha = (nimg - i * n) / n if i % 2 == 1 and i < 2 * grows else 1.0
    res = 4 << k
    return res, alpha, batches.get(res, batch), lr


def phase_index(nimg: int, size: int, phase_kimg: float) -> int:
    """0: 4x4 stable, then 2k - 1 fading into and 2k stable at 4 * 2^k; the last stays."""
    return min(nimg // max(1, round(phase_kimg * 1000)), 2 * int(math.log2(size)) - 4)


def total_steps(size: int, phase_kimg: float, batches: dict, batch: int) -> int:
    """Steps until the final resolution's stable phase ends (the default --steps)."""
    end, nimg, steps = (2 * int(math.log2(size)) - 3) * max(1, round(phase_kimg * 1000)), 0, 0
    while nimg < end:
        nimg += phase(nimg, size, phase_kimg, batches, batch)[2]
        steps += 1
    return steps


def blend_reals(x, alpha: float):
    """During a fade the reals are blended like G's output (the paper's code): lerp from the
    2x2-averaged, nearest-upsampled image to the image itself by alpha."""
    if alpha >= 1:
        return x
    low = upsample(F.avg_pool2d(x, 2))
    return low + alpha * (x - low)


def gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al. 2017): E[(|grad_x_hat D(x_hat)|_2 - 1)^2] on x_hat uniformly
    between a real and a fake image."""
    a = torch.rand(len(real), 1, 1, 1, device=real.device)  # (B, 1, 1, 1): one per pair
    x_hat = (a * real + (1 - a) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def d_step(D, opt_d, real, fake, alpha, lambda_gp=10.0, eps_drift=1e-3):
    """L_D = E D(G(z)) - E D(x) + lambda_gp GP + eps_drift E D(x)^2 (App. A.1: the drift term
    keeps the critic's scores near 0)."""
    real_s, fake_s = D(real, alpha).float(), D(fake.detach(), alpha).float()
    gp = gradient_penalty(lambda v: D(v, alpha), real, fake)
    drift = real_s.pow(2).mean()
    w_dist = real_s.mean() - fake_s.mean()  # the critic's Wasserstein estimate
    loss = -w_dist + lambda_gp * gp + eps_drift * drift
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return dict(w_dist=w_dist.detach(), gp=gp.detach(), drift=drift.detach())


def r1_penalty(real_s, real):
    """R1 (Mescheder et al. 2018, Eq. 9 without gamma / 2): E |grad_x D(x)|^2 on the reals."""
    (grad,) = torch.autograd.grad(real_s.sum(), real, create_graph=True)
    return grad.float().flatten(1).pow(2).sum(1).mean()


def d_step_logistic(D, opt_d, real, fake, alpha, gamma=0.0):
    """StyleGAN's D loss: softplus(D(G(z))) + softplus(-D(x)) (Goodfellow et al.'s, on logits),
    + gamma / 2 R1 (gamma 0: none this step; lazy R1 passes gamma times its interval)."""
    real = real.detach().requires_grad_(gamma > 0)
    real_s, fake_s = D(real, alpha).float(), D(fake.detach(), alpha).float()
    loss = F.softplus(fake_s).mean() + F.softplus(-real_s).mean()
    r1 = r1_penalty(real_s, real) if gamma > 0 else torch.zeros((), device=real.device)
    opt_d.zero_grad(set_to_none=True)
    (loss + gamma / 2 * r1).backward()
    opt_d.step()
    return dict(loss_d=loss.detach(), r1=r1.detach())


def g_step(D, opt_g, fake, alpha, loss="wgan-gp"):
    """L_G = -E D(G(z)) (wgan-gp) or E softplus(-D(G(z))) (logistic), through D frozen (no
    weight gradients for it)."""
    D.requires_grad_(False)
    score = D(fake, alpha).float()
    loss = F.softplus(-score).mean() if loss == "logistic" else -score.mean()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return dict(loss_g=loss.detach())


def slerp(a, b, t):
    """Spherical interpolation between latents a and b (B, D) at t (T,): (B, T, D)."""
    a_, b_ = F.normalize(a, dim=1), F.normalize(b, dim=1)
    omega = torch.acos((a_ * b_).sum(1).clamp(-1, 1))[:, None, None]  # (B, 1, 1)
    t = t[None, :, None]
    so = torch.sin(omega).clamp_min(1e-6)
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / so


# -----------------------------------------------------------------------------
# data and flags
def load_data(cfg: Config, train=True):
    """uint8 (N, C, S, S) at the final size: MNIST / Fashion padded 28 -> 32 (then resized to
    S), anything else loaded at S. Returns (images, labels, pixels of padding at size S)."""
    if cfg.dataset not in common.DIGITS:
        x, y = common.load_images(cfg, train)
        return x, y, 0
    x, y = common.load_images(cfg, train, size=28)
    x = F.pad(x, (2, 2, 2, 2))  # (N, 1, 32, 32): black border
    if cfg.image_size != 32:
        x = F.interpolate(x.float(), size=cfg.image_size, mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x, y, 2 * cfg.image_size // 32


def parse_batches(spec: str) -> dict:
    """ "4:128,8:64" -> {4: 128, 8: 64}; anything malformed is a one-line error."""
    try:
        pairs = [item.split(":") for item in spec.split(",") if item.strip()]
        out = {int(r): int(b) for r, b in pairs}
        assert all(r >= 4 and r & (r - 1) == 0 and b > 0 for r, b in out.items())
        return out
    except (ValueError, AssertionError):
        common.die(f"--batch-sizes {spec!r}: want res:batch,... with powers of two >= 4, e.g. 4:64")


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    s = cfg.image_size
    if s < 8 or s & (s - 1):
        common.die(f"--image-size {s}: a power of two, at least 8")
    if cfg.psi != 1 and cfg.arch == "pro" and not cfg.sample:
        common.die("--psi is StyleGAN's truncation: it needs --arch style")
    if cfg.phase_kimg <= 0 or cfg.mixing > 1:
        common.die("--phase-kimg > 0 and --mixing in [0, 1], please")
    for b in {cfg.batch_size, *parse_batches(cfg.batch_sizes).values()}:
        per_rank = b // common.world()
        if b % common.world() or per_rank % min(cfg.mbstd_group, per_rank):
            common.die(f"batch {b}: must split over the ranks into multiples of --mbstd-group")


def model_args(cfg: Config, ch: int) -> dict:
    """G's and D's constructor arguments (saved as model_args)."""
    z, fbase, fmax = (128, 256, 64) if cfg.tiny else (cfg.z_dim, cfg.fmap_base, cfg.fmap_max)
    net = dict(size=cfg.image_size, img_ch=ch, fmap_base=fbase, fmap_max=fmax)
    style = dict(n_mlp=cfg.map_layers, map_lr=cfg.map_lr, demod=cfg.arch == "style2")
    G = dict(net, z_dim=z, **(dict(style, noise=cfg.noise) if cfg.arch != "pro" else {}))
    return {"G": G, "D": dict(net, group=cfg.mbstd_group)}


build_g = lambda arch, args: (Generator if arch == "pro" else StyleGenerator)(**args)


# -----------------------------------------------------------------------------
# training
def train(cfg: Config):
    """One D step and one G step per batch, on the schedule phase(nimg); Adam's moments restart
    at each fade and each stable phase (the paper's code); returns (G, D, EMA)."""
    check_flags(cfg)
    device, autocast = common.setup(cfg)
    x, _, pad = load_data(cfg, train=True)
    args, batches = model_args(cfg, x.shape[1]), parse_batches(cfg.batch_sizes)
    G, D = build_g(cfg.arch, args["G"]).to(device), Discriminator(**args["D"]).to(device)
    kw = dict(betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device.type == "cuda")
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), cfg.lr, **kw) for m in (G, D))
    ema = common.EMA(G)  # its decay follows the batch: a half-life of --ema-kimg images
    if max(cfg.batch_size, *batches.values()) > len(x):
        common.die(f"a batch size is larger than the {len(x)} training images")
    data = common.Batches(x, torch.zeros(len(x)), cfg.batch_size, cfg.seed, device)
    sched = lambda n: phase(n, cfg.image_size, cfg.phase_kimg, batches, cfg.batch_size, cfg.lr)
    cfg.steps = cfg.steps or total_steps(cfg.image_size, cfg.phase_kimg, batches, cfg.batch_size)
    start, nimg, opt_res, opt_phase = 0, 0, 4, 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("G", "D", "opt_g", "opt_d", "ema", "nimg", "arch"))
        now, old = dict(args["G"], arch=cfg.arch), ck.get("model_args", args)["G"]
        if (was := dict(now, **old, arch=ck["arch"])) != now:  # keys old lacks: taken as now's
            diff = ", ".join(f"{k} {v}" for k, v in was.items() if v != now[k])
            common.die(f"{cfg.out}/ckpt.pt was trained with {diff}: resume with its G flags")
        for k, m in dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=ema.module).items():
            common.load_state(m, ck[k], k)
        start, nimg, opt_res, opt_phase = ck["step"], ck["nimg"], ck["opt_res"], ck["opt_phase"]
    G_, D_ = (common.wrap(m, cfg, device, find_unused_parameters=True) for m in (G, D))
    z_fixed = torch.randn(64, args["G"]["z_dim"], generator=torch.Generator().manual_seed(cfg.seed))
    z_fixed = z_fixed.to(device)  # the fixed noise of every sample grid
    loop = common.Loop(cfg, data, start, images=nimg)
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D)]
        print(f"progan: {cfg.arch} G {n[0]:.2f}M + D {n[1]:.2f}M params, {tuple(x.shape)} images")
    for step in range(start, cfg.steps):
        done = step + 1
        res, alpha, batch, lr = sched(nimg)
        ph = phase_index(nimg, cfg.image_size, cfg.phase_kimg)
        if ph != opt_phase:  # a fade or a stable phase begins: Adam starts afresh (paper's code)
            if res != opt_res and common.rank() == 0 and cfg.sample_every:
                last = grid_path(cfg, opt_res, nimg)  # the finished resolution's last picture
                loop.aside(save_grid, ema.module, z_fixed, opt_res, 1.0, last)
            opt_g.state.clear()
            opt_d.state.clear()
            opt_res, opt_phase = res, ph
        for g in [*opt_g.param_groups, *opt_d.param_groups]:
            g["lr"] = lr
        data.B = batch  # the global batch of this resolution, sharded over ranks by Batches
        real = next(data)[0]
        if res < cfg.image_size:  # the reals at this resolution: box-filtered, as the paper's code
            real = F.avg_pool2d(real, cfg.image_size // res)
        real = blend_reals(real, alpha)
        z = torch.randn(len(real), args["G"]["z_dim"], device=device)
        extra = {}
        if cfg.arch != "pro" and torch.rand(()) < cfg.mixing:  # style mixing, one cutoff a batch
            n_layers = 2 * (int(math.log2(res)) - 1)
            extra = dict(z2=torch.randn_like(z), cutoff=int(torch.randint(1, n_layers, ())))
        with autocast:  # the fakes of this step, with G's graph for the G step
            fake = G_(z, res, alpha, **extra)

        # D step: WGAN-GP critic with the drift term, or logistic with lazy R1
        with autocast:
            if cfg.loss == "logistic":  # R1 every r1_every steps, weighted as many times
                gamma = cfg.r1_gamma * cfg.r1_every if step % cfg.r1_every == 0 else 0.0
                stats = d_step_logistic(D_, opt_d, real, fake, alpha, gamma)
            else:
                stats = d_step(D_, opt_d, real, fake, alpha, cfg.lambda_gp, cfg.eps_drift)

        # G step: the same fakes, through the updated D
        with autocast:
            stats |= g_step(D, opt_g, fake, alpha, cfg.loss)  # D unwrapped: G's gradient only
        ema.update(G, step, ema_decay(batch, cfg.ema_kimg))
        nimg += batch

        # log
        loop.add(**stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, images=nimg, res=res, alpha=round(alpha, 4), kimg=nimg / 1000)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=ema.module, model_args=args)
        extra = dict(nimg=nimg, opt_res=opt_res, opt_phase=opt_phase, arch=cfg.arch, pad=pad)
        if loop.end_step(done, **state, **extra):
            break

        # sample a fixed-noise grid from the EMA G at this resolution and alpha
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                loop.aside(save_grid, ema.module, z_fixed, res, alpha, grid_path(cfg, res, nimg))
    return G, D, ema


grid_path = lambda cfg, res, nimg: Path(cfg.out) / f"samples_res{res}_{nimg:09d}.png"


# -----------------------------------------------------------------------------
# sampling
@torch.no_grad()
def generate(G, z, res: int, alpha=1.0, psi=1.0, batch=500, noise=None):
    """Images from G in eval mode, in batches, clamped to [-1, 1] (G's output is linear);
    StyleGAN's noise inputs: `noise` (one map per layer for all of z), else drawn afresh."""
    style, was, xs = isinstance(G, StyleGenerator), G.training, []
    G.eval()
    for i in range(0, len(z), batch):
        maps = None if noise is None else [n[i : i + batch] for n in noise]
        kw = dict(psi=psi, noise=maps) if style else {}
        xs.append(G(z[i : i + batch], res, alpha, **kw).float())
    G.train(was)
    return torch.cat(xs).clamp(-1, 1)


def save_grid(G, z, res, alpha, path):
    common.save_grid(generate(G, z, res, alpha), path)


def load_trained(cfg: Config):
    """The EMA G of <out>/ckpt.pt, rebuilt from model_args, with its resolution and alpha."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("ema", "model_args", "nimg", "arch"))
    device, _ = common.setup(cfg)
    G = build_g(ck["arch"], ck["model_args"]["G"]).to(device)
    common.load_state(G, ck["ema"], "EMA generator")
    c, batches = ck["config"], parse_batches(ck["config"]["batch_sizes"])
    res, alpha, _, _ = phase(ck["nimg"], c["image_size"], c["phase_kimg"], batches, c["batch_size"])
    return G, ck, res, alpha, device


def sample(cfg: Config):
    """--sample N: N images from the EMA G into <out>/samples.npz and samples.png (MNIST's padding
    cropped away, so evaluate.py sees 28x28 digits), and interp.png: 8 interpolations (slerp in z
    for ProGAN, lerp in w for StyleGAN)."""
    G, ck, res, alpha, device = load_trained(cfg)
    if cfg.psi != 1 and ck["arch"] == "pro":
        common.die("--psi is StyleGAN's truncation: this checkpoint is --arch pro")
    g = torch.Generator(device).manual_seed(cfg.seed)  # z and noise per sample: any batch size
    z = torch.randn(cfg.sample, ck["model_args"]["G"]["z_dim"], device=device, generator=g)
    style = isinstance(G, StyleGenerator)
    noise = G.noise(cfg.sample, res, g, device) if style else None
    x = generate(G, z, res, alpha, cfg.psi, cfg.batch_size, noise)
    crop = ck["pad"] * res // ck["config"]["image_size"]
    common.save_samples(cfg.out, x[..., crop : res - crop, crop : res - crop])
    a, b = torch.randn(2, 8, z.shape[1], device=device, generator=g)
    t = torch.linspace(0, 1, 10, device=device)
    if style:  # lerp in w: the space the styles are read from; one noise along each row
        with torch.no_grad():
            wa, wb = G.map(a), G.map(b)
            w = (wa[:, None] + t[None, :, None] * (wb - wa)[:, None]).flatten(0, 1)  # (80, w_dim)
            n = 2 * (int(math.log2(res)) - 1)  # the same w on every layer
            noise = [v.repeat_interleave(10, 0) for v in G.noise(8, res, g, device)]
            frames = G.synthesis([G.truncate(w, cfg.psi)] * n, res, alpha, noise)
    else:
        frames = generate(G, slerp(a, b, t).flatten(0, 1), res, alpha)
    common.save_grid(frames.float().clamp(-1, 1), Path(cfg.out) / "interp.png", nrow=10)
    side = res - 2 * crop  # MNIST's padding cropped away
    print(f"wrote {cfg.sample} samples, {side}x{side} from G at {res} px (alpha {alpha:.3f})")


if __name__ == "__main__":
    cfg = common.parse(Config, "progan")
    check_flags(cfg)
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
