"""
VQ-VAE: van den Oord, Vinyals & Kavukcuoglu 2017 (arXiv:1711.00937), with a learned prior.

An encoder maps an image to a grid of vectors z_e(x); each is replaced by its nearest row of a
codebook e (K codes of dim D), z_q(x) = e_k, k = argmin_j |z_e(x) - e_j| (Eq. 1-2), and a decoder
rebuilds the image from z_q. argmin has no gradient, so the decoder's input gradient is copied to
the encoder (straight-through). The loss, Eq. 3:
  L = log p(x | z_q(x)) + |sg[z_e(x)] - e|^2 + beta |z_e(x) - sg[e]|^2,   beta = 0.25,
reconstruction + codebook + commitment; `--ema` replaces the codebook term by running averages
(App. A.1). A VQ-VAE alone cannot sample: stage 2 (`--stage prior`) fits an autoregressive prior
p(k) = prod_i p(k_i | k_<i) over the code grids of the training set (a small causal transformer;
the paper used a PixelCNN), and `--sample` draws codes from it and decodes them.
Images are in [-1, 1]; reconstruction is the MSE (a fixed-variance Gaussian log p(x|z) up to
constants), and every loss is a mean over its elements, as in the reference implementation.

  python vqvae.py --dataset mnist-12k                      # stage 1: encoder, codebook, decoder
  python vqvae.py --stage prior --dataset mnist-12k        # stage 2: the prior over codes
  python vqvae.py --sample 64 --temperature 1.0            # both stages -> images
  python vqvae.py --eval --dataset mnist-12k               # test MSE, PSNR, codebook usage
  python vqvae.py --tiny --ema --steps 2000                # a CPU-sized run, EMA codebook
"""

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


# -----------------------------------------------------------------------------
# config
@dataclasses.dataclass
class Config(common.Config):
    stage: str = "vqvae"  # vqvae (encoder, codebook, decoder) | prior (needs stage 1 in --out)
    steps: int = 20000  # optimizer steps of this stage
    lr: float = 2e-4  # Adam (the paper: 2e-4, batch 128, 250k steps)
    # stage 1 (widths of the reference CIFAR-10 example; the paper used 256 hidden units)
    ch: int = 128  # hidden channels; --tiny: 32
    res_ch: int = 32  # residual block bottleneck; --tiny: 16
    num_codes: int = 512  # K
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight (Eq. 3)
    ema: bool = False  # codebook by exponential moving averages (App. A.1), not by its loss
    ema_decay: float = 0.99  # gamma of the EMA codebook (App. A.1)
    dead_threshold: float = 1.0  # restart codes used less than this often per batch (EMA); 0: off
    # stage 2: a causal transformer over the raster-ordered code grid
    prior_dim: int = 256  # --tiny: 64
    prior_layers: int = 6  # --tiny: 2
    prior_heads: int = 8  # --tiny: 4
    prior_dropout: float = 0.1  # in attention and MLP
    temperature: float = 1.0  # sampling temperature of the prior
    eval: bool = False  # no training: test MSE, PSNR, codebook usage (and the prior's test NLL)
    at_least = dict(num_codes=2, code_dim=1, temperature=1e-6)
    choices = dict(stage=("vqvae", "prior"))


# -----------------------------------------------------------------------------
# model, stage 1: residual conv encoder/decoder around a vector quantizer (paper Sec. 4.1)
class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the paper's residual block."""

    def __init__(self, ch: int, res_ch: int):
        super().__init__()
        conv3, conv1 = nn.Conv2d(ch, res_ch, 3, padding=1), nn.Conv2d(res_ch, ch, 1)
        self.net = nn.Sequential(nn.ReLU(), conv3, nn.ReLU(), conv1)

    def forward(self, x):
        return x + self.net(x)


class Encoder(nn.Module):
    """Two stride-2 4x4 convs (H -> H/4), a 3x3 conv, two residual blocks, 1x1 conv to D."""

    def __init__(self, in_ch, ch, res_ch, D):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(),  # H/2
            nn.Conv2d(ch // 2, ch, 4, 2, 1), nn.ReLU(),  # H/4
            nn.Conv2d(ch, ch, 3, padding=1),
            ResBlock(ch, res_ch), ResBlock(ch, res_ch), nn.ReLU(),
            nn.Conv2d(ch, D, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)  # (B, D, H/4, W/4)


class Decoder(nn.Module):
    """The encoder mirrored: 3x3 conv from D, two residual blocks, two stride-2 transposed convs."""

    def __init__(self, out_ch, ch, res_ch, D):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(D, ch, 3, padding=1),
            ResBlock(ch, res_ch), ResBlock(ch, res_ch), nn.ReLU(),
            nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.ReLU(),  # H/2
            nn.ConvTranspose2d(ch // 2, out_ch, 4, 2, 1),  # H
        )  # fmt: skip

    def forward(self, z_q):
        return self.net(z_q)  # (B, C, H, W)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over DDP ranks (in place), so every replica keeps the same codebook."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def vq_losses(z_e, z_q):
    """Eq. 3's two codebook terms: |sg[z_e] - e|^2 moves codes, |z_e - sg[e]|^2 the encoder."""
    return F.mse_loss(z_q, z_e.detach()), F.mse_loss(z_e, z_q.detach())


class VectorQuantizer(nn.Module):
    """K codes of dim D: nearest-code lookup, straight-through gradients, Eq. 3 or EMA updates,
    and restarts of dead codes (codes used less than `dead_threshold` times per batch, on average,
    jump to random encoder outputs of the current batch, as in Dhariwal et al. 2020, Jukebox)."""

    def __init__(self, K=512, D=64, beta=0.25, ema=False, decay=0.99, dead_threshold=1.0, eps=1e-5):
        super().__init__()
        self.K, self.D = K, D
        self.beta, self.ema = beta, ema
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, eps
        embed = torch.randn(K, D)
        if ema:  # e_i = m_i / N_i, both running averages (App. A.1)
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed.clone())  # m_i
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(K))  # N_i: per-batch use, averaged

    def forward(self, z_e):
        """(B, D, H, W) -> (z_q with straight-through gradient, loss, indices (B, H, W), stats)."""
        B, D, H, W = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # argmin and EMA in float32
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, D)  # (BHW, D)
            with torch.no_grad():  # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is the same for all e
                idx = (self.embed.pow(2).sum(1) - 2 * flat @ self.embed.t()).argmin(1)  # Eq. 1
            z_q = F.embedding(idx, self.embed)  # (BHW, D): rows of the codebook (Eq. 2)
            codebook, commit = vq_losses(flat, z_q)
            loss = self.beta * commit + (0 if self.ema else codebook)
            counts = torch.bincount(idx, minlength=self.K).float()
            if self.training:
                counts = self.update(flat.detach(), idx, counts)
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())  # exp(entropy of code use)
            stats = {"perplexity": perplexity, "usage": (counts > 0).float().mean()}
            z_q = flat + (z_q - flat).detach()  # straight-through: forward z_q, backward identity
        return z_q.view(B, H, W, D).permute(0, 3, 1, 2), loss, idx.view(B, H, W), stats

    @torch.no_grad()
    def update(self, flat, idx, counts):
        """EMA codebook step (App. A.1) and dead-code restarts; returns counts over all ranks."""
        counts, gamma = sum_over_ranks(counts), self.decay
        self.cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)  # N_i <- g N_i + (1 - g) n_i
        if self.ema:
            sums = sum_over_ranks(torch.zeros_like(self.embed).index_add_(0, idx, flat))
            self.embed_sum.mul_(gamma).add_(sums, alpha=1 - gamma)  # m_i <- g m_i + (1 - g) sum z
            # Laplace smoothing keeps every N_i > 0 (as Sonnet's VectorQuantizerEMA)
            n = self.cluster_size.sum()
            N = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
            self.embed.copy_(self.embed_sum / N[:, None])  # e_i = m_i / N_i
        dead = self.cluster_size < self.dead_threshold
        if dead.any():  # move each dead code onto a random encoder output (rank 0's, for all)
            new = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(new, 0)
            self.embed.data[dead] = new
            self.cluster_size[dead] = self.dead_threshold
            if self.ema:
                self.embed_sum[dead] = new * self.dead_threshold
        return counts

    def lookup(self, idx):
        """Code indices (B, H, W) -> z_q (B, D, H, W)."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2)


class VQVAE(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder; the latent grid is H/4 x W/4 code indices."""

    def __init__(
        self,
        in_ch=1,
        ch=128,
        res_ch=32,
        K=512,
        D=64,
        beta=0.25,
        ema=False,
        decay=0.99,
        dead_threshold=1.0,
    ):
        super().__init__()
        self.encoder = Encoder(in_ch, ch, res_ch, D)
        self.quantizer = VectorQuantizer(K, D, beta, ema, decay, dead_threshold)
        self.decoder = Decoder(in_ch, ch, res_ch, D)

    def forward(self, x):
        """x -> (reconstruction, codebook+commitment loss, indices, stats)."""
        z_q, vq_loss, idx, stats = self.quantizer(self.encoder(x))
        return self.decoder(z_q), vq_loss, idx, stats

    @torch.no_grad()
    def encode(self, x):
        return self.quantizer(self.encoder(x))[2]  # (B, H/4, W/4) indices

    @torch.no_grad()
    def decode(self, idx):
        return self.decoder(self.quantizer.lookup(idx))


# -----------------------------------------------------------------------------
# model, stage 2: an autoregressive prior over code indices (a small GPT)
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        mlp = [nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, L, C/heads) each
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # i sees j <= i
        x = x + F.dropout(self.proj(h.transpose(1, 2).reshape(B, L, C)), p)
        return x + self.mlp(self.ln2(x))


class CodePrior(nn.Module):
    """p(k) = prod_i p(k_i | k_<i) over the L = h*w codes in raster order: the input is the grid
    shifted right behind a start token, so the logits at i depend on k_<i only."""

    def __init__(self, K: int, L: int, dim=256, layers=6, heads=8, dropout=0.1):
        super().__init__()
        self.tok = nn.Embedding(K + 1, dim)  # the K codes and a start token (index K)
        self.pos = nn.Parameter(torch.randn(L, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, K)
        self.K = K

    def forward(self, idx):
        """(B, L) code indices -> (B, L, K) logits of k_i given k_<i."""
        start = torch.full_like(idx[:, :1], self.K)
        x = torch.cat([start, idx[:, :-1]], 1)  # (B, L): position i reads k_{i-1}
        return self.head(self.ln(self.blocks(self.tok(x) + self.pos[: x.shape[1]])))


@torch.no_grad()
def sample_codes(prior, n: int, L: int, temperature=1.0, generator=None, device=None):
    """Ancestral sampling of n code sequences, one position at a time (L forward passes)."""
    idx = torch.zeros(n, L, dtype=torch.long, device=device)
    for i in range(L):  # the zeros at positions >= i are never read: the prior is causal
        logits = prior(idx)[:, i].float() / temperature
        idx[:, i] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    return idx


# -----------------------------------------------------------------------------
# training
def vqvae_args(cfg: Config, in_ch: int, size: int) -> dict:
    """Stage 1's constructor arguments; a size the two stride-2 stages cannot halve is an error."""
    if size % 4 or size < 8:
        common.die(
            f"image size {size} does not fit the VQ-VAE (a multiple of 4, e.g. 28, 32, "
            "64); set --image-size"
        )
    ch, res = (32, 16) if cfg.tiny else (cfg.ch, cfg.res_ch)
    quantizer = dict(K=cfg.num_codes, D=cfg.code_dim, beta=cfg.beta, ema=cfg.ema)
    quantizer |= dict(decay=cfg.ema_decay, dead_threshold=cfg.dead_threshold)
    return dict(in_ch=in_ch, ch=ch, res_ch=res, **quantizer)


def prior_args(cfg: Config, K: int, L: int) -> dict:
    """Stage 2's constructor arguments, for K codes in grids of L."""
    dim, layers, heads = (cfg.prior_dim, cfg.prior_layers, cfg.prior_heads)
    if cfg.tiny:
        dim, layers, heads = 64, 2, 4
    if dim % heads:
        common.die(f"--prior-dim {dim} must divide by --prior-heads {heads}")
    return dict(K=K, L=L, dim=dim, layers=layers, heads=heads, dropout=cfg.prior_dropout)


def load_stage1(cfg: Config, device):
    """Stage 1 of <out>/ckpt.pt (a stage-1 or a prior checkpoint), rebuilt from its model_args:
    (model, checkpoint)."""
    ck = common.load_ckpt(Path(cfg.out) / "ckpt.pt", need=("model", "model_args", "shape"))
    vq = VQVAE(**ck["model_args"]["vqvae"]).to(device).eval()
    common.load_state(vq, ck["model"], "VQ-VAE")
    return vq, ck


def save_reconstructions(model, x, path):
    """A VQ-VAE alone cannot sample: originals beside their reconstructions."""
    with torch.no_grad():
        pairs = torch.stack([x, model.eval()(x)[0].float()], 1).flatten(0, 1)
    model.train()
    common.save_grid(pairs, path)


def train_vqvae(cfg: Config):
    """Stage 1: reconstruction + Eq. 3 (or EMA) with Adam; returns the model."""
    device, autocast = common.setup(cfg)
    x, y = common.load_images(cfg, train=True)
    x_test = common.load_images(cfg, train=False)[0][:32].to(device).float() / 127.5 - 1
    args = {"vqvae": vqvae_args(cfg, x.shape[1], x.shape[-1])}
    model = VQVAE(**args["vqvae"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    flip = cfg.dataset not in common.DIGITS
    data = common.Batches(x, y, cfg.batch_size, cfg.seed, device, flip=flip)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data, need=("model",))
        if ck.get("stage") == "prior":
            common.die(
                f"{cfg.out}/ckpt.pt already holds a prior trained on this VQ-VAE; train "
                "stage 1 further in a new --out"
            )
        common.load_state(model, ck["model"])
        common.load_state(opt, ck["opt"], "optimizer")
        start = ck["step"]
    net = common.wrap(model, cfg, device)
    loop = common.Loop(cfg, data, start)
    if common.rank() == 0:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        book = "EMA" if cfg.ema else "Eq. 3"
        print(
            f"vqvae: stage 1, {n:.2f}M params, K={cfg.num_codes} D={cfg.code_dim} {book} "
            f"codebook, {len(x)} images {tuple(x.shape[1:])}, {device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        x0 = next(data)[0]

        # forward and backward: Eq. 3, reconstruction + codebook (unless EMA) + beta commitment
        with autocast:
            x_hat, vq_loss, _, stats = net(x0)
            rec = F.mse_loss(x_hat.float(), x0)
            loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update (the EMA codebook was updated in the forward pass)
        opt.step()

        # log
        loop.add(loss=loss, mse=rec, vq=vq_loss, **stats)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(model=model, opt=opt, model_args=args, shape=list(x.shape[1:]))
        if loop.end_step(done, **state, stage="vqvae"):
            break

        # reconstructions of test images (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                path = Path(cfg.out) / f"recon_{done:06d}.png"
                loop.aside(save_reconstructions, model, x_test, path)
    return model


@torch.no_grad()
def save_prior_samples(vq, prior, h, w, temperature, g, path):
    """64 code grids from the prior, decoded: the same draws every time (a fixed generator)."""
    idx = sample_codes(prior.eval(), 64, h * w, temperature, g, next(prior.parameters()).device)
    prior.train()
    common.save_grid(vq.decode(idx.view(-1, h, w)), path)


def train_prior(cfg: Config):
    """Stage 2: maximum likelihood of the training set's code grids under the prior."""
    device, autocast = common.setup(cfg)
    vq, ck1 = load_stage1(cfg, device)
    cfg = common.from_run(cfg, ck1)  # stage 1's --dataset and --data-dir, unless given
    cfg.image_size, K = ck1["shape"][-1], ck1["model_args"]["vqvae"]["K"]  # stage 1 decides
    x, _ = common.load_images(cfg, train=True)
    codes = [vq.encode(xb.to(device).float() / 127.5 - 1).flatten(1).cpu() for xb in x.split(500)]
    codes = torch.cat(codes)  # (N, L) code sequences, raster order
    # the code sequences ride in the label slot of common.Batches; the image slot is empty
    no_images = torch.zeros(len(codes), 0, dtype=torch.uint8)
    data = common.Batches(no_images, codes, cfg.batch_size, cfg.seed, device)
    args = {"vqvae": ck1["model_args"]["vqvae"], "prior": prior_args(cfg, K, codes.shape[1])}
    prior = CodePrior(**args["prior"]).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, weight_decay=0.01, fused=fused)
    start = 0
    if cfg.resume:
        ck = common.resume(cfg, data)
        if ck.get("stage") != "prior":
            common.die(
                f"--resume: {cfg.out}/ckpt.pt holds no prior yet; run --stage prior "
                "without --resume"
            )
        common.load_state(prior, ck["prior"], "prior")
        common.load_state(opt, ck["prior_opt"], "optimizer")
        start = ck["step"]
    net = common.wrap(prior, cfg, device)
    loop = common.Loop(cfg, data, start)
    h, w = ck1["shape"][1] // 4, ck1["shape"][2] // 4
    vq_step = ck1.get("vq_step", ck1["step"])
    if common.rank() == 0:
        n = sum(p.numel() for p in prior.parameters()) / 1e6
        print(
            f"vqvae: stage 2 prior, {n:.2f}M params, {len(codes)} code grids {h}x{w} of K={K}, "
            f"{device}, from step {start}"
        )
    for step in range(start, cfg.steps):
        done = step + 1
        k = next(data)[1]

        # forward and backward: -log p(k) = -sum_i log p(k_i | k_<i), in nats per code
        with autocast:
            loss = F.cross_entropy(net(k).flatten(0, 1).float(), k.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()

        # update
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()

        # log
        loop.add(nll=loss)
        if common.due(done, cfg.log_every, cfg.steps, first=start + 1):
            loop.log(done)

        # checkpoint (when due, and on Ctrl-C / SIGTERM, which also stops the loop)
        state = dict(model=vq, prior=prior, prior_opt=opt, model_args=args, shape=ck1["shape"])
        if loop.end_step(done, **state, stage="prior", vq_step=vq_step):
            break

        # sample a grid (after the checkpoint: a picture never costs one)
        if cfg.sample_every and common.due(done, cfg.sample_every, cfg.steps, first=200):
            if common.rank() == 0:
                g = torch.Generator(device).manual_seed(cfg.seed)
                path = Path(cfg.out) / f"samples_{done:06d}.png"
                loop.aside(save_prior_samples, vq, prior, h, w, cfg.temperature, g, path)
    return prior


# -----------------------------------------------------------------------------
# sampling and evaluation from a checkpoint
def load_prior(cfg: Config, ck: dict, device) -> CodePrior:
    if ck.get("stage") != "prior":
        common.die(
            f"{cfg.out}/ckpt.pt has no prior: a VQ-VAE alone cannot sample; train one "
            "with --stage prior"
        )
    prior = CodePrior(**ck["model_args"]["prior"])
    common.load_state(prior.to(device).eval(), ck["prior"], "prior")
    return prior


@torch.no_grad()
def sample(cfg: Config):
    """--sample N: codes from the prior, decoded by stage 1, into samples.npz and samples.png."""
    device, _ = common.setup(cfg)
    vq, ck = load_stage1(cfg, device)
    prior, (_, H, W) = load_prior(cfg, ck, device), ck["shape"]
    g, xs = torch.Generator(device).manual_seed(cfg.seed), []
    for i in range(0, cfg.sample, cfg.batch_size):
        n = min(cfg.batch_size, cfg.sample - i)
        idx = sample_codes(prior, n, (H // 4) * (W // 4), cfg.temperature, g, device)
        xs.append(vq.decode(idx.view(n, H // 4, W // 4)).clamp(-1, 1))
        print(f"sampled {i + n}/{cfg.sample}", flush=True)
    common.save_samples(cfg.out, torch.cat(xs))
    print(
        f"wrote {cfg.sample} samples (temperature {cfg.temperature}) to {cfg.out}/samples.npz "
        "and samples.png"
    )


@torch.no_grad()
def evaluate(cfg: Config) -> dict:
    """--eval: test reconstruction MSE and PSNR, codebook perplexity and usage, the prior's NLL."""
    device, _ = common.setup(cfg)
    vq, ck = load_stage1(cfg, device)
    cfg = common.from_run(cfg, ck)
    cfg.image_size, K = ck["shape"][-1], ck["model_args"]["vqvae"]["K"]
    x = common.load_images(cfg, train=False)[0]
    se, counts, nll = 0.0, torch.zeros(K, device=device), []
    prior = load_prior(cfg, ck, device) if ck.get("stage") == "prior" else None
    for xb in x.split(cfg.batch_size):
        xb = xb.to(device).float() / 127.5 - 1
        x_hat, _, idx, _ = vq(xb)
        se += (x_hat.clamp(-1, 1) - xb).pow(2).sum().item()
        counts += torch.bincount(idx.flatten(), minlength=K)
        if prior is not None:  # -log p(k) per grid, in nats
            k = idx.flatten(1)
            ce = F.cross_entropy(prior(k).flatten(0, 1).float(), k.flatten(), reduction="none")
            nll.append(ce.view(len(k), -1).sum(1))
    mse = se / x.numel()  # per pixel, images in [-1, 1]
    p = counts / counts.sum()
    res = {"mse": mse, "psnr_db": 10 * math.log10(4 / mse)}  # peak-to-peak 2: 10 log10(2^2 / MSE)
    res["perplexity"] = torch.exp(-(p * torch.log(p + 1e-10)).sum()).item()
    res |= {"codes_used": int((counts > 0).sum()), "K": K, "n": len(x)}
    res["step"] = ck.get("vq_step", ck["step"])
    if nll:  # nats per code grid (one per image), and bits per code
        nats = torch.cat(nll).mean().item()
        bits = nats / (idx[0].numel() * math.log(2))
        res |= dict(prior_nll_nats=nats, prior_bits_per_code=bits, prior_step=ck["step"])
    print(json.dumps(res))
    with open(Path(cfg.out) / "eval.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    cfg = common.parse(Config, "vqvae")
    if cfg.sample or cfg.eval:
        if os.environ.get("RANK", "0") == "0":  # sampling and evaluation run in one process
            if cfg.sample:
                sample(cfg)
            else:
                evaluate(cfg)
    elif cfg.stage == "prior":
        train_prior(cfg)
    else:
        train_vqvae(cfg)
