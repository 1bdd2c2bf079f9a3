"""
Conditional GANs. cGAN: Mirza & Osindero 2014 (arXiv:1411.1784), with the projection discriminator
of Miyato & Koyama 2018 (arXiv:1802.05637). pix2pix: Isola et al. 2017 (arXiv:1611.07004).

Both condition the minimax game of Goodfellow et al. (Eq. 1) on side information c:
min_G max_D E[log D(x, c)] + E[log(1 - D(G(z, c), c))]. Shared: D returns logits and the losses
are BCE-with-logits; G takes the non-saturating loss; one D step on reals and detached fakes, then
one G step through the updated, frozen D; Adam 2e-4 (0.5, 0.999); BatchNorm eps 1e-5.
--task cgan: c is a class label. G is a DCGAN on [z, embedding(y)]; D is a DCGAN with a projection
head, D(x, y) = psi(phi(x)) + e_y . phi(x) (Miyato & Koyama Eq. 3): the optimal D's form when
p(y | x) is log-linear in the features (their Sec. 3); unlike a label concatenated to D's input
it cannot be ignored, and it costs one embedding.
--task pix2pix: c is an input image. G is a U-Net (skips at every scale, dropout as the noise z);
D is a PatchGAN on (input, output) pairs that classifies each 70x70 patch; G minimises
L_cGAN + lambda L_L1 (Eq. 4, lambda = 100), D's loss is halved, and the learning rate decays
linearly to 0 over the second half. At test time G runs as in training (dropout on, batch
statistics), as the paper does. Images are in [-1, 1]. Left out: the image pool, spectral norm.

  python cgan_pix2pix.py --dataset mnist-12k                         # class-conditional MNIST
  python cgan_pix2pix.py --task pix2pix --digits mnist-12k           # built-in mnist-edges
  python cgan_pix2pix.py --task pix2pix --dataset aligned --data-dir datasets/facades \\
      --batch-size 1 --steps 80000 --direction BtoA                   # the paper's facades setup
  python cgan_pix2pix.py --sample 100                  # 10 per class, labels in arr_1
"""

import contextlib
import copy
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
    task: str = "cgan"  # cgan | pix2pix
    dataset: str = ""  # cgan: as common (default mnist); pix2pix: mnist-edges (default) | aligned
    digits: str = "mnist"  # the digits of the built-in mnist-* tasks: mnist | mnist-12k
    steps: int = 10000
    batch_size: int = 64  # pix2pix paper: 1 (facades) to 10; 64 suits 32x32 digits
    lr: float = 2e-4  # Adam, both nets (DCGAN; pix2pix Sec. 3.3)
    beta1: float = 0.5  # Adam (DCGAN: 0.9 oscillates)
    beta2: float = 0.999  # Adam's second-moment decay
    z_dim: int = 100  # cgan
    emb_dim: int = 50  # cgan: label embedding concatenated with z
    ngf: int = 64  # G's base width; --tiny: 16
    ndf: int = 64  # D's base width; --tiny: 16
    lambda_l1: float = 100.0  # pix2pix Eq. 4
    direction: str = "AtoB"  # pix2pix: AtoB | BtoA (which half of each pair is the input)
    patch: int = 0  # PatchGAN receptive field 16|34|70|142|286; 0: 70 from 128 px, else <= size/2
    load_size: int = 0  # aligned: resize to this before the random crop; 0: size * 286 / 256
    at_least = dict(z_dim=1, emb_dim=1, ngf=1, ndf=1, lambda_l1=0)
    choices = dict(task=("cgan", "pix2pix"), direction=("AtoB", "BtoA"))
    choices |= dict(digits=("mnist", "mnist-12k"))


# -----------------------------------------------------------------------------
# model: building blocks
def bn(c: int) -> nn.BatchNorm2d:
    # keywords: a positional second argument (0.8 in much copied GAN code) sets eps, not momentum
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


def init_weights(m: nn.Module):
    """DCGAN / pix2pix: weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def stages(size: int):
    """DCGAN (stride-2 stages, start size): 28 -> (2, 7), 32 -> (3, 4), 64 -> (4, 4); or None."""
    n = int(math.log2(size)) - 2 if size >= 16 else 0
    return (n, size >> n) if n and size % 2**n == 0 else None


# -----------------------------------------------------------------------------
# model: the class-conditional DCGAN
class ConditionalGenerator(nn.Module):
    """(z (B, z_dim), y (B,)) -> image (B, C, S, S): a DCGAN generator on [z, embedding(y)].
    The embedding starts at N(0, 0.02) like every weight: at PyTorch's N(0, 1) it drowned z, and
    by 1,000 steps each row of the class grid was one digit repeated (measured on MNIST)."""

    def __init__(self, z_dim=100, n_classes=10, emb_dim=50, out_ch=1, ngf=64, size=28):
        super().__init__()
        n, s0 = stages(size)
        c = ngf * 2 ** (n - 1)
        first = nn.ConvTranspose2d(z_dim + emb_dim, c, s0, 1, 0, bias=False)
        layers = [first, bn(c), nn.ReLU(True)]
        for _ in range(n - 1):  # (B, c, s, s) -> (B, c/2, 2s, 2s)
            up = nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False)
            layers += [up, bn(c // 2), nn.ReLU(True)]
            c //= 2
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(c, out_ch, 4, 2, 1), nn.Tanh())
        self.embed = nn.Embedding(n_classes, emb_dim)
        self.apply(init_weights)  # the embedding too (see the docstring)

    def forward(self, z, y):
        h = torch.cat([z, self.embed(y)], 1)  # (B, z_dim + emb_dim)
        return self.net(h[:, :, None, None])


class ProjectionDiscriminator(nn.Module):
    """(x, y) -> logit (B,): DCGAN features h, then psi(h) + e_y . phi(x), phi = h summed over
    space as Miyato & Koyama pool their features (their Eq. 3)."""

    def __init__(self, in_ch=1, ndf=64, size=28, n_classes=10):
        super().__init__()
        n, s0 = stages(size)
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf  # no BN here
        for _ in range(n - 1):
            down = nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False)
            layers += [down, bn(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        self.features = nn.Sequential(*layers)  # phi(x): (B, c, s0, s0)
        self.psi = nn.Conv2d(c, 1, s0)  # the unconditional logit: DCGAN's last layer
        self.embed = nn.Embedding(n_classes, c)  # V: one vector per class in phi's space
        self.apply(init_weights)

    def forward(self, x, y):
        h = self.features(x)  # (B, c, s0, s0)
        phi = h.sum((2, 3))  # (B, c): global sum pooling, as theirs
        return self.psi(h).view(-1) + (self.embed(y) * phi).sum(1)  # (B,)


# -----------------------------------------------------------------------------
# model: pix2pix's U-Net and PatchGAN (Isola et al. Sec. 3.2 and App. 6.1)
def widths(ngf: int, n: int) -> list[int]:
    return [ngf * min(2**i, 8) for i in range(n)]  # C64-C128-C256-C512-C512-... (App. 6.1.1)


class UNetGenerator(nn.Module):
    """x (B, in_ch, S, S) -> (B, out_ch, S, S): an encoder halving S down to 1x1 (log2 S levels)
    and a mirrored decoder that concatenates the encoder's features at every scale."""

    def __init__(self, in_ch=3, out_ch=3, ngf=64, size=256, n_dropout=3):
        super().__init__()
        n = int(math.log2(size))
        w = widths(ngf, n)
        self.down = nn.ModuleList([nn.Conv2d(in_ch, w[0], 4, 2, 1)])  # no BN on the first layer
        for i in range(1, n):  # the 1x1 bottleneck has no BN: a batch of 1 would zero it
            norm = [bn(w[i])] if i < n - 1 else []
            conv = nn.Conv2d(w[i - 1], w[i], 4, 2, 1, bias=not norm)
            self.down.append(nn.Sequential(nn.LeakyReLU(0.2), conv, *norm))
        self.up = nn.ModuleList()
        for j, i in enumerate(reversed(range(1, n))):  # innermost first: 1x1 -> 2x2 -> ...
            c_in = w[i] if j == 0 else 2 * w[i]  # decoder features + the encoder's skip
            drop = [nn.Dropout(0.5)] if j < n_dropout else []  # the first 3 decoder layers (CD512)
            up = nn.ConvTranspose2d(c_in, w[i - 1], 4, 2, 1, bias=False)
            self.up.append(nn.Sequential(nn.ReLU(), up, bn(w[i - 1]), *drop))
        last = nn.ConvTranspose2d(2 * w[0], out_ch, 4, 2, 1)
        self.up.append(nn.Sequential(nn.ReLU(), last, nn.Tanh()))
        self.apply(init_weights)

    def forward(self, x):
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)  # (B, w_i, S / 2^(i+1), S / 2^(i+1))
        x = self.up[0](skips.pop())  # the bottleneck has no skip of its own
        for u in self.up[1:]:
            x = u(torch.cat([x, skips.pop()], 1))  # the skip at this scale
        return x


class PatchDiscriminator(nn.Module):
    """(y, x) -> a map of logits, one per overlapping patch of (x, y) (Sec. 3.2.2). n_layers 3 is
    C64-C128-C256-C512 with a 70x70 receptive field; 1, 2, 4, 5 give 16, 34, 142, 286."""

    def __init__(self, in_ch=6, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf  # no BN here
        for i in range(1, n_layers + 1):  # stride 2, then one stride-1 layer before the output
            c2 = ndf * min(2**i, 8)
            conv = nn.Conv2d(c, c2, 4, 2 if i < n_layers else 1, 1, bias=False)
            layers += [conv, bn(c2), nn.LeakyReLU(0.2, True)]
            c = c2
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        self.apply(init_weights)

    def forward(self, y, x):
        return self.net(torch.cat([x, y], 1))  # (B, 1, P, P) logits: conditioned on the input x


def receptive_field(net: nn.Module) -> int:
    """The input window one output unit sees, from the conv stack: r <- (r - 1) stride + kernel."""
    r = 1
    for m in reversed([m for m in net.modules() if isinstance(m, nn.Conv2d)]):
        r = (r - 1) * m.stride[0] + m.kernel_size[0]
    return r


PATCH = {16: 1, 34: 2, 70: 3, 142: 4, 286: 5}  # receptive field -> PatchGAN n_layers


# -----------------------------------------------------------------------------
# method: losses on D's logits (means over the batch and, for PatchGAN, over patches), and the
# D and G steps of gan.py with the condition c passed to D
def d_loss(real, fake):
    """-V(D, G) = -E log D(x, c) - E log(1 - D(G(z, c), c)): BCE, target 1 on reals, 0 on fakes."""
    bce = F.binary_cross_entropy_with_logits
    return bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))


def g_loss(fake):
    """The non-saturating G loss -E log D(G(z, c), c) (Goodfellow et al. Sec. 3)."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def l1_loss(fake, target):
    """L_L1(G) = E |y - G(x, z)|_1 (pix2pix Eq. 3), as a mean over pixels and the batch."""
    return (fake - target).abs().mean()


def d_step(D, opt_d, real, fake, c, scale=1.0, autocast=None):
    """One D step on (real, c) and detached (fake, c); pix2pix passes scale 0.5 (Sec. 3.3)."""
    with autocast or contextlib.nullcontext():
        real_l, fake_l = D(real, c), D(fake.detach(), c)  # detach: the D step must not reach G
        loss = scale * d_loss(real_l, fake_l)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    real_l, fake_l = real_l.detach().float(), fake_l.detach().float()
    acc = ((real_l > 0).float().mean() + (fake_l < 0).float().mean()) / 2
    d_x, d_gz = torch.sigmoid(real_l).mean(), torch.sigmoid(fake_l).mean()
    return dict(loss_d=loss.detach(), d_x=d_x, d_gz=d_gz, d_acc=acc)


def g_step(D, opt_g, fake, c, target=None, lambda_l1=100.0, autocast=None):
    """One G step through the updated D, frozen (no weight gradients for it); + lambda L1 when a
    target is given (pix2pix Eq. 4)."""
    D.requires_grad_(False)
    with autocast or contextlib.nullcontext():
        adv = g_loss(D(fake, c))
        l1 = l1_loss(fake.float(), target) if target is not None else None
        loss = adv if l1 is None else adv + lambda_l1 * l1
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return dict(loss_g=adv.detach()) | ({} if l1 is None else dict(l1=l1.detach()))


def lr_factor(step: int, steps: int) -> float:
    """pix2pix's schedule: the full rate for the first half, then linearly down to 0 at the end."""
    return min(1.0, (steps - step) / max(1, steps - steps // 2))


@torch.no_grad()
def generate(G, z, y, batch=500):
    """cGAN images in eval mode (BatchNorm's running statistics), in batches."""
    was = G.training
    G.eval()
    x = torch.cat([G(zb, yb).float() for zb, yb in zip(z.split(batch), y.split(batch))])
    G.train(was)
    return x


@torch.no_grad()
def translate(G, x, batch=64):
    """pix2pix inference as the paper runs it (Sec. 3.3): training mode, so dropout stays on as
    the noise and BatchNorm uses the test batch's statistics; on a copy, to keep G's buffers."""
    G = copy.deepcopy(G).train()
    return torch.cat([G(xb).float() for xb in x.split(batch)])


# -----------------------------------------------------------------------------
# data: pix2pix pairs (A and B stacked on channels, so one crop and one flip serve both)
def mnist_edges(cfg, train: bool):
    """The built-in paired task: A = a digit's edge map (morphological gradient, dilation minus
    erosion, thresholded), B = the digit; both padded 28 -> 32 so the U-Net reaches 1x1."""
    x, y = common.load_images(cfg, train, digits=True)
    b = F.pad(x, (2, 2, 2, 2))  # (N, 1, 32, 32) uint8
    f = b.float() / 255
    edge = F.max_pool2d(f, 3, 1, 1) + F.max_pool2d(-f, 3, 1, 1)  # max over 3x3 - min over 3x3
    return (edge > 0.5).to(torch.uint8) * 255, b, y


def load_aligned(root, split: str, size: int):
    """pix2pix's layout: <root>/<split>/*.jpg|png, each image A|B side by side. Returns uint8
    (A, B), each (N, 3, size, size), and zero labels."""
    import numpy as np
    from PIL import Image

    folder = Path(root) / split
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        common.die(f"no images in {folder} (pix2pix: train/ and val/ of side-by-side A|B images)")
    A, B = [], []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except OSError as e:
            common.die(f"cannot read {p}: {e}")
        w, h = img.size
        for half, out in ((0, A), (1, B)):  # left half is A, right half is B
            im = img.crop((half * w // 2, 0, (half + 1) * w // 2, h))
            im = im.resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(A), torch.stack(B), torch.zeros(len(A), dtype=torch.long)


def jitter(ab, load: int, size: int):
    """Random jitter (Sec. 6.2): resize to load x load, crop size x size at a random place, mirror
    with probability 1/2; one draw per pair, applied to A and B alike (channel-stacked in ab)."""
    if load != ab.shape[-1]:
        ab = F.interpolate(ab, size=(load, load), mode="bilinear", align_corners=False)
    i, j = torch.randint(0, load - size + 1, (2, len(ab))).tolist()
    flip = (torch.rand(len(ab)) < 0.5).tolist()
    out = [ab[k, :, i[k] : i[k] + size, j[k] : j[k] + size] for k in range(len(ab))]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip)])


def pairs(cfg, train: bool):
    """(A, B, labels) of a split for pix2pix: mnist-edges, or aligned folders (val/, else test/)."""
    if cfg.dataset == "mnist-edges":
        return mnist_edges(cfg, train)
    split = "train"
    if not train:
        split = "val" if (Path(cfg.data_dir) / "val").is_dir() else "test"
    return load_aligned(cfg.data_dir, split, cfg.image_size or 256)


def split_ab(ab, direction: str, a_ch: int):
    """Channel-stacked pairs -> (input, target) in the order --direction asks for."""
    a, b = ab[:, :a_ch], ab[:, a_ch:]
    return (a, b) if direction == "AtoB" else (b, a)


# -----------------------------------------------------------------------------
# training: the two tasks share the D and G steps, the optimizers and the checkpoint
def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work; also
    resolves the task's default dataset."""
    cfg.dataset = cfg.dataset or ("mnist" if cfg.task == "cgan" else "mnist-edges")
    if cfg.task == "pix2pix" and cfg.dataset not in ("mnist-edges", "aligned"):
        common.die(f"--dataset {cfg.dataset!r} for pix2pix: mnist-edges or aligned (A|B pairs)")
    if cfg.task == "cgan" and cfg.dataset in ("mnist-edges", "aligned", "celeba"):
        common.die(f"--dataset {cfg.dataset!r} has no class labels for --task cgan")
    if cfg.patch and cfg.patch not in PATCH:
        common.die(f"--patch {cfg.patch}: a PatchGAN receptive field, one of {sorted(PATCH)}")


def cgan_args(cfg: Config, ch: int, size: int, n_classes: int) -> dict:
    """The cGAN's G and D constructor arguments (saved as model_args)."""
    if not stages(size):
        common.die(f"image size {size} does not fit DCGAN (16, 28, 32, 48, 64, ...): --image-size")
    ngf, ndf = (16, 16) if cfg.tiny else (cfg.ngf, cfg.ndf)
    G = dict(z_dim=cfg.z_dim, n_classes=n_classes, emb_dim=cfg.emb_dim, out_ch=ch, ngf=ngf)
    return {"G": dict(G, size=size), "D": dict(in_ch=ch, ndf=ndf, size=size, n_classes=n_classes)}


def pix2pix_args(cfg: Config, in_ch: int, out_ch: int, size: int) -> dict:
    """pix2pix's U-Net and PatchGAN constructor arguments (saved as model_args)."""
    if size < 16 or size & (size - 1):
        common.die(f"image size {size} does not fit the U-Net (a power of two >= 16): --image-size")
    rf = cfg.patch or (70 if size >= 128 else max(r for r in PATCH if r <= size // 2))
    if size // 2 ** PATCH[rf] < 3:
        common.die(f"--patch {rf} needs images of at least {3 * 2 ** PATCH[rf]} pixels, not {size}")
    ngf, ndf = (16, 16) if cfg.tiny else (cfg.ngf, cfg.ndf)
    G = dict(in_ch=in_ch, out_ch=out_ch, ngf=ngf, size=size)
    return {"G": G, "D": dict(in_ch=in_ch + out_ch, ndf=ndf, n_layers=PATCH[rf])}


def optimizers(cfg: Config, G, D, device):
    """One Adam per network, betas (0.5, 0.999) as DCGAN and pix2pix."""
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=betas, fused=fused)
    return opt_g, torch.optim.Adam(D.parameters(), cfg.lr, betas=betas, fused=fused)


def resume(cfg: Config, data, G, D, opt_g, opt_d) -> int:
    """--resume: both networks and optimizers from <out>/ckpt.pt; returns its step."""
    ck = common.resume(cfg, data, need=("G", "D", "opt_g", "opt_d", "task"))
    if ck["task"] != cfg.task:
        common.die(f"{cfg.out}/ckpt.pt is not a cgan_pix2pix.py --task {cfg.task} checkpoint")
    for m, k in [(G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d")]:
        common.load_state(m, ck[k], k)
    return ck["step"]


def train(cfg: Config):
    """Train the --task's networks; returns (G, D)."""
    check_flags(cfg)  # also resolves the task's default dataset
    return train_cgan(cfg) if cfg.task == "cgan" else train_pix2pix(cfg)


def train_cgan(cfg: Config):
    """The class-conditional GAN: a D step then a G step on each (image, label) batch."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    if y.dim() != 1:
        common.die(f"--dataset {cfg.dataset} has no class labels for --task cgan")
    args = cgan_args(cfg, x.shape[1], x.shape[-1], int(y.max()) + 1)
    G = ConditionalGenerator(**args["G"]).to(device)
    D = ProjectionDiscriminator(**args["D"]).to(device)
    opt_g, opt_d = optimizers(cfg, G, D, device)
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = resume(cfg, data, G, D, opt_g, opt_d) if cfg.resume else 0
    G_, D_ = common.wrap(G, cfg, device), common.wrap(D, cfg, device)
    C = args["G"]["n_classes"]  # a grid with one row per class, one fixed z per column
    z_fixed = torch.randn(10, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed))
    z_fixed, y_fixed = z_fixed.repeat(C, 1).to(device), torch.arange(C).repeat_interleave(10)
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D)]
        print(
            f"cgan_pix2pix: cgan, G {n[0]:.2f}M + D {n[1]:.2f}M params, {cfg.dataset}, "
            f"{len(x)} images {tuple(x.shape[1:])}, {C} classes, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        real, c = next(data)
        with autocast:  # the fakes of this step, for the labels c that D sees them with
            fake = G_(torch.randn(len(real), cfg.z_dim, device=device), c)

        # D step: real and detached fake (image, label) pairs
        stats = d_step(D_, opt_d, real, fake, c, autocast=autocast)

        # G step: the same fakes through the updated D
        stats |= g_step(D_, opt_g, fake, c, autocast=autocast)

        # log
        loop.add(**stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=cfg.lr)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, model_args=args, task="cgan")
        if loop.end_step(done, **state):
            break

        # sample a fixed-noise grid (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_class_grid, G, z_fixed, y_fixed.to(device), path)
    return G, D


def train_pix2pix(cfg: Config):
    """pix2pix: a D step then a G step on each batch of (input, target) pairs, with the learning
    rate decaying linearly to 0 over the second half."""
    device, autocast = common.setup(cfg)
    a, b, y = pairs(cfg, train=True)
    ab, a_ch = torch.cat([a, b], 1), a.shape[1]  # (N, C_A + C_B, S, S); flips are in the jitter
    size, load = ab.shape[-1], cfg.load_size or round(ab.shape[-1] * 286 / 256)
    in_ch, out_ch = (a_ch, b.shape[1]) if cfg.direction == "AtoB" else (b.shape[1], a_ch)
    args = pix2pix_args(cfg, in_ch, out_ch, size)
    G, D = UNetGenerator(**args["G"]).to(device), PatchDiscriminator(**args["D"]).to(device)
    opt_g, opt_d = optimizers(cfg, G, D, device)
    data = common.Batches(ab, y, cfg.batch_size, cfg.seed, device)
    start = resume(cfg, data, G, D, opt_g, opt_d) if cfg.resume else 0
    G_, D_ = common.wrap(G, cfg, device), common.wrap(D, cfg, device)
    va, vb, _ = pairs(cfg, train=False)  # 8 test pairs for the pictures
    fixed = torch.cat([va[:8], vb[:8]], 1).to(device).float() / 127.5 - 1
    x_fixed, target_fixed = split_ab(fixed, cfg.direction, a_ch)
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D)]
        print(
            f"cgan_pix2pix: pix2pix, G {n[0]:.2f}M + D {n[1]:.2f}M params, {cfg.dataset}, "
            f"{len(ab)} pairs {tuple(ab.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * lr_factor(step, cfg.steps)  # from the step alone: exact resume
        for g in [*opt_g.param_groups, *opt_d.param_groups]:
            g["lr"] = lr
        pair = next(data)[0]
        if cfg.dataset == "aligned":  # random resize-crop and mirror, one draw per pair
            pair = jitter(pair, load, size)
        x, target = split_ab(pair, cfg.direction, a_ch)
        with autocast:  # G(x): dropout is the noise z
            fake = G_(x)

        # D step: (target, x) and detached (G(x), x) pairs; D's loss is halved (Sec. 3.3)
        stats = d_step(D_, opt_d, target, fake, x, scale=0.5, autocast=autocast)

        # G step: L_cGAN + lambda L_L1 (Eq. 4), through the updated D
        stats |= g_step(D_, opt_g, fake, x, target, cfg.lambda_l1, autocast)

        # log
        loop.add(**stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=lr)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, model_args=args, task="pix2pix")
        if loop.end_step(done, **state, a_ch=a_ch):
            break

        # picture of fixed test pairs (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_translations, G, x_fixed, target_fixed, path)
    return G, D


# -----------------------------------------------------------------------------
# sampling and evaluation
def save_triplets(x, out, target, path):
    """One row per example: input | output | target."""
    c = max(x.shape[1], out.shape[1])
    x, out, target = (t.expand(-1, c, -1, -1) for t in (x, out, target))
    common.save_grid(torch.stack([x, out, target], 1).flatten(0, 1), path, nrow=3)


def save_class_grid(G, z, y, path):
    common.save_grid(generate(G, z, y), path, nrow=10)  # 10 fixed z per row, a row per class


def save_translations(G, x, target, path):
    save_triplets(x, translate(G, x), target, path)


def load_trained(cfg: Config):
    """G of <out>/ckpt.pt, rebuilt from the checkpoint's model_args, and the checkpoint."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("G", "model_args", "task"))
    device, _ = common.setup(cfg)
    G = {"cgan": ConditionalGenerator, "pix2pix": UNetGenerator}[ck["task"]]
    G = G(**ck["model_args"]["G"]).to(device)
    common.load_state(G, ck["G"], "generator")
    return G, ck, device


def sample(cfg: Config):
    """--sample N: cgan: N images, labels 0, 1, 2, ... cycling (arr_1), one column per class in
    samples.png. pix2pix: the first N test inputs translated, a grid of input | output | target,
    and L1 / PSNR against the targets on stdout and in <out>/pix2pix_eval.jsonl."""
    G, ck, device = load_trained(cfg)
    if ck["task"] == "pix2pix":
        return sample_pix2pix(cfg, G, ck, device)
    C, z_dim = ck["model_args"]["G"]["n_classes"], ck["model_args"]["G"]["z_dim"]
    g = torch.Generator(device).manual_seed(cfg.seed)
    y = torch.arange(cfg.sample, device=device) % C
    z = torch.randn(cfg.sample, z_dim, device=device, generator=g)
    common.save_samples(cfg.out, generate(G, z, y, cfg.batch_size), y, nrow=C)
    print(f"wrote {cfg.sample} samples (labels in arr_1) to {cfg.out}/samples.npz and samples.png")


def sample_pix2pix(cfg: Config, G, ck: dict, device):
    """--sample N of a pix2pix run, on the test split of the data it was trained on."""
    cfg = common.from_run(cfg, ck)  # the run's --dataset and --data-dir unless given here
    cfg.direction, cfg.image_size = ck["config"]["direction"], ck["model_args"]["G"]["size"]
    a, b, labels = pairs(cfg, train=False)
    n = min(cfg.sample, len(a))
    x, target = split_ab(
        torch.cat([a[:n], b[:n]], 1).float() / 127.5 - 1, cfg.direction, ck["a_ch"]
    )
    torch.manual_seed(cfg.seed)  # the dropout noise
    out = torch.cat([translate(G, xb.to(device)).cpu() for xb in x.split(cfg.batch_size)])
    if cfg.dataset == "mnist-edges":  # back to the 28x28 digits that evaluate.py classifies
        out, target, x = (t[..., 2:30, 2:30] for t in (out, target, x))
    common.save_samples(cfg.out, out, labels[:n] if cfg.dataset == "mnist-edges" else None)
    save_triplets(x[:16], out[:16], target[:16], Path(cfg.out) / "samples.png")  # replaces it
    o, t = (out + 1) / 2, (target + 1) / 2  # [0, 1] pixels for the metrics
    mse = (o - t).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    copy_l1 = ((x + 1) / 2 - t).abs().mean().item() if x.shape == t.shape else None
    res = {
        "n": n,
        "l1": (o - t).abs().mean().item(),
        "psnr": (10 * torch.log10(1 / mse)).mean().item(),
    }
    res |= {"l1_input_as_output": copy_l1, "dataset": cfg.dataset, "direction": cfg.direction}
    print(json.dumps(res))
    with open(Path(cfg.out) / "pix2pix_eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(
        f"wrote {n} translations to {cfg.out}/samples.npz and samples.png (input | output | "
        "target); L1 and PSNR in pix2pix_eval.jsonl"
    )


if __name__ == "__main__":
    cfg = common.parse(Config, "cgan_pix2pix")
    check_flags(cfg)
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
