"""
Speed: training and sampling throughput of each model file, optionally beside peer implementations.

  python bench.py                                   # ddpm_ddim at the paper's CIFAR-10 size
  python bench.py --device cuda --compile --peers   # + denoising-diffusion-pytorch and diffusers
  python bench.py --tiny --image-size 28 --channels 1

Training img/s: one full optimizer step as the training loop runs it (loss under autocast,
backward, grad clip, AdamW, EMA update) on a batch already on the device, timed after warm-up
with the device synchronised. Sampling img/s: DDIM-50 as run by ddpm_ddim.ddim_sample; DDPM-1000
is timed on 50 of its steps (every step costs the same) and scaled to 1000. Peers run the very
same loss, optimizer and samplers, so only the network differs. Peak memory: CUDA only.
Writes bench.json beside the table.
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
# the DDPM U-Net and its peers at matched widths
def ddpm_nets(args):
    """(name, eps-model) pairs: ours, then each installed peer configured to the same U-Net."""
    mult, attn = ddpm_ddim.UNET[args.image_size]
    ch, blocks = (24, 1) if args.tiny else (128, 2)
    ours = ddpm_ddim.UNet(args.channels, ch, mult, blocks, attn, 0.1, args.image_size)
    nets = [("ddpm_ddim.UNet", ours)]
    if not args.peers:
        return nets
    try:  # lucidrains: linear attention at most levels, 2 blocks per decoder level (DDPM has 3),
        # so at our widths it has fewer parameters; a second copy is widened to our parameter count
        from denoising_diffusion_pytorch import Unet

        full = tuple(args.image_size // 2**i in attn for i in range(len(mult)))
        peer = lambda d: Unet(
            d, dim_mults=mult, channels=args.channels, dropout=0.1, full_attn=full, flash_attn=True
        )
        nets.append((f"denoising_diffusion_pytorch.Unet dim={ch}", peer(ch)))
        n_ours = sum(p.numel() for p in ours.parameters())
        count = lambda d: sum(p.numel() for p in peer(d).parameters())
        d = min(range(ch, 2 * ch, 8), key=lambda d: abs(count(d) - n_ours))  # widths divisible by 8
        if d != ch:
            nets.append((f"denoising_diffusion_pytorch.Unet dim={d}", peer(d)))
    except ImportError:
        print(
            "peer denoising-diffusion-pytorch not installed: pip install denoising-diffusion-pytorch"
        )
    try:  # diffusers: the DDPM CIFAR-10 layout (google/ddpm-cifar10-32), one attention head
        from diffusers import UNet2DModel

        kinds = ["Attn" if args.image_size // 2**i in attn else "" for i in range(len(mult))]
        net = UNet2DModel(sample_size=args.image_size, in_channels=args.channels, out_channels=args.channels,
                          block_out_channels=tuple(ch * m for m in mult), layers_per_block=blocks,
                          down_block_types=tuple(f"{k}DownBlock2D" for k in kinds),
                          up_block_types=tuple(f"{k}UpBlock2D" for k in reversed(kinds)),
                          attention_head_dim=None, dropout=0.1, norm_num_groups=8 if args.tiny else 32,
                          flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)  # fmt: skip
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


def time_eps_model(name, net, args, device, autocast, sched):
    """Training step and sampler throughput of one eps-model, as ddpm_ddim.py runs them."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)  # the same memory format for every network
    ema = common.EMA(net)
    opt = torch.optim.AdamW(
        net.parameters(), lr=2e-4, weight_decay=0.0, fused=device.type == "cuda"
    )
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
    return {"model": name, "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "train_img_s": round(args.batch_size / t_train, 1),
            "ddim50_img_s": round(args.sample_batch / t_ddim, 2),
            "ddpm1000_img_s": round(args.sample_batch / t_ddpm, 3),
            "peak_mem_MiB": round(mem) if mem else None}  # fmt: skip


def bench_ddpm(args, device, autocast):
    sched = ddpm_ddim.make_schedule(1000, "linear", device=device)
    return [time_eps_model(n, net, args, device, autocast, sched) for n, net in ddpm_nets(args)]


BENCHES = {"ddpm_ddim": bench_ddpm}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="ddpm_ddim", help=f"comma-separated: {', '.join(BENCHES)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 on CUDA"
    )
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peers", action="store_true", help="also time installed peer implementations")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps")
    p.add_argument("--iters", type=int, default=10, help="timed training steps")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(BENCHES)
    if unknown:
        common.die(f"no benchmark for {', '.join(sorted(unknown))} (have: {', '.join(BENCHES)})")
    if args.image_size not in ddpm_ddim.UNET:
        common.die(f"--image-size {args.image_size}: the U-Net takes {sorted(ddpm_ddim.UNET)}")
    cfg = common.Config(device=args.device, amp=args.amp, seed=0)
    device, autocast = common.setup(cfg)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or device.type
    )
    info = {"device": f"{device.type}: {name}", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16": device.type == "cuda" and args.amp, "compile": args.compile, "tiny": args.tiny, "channels_last": args.channels_last,
            "batch": args.batch_size, "shape": [args.channels, args.image_size, args.image_size]}  # fmt: skip
    rows = [r for m in args.models.split(",") for r in BENCHES[m](args, device, autocast)]
    print(json.dumps(info))
    cols = list(rows[0])
    print(" | ".join(f"{c:>14}" if i else f"{c:<34}" for i, c in enumerate(cols)))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>14}" if i else f"{r[c]:<34}" for i, c in enumerate(cols)))
    for r in rows[1:]:
        print(f"ours/{r['model']}: training {rows[0]['train_img_s'] / r['train_img_s']:.2f}x, "
              f"DDIM-50 sampling {rows[0]['ddim50_img_s'] / r['ddim50_img_s']:.2f}x")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
