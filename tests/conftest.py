"""Shared test helpers: fake datasets in the real on-disk formats, and a CLI runner."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one torch thread each
    import torch

    torch.set_num_threads(1)


def write_idx_mnist(root: Path, n_train=256, n_test=64, seed=0):
    """MNIST in torchvision's raw layout (uncompressed IDX), with crude digit-like blobs."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        imgs = np.zeros((n, 28, 28), np.uint8)
        for i, lab in enumerate(labels):  # a bright bar whose position encodes the label
            imgs[i, 4:24, 2 + 2 * lab : 6 + 2 * lab] = 255
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return Path(root)


@pytest.fixture
def fake_mnist(tmp_path):
    return write_idx_mnist(tmp_path / "data")


def run(script, *args, check=True, timeout=300, env=None):
    """Run a repository script as a user would; on failure show its output. A string of flags,
    "--steps 4 --tiny", is split on spaces (a path never starts with "-")."""
    args = [w for a in args for w in (a.split() if isinstance(a, str) and a[:1] == "-" else [a])]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=e,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def assert_one_line_error(p, *words):
    """The contract for bad input: exit code 2, one line on stderr, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for w in words:
        assert w in lines[0], (w, lines[0])


def torchrun(module, *args):
    """Train as MODULE.py would, under `torchrun --nproc_per_node=2` (gloo on CPU), through
    tests/ddp_worker.py, which saves each rank's weights to <out>/rank{r}.pt."""
    args = [w for a in args for w in (a.split() if isinstance(a, str) and a[:1] == "-" else [a])]
    worker = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *worker, str(ROOT / "tests" / "ddp_worker.py"), module, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def stop_after(script, *args, step: int, timeout=120) -> int:
    """Start a training run (logging every step) and send SIGTERM once it has logged `step`:
    it saves at the next step boundary and exits 0, as Ctrl-C does. Returns the saved step."""
    import signal

    import torch

    args = [w for a in args for w in (a.split() if isinstance(a, str) and a[:1] == "-" else [a])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith(f"step {step}/"):
            p.send_signal(signal.SIGTERM)
            break
    p.communicate(timeout=timeout)
    assert p.returncode == 0, p.returncode
    out = Path(args[args.index("--out") + 1])
    return torch.load(out / "ckpt.pt", weights_only=True)["step"]


def assert_dies(capsys, fn, *words):
    """In-process form of assert_one_line_error, for the checks behind a script's CLI (each CLI
    call costs 2 s of torch import): common.die exits with 2 and one stderr line."""
    import signal

    import torch

    capsys.readouterr()
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    try:  # common.setup sets threads and a SIGINT handler: give them back to pytest
        with pytest.raises(SystemExit) as e:
            fn()
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (e.value, err)
    for w in words:
        assert w in err[0], (w, err[0])
