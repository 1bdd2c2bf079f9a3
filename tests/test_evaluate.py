"""evaluate.py: metrics against closed forms and constructed sets; the classifier on real digits."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_dies, assert_one_line_error, run

import evaluate as E


def gaussian(n, mu, var, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mu), generator=g, dtype=torch.float64) * torch.tensor(
        var
    ).sqrt() + torch.tensor(mu)


def test_fid_self_is_zero_and_matches_gaussian_closed_form():
    f = gaussian(5000, [0.0] * 4, [1.0] * 4, 0)
    assert abs(E.fid(f, f)) < 1e-8
    mu1, mu2, v1, v2 = (
        [0.0, 1.0, 0.0, 2.0],
        [0.5, 1.0, -1.0, 2.0],
        [1.0, 2.0, 0.5, 1.0],
        [2.0, 1.0, 0.5, 4.0],
    )
    closed = sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + sum(
        a + b - 2 * math.sqrt(a * b) for a, b in zip(v1, v2)
    )
    f1, f2 = gaussian(200000, mu1, v1, 1), gaussian(200000, mu2, v2, 2)
    assert E.fid(f1, f2) == pytest.approx(closed, rel=0.02)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))  # FID is rotation invariant:
    assert E.fid(f1 @ q, f2 @ q) == pytest.approx(closed, rel=0.02)  # non-diagonal covariances


def test_kid_zero_for_same_distribution_positive_otherwise():
    a, b = gaussian(3000, [0.0] * 8, [1.0] * 8, 0), gaussian(3000, [0.0] * 8, [1.0] * 8, 1)
    c = gaussian(3000, [0.5] * 8, [1.0] * 8, 2)
    assert abs(E.kid(a, b)) < 0.01 < E.kid(a, c)


def test_precision_recall_on_constructed_sets():
    real = gaussian(1000, [0.0, 0.0], [1.0, 1.0], 0)
    same = gaussian(1000, [0.0, 0.0], [1.0, 1.0], 1)
    collapsed = gaussian(1000, [0.0, 0.0], [1e-4, 1e-4], 2)  # every sample at the mode
    far = gaussian(1000, [6.0, 6.0], [1.0, 1.0], 3)
    p, r = E.precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    p, r = E.precision_recall(real, collapsed)
    assert p > 0.99 and r < 0.1  # a collapsed set: high precision, low recall
    p, r = E.precision_recall(real, far)
    assert p < 0.05 and r < 0.05


def test_classifier_scores_closed_forms():
    uniform = torch.eye(10, dtype=torch.float64).repeat(10, 1)  # confident, all 10 labels equally
    s = E.classifier_scores(uniform, labels=torch.arange(10).repeat(10))
    assert s["is"] == pytest.approx(10) and s["label_entropy"] == pytest.approx(math.log(10))
    assert s["confidence"] == 1 and s["cond_acc"] == 1
    one = torch.zeros(50, 10, dtype=torch.float64)
    one[:, 3] = 1
    s = E.classifier_scores(one)
    assert s["is"] == pytest.approx(1) and s["label_entropy"] == pytest.approx(0)


def test_malformed_samples_are_one_line_errors(tmp_path, capsys):
    """One CLI call for the contract (exit 2, one line); the other checks in-process."""
    np.savez(tmp_path / "bad.npz", np.zeros((4, 28, 28), np.float32))
    off = ["--no-download", "--data-dir", str(tmp_path)]
    assert_one_line_error(run("evaluate.py", tmp_path / "bad.npz", *off, check=False), "uint8")
    main = lambda *a: lambda: E.main([str(v) for v in a])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert_dies(capsys, main(tmp_path / "junk.npz", *off), "cannot read")
    assert_dies(capsys, main(tmp_path / "missing.npz", *off), "no such file")
    np.savez(tmp_path / "ok.npz", np.zeros((4, 28, 28, 1), np.uint8))
    assert_dies(capsys, main(tmp_path / "ok.npz", *off), "mnist not found in")
    assert_dies(capsys, main(tmp_path / "ok.npz", "--epochs", "0"), "--epochs 0")
    assert_dies(capsys, main("--real", "--restoration", "sr"), "--restoration")
    assert_dies(capsys, main(tmp_path / "ok.npz", "--restoration", "sr", *off), "arr_2")


def test_box_scores_crop_each_box_and_weigh_ink_outside():
    """A stand-in classifier reads a crop's label from its brightness (label d: value 20 d + 10),
    so box_acc and ink_outside have exact values."""

    def net(x):  # x: (B, 1, 28, 28) in [-1, 1]
        d = (((x + 1) * 127.5).mean((1, 2, 3)) - 10) / 20
        return x.flatten(1), torch.nn.functional.one_hot(d.round().long().clamp(0, 9), 10).double()

    x = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    boxes = torch.tensor([[[3, 0, 0, 20, 30], [5, 30, 30, 64, 64]], [[7, 10, 5, 40, 25], [-1] * 5]])
    for i, k in (boxes[..., 0] >= 0).nonzero().tolist():
        d, x0, y0, x1, y1 = boxes[i, k].tolist()
        x[i, :, y0:y1, x0:x1] = 20 * d + 10
    assert E.box_scores(net, x, boxes) == {"boxes": 3, "box_acc": 1.0, "ink_outside": 0.0}
    inside = x.double().sum().item()
    x[1, 0, 60, 0] = 255  # one bright pixel outside every box
    boxes[0, 1, 0] = 4  # one box asks for another digit
    res = E.box_scores(net, x, boxes)
    assert res["box_acc"] == pytest.approx(2 / 3) and res["ink_outside"] == pytest.approx(
        255 / inside
    )


def test_restoration_psnr_and_baselines_in_closed_form():
    """PSNR of images a known distance apart (everywhere, and over the holes only); the sr
    baseline is torch's bicubic upsampling of the low-res input; mean fill changes the holes
    alone."""
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] = 51  # 0.2 on [0, 1]: mse 0.04, 13.98 dB
    b[1, :, :2] = 51  # half the image: mse 0.02, 16.99 dB; over those pixels alone 13.98
    torch.testing.assert_close(E.psnr(a, b), -10 * torch.log10(torch.tensor([0.04, 0.02])).double())
    where = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    where[:, :, :2] = 1
    assert E.psnr(a, b, where).tolist() == pytest.approx([13.9794, 13.9794], abs=1e-4)
    low = torch.randint(0, 256, (3, 1, 7, 7), dtype=torch.uint8)
    orig = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    up = F.interpolate(low.double() / 127.5 - 1, scale_factor=4, mode="bicubic").clamp(-1, 1)
    want = ((up + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(E.restoration_baseline("sr", low, orig, None), want)
    orig = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    hole = (torch.rand(3, 1, 28, 28) < 0.3).to(torch.uint8)
    mean = torch.full((1, 28, 28), 99.6, dtype=torch.float64)
    filled = E.restoration_baseline("inpaint", hole, orig, mean)
    assert (filled[hole > 0] == 100).all() and torch.equal(filled[hole == 0], orig[hole == 0])


@pytest.mark.slow
def test_real_digits_floor_and_a_collapsed_set(tmp_path):
    cache = ["--cache-dir", tmp_path / "cache", "--dataset", "mnist-12k"]
    cache += ["--epochs", "3"]  # a quarter of the default 12 epochs keeps CI short
    score = lambda *a, **k: json.loads(
        run("evaluate.py", *a, *cache, **k).stdout.strip().splitlines()[-1]
    )
    real = score("--real", timeout=600)  # trains the feature CNN (one thread: xdist runs 2 workers)
    acc = float(real["features"].split("test acc ")[1].rstrip(")"))
    assert acc >= 0.96  # measured: 0.967 after 3 epochs, 0.972 after 4, 0.987 after 12
    assert real["label_entropy"] > 2.25 and real["recall"] > 0.8
    x = np.load(ROOT / "data" / "mnist-12k.npz")["x_test"]
    np.savez(
        tmp_path / "one.npz", np.repeat(x[:1, :, :, None], 1000, 0)
    )  # 1,000 copies of one digit
    rgb = np.repeat(x[:1000].repeat(2, 1).repeat(2, 2)[..., None], 3, -1)  # 56x56 RGB real digits
    np.savez(tmp_path / "rgb.npz", rgb)
    one, ok = score(tmp_path / "one.npz"), score(tmp_path / "rgb.npz")
    assert one["fid"] > 10 * real["fid"] and one["recall"] < 0.05 and one["label_entropy"] < 0.1, (
        one
    )
    assert ok["fid"] < 3 * real["fid"] and ok["label_entropy"] > 2.2, (
        ok
    )  # resizing keeps real digits real
    # restorations: the originals themselves beside bicubic from their 7x7 block means
    y = np.load(ROOT / "data" / "mnist-12k.npz")["y_test"][:500]
    orig = x[:500, :, :, None]
    low = orig.reshape(500, 7, 4, 7, 4, 1).mean((2, 4)).round().astype(np.uint8)
    np.savez(tmp_path / "sr.npz", orig, y, low, orig)
    sr = score(tmp_path / "sr.npz", "--restoration", "sr")
    assert sr["psnr"] == 100 and sr["baseline"] == "bicubic" and 10 < sr["bicubic_psnr"] < 30
    assert sr["cond_acc"] > sr["bicubic_cond_acc"] and sr["fid"] < sr["bicubic_fid"], sr
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 3
