"""Plumbing of the model files: flags, device/DDP, data, EMA, grids, checkpoints, the loop."""

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import ChainMap
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def die(msg: str, code: int = 2):
    """Bad input: one line on stderr, no traceback, exit code 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# --- config: a dataclass is the single source of flags; the comment on a field is its -h text
@dataclasses.dataclass
class Config:
    dataset: str = "mnist"  # mnist | mnist-12k | fashion | cifar10 | celeba | folder:PATH
    data_dir: str = "./data"  # where torchvision finds (or downloads) the dataset
    download: bool = True  # download a missing dataset (mnist offline: the shipped mnist-12k)
    image_size: int = 0  # 0: the data's own (28 digits, 32 CIFAR-10, 64 CelebA, a folder's)
    out: str = ""  # output folder; default runs/<script>
    steps: int = 100000  # optimizer steps
    minutes: float = 0.0  # also stop after this much training time (not pictures, checkpoints)
    batch_size: int = 128  # global batch, split over DDP ranks
    lr: float = 2e-4  # peak learning rate
    seed: int = 0  # seeds weights, data order and noise (each DDP rank adds its rank)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0: torch's default (OMP_NUM_THREADS, else one per core)
    compile: bool = False  # torch.compile the training model
    amp: bool = True  # bf16 autocast on CUDA (ignored elsewhere)
    tiny: bool = False  # a small model for CPU runs and tests
    log_every: int = 100  # a log line (stdout and log.jsonl) every N steps and at the first
    sample_every: int = 1000  # a sample grid every N steps and at step 200; 0: never
    ckpt_every: int = 1000  # 0: only at the end
    resume: bool = False  # continue from <out>/ckpt.pt
    sample: int = 0  # N > 0: no training; load <out>/ckpt.pt, write N samples
    at_least = dict(steps=0, batch_size=1, threads=0, log_every=0, sample_every=0, ckpt_every=0)
    at_least |= dict(sample=0, image_size=0, minutes=0)
    choices = dict(device=("auto", "cpu", "cuda", "mps"))


def field_help(cls) -> dict:
    """{field: the comment on its line}, over the class and its bases (a field fits one line)."""
    line = re.compile(r"^\s+(\w+): [\w\[\], |]+ = .*?  # (.*)$")
    src = [ln for c in cls.__mro__[-2::-1] for ln in inspect.getsource(c).splitlines()]
    return {m[1]: m[2] for m in map(line.match, src) if m}


def parse(cls, script: str, argv=None):
    """Argparse from a Config: --x/--no-x bools; at_least and choices (with the bases') checked."""
    helps = field_help(cls)
    fmt = argparse.ArgumentDefaultsHelpFormatter  # -h shows every default
    p = argparse.ArgumentParser(f"{script}.py", formatter_class=fmt)
    for f in dataclasses.fields(cls):
        default = argparse.SUPPRESS if f.default == "" else f.default  # no "(default: )" in -h
        kw = dict(default=default, help=helps.get(f.name, "").replace("%", "%%"))
        typed = dict(type={"int": int, "float": float, "str": str}.get(f.type, f.type))
        kw |= dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else typed
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    flag = lambda a: a.split("=")[0]  # --batch_size=64 is --batch-size 64
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = [flag(a).replace("_", "-") + a[len(flag(a)) :] if a[:2] == "--" else a for a in argv]
    cfg = cls(**vars(p.parse_args(argv)))
    for k, ok in ChainMap(*(vars(c).get("choices", {}) for c in cls.__mro__)).items():
        if getattr(cfg, k) not in ok:
            die(f"--{k.replace('_', '-')} {getattr(cfg, k)!r}: choose one of {', '.join(ok)}")
    for k, lo in ChainMap(*(vars(c).get("at_least", {}) for c in cls.__mro__)).items():
        if getattr(cfg, k) < lo:
            die(f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be at least {lo}")
    cfg.out = cfg.out or f"runs/{script}"
    cfg.given = {flag(a)[2:].removeprefix("no-").replace("-", "_") for a in argv if a[:2] == "--"}
    return cfg


def from_run(cfg, ck: dict):
    """--sample, --nll, --eval: the run's data flags, from its checkpoint, unless given here."""
    for k in ("dataset", "digits", "data_dir", "download"):
        if k not in getattr(cfg, "given", ()) and k in ck.get("config", {}):
            setattr(cfg, k, ck["config"][k])
    return cfg


# --- device, precision, data parallel (torchrun: NCCL on GPUs, gloo on CPU)
rank = lambda: dist.get_rank() if dist.is_initialized() else 0  # this process's DDP rank
world = lambda: dist.get_world_size() if dist.is_initialized() else 1  # processes in the run


def setup(cfg):
    """Pick the device, join DDP under torchrun, seed per rank, TF32; return (device, autocast)."""
    avail = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    cfg.device = next(d for d in avail if avail[d]) if cfg.device == "auto" else cfg.device
    if not avail.get(cfg.device):
        die(f"--device {cfg.device} is unknown or not available here (auto, cpu, cuda, mps)")
    device = torch.device(cfg.device)
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:  # on cores shared with other work, fewer threads run faster (docs/bench.md)
        torch.set_num_threads(cfg.threads)
    signal.signal(signal.SIGINT, lambda *_: die("interrupted", 130))  # Loop's while training
    seed = cfg.seed + rank()  # every rank draws its own noise
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and cfg.amp and torch.cuda.is_bf16_supported():
        return device, torch.autocast("cuda", dtype=torch.bfloat16)  # bf16: no GradScaler needed
    return device, contextlib.nullcontext()


def wrap(model, cfg, device, **ddp):
    """DDP (under torchrun; `ddp`: its options), then --compile; save the unwrapped model."""
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp)
    return torch.compile(model) if cfg.compile else model


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over DDP ranks (identity in one process); NCCL wants CUDA tensors, gloo CPU."""
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
        dist.all_reduce(t, op=op)
    return t


# --- data: --dataset's (torchvision class, folder under --data-dir, image size); uint8 splits
SETS = dict(mnist=("MNIST", "MNIST/raw", 28), fashion=("FashionMNIST", "FashionMNIST/raw", 28))
SETS |= dict(cifar10=("CIFAR10", "cifar-10-batches-py", 32), celeba=("CelebA", "celeba", 64))
DIGITS = ("mnist", "mnist-12k", "fashion")  # 28x28 grey; never flipped (not mirror-symmetric)
SHIPPED = Path(__file__).resolve().parent / "data" / "mnist-12k.npz"  # data/README.md: origin
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def folder_files(path: str) -> list:
    """[(image path, label)] of a flat folder (label 0) or of one subfolder per class."""
    images = lambda d: sorted(p for p in Path(d).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not Path(path).is_dir():
        die(f"--dataset folder:{path}: no such folder")
    classes = [d for d in sorted(Path(path).iterdir()) if d.is_dir() and images(d)]
    files = [(f, 0) for f in images(path)]  # a flat folder wins over subfolders
    files = files or [(f, i) for i, d in enumerate(classes) for f in images(d)]
    if not files:
        die(f"no images in {path} (give a folder of images, or one subfolder per class)")
    return files


def fetch(cfg, name: str, train: bool, tf):
    """torchvision's split, downloaded when missing; None where mnist falls back to mnist-12k."""
    from torchvision import datasets  # here: importing torchvision takes seconds

    (cls, where, _), root = SETS[name], Path(cfg.data_dir)
    split = {"split": "train" if train else "test"} if cls == "CelebA" else {"train": train}
    new = [d for d in [root / where, *(root / where).parents] if not d.exists()]
    try:  # torchvision prints each mirror it fails to reach: the error below says it once
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(datasets, cls)(root, **split, transform=tf, download=cfg.download)
    except (RuntimeError, OSError) as e:  # missing files, or no network to fetch them
        if new and new[-1].is_dir():  # leave no folder (or partial file) behind
            shutil.rmtree(new[-1])
        cause = ([s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__])[-1]
    if name == "mnist" and cfg.download:
        msg = f"mnist: no files in {cfg.data_dir} and no network ({cause[:60]}): using the "
        return print(msg + "12,500 digits shipped in data/ (--dataset mnist-12k)", file=sys.stderr)
    why = f"it cannot be downloaded ({cause[:100]})" if cfg.download else "--no-download"
    die(f"{name} not found in {root} and {why}: put the files in {root / where} or --data-dir DIR")


def load_images(cfg, train=True, size=0, digits=False) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as uint8 (N, C, H, W), labels (CelebA: its 40 attributes); digits: a built-in task's
    28x28 digits (--digits). mnist offline falls back to mnist-12k, kept in cfg (and checkpoint)."""
    import torchvision.transforms as T
    from PIL import Image

    name, pil, size = (cfg.digits, None, 28) if digits else (cfg.dataset, None, size)
    if name.startswith("folder:"):  # RGB; the images' own size when they share one
        try:
            pil = [(Image.open(f).convert("RGB"), label) for f, label in folder_files(name[7:])]
        except OSError as e:
            die(f"cannot read an image in {name[7:]}: {e}")
        sizes = {min(im.size) for im, _ in pil}
        own = sizes.pop() if len(sizes) == 1 else 64
    elif name == "mnist-12k":  # as torchvision's MNIST gives them: PIL images, int labels
        with np.load(SHIPPED) as z:
            xy = zip(z["x_train" if train else "x_test"], z["y_train" if train else "y_test"])
            pil, own = [(Image.fromarray(a, mode="L"), int(label)) for a, label in xy], 28
    elif name in SETS:
        own = SETS[name][2]
    else:
        die(f"unknown dataset {name!r} ({', '.join([*SETS, 'mnist-12k', 'folder:PATH'])})")
    crop = [T.CenterCrop(178)] if name == "celeba" else []  # the usual aligned-face crop
    size = size or cfg.image_size or own
    tf = T.Compose(crop + [T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    if pil is not None:
        ds = [(tf(im), label) for im, label in pil]
    elif (ds := fetch(cfg, name, train, tf)) is None:
        setattr(cfg, "digits" if digits else "dataset", "mnist-12k")
        return load_images(cfg, train, size, digits)
    workers = min(4, os.cpu_count()) if len(ds) > 20000 else 0
    g = torch.Generator()  # its own seed draw: loading data never moves the global RNG
    xs, ys = zip(*torch.utils.data.DataLoader(ds, 500, num_workers=workers, generator=g))
    return torch.cat(xs), torch.cat(ys)


class Batches:
    """Infinite, resumable, DDP-sharded batches (x in [-1, 1], y), optionally randomly flipped."""

    def __init__(self, x_u8, y, batch_size, seed, device, flip=False):
        if batch_size % world() or batch_size > len(x_u8):
            die(f"--batch-size {batch_size} must divide by {world()} ranks and be <= {len(x_u8)}")
        if device.type != "cpu" and x_u8.numel() < 2**31:  # small datasets live on the GPU
            x_u8, y = x_u8.to(device), y.to(device)
        self.x, self.y, self.device = x_u8, y, device
        self.B, self.seed, self.flip = batch_size, seed, flip
        self.load_state_dict({"epoch": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):  # the permutation depends on (seed, epoch): the same on all ranks
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
    def update(self, model, step: int, decay=None):  # decay: this step's, instead (no warm-up)
        d = min(self.decay, (1 + step) / (10 + step)) if decay is None else decay
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
        for e, m in pairs:
            if not e.is_floating_point():  # integer buffers are copied
                e.copy_(m)


def save_grid(x: torch.Tensor, path, nrow: int = 8, value_range=(-1, 1)):
    """Save (N, C, H, W) images, in [-1, 1] unless `value_range` says otherwise, as a PNG grid."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=value_range)


def save_samples(out, x: torch.Tensor, y=None, nrow=None, value_range=(-1, 1)):
    """--sample's files: <out>/samples.npz (arr_0 uint8 NHWC, arr_1, ... from y) + samples.png."""
    lo, hi = value_range
    u8 = ((x.float().clamp(lo, hi) - lo) * 255 / (hi - lo)).round().to(torch.uint8)
    Path(out).mkdir(parents=True, exist_ok=True)
    labels = [v.cpu().numpy() for v in (y if isinstance(y, list | tuple) else [y]) if v is not None]
    np.savez(Path(out) / "samples.npz", u8.permute(0, 2, 3, 1).cpu().numpy(), *labels)  # NHWC
    nrow = nrow or int(math.sqrt(min(len(x), 256)))
    save_grid(x[:256], Path(out) / "samples.png", nrow, value_range)


# --- checkpoints: one dict, written atomically, holding everything an exact resume needs
def save_ckpt(path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # the previous checkpoint stays intact until this instant


def load_ckpt(path, need=()) -> dict:
    """The checkpoint dict at `path`, with the keys in `need`; anything else is a one-line error."""
    if not Path(path).is_file():
        die(f"no checkpoint at {path} (train first, or point --out at a run)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and "step" in ck, "not a checkpoint dict"
    except Exception as e:
        die(f"checkpoint {path} is corrupted or not ours ({type(e).__name__}: {str(e)[:120]})")
    if not set(need) <= ck.keys():
        die(f"{path} is not a {Path(sys.argv[0]).name} checkpoint (no {set(need) - ck.keys()})")
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


def resume(cfg, data: Batches, need=(), name="ckpt.pt") -> dict:
    """Load <out>/<name>, restore the data position and this rank's RNG streams; return it."""
    ck = load_ckpt(Path(cfg.out) / name, {"data", "rng", *need})
    data.load_state_dict(ck["data"])
    cfg.seconds = ck.get("seconds", 0.0)  # the training time spent, for --minutes
    if len(ck["rng"]) == world():  # another world size cannot replay the same streams
        s = ck["rng"][rank()]
        as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
        random.setstate(s["python"])
        np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], np.uint32), *s["numpy"][2:]))
        torch.set_rng_state(as_tensor(s["torch"]))
        if s["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([as_tensor(b) for b in s["cuda"]])
    return ck


# --- the training loop's plumbing: log lines, the nan guard, checkpoints, signals
# is a periodic job due after `step`: every `every` steps (0: never), at the last and at `first`
due = lambda step, every, last, first=0: step in (last, first) or (every > 0 and step % every == 0)


class Loop:
    """Log lines, checkpoints, and SIGINT/SIGTERM as a flag: save at the next step, then stop."""

    def __init__(self, cfg, data: Batches, start_step: int, name="ckpt.pt", images=None):
        self.cfg, self.data, self.name = cfg, data, name  # the checkpoint: <out>/<name>
        self.flag, self.sums, self.n = False, {}, 0  # set by a signal; losses since the last log
        self.t0, self.step0, self.first = time.time(), start_step, True  # the img/s clock
        self.clock = time.time() - getattr(cfg, "seconds", 0.0)  # training time: --minutes
        self.img0 = start_step * cfg.batch_size if images is None else images  # images shown
        self.kept = f"the last good checkpoint in {cfg.out} is kept; try a lower --lr"  # exit 1
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.flag:
            sys.exit(130)
        self.flag = True

    def add(self, **losses):  # accumulated as tensors on the device: no host sync per step
        self.sums |= {k: self.sums.get(k, 0) + v.detach().float() for k, v in losses.items()}
        self.n += 1

    def check(self, step: int) -> dict:
        """Mean losses since the last log over all ranks; a nan/inf stops the run (exit 1)."""
        if not self.sums:
            return {}
        vals = all_reduce(torch.stack(list(self.sums.values())) / self.n) / world()
        vals = dict(zip(self.sums, vals.tolist()))
        if not all(map(math.isfinite, vals.values())):
            die(f"loss is not finite near step {step} ({vals}); stopped: {self.kept}", 1)
        return vals

    def log(self, step: int, images=None, **extra):
        """`images`: the count shown so far, for a run whose batch size changes (progan.py)."""
        vals, now, cfg = {**self.check(step), **extra}, time.time(), self.cfg
        images = step * cfg.batch_size if images is None else images
        ips = (images - self.img0) / max(now - self.t0, 1e-9)
        eta = (cfg.steps - step) * (now - self.t0) / max(step - self.step0, 1)  # at this pace
        eta_s = f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
        if rank() == 0:
            msg = " | ".join(f"{k} {v:.4g}" for k, v in vals.items())
            print(f"step {step}/{cfg.steps} | {msg} | {ips:.0f} img/s | eta {eta_s}", flush=True)
            if self.first and cfg.device == "cpu" and not cfg.tiny and eta > 3600:
                print(f"full-size model on CPU: {eta_s} at this rate; --tiny trains in minutes")
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            with open(Path(cfg.out) / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **vals, "img_s": round(ips, 1), "t": now}) + "\n")
        self.sums, self.n = {}, 0
        self.t0, self.step0, self.first, self.img0 = now, step, False, images

    def aside(self, fn, *args, **kwargs):
        """A picture: off the img/s clock, on forked RNG (resumes stay exact), never fatal."""
        t0 = time.time()
        try:
            with torch.random.fork_rng():
                fn(*args, **kwargs)
        except Exception as e:
            print(f"warning: {fn.__name__} failed ({type(e).__name__}: {e})", file=sys.stderr)
        self.skip(t0)

    def skip(self, t0: float):  # the time since t0 counts on neither clock
        self.t0, self.clock = self.t0 + time.time() - t0, self.clock + time.time() - t0

    def end_step(self, step: int, **state) -> bool:
        """Checkpoint when due, on a signal or --minutes spent; True: stop. Collective under DDP."""
        over = self.cfg.minutes > 0 and time.time() - self.clock >= 60 * self.cfg.minutes
        stop = (self.flag or over) and not dist.is_initialized()
        if dist.is_initialized() and step % 10 == 0:  # the ranks agree every 10 steps
            stop = bool(all_reduce(torch.tensor([float(self.flag or over)]), dist.ReduceOp.MAX))
        if stop or due(step, self.cfg.ckpt_every, self.cfg.steps):
            t0 = time.time()
            self.checkpoint(step, **state)
            self.skip(t0)
        if stop and rank() == 0:
            why = f"--minutes {self.cfg.minutes:g}" if over else "signal"
            print(f"stopped by {why} at step {step}; saved {self.cfg.out}/{self.name}", flush=True)
        return stop

    def checkpoint(self, step: int, **state):
        """<out>/<name>: `state`, step, data position, RNGs, config; never a non-finite one."""
        self.check(step)
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        for k, sd in state.items():
            tensors = [t for t in sd.values() if torch.is_tensor(t)] if isinstance(sd, dict) else []
            if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
                die(f"{k} has non-finite weights at step {step}; stopped: {self.kept}", 1)
        npst, cuda = np.random.get_state(), torch.cuda.is_available()  # RNGs as plain types:
        rng = dict(python=random.getstate(), numpy=[npst[0], npst[1].tolist(), *npst[2:]])
        rng |= dict(torch=bytes(torch.get_rng_state().numpy()))  # weights_only loads them, and
        rng |= dict(cuda=[bytes(t.numpy()) for t in torch.cuda.get_rng_state_all()] if cuda else [])
        rngs = [rng]  # the ranks gather them
        if dist.is_initialized():
            rngs = [None] * world()
            dist.all_gather_object(rngs, rng)
        if rank() == 0:
            ck = dict(state, step=step, data=self.data.state_dict(), rng=rngs)
            ck["seconds"] = time.time() - self.clock  # training time, resumed by --resume
            save_ckpt(Path(self.cfg.out) / self.name, dict(ck, config=dataclasses.asdict(self.cfg)))
