"""
One table: every family on the same 12,500 shipped digits for the same minutes of training, scored
by the same evaluator, re-measured by one command.

  python compare.py                          # every row at 2.5, 5 and 10 minutes (hours; resumable)
  python compare.py --families dcgan,vae     # some rows; -h lists them
  python compare.py --report                 # docs/compare.md, compare.png and README's table
  python compare.py --run 2 --families dcgan,vae   # the same rows again: the run-to-run spread

Each family trains its CPU recipe with `--minutes` (the loop's own clock: pictures and checkpoints
do not count) and is sampled at 2.5 and 5 minutes (1,000 samples) and at 10 (2,500) by resuming,
then scored by evaluate.py against the test digits. A stage-based family (vqvae, cfg_ldm) gives
its first stages a fixed share of the final budget, trained once, and the last stage the rest;
its points come when the last stage has started. One JSON line per (family, minutes) goes to
docs/compare.jsonl with the commit, machine, steps, images, parameters, training and sampling
images/s and the scores; a line already there with the same hash of the family's files and
settings is not measured again, so an interrupted measurement resumes where it stopped. Run it
alone on the machine: a time budget means nothing on shared cores (each line keeps its img/s).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PY = sys.executable
DATA = "--dataset mnist-12k"
DIGITS = "--digits mnist-12k"
MACHINE = platform.processor() or platform.machine()


@dataclasses.dataclass
class Family:
    """A row: its training stages (script, flags, share of the final budget; the last stage takes
    the rest), its --sample flags, evaluate.py's flags, and an optional command for test bits/dim
    (`bits`: flags of the last stage's script, run on the final checkpoint)."""

    kind: str  # generator | translator
    stages: list  # [(script, flags, share)]: share of the final budget; None: the rest
    sample: str = ""  # flags beside --sample N
    score: str = ""  # evaluate.py flags beside the samples and --dataset mnist-12k
    bits: str = ""  # e.g. "--nll 500": its JSON line's bpd / nll_bpd is recorded
    note: str = ""  # what the row is, for compare.md
    trained: bool = True  # False: fitted in closed form, measured at the final point only
    headline: str = "fid"  # the figures README's table shows for this row


AE = ("cfg_ldm.py", f"--stage ae --ae-ch 32 --batch-size 64 --lr 1e-3 {DATA}", 0.2)
LDM = f"--stage ldm --tiny --batch-size 64 --lr 1e-3 {DATA}"
LAYOUT = f"--dataset mnist-layout {DIGITS} --lr 1e-3"
GROW = "--tiny --phase-kimg 20"  # 4 -> 32 px is 140k images: 10 CPU minutes end in the 32 px fade
FAMILIES = {
    "dcgan": Family("generator", [("gan.py", DATA, None)], note="gan.py, DCGAN"),
    "cgan": Family(
        "generator",
        [("cgan_pix2pix.py", DATA, None)],
        note="cGAN, projection D",
        headline="fid,cond_acc",
    ),
    "progan": Family("generator", [("progan.py", f"{GROW} {DATA}", None)], note="ProGAN"),
    "stylegan": Family(
        "generator",
        [("progan.py", f"{GROW} --arch style2 --loss logistic {DATA}", None)],
        note="StyleGAN2's G, logistic loss + lazy R1",
    ),
    "vae": Family(
        "generator",
        [("vae.py", DATA, None)],
        bits="--nll 10 --nll-n 500",
        note="VAE",
        headline="fid,bpd",
    ),
    "ppca": Family(
        "generator",
        [("vae.py", f"--ppca --z-dim 32 {DATA}", None)],
        bits="--nll 1",
        note="PPCA, k = 32, closed form",
        trained=False,
        headline="fid,bpd",
    ),
    "vqvae": Family(
        "generator",
        [
            ("vqvae.py", f"--ch 64 --res-ch 32 --ema --batch-size 64 --lr 1e-3 {DATA}", 0.3),
            ("vqvae.py", f"--stage prior {DATA}", None),
        ],
        note="VQ-VAE + transformer prior",
    ),
    "glow": Family(
        "generator",
        [("flow.py", f"--depth 8 --width 128 {DATA}", None)],
        bits="--nll 500",
        note="Glow, L=2, K=8, width 128",
        headline="fid,bpd",
    ),
    "realnvp": Family(
        "generator",
        [("flow.py", f"--arch realnvp {DATA}", None)],
        bits="--nll 500",
        note="RealNVP",
        headline="fid,bpd",
    ),
    "ddpm": Family(
        "generator",
        [("ddpm_ddim.py", f"--tiny --batch-size 64 --lr 1e-3 {DATA}", None)],
        sample="--sampler ddim --sample-steps 50",
        note="DDPM --tiny, DDIM-50 samples",
    ),
    "ldm_cfg": Family(
        "generator",
        [AE, ("cfg_ldm.py", f"{LDM} --cond class", None)],
        sample="--guidance 2",
        note="latent diffusion, class tokens, CFG s = 2",
        headline="fid,cond_acc",
    ),
    "ldm_classifier": Family(
        "generator",
        [
            AE,
            ("cfg_ldm.py", f"{LDM} --cond class", 0.7),
            ("cfg_ldm.py", "--stage classifier", None),
        ],
        sample="--guide classifier --guidance 3",
        note="the same LDM, classifier guidance s = 3 (classifier inside the budget)",
        headline="fid,cond_acc",
    ),
    "pix2pix": Family(
        "translator",
        [("cgan_pix2pix.py", f"--task pix2pix --ngf 32 --ndf 32 {DIGITS}", None)],
        note="pix2pix on mnist-edges",
        headline="l1,cond_acc",
    ),
    "cyclegan": Family(
        "translator",
        [("cyclegan.py", f"--tiny {DIGITS}", None)],
        note="CycleGAN, thin -> thick",
        headline="mass_moved,cond_acc",
    ),
    "unit": Family(
        "translator",
        [("cyclegan.py", f"--arch unit --tiny {DIGITS}", None)],
        note="UNIT",
        headline="mass_moved,cond_acc",
    ),
    "stargan": Family(
        "translator",
        [("stargan.py", f"--tiny --lambda-id 0.5 {DIGITS}", None)],
        note="StarGAN + identity loss, mnist-styles",
        headline="colour_acc,thick_acc,cond_acc",
    ),
    "ldm_sr": Family(
        "translator",
        [AE, ("cfg_ldm.py", f"{LDM} --cond sr", None)],
        score="--restoration sr",
        note="latent super-resolution 7x7 -> 28x28, vs bicubic",
        headline="psnr,bicubic_psnr",
    ),
    "ldm_inpaint": Family(
        "translator",
        [AE, ("cfg_ldm.py", f"{LDM} --cond inpaint", None)],
        sample="--restore-guidance 3",
        score="--restoration inpaint",
        note="latent inpainting s = 3, vs mean fill",
        headline="psnr_in_holes,mean_fill_psnr_in_holes",
    ),
    "ldm_layout": Family(
        "translator",
        [
            ("cfg_ldm.py", f"--stage ae --tiny --f 4 --batch-size 32 {LAYOUT}", 0.2),
            ("cfg_ldm.py", f"--stage ldm --cond layout --tiny --batch-size 64 {LAYOUT}", None),
        ],
        score="--boxes",
        note="layout-to-image, box accuracy",
        headline="box_acc",
    ),
}
POINTS = ((2.5, 1000), (5.0, 1000), (10.0, 2500))  # (minutes, samples) of the default budget
FIELDS = ("family", "minutes", "hash", "commit", "device", "threads", "steps", "images")
FIELDS += ("params_M", "train_img_s", "sample_img_s", "n")  # and the scores: fid, kid, ...


def die(msg: str):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def digest(name: str, fam: Family, budget: float) -> str:
    """A hash of the files a row depends on and of its settings."""
    h = hashlib.sha1(json.dumps([name, dataclasses.asdict(fam), budget, POINTS]).encode())
    for f in sorted({s for s, _, _ in fam.stages} | {"common.py", "evaluate.py"}):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:12]


def read_lines(path: Path) -> list:
    """The measured rows; a line that is not one of ours is a one-line error (the file as is)."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line)
            assert isinstance(row, dict) and all(k in row for k in FIELDS), "missing fields"
        except (ValueError, AssertionError) as e:
            die(f"{path}:{i} is not a compare.py line ({e}); fix or remove it, nothing was changed")
        rows.append(row)
    return rows


def call(args: list, timeout=3600) -> tuple:
    """Run a repository script; (stdout, seconds); a failure is one line and exit 2."""
    t0 = time.time()
    p = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        die(f"{' '.join(map(str, args))} exited {p.returncode}: {tail}")
    return p.stdout, time.time() - t0


def last_json(text: str) -> dict:
    lines = [s for s in text.splitlines() if s.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def checkpoint_facts(out: Path) -> dict:
    """steps, images, parameters (the trained networks', EMA copies not counted), seconds."""
    import torch

    name = "ckpt.pt" if (out / "ckpt.pt").exists() else "prior.pt"
    ck = torch.load(out / name, map_location="cpu", weights_only=True)
    nets = [k for k in ck if k in ("G", "D", "model", "prior", "G_AB", "G_BA", "D_A", "D_B", "U")]
    count = lambda sd: sum(
        v.numel() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()
    )
    images = ck.get("nimg", ck["step"] * ck["config"]["batch_size"])
    seconds = ck.get("seconds", 0.0)
    params = round(sum(count(ck[k]) for k in nets) / 1e6, 3)
    return dict(steps=ck["step"], images=images, params_M=params, seconds=round(seconds, 1))


def measure(name, fam: Family, budget: float, out: Path, done: set, args, write) -> list:
    """Train, sample and score one family at each point of the budget; write(row) keeps each new
    JSON row as soon as it is measured. A run folder already past the next point (interrupted
    after training, before its line was kept) or of other settings starts again from nothing."""
    scale = budget / POINTS[-1][0]
    first = sum(share * budget for _, _, share in fam.stages[:-1])  # minutes of the early stages
    rows, h = [], digest(name, fam, budget)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    commit = git.stdout.decode().strip() or "unknown"
    files = sorted({s for s, _, _ in fam.stages} | {"common.py", "evaluate.py"})
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *files], cwd=ROOT).returncode:
        commit += "+changes"  # the files it depends on differ from that commit's
    quiet = ["--steps", 10**7, "--sample-every", 0, "--log-every", 1000]
    reached = out / "last.minutes"  # the hash it runs under and the last stage's budget so far
    pending = [round(m * scale, 4) for m, _ in (POINTS if fam.trained else POINTS[-1:])]
    pending = [m for m in pending if (name, m, h) not in done and m > first]
    state = reached.read_text().split() if reached.exists() else [h, "0"]
    if out.exists() and pending and (state[0] != h or float(state[1]) > pending[0]):
        shutil.rmtree(out)  # other code or settings, or past the point: measure it from nothing
    out.mkdir(parents=True, exist_ok=True)
    reached.write_text(f"{h} {state[1] if state[0] == h else 0}")
    for script, flags, share in fam.stages[:-1]:  # once, to their share of the final budget
        if not (out / "first.done").exists():
            call([script, *flags.split(), "--out", out, *quiet, "--minutes", share * budget])
    (out / "first.done").touch()
    script, flags, _ = fam.stages[-1]
    for minutes, n in POINTS if fam.trained else POINTS[-1:]:
        minutes, n = round(minutes * scale, 4), args.samples or n
        if (name, minutes, h) in done or minutes <= first:
            continue
        last = [*quiet, "--minutes", round(minutes - first, 4)] if fam.trained else []
        resume = ["--resume"] if (out / "last.started").exists() and fam.trained else []
        call([script, *flags.split(), "--out", out, *last, *resume])
        (out / "last.started").touch()  # the next point resumes the last stage
        reached.write_text(f"{h} {minutes}")
        sampling = [script, "--out", out, "--sample", n, "--batch-size", 500, *fam.sample.split()]
        sample_out, secs = call(sampling)
        evaluate = ["evaluate.py", out / "samples.npz", *DATA.split(), *fam.score.split()]
        scored = last_json(call([*evaluate, *args.score_flags.split()])[0])
        row = dict(family=name, minutes=minutes, hash=h, run=args.run, commit=commit)
        row |= dict(device="cpu", machine=MACHINE, threads=os.cpu_count())
        row |= checkpoint_facts(out)
        row |= dict(train_img_s=round(row["images"] / max(row["seconds"], 1e-9), 1))
        row |= dict(sample_img_s=round(n / secs, 1), n=n)  # the whole --sample call, start-up too
        row |= {k: v for k, v in last_json(sample_out).items() if isinstance(v, (int, float))}
        row |= {k: v for k, v in scored.items() if isinstance(v, (int, float)) and k != "n"}
        if fam.bits and minutes == round(POINTS[-1][0] * scale, 4):
            bits = last_json(call([script, "--out", out, *fam.bits.split()])[0])
            row["bpd"] = bits.get("bpd", bits.get("nll_bpd"))
        rows.append(row)
        write(row)
        print(json.dumps(row), flush=True)
    return rows


# -----------------------------------------------------------------------------
# the report: compare.md, compare.png and README's table, from the lines alone
GEN_COLS = ("fid", "kid", "precision", "recall", "label_entropy", "cond_acc", "bpd")
TR_COLS = ("cond_acc", "l1", "psnr", "mass_moved", "colour_acc", "thick_acc", "box_acc", "fid")


def fmt(v) -> str:
    if v is None or isinstance(v, str):
        return v or ""
    return f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"


def baseline(r: dict) -> str:
    """A translator's no-learning baseline, scored as its outputs: bicubic upsampling (SR), the
    mean fill (inpainting), the source returned unchanged (CycleGAN, UNIT)."""
    for pre, name in (("bicubic_", "bicubic"), ("mean_fill_", "mean fill")):
        if pre + "cond_acc" in r:
            psnr = r.get(pre + "psnr", r.get(pre + "psnr_in_holes"))
            acc, fid = fmt(r[pre + "cond_acc"]), fmt(r.get(pre + "fid"))
            return f"{name}: psnr {fmt(psnr)}, digit acc {acc}, FID-CNN {fid}"
    return (
        f"source as output: L1 {fmt(r['l1_source_as_output'])}"
        if "l1_source_as_output" in r
        else ""
    )


def latest(rows: list) -> dict:
    """The latest line of each (family, minutes) of the first run (repeats only give spreads)."""
    return {(r["family"], r["minutes"]): r for r in rows if r.get("run", 1) == 1}


def spread(rows: list) -> list:
    """compare.md's lines on the run-to-run spread: every repeat of a line (same family, minutes
    and hash) under the first run's, and the largest relative FID-CNN difference from it."""
    first = {(r["family"], r["minutes"], r["hash"]): r for r in rows if r.get("run", 1) == 1}
    groups = {}  # (family, minutes, hash) -> [run 1's line, its repeats in the file's order]
    for r in rows:
        if r.get("run", 1) > 1 and (k := (r["family"], r["minutes"], r["hash"])) in first:
            groups.setdefault(k, [first[k]]).append(r)
    pairs = [(g[0], r) for g in groups.values() for r in g[1:]]
    if not pairs:
        return []
    cols = ("fid", "precision", "recall", "train_img_s", "commit")
    lines = ["## Run-to-run spread", ""]
    lines += [
        "The same rows measured again by `python compare.py --run N --families ...` (same "
        "code, seeds and machine kind; the budget is wall time, so the steps differ; a later "
        "commit is a later day, and the machine's speed differs between days):",
        "",
    ]
    lines += ["| family | minutes | run | " + " | ".join(NAMES.get(c, c) for c in cols) + " |"]
    lines += ["|---|---|---|" + "---|" * len(cols)]
    for r in (r for g in groups.values() for r in g):
        lines.append(
            f"| {r['family']} | {fmt(r['minutes'])} | {r.get('run', 1)} | "
            + " | ".join(fmt(r.get(c)) for c in cols)
            + " |"
        )
    gap = lambda u, v: abs(u - v) / min(u, v)
    fids = [(a["minutes"], a["fid"], b["fid"]) for a, b in pairs if a.get("fid") and b.get("fid")]
    if fids:  # a translator's row may have no FID-CNN
        end = max(m for m, _, _ in fids)  # the headline's budget
        rel = max(gap(u, v) for _, u, v in fids)
        last = max(gap(u, v) for m, u, v in fids if m == end)
        ims = [(a["train_img_s"], b["train_img_s"]) for a, b in pairs]
        speed = max((gap(u, v) for u, v in ims if u and v), default=0.0)
        lines += [
            "",
            f"Between a run and its repeat, FID-CNN differs by up to {rel:.0%} ({last:.0%} at "
            f"{end:g} minutes) and training images/s by up to {speed:.0%}: a difference smaller "
            "than that between two rows of the table is not a result.",
        ]
    return lines + [""]


NAMES = dict(fid="FID-CNN", bpd="bits/dim", cond_acc="digit acc", l1="L1", mass_moved="ink moved")
NAMES |= dict(bicubic_psnr="bicubic's psnr", psnr_in_holes="psnr in the holes", box_acc="box acc")
NAMES |= dict(
    mean_fill_psnr_in_holes="mean fill's", colour_acc="colour acc", thick_acc="thickness acc"
)


def readme_table(rows: list, text: str) -> str:
    """README.md with the headline cell (the fourth) of each `file.py` row of its table rewritten
    from the lines: each of the file's families at the longest budget measured, with its commit."""
    final = latest(rows)
    end = max((m for _, m in final), default=None)
    out = []
    for line in text.splitlines(keepends=True):
        cells = line.split(" | ")
        if line.startswith("| `") and ".py` |" in line and len(cells) >= 5:
            script = cells[0][3:-1]
            cell = []
            for n, f in FAMILIES.items():
                r = final.get((n, end))
                if f.stages[-1][0] == script and r:
                    figs = [
                        f"{NAMES.get(k, k)} {fmt(r[k])}" for k in f.headline.split(",") if k in r
                    ]
                    cell.append(f"{n}: {', '.join(figs)} (`{r['commit']}`)")
            none = "not measured yet ([compare](docs/compare.md))"
            cells[3] = "; ".join(cell) or none
            line = " | ".join(cells)
        out.append(line)
    return "".join(out)


def report(rows: list, docs: Path):
    """docs/compare.md: a table per kind at the final point, and FID-CNN over minutes."""
    final = latest(rows)
    mins = sorted({m for _, m in final})
    if not rows:
        text = "# One table: every family, the same digits, the same minutes\n\nNo line measured"
        (docs / "compare.md").write_text(text + " yet: `python compare.py` writes them.\n")
        return
    lines = ["# One table: every family, the same digits, the same minutes", "",
             "Written by `python compare.py --report` from [compare.jsonl](compare.jsonl) alone; "
             "every figure is one run, on the 12,500 shipped digits, scored by `evaluate.py` "
             "against the 2,500 test digits.", ""]  # fmt: skip
    for kind, cols in (("generator", GEN_COLS), ("translator", TR_COLS)):
        names = [n for n, f in FAMILIES.items() if f.kind == kind and (n, mins[-1]) in final]
        if not names:
            continue
        head = ["family", "minutes", *cols, *(["baseline"] if kind == "translator" else [])]
        head += ["train img/s", "sample img/s", "params M", "commit"]
        lines += [f"## {kind}s at {mins[-1]:g} minutes", "", "| " + " | ".join(head) + " |"]
        lines += ["|" + "---|" * len(head)]
        for n in names:
            r = final[(n, mins[-1])]
            vals = [n, fmt(r["minutes"]), *(fmt(r.get(c, r.get(c + "_in_holes"))) for c in cols)]
            vals += [baseline(r)] if kind == "translator" else []
            vals += [fmt(r["train_img_s"]), fmt(r["sample_img_s"]), fmt(r["params_M"]), r["commit"]]
            lines.append("| " + " | ".join(vals) + " |")
        if kind == "generator":
            bpd = "bpd: test bits/dim, exact for the flows and PPCA (8-bit digits, dequantized); "
            bpd += "the VAE's is an IWAE bound on binarized digits (its Bernoulli decoder), "
            bpd += "so it is not on the flows' scale. ldm_classifier's steps, images and train "
            lines += [
                "",
                bpd + "img/s are its LDM stage's (70% of the budget), not its classifier's.",
            ]
        else:
            tr = "psnr: over the whole image, for ldm_inpaint in the holes only; baseline: "
            lines += ["", tr + "the same scores of an output that learns nothing."]
        lines += ["", f"FID-CNN over training minutes ({', '.join(map(fmt, mins))}):", ""]
        lines += ["| family | " + " | ".join(f"{m:g} min" for m in mins) + " |"]
        lines += ["|---|" + "---|" * len(mins)]
        for n in names:
            lines.append(
                f"| {n} | " + " | ".join(fmt(final.get((n, m), {}).get("fid")) for m in mins) + " |"
            )
        lines.append("")
    lines += spread(rows)
    missing = [n for n in FAMILIES if (n, mins[-1]) not in final]
    if missing:  # a measurement still under way says so, row by row
        lines += [f"Not measured yet at {mins[-1]:g} minutes: {', '.join(missing)}.", ""]
    lines += ["![FID-CNN over minutes; at the end, against sampling speed](compare.png)", ""]
    (docs / "compare.md").write_text("\n".join(lines))
    plot(final, mins, docs / "compare.png")


def plot(final: dict, mins: list, path: Path):
    """Left: FID-CNN against training minutes per generator; right: FID-CNN at the end against
    sampling images/s (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.5))
    gens = [n for n, f in FAMILIES.items() if f.kind == "generator"]
    colours = plt.get_cmap("tab20").colors  # 20 colours: a family keeps its own on both sides
    labels, above = [], []  # a label goes below its point where a neighbour's is above
    for i, n in enumerate(gens):
        pts = [
            (m, final[(n, m)]["fid"]) for m in mins if (n, m) in final and "fid" in final[(n, m)]
        ]
        if not pts:
            continue
        shade = colours[(2 * i) % 20 + (i >= 10)]  # the ten dark shades first, then the light
        style = dict(color=shade, marker="osD^vP"[i % 6])
        a.plot(*zip(*pts), label=n, **style)
        end = final.get((n, mins[-1]))
        if end and "fid" in end:
            b.scatter(end["sample_img_s"], end["fid"], **style)
            labels.append((end["sample_img_s"], end["fid"], n))
    for x, y, n in sorted(labels):
        near = any(abs(math.log(x / u)) < 0.4 and abs(math.log(y / v)) < 0.15 for u, v in above)
        at = (5, -11) if near else (5, 4)
        above += [(x, y)] if at[1] > 0 else []
        b.annotate(n, (x, y), at, textcoords="offset points", fontsize=8)
    a.set(xlabel="training minutes (2-core CPU)", ylabel="FID-CNN", yscale="log")
    b.set(
        xlabel="sampling images/s",
        ylabel=f"FID-CNN at {mins[-1]:g} min",
        xscale="log",
        yscale="log",
    )
    fig.legend(loc="lower center", ncol=len(gens), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)


def main(argv=None):
    fams = ", ".join(FAMILIES)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--families", default="all", help=f"comma-separated, of: {fams} (default: all)")
    p.add_argument("--minutes", type=float, default=10.0, help="the final budget (default: 10)")
    p.add_argument("--out", default="runs/compare", help="the runs' folder (default: runs/compare)")
    p.add_argument(
        "--docs", default="docs", help="where compare.jsonl, .md, .png go (default: docs)"
    )
    p.add_argument(
        "--run",
        type=int,
        default=1,
        help="a repeat, for the run-to-run spread: run 2's lines go beside run 1's and never "
        "replace its figures (default: 1)",
    )
    p.add_argument("--report", action="store_true", help="only rewrite the report from the lines")
    p.add_argument(
        "--samples", type=int, default=0, help="samples at every point (default: 0, as above)"
    )
    p.add_argument(
        "--score-flags",
        default="",
        help='more evaluate.py flags as one argument: --score-flags="--epochs 1" (default: none)',
    )
    args = p.parse_args(argv)
    names = list(FAMILIES) if args.families == "all" else args.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        die(f"--families: unknown {', '.join(unknown)} (known: {fams})")
    if args.minutes <= 0 or args.run < 1:
        die(f"--minutes {args.minutes}, --run {args.run}: must be positive")
    docs = Path(args.docs)
    jsonl = docs / "compare.jsonl"
    rows = read_lines(jsonl)

    def write(row):  # each row as soon as it is measured
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    if not args.report:
        for name in names:
            fam = FAMILIES[name]
            done = {
                (r["family"], r["minutes"], r["hash"]) for r in rows if r.get("run", 1) == args.run
            }
            out = Path(args.out) / (name if args.run == 1 else f"{name}.run{args.run}")
            rows += measure(name, fam, args.minutes, out, done, args, write)
    report(rows, docs)
    print(f"wrote {docs}/compare.md and compare.png from {len(rows)} lines of {jsonl}")
    if docs.resolve() == ROOT / "docs":  # README's table only from the repository's own lines
        readme = ROOT / "README.md"
        readme.write_text(readme_table(rows, readme.read_text()))
        print(f"wrote README.md's table from {len(rows)} lines of {jsonl}")


if __name__ == "__main__":
    main()
