"""
Sample quality: FID, KID, precision/recall, and classifier scores for a samples.npz.

  python evaluate.py runs/ddpm_ddim/samples.npz --dataset mnist-12k
  python evaluate.py --real --dataset mnist-12k                      # the floor: real vs real

Features. Digits (mnist, mnist-12k, fashion): a small CNN that this file trains on the train
split (deterministic on one machine; 3.4 minutes on 2 CPU cores, a line per epoch), cached under
--cache-dir with its test accuracy, and reused; its 128-d penultimate layer is the feature space.
RGB datasets: torchvision's Inception-v3 pool features (2048-d), from its weights file when
present. A FID in the CNN's space ("FID-CNN") compares runs scored by the same classifier, not
papers' Inception FIDs.

Metrics, samples against the test split (--real: test split against the train split):
  fid        Frechet distance |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
  kid        unbiased MMD^2, kernel (x.y / d + 1)^3, mean over subsets of 1000 (Binkowski 2018)
  precision  share of samples inside the real manifold, recall: of reals inside the sample
             manifold; manifolds are unions of k=3 nearest-neighbour balls (Kynkaanniemi 2019)
  digits only: is (classifier Inception Score), confidence (mean max-softmax), label_entropy
             (entropy of the predicted-label histogram, nats; ln 10 = 2.303 is uniform),
             cond_acc (share classified as the requested label, when arr_1 is present)
  --boxes    layouts (arr_2: (N, K, 5) boxes label, x0, y0, x1, y1 in pixels, -1 rows padding):
             every box cropped, resized to 28x28 and classified: box_acc against its label;
             ink_outside (ink outside all boxes / ink inside them). No FID: canvases are not
             digits.
  --restoration sr | inpaint: restorations (arr_2: the low-res inputs, or the masks, 1 = hole;
             arr_3: the originals), scored beside their task's baseline (bicubic upsampling of
             the low-res input; the train split's mean image in the holes): psnr in dB (pixels as
             [0, 1], mean over images; inpainting: over the holes) and the metrics above, the
             baseline's under its name (bicubic_psnr, mean_fill_cond_acc, ...).
One JSON line is printed and appended to <samples dir>/metrics.jsonl.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# -----------------------------------------------------------------------------
# the digit classifier: its penultimate layer is the feature space
class DigitCNN(nn.Module):
    """28x28 grey digits in [-1, 1] -> (128-d features, 10 logits)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 64, 7, 7)
        )
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x):
        f = self.fc(self.conv(x))
        return f, self.head(f)


def train_classifier(x, y, epochs=12, seed=0):
    """Adam with small random shifts as augmentation; deterministic for a given seed on CPU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (len(x) // 128))
    for epoch in range(epochs):
        print(f"  epoch {epoch + 1}/{epochs}", file=sys.stderr, flush=True)
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 127, 128):
            idx = perm[i : i + 128]
            xb = x[idx].float() / 127.5 - 1
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()  # shift by up to 2 pixels
            xb = torch.roll(xb, (dx, dy), (2, 3))
            loss = F.cross_entropy(net(xb)[1], y[idx])  # logits in: no softmax before CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def digit_outputs(net, x_u8: torch.Tensor, batch=500):
    """uint8 (N, 1, H, W) -> (features (N, 128), softmax probabilities (N, 10))."""
    fs, ps = [], []
    for i in range(0, len(x_u8), batch):
        xb = x_u8[i : i + batch].float() / 127.5 - 1
        if xb.shape[-1] > 28:  # box filter when shrinking: exact for integer factors, no extra blur
            xb = F.interpolate(xb, size=(28, 28), mode="area")
        elif xb.shape[-1] < 28:
            xb = F.interpolate(xb, size=(28, 28), mode="bilinear", align_corners=False)
        f, logits = net(xb)
        fs.append(f.double())
        ps.append(logits.double().softmax(1))
    return torch.cat(fs), torch.cat(ps)


# -----------------------------------------------------------------------------
# metrics on feature sets (float64)
def fid(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, d)."""
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T  # S1^1/2
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()  # Tr (..)^1/2
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def kid(f1, f2, subset=1000, n_subsets=50, seed=0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets."""
    g, d, m = torch.Generator().manual_seed(seed), f1.shape[1], min(subset, len(f1), len(f2))
    total = 0.0
    for _ in range(n_subsets):
        a = f1[torch.randperm(len(f1), generator=g)[:m]]
        b = f2[torch.randperm(len(f2), generator=g)[:m]]
        kaa, kbb, kab = ((u @ w.T / d + 1) ** 3 for u, w in ((a, a), (b, b), (a, b)))
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # drop i == j: unbiased
        total += (off(kaa) + off(kbb) - 2 * kab.mean()).item()
    return total / n_subsets


def precision_recall(real, fake, k=3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii."""

    def inside(manifold, queries):  # is each query within some point's k-NN ball?
        # the k-th neighbour's distance (k + 1: each point is its own nearest, at 0), in chunks
        kth = lambda m: torch.cdist(m, manifold).kthvalue(k + 1, dim=1).values
        radii = torch.cat([kth(m) for m in manifold.split(1000)])
        return torch.cat([(torch.cdist(q, manifold) <= radii).any(1) for q in queries.split(1000)])

    return inside(real, fake).double().mean().item(), inside(fake, real).double().mean().item()


def classifier_scores(p: torch.Tensor, labels=None) -> dict:
    """Inception Score with the digit classifier, confidence, label entropy, cond_acc."""
    py = p.mean(0)
    kl = (p * (p.clamp(min=1e-12).log() - py.clamp(min=1e-12).log())).sum(1)
    hist = torch.bincount(p.argmax(1), minlength=p.shape[1]).double() / len(p)
    out = {"is": kl.mean().exp().item(), "confidence": p.max(1).values.mean().item()}
    out["label_entropy"] = -(hist * hist.clamp(min=1e-12).log()).sum().item()
    if labels is not None:
        out["cond_acc"] = (p.argmax(1) == labels.to(p.device)).double().mean().item()
    return out


# -----------------------------------------------------------------------------
# feature networks with their caches
def digit_net(args, x_train, y_train, x_test, y_test):
    key = hashlib.sha1(x_train.numpy().tobytes() + y_train.numpy().tobytes()).hexdigest()[:12]
    key += "" if args.epochs == 12 else f"_e{args.epochs}"  # a shorter recipe is kept apart
    path = Path(args.cache_dir) / f"{args.dataset}_cnn_{key}.pt"
    net = DigitCNN()
    if path.is_file():
        ck = common.load_ckpt(path)
        common.load_state(net, ck["model"], "digit classifier")
        return net.eval(), ck["test_acc"]
    print(
        f"training the {args.dataset} feature classifier on {len(x_train)} images (once; "
        f"about 3.5 minutes on 2 CPU cores), cached in {path}",
        file=sys.stderr,
    )
    net = train_classifier(x_train, y_train, args.epochs)
    acc = (digit_outputs(net, x_test)[1].argmax(1) == y_test).double().mean().item()
    common.save_ckpt(path, {"step": 0, "model": net.state_dict(), "test_acc": acc})
    return net, acc


def inception_features(x_u8: torch.Tensor, batch=100) -> torch.Tensor:
    """Inception-v3 pool3 features (N, 2048) of uint8 RGB images, resized to 299."""
    import torchvision

    try:
        net = torchvision.models.inception_v3(weights="IMAGENET1K_V1", aux_logits=True).eval()
    except Exception as e:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        common.die(
            f"no Inception-v3 weights ({type(e).__name__}); offline, put "
            f"inception_v3_google-0cc3c7bd.pth in {hub}"
        )
    net.fc = nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            xb = x_u8[i : i + batch].float() / 255
            xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
            xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((xb - mean) / std).double())
    return torch.cat(out)


def load_npz(path, boxes=False, restoration=""):
    """(images (N, C, H, W), labels or boxes); with `restoration` also arr_2 and arr_3 as NCHW."""
    try:
        z = np.load(path)
        x = torch.from_numpy(z["arr_0"])
        y = torch.from_numpy(z["arr_1"]).long() if "arr_1" in z.files else None
        if boxes:  # the layouts, in place of the labels
            y = torch.from_numpy(z["arr_2"]).long()
        if restoration:  # the conditions and the originals, NHWC -> NCHW
            extra = [
                torch.from_numpy(z[k]).permute(0, 3, 1, 2).contiguous() for k in ("arr_2", "arr_3")
            ]
    except Exception as e:
        common.die(f"cannot read samples from {path}: {type(e).__name__}: {str(e)[:120]}")
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3) or len(x) < 2:
        got = f"{x.dtype} {tuple(x.shape)}"
        common.die(f"{path}: arr_0 must be uint8 [N, H, W, C] with C 1 or 3 and N >= 2, got {got}")
    if y is not None and len(y) != len(x):
        common.die(f"{path}: arr_1 has {len(y)} labels for {len(x)} images")
    x = x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    if restoration and (extra[1].shape != x.shape or len(extra[0]) != len(x)):
        common.die(f"{path}: arr_2, arr_3 must hold the {len(x)} conditions and originals")
    return (x, y, *extra) if restoration else (x, y)


def box_scores(net, x_u8, boxes) -> dict:
    """Layout samples: box_acc (each box's crop, resized to 28x28, classified as its label) and
    ink_outside (total brightness outside every box over that inside them)."""
    real = (boxes[..., 0] >= 0).nonzero().tolist()
    b = boxes[boxes[..., 0] >= 0]
    H, W = x_u8.shape[-2:]
    if (
        (b[:, 1:3] < 0).any()
        or (b[:, 3] > W).any()
        or (b[:, 4] > H).any()
        or (b[:, 1:3] >= b[:, 3:]).any()
    ):
        common.die(f"arr_2 holds a box that is not inside the {H}x{W} images")
    crops, inside = [], torch.zeros(x_u8.shape, dtype=torch.bool)
    for i, k in real:
        _, x0, y0, x1, y1 = boxes[i, k].tolist()
        crop = x_u8[i : i + 1, :1, y0:y1, x0:x1].float()
        crops.append(F.interpolate(crop, (28, 28), mode="bilinear", antialias=True))
        inside[i, :, y0:y1, x0:x1] = True
    p = digit_outputs(net, torch.cat(crops).round().clamp(0, 255).to(torch.uint8))[1]
    ink = x_u8.double()
    out = {"boxes": len(real), "box_acc": (p.argmax(1) == b[:, 0]).double().mean().item()}
    return out | {"ink_outside": (ink[~inside].sum() / ink[inside].sum().clamp(min=1)).item()}


def psnr(a_u8, b_u8, where=None) -> torch.Tensor:
    """PSNR in dB per image of uint8 images (pixels as [0, 1]), over the pixels `where` is 1."""
    where = torch.ones_like(a_u8, dtype=torch.float64) if where is None else where.expand_as(a_u8)
    sq = ((a_u8.double() - b_u8.double()) / 255).square() * where
    return -10 * torch.log10((sq.flatten(1).sum(1) / where.flatten(1).sum(1)).clamp(min=1e-10))


def restoration_baseline(task: str, cond, orig, train_mean):
    """The uint8 baseline of a restoration: bicubic upsampling of the low-res inputs (sr), or the
    train split's mean image in the holes of the originals (inpaint; cond: masks, 1 = hole)."""
    if task == "sr":
        low = cond.double() / 127.5 - 1  # as the model saw it, in [-1, 1]
        up = F.interpolate(low, size=orig.shape[-2:], mode="bicubic").clamp(-1, 1)
        return ((up + 1) * 127.5).round().to(torch.uint8)
    return torch.where(cond > 0, train_mean.round().to(torch.uint8), orig)


def evaluate(args) -> dict:
    digits = args.dataset in common.DIGITS
    x = y = None
    if not args.real:  # a malformed file fails before any work
        x, y, *extra = load_npz(args.samples, args.boxes, args.restoration)
    cfg = common.Config(dataset=args.dataset, data_dir=args.data_dir, download=args.download)
    cfg.image_size = 28 if digits else args.image_size
    x_tr, y_tr = common.load_images(cfg, train=True)
    x_te, y_te = common.load_images(cfg, train=False)
    args.dataset = cfg.dataset  # mnist-12k if mnist fell back to the shipped digits
    # samples are scored against the test split; --real scores the test split against train
    x, y, ref = (x_te, y_te, x_tr) if args.real else (x, y, x_te)
    x = x[: args.n] if args.n else x
    y = y[: len(x)] if y is not None else None
    res = {"samples": "real test split" if args.real else str(args.samples)}
    if args.boxes:
        net, acc = digit_net(args, x_tr, y_tr, x_te, y_te)
        return res | {"n": len(x), "digit_net_test_acc": acc} | box_scores(net, x, y)
    res |= {"n": len(x), "n_ref": len(ref)}
    if digits:
        net, acc = digit_net(args, x_tr, y_tr, x_te, y_te)
        res |= {"features": f"{args.dataset}-cnn-128 (ours; test acc {acc:.4f})"}
        grey = lambda x: x.amax(1, keepdim=True)  # RGB digits: the ink of any colour (stargan)
        features = lambda x: digit_outputs(net, grey(x))
    else:
        res |= {"features": "inception-v3-pool-2048"}
        features = lambda x: (inception_features(x), None)
    f_ref = features(ref)[0]

    def scores(x, prefix=""):
        (f, p), out = features(x), {}
        out["fid"], out["kid"] = fid(f, f_ref), kid(f, f_ref)
        out["precision"], out["recall"] = precision_recall(f_ref, f)
        out |= {} if p is None else classifier_scores(p, y)
        return {prefix + k: v for k, v in out.items()}

    res |= scores(x)
    if args.restoration:  # PSNR beside the task's baseline, scored alike
        cond, orig = extra[0][: len(x)], extra[1][: len(x)]
        base = restoration_baseline(args.restoration, cond, orig, x_tr.double().mean(0))
        where = (cond > 0).double() if args.restoration == "inpaint" else None
        name = "bicubic" if args.restoration == "sr" else "mean_fill"
        key = "psnr_in_holes" if where is not None else "psnr"
        res[key] = psnr(x, orig, where).mean().item()
        res |= {"baseline": name, f"{name}_{key}": psnr(base, orig, where).mean().item()}
        res |= scores(base, f"{name}_")
    return res


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h with every default, and the description as written."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("samples", nargs="?", help="a samples.npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument(
        "--dataset", default="mnist", help="mnist | mnist-12k | fashion | cifar10 | celeba"
    )
    p.add_argument("--data-dir", default="./data", help="where torchvision finds the dataset")
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--download", action=on_off, default=True, help="download a missing dataset")
    p.add_argument("--image-size", type=int, default=0, help="RGB datasets: reference size")
    p.add_argument("--real", action="store_true", help="score the real test split against train")
    p.add_argument("--n", type=int, default=0, help="use only the first N samples (0: all)")
    p.add_argument("--boxes", action="store_true", help="score layouts (arr_2) box by box")
    p.add_argument("--restoration", choices=("sr", "inpaint"), help="score restorations")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "generative-models"
    p.add_argument("--cache-dir", default=str(cache), help="where the feature classifier is kept")
    p.add_argument("--epochs", type=int, default=12, help="digits: the feature CNN's training")
    args = p.parse_args(argv)
    if args.epochs < 1:
        common.die(f"--epochs {args.epochs}: the feature classifier needs at least one epoch")
    if args.restoration and (args.real or args.boxes):
        common.die("--restoration scores a samples.npz of restorations, not --real or --boxes")
    if not args.real and not args.samples:
        common.die("give a samples.npz, or --real for the real-data floor")
    if args.boxes and (args.real or args.dataset not in ("mnist", "mnist-12k")):
        common.die("--boxes scores samples of MNIST layouts: a samples.npz, --dataset mnist(-12k)")
    if not args.real and not Path(args.samples).is_file():
        common.die(f"no such file: {args.samples}")
    signal.signal(
        signal.SIGINT, lambda *_: common.die("interrupted", 130)
    )  # Ctrl-C: one line, no traceback
    torch.manual_seed(0)
    res = evaluate(args)
    res = {k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res))
    if not args.real:
        with open(Path(args.samples).parent / "metrics.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
