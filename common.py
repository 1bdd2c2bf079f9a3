"""Plumbing shared by the model files: config -> argparse, device/precision/DDP setup, data,
EMA, image grids, atomic checkpoints with exact resume, logging, signals. No model lives here."""

import argparse
import ast
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import tokenize
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
    batch_size: int = 128  # global batch, split over DDP ranks
    lr: float = 2e-4  # peak learning rate
    seed: int = 0  # seeds weights, data order and noise (each DDP rank adds its rank)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0: OMP_NUM_THREADS if set, else one per idle CPU
    compile: bool = False  # torch.compile the training model
    amp: bool = True  # bf16 autocast on CUDA (ignored elsewhere)
    tiny: bool = False  # a small model for CPU runs and tests
    log_every: int = 100  # a log line (stdout and log.jsonl) every N steps and at the first
    sample_every: int = 1000  # a sample grid every N steps and at step 200; 0: never
    ckpt_every: int = 1000  # 0: only at the end
    resume: bool = False  # continue from <out>/ckpt.pt
    sample: int = 0  # N > 0: no training; load <out>/ckpt.pt, write N samples


def field_help(cls) -> dict:
    """{field: the comments on its lines}, read by tokenize: a wrapped line keeps its help."""
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        src = inspect.getsource(klass)
        toks = tokenize.generate_tokens(io.StringIO(src).readline)
        notes = {t.start[0]: t.string[1:].strip() for t in toks if t.type == tokenize.COMMENT}
        notes = {i: s for i, s in notes.items() if not s.startswith("fmt:")}
        for node in ast.parse(src).body[0].body:
            if isinstance(node, ast.AnnAssign):
                text = " ".join(
                    notes[i] for i in range(node.lineno, node.end_lineno + 1) if i in notes
                )
                helps[node.target.id] = text or helps.get(node.target.id, "")  # or the base's
    return helps


def parse(cls, script: str, argv=None):
    """Argparse from a Config dataclass: `-h` shows defaults, bools get --x/--no-x; the config
    remembers the flags given (`cfg.given`)."""
    helps = field_help(cls)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(f"{script}.py", formatter_class=fmt)
    for f in dataclasses.fields(cls):
        kw = dict(default=f.default, help=helps.get(f.name, "").replace("%", "%%"))
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    flag = lambda a: a.split("=")[0]  # --batch_size=64 is --batch-size 64
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = [flag(a).replace("_", "-") + a[len(flag(a)) :] if a[:2] == "--" else a for a in argv]
    cfg = cls(**vars(p.parse_args(argv)))
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
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def interrupted(signum, frame):
    die("interrupted", code=130)  # Ctrl-C outside a training loop: one line, no traceback


def idle_cpus() -> int:
    """CPUs that no other process used over the last 0.2 s (Linux's /proc/stat), at least 1."""
    ticks = lambda: [int(v) for v in open("/proc/stat").readline().split()[1:]]
    try:
        a = ticks()
        time.sleep(0.2)
        b = ticks()
    except OSError:  # not Linux: all of them
        return os.cpu_count() or 1
    idle = (b[3] + b[4] - a[3] - a[4]) / max(1, sum(b) - sum(a))  # idle + iowait share
    return max(1, round(idle * (os.cpu_count() or 1)))


def setup(cfg):
    """Pick the device, join DDP under torchrun, seed per rank, TF32; return (device, autocast)."""
    avail = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if cfg.device == "auto":
        cfg.device = next(d for d in ("cuda", "mps", "cpu") if avail[d])
    if not avail.get(cfg.device):
        die(f"--device {cfg.device} is unknown or not available here (auto, cpu, cuda, mps)")
    device = torch.device(cfg.device)
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads or "OMP_NUM_THREADS" not in os.environ:  # README, "Threads": measured
        torch.set_num_threads(cfg.threads or idle_cpus())
    signal.signal(signal.SIGINT, interrupted)  # common.Loop replaces it while training
    seed = cfg.seed + rank()  # every rank draws its own noise
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and cfg.amp and torch.cuda.is_bf16_supported():
        return device, torch.autocast("cuda", dtype=torch.bfloat16)  # bf16: no GradScaler needed
    return device, contextlib.nullcontext()


def wrap(model, cfg, device, **ddp):
    """DDP (under torchrun; `ddp`: its options), then optional torch.compile; save the unwrapped
    `model`'s state."""
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp)
    return torch.compile(model) if cfg.compile else model


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over DDP ranks (identity in one process); NCCL wants CUDA tensors, gloo CPU."""
    if not dist.is_initialized():
        return t
    t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
    dist.all_reduce(t, op=op)
    return t


# --- data: a split decoded once to uint8, held on the GPU when small, served in [-1, 1]
SETS = {  # --dataset: (torchvision class, where its files go under --data-dir, image size)
    "mnist": ("MNIST", "MNIST/raw", 28),
    "fashion": ("FashionMNIST", "FashionMNIST/raw", 28),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 32),
    "celeba": ("CelebA", "celeba", 64),
}
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
    return files or [(f, i) for i, d in enumerate(classes) for f in images(d)]


def load_folder(path: str, size: int):
    """A flat folder of images (one class, label 0), or one subfolder of images per class."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    files = folder_files(path)
    if not files:
        die(f"no images in {path} (give a folder of images, or one subfolder of images per class)")
    try:
        imgs = [Image.open(f).convert("RGB") for f, _ in files]
    except OSError as e:
        die(f"cannot read an image in {path}: {e}")
    sizes = {min(im.size) for im in imgs}
    size = size or (sizes.pop() if len(sizes) == 1 else 64)  # the images' own size when shared
    x = [TF.pil_to_tensor(TF.center_crop(TF.resize(im, size), size)) for im in imgs]
    return torch.stack(x), torch.tensor([label for _, label in files])


def shipped(train: bool) -> list:
    """mnist-12k: the 10,000 train / 2,500 test MNIST digits in data/, as [(PIL image, label)],
    the items torchvision's MNIST gives, so both take the same transform below."""
    from PIL import Image

    with np.load(SHIPPED) as z:
        x, y = (z["x_train"], z["y_train"]) if train else (z["x_test"], z["y_test"])
    return [(Image.fromarray(a, mode="L"), int(label)) for a, label in zip(x, y)]


def load_images(cfg, train: bool = True, size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 (N, C, H, W), labels); CelebA's labels are its 40 attributes.
    `size` overrides cfg.image_size. mnist with no files and no network falls back to the
    shipped mnist-12k, in one printed line, and sets cfg.dataset to it (the checkpoint says so)."""
    import torchvision
    import torchvision.transforms as T

    size = size or cfg.image_size
    if cfg.dataset.startswith("folder:"):
        return load_folder(cfg.dataset[len("folder:") :], size)
    if cfg.dataset not in (*SETS, "mnist-12k"):
        names = ", ".join((*SETS, "mnist-12k", "folder:PATH"))
        die(f"unknown dataset {cfg.dataset!r} ({names})")
    (cls, where, own), root = SETS.get(cfg.dataset, SETS["mnist"]), Path(cfg.data_dir)
    crop = [T.CenterCrop(178)] if cfg.dataset == "celeba" else []  # the usual aligned-face crop
    size = size or own
    tf = T.Compose(crop + [T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    split = {"train": train}  # CelebA names its splits
    if cls == "CelebA":
        split = {"split": "train" if train else "test"}
    if cfg.dataset == "mnist-12k":
        if not SHIPPED.is_file():
            die(f"mnist-12k: no {SHIPPED} (it comes with the repository: git checkout data)")
        ds = [(tf(im), label) for im, label in shipped(train)]
        return load(ds)
    new_dirs = [d for d in [root / where, *(root / where).parents] if not d.exists()]
    try:  # torchvision prints each mirror it fails to reach: the error below says it once
        with contextlib.redirect_stdout(io.StringIO()):
            ds = getattr(torchvision.datasets, cls)(
                root, **split, transform=tf, download=cfg.download
            )
    except (RuntimeError, OSError) as e:  # missing files, or no network to fetch them
        if new_dirs and new_dirs[-1].is_dir():  # leave no folder (or partial file) behind
            shutil.rmtree(new_dirs[-1])
        cause = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
        if cfg.dataset == "mnist" and cfg.download:
            if rank() == 0:
                print(
                    f"mnist: no files in {cfg.data_dir} and no network ({cause[-1][:60]}): "
                    "using the 12,500 digits shipped in data/ (--dataset mnist-12k)",
                    file=sys.stderr,
                    flush=True,
                )
            cfg.dataset = "mnist-12k"
            return load_images(cfg, train, size)
        why = f"it cannot be downloaded ({cause[-1][:100]})" if cfg.download else "--no-download"
        die(
            f"{cfg.dataset} not found in {root} and {why}: put the files in {root / where} or "
            "pass --data-dir DIR"
        )
    return load(ds)


def load(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a dataset of (uint8 image, label) items into two tensors."""
    workers = min(4, os.cpu_count()) if len(ds) > 20000 else 0
    g = torch.Generator()  # its own seed draw: loading data never moves the global RNG
    xs, ys = zip(*torch.utils.data.DataLoader(ds, 500, num_workers=workers, generator=g))
    return torch.cat(xs), torch.cat(ys)


def load_digits(cfg, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The 28x28 digits under a built-in mnist-* task: --digits (mnist, or the shipped
    mnist-12k); a fallback to the shipped digits is kept in cfg.digits, hence the checkpoint."""
    src = dataclasses.replace(cfg, dataset=cfg.digits)
    x, y = load_images(src, train, size=28)
    cfg.digits = src.dataset
    return x, y


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
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
        for e, m in pairs:
            if not e.is_floating_point():  # integer buffers are copied
                e.copy_(m)


def save_grid(x: torch.Tensor, path, nrow: int = 8, value_range=(-1, 1)):
    """Save (N, C, H, W) images, in [-1, 1] unless `value_range` says otherwise, as a PNG grid."""
    import torchvision

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().float().cpu()
    torchvision.utils.save_image(
        x, path, nrow=nrow, padding=2, normalize=True, value_range=value_range
    )


def save_samples(out, x: torch.Tensor, y=None, nrow=None, value_range=(-1, 1)):
    """The --sample contract: <out>/samples.npz (arr_0 uint8 NHWC, arr_1 labels) + samples.png;
    y may be a list of arrays (arr_1, arr_2, ...)."""
    lo, hi = value_range
    u8 = ((x.float().clamp(lo, hi) - lo) * 255 / (hi - lo)).round().to(torch.uint8)
    u8 = u8.permute(0, 2, 3, 1)  # (N, H, W, C)
    Path(out).mkdir(parents=True, exist_ok=True)
    ys = list(y) if isinstance(y, (list, tuple)) else [y]  # arr_1, arr_2, ...
    labels = [v.cpu().numpy() for v in ys if v is not None]
    np.savez(Path(out) / "samples.npz", u8.cpu().numpy(), *labels)
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
def due(step: int, every: int, last: int, first: int = 0) -> bool:
    """Is a periodic job due after `step`: every `every` steps, at the last step and at `first`."""
    return step in (last, first) or (every > 0 and step % every == 0)


class Loop:
    """Logs `step 1200/100000 | loss 0.0312 | 812 img/s | eta 1h02m` (stdout, <out>/log.jsonl),
    writes checkpoints, and turns SIGINT/SIGTERM into a flag: the loop saves at the next step
    boundary and stops (a second signal exits at once)."""

    def __init__(self, cfg, data: Batches, start_step: int, name="ckpt.pt", images=None):
        self.cfg, self.data, self.name = cfg, data, name  # the checkpoint: <out>/<name>
        self.flag = False  # set by a signal
        self.sums, self.n = {}, 0  # losses since the last log line
        self.t0, self.step0, self.first = time.time(), start_step, True  # the img/s clock
        self.img0 = start_step * cfg.batch_size if images is None else images  # images shown
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.flag:
            sys.exit(130)
        self.flag = True

    def add(self, **losses):  # accumulated as tensors on the device: no host sync per step
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.n += 1

    def check(self, step: int) -> dict:
        """Mean losses since the last log over all ranks; a nan/inf stops the run (exit 1)."""
        if not self.sums:
            return {}
        vals = all_reduce(torch.stack(list(self.sums.values())) / self.n) / world()
        vals = dict(zip(self.sums, vals.tolist()))
        if not all(map(math.isfinite, vals.values())):
            die(
                f"loss is not finite near step {step} ({vals}); stopped, the last good "
                f"checkpoint in {self.cfg.out} is kept: try a lower --lr",
                code=1,
            )
        return vals

    def log(self, step: int, images=None, **extra):
        """`images`: the count shown so far, for a run whose batch size changes (progan.py)."""
        vals, now, cfg = {**self.check(step), **extra}, time.time(), self.cfg
        images = step * cfg.batch_size if images is None else images
        ips = (images - self.img0) / max(now - self.t0, 1e-9)
        per_step = (images - self.img0) / max(step - self.step0, 1)  # the batch, on average
        eta = (cfg.steps - step) * per_step / max(ips, 1e-9)
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
        """Run a side job (a picture) off the img/s clock and on forked random streams (so that a
        resumed run draws what an uninterrupted one does); a failure is one line, never fatal."""
        t0 = time.time()
        try:
            with torch.random.fork_rng():
                fn(*args, **kwargs)
        except Exception as e:
            print(f"warning: {fn.__name__} failed ({type(e).__name__}: {e})", file=sys.stderr)
        self.t0 += time.time() - t0

    def end_step(self, step: int, **state) -> bool:
        """The tail of every loop: checkpoint when due (every --ckpt-every, at the end) or on a
        signal; True when the loop must stop. Collective under DDP: every rank calls it."""
        stop = self.flag and not dist.is_initialized()
        if dist.is_initialized() and step % 10 == 0:  # the ranks agree every 10 steps
            stop = bool(all_reduce(torch.tensor([float(self.flag)]), dist.ReduceOp.MAX))
        if stop or due(step, self.cfg.ckpt_every, self.cfg.steps):
            self.checkpoint(step, **state)
        if stop and rank() == 0:
            print(f"stopped by signal at step {step}; saved {self.cfg.out}/{self.name}", flush=True)
        return stop

    def checkpoint(self, step: int, **state):
        """Write <out>/<name>: `state` (modules and optimizers as state dicts), step, data
        position, every rank's RNG, config. A non-finite loss or weight stops the run first
        (exit 1), so a nan never replaces a good checkpoint. Collective under DDP."""
        cfg = self.cfg
        self.check(step)
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        for k, sd in state.items():
            tensors = [t for t in sd.values() if torch.is_tensor(t)] if isinstance(sd, dict) else []
            if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
                die(
                    f"{k} has non-finite weights at step {step}; stopped, the last good checkpoint "
                    f"in {cfg.out} is kept: try a lower --lr",
                    code=1,
                )
        npst, cuda = np.random.get_state(), torch.cuda.is_available()
        rng = {
            "python": random.getstate(),
            "numpy": [npst[0], npst[1].tolist(), *npst[2:]],
            "torch": bytes(torch.get_rng_state().numpy()),  # plain bytes: gathers across ranks
            "cuda": [bytes(t.numpy()) for t in torch.cuda.get_rng_state_all()] if cuda else [],
        }
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * world()
            dist.all_gather_object(rngs, rng)
        if rank() == 0:
            ck = dict(state, step=step, data=self.data.state_dict(), rng=rngs)
            save_ckpt(Path(cfg.out) / self.name, dict(ck, config=dataclasses.asdict(cfg)))
