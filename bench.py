"""
Speed: training and sampling throughput of each model file, optionally beside peer implementations.

  python bench.py                                   # ddpm_ddim at the paper's CIFAR-10 size
  python bench.py --device cuda --compile --peers   # + denoising-diffusion-pytorch and diffusers
  python bench.py --tiny --image-size 28 --channels 1
  python bench.py --models vae,vqvae --peers --image-size 28 --channels 1  # + vector-quantize
  python bench.py --models gan --image-size 28 --channels 1       # gan.py and cgan_pix2pix.py
  python bench.py --models flow --image-size 28 --channels 1      # flow.py: Glow, RealNVP
  python bench.py --models cfg_ldm --image-size 28 --channels 1   # latent vs pixel U-Net
  python bench.py --models cyclegan --image-size 256 --batch-size 1  # the paper's CycleGAN
  python bench.py --models stargan --image-size 128 --batch-size 16  # the paper's StarGAN
  python bench.py --models progan --tiny --image-size 32 --channels 1 --batch-size 32  # MNIST

Training img/s: one full optimizer step as the training loop runs it (loss under autocast,
backward, grad clip, AdamW, EMA update) on a batch already on the device, timed after warm-up
with the device synchronised. Sampling img/s: DDIM-50 as run by ddpm_ddim.ddim_sample; DDPM-1000
is timed on 50 of its steps (every step costs the same) and scaled to 1000. Peers run the very
same loss, optimizer and samplers, so only the network differs. Peak memory: CUDA only.
vae / vqvae: a whole Adam step of each model, decoding and prior sampling, and the vector
quantizer alone (forward + backward in training mode) beside vector-quantize-pytorch's
VectorQuantize set to the same method. gan: one D step and one G step of gan.py's DCGAN (and
the same with the G step computing D's weight gradients, as most copies do), of the cGAN and of
pix2pix; sampling is G alone. Writes bench.json beside the tables.
"""

import argparse
import json
import platform
import time

import torch

import common
import ddpm_ddim


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeat):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


# -----------------------------------------------------------------------------
# the DDPM U-Net (and, with --peers, the peers' at matched widths)
def ddpm_nets(args):
    """(name, eps-model) pairs: ours, then each installed peer configured to the same U-Net."""
    cfg = ddpm_ddim.Config(tiny=args.tiny)
    unet = ddpm_ddim.model_args(cfg, args.channels, args.image_size)["unet"]
    ours = ddpm_ddim.UNet(**unet)
    return [("ddpm_ddim.UNet", ours)] + (ddpm_peers(args, ours, unet) if args.peers else [])


# -----------------------------------------------------------------------------
# peers: installed reference implementations, configured to the networks they stand beside
def ddpm_peers(args, ours, unet) -> list:
    """denoising-diffusion-pytorch's Unet (at our width and at our parameter count) and
    diffusers' UNet2DModel in the DDPM CIFAR-10 layout, as (name, eps-model) pairs."""
    mult, attn = unet["ch_mult"], unet["attn_res"]
    ch, blocks = unet["ch"], unet["num_res_blocks"]
    nets = []
    try:  # lucidrains: linear attention at most levels, 2 blocks per decoder level (DDPM has 3),
        # so at our widths it has fewer parameters; a second copy is widened to our parameter count
        from denoising_diffusion_pytorch import Unet

        full = tuple(args.image_size // 2**i in attn for i in range(len(mult)))
        kw = dict(dim_mults=mult, channels=args.channels, dropout=0.1, full_attn=full)
        peer = lambda d: Unet(d, flash_attn=True, **kw)
        nets.append((f"denoising_diffusion_pytorch.Unet dim={ch}", peer(ch)))
        n_ours = sum(p.numel() for p in ours.parameters())
        count = lambda d: sum(p.numel() for p in peer(d).parameters())
        d = min(range(ch, 2 * ch, 8), key=lambda d: abs(count(d) - n_ours))  # widths divisible by 8
        if d != ch:
            nets.append((f"denoising_diffusion_pytorch.Unet dim={d}", peer(d)))
    except ImportError:
        print("peer not installed: pip install denoising-diffusion-pytorch")
    try:  # diffusers: the DDPM CIFAR-10 layout (google/ddpm-cifar10-32), one attention head
        from diffusers import UNet2DModel

        kinds = ["Attn" if args.image_size // 2**i in attn else "" for i in range(len(mult))]
        layout = dict(
            block_out_channels=tuple(ch * m for m in mult),
            layers_per_block=blocks,
            down_block_types=tuple(f"{k}DownBlock2D" for k in kinds),
            up_block_types=tuple(f"{k}UpBlock2D" for k in reversed(kinds)),
        )
        net = UNet2DModel(
            sample_size=args.image_size, in_channels=args.channels, out_channels=args.channels,
            attention_head_dim=None, dropout=0.1, norm_num_groups=8 if args.tiny else 32,
            flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, **layout,
        )  # fmt: skip
        nets.append(("diffusers.UNet2DModel", DiffusersEps(net)))
    except ImportError:
        print("peer diffusers not installed: pip install diffusers")
    return nets


class DiffusersEps(torch.nn.Module):
    """Adapts UNet2DModel's output object to the eps-model call eps(x, t)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def vq_peers() -> list:
    """vector-quantize-pytorch's VectorQuantize set to our two methods: EMA decay 0.99,
    commitment 0.25, restarts below 1 use, plain straight-through; and a learnable codebook."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        print("peer not installed: pip install vector-quantize-pytorch")
        return []
    kw = dict(dim=64, codebook_size=512, decay=0.99, commitment_weight=0.25)
    kw |= dict(accept_image_fmap=True, threshold_ema_dead_code=1, rotation_trick=False)
    learnable = VectorQuantize(**kw, learnable_codebook=True, ema_update=False)
    return [
        ("vector_quantize_pytorch ema", VectorQuantize(**kw)),
        ("vector_quantize_pytorch learnable", learnable),
    ]


def time_eps_model(name, net, args, device, autocast, sched):
    """Training step and sampler throughput of one eps-model, as ddpm_ddim.py runs them."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)  # the same memory format for every network
    ema = common.EMA(net)
    opt = torch.optim.AdamW(net.parameters(), 2e-4, weight_decay=0.0, fused=device.type == "cuda")
    fwd = torch.compile(net) if args.compile else net
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    x0 = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    step = [0]

    def train_step():  # exactly the body of ddpm_ddim.train()'s loop
        with autocast:
            loss = ddpm_ddim.p_losses(fwd, sched, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, step[0])
        step[0] += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed(train_step, device, args.warmup)
    t_train = timed(train_step, device, args.iters)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    eps = ddpm_ddim.eps_fn(ema.module.eval(), autocast)
    x_T = torch.randn(args.sample_batch, *x0.shape[1:], device=device)
    head = {k: v[:50] for k, v in sched.items()}  # 50 ancestral steps, each as costly as any other
    with torch.inference_mode():
        ddpm_ddim.ddim_sample(eps, sched, x_T, steps=2)  # warm-up
        t_ddim = timed(lambda: ddpm_ddim.ddim_sample(eps, sched, x_T, steps=50), device, 1)
        t_ddpm = timed(lambda: ddpm_ddim.ddpm_sample(eps, head, x_T), device, 1) * 1000 / 50
    return {
        "model": name,
        "params_M": params(net),
        "train_img_s": round(args.batch_size / t_train, 1),
        "ddim50_img_s": round(args.sample_batch / t_ddim, 2),
        "ddpm1000_img_s": round(args.sample_batch / t_ddpm, 3),
        "peak_mem_MiB": round(mem) if mem else None,
    }


def params(net, trainable=False) -> float:
    """Parameter count in millions."""
    n = sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable)
    return round(n / 1e6, 2)


def bench_ddpm(args, device, autocast):
    sched = ddpm_ddim.make_schedule(1000, "linear", device=device)
    rows = [time_eps_model(n, net, args, device, autocast, sched) for n, net in ddpm_nets(args)]
    return rows, ddpm_ratios(rows)


def ddpm_ratios(rows):
    ratio = lambda r, k: rows[0][k] / r[k]
    return [
        f"ours/{r['model']}: training {ratio(r, 'train_img_s'):.2f}x, "
        f"DDIM-50 sampling {ratio(r, 'ddim50_img_s'):.2f}x"
        for r in rows[1:]
    ]


# -----------------------------------------------------------------------------
# the autoencoders: whole training steps and samplers, and the quantizer beside its peer
def train_rate(net, loss_fn, x, args, device, autocast):
    """Images/s of one Adam step of loss_fn(net, x), as the training loops run it."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(net) if args.compile else net

    def step():
        with autocast:
            loss = loss_fn(fwd, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timed(step, device, args.warmup)
    return round(len(x) / timed(step, device, args.iters), 1)


def bench_vae(args, device, autocast):
    import vae

    cfg = vae.Config(tiny=args.tiny, likelihood="bernoulli")
    net = vae.VAE(**vae.model_args(cfg, args.channels, args.image_size)["vae"]).to(device)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device)
    loss = lambda m, x: vae.loss_terms(m, x, "bernoulli")[0]
    rate = train_rate(net, loss, x.bernoulli(), args, device, autocast)
    z = torch.randn(args.sample_batch, net.decoder.fc[0].in_features, device=device)
    with torch.inference_mode():
        t = timed(lambda: vae.decoder_mean(net.decoder(z), "bernoulli"), device, args.iters)
    row = {"model": "vae.VAE", "params_M": params(net), "train_img_s": rate}
    return [dict(row, sample_img_s=round(args.sample_batch / t, 1))], []


def bench_vqvae(args, device, autocast):
    """The quantizer alone (forward + backward, training mode) at K=512, D=64 on the latent grid
    of this image size, ours beside vector-quantize-pytorch's VectorQuantize configured to the
    same method; then a whole VQ-VAE step, a prior step, and prior sampling."""
    import torch.nn.functional as F

    import vqvae

    h = args.image_size // 4
    z_e = torch.randn(args.batch_size, 64, h, h, device=device, requires_grad=True)
    quantizers = [
        ("vqvae.VectorQuantizer ema", vqvae.VectorQuantizer(512, 64, ema=True)),
        ("vqvae.VectorQuantizer eq3", vqvae.VectorQuantizer(512, 64)),
    ]
    peers = vq_peers() if args.peers else []
    if peers:  # each beside ours: ema, theirs ema, eq3, theirs learnable
        quantizers = [quantizers[0], peers[0], quantizers[1], peers[1]]
    rows = []
    for name, q in quantizers:
        q, ours = q.to(device).train(), name.startswith("vqvae")

        def step(q=q, ours=ours):
            out = q(z_e)  # ours: (z_q, loss, idx, stats); theirs: (z_q, idx, loss)
            z_q, loss = out[0], out[1] if ours else out[2]
            (z_q.float().square().mean() + loss.sum()).backward()

        timed(step, device, args.warmup)
        rate = round(args.batch_size / timed(step, device, args.iters), 1)
        rows.append({"model": name, "quantizer_fwd_bwd_img_s": rate})
    k = "quantizer_fwd_bwd_img_s"
    ratios = [
        f"ours/{b['model']}: quantizer forward+backward {a[k] / b[k]:.2f}x"
        for a, b in zip(rows[::2], rows[1::2])
        if len(rows) == 4
    ]
    cfg = vqvae.Config(tiny=args.tiny)
    net = vqvae.VQVAE(**vqvae.vqvae_args(cfg, args.channels, args.image_size)).to(device)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device)
    x = x * 2 - 1

    def vq_loss(m, x):
        x_hat, codebook_commit, _, _ = m(x)
        return F.mse_loss(x_hat.float(), x) + codebook_commit

    prior = vqvae.CodePrior(**vqvae.prior_args(cfg, 512, h * h)).to(device)
    k = torch.randint(512, (args.batch_size, h * h), device=device)
    prior_loss = lambda m, k: F.cross_entropy(m(k).flatten(0, 1).float(), k.flatten())

    def sample():
        codes = vqvae.sample_codes(prior.eval(), args.sample_batch, h * h, device=device)
        return net.decode(codes.view(-1, h, h))

    with torch.inference_mode():
        t = timed(sample, device, 1)
    row = {"model": "vqvae.VQVAE + CodePrior"}
    row["train_img_s"] = train_rate(net, vq_loss, x, args, device, autocast)
    row["prior_train_img_s"] = train_rate(prior.train(), prior_loss, k, args, device, autocast)
    rows.append(dict(row, sample_img_s=round(args.sample_batch / t, 1)))
    return rows, ratios


# -----------------------------------------------------------------------------
# the GANs: a D step then a G step, as the loops run them; sampling
def gan_rate(G, D, step_fn, args, device):
    """Images/s of step_fn(G, D, opt_g, opt_d) with Adam (0.5, 0.999), as the loops run it."""
    fused = device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused)
    G_, D_ = (torch.compile(m) if args.compile else m for m in (G, D))
    step = lambda: step_fn(G_, D_, opt_g, opt_d)
    timed(step, device, args.warmup)
    return round(args.batch_size / timed(step, device, args.iters), 1)


def bench_gan(args, device, autocast):
    """gan.py's DCGAN, also with the G step computing D's weight gradients as most copies do (our
    G step freezes D); cgan_pix2pix.py's cGAN and pix2pix (at 32x32 when asked for 28)."""
    import cgan_pix2pix as P
    import gan

    B, C, S = args.batch_size, args.channels, args.image_size
    x = torch.rand(B, C, S, S, device=device) * 2 - 1
    y = torch.randint(10, (B,), device=device)
    cfg = gan.Config(tiny=args.tiny)
    dcgan_args = gan.model_args(cfg, C, S)

    def dcgan(G, D, opt_g, opt_d, freeze=True):
        with autocast:
            fake = G(torch.randn(B, 100, device=device))
        gan.d_step(D, opt_d, x, fake, "ns", autocast)
        if freeze:
            return gan.g_step(D, opt_g, fake, "ns", autocast)
        with autocast:  # the common G step: D's weights get gradients that are thrown away
            loss = gan.g_loss(D(fake))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

    def cgan(G, D, opt_g, opt_d):
        with autocast:
            fake = G(torch.randn(B, 100, device=device), y)
        P.d_step(D, opt_d, x, fake, y, 1.0, autocast)
        P.g_step(D, opt_g, fake, y, None, 0.0, autocast)

    S2 = 32 if S == 28 else S
    a, b = (torch.rand(B, C, S2, S2, device=device) * 2 - 1 for _ in range(2))

    def pix2pix(G, D, opt_g, opt_d):
        with autocast:
            fake = G(a)
        P.d_step(D, opt_d, b, fake, a, 0.5, autocast)
        P.g_step(D, opt_g, fake, a, b, 100.0, autocast)

    def nets(G, D, kw):
        return G(**kw["G"]).to(device), D(**kw["D"]).to(device)

    rows, z = [], torch.randn(args.sample_batch, 100, device=device)
    G, D = nets(gan.Generator, gan.Discriminator, dcgan_args)
    rate = gan_rate(G, D, dcgan, args, device)
    t = timed(lambda: gan.generate(G, z), device, args.iters)
    rows.append(
        {"model": "gan.py DCGAN", "train_img_s": rate, "sample_img_s": round(len(z) / t, 1)}
    )
    G, D = nets(gan.Generator, gan.Discriminator, dcgan_args)
    rate = gan_rate(G, D, lambda *m: dcgan(*m, freeze=False), args, device)
    rows.append({"model": "gan.py DCGAN, D not frozen in G step", "train_img_s": rate})
    p2p_cfg = P.Config(tiny=args.tiny)
    G, D = nets(P.ConditionalGenerator, P.ProjectionDiscriminator, P.cgan_args(p2p_cfg, C, S, 10))
    yz = torch.arange(len(z), device=device) % 10
    rate = gan_rate(G, D, cgan, args, device)
    t = timed(lambda: P.generate(G, z, yz), device, args.iters)
    rows.append(
        {"model": "cgan_pix2pix.py cGAN", "train_img_s": rate, "sample_img_s": round(len(z) / t, 1)}
    )
    G, D = nets(P.UNetGenerator, P.PatchDiscriminator, P.pix2pix_args(p2p_cfg, C, C, S2))
    rate = gan_rate(G, D, pix2pix, args, device)
    t = timed(lambda: P.translate(G, a), device, args.iters)
    name = f"cgan_pix2pix.py pix2pix {S2}px"
    rows.append({"model": name, "train_img_s": rate, "sample_img_s": round(len(a) / t, 1)})
    freeze = rows[0]["train_img_s"] / rows[1]["train_img_s"]
    return rows, [f"freezing D in the G step: training {freeze:.2f}x"]


def bench_flow(args, device, autocast):
    """flow.py's Glow (also with --lu) and RealNVP at their default sizes (--tiny: K=4/2, width
    32): one Adam step on bits/dim of a uint8-valued batch, and sampling at T = 0.7."""
    import flow

    S, rows = args.image_size, []
    x = torch.randint(0, 256, (args.batch_size, args.channels, S, S), device=device) / 127.5 - 1
    kinds = [("glow", "glow", False), ("glow --lu", "glow", True), ("realnvp", "realnvp", False)]
    for name, arch, lu in kinds:
        cfg = flow.Config(arch=arch, lu=lu, tiny=args.tiny)
        net = flow.Flow(**flow.model_args(cfg, args.channels, S)["flow"]).to(device)
        net.initialize(flow.preprocess(flow.dequantize(x, 8), arch)[0])
        loss = lambda m, x, arch=arch: flow.nll_bits(m, x, 8, arch, 0.05).mean()
        rate = train_rate(net, loss, x, args, device, autocast)
        sample = lambda net=net: net.inverse(n=args.sample_batch, temperature=0.7)
        with torch.inference_mode():
            t = timed(sample, device, args.iters)
        row = {"model": f"flow.py {name}", "params_M": params(net, trainable=True)}
        rows.append(dict(row, train_img_s=rate, sample_img_s=round(args.sample_batch / t, 1)))
    return rows, []


def bench_cfg_ldm(args, device, autocast):
    """cfg_ldm.py's class-conditional U-Net, one Adam step on pixels and on the f-4 latents of
    the same images (from cached q(z | x) statistics as its loop trains, and with the encoder
    run on every batch as LDM's code does); sampling is CFG DDIM-50 (doubled batch), decoded."""
    import cfg_ldm as L

    cfg, S, C, B = L.Config(tiny=args.tiny), args.image_size, args.channels, args.batch_size
    ae = L.AutoencoderKL(**L.ae_args(cfg, C, S)["ae"]).to(device).eval().requires_grad_(False)
    x, y = torch.rand(B, C, S, S, device=device) * 2 - 1, torch.randint(0, 10, (B,), device=device)
    sched, rows = L.make_schedule(1000, device=device), []
    kinds = [
        ("pixels", C, S, None),
        ("latents", 4, S // 4, None),
        ("latents + encoder", 4, S // 4, ae),
    ]
    for name, ch, res, enc in kinds:
        torch.manual_seed(0)
        net = L.LDM(**L.ldm_args(cfg, ch, 10)["ldm"]).to(device)
        x0 = x if ch == C else torch.randn(B, ch, res, res, device=device)
        loss = lambda m, x0, enc=enc: L.ldm_loss(m, sched, enc.to_latent(x) if enc else x0, y, 0.1)
        rate = train_rate(net, loss, x0, args, device, autocast)
        x_T = torch.randn(args.sample_batch, ch, res, res, device=device)
        smp = L.Sampler(net.eval(), None if ch == C else ae, sched, autocast, 50)
        t = timed(lambda smp=smp, x_T=x_T: smp(x_T, y[: len(x_T)], 3.0), device, 1)
        row = {"model": f"cfg_ldm.LDM on {name}", "params_M": params(net), "train_img_s": rate}
        rows.append(dict(row, cfg_ddim50_img_s=round(len(x_T) / t, 1)))
    ratio = rows[1]["train_img_s"] / rows[0]["train_img_s"]
    enc = rows[2]["train_img_s"] / rows[0]["train_img_s"]
    return rows, [f"latents/pixels training: {ratio:.1f}x ({enc:.1f}x encoding every batch)"]


def bench_cyclegan(args, device, autocast):
    """cyclegan.py: one whole training step as its loop runs it (both Gs on the adversarial,
    cycle and identity losses, the pools, both Ds), and G_AB alone for sampling; the paper's
    networks at --image-size (9 blocks from 256 px, 70x70 PatchGAN from 128 px). Peak memory of
    the training step on CUDA."""
    import cyclegan as CG

    B, C, S = args.batch_size, args.channels, args.image_size
    kw = CG.model_args(CG.Config(tiny=args.tiny), C, S)
    nets = {k: (CG.Generator if k[0] == "G" else CG.PatchDiscriminator)(**v) for k, v in kw.items()}
    G_AB, G_BA, D_A, D_B = (nets[k].to(device) for k in ("G_AB", "G_BA", "D_A", "D_B"))
    run = [torch.compile(m) if args.compile else m for m in (G_AB, G_BA, D_A, D_B)]
    adam = lambda *ms: torch.optim.Adam(
        [p for m in ms for p in m.parameters()],
        2e-4,
        betas=(0.5, 0.999),
        fused=device.type == "cuda",
    )
    opt_g, opt_d, pools = adam(G_AB, G_BA), adam(D_A, D_B), (CG.ImagePool(50), CG.ImagePool(50))
    a, b = (torch.rand(B, C, S, S, device=device) * 2 - 1 for _ in range(2))

    def step():
        with autocast:
            fa, fb, _ = CG.g_step(run[0], run[1], D_A, D_B, opt_g, a, b)
        fa, fb = pools[0].query(fa), pools[1].query(fb)
        with autocast:
            CG.d_step(run[2], run[3], opt_d, a, b, fa, fb)

    timed(step, device, args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate = round(B / timed(step, device, args.iters), 1)
    row = {"model": f"cyclegan.py {S}px, {kw['G_AB']['n_blocks']} blocks", "train_img_s": rate}
    if device.type == "cuda":
        row["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    x = torch.rand(args.sample_batch, C, S, S, device=device) * 2 - 1
    with autocast:
        t = timed(lambda: CG.translate(run[0], x), device, args.iters)
    row |= {"sample_img_s": round(len(x) / t, 1), "params_M": params(G_AB) * 2 + params(D_A) * 2}
    return [row], []


def bench_stargan(args, device, autocast):
    """stargan.py with 5 attributes (the paper's CelebA setup): 5 D steps (WGAN-GP, domain loss)
    and one G step, as its loop runs them, counted as 5 training steps of a batch each; sampling
    is G alone. Peak memory of training on CUDA."""
    import stargan as SG

    B, C, S = args.batch_size, args.channels, args.image_size
    kw = SG.model_args(SG.Config(tiny=args.tiny), C, S, 5)
    G, D = SG.Generator(**kw["G"]).to(device), SG.Discriminator(**kw["D"]).to(device)
    G_, D_ = (torch.compile(m) if args.compile else m for m in (G, D))
    fused = device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), 1e-4, betas=(0.5, 0.999), fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), 1e-4, betas=(0.5, 0.999), fused=fused)
    x = torch.rand(B, C, S, S, device=device) * 2 - 1
    c = torch.cat([torch.eye(3)[torch.randint(3, (B,))], torch.randint(2, (B, 2))], 1).to(device)
    groups = [[0, 1, 2]]  # three hair colours, then two binary attributes

    def step():
        for _ in range(5):
            with autocast:
                SG.d_step(G_, D_, opt_d, x, c, SG.shuffled_targets(c), groups)
        with autocast:
            SG.g_step(G_, D, opt_g, x, c, SG.shuffled_targets(c), groups)

    timed(step, device, max(1, args.warmup // 5))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate = round(5 * B / timed(step, device, max(1, args.iters // 5)), 1)
    row = {"model": f"stargan.py {S}px, D {kw['D']['n_layers']} layers", "train_img_s": rate}
    if device.type == "cuda":
        row["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    xs = torch.rand(args.sample_batch, C, S, S, device=device) * 2 - 1
    with autocast:
        t = timed(lambda: SG.translate(G_, xs, c[:1].expand(len(xs), -1)), device, args.iters)
    row |= {"sample_img_s": round(len(xs) / t, 1), "params_M": params(G) + params(D)}
    return [row], []


def bench_progan(args, device, autocast):
    """progan.py, both generators: one D step (WGAN-GP + drift), one G step and the EMA update,
    as its loop runs them, at every resolution of the growth up to --image-size (stable phase,
    alpha 1), and sampling at the last; peak memory of training on CUDA."""
    S = args.image_size
    if S < 8 or S & (S - 1):
        common.die(f"--image-size {S}: progan.py grows to powers of two, at least 8")
    return [r for arch in ("pro", "style") for r in progan_rows(arch, args, device, autocast)], []


def progan_rows(arch, args, device, autocast):
    import progan as PG

    B, C, S = args.batch_size, args.channels, args.image_size
    kw = PG.model_args(PG.Config(tiny=args.tiny, image_size=S, arch=arch), C)
    G, D = PG.build_g(arch, kw["G"]).to(device), PG.Discriminator(**kw["D"]).to(device)
    G_, D_ = (torch.compile(m) if args.compile else m for m in (G, D))
    adam = dict(betas=(0.0, 0.99), eps=1e-8, fused=device.type == "cuda")
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-3, **adam) for m in (G, D))
    ema, rows = common.EMA(G, 0.999), []

    def step(res, x):
        with autocast:
            fake = G_(torch.randn(B, kw["G"]["z_dim"], device=device), res)
            PG.d_step(D_, opt_d, x, fake, 1.0)
            PG.g_step(D, opt_g, fake, 1.0)
        ema.update(G, 1000)

    for res in PG.resolutions(S):
        x = torch.rand(B, C, res, res, device=device) * 2 - 1
        timed(lambda res=res, x=x: step(res, x), device, args.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda res=res, x=x: step(res, x), device, args.iters)
        rows.append({"model": f"progan.py {arch} at {res}px", "train_img_s": round(B / t, 1)})
        if device.type == "cuda":
            rows[-1]["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    z = torch.randn(args.sample_batch, kw["G"]["z_dim"], device=device)
    with autocast:
        t = timed(lambda: PG.generate(G_, z, S), device, args.iters)
    rows[-1] |= {"sample_img_s": round(len(z) / t, 1), "params_M": round(params(G) + params(D), 2)}
    return rows


BENCHES = {
    "ddpm_ddim": bench_ddpm,
    "cfg_ldm": bench_cfg_ldm,
    "vae": bench_vae,
    "vqvae": bench_vqvae,
    "gan": bench_gan,
    "flow": bench_flow,
    "cyclegan": bench_cyclegan,
    "stargan": bench_stargan,
    "progan": bench_progan,
}  # each: (rows, ratios)


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h with every default, and the description as written."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--models", default="ddpm_ddim", help=f"comma-separated: {', '.join(BENCHES)}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--amp", action=on_off, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--tiny", action="store_true", help="the --tiny sizes of the model files")
    p.add_argument("--channels-last", action=on_off, default=True, help="NHWC (ddpm_ddim)")
    p.add_argument("--peers", action="store_true", help="also time installed peer implementations")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=64, help="sampling batch")
    p.add_argument("--image-size", type=int, default=32, help="square images of this size")
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps")
    p.add_argument("--iters", type=int, default=10, help="timed training steps")
    p.add_argument("--out", default="bench.json", help="the rows as JSON")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(BENCHES)
    if unknown:
        common.die(f"no benchmark for {', '.join(sorted(unknown))} (have: {', '.join(BENCHES)})")
    if args.image_size not in ddpm_ddim.UNET:
        common.die(f"--image-size {args.image_size}: the U-Net takes {sorted(ddpm_ddim.UNET)}")
    cfg = common.Config(device=args.device, amp=args.amp, seed=0)
    device, autocast = common.setup(cfg)
    name = platform.processor() or device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    info = {"device": f"{device.type}: {name}", "threads": torch.get_num_threads()}
    info |= {"torch": torch.__version__, "bf16": device.type == "cuda" and args.amp}
    info |= {"compile": args.compile, "tiny": args.tiny, "channels_last": args.channels_last}
    info |= {"batch": args.batch_size, "shape": [args.channels, args.image_size, args.image_size]}
    print(json.dumps(info))
    rows = []
    for m in args.models.split(","):
        part, ratios = BENCHES[m](args, device, autocast)
        cols = list(dict.fromkeys(k for r in part for k in r))  # a table per model file
        cell = lambda i, v: f"{str(v):>14}" if i else f"{v:<34}"
        print(" | ".join(cell(i, c) for i, c in enumerate(cols)))
        for r in part:
            print(" | ".join(cell(i, r.get(c, "")) for i, c in enumerate(cols)))
        print("\n".join(ratios))
        rows += part
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
