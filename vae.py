"""
VAE: Kingma & Welling 2014 (arXiv:1312.6114), with the IWAE bound of Burda et al. 2016
(arXiv:1509.00519) to measure it. `--ae`: the plain autoencoder it fixes.

An encoder q(z|x) = N(mu, diag(sigma^2)) and a decoder p(x|z) are trained together by maximising
the ELBO, log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) (Eq. 3), through the
reparameterization z = mu + sigma * eps (Eq. 4); the KL is analytic (Eq. 10, App. B). Because the
KL pulls every q(z|x) toward N(0, I), decoding z ~ N(0, I) gives digits. A plain AE (`--ae`) has
no such pull: its codes sit wherever the encoder puts them, and its "prior samples" are mush.
Pixels are in [0, 1] in this file (converted once, in `to_unit`): Bernoulli on dynamically
binarized digits (MNIST default), or an 8-bit discretized Gaussian (`--likelihood gaussian`).
Reductions: log-likelihoods and KLs are summed over pixels and latent dims, averaged over a batch.
Left out on purpose: hierarchical latents, flows in q, and free bits.

  python vae.py --data-dir ../shared/data            # MNIST, Bernoulli decoder
  python vae.py --nll 1000                           # test ELBO and IWAE log p(x), K=1000
  python vae.py --sample 64                          # prior samples (Bernoulli means)
  python vae.py --ae --out runs/ae                   # the baseline: an AE cannot sample
  python vae.py --dataset cifar10 --likelihood gaussian
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
    steps: int = 20000
    lr: float = 1e-3  # Adam (Kingma & Welling used Adagrad; Adam is the modern default)
    ch: int = 32  # encoder's first width, doubled at each downsampling; --tiny: 16
    z_dim: int = 32  # latent dims; --tiny: 8
    ae: bool = False  # a plain autoencoder: z = mu, no noise, no KL
    beta: float = 1.0  # KL weight (beta-VAE, Higgins et al. 2017); the ELBO is beta = 1
    likelihood: str = "auto"  # auto (bernoulli for mnist, else gaussian) | bernoulli | gaussian
    nll: int = 0  # K > 0: no training; test ELBO and IWAE log p(x) with K samples per image
    nll_n: int = 0  # test images for --nll (0: the whole split)


# -----------------------------------------------------------------------------
# model: a convolutional encoder and a mirrored decoder
DOWN = {28: 2, 32: 2, 64: 3}  # image size -> stride-2 stages (to 7x7, 8x8, 8x8)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """The one place where images change range: the loader's [-1, 1] -> [0, 1] pixels."""
    return (x + 1) / 2


class Encoder(nn.Module):
    """q(z|x): conv stages halving the size and doubling the width, then (mu, logvar)."""

    def __init__(self, in_ch: int, ch: int, z_dim: int, size: int):
        super().__init__()
        n, layers = DOWN[size], [nn.Conv2d(in_ch, ch, 3, padding=1), nn.SiLU()]
        for i in range(n):
            c = ch * 2**i
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU()]  # fmt: skip
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(ch * 2**n * (size // 2**n) ** 2, 2 * z_dim)

    def forward(self, x):
        mu, logvar = self.head(self.net(x)).chunk(2, dim=1)  # (B, z_dim) each
        return mu, logvar


class Decoder(nn.Module):
    """p(x|z): the encoder mirrored; outputs Bernoulli logits or Gaussian means, per pixel."""

    def __init__(self, out_ch: int, ch: int, z_dim: int, size: int):
        super().__init__()
        n = DOWN[size]
        self.shape = (ch * 2**n, size // 2**n, size // 2**n)
        self.fc = nn.Sequential(nn.Linear(z_dim, math.prod(self.shape)), nn.SiLU())
        layers = []
        for i in reversed(range(n)):
            c = ch * 2**i
            layers += [nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]  # fmt: skip
        self.net = nn.Sequential(*layers, nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, z):
        return self.net(self.fc(z).view(-1, *self.shape))  # (B, C, H, W)


class VAE(nn.Module):
    """Encoder + decoder; a Gaussian decoder also learns its noise scale, log sigma per channel."""

    def __init__(self, in_ch=1, ch=32, z_dim=32, size=28, gaussian=False):
        super().__init__()
        self.encoder, self.decoder = (
            Encoder(in_ch, ch, z_dim, size),
            Decoder(in_ch, ch, z_dim, size),
        )
        self.log_scale = nn.Parameter(torch.full((in_ch, 1, 1), -2.0)) if gaussian else None

    def forward(self, x01, ae: bool = False):
        """x in [0, 1] -> (decoder output, mu, logvar, log_scale); `ae` decodes mu itself."""
        mu, logvar = self.encoder(x01 * 2 - 1)  # centred input for the first conv
        z = mu if ae else reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar, self.log_scale  # log_scale returned: DDP sees it used


# -----------------------------------------------------------------------------
# method: the ELBO, its parts, and the importance-weighted bound
def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps, eps ~ N(0, I) (Eq. 4): a sample that gradients can flow through."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims: Eq. 10 / App. B, as a positive KL."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))), summed over the last dim."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def discretized_gaussian_loglik(x01, mean, log_scale):
    """log P(x) for 8-bit pixels in [0, 1]: N(mean, sigma^2) integrated over each pixel's bin of
    width 1/255; the bins at 0 and 1 take the tails, so the 256 probabilities sum to 1."""
    a, inv = 0.5 / 255, torch.exp(-log_scale)
    lo, hi = inv * (x01 - mean - a), inv * (x01 - mean + a)
    mid = torch.log((torch.special.ndtr(hi) - torch.special.ndtr(lo)).clamp_min(1e-12))
    left, right = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo)
    return torch.where(x01 < a, left, torch.where(x01 > 1 - a, right, mid))


def log_px(x01, out, likelihood: str, log_scale=None):
    """log p(x|z) per image, summed over pixels: Bernoulli (out = logits) or discretized Gaussian."""
    if likelihood == "bernoulli":  # x01 binary; BCE is -log Bernoulli(x; sigmoid(logits))
        ll = -F.binary_cross_entropy_with_logits(out, x01, reduction="none")
    else:
        ll = discretized_gaussian_loglik(x01, out, log_scale)
    return ll.flatten(1).sum(1)


def decoder_mean(out, likelihood: str):
    """The decoder's mean image in [0, 1]: Bernoulli probabilities or clamped Gaussian means."""
    return torch.sigmoid(out) if likelihood == "bernoulli" else out.clamp(0, 1)


def loss_terms(model, x01, likelihood: str, beta=1.0, ae=False):
    """Per-batch means of -log p(x|z), KL and the loss -(log p(x|z) - beta KL); --ae: no KL."""
    out, mu, logvar, log_scale = model(x01, ae)
    out, mu, logvar = out.float(), mu.float(), logvar.float()  # the objective in float32
    rec = -log_px(x01, out, likelihood, log_scale).mean()  # a 1-sample estimate
    kl = torch.zeros_like(rec) if ae else gaussian_kl(mu, logvar).mean()
    return rec + beta * kl, rec, kl


@torch.no_grad()
def iwae_bound(model, x01, K: int, likelihood: str, chunk: int = 256):
    """Per image: (IWAE bound log 1/K sum_k w_k, ELBO mean_k log w_k), w_k = p(x, z_k) / q(z_k|x),
    z_k ~ q(z|x) (Burda et al. Sec. 3). By Jensen IWAE >= ELBO for the same draws; K = 1 is the ELBO."""
    mu, logvar = model.encoder(x01 * 2 - 1)  # (B, z)
    logw = []
    for k0 in range(0, K, chunk):
        k = min(chunk, K - k0)
        z = reparameterize(mu.expand(k, *mu.shape), logvar.expand(k, *mu.shape))  # (k, B, z)
        out = model.decoder(z.flatten(0, 1))  # (k*B, C, H, W)
        xk = x01.expand(k, *x01.shape).flatten(0, 1)
        lpx = log_px(xk, out, likelihood, model.log_scale).view(k, -1)  # (k, B)
        log_pz = -0.5 * (math.log(2 * math.pi) + z.pow(2)).sum(-1)  # log N(z; 0, I)
        logw.append(lpx + log_pz - log_normal(z, mu, logvar))  # log p(x|z) + log p(z) - log q(z|x)
    logw = torch.cat(logw)  # (K, B)
    return torch.logsumexp(logw, 0) - math.log(K), logw.mean(0)


# -----------------------------------------------------------------------------
# training
def likelihood_of(cfg: Config) -> str:
    return cfg.likelihood if cfg.likelihood != "auto" else "bernoulli" if cfg.dataset == "mnist" else "gaussian"  # fmt: skip


def build_model(cfg: Config, in_ch: int, size: int) -> VAE:
    """The VAE for this image size and these flags; an unsupported size is a one-line error."""
    if size not in DOWN:
        common.die(f"image size {size} does not fit the VAE (supported: {sorted(DOWN)}); set --image-size")  # fmt: skip
    ch, z = (16, 8) if cfg.tiny else (cfg.ch, cfg.z_dim)
    return VAE(in_ch, ch, z, size, gaussian=likelihood_of(cfg) == "gaussian")


def check_flags(cfg: Config):
    """Flags with a fixed set or range of values: a wrong one is a one-line error before any work."""
    if cfg.likelihood not in ("auto", "bernoulli", "gaussian"):
        common.die(f"--likelihood {cfg.likelihood!r}: choose one of auto, bernoulli, gaussian")
    for name, lo in [("steps", 0), ("batch_size", 1), ("sample", 0), ("nll", 0), ("nll_n", 0), ("beta", 0)]:  # fmt: skip
        if getattr(cfg, name) < lo:
            common.die(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least {lo}")
    if cfg.ae and cfg.nll:
        common.die("--nll needs a VAE: a plain autoencoder (--ae) has no q(z|x) to sample from")


def binarize(x01, generator=None):
    """Dynamic binarization: each pixel is 1 with probability its intensity, drawn anew each time."""
    return torch.bernoulli(x01, generator=generator)


def prepare(x, likelihood: str):
    """A loader batch in [-1, 1] -> the file's [0, 1] pixels (binarized for Bernoulli)."""
    x01 = to_unit(x)
    return binarize(x01) if likelihood == "bernoulli" else x01


@torch.no_grad()
def save_pictures(model, cfg, likelihood, z, x_test, step=None):
    """Prior samples (fixed z), reconstructions (odd rows) and latent interpolations, as PNGs."""
    was, out = model.training, Path(cfg.out)
    model.eval()
    img = lambda o: decoder_mean(o, likelihood) * 2 - 1  # [0, 1] -> the grid's [-1, 1]
    name = f"samples_{step:06d}.png" if step is not None else "samples_final.png"
    common.save_grid(img(model.decoder(z)), out / name)
    x01 = to_unit(x_test[:32])
    rec = img(model(x01, ae=True)[0])  # the decoder at the posterior mean
    pairs = torch.stack([x01 * 2 - 1, rec], 1).view(-1, *x01.shape[1:])  # (64, C, H, W) interleaved
    common.save_grid(pairs, out / "reconstructions.png")
    mu = model.encoder(x01[:16] * 2 - 1)[0]
    w = torch.linspace(0, 1, 10, device=mu.device).view(1, 10, 1)
    zs = (1 - w) * mu[0::2, None] + w * mu[1::2, None]  # (8, 10, z): a straight line in z
    common.save_grid(img(model.decoder(zs.flatten(0, 1))), out / "interpolation.png", nrow=10)
    model.train(was)


def train(cfg: Config):
    """Maximise the ELBO with Adam on minibatches (Alg. 1, AEVB); returns the model."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    x_test = common.load_images(cfg, train=False)[0][:32].to(device).float() / 127.5 - 1
    like = likelihood_of(cfg)
    model = build_model(cfg, x.shape[1], x.shape[-1]).to(device)
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=cfg.dataset not in ("mnist", "fashion"))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data)
        common.load_state(model, ck["model"]), common.load_state(opt, ck["opt"], "optimizer")
        start = ck["step"]
    net = common.wrap(model, cfg, device)
    z_fixed = torch.randn(64, model.decoder.fc[0].in_features, generator=torch.Generator().manual_seed(cfg.seed)).to(device)  # fmt: skip
    log, stop = common.Logger(cfg, start), common.Stopper()
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        kind = "AE" if cfg.ae else f"VAE beta={cfg.beta}"
        print(f"vae: {kind}, {like}, {n / 1e6:.2f}M params, {len(x)} images {tuple(x.shape[1:])}, {device}, from step {start}")  # fmt: skip
    for step in range(start, cfg.steps):
        x01 = prepare(next(data)[0], like)  # a minibatch, binarized anew each time (Bernoulli)
        with autocast:  # -ELBO = -log p(x|z) + KL, one z per image (Eq. 10 with L = 1)
            loss, rec, kl = loss_terms(net, x01, like, cfg.beta, cfg.ae)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(loss=loss, rec=rec, kl=kl)  # in nats per image; kl is positive
        done, stopping = step + 1, stop(step + 1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.log(done)
        if common.rank() == 0 and (cfg.sample_every and done % cfg.sample_every == 0 or done == cfg.steps):  # fmt: skip
            save_pictures(model, cfg, like, z_fixed, x_test, done)
        if done == cfg.steps or stopping or cfg.ckpt_every and done % cfg.ckpt_every == 0:
            log.check(done)  # never overwrite a good checkpoint with nan weights
            common.checkpoint(cfg, done, data, model=model.state_dict(), opt=opt.state_dict(),
                              shape=list(x.shape[1:]), likelihood=like)  # fmt: skip
        if stopping:
            print(f"stopped by signal at step {done}; checkpoint saved to {cfg.out}/ckpt.pt", flush=True)  # fmt: skip
            break
    return model


# -----------------------------------------------------------------------------
# sampling and evaluation from a checkpoint
def load_trained(cfg: Config):
    """The model of <out>/ckpt.pt, built from the flags it was trained with, and its checkpoint."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt")
    if (
        not {"model", "shape", "likelihood", "config"} <= ck.keys()
    ):  # e.g. another script's checkpoint
        common.die(f"{cfg.out}/ckpt.pt is not a vae.py checkpoint")
    fields = {f.name for f in dataclasses.fields(Config)}
    mcfg = Config(**{k: v for k, v in ck["config"].items() if k in fields})  # the trained flags
    device, _ = common.setup(cfg)
    C, H, _ = ck["shape"]
    model = build_model(mcfg, C, H).to(device).eval()
    common.load_state(model, ck["model"])
    return model, mcfg, ck, device


@torch.no_grad()
def sample(cfg: Config):
    """--sample N: decode z ~ N(0, I) into <out>/samples.npz and samples.png (decoder means)."""
    model, mcfg, ck, device = load_trained(cfg)
    g = torch.Generator(device).manual_seed(cfg.seed)
    z = torch.randn(cfg.sample, model.decoder.fc[0].in_features, device=device, generator=g)
    xs = [decoder_mean(model.decoder(zb), ck["likelihood"]) for zb in z.split(cfg.batch_size)]
    common.save_samples(cfg.out, torch.cat(xs) * 2 - 1)
    print(f"wrote {cfg.sample} prior samples ({'AE' if mcfg.ae else 'VAE'}) to {cfg.out}/samples.npz and samples.png")  # fmt: skip


@torch.no_grad()
def nll(cfg: Config):
    """--nll K: test ELBO and IWAE estimate of log p(x) (nats per image, bits/dim)."""
    model, mcfg, ck, device = load_trained(cfg)
    cfg.image_size, like = ck["shape"][-1], ck["likelihood"]
    x = common.load_images(cfg, train=False)[0]
    x = x[: cfg.nll_n or len(x)]
    g = torch.Generator().manual_seed(cfg.seed)  # one fixed binarization of the test set
    x01 = to_unit(x.float() / 127.5 - 1)  # uint8 -> the loader's [-1, 1] -> [0, 1]
    x01 = binarize(x01, g) if like == "bernoulli" else x01
    iw, el = [], []
    for xb in x01.split(max(1, 1024 // min(cfg.nll, 256))):  # decoder calls of about 1024 images
        a, b = iwae_bound(model, xb.to(device), cfg.nll, like)
        iw.append(a.cpu()), el.append(b.cpu())
    iw, el, D = torch.cat(iw).mean().item(), torch.cat(el).mean().item(), x[0].numel()
    res = {"log_px_iwae": iw, "elbo": el, "nll_nats": -iw, "nll_bpd": -iw / (D * math.log(2)),
           "elbo_bpd": -el / (D * math.log(2)), "K": cfg.nll, "n": len(x), "likelihood": like,
           "step": ck["step"]}  # fmt: skip
    print(json.dumps(res))
    with open(Path(cfg.out) / "nll.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    cfg = common.parse(Config, "vae")
    check_flags(cfg)
    if not (cfg.sample or cfg.nll):
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # sampling and --nll run in one process
        sample(cfg) if cfg.sample else nll(cfg)
