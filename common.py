"""Plumbing shared by the model files: config -> argparse, device/precision/DDP setup, data,
EMA, image grids, atomic checkpoints with exact resume, logging, signals. No model lives here."""

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def die(msg: str, code: int = 2):
    """Bad input: one line on stderr, no traceback, exit code 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# --- config: a dataclass is the single source of flags; its trailing comments are the -h text
@dataclasses.dataclass
class Config:
    dataset: str = "mnist"  # mnist | fashion | cifar10 | celeba | folder:PATH (ImageFolder)
    data_dir: str = "./data"  # where torchvision finds (or downloads) the dataset
    download: bool = True  # let torchvision download a missing dataset
    image_size: int = 0  # 0: the dataset's own (28 digits, 32 CIFAR-10, 64 CelebA and folders)
    out: str = ""  # output folder; default runs/<script>
    steps: int = 100000  # optimizer steps
    batch_size: int = 128  # global batch, split over DDP ranks
    lr: float = 2e-4  # peak learning rate
    seed: int = 0
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    compile: bool = False  # torch.compile the training model
    amp: bool = True  # bf16 autocast on CUDA (ignored elsewhere)
    tiny: bool = False  # a small model for CPU runs and tests
    log_every: int = 100
    sample_every: int = 1000  # 0: never
    ckpt_every: int = 1000  # 0: only at the end
    resume: bool = False  # continue from <out>/ckpt.pt
    sample: int = 0  # N > 0: no training; load <out>/ckpt.pt, write N samples


def parse(cls, script: str, argv=None):
    """Build argparse from a Config dataclass: `-h` shows defaults, bools get --x/--no-x."""
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(klass), re.M):
            helps[m.group(1)] = m.group(2)
    p = argparse.ArgumentParser(
        f"{script}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):
        kw = dict(default=f.default, help=helps.get(f.name, " "))
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    argv = sys.argv[1:] if argv is None else argv  # --batch_size=64 == --batch-size 64
    argv = [re.sub(r"^--[\w-]+", lambda m: m.group(0).replace("_", "-"), a) for a in argv]
    cfg = cls(**vars(p.parse_args(argv)))
    cfg.out = cfg.out or f"runs/{script}"
    return cfg


# --- device, precision, data parallel (torchrun: NCCL on GPUs, gloo on CPU)
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def setup(cfg):
    """Pick the device, join DDP under torchrun, seed per rank, TF32; return (device, autocast)."""
    avail = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if cfg.device == "auto":
        cfg.device = "cuda" if avail["cuda"] else "mps" if avail["mps"] else "cpu"
    if not avail.get(cfg.device):
        die(f"--device {cfg.device} is unknown or not available here (auto, cpu, cuda, mps)")
    device = torch.device(cfg.device)
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed = cfg.seed + rank()  # every rank draws its own noise
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and cfg.amp and torch.cuda.is_bf16_supported():
        return device, torch.autocast("cuda", dtype=torch.bfloat16)  # bf16: no GradScaler needed
    return device, contextlib.nullcontext()


def wrap(model, cfg, device):
    """DDP (under torchrun), then optional torch.compile; save the unwrapped `model`'s state."""
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if cfg.compile else model


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over DDP ranks (identity in one process); NCCL wants CUDA tensors, gloo CPU."""
    if not dist.is_initialized():
        return t
    t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
    dist.all_reduce(t, op=op)
    return t


# --- data: a split decoded once to uint8, held on the GPU when small, served in [-1, 1]
def load_images(cfg, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 (N, C, H, W), labels); CelebA's labels are its 40 attributes."""
    import torchvision
    import torchvision.transforms as T

    name, root, D = cfg.dataset, cfg.data_dir, torchvision.datasets
    size = cfg.image_size or {"mnist": 28, "fashion": 28, "cifar10": 32}.get(name, 64)
    crop = [T.CenterCrop(178)] if name == "celeba" else []  # the usual aligned-face crop
    tf = T.Compose(crop + [T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    sets = {"mnist": D.MNIST, "fashion": D.FashionMNIST, "cifar10": D.CIFAR10}
    try:
        if name in sets:
            ds = sets[name](root, train=train, download=cfg.download, transform=tf)
        elif name == "celeba":
            split = "train" if train else "test"
            ds = D.CelebA(root, split, target_type="attr", transform=tf, download=cfg.download)
        elif name.startswith("folder:"):
            ds = D.ImageFolder(name[len("folder:") :], transform=tf)
        else:
            die(f"unknown dataset {name!r} (mnist, fashion, cifar10, celeba, folder:PATH)")
    except (RuntimeError, OSError) as e:  # missing files, or no network to fetch them
        die(f"cannot load {name} from {root}: {str(e).splitlines()[0][:200]}")
    workers = min(4, os.cpu_count()) if len(ds) > 20000 else 0
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=500, num_workers=workers))
    return torch.cat(xs), torch.cat(ys)


class Batches:
    """Infinite, resumable, DDP-sharded batches (x in [-1, 1], y), optionally randomly flipped."""

    def __init__(self, x_u8, y, batch_size, seed, device, flip=False):
        if batch_size % world() or batch_size > len(x_u8):
            die(f"--batch-size {batch_size} must divide by {world()} ranks and be <= {len(x_u8)}")
        on_dev = device.type != "cpu" and x_u8.numel() < 2**31  # small datasets live on the GPU
        self.x, self.y = (x_u8.to(device), y.to(device)) if on_dev else (x_u8, y)
        self.device, self.B, self.seed, self.flip = device, batch_size, seed, flip
        self.load_state_dict({"epoch": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(
        self, s
    ):  # the permutation depends on (seed, epoch) only: same on all ranks
        self.epoch, self.pos = s["epoch"], s["pos"]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.perm = torch.randperm(len(self.x), generator=g).to(self.x.device)

    def __next__(self):
        if self.pos + self.B > len(self.x):  # drop the last partial batch, start a new epoch
            self.load_state_dict({"epoch": self.epoch + 1, "pos": 0})
        idx = self.perm[self.pos : self.pos + self.B][rank() :: world()]  # this rank's shard
        self.pos += self.B
        x = self.x[idx].to(self.device, non_blocking=True).float() / 127.5 - 1  # [0,255] -> [-1,1]
        if self.flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, self.y[idx].to(self.device, non_blocking=True)


# --- EMA, images
class EMA:
    """Exponential moving average of weights; decay min(decay, (1+n)/(10+n)) warms up short runs."""

    def __init__(self, model, decay=0.9999):
        self.module, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay
        for t in self.module.state_dict().values() if dist.is_initialized() else ():
            dist.broadcast(t, 0)  # start from rank 0's init, as DDP's replicas do

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        fl = [(e, m) for e, m in pairs if e.is_floating_point()]  # int buffers are just copied
        torch._foreach_lerp_([e for e, _ in fl], [m for _, m in fl], 1 - d)
        [e.copy_(m) for e, m in pairs if not e.is_floating_point()]


def save_grid(x: torch.Tensor, path, nrow: int = 8):
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid."""
    import torchvision

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(x.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=2)


def save_samples(out, x: torch.Tensor, y=None, nrow=None):
    """The --sample contract: <out>/samples.npz (arr_0 uint8 NHWC, arr_1 labels) + samples.png."""
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / "samples.npz", u8.cpu().numpy(), *([] if y is None else [y.cpu().numpy()]))
    save_grid(x[:256], Path(out) / "samples.png", nrow or int(math.sqrt(min(len(x), 256))))


# --- checkpoints: one dict, written atomically, holding everything an exact resume needs
def save_ckpt(path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # the previous checkpoint stays intact until this instant


def load_ckpt(path) -> dict:
    if not Path(path).is_file():
        die(f"no checkpoint at {path} (train first, or point --out at a run)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and "step" in ck, "not a checkpoint dict"
    except Exception as e:
        die(f"checkpoint {path} is corrupted or not ours ({type(e).__name__}: {str(e)[:120]})")
    for k, v in ck.items():  # strip torch.compile's prefix from every state dict
        if isinstance(v, dict):
            ck[k] = {n.removeprefix("_orig_mod."): t for n, t in v.items()}
    return ck


def load_state(module, state, what="model"):
    """load_state_dict, with a mismatch reported in one line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        msg = str(e).replace("\n", " ")[:160]
        die(f"checkpoint does not fit the {what} (other flags, e.g. --tiny, --image-size?): {msg}")


def checkpoint(cfg, step: int, data: Batches, **state):
    """Write <out>/ckpt.pt: the given state dicts, step, data position, every rank's RNG, config."""
    npst, cuda = np.random.get_state(), torch.cuda.is_available()
    rng = {"python": random.getstate(), "numpy": [npst[0], npst[1].tolist(), *npst[2:]],
           "torch": bytes(torch.get_rng_state().numpy()),  # plain bytes: gathers across ranks
           "cuda": [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()] if cuda else []}  # fmt: skip
    rngs = [rng]
    if dist.is_initialized():  # collective: every rank calls checkpoint()
        rngs = [None] * world()
        dist.all_gather_object(rngs, rng)
    if rank() == 0:
        ck = dict(state, step=step, data=data.state_dict(), rng=rngs)
        save_ckpt(Path(cfg.out) / "ckpt.pt", dict(ck, config=dataclasses.asdict(cfg)))


def resume(cfg, data: Batches, need=()) -> dict:
    """Load <out>/ckpt.pt (with the keys in `need`), restore the data position and this rank's RNG
    streams; return it."""
    ck = load_ckpt(Path(cfg.out) / "ckpt.pt")
    if not {"data", "rng", *need} <= ck.keys():
        die(f"{cfg.out}/ckpt.pt is not a {Path(sys.argv[0]).name} checkpoint")
    data.load_state_dict(ck["data"])
    if len(ck["rng"]) == world():  # another world size cannot replay the same streams
        s, as_tensor = (
            ck["rng"][rank()],
            lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8),
        )
        random.setstate(s["python"])
        np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], np.uint32), *s["numpy"][2:]))
        torch.set_rng_state(as_tensor(s["torch"]))
        if s["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([as_tensor(b) for b in s["cuda"]])
    return ck


# --- logging, signals
class Logger:
    """`step 1200/100000 | loss 0.0312 | 812 img/s | eta 1h02m` on stdout and in <out>/log.jsonl."""

    def __init__(self, cfg, start_step: int):
        self.cfg, self.sums, self.n, self.t0, self.step0 = cfg, {}, 0, time.time(), start_step

    def add(self, **losses):  # accumulated as tensors on the device: no host sync per step
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.n += 1

    def check(self, step: int) -> dict:
        """Mean losses since the last check over all ranks; a nan/inf stops the run (exit 1)."""
        vals = torch.stack([v for v in self.sums.values()]) / max(self.n, 1) if self.sums else None
        vals = {} if vals is None else dict(zip(self.sums, (all_reduce(vals) / world()).tolist()))
        if not all(map(math.isfinite, vals.values())):
            die(f"loss is not finite near step {step} ({vals}); stopped, the last good "
                f"checkpoint in {self.cfg.out} is kept: try a lower --lr", code=1)  # fmt: skip
        return vals

    def log(self, step: int, **extra):
        vals, now = {**self.check(step), **extra}, time.time()
        ips = (step - self.step0) * self.cfg.batch_size / max(now - self.t0, 1e-9)
        eta = (self.cfg.steps - step) * self.cfg.batch_size / max(ips, 1e-9)
        self.sums, self.n, self.t0, self.step0 = {}, 0, now, step
        if rank() == 0:
            msg = " | ".join(f"{k} {v:.4g}" for k, v in vals.items())
            eta_s = f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
            print(f"step {step}/{self.cfg.steps} | {msg} | {ips:.0f} img/s | eta {eta_s}")
            Path(self.cfg.out).mkdir(parents=True, exist_ok=True)
            with open(Path(self.cfg.out) / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **vals, "img_s": round(ips, 1), "t": now}) + "\n")


class Stopper:
    """SIGINT/SIGTERM only set a flag; the loop saves at the next step boundary. A second exits."""

    def __init__(self):
        self.flag = False
        stop = lambda *_: sys.exit(130) if self.flag else setattr(self, "flag", True)
        signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)

    def __call__(self, step: int) -> bool:  # under DDP all ranks must agree: sync every 10 steps
        if not dist.is_initialized() or step % 10:
            return self.flag and not dist.is_initialized()
        return bool(all_reduce(torch.tensor([float(self.flag)]), dist.ReduceOp.MAX))
