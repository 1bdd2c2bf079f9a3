"""
VAE: Kingma & Welling 2014 (arXiv:1312.6114), with the IWAE bound of Burda et al. 2016
(arXiv:1509.00519) to measure it. `--ae`: the plain autoencoder it fixes.

An encoder q(z|x) = N(mu, diag(sigma^2)) and a decoder p(x|z) are trained together by maximising
the ELBO, log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) (Eq. 3), through the
reparameterization z = mu + sigma * eps (Eq. 4); the KL is analytic (Eq. 10, App. B). Because the
KL pulls every q(z|x) toward N(0, I), decoding z ~ N(0, I) gives digits. A plain AE (`--ae`) has
no such pull: its codes sit wherever the encoder puts them, and its "prior samples" are mush.
Pixels are in [0, 1] in this file (the loader's [-1, 1] is converted once, in `prepare`):
Bernoulli on dynamically binarized digits (MNIST default), or an 8-bit discretized Gaussian
(`--likelihood gaussian`).
Reductions: log-likelihoods and KLs are summed over pixels and latent dims, averaged over a batch.
Left out on purpose: hierarchical latents, flows in q, and free bits.
`--ppca`: probabilistic PCA (Tipping & Bishop 1999), the linear VAE with an exact likelihood,
fitted in closed form on dequantized pixels (bits/dim comparable with flow.py's); a linear VAE
trained on the ELBO reaches the same optimum (Lucas et al. 2019; tests/test_vae.py shows it).

  python vae.py --dataset mnist-12k                  # MNIST, Bernoulli decoder
  python vae.py --nll 1000                           # test ELBO and IWAE log p(x), K=1000
  python vae.py --sample 64                          # prior samples (Bernoulli means)
  python vae.py --ae --out runs/ae                   # the baseline: an AE cannot sample
  python vae.py --dataset cifar10 --likelihood gaussian
  python vae.py --ppca --z-dim 32 --out runs/ppca      # seconds: fit, test bits/dim, pictures
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
    ppca: bool = False  # probabilistic PCA in closed form (no steps); --z-dim is its k
    nll: int = 0  # K > 0: no training; test ELBO and IWAE log p(x), K samples (PPCA: exact)
    nll_n: int = 0  # test images for --nll (0: the whole split)
    at_least = dict(nll=0, nll_n=0, beta=0)
    choices = dict(likelihood=("auto", "bernoulli", "gaussian"))


# -----------------------------------------------------------------------------
# model: a convolutional encoder and a mirrored decoder
DOWN = {28: 2, 32: 2, 64: 3}  # image size -> stride-2 stages (to 7x7, 8x8, 8x8)


class Encoder(nn.Module):
    """q(z|x): x in [0, 1] -> conv stages halving the size, doubling the width -> (mu, logvar)."""

    def __init__(self, in_ch: int, ch: int, z_dim: int, size: int, n_down: int):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ch, 3, padding=1), nn.SiLU()]
        for i in range(n_down):
            c = ch * 2**i
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(ch * 2**n_down * (size // 2**n_down) ** 2, 2 * z_dim)

    def forward(self, x01):
        h = self.net(x01 * 2 - 1)  # centred for the first conv: a normalisation, not a new range
        return self.head(h).chunk(2, dim=1)  # (mu, logvar), (B, z_dim) each


class Decoder(nn.Module):
    """p(x|z): the encoder mirrored; outputs Bernoulli logits or Gaussian means, per pixel."""

    def __init__(self, out_ch: int, ch: int, z_dim: int, size: int, n_down: int):
        super().__init__()
        s = size // 2**n_down
        self.shape = (ch * 2**n_down, s, s)
        self.fc = nn.Sequential(nn.Linear(z_dim, math.prod(self.shape)), nn.SiLU())
        layers = []
        for i in reversed(range(n_down)):
            c = ch * 2**i
            layers += [nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU()]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, z):
        return self.net(self.fc(z).view(-1, *self.shape))  # (B, C, H, W)


class VAE(nn.Module):
    """Encoder + decoder; a Gaussian decoder also learns its noise scale, log sigma per channel."""

    def __init__(self, in_ch=1, ch=32, z_dim=32, size=28, n_down=2, gaussian=False):
        super().__init__()
        self.encoder = Encoder(in_ch, ch, z_dim, size, n_down)
        self.decoder = Decoder(in_ch, ch, z_dim, size, n_down)
        self.log_scale = nn.Parameter(torch.full((in_ch, 1, 1), -2.0)) if gaussian else None

    def forward(self, x01, ae: bool = False):
        """x in [0, 1] -> (decoder output, mu, logvar, log_scale); `ae` decodes mu itself."""
        mu, logvar = self.encoder(x01)
        z = mu if ae else reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar, self.log_scale  # log_scale returned: DDP sees it used


class PPCA(nn.Module):
    """Probabilistic PCA (Tipping & Bishop 1999): z ~ N(0, I_k), x | z ~ N(W z + mu, sigma^2 I)
    (Eq. 2), p(x) = N(mu, W W^T + sigma^2 I) (Eq. 3) exact; fitted, not trained; float64, CPU."""

    def __init__(self, dim: int, k: int, shape=()):
        super().__init__()
        self.shape = tuple(shape) or (dim,)
        self.register_buffer("W", torch.zeros(dim, k, dtype=torch.float64))
        self.register_buffer("mu", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sigma2", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def fit(self, x):
        """The ML solution (Eqs. 7-8, R = I) from the data covariance's eigenvalues lam (descending)
        and eigenvectors U: sigma^2 = mean(lam_k+1..D), W = U_k (diag(lam_1..k) - sigma^2 I)^1/2."""
        x = x.flatten(1).double()
        self.mu.copy_(x.mean(0))
        lam, U = torch.linalg.eigh((x - self.mu).T @ (x - self.mu) / len(x))  # ascending
        lam, U, k = lam.flip(0), U.flip(1), self.W.shape[1]
        self.sigma2.copy_(lam[k:].mean())
        self.W.copy_(U[:, :k] * (lam[:k] - self.sigma2).clamp(min=0).sqrt())
        return self

    def log_prob(self, x):
        """The exact log N(x; mu, C) per image (nats), with M = W^T W + sigma^2 I (k x k):
        C^-1 = (I - W M^-1 W^T) / sigma^2 (Woodbury), log|C| = (D - k) log sigma^2 + log|M|."""
        (D, k), W, s2 = self.W.shape, self.W, self.sigma2
        L = torch.linalg.cholesky(W.T @ W + s2 * torch.eye(k, dtype=W.dtype))  # M = L L^T
        xc = x.flatten(1).double() - self.mu  # (N, D)
        v = torch.linalg.solve_triangular(L, (xc @ W).T, upper=False)  # L^-1 W^T (x - mu): (k, N)
        maha = (xc.pow(2).sum(1) - v.pow(2).sum(0)) / s2  # (x - mu)^T C^-1 (x - mu)
        logdet = (D - k) * torch.log(s2) + 2 * L.diagonal().log().sum()
        return -0.5 * (D * math.log(2 * math.pi) + logdet + maha)

    def posterior(self, x):
        """p(z|x) = N(M^-1 W^T (x - mu), sigma^2 M^-1) (T&B Eq. 6): mean (N, k), cov (k, k)."""
        M = self.W.T @ self.W + self.sigma2 * torch.eye(self.W.shape[1], dtype=torch.float64)
        mean = torch.linalg.solve(M, self.W.T @ (x.flatten(1).double() - self.mu).T).T
        return mean, self.sigma2 * torch.linalg.inv(M)

    def encoder(self, x01):  # (the posterior mean, -): the VAE's encoder gives (mu, logvar)
        return self.posterior(x01)[0].float(), None

    def decoder(self, z):  # E[x|z] = W z + mu, images (B, *shape); p(x) adds sigma eps to it
        return (z.double() @ self.W.T + self.mu).float().view(-1, *self.shape)


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


def log_bin_mass(lo, hi):
    """log(Phi(hi) - Phi(lo)) for standardised bin edges lo < hi, exact in the tails: the bin is
    mirrored to the left of 0, where log_ndtr keeps full precision, and the difference is taken
    as log Phi(hi) + log(1 - Phi(lo) / Phi(hi)) (as PixelCNN++ and improved-diffusion do)."""
    right = lo + hi > 0
    lo, hi = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    a, b = torch.special.log_ndtr(lo), torch.special.log_ndtr(hi)
    return b + torch.log(-torch.expm1((a - b).clamp(max=-1e-30)))


def discretized_gaussian_loglik(x01, mean, log_scale):
    """log P(x) for 8-bit pixels in [0, 1]: N(mean, sigma^2) integrated over each pixel's bin of
    width 1/255; the bins at 0 and 1 take the tails, so the 256 probabilities sum to 1."""
    a, inv = 0.5 / 255, torch.exp(-log_scale)
    lo, hi = inv * (x01 - mean - a), inv * (x01 - mean + a)
    left, right = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo)
    return torch.where(x01 < a, left, torch.where(x01 > 1 - a, right, log_bin_mass(lo, hi)))


def log_px(x01, out, likelihood: str, log_scale=None):
    """log p(x|z) per image, summed over pixels: Bernoulli (out: logits) or discretized Gaussian."""
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
    z_k ~ q(z|x) (Burda et al. Sec. 3); IWAE >= ELBO for the same draws (Jensen), equal at K = 1."""
    mu, logvar = model.encoder(x01)  # (B, z)
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
    auto = "bernoulli" if cfg.dataset in ("mnist", "mnist-12k") else "gaussian"
    return auto if cfg.likelihood == "auto" else cfg.likelihood


def model_args(cfg: Config, in_ch: int, size: int) -> dict:
    """The VAE's constructor arguments (saved as model_args); an unsupported size is an error."""
    if size not in DOWN:
        common.die(f"image size {size} does not fit the VAE ({sorted(DOWN)}); set --image-size")
    ch, z = (16, 8) if cfg.tiny else (cfg.ch, cfg.z_dim)
    gaussian = likelihood_of(cfg) == "gaussian"
    vae = dict(in_ch=in_ch, ch=ch, z_dim=z, size=size, n_down=DOWN[size], gaussian=gaussian)
    return {"vae": vae}


def check_flags(cfg: Config):
    """What the declared ranges in Config cannot say: a one-line error, before any work."""
    if cfg.ae and cfg.nll:
        common.die("--nll needs a VAE: a plain autoencoder (--ae) has no q(z|x) to sample from")
    if cfg.ppca and (cfg.ae or cfg.likelihood == "bernoulli"):
        common.die("--ppca is its own model, with Gaussian noise: drop --ae / --likelihood")


def prepare(x, likelihood: str):
    """Loader pixels in [-1, 1] -> this file's [0, 1], the one place; for Bernoulli, dynamic
    binarization: each pixel is 1 with probability its intensity, drawn anew every time."""
    x01 = (x + 1) / 2
    return torch.bernoulli(x01) if likelihood == "bernoulli" else x01


@torch.no_grad()
def save_pictures(model, out, likelihood, z, x01, step=None):
    """Prior samples (fixed z), reconstructions (odd columns) and latent interpolations (rows:
    straight lines in z between pairs of test images), as PNGs; images in [0, 1]."""
    was, out, unit = model.training, Path(out), (0, 1)
    model.eval()
    name = f"samples_{step:06d}.png" if step is not None else "samples_final.png"
    common.save_grid(decoder_mean(model.decoder(z), likelihood), out / name, value_range=unit)
    rec = decoder_mean(model.decoder(model.encoder(x01)[0]), likelihood)  # at the posterior mean
    pairs = torch.stack([x01, rec], 1).flatten(0, 1)  # originals and reconstructions, interleaved
    common.save_grid(pairs, out / "reconstructions.png", value_range=unit)
    mu = model.encoder(x01[: len(x01) // 2 * 2])[0]  # an even count: row i joins 2i and 2i + 1
    w = torch.linspace(0, 1, 10, device=mu.device).view(1, 10, 1)
    zs = (1 - w) * mu[0::2, None] + w * mu[1::2, None]  # (pairs, 10, z)
    lines = decoder_mean(model.decoder(zs.flatten(0, 1)), likelihood)
    common.save_grid(lines, out / "interpolation.png", nrow=10, value_range=unit)
    model.train(was)


def train(cfg: Config):
    """Maximise the ELBO with Adam on minibatches (Alg. 1, AEVB); returns the model."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    x_test = common.load_images(cfg, train=False)[0][:32].to(device).float() / 255  # [0, 1]
    like, args = likelihood_of(cfg), model_args(cfg, x.shape[1], x.shape[-1])
    model = VAE(**args["vae"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("model", "opt"))
        common.load_state(model, ck["model"])
        common.load_state(opt, ck["opt"], "optimizer")
        start = ck["step"]
    net = common.wrap(model, cfg, device)
    g = torch.Generator().manual_seed(cfg.seed)
    z_fixed = torch.randn(64, args["vae"]["z_dim"], generator=g).to(device)  # every grid's noise
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        kind = "AE" if cfg.ae else f"VAE beta={cfg.beta}"
        print(
            f"vae: {kind}, {like}, {n:.2f}M params, {len(x)} images {tuple(x.shape[1:])}, "
            f"{device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        x01 = prepare(next(data)[0], like)  # a minibatch, binarized anew each time (Bernoulli)

        # forward and backward: -ELBO = -log p(x|z) + KL, one z per image (Eq. 10 with L = 1)
        with autocast:
            loss, rec, kl = loss_terms(net, x01, like, cfg.beta, cfg.ae)
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        opt.step()

        # log: nats per image; kl is positive
        loop.add(loss=loss, rec=rec, kl=kl)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        if loop.end_step(done, model=model, opt=opt, model_args=args, likelihood=like):
            break

        # pictures (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                loop.aside(save_pictures, model, cfg.out, like, z_fixed, x_test, done)
    return model


def dequantize(x_u8, seed: int):
    """u -> (u + v) / 256, v ~ U[0, 1)^D seeded: uniform dequantization, as flow.py."""
    g = torch.Generator().manual_seed(seed)
    return (x_u8.double() + torch.rand(x_u8.shape, generator=g, dtype=torch.float64)) / 256


def ppca_bits(model: PPCA, x_u8, seed: int) -> float:
    """Test bits/dim, exact for one dequantization: -log p(x) / (D ln 2) + 8 (as flow.py)."""
    x = dequantize(x_u8, seed + 1)
    return (-model.log_prob(x).mean() / (x[0].numel() * math.log(2)) + 8).item()


def fit_ppca(cfg: Config):
    """--ppca: the closed-form fit on dequantized training images, exact test bits/dim, pictures."""
    x, x_test = (common.load_images(cfg, train=t)[0] for t in (True, False))
    D, k = x[0].numel(), 8 if cfg.tiny else cfg.z_dim
    if not 0 < k < D:
        common.die(f"--z-dim {k}: PPCA needs 0 < k < D = {D}")
    model = PPCA(D, k, x.shape[1:]).fit(dequantize(x, cfg.seed))  # T&B Eqs. 7-8
    bits = ppca_bits(model, x_test, cfg.seed)
    ck = dict(model=model.state_dict(), likelihood="ppca", step=0, test_bpd=bits)
    ck["model_args"] = {"ppca": dict(dim=D, k=k, shape=list(x.shape[1:]))}
    common.save_ckpt(Path(cfg.out) / "ckpt.pt", dict(ck, config=dataclasses.asdict(cfg)))
    z = torch.randn(64, k, generator=torch.Generator().manual_seed(cfg.seed))
    save_pictures(model, cfg.out, "ppca", z, x_test[:32].float() / 255)
    print(
        f"ppca: k={k}, D={D}, sigma^2 {model.sigma2.item():.3g}, fitted on {len(x)} images; "
        f"test {bits:.4f} bits/dim (exact, {len(x_test)} images); wrote {cfg.out}/ckpt.pt"
    )


# -----------------------------------------------------------------------------
# sampling and evaluation from a checkpoint
def load_trained(cfg: Config):
    """The VAE (or PPCA) of <out>/ckpt.pt, rebuilt from its model_args, and the checkpoint."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("model", "model_args", "likelihood"))
    device, _ = common.setup(cfg)
    if "ppca" in ck["model_args"]:  # float64 and a few matrix products: the CPU
        model, device = PPCA(**ck["model_args"]["ppca"]), torch.device("cpu")
    else:
        model = VAE(**ck["model_args"]["vae"]).to(device).eval()
    common.load_state(model, ck["model"])
    return model, ck, device


@torch.no_grad()
def sample(cfg: Config):
    """--sample N: decode z ~ N(0, I) into <out>/samples.npz and samples.png (decoder means)."""
    model, ck, device = load_trained(cfg)
    g = torch.Generator(device).manual_seed(cfg.seed)
    k = model.W.shape[1] if isinstance(model, PPCA) else model.decoder.fc[0].in_features
    z = torch.randn(cfg.sample, k, device=device, generator=g)
    xs = [decoder_mean(model.decoder(zb), ck["likelihood"]) for zb in z.split(cfg.batch_size)]
    common.save_samples(cfg.out, torch.cat(xs), value_range=(0, 1))
    kind = "AE" if ck["config"]["ae"] else type(model).__name__
    print(f"wrote {cfg.sample} prior samples ({kind}) to {cfg.out}/samples.npz and samples.png")


@torch.no_grad()
def nll(cfg: Config):
    """--nll K: test ELBO and IWAE-K bound of log p(x) (nats per image, bits/dim); PPCA: exact."""
    model, ck, device = load_trained(cfg)
    cfg, like, args = common.from_run(cfg, ck), ck["likelihood"], ck["model_args"]
    cfg.image_size = args["vae"]["size"] if "vae" in args else args["ppca"]["shape"][-1]
    x = common.load_images(cfg, train=False)[0]
    x = x[: cfg.nll_n or len(x)]
    res = {"n": len(x), "step": ck["step"]}
    if isinstance(model, PPCA):  # exact: no bound, no samples
        res |= {"nll_bpd": ppca_bits(model, x, cfg.seed), "exact": True}
    else:
        x01 = x.float() / 255  # uint8 -> [0, 1]
        if like == "bernoulli":  # one fixed binarization of the test set
            x01 = torch.bernoulli(x01, generator=torch.Generator().manual_seed(cfg.seed))
        iw, el = [], []
        for i, xb in enumerate(x01.split(max(1, 1024 // min(cfg.nll, 256)))):  # ~1024 a call
            bound, elbo = iwae_bound(model, xb.to(device), cfg.nll, like)
            iw.append(bound.cpu())
            el.append(elbo.cpu())
            print(f"bounds of {min(len(x), (i + 1) * len(xb))}/{len(x)} images", flush=True)
        iw, el, bits = torch.cat(iw).mean().item(), torch.cat(el).mean().item(), x[0].numel()
        bits *= math.log(2)
        res |= {"log_px_iwae": iw, "elbo": el, "nll_nats": -iw, "nll_bpd": -iw / bits}
        res |= {"elbo_bpd": -el / bits, "K": cfg.nll, "likelihood": like}
    print(json.dumps(res))
    with open(Path(cfg.out) / "nll.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    cfg = common.parse(Config, "vae")
    check_flags(cfg)
    if not (cfg.sample or cfg.nll or cfg.ppca):
        train(cfg)
    elif os.environ.get("RANK", "0") == "0":  # PPCA, sampling and --nll run in one process
        if not (cfg.sample or cfg.nll):
            fit_ppca(cfg)
        elif cfg.sample:
            sample(cfg)
        else:
            nll(cfg)
