"""
StarGAN: Choi et al. 2018, "StarGAN: Unified Generative Adversarial Networks for Multi-Domain
Image-to-Image Translation" (arXiv:1711.09020).

One generator for every domain. A domain is a vector of attribute labels c (hair colour, sex,
age); G(x, c) takes the image with c tiled over space as extra channels and returns x in domain
c. D has two heads on shared features: D_src, a patch map of real/fake scores, and D_cls, the
attribute logits. D learns to classify real images' attributes (L_cls^r, Eq. 2); G learns to make
images that D classifies as the target c (L_cls^f, Eq. 3) and that map back to the input under
the original labels c' (L_rec = |x - G(G(x, c), c')|_1, Eq. 4), with lambda_cls = 1,
lambda_rec = 10 (Eq. 5). The adversarial loss is WGAN-GP (Eq. 8, lambda_gp = 10), 5 D steps
per G step, Adam 1e-4 (0.5, 0.999), the learning rate decaying linearly to 0 over the second
half. Targets c are the batch's own labels shuffled, so exclusive groups (one hair colour) stay
one-hot. Images are in [-1, 1]. Left out: the mask vector for training on two datasets (Sec. 3.2).

  python stargan.py --digits mnist-12k                   # built-in mnist-styles: colour, thick
  python stargan.py --dataset celeba --data-dir data --image-size 128 \\
      --attrs Black_Hair,Blond_Hair,Brown_Hair,Male,Young --steps 200000   # the paper's setup
  python stargan.py --sample 2500                        # test images to random targets
  python stargan.py --sample 1 --input face.jpg --set Blond_Hair=1,Male=0
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
    dataset: str = "mnist-styles"  # mnist-styles | celeba | folder:PATH (metadata.jsonl attrs)
    digits: str = "mnist"  # the digits of the built-in mnist-* tasks: mnist | mnist-12k
    attrs: str = ""  # domains, comma-separated; default: all of mnist-styles, the paper's 5 CelebA
    steps: int = 20000  # G steps are steps / n_critic
    batch_size: int = 16  # the paper's
    lr: float = 1e-4  # Adam, G and D (Sec. 4)
    beta1: float = 0.5  # Adam
    beta2: float = 0.999  # Adam
    n_critic: int = 5  # D steps per G step
    lambda_cls: float = 1.0  # Eq. 5
    lambda_rec: float = 10.0  # Eq. 5
    lambda_gp: float = 10.0  # Eq. 8
    lambda_id: float = 0.0  # not in the paper: |G(x, c_org) - x|_1 weighted lambda_id lambda_rec
    g_dim: int = 64  # G's base width; --tiny: 16
    d_dim: int = 64  # D's base width; --tiny: 16
    g_blocks: int = 6  # residual blocks in G
    set: str = ""  # --sample --input: target attributes, e.g. Blond_Hair=1,Male=0
    input: str = ""  # --sample: translate this image file instead of the test split
    at_least = dict(batch_size=2, n_critic=1, g_dim=1, d_dim=1, g_blocks=0, lambda_cls=0)
    at_least |= dict(lambda_rec=0, lambda_gp=0, lambda_id=0)
    choices = dict(digits=("mnist", "mnist-12k"))


# -----------------------------------------------------------------------------
# model: App. 7.1, the generator of CycleGAN with the label channels, a PatchGAN with two heads
def norm(c: int) -> nn.InstanceNorm2d:
    # affine, no running statistics: the official code tracks them but always runs in train mode
    return nn.InstanceNorm2d(c, affine=True, track_running_stats=False)


class ResBlock(nn.Module):
    """x + [conv3x3, IN, ReLU, conv3x3, IN](x)."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, bias=False), norm(c), nn.ReLU(True),
            nn.Conv2d(c, c, 3, 1, 1, bias=False), norm(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.net(x)


class Generator(nn.Module):
    """(x (B, img_ch, S, S), c (B, c_dim)) -> (B, img_ch, S, S), S divisible by 4: conv7x7,
    two 4x4 stride-2 downsamplings, n_blocks residual blocks, two 4x4 transposed convs,
    conv7x7, tanh."""

    def __init__(self, c_dim=5, dim=64, n_blocks=6, img_ch=3):
        super().__init__()
        layers, c = [nn.Conv2d(img_ch + c_dim, dim, 7, 1, 3, bias=False), norm(dim)], dim
        layers.append(nn.ReLU(True))  # (B, img_ch + c_dim, S, S) -> (B, dim, S, S)
        for _ in range(2):  # (B, c, s, s) -> (B, 2c, s/2, s/2)
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), norm(2 * c), nn.ReLU(True)]
            c *= 2
        layers += [ResBlock(c) for _ in range(n_blocks)]  # (B, 4 dim, S/4, S/4) throughout
        for _ in range(2):  # (B, c, s, s) -> (B, c/2, 2s, 2s)
            up = nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False)  # no bias: IN removes it
            layers += [up, norm(c // 2), nn.ReLU(True)]
            c //= 2
        self.net = nn.Sequential(*layers, nn.Conv2d(c, img_ch, 7, 1, 3, bias=False), nn.Tanh())
        # tanh: outputs in [-1, 1], the images' range

    def forward(self, x, c):
        c = c[:, :, None, None].expand(-1, -1, *x.shape[-2:])  # (B, c_dim, S, S): c tiled
        return self.net(torch.cat([x, c.to(x.dtype)], 1))


class Discriminator(nn.Module):
    """x (B, img_ch, S, S) -> (D_src (B, 1, s, s), D_cls (B, c_dim)): n_layers 4x4 stride-2 convs
    (widths doubling, LeakyReLU 0.01, no normalisation: the gradient penalty is per sample) down
    to s = S / 2^n_layers; D_src is a 3x3 conv on that map, D_cls a conv over all of it."""

    def __init__(self, size=128, c_dim=5, dim=64, n_layers=6, img_ch=3):
        super().__init__()
        layers, c = [nn.Conv2d(img_ch, dim, 4, 2, 1), nn.LeakyReLU(0.01)], dim  # (B, dim, S/2, S/2)
        for _ in range(n_layers - 1):  # (B, c, s, s) -> (B, 2c, s/2, s/2)
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.01)]
            c *= 2
        self.net = nn.Sequential(*layers)
        self.src = nn.Conv2d(c, 1, 3, 1, 1, bias=False)  # a critic score per patch: no sigmoid
        # D_cls: a kernel as large as the map, so one logit per attribute: (B, c_dim, 1, 1)
        self.cls = nn.Conv2d(c, c_dim, size >> n_layers, bias=False)

    def forward(self, x):
        h = self.net(x)  # (B, c, s, s)
        return self.src(h), self.cls(h).flatten(1)  # (B, 1, s, s), logits (B, c_dim)


# -----------------------------------------------------------------------------
# method: the losses of Eq. 2-5 and 8, the D and G steps, targets
def domain_loss(logits, target, groups=()):
    """-log D_cls(c | x) (Eq. 2, 3): cross-entropy over each exclusive group of attributes (one
    hair colour), binary cross-entropy with logits on each other attribute; summed over
    attributes and groups, a mean over the batch."""
    loss, rest = logits.new_zeros(()), torch.ones(logits.shape[1], dtype=torch.bool)  # (c_dim,)
    for g in groups:
        loss = loss + F.cross_entropy(logits[:, g].float(), target[:, g].argmax(1))  # softmax
        rest[g] = False
    if rest.any():
        bce = F.binary_cross_entropy_with_logits(logits[:, rest].float(), target[:, rest].float())
        loss = loss + bce * int(rest.sum())  # the mean over attributes, back to their sum
    return loss


def gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al. 2017; StarGAN Eq. 8): E[(|grad_x_hat D_src(x_hat)|_2 - 1)^2] on
    x_hat uniformly between a real and a fake image."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)  # (B, 1, 1, 1): one per pair
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = critic(x_hat).float()  # (B, ...): a score map; its sum keeps samples separate
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)  # d/dx_hat of each sample
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()  # two-sided: |grad| pulled to 1


def d_step(G, D, opt_d, x, c_org, c_trg, groups, lambda_cls=1.0, lambda_gp=10.0):
    """L_D = -L_adv + lambda_cls L_cls^r (Eq. 5), L_adv the WGAN-GP critic loss (Eq. 8)."""
    with torch.no_grad():  # the D step does not train G: no graph through it
        fake = G(x, c_trg)
    src_real, cls_real = D(x)
    src_fake, _ = D(fake)
    adv = src_fake.float().mean() - src_real.float().mean()  # the critic's side of Eq. 8
    cls = domain_loss(cls_real, c_org, groups)  # Eq. 2: classify reals by their own labels
    gp = gradient_penalty(lambda v: D(v)[0], x, fake)  # on D_src only, as the paper's code
    loss = adv + lambda_cls * cls + lambda_gp * gp  # Eq. 5 (D side) with Eq. 8's penalty
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return dict(d_adv=adv.detach(), d_cls=cls.detach(), gp=gp.detach())


def g_step(G, D, opt_g, x, c_org, c_trg, groups, lambda_cls=1.0, lambda_rec=10.0, lambda_id=0.0):
    """L_G = L_adv + lambda_cls L_cls^f + lambda_rec L_rec (Eq. 5), through D frozen; with
    lambda_id > 0 also lambda_id lambda_rec |G(x, c_org) - x|_1, CycleGAN's identity loss (its
    Sec. 5.2; StarGAN-VC's L_id), which the paper does not have: L_rec only sees the round trip,
    so G may turn digits into other digits and back (docs/results.md#starganpy)."""
    D.requires_grad_(False)  # D passes G's gradient on but is not updated here
    fake = G(x, c_trg)
    src, cls_logits = D(fake)
    adv = -src.float().mean()  # WGAN generator loss: raise the critic's score of the fakes
    cls = domain_loss(cls_logits, c_trg, groups)  # Eq. 3: fakes classified as their targets
    rec = (G(fake, c_org).float() - x.float()).abs().mean()  # Eq. 4: back to the original labels
    loss, stats = adv + lambda_cls * cls + lambda_rec * rec, {}
    if lambda_id > 0:  # the source's own domain: G should change nothing
        idt = (G(x, c_org).float() - x.float()).abs().mean()
        loss, stats = loss + lambda_id * lambda_rec * idt, dict(idt=idt.detach())
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return dict(g_adv=adv.detach(), g_cls=cls.detach(), rec=rec.detach(), **stats)


def shuffled_targets(c_org):
    """Target domains as the official code draws them: the batch's labels in a random order."""
    return c_org[torch.randperm(len(c_org), device=c_org.device)]  # real rows: valid domains


def domain_targets(c_org, groups):
    """The --sample columns: for each exclusive group, each of its members set (one-hot); for
    each other attribute, that attribute flipped. Returns [(name index, (B, c_dim))]."""
    out, grouped = [], {i for g in groups for i in g}
    for g in groups:
        for i in g:
            c = c_org.clone()
            c[:, g] = 0  # clear the group, then set one member: one-hot kept
            c[:, i] = 1
            out.append((i, c))
    for i in range(c_org.shape[1]):
        if i not in grouped:
            c = c_org.clone()
            c[:, i] = 1 - c[:, i]
            out.append((i, c))
    return out


def lr_factor(step: int, steps: int) -> float:
    """The full rate for the first half, then linearly down to 0 at the end."""
    return min(1.0, (steps - step) / max(1, steps - steps // 2))


@torch.no_grad()
def translate(G, x, c, batch=256):
    return torch.cat([G(xb, cb).float() for xb, cb in zip(x.split(batch), c.split(batch))])


# -----------------------------------------------------------------------------
# data: images with attribute vectors; exclusive groups found by name
GROUPS = [("red", "green", "blue"), ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]
STYLES = ["red", "green", "blue", "thick"]
CELEBA = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]


def groups_of(attrs: list) -> list:
    """Index lists of the exclusive groups with at least two members among `attrs`."""
    idx = [[attrs.index(a) for a in g if a in attrs] for g in GROUPS]
    return [g for g in idx if len(g) > 1]


def dilate(x_u8):
    """Thicker strokes: grey-level dilation by half a pixel on each side (a 3x3 max filter at
    twice the resolution, area-averaged back)."""
    h = F.interpolate(x_u8.float() / 255, scale_factor=2, mode="bilinear", align_corners=False)
    return (F.avg_pool2d(F.max_pool2d(h, 3, 1, 1), 2) * 255).round().to(torch.uint8)


def mnist_styles(cfg, train: bool):
    """The built-in task: each digit padded to 32x32, its ink in one channel (red, green or
    blue: an exclusive group) and dilated or not ("thick"), drawn from a fixed seed per split,
    so the labels are exact. Returns uint8 (N, 3, 32, 32), attributes (N, 4), digit labels."""
    x, y = common.load_images(cfg, train, digits=True)
    g = torch.Generator().manual_seed(0 if train else 1)
    colour = torch.randint(3, (len(x),), generator=g)  # (N,): 0 red, 1 green, 2 blue
    thick = torch.randint(2, (len(x),), generator=g)  # (N,): independent of the colour
    return render(x, colour, thick), torch.cat([F.one_hot(colour, 3), thick[:, None]], 1), y


def render(x_u8, colour, thick):
    """Grey 28x28 digits -> (N, 3, 32, 32) uint8 with the ink in channel `colour`, dilated where
    `thick`."""
    x = torch.where(thick[:, None, None, None].bool(), dilate(x_u8), x_u8)  # (N, 1, 28, 28)
    # pad to 32 (D halves it down to 2x2), then (N, 1, 32, 32) x (N, 3, 1, 1): ink in one channel
    return F.pad(x, (2, 2, 2, 2)) * F.one_hot(colour, 3)[:, :, None, None].to(torch.uint8)


def celeba_attrs(cfg, names: list):
    """The columns of CelebA's list_attr_celeba.txt for `names`."""
    path = Path(cfg.data_dir) / "celeba" / "list_attr_celeba.txt"
    try:
        header = path.read_text().splitlines()[1].split()
    except OSError:
        common.die(f"no {path}: CelebA's attribute file (torchvision's layout under --data-dir)")
    unknown = [a for a in names if a not in header]
    if unknown:
        common.die(f"--attrs: {', '.join(unknown)} not among CelebA's 40 attributes")
    return [header.index(a) for a in names]


def folder_attrs(root: str, names: list, size: int):
    """folder:PATH with metadata.jsonl, a line per image: {"file_name": ..., "attrs": {...}}."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    meta = Path(root) / "metadata.jsonl"
    if not meta.is_file():
        common.die(f'no {meta} (a line per image: {{"file_name": ..., "attrs": {{...}}}})')
    try:
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        names = names or sorted({k for r in rows for k in r["attrs"]})
        c = torch.tensor([[float(r["attrs"].get(a, 0)) for a in names] for r in rows])
        imgs = [Image.open(Path(root) / r["file_name"]).convert("RGB") for r in rows]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        common.die(f"{meta}: {type(e).__name__}: {str(e)[:100]}")
    size = size or min(imgs[0].size)
    x = torch.stack([TF.pil_to_tensor(TF.center_crop(TF.resize(im, size), size)) for im in imgs])
    return x, c, names


def load_data(cfg, train: bool):
    """(uint8 images, attribute vectors (N, c_dim) of 0/1, digit labels or None, names)."""
    names = [a for a in cfg.attrs.split(",") if a]
    if cfg.dataset == "mnist-styles":
        names = names or STYLES
        if set(names) - set(STYLES):
            common.die(f"--attrs for mnist-styles: a subset of {','.join(STYLES)}")
        x, c, y = mnist_styles(cfg, train)
        return x, c[:, [STYLES.index(a) for a in names]].float(), y, names
    if cfg.dataset.startswith("folder:"):
        x, c, names = folder_attrs(cfg.dataset[len("folder:") :], names, cfg.image_size)
        return x, c, None, names
    if cfg.dataset != "celeba":
        common.die(f"--dataset {cfg.dataset!r}: mnist-styles, celeba or folder:PATH")
    names = names or CELEBA
    cols = celeba_attrs(cfg, names)
    x, a = common.load_images(dataclasses.replace(cfg, image_size=cfg.image_size or 128), train)
    return x, a[:, cols].float(), None, names


def parse_set(spec: str, names: list, groups: list):
    """--set Blond_Hair=1,Male=0 -> a target vector (c_dim,): unset attributes are 0; setting one
    member of an exclusive group to 1 clears the others; two of one group is an error."""
    c = torch.zeros(len(names))
    try:
        pairs = dict(kv.split("=") for kv in spec.split(",") if kv)
        on = {names.index(k): float(v) for k, v in pairs.items()}
    except ValueError:
        common.die(
            f"--set {spec!r}: name=0|1 pairs, comma-separated, names among {','.join(names)}"
        )
    if any(v not in (0.0, 1.0) for v in on.values()):  # labels are 0/1, as D_cls learned them
        common.die(f"--set {spec!r}: each value is 0 or 1")
    for g in groups:
        if sum(on.get(i, 0) > 0 for i in g) > 1:
            common.die(f"--set {spec!r}: at most one of {','.join(names[i] for i in g)} can be 1")
    for i, v in on.items():
        c[i] = v
    return c


# -----------------------------------------------------------------------------
# training
def model_args(cfg: Config, ch: int, size: int, c_dim: int) -> dict:
    """G and D constructor arguments (saved as model_args): D halves the image down to 2x2 (6
    layers at the paper's 128 px), or to the smallest size the image divides into."""
    if size % 4 or size < 8:
        common.die(f"image size {size}: G needs a multiple of 4, at least 8; set --image-size")
    n = 1
    while size % 2 ** (n + 1) == 0 and size >> (n + 1) >= 2:
        n += 1
    g_dim, d_dim = (16, 16) if cfg.tiny else (cfg.g_dim, cfg.d_dim)
    G = dict(c_dim=c_dim, dim=g_dim, n_blocks=cfg.g_blocks, img_ch=ch)
    return {"G": G, "D": dict(size=size, c_dim=c_dim, dim=d_dim, n_layers=n, img_ch=ch)}


def train(cfg: Config):
    """n_critic D steps per G step on (image, attributes) batches; returns (G, D)."""
    device, autocast = common.setup(cfg)
    x, c, _, names = load_data(cfg, train=True)
    groups = groups_of(names)
    args = model_args(cfg, x.shape[1], x.shape[-1], len(names))
    G, D = Generator(**args["G"]).to(device), Discriminator(**args["D"]).to(device)
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=betas, fused=fused)
    flip = cfg.dataset != "mnist-styles"  # faces are mirror-symmetric, digits are not
    data = common.Batches(x, c, cfg.batch_size, cfg.seed, device, flip=flip)
    start, g_stats = 0, {}
    if cfg.resume:
        ck = common.resume(cfg, data, need=("G", "D", "opt_g", "opt_d", "attrs", "g_stats"))
        if ck["attrs"] != names:
            common.die(f"{cfg.out}/ckpt.pt was trained on --attrs {','.join(ck['attrs'])}")
        for k, m in dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d).items():
            common.load_state(m, ck[k], k)
        start, g_stats = ck["step"], {k: v.to(device) for k, v in ck["g_stats"].items()}
    G_, D_ = common.wrap(G, cfg, device), common.wrap(D, cfg, device)
    tx, tc, _, _ = load_data(cfg, train=False)  # 8 test images for the pictures
    fixed = tx[:8].to(device).float() / 127.5 - 1, tc[:8].to(device)
    loop = common.Loop(cfg, data, start)
    lambdas = cfg.lambda_cls, cfg.lambda_rec, cfg.lambda_id
    if common.rank() == 0:
        n = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D)]
        print(
            f"stargan: G {n[0]:.2f}M + D {n[1]:.2f}M params, {cfg.dataset} ({','.join(names)}), "
            f"{len(x)} images {tuple(x.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr * lr_factor(step, cfg.steps)  # from the step alone: exact resume
        for g in [*opt_g.param_groups, *opt_d.param_groups]:
            g["lr"] = lr
        real, c_org = next(data)
        c_trg = shuffled_targets(c_org)

        # D step: WGAN-GP critic + domain classification of the reals
        with autocast:
            stats = d_step(G_, D_, opt_d, real, c_org, c_trg, groups, cfg.lambda_cls, cfg.lambda_gp)

        # G step, every n_critic D steps: adversarial + domain + reconstruction
        if done % cfg.n_critic == 0:
            with autocast:
                g_stats = g_step(  # D unwrapped: it only passes G's gradient on
                    G_, D, opt_g, real, c_org, c_trg, groups, *lambdas
                )

        # log (the G losses are those of the latest G step)
        loop.add(**stats, **g_stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done, lr=lr)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, model_args=args, attrs=names)
        if loop.end_step(done, **state, groups=groups, g_stats=g_stats):  # G's latest losses
            break

        # picture of fixed test images (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_domains, G, *fixed, groups, path)
    return G, D


# -----------------------------------------------------------------------------
# sampling and evaluation
def save_domains(G, x, c, groups, path):
    """One row per image: the input, then one column per target domain (domain_targets)."""
    cols = [x] + [translate(G, x, t) for _, t in domain_targets(c, groups)]
    common.save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=len(cols))


def load_trained(cfg: Config):
    """G rebuilt from the checkpoint's model_args, the checkpoint, the device."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("G", "model_args", "attrs", "groups"))
    device, _ = common.setup(cfg)
    G = Generator(**ck["model_args"]["G"]).to(device)
    common.load_state(G, ck["G"], "generator")
    return G, ck, device


def translate_file(cfg: Config, G, ck, device):
    """--input IMG --set a=1,b=0: one image to the domain --set names (unset attributes 0)."""
    import numpy as np
    from PIL import Image

    c = parse_set(cfg.set, ck["attrs"], ck["groups"])
    size = ck["model_args"]["D"]["size"]
    try:
        img = Image.open(cfg.input).convert("RGB" if ck["model_args"]["G"]["img_ch"] == 3 else "L")
    except OSError as e:
        common.die(f"cannot read --input {cfg.input}: {e}")
    if img.size != (size, size):
        common.die(
            f"--input {cfg.input} is {img.size[0]}x{img.size[1]}; the model takes {size}x{size}"
        )
    x = torch.from_numpy(np.array(img)).float().reshape(size, size, -1).permute(2, 0, 1)
    out = translate(G, (x[None] / 127.5 - 1).to(device), c[None].to(device))
    path = Path(cfg.out) / f"{Path(cfg.input).stem}_translated.png"
    common.save_grid(out, path, nrow=1)
    print(f"wrote {path} (target {dict(zip(ck['attrs'], c.tolist()))})")


def sample(cfg: Config):
    """--sample N: the first N test images, each to a random target domain (one of the grid's
    columns); samples.npz: arr_0 outputs, arr_1 digit labels (mnist-styles), arr_2 targets;
    samples.png: a row per image, a column per domain; scores in <out>/stargan_eval.jsonl."""
    G, ck, device = load_trained(cfg)
    if cfg.input:
        return translate_file(cfg, G, ck, device)
    cfg = common.from_run(cfg, ck)  # the run's --dataset and --data-dir unless given here
    cfg.attrs, cfg.image_size = ",".join(ck["attrs"]), ck["model_args"]["D"]["size"]
    x, c_org, y, names = load_data(cfg, train=False)
    n, groups = min(cfg.sample, len(x)), ck["groups"]
    x, c_org = x[:n].float() / 127.5 - 1, c_org[:n]  # uint8 -> [-1, 1]
    targets = torch.stack([t for _, t in domain_targets(c_org, groups)], 1)  # (n, K, c_dim)
    pick = torch.randint(targets.shape[1], (n,), generator=torch.Generator().manual_seed(cfg.seed))
    c_trg = targets[torch.arange(n), pick]  # (n, c_dim): one column of the grid per image
    out = translate(G, x.to(device), c_trg.to(device), cfg.batch_size).cpu()
    rec = translate(G, out.to(device), c_org.to(device), cfg.batch_size).cpu()
    labels = [y[:n] if y is not None else torch.full((n,), -1), c_trg]  # arr_1, arr_2
    common.save_samples(cfg.out, out, labels)
    save_domains(G, x[:8].to(device), c_org[:8].to(device), groups, Path(cfg.out) / "samples.png")
    rec_l1 = (rec - x).abs().mean() / 2  # |G(G(x, c), c') - x| in [0, 1] pixel units
    res = dict(n=n, dataset=cfg.dataset, rec_l1=rec_l1.item())
    if cfg.dataset == "mnist-styles":
        res |= style_scores(cfg, out, c_trg, names, n)
    print(json.dumps(res))
    with open(Path(cfg.out) / "stargan_eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(f"wrote {n} translations to {cfg.out}/samples.npz (targets in arr_2) and samples.png")


def style_scores(cfg, out, c_trg, names, n) -> dict:
    """mnist-styles, from the pixels: colour = the channel with the most ink; thick = more ink
    than halfway between the plain and the dilated rendering of the same test digit."""
    digits, _ = common.load_images(cfg, False, digits=True)
    ink = ((out + 1) / 2).clamp(0, 1).sum((2, 3))  # (n, 3): ink per channel
    res, zero = {}, torch.zeros(n, dtype=torch.long)
    if {"red", "green", "blue"} <= set(names):
        want = c_trg[:, [names.index(k) for k in ("red", "green", "blue")]].argmax(1)
        res["colour_acc"] = (ink.argmax(1) == want).float().mean().item()
    if "thick" in names:
        ink_of = lambda t: render(digits[:n], zero, torch.full((n,), t)).float().sum((1, 2, 3))
        pred = ink.sum(1) > (ink_of(0) + ink_of(1)) / 255 / 2  # the same digit, plain and thick
        res["thick_acc"] = (pred == c_trg[:, names.index("thick")].bool()).float().mean().item()
    return res


if __name__ == "__main__":
    cfg = common.parse(Config, "stargan")
    if not cfg.sample:
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling runs in one process
        sample(cfg)
