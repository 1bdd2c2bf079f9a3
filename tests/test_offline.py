"""A fresh clone runs offline: the 12,500 shipped digits (data/mnist-12k.npz), the fallback of
--dataset mnist to them, and no path outside the repository in any tracked file."""

import hashlib
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run

import common

# SHA-256 of the four uncompressed IDX files the shipped arrays were taken from
IDX_SHA256 = {
    "train-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "train-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "t10k-images-idx3-ubyte": "baa20c0f6851753ea107190b1b6a3142172382b75605f5c10ccf1e7cdc489e98",
    "t10k-labels-idx1-ubyte": "3f1096f693b8b433508e5b0a25a606c71bcad2810f390cc297af168ad3de6921",
}
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}


def idx_files(z) -> dict:
    """The IDX files (torchvision's raw MNIST layout) that hold the shipped arrays."""
    out = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        out[f"{prefix}-images-idx3-ubyte"] = struct.pack(">IIII", 2051, *x.shape) + x.tobytes()
        out[f"{prefix}-labels-idx1-ubyte"] = struct.pack(">II", 2049, len(y)) + y.tobytes()
    return out


def test_shipped_digits_are_the_idx_files_byte_for_byte():
    with np.load(common.SHIPPED) as z:
        assert z["x_train"].shape == (10000, 28, 28) and z["x_test"].shape == (2500, 28, 28)
        assert z["y_train"].shape == (10000,) and z["y_test"].shape == (2500,)
        assert {z[k].dtype for k in z.files} == {np.dtype(np.uint8)}
        files = idx_files(z)
    assert {k: hashlib.sha256(b).hexdigest() for k, b in files.items()} == IDX_SHA256
    assert common.SHIPPED.stat().st_size < 3 * 2**20  # README says 2.1 MB


def test_mnist_12k_is_loaded_as_torchvision_loads_mnist(tmp_path):
    """Written back as IDX files, the shipped digits load through torchvision's MNIST to the
    same tensors as --dataset mnist-12k, at the native and at another size."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with np.load(common.SHIPPED) as z:
        for name, b in idx_files(z).items():
            (raw / name).write_bytes(b)
    for train, size in ((False, 0), (False, 32)):  # the train split: the checksums above
        ours = common.load_images(common.Config(dataset="mnist-12k", image_size=size), train)
        tv = common.Config(dataset="mnist", data_dir=str(tmp_path), image_size=size)
        tv = common.load_images(tv, train)
        assert torch.equal(ours[0], tv[0]) and torch.equal(ours[1], tv[1])
        assert ours[0].dtype == torch.uint8 and ours[0].shape[-1] == (size or 28)
    assert len(ours[0]) == 2500


def test_mnist_falls_back_to_the_shipped_digits_and_records_it(tmp_path, monkeypatch, capsys):
    """No files and no download: one line, then the shipped digits; cfg says mnist-12k (so the
    checkpoint does), and the derived tasks' --digits likewise. --no-download stays strict:
    exit 2 and one line."""
    import torchvision

    def no_network(self):
        os.makedirs(self.raw_folder, exist_ok=True)
        (tmp_path / "data" / "MNIST" / "raw" / "part.gz").write_bytes(b"x")  # a partial download
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    cfg = common.Config(data_dir=str(tmp_path / "data"))
    x, y = common.load_images(cfg, train=False)
    assert cfg.dataset == "mnist-12k" and x.shape == (2500, 1, 28, 28)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no network" in err[0] and "--dataset mnist-12k" in err[0], err
    assert not (tmp_path / "data").exists()  # no folder, no partial file left behind
    cfg = common.Config(data_dir=str(tmp_path / "data"))
    cfg.digits = "mnist"
    assert (
        common.load_images(cfg, digits=True)[0].shape == (10000, 1, 28, 28)
        and cfg.digits == "mnist-12k"
    )
    assert "--dataset mnist-12k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.load_images(common.Config(data_dir=str(tmp_path / "data"), download=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--no-download" in err[0], err


def test_other_datasets_offline_still_stop_in_one_line(tmp_path):
    """Only mnist has shipped digits: fashion offline is the one-line error, no folder left."""
    root = tmp_path / "data"
    args = ["--tiny --dataset fashion --data-dir", root, "--out", tmp_path]
    p = run("gan.py", *args, check=False, env=OFFLINE)
    assert_one_line_error(p, "fashion not found in", "cannot be downloaded", "--data-dir DIR")
    assert not root.exists()


def tree(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_fresh_copy_trains_offline_with_no_data_flags(tmp_path):
    """The repository's files alone in an empty folder, no network, no data flags: ddpm_ddim.py
    and gan.py say they use the shipped digits, write a grid and a checkpoint, and write nothing
    outside runs/ (bytecode off: Python's cache is not ours)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in [*ROOT.glob("*.py"), ROOT / "requirements.txt"]:
        shutil.copy(f, clone)
    shutil.copytree(ROOT / "data", clone / "data", ignore=shutil.ignore_patterns("MNIST"))
    before = tree(clone)
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    for script in ("ddpm_ddim", "gan"):
        cmd = [sys.executable, f"{script}.py", "--tiny", "--steps", "2", "--batch-size", "8"]
        p = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "using the 12,500 digits shipped in data/ (--dataset mnist-12k)" in p.stderr
        out = clone / "runs" / script
        assert (out / "samples_000002.png").is_file()
        ck = torch.load(out / "ckpt.pt", weights_only=True)
        assert ck["step"] == 2 and ck["config"]["dataset"] == "mnist-12k"
    after = tree(clone)
    assert {k: v for k, v in after.items() if not k.startswith("runs/")} == before


def test_no_tracked_file_points_outside_the_repository():
    """A user's clone has nothing beside it: no tracked file may name the folder our own
    checkouts have next to them."""
    outside = ".." + "/shared"  # spelled in two parts so that this file does not match itself
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = [
        f for f in files if (ROOT / f).is_file() and outside.encode() in (ROOT / f).read_bytes()
    ]
    assert hits == []
    assert "data/mnist-12k.npz" in files
