"""
CycleGAN: Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks" (arXiv:1703.10593).

Two piles of images, A and B, and no pairs. Two generators, G_AB: A -> B and G_BA: B -> A, each
with a PatchGAN discriminator on its output domain (D_B judges G_AB's images, D_A judges
G_BA's). Adversarial losses alone would let G_AB map every A image to any plausible B image;
cycle consistency ties each translation back to its source, G_BA(G_AB(a)) ~ a and
G_AB(G_BA(b)) ~ b (Eq. 2), and the full objective is Eq. 3:
L = L_GAN(G_AB, D_B) + L_GAN(G_BA, D_A) + lambda_cyc L_cyc, with lambda_cyc = 10. As the paper
(Sec. 4, 7.1): least-squares GAN losses, an identity loss lambda_id * lambda_cyc * |G_AB(b) - b|
(and the same for G_BA), D updated on a pool of the last 50 fakes, D's loss halved, Adam 2e-4
(0.5, 0.999), the learning rate constant for the first half and linearly down to 0 over the
second. Images are in [-1, 1]. Left out: dropout in G (the paper's CycleGAN runs without it).
`--arch unit`: UNIT (Liu, Breuel & Kautz 2017, arXiv:1703.00848), two VAEs sharing their last
encoder and first decoder blocks, so one latent space; trained on each domain's VAE loss, GAN
losses on translations and a VAE loss on the cycle A -> B -> A. The same data, D, pools, CLI.

  python cyclegan.py --digits mnist-12k                 # built-in mnist-thickness: thin <-> thick
  python cyclegan.py --dataset unaligned --data-dir datasets/horse2zebra --image-size 256 \\
      --batch-size 1 --steps 266800                     # the paper's setup: 200 epochs of 1,334
  python cyclegan.py --sample 2500                      # test A -> B, with L1/PSNR when pairs exist
  python cyclegan.py --sample 1 --input horse.jpg --direction AtoB
  python cyclegan.py --arch unit --out runs/unit         # UNIT; --sample also draws interp.png
"""

import dataclasses
import json
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
    dataset: str = "mnist-thickness"  # mnist-thickness | unaligned (trainA/ trainB/ testA/ testB/)
    digits: str = "mnist"  # the digits of the built-in mnist-* tasks: mnist | mnist-12k
    steps: int = 10000
    batch_size: int = 16  # the paper: 1 at 256 px; 16 suits 28x28 digits (InstanceNorm: any B)
    lr: float = 2e-4  # Adam, all four nets (Sec. 7.1)
    beta1: float = 0.5  # Adam
    beta2: float = 0.999  # Adam
    arch: str = "cyclegan"  # cyclegan | unit (two VAEs sharing a latent space); unit's --lr: 1e-4
    lambda_cyc: float = 10.0  # Eq. 3; unit: both L1 terms (lambda_2 = lambda_4 = 100 / lambda_0)
    lambda_kl: float = 0.01  # unit: both KL terms (lambda_1 = lambda_3 = 0.1 / lambda_0 = 10)
    lambda_id: float = 0.5  # identity loss weight, times lambda_cyc (Sec. 5.2); 0: off; not unit
    pool_size: int = 50  # fakes kept per direction for D's updates (Sec. 4); 0: no pool
    ngf: int = 64  # G's base width; --tiny: 16
    ndf: int = 64  # D's base width; --tiny: 16
    n_blocks: int = 0  # residual blocks in G; 0: 6 up to 128 px, 9 above (App. 7.2)
    upsample: str = "deconv"  # deconv (the paper) | resize (nearest + conv: no checkerboard)
    patch: int = 0  # PatchGAN receptive field 16|34|70|142|286; 0: 70 from 128 px, else <= size/2
    load_size: int = 0  # unaligned: resize to this, random crop --image-size; 0: size * 286 / 256
    direction: str = "AtoB"  # --sample: AtoB | BtoA
    input: str = ""  # --sample: translate this image file instead of the test split
    at_least = dict(ngf=1, ndf=1, n_blocks=0, pool_size=0, lambda_cyc=0, lambda_id=0, lambda_kl=0)
    choices = dict(dataset=("mnist-thickness", "unaligned"), upsample=("deconv", "resize"))
    choices |= dict(direction=("AtoB", "BtoA"), arch=("cyclegan", "unit"))
    choices |= dict(digits=("mnist", "mnist-12k"))


# -----------------------------------------------------------------------------
# model: the ResNet generator and PatchGAN of App. 7.2 (Johnson et al.'s network)
def init_weights(m: nn.Module):
    """Weights from N(0, 0.02), biases 0, as the paper's code."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


def norm(c: int) -> nn.InstanceNorm2d:
    # no affine and no running statistics: the same normalisation at train and test time
    return nn.InstanceNorm2d(c, affine=False, track_running_stats=False)


class ResBlock(nn.Module):
    """x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x); reflection padding keeps borders clean."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.net(x)


class Generator(nn.Module):
    """(B, in_ch, S, S) -> (B, out_ch, S, S), S divisible by 4: c7s1-64, d128, d256, n_blocks x
    R256, u128, u64, c7s1-out (App. 7.2), tanh. upsample="resize": nearest upsampling + conv3x3
    for each transposed conv (Odena et al. 2016; the paper code's fix for checkerboards)."""

    def __init__(self, in_ch=3, out_ch=3, ngf=64, n_blocks=9, upsample="deconv"):
        super().__init__()
        layers, c = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), norm(ngf), nn.ReLU(True)], ngf
        for _ in range(2):  # (B, c, s, s) -> (B, 2c, s/2, s/2)
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), norm(2 * c), nn.ReLU(True)]
            c *= 2
        layers += [ResBlock(c) for _ in range(n_blocks)]
        for _ in range(2):  # (B, c, s, s) -> (B, c/2, 2s, 2s)
            if upsample == "deconv":
                up = [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1)]
            else:
                up = [nn.Upsample(scale_factor=2), nn.ReflectionPad2d(1), nn.Conv2d(c, c // 2, 3)]
            layers += [*up, norm(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, out_ch, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x)


class UNIT(nn.Module):
    """UNIT's two VAEs (Fig. 1) as two Generators cut in the middle of their ResBlocks: encoder d
    is G_d's first half, decoder d its second, and the ResBlocks either side of the cut are one
    module in both (the shared layers): one latent space, whose code is the mean of q(z|x) =
    N(mu, I) (Sec. 3). A -> B, decode_B(encode_A(a)), is as deep as CycleGAN's G_AB."""

    def __init__(self, in_ch=3, out_ch=3, ngf=64, n_blocks=6, upsample="deconv"):
        super().__init__()
        n = max(n_blocks, 2)  # one shared ResBlock each side of the cut
        self.vae = nn.ModuleList([Generator(in_ch, out_ch, ngf, n, upsample) for _ in "AB"])
        self.cut = 10 + n // 2  # G.net: 10 layers (c7s1, d128, d256), then the ResBlocks
        for i in (self.cut - 1, self.cut):  # E's last and the decoder's first ResBlock: shared
            self.vae[1].net[i] = self.vae[0].net[i]

    def encode(self, x, d: int):  # d: 0 for A, 1 for B; mu (B, 4 ngf, S/4, S/4)
        return self.vae[d].net[: self.cut](x)

    def decode(self, z, d: int):
        return self.vae[d].net[self.cut :](z)

    def forward(self, a, b):
        """The training pass: codes mu, z = mu + eps, reconstructions, translations, cycles."""
        mu = [self.encode(a, 0), self.encode(b, 1)]
        z = [m + torch.randn_like(m) for m in mu]  # z ~ q(z|x) = N(mu, I)
        rec = [self.decode(z[0], 0), self.decode(z[1], 1)]
        fake = [self.decode(z[1], 0), self.decode(z[0], 1)]  # B -> A, A -> B
        mu += [self.encode(fake[1], 1), self.encode(fake[0], 0)]  # A -> B and B -> A re-encoded
        cyc = [self.decode(m + torch.randn_like(m), d) for d, m in enumerate(mu[2:])]  # ABA, BAB
        return mu, rec, fake, cyc


class Translator(nn.Module):  # one UNIT direction as a Generator: decode_tgt(encode_src(x))
    def __init__(self, unit: UNIT, src: int):
        super().__init__()
        self.unit, self.src = unit, src

    def forward(self, x):
        return self.unit.decode(self.unit.encode(x, self.src), 1 - self.src)


class PatchDiscriminator(nn.Module):
    """(B, in_ch, S, S) -> (B, 1, P, P), one score per overlapping patch; n_layers 3 is C64-C128-
    C256-C512, a 70x70 receptive field (App. 7.2); 1, 2, 4, 5 give 16, 34, 142, 286."""

    def __init__(self, in_ch=3, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf  # no IN here
        for i in range(1, n_layers + 1):  # stride 2, then one stride-1 layer before the output
            c2 = ndf * min(2**i, 8)
            layers += [
                nn.Conv2d(c, c2, 4, 2 if i < n_layers else 1, 1),
                norm(c2),
                nn.LeakyReLU(0.2, True),
            ]
            c = c2
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x)


PATCH = {16: 1, 34: 2, 70: 3, 142: 4, 286: 5}  # receptive field -> PatchGAN n_layers


# -----------------------------------------------------------------------------
# method: the image pool, the losses of Eq. 1-3 in least-squares form, the G and D steps
class ImagePool:
    """A history of generated images (Shrivastava et al. 2017; CycleGAN Sec. 4): until full, each
    new fake is stored and returned; then, with probability 1/2, a stored fake is returned and
    replaced by the new one. Checkpointed (rank 0's pool under DDP); torch's global CPU RNG."""

    def __init__(self, size: int = 50):
        self.size, self.images = size, []

    @torch.no_grad()
    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for img in fakes.detach().float():
            if len(self.images) < self.size:  # filling up: keep it and return it
                self.images.append(img.clone())  # a copy: a view would keep the whole batch
                out.append(img)
            elif torch.rand(()) < 0.5:  # an old fake for D, the new one stored in its place
                i = int(torch.randint(self.size, ()))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"images": torch.stack(self.images).cpu() if self.images else torch.zeros(0)}

    def load_state_dict(self, state: dict, device="cpu"):
        self.images = [t.to(device) for t in state["images"]]


def lsgan(pred, target: float):
    """Least-squares GAN loss (Mao et al. 2017; Sec. 4), E[(D(.) - target)^2], a mean."""
    return (pred.float() - target).pow(2).mean()


def d_loss(real, fake):
    """D minimises E[(D(b) - 1)^2] + E[D(G(a))^2], halved "to slow down D" (Sec. 7.1)."""
    return 0.5 * (lsgan(real, 1.0) + lsgan(fake, 0.0))


def l1(x, y):
    """E |x - y|_1 as a mean over pixels and the batch: the cycle (Eq. 2) and identity losses."""
    return (x.float() - y.float()).abs().mean()


def g_step(G_AB, G_BA, D_A, D_B, opt_g, real_A, real_B, lambda_cyc=10.0, lambda_id=0.5):
    """One step of both generators on Eq. 3 + the identity loss; the Ds score but do not learn
    (called unwrapped: no gradient for them). Returns (fake_A, fake_B, stats)."""
    D_A.requires_grad_(False)
    D_B.requires_grad_(False)
    fake_B, fake_A = G_AB(real_A), G_BA(real_B)
    adv = lsgan(D_B(fake_B), 1.0) + lsgan(D_A(fake_A), 1.0)  # G's side of Eq. 1, both directions
    cyc = l1(G_BA(fake_B), real_A) + l1(G_AB(fake_A), real_B)  # Eq. 2: forward + backward cycle
    loss = adv + lambda_cyc * cyc  # Eq. 3
    stats = dict(loss_g=adv.detach(), cyc=cyc.detach())
    if lambda_id > 0:  # Sec. 5.2: a real image of the output domain should pass unchanged
        idt = l1(G_AB(real_B), real_B) + l1(G_BA(real_A), real_A)
        loss = loss + lambda_cyc * lambda_id * idt
        stats["idt"] = idt.detach()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D_A.requires_grad_(True)
    D_B.requires_grad_(True)
    return fake_A.detach(), fake_B.detach(), stats


def kl_term(mu):  # KL(N(mu, I) || N(0, I)) = |mu|^2 / 2, a mean over latent elements as l1's
    return 0.5 * mu.float().pow(2).mean()


def unit_step(U, D_A, D_B, opt_g, real_A, real_B, lambda_l1=10.0, lambda_kl=0.01):
    """One step of UNIT on L_VAE + L_GAN + L_CC of both domains (Eqs. 2-4; lambda_1..4 over
    lambda_0): L1 for Laplacian decoders, LSGAN, the Ds frozen. Returns (fake_A, fake_B, stats)."""
    D_A.requires_grad_(False)
    D_B.requires_grad_(False)
    mu, rec, fake, cyc = U(real_A, real_B)
    vae = l1(rec[0], real_A) + l1(rec[1], real_B)  # Eq. 2: reconstruction, each domain
    adv = lsgan(D_A(fake[0]), 1.0) + lsgan(D_B(fake[1]), 1.0)  # Eq. 3, G's side
    cc = l1(cyc[0], real_A) + l1(cyc[1], real_B)  # Eq. 4: back through the other domain
    kl = [kl_term(m) for m in mu]  # Eq. 2 on the codes; Eq. 4 on them again + the re-encodings
    loss = adv + lambda_l1 * (vae + cc) + lambda_kl * (2 * kl[0] + 2 * kl[1] + kl[2] + kl[3])
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D_A.requires_grad_(True)
    D_B.requires_grad_(True)
    stats = dict(loss_g=adv.detach(), rec=vae.detach(), cyc=cc.detach(), kl=sum(kl).detach())
    return fake[0].detach(), fake[1].detach(), stats


def d_step(D_A, D_B, opt_d, real_A, real_B, fake_A, fake_B):
    """One step of both discriminators on reals and on fakes drawn through the pools."""
    loss_a = d_loss(D_A(real_A), D_A(fake_A))
    loss_b = d_loss(D_B(real_B), D_B(fake_B))
    opt_d.zero_grad(set_to_none=True)
    (loss_a + loss_b).backward()
    opt_d.step()
    return dict(loss_d_a=loss_a.detach(), loss_d_b=loss_b.detach())


def lr_factor(step: int, steps: int) -> float:
    """The paper's schedule: the full rate for the first half, then linearly down to 0."""
    return min(1.0, (steps - step) / max(1, steps - steps // 2))


@torch.no_grad()
def translate(G, x, batch=256):
    """G applied in batches (InstanceNorm has no running statistics: no eval-mode difference)."""
    return torch.cat([G(xb).float() for xb in x.split(batch)])


# -----------------------------------------------------------------------------
# data: two unpaired piles, each served by its own resumable iterator
def morph(x_u8, radius: int):
    """Grey-level erosion (radius < 0) or dilation (> 0) by |radius| half pixels: 3x3 min/max
    filters at twice the resolution, then area-averaged back."""
    h = F.interpolate(x_u8.float() / 255, scale_factor=2, mode="bilinear", align_corners=False)
    for _ in range(abs(radius)):
        h = F.max_pool2d(h, 3, 1, 1) if radius > 0 else -F.max_pool2d(-h, 3, 1, 1)
    return (F.avg_pool2d(h, 2) * 255).round().to(torch.uint8)


def mnist_thickness(cfg, train: bool):
    """uint8 (A, B, yA, yB): A thin digits (eroded by half a pixel), B thick (dilated as much);
    training A from even-numbered digits, B from odd (no pairs); test: A[i], B[i] a pair."""
    x, y = common.load_images(cfg, train, digits=True)
    if train:
        return morph(x[0::2], -1), morph(x[1::2], 1), y[0::2], y[1::2]
    return morph(x, -1), morph(x, 1), y, y


def load_pile(folder: Path, size: int):
    """One flat folder of images, as uint8 (N, 3, size, size); mixed sizes need --image-size."""
    from PIL import Image

    if not folder.is_dir():
        common.die(f"no folder {folder} (CycleGAN's layout: trainA/ trainB/ testA/ testB/)")
    files = [f for f, _ in common.folder_files(str(folder))]
    try:
        sizes = {Image.open(f).size for f in files}
    except OSError as e:
        common.die(f"cannot read an image in {folder}: {e}")
    if len(sizes) > 1 and not size:
        common.die(f"images of mixed sizes in {folder} ({len(sizes)} sizes): pass --image-size")
    return common.load_images(common.Config(dataset=f"folder:{folder}"), size=size)[0]


def unaligned(cfg, train: bool, size: int = 0):
    """--dataset unaligned: <data-dir>/trainA, trainB (testA, testB; the train piles when
    absent). Grey images (all channels equal in both piles) keep one channel."""
    root = Path(cfg.data_dir)
    split = "test" if not train and (root / "testA").is_dir() else "train"
    a, b = (load_pile(root / f"{split}{d}", size) for d in "AB")
    if a.shape[-1] != b.shape[-1]:
        common.die(f"trainA and trainB differ in size ({a.shape[-1]}, {b.shape[-1]}): --image-size")
    if all(torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 0], t[:, 2]) for t in (a, b)):
        a, b = a[:, :1], b[:, :1]
    return a, b, torch.full((len(a),), -1), torch.full((len(b),), -1)  # no labels


def piles(cfg, train: bool):
    """(A, B, yA, yB) uint8 of a split. Unaligned: --image-size is resolved to the piles' own
    size when 0, and the training piles are resized to --load-size for the random crops."""
    if cfg.dataset == "mnist-thickness":
        return mnist_thickness(cfg, train)
    a, b, y_a, y_b = unaligned(cfg, train, cfg.image_size)
    cfg.image_size = a.shape[-1]
    if train:
        load = cfg.load_size or round(cfg.image_size * 286 / 256)
        up = lambda t: F.interpolate(t.float(), size=load, mode="bicubic", align_corners=False)
        a, b = (up(t).round().clamp(0, 255).to(torch.uint8) for t in (a, b))
    return a, b, y_a, y_b


class Unpaired:
    """Batches of A and of B, drawn independently (own seeds), with one resumable state."""

    def __init__(self, a: common.Batches, b: common.Batches):
        self.a, self.b = a, b

    def state_dict(self):
        return {"A": self.a.state_dict(), "B": self.b.state_dict()}

    def load_state_dict(self, s):
        self.a.load_state_dict(s["A"])
        self.b.load_state_dict(s["B"])

    def __next__(self):
        return next(self.a)[0], next(self.b)[0]


def jitter(x, size: int):
    """The paper's augmentation: a random size x size crop of each image, mirrored half the time."""
    i, j = torch.randint(0, x.shape[-1] - size + 1, (2, len(x))).tolist()
    flip = (torch.rand(len(x)) < 0.5).tolist()
    out = [x[k, :, i[k] : i[k] + size, j[k] : j[k] + size] for k in range(len(x))]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip)])


# -----------------------------------------------------------------------------
# training
def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.patch and cfg.patch not in PATCH:
        common.die(f"--patch {cfg.patch}: a PatchGAN receptive field, one of {sorted(PATCH)}")
    if cfg.load_size and cfg.load_size < cfg.image_size:
        common.die(f"--load-size {cfg.load_size} is smaller than --image-size {cfg.image_size}")
    if cfg.arch == "unit" and "lr" not in getattr(cfg, "given", ()):
        cfg.lr = 1e-4  # the paper's (Sec. 4)


def model_args(cfg: Config, ch: int, size: int) -> dict:
    """Constructor arguments of the four networks (saved as model_args)."""
    if size % 4 or size < 16:
        common.die(f"image size {size}: G needs a multiple of 4, at least 16; set --image-size")
    rf = cfg.patch or (70 if size >= 128 else max(r for r in PATCH if r <= max(16, size // 2)))
    if size // 2 ** PATCH[rf] < 2:
        common.die(f"--patch {rf} needs images of at least {2 ** (PATCH[rf] + 1)} px, not {size}")
    ngf, ndf = (16, 16) if cfg.tiny else (cfg.ngf, cfg.ndf)
    blocks = cfg.n_blocks or (6 if size <= 128 else 9)
    G = dict(in_ch=ch, out_ch=ch, ngf=ngf, n_blocks=blocks, upsample=cfg.upsample)
    D = dict(in_ch=ch, ndf=ndf, n_layers=PATCH[rf])
    return dict(U=G, D_A=D, D_B=D) if cfg.arch == "unit" else dict(G_AB=G, G_BA=G, D_A=D, D_B=D)


def build(args: dict, device) -> tuple:
    """The networks of model_args by name, and the two directions as modules (A -> B, B -> A)."""
    kinds = {"G": Generator, "U": UNIT, "D": PatchDiscriminator}
    nets = {k: kinds[k[0]](**v).to(device) for k, v in args.items()}
    U = nets.get("U")
    return nets, ((Translator(U, 0), Translator(U, 1)) if U else (nets["G_AB"], nets["G_BA"]))


def train(cfg: Config):
    """Train both directions; returns (G_AB, G_BA, D_A, D_B)."""
    check_flags(cfg)
    device, autocast = common.setup(cfg)
    a, b, y_a, y_b = piles(cfg, train=True)
    size = cfg.image_size or a.shape[-1]  # unaligned training piles come at --load-size
    args = model_args(cfg, a.shape[1], size)
    nets, (G_AB, G_BA) = build(args, device)
    D_A, D_B = nets["D_A"], nets["D_B"]
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda"
    params = lambda d: [p for k, m in nets.items() if (k[0] == "D") == d for p in m.parameters()]
    opt_g = torch.optim.Adam(params(False), cfg.lr, betas=betas, fused=fused)  # both Gs or U
    opt_d = torch.optim.Adam(params(True), cfg.lr, betas=betas, fused=fused)  # both Ds
    pool_A, pool_B = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)
    flip = cfg.dataset == "unaligned"  # digits are not mirror-symmetric
    batches_a = common.Batches(a, y_a, cfg.batch_size, cfg.seed, device)
    batches_b = common.Batches(b, y_b, cfg.batch_size, cfg.seed + 1, device)  # its own order
    data, start = Unpaired(batches_a, batches_b), 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=(*nets, "opt_g", "opt_d", "pool_A", "pool_B"))
        for k, m in dict(nets, opt_g=opt_g, opt_d=opt_d).items():
            common.load_state(m, ck[k], k)
        pool_A.load_state_dict(ck["pool_A"], device)
        pool_B.load_state_dict(ck["pool_B"], device)
        start = ck["step"]
    w = {k: common.wrap(m, cfg, device) for k, m in nets.items()}  # DDP, compile
    ta, tb, _, _ = piles(cfg, train=False)  # 8 test images of each pile for the pictures
    fixed_a, fixed_b = (t[:8].to(device).float() / 127.5 - 1 for t in (ta, tb))
    unit = cfg.arch == "unit"  # the G step: its function, networks and weights
    step_g, gs = (unit_step, (w["U"],)) if unit else (g_step, (w["G_AB"], w["G_BA"]))
    lambdas = (cfg.lambda_cyc, cfg.lambda_kl if unit else cfg.lambda_id)
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in nets.values()]
        print(
            f"{cfg.arch}: G {sum(n[:-2]):.2f}M + 2 x D {n[-1]:.2f}M params, {cfg.dataset}, "
            f"{len(a)} A + {len(b)} B images {tuple(a.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * lr_factor(step, cfg.steps)  # from the step alone: exact resume
        for g in [*opt_g.param_groups, *opt_d.param_groups]:
            g["lr"] = lr
        real_A, real_B = next(data)
        if flip:  # random crop from --load-size and mirror
            real_A, real_B = jitter(real_A, size), jitter(real_B, size)

        # G step: both generators (CycleGAN: adversarial + cycle + identity; UNIT: VAE + GAN +
        # cycle VAE); the paper's code updates G first, then D on the fakes this step made
        with autocast:
            fake_A, fake_B, stats = step_g(*gs, D_A, D_B, opt_g, real_A, real_B, *lambdas)

        # D step: reals against fakes drawn through the pools
        fake_A, fake_B = pool_A.query(fake_A), pool_B.query(fake_B)
        with autocast:
            stats |= d_step(w["D_A"], w["D_B"], opt_d, real_A, real_B, fake_A, fake_B)

        # log
        loop.add(**stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=lr)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(nets, opt_g=opt_g, opt_d=opt_d, pool_A=pool_A, pool_B=pool_B, lr=lr)
        if loop.end_step(done, **state, model_args=args):
            break

        # picture of fixed test images (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_cycles, G_AB, G_BA, fixed_a, fixed_b, path)
    return G_AB, G_BA, D_A, D_B


# -----------------------------------------------------------------------------
# sampling and evaluation
def save_cycles(G_AB, G_BA, a, b, path):
    """One row per pair of examples: real A | G_AB(a) | G_BA(G_AB(a)) | real B | G_BA(b) | ..."""
    fb, fa = translate(G_AB, a), translate(G_BA, b)
    rows = [a, fb, translate(G_BA, fb), b, fa, translate(G_AB, fa)]
    common.save_grid(torch.stack(rows, 1).flatten(0, 1), path, nrow=6)


def load_trained(cfg: Config):
    """(G forward, G backward) for --direction, rebuilt from model_args, and the checkpoint."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("model_args", "D_A"))
    device, _ = common.setup(cfg)
    nets, gs = build(ck["model_args"], device)
    for k in ck["model_args"]:
        common.load_state(nets[k].eval(), ck.get(k, {}), k)
    return *(gs if cfg.direction == "AtoB" else gs[::-1]), ck, device


def translate_file(cfg: Config, G, device, in_ch: int):
    """--input IMG: G applied to one image of any size divisible by 4 (converted to G's mode)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    try:
        img = Image.open(cfg.input).convert("L" if in_ch == 1 else "RGB")
    except OSError as e:
        common.die(f"cannot read --input {cfg.input}: {e}")
    if img.size[0] % 4 or img.size[1] % 4:
        common.die(f"--input {cfg.input} is {img.size[0]}x{img.size[1]}: G needs multiples of 4")
    out = translate(G, (pil_to_tensor(img)[None].float() / 127.5 - 1).to(device))
    path = Path(cfg.out) / f"{Path(cfg.input).stem}_{cfg.direction}.png"
    common.save_grid(out, path, nrow=1)
    print(f"wrote {path}")


def sample(cfg: Config):
    """--sample N: N source test images translated (samples.npz, arr_1 their labels if any;
    samples.png rows real | out | back), scores on stdout and in <out>/cyclegan_eval.jsonl."""
    G, G_back, ck, device = load_trained(cfg)
    if cfg.input:
        return translate_file(cfg, G, device, ck["model_args"]["D_A"]["in_ch"])
    cfg = common.from_run(cfg, ck)  # the run's --dataset and --data-dir unless given here
    cfg.image_size = ck["config"]["image_size"]
    a, b, y_a, y_b = piles(cfg, train=False)
    src, tgt, y = (a, b, y_a) if cfg.direction == "AtoB" else (b, a, y_b)
    n = min(cfg.sample, len(src))
    x = src[:n].float() / 127.5 - 1
    out = torch.cat([translate(G, xb.to(device)).cpu() for xb in x.split(cfg.batch_size)])
    rec = torch.cat([translate(G_back, ob.to(device)).cpu() for ob in out.split(cfg.batch_size)])
    common.save_samples(cfg.out, out, y[:n] if (y >= 0).all() else None)
    rows = torch.stack([x[:32], out[:32], rec[:32]], 1).flatten(0, 1)  # replaces samples.png
    common.save_grid(rows, Path(cfg.out) / "samples.png", nrow=6)
    if isinstance(G, Translator):  # UNIT's shared latent space: straight lines across domains
        save_interp(G.unit, *(t[:8].float().to(device) / 127.5 - 1 for t in (a, b)), cfg.out)
    res = dict(n=n, direction=cfg.direction, dataset=cfg.dataset)
    res |= scores(x, out, rec, src, tgt, paired=cfg.dataset == "mnist-thickness")
    print(json.dumps(res))
    with open(Path(cfg.out) / "cyclegan_eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(f"wrote {n} translations to {cfg.out}/samples.npz and samples.png (real | out | rec)")


@torch.no_grad()
def save_interp(U: UNIT, a, b, out, n: int = 8):
    """<out>/interp.png: lines from E_A(a) to E_B(b) in the shared latent, decoded into A (odd
    rows) and B (even rows): what CycleGAN, with no latent space, cannot draw."""
    za, zb = U.encode(a, 0), U.encode(b, 1)  # (P, C, h, w)
    t = torch.linspace(0, 1, n, device=za.device).view(n, 1, 1, 1)
    rows = [U.decode(za[i] + t * (zb[i] - za[i]), d) for i in range(len(a)) for d in (0, 1)]
    common.save_grid(torch.cat(rows).float(), Path(out) / "interp.png", nrow=n)


def scores(x, out, rec, src_u8, tgt_u8, paired: bool) -> dict:
    """Pixels in [0, 1]. cycle_l1 = |G_back(G(x)) - x|; mass_moved: how far the outputs' mean ink
    went from the source pile's mean to the target's (0: not, 1: all the way); for paired test
    piles (mnist-thickness), L1 and PSNR against each output's counterpart."""
    x, out, rec = ((t + 1) / 2 for t in (x, out, rec))
    m_src, m_tgt, m_out = (t.float().mean().item() for t in (src_u8 / 255, tgt_u8 / 255, out))
    res = dict(cycle_l1=(rec - x).abs().mean().item(), mass_src=m_src, mass_tgt=m_tgt)
    res |= dict(mass_out=m_out, mass_moved=(m_out - m_src) / (m_tgt - m_src or 1e-12))
    if paired:
        t = tgt_u8[: len(out)].float() / 255
        psnr = -10 * torch.log10((out - t).pow(2).flatten(1).mean(1).clamp_min(1e-10))
        res |= dict(l1=(out - t).abs().mean().item(), psnr=psnr.mean().item())
        res |= dict(l1_source_as_output=(x - t).abs().mean().item())
    return res


if __name__ == "__main__":
    cfg = common.parse(Config, "cyclegan")
    check_flags(cfg)
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
