"""What every script promises alike: help for every flag, checkpoints that the network's class
alone can load, folders as users have them, pictures that never cost a run, errors that say what
to do, and Ctrl-C as one line."""

import dataclasses
import importlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_dies, assert_one_line_error, run

import common

MODELS = ["ddpm_ddim", "gan", "cgan_pix2pix", "vae", "vqvae", "flow", "cfg_ldm"]
UNPAIRED = ["cyclegan", "stargan"]  # their own data layouts (piles, attributes): own tests


@pytest.mark.parametrize("script", MODELS + UNPAIRED + ["evaluate", "bench", "compare"])
def test_help_exits_0_and_every_flag_has_help(script):
    p = run(f"{script}.py", "-h")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    if script in MODELS + UNPAIRED:  # every Config field, through the same parser the script builds
        cls = importlib.import_module(script).Config
        helps = common.field_help(cls)
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f"{script}.py --{f.name} has no help"
            assert f"--{f.name.replace('_', '-')}" in p.stdout
    else:  # hand-written parsers: an option line without text is followed by its indented help
        lines = p.stdout.split("options:")[1].splitlines()
        for i, line in enumerate(lines):
            if line.startswith("  -") and "  " not in line.strip():
                assert lines[i + 1].startswith(" " * 20), f"{script}.py: {line.strip()} has no help"


def test_field_help_is_the_comment_on_the_fields_line(tmp_path, monkeypatch):
    src = "class C:\n    depth: int = 0  # K steps per level\n    seed: int = 0\n    s: str = '#'\n"
    (tmp_path / "cfg_src.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert common.field_help(importlib.import_module("cfg_src").C) == {"depth": "K steps per level"}


def flat_folder(root, n=5, size=32):
    """A flat folder of n RGB PNGs of one size: the layout most users have."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"img_{i}.png")
    return root


# script, extra flags, (the class that rebuilds the network, model_args key, state key)
REBUILD = {
    "ddpm_ddim": (["--T", 50], ("UNet", "unet", "ema")),
    "gan": ([], ("Generator", "G", "G")),
    "cgan_pix2pix": ([], ("ConditionalGenerator", "G", "G")),
    "vae": ([], ("VAE", "vae", "model")),
    "vqvae": ([], ("VQVAE", "vqvae", "model")),
    "flow": (["--init-batch", 5], ("Flow", "flow", "model")),
    "cfg_ldm": (["--stage ldm --pixel --T 50 --sample-steps 5"], ("LDM", "ldm", "ema")),
}


@pytest.mark.parametrize(  # ddpm_ddim's DDIM-50 grids take half a minute: the slow lane
    "script", [pytest.param(m, marks=pytest.mark.slow) if m == "ddpm_ddim" else m for m in MODELS]
)
def test_five_image_flat_folder_checkpoint_pictures_and_rebuild(script, tmp_path):
    """5 images, --batch-size 4: training ends with a checkpoint and its pictures (the pictures
    come after the checkpoint); the folder's own 32 px size is kept; the network rebuilds from
    the checkpoint's model_args with its class alone and matches what --sample loads."""
    folder = flat_folder(tmp_path / "imgs")
    out, (extra, (cls, key, state)) = tmp_path / "run", REBUILD[script]
    flags = ["--tiny", "--batch-size", 4, "--steps", 2, "--sample-every", 2, "--log-every", 100]
    p = run(f"{script}.py", *flags, *extra, "--dataset", f"folder:{folder}", "--out", out)
    assert "warning" not in p.stderr, p.stderr
    log = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert log[0].startswith("step 1/2"), p.stdout  # the first step is logged, not the 100th
    pictures = sorted(f.name for f in out.glob("*.png"))
    assert (out / "ckpt.pt").exists() and any("000002" in f for f in pictures), pictures

    ck = torch.load(out / "ckpt.pt", weights_only=True)
    mod = importlib.import_module(script)
    net = getattr(mod, cls)(**ck["model_args"][key])  # the class alone
    net.load_state_dict(ck[state])
    net.eval()
    cfg = mod.Config(out=str(out), device="cpu")
    if script == "vqvae":
        loaded = mod.load_stage1(cfg, torch.device("cpu"))[0]
    else:
        loaded = mod.load_trained(cfg)[0]
    loaded = getattr(loaded, "model", loaded).eval()  # cfg_ldm: its Sampler holds the LDM
    torch.manual_seed(0)
    if script in ("gan", "cgan_pix2pix"):
        z = torch.randn(3, ck["model_args"]["G"]["z_dim"])
        args = (z, torch.zeros(3, dtype=torch.long)) if script == "cgan_pix2pix" else (z,)
    elif script in ("ddpm_ddim", "cfg_ldm"):
        args = (torch.randn(3, 3, 32, 32), torch.tensor([0, 10, 49]))
        args += (torch.zeros(3, dtype=torch.long),) if script == "cfg_ldm" else ()
    elif script == "vae":
        args = (torch.rand(3, 3, 32, 32), True)
    else:
        args = (torch.rand(3, 3, 32, 32) - 0.5,)
    assert ck["model_args"][key].get("size", ck["model_args"][key].get("image_size", 32)) == 32
    with torch.no_grad():
        a, b = net(*args), loaded(*args)
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    assert torch.equal(a, b)


def test_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run("vae.py", "--dataset", f"folder:{tmp_path / 'empty'}", "--out", tmp_path, check=False)
    assert_one_line_error(p, f"no images in {tmp_path / 'empty'}")
    p = run("vae.py", "--dataset", f"folder:{tmp_path / 'none'}", "--out", tmp_path, check=False)
    assert_one_line_error(p, f"folder:{tmp_path / 'none'}: no such folder")


def test_folder_keeps_its_own_size_and_flat_is_one_class(tmp_path):
    x, y = common.load_images(common.Config(dataset=f"folder:{flat_folder(tmp_path / 'f', 3, 24)}"))
    assert x.shape == (3, 3, 24, 24) and x.dtype == torch.uint8 and (y == 0).all()


def start(*args, env=None):
    """A script as a background process, stdout and stderr merged: for the signal tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_for(p, prefix):
    for line in p.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}")


@pytest.mark.parametrize("cmd", ["sample", "evaluate"])
def test_ctrl_c_outside_training_is_one_line(cmd, fake_mnist, tmp_path):
    """Ctrl-C in --sample and in evaluate.py: exit 130 with one line, no traceback."""
    if cmd == "sample":
        run(
            "ddpm_ddim.py",
            "--tiny --steps 1 --batch-size 8 --sample-every 0 --data-dir",
            fake_mnist,
            "--out",
            tmp_path,
        )
        args = ["ddpm_ddim.py", "--sample", 10000, "--batch-size", 2, "--out", tmp_path]
        first = "sampled"
    else:
        np.savez(tmp_path / "s.npz", np.zeros((4, 28, 28, 1), np.uint8))
        args = ["evaluate.py", tmp_path / "s.npz", "--data-dir", fake_mnist]
        first = "  epoch"
    p = start(*args, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    wait_for(p, first)
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "Traceback" not in rest, rest
    assert rest.strip().splitlines()[-1] == "error: interrupted"


def test_sampling_reads_the_runs_data_dir(fake_mnist, tmp_path):
    """pix2pix --sample (and every --nll/--eval) finds the data where training found it."""
    run(
        "cgan_pix2pix.py",
        "--task pix2pix --tiny --steps 1 --batch-size 8 --sample-every 0 --data-dir",
        fake_mnist,
        "--out",
        tmp_path,
    )
    p = run("cgan_pix2pix.py", "--out", tmp_path, "--sample", 4, "--no-download")
    assert p.stdout.strip().splitlines()[-1].startswith(f"wrote 4 translations to {tmp_path}")


def test_a_full_size_model_on_cpu_says_so_in_its_first_lines(fake_mnist, tmp_path):
    """The first log line comes after one step, with a one-line estimate for a CPU run of the
    full-size model; SIGTERM then saves and exits 0."""
    args = [
        "gan.py",
        "--steps",
        100000,
        "--batch-size",
        64,
        "--data-dir",
        fake_mnist,
        "--out",
        tmp_path,
    ]
    p = start(*args)
    assert wait_for(p, "step ").startswith("step 1/100000")
    assert "--tiny trains in minutes" in wait_for(p, "full-size model on CPU:")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0 and (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("script", MODELS + UNPAIRED + ["progan"])
def test_declared_ranges_die_in_one_line(script, capsys):
    """Every declared minimum and choice set of a script's Config, checked once in parse: one
    step below the minimum, or a value outside the set, is exit 2 with the flag's name."""
    cls = importlib.import_module(script).Config
    lows = {k: v for c in cls.__mro__[::-1] for k, v in vars(c).get("at_least", {}).items()}
    sets = {k: v for c in cls.__mro__[::-1] for k, v in vars(c).get("choices", {}).items()}
    assert {"steps", "batch_size", "sample"} <= lows.keys() and "device" in sets
    for k, lo in lows.items():
        bad = lo - (1 if isinstance(lo, int) else 1e-3 * max(1, abs(lo)))
        flag = f"--{k.replace('_', '-')}"
        argv = [flag, str(bad)]
        assert_dies(capsys, lambda: common.parse(cls, script, argv), flag, "at least")  # noqa: B023
    for k, ok in sets.items():
        flag = f"--{k.replace('_', '-')}"
        argv = [flag, "nonsense"]
        assert_dies(capsys, lambda: common.parse(cls, script, argv), flag, ok[0])  # noqa: B023
    assert common.parse(cls, script, []).out == f"runs/{script}"  # the defaults pass
