"""
GAN: Goodfellow et al. 2014 (arXiv:1406.2661); DCGAN: Radford et al. 2016 (arXiv:1511.06434).

A generator G maps noise z ~ N(0, I) to images and a discriminator D tells them from real ones;
they play min_G max_D V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))] (Eq. 1), one D step then one
G step per minibatch (Alg. 1 with k = 1). G is trained on the non-saturating loss -log D(G(z))
(Sec. 3) unless `--loss minimax` asks for Eq. 1 itself; `--loss hinge` is the modern alternative.
DCGAN fixes the networks: strided (transposed) convolutions instead of pooling, BatchNorm everywhere
except G's output and D's input, ReLU in G with a tanh output, LeakyReLU(0.2) in D, weights from
N(0, 0.02), Adam 2e-4 with beta1 = 0.5. The depth follows the image size: G starts at 4x4 (7x7 for
28x28 digits) and doubles to the full size, D mirrors it.
Conventions: images in [-1, 1] (G's tanh); D returns logits (no sigmoid; losses use BCE-with-logits,
D(x) = sigmoid(logit) only in the logs); losses are means over the batch. z is Gaussian as in the
DCGAN authors' code (the paper says uniform). Left out on purpose: spectral norm, R1, minibatch std.

  python gan.py --dataset mnist-12k                 # MNIST, 28x28
  python gan.py --dataset celeba --steps 30000      # 64x64 faces
  python gan.py --loss hinge --ema 0.999            # hinge loss, samples from an EMA of G
  python gan.py --sample 64                         # from <out>/ckpt.pt
"""

import contextlib
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
    steps: int = 10000
    batch_size: int = 128  # DCGAN Sec. 4
    lr: float = 2e-4  # Adam, both nets (DCGAN Sec. 4)
    beta1: float = 0.5  # DCGAN: 0.9 "resulted in training oscillation and instability"
    beta2: float = 0.999  # Adam's second-moment decay
    z_dim: int = 100  # dimension of the noise z ~ N(0, I)
    ngf: int = 64  # G's width at its last stage, doubled toward the input; --tiny: 16
    ndf: int = 64  # D's width at its first stage, doubled with depth; --tiny: 16
    loss: str = "ns"  # ns (non-saturating, Sec. 3) | minimax (Eq. 1) | hinge
    ema: float = 0.0  # > 0: keep an EMA of G with this decay and sample from it (e.g. 0.999)
    at_least = dict(z_dim=1, ngf=1, ndf=1, ema=0)
    choices = dict(loss=("ns", "minimax", "hinge"))


# -----------------------------------------------------------------------------
# model: DCGAN (Radford et al. Sec. 3 and Fig. 1)
def stages(size: int):
    """(stride-2 stages, start size): 28 -> (2, 7), 32 -> (3, 4), 64 -> (4, 4); None if none."""
    n = int(math.log2(size)) - 2 if size >= 16 else 0
    return (n, size >> n) if n and size % 2**n == 0 else None


def bn(c: int) -> nn.BatchNorm2d:
    # keywords: a positional second argument (0.8 in much copied GAN code) sets eps, not momentum
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


def init_weights(m: nn.Module):
    """DCGAN Sec. 4: weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, C, S, S) in [-1, 1]: project to s0 x s0, then double n times."""

    def __init__(self, z_dim=100, out_ch=1, ngf=64, size=28):
        super().__init__()
        n, s0 = stages(size)
        c = ngf * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(z_dim, c, s0, 1, 0, bias=False), bn(c), nn.ReLU(True)]
        for _ in range(n - 1):  # (B, c, s, s) -> (B, c/2, 2s, 2s); BN makes the biases redundant
            up = nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False)
            layers += [up, bn(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, out_ch, 4, 2, 1), nn.Tanh()]  # no BN on G's output
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z):
        return self.net(z[:, :, None, None])  # (B, z_dim, 1, 1) -> (B, C, S, S)


class Discriminator(nn.Module):
    """image (B, C, S, S) -> logit (B,): G mirrored, strided convolutions down to s0 x s0."""

    def __init__(self, in_ch=1, ndf=64, size=28):
        super().__init__()
        n, s0 = stages(size)
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf  # no BN here
        for _ in range(n - 1):
            down = nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False)
            layers += [down, bn(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        self.features = nn.Sequential(*layers)  # (B, c, s0, s0)
        self.out = nn.Conv2d(c, 1, s0, 1, 0)  # a linear layer on all features: the logit
        self.apply(init_weights)

    def forward(self, x):
        return self.out(self.features(x)).view(-1)  # (B,) logits, no sigmoid


# -----------------------------------------------------------------------------
# method: the losses on D's logits, and one D step then one G step
def d_loss(real, fake, kind: str = "ns"):
    """D's loss on logits. ns / minimax: -V(D, G) = -E log D(x) - E log(1 - D(G(z))) (Eq. 1), i.e.
    BCE with target 1 on reals and 0 on fakes; log D = -softplus(-l) stays exact for any logit.
    hinge: E relu(1 - D(x)) + E relu(1 + D(G(z))) (Lim & Ye 2017; Miyato et al. 2018 Eq. 16)."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    bce = F.binary_cross_entropy_with_logits
    return bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))


def g_loss(fake, kind: str = "ns"):
    """G's loss on D's logits for G(z). minimax: E log(1 - D(G(z))) (Eq. 1) = -softplus(l), whose
    gradient -sigmoid(l) vanishes as D rejects the fakes (l -> -inf), i.e. early in training.
    ns: -E log D(G(z)) (Sec. 3) = softplus(-l), gradient sigmoid(l) - 1 -> -1 there.
    hinge: -E D(G(z))."""
    if kind == "minimax":
        return -F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if kind == "ns":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    return -fake.mean()


def d_stats(loss, real_l, fake_l) -> dict:
    """For the log: D's loss, mean D(x) and D(G(z)) as probabilities, D's accuracy."""
    real_l, fake_l = real_l.detach().float(), fake_l.detach().float()
    acc = ((real_l > 0).float().mean() + (fake_l < 0).float().mean()) / 2
    d_x, d_gz = torch.sigmoid(real_l).mean(), torch.sigmoid(fake_l).mean()
    return dict(loss_d=loss.detach(), d_x=d_x, d_gz=d_gz, d_acc=acc)


def d_step(D, opt_d, real, fake, kind="ns", autocast=None):
    """Alg. 1, inner loop (k = 1): one step up V on reals and fakes, detached from G."""
    with autocast or contextlib.nullcontext():  # bf16 on CUDA, from common.setup
        real_l, fake_l = D(real), D(fake.detach())  # detach: the D step must not reach G
        loss = d_loss(real_l, fake_l, kind)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return d_stats(loss, real_l, fake_l)


def g_step(D, opt_g, fake, kind="ns", autocast=None):
    """Alg. 1, G update: descend G's loss through the just-updated D, whose weights are frozen
    (no weight gradients are computed for it, and opt_g holds only G's parameters)."""
    D.requires_grad_(False)
    with autocast or contextlib.nullcontext():
        loss = g_loss(D(fake), kind)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return dict(loss_g=loss.detach())


# -----------------------------------------------------------------------------
# training
def model_args(cfg: Config, ch: int, size: int) -> dict:
    """G's and D's constructor arguments (saved as model_args); a size DCGAN cannot take is a
    one-line error."""
    if not stages(size):
        common.die(
            f"image size {size} does not fit DCGAN (16, 28, 32, 48, 64, 96, 128, ...: "
            "size / 2^(floor(log2 size) - 2) must be whole); set --image-size"
        )
    ngf, ndf = (16, 16) if cfg.tiny else (cfg.ngf, cfg.ndf)
    G = dict(z_dim=cfg.z_dim, out_ch=ch, ngf=ngf, size=size)
    return {"G": G, "D": dict(in_ch=ch, ndf=ndf, size=size)}


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.ema >= 1:
        common.die(f"--ema {cfg.ema}: a decay in [0, 1), 0 for none")


@torch.no_grad()
def generate(G, z, batch: int = 500):
    """Images from G in eval mode (BatchNorm's running statistics: a sample does not depend on
    the others in its batch), in batches."""
    was = G.training
    G.eval()
    x = torch.cat([G(zb).float() for zb in z.split(batch)])
    G.train(was)
    return x


def save_grid(G, z, path):
    common.save_grid(generate(G, z), path)


def train(cfg: Config):
    """Alternate D and G steps with Adam; returns (G, D, EMA of G or None)."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    args = model_args(cfg, x.shape[1], x.shape[-1])
    G, D = Generator(**args["G"]).to(device), Discriminator(**args["D"]).to(device)
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=betas, fused=fused)
    ema = common.EMA(G, cfg.ema) if cfg.ema else None
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("G", "D", "opt_g", "opt_d"))
        for m, k in [(G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d")]:
            common.load_state(m, ck[k], k)
        if ema:
            common.load_state(ema.module, ck.get("ema") or G.state_dict(), "EMA")
        start = ck["step"]
    G_, D_ = common.wrap(G, cfg, device), common.wrap(D, cfg, device)
    z_fixed = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed))
    z_fixed = z_fixed.to(device)  # the fixed noise of every sample grid
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D)]
        print(
            f"gan: DCGAN G {n[0]:.2f}M + D {n[1]:.2f}M params, loss {cfg.loss}, {len(x)} images "
            f"{tuple(x.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        real = next(data)[0]
        with autocast:  # the fakes of this step, with G's graph for the G step
            fake = G_(torch.randn(len(real), cfg.z_dim, device=device))

        # D step: real images and detached fakes
        stats = d_step(D_, opt_d, real, fake, cfg.loss, autocast)

        # G step: the same fakes, through the updated D
        stats |= g_step(D_, opt_g, fake, cfg.loss, autocast)
        if ema:
            ema.update(G, step)

        # log: d_x = mean D(x), d_gz = mean D(G(z)) before the D step, as probabilities
        loop.add(**stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=ema.module if ema else None)
        if loop.end_step(done, **state, model_args=args):
            break

        # sample a fixed-noise grid (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_grid, ema.module if ema else G, z_fixed, path)
    return G, D, ema


# -----------------------------------------------------------------------------
# sampling
def load_trained(cfg: Config):
    """G of <out>/ckpt.pt (its EMA when it has one), rebuilt from the checkpoint's model_args."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("G", "model_args"))
    device, _ = common.setup(cfg)
    G = Generator(**ck["model_args"]["G"]).to(device)
    common.load_state(G, ck.get("ema") or ck["G"], "generator")
    return G, ck, device


def sample(cfg: Config):
    """--sample N: N images from G into <out>/samples.npz and samples.png."""
    G, ck, device = load_trained(cfg)
    g = torch.Generator(device).manual_seed(cfg.seed)
    z = torch.randn(cfg.sample, ck["model_args"]["G"]["z_dim"], device=device, generator=g)
    common.save_samples(cfg.out, generate(G, z, cfg.batch_size))
    print(f"wrote {cfg.sample} samples to {cfg.out}/samples.npz and samples.png")


if __name__ == "__main__":
    cfg = common.parse(Config, "gan")
    check_flags(cfg)
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
