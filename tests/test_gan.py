"""gan.py: losses against hand-computed values, what each step may touch, the DCGAN layers, a GAN
that learns a 2-D Gaussian, then the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, run, torchrun

import gan


def sp(v):  # softplus, by hand: log(1 + e^v)
    return math.log1p(math.exp(v))


def test_losses_match_hand_computed_values():
    r, f = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])  # D's logits on reals, fakes
    # -log D(x) = softplus(-r); -log(1 - D(G(z))) = softplus(f); means over the batch
    want_d = (sp(0) + sp(-2)) / 2 + (sp(-1) + sp(1)) / 2
    assert gan.d_loss(r, f, "ns").item() == pytest.approx(want_d, rel=1e-6)
    assert gan.d_loss(r, f, "minimax").item() == pytest.approx(want_d, rel=1e-6)
    assert gan.g_loss(f, "ns").item() == pytest.approx((sp(1) + sp(-1)) / 2, rel=1e-6)
    assert gan.g_loss(f, "minimax").item() == pytest.approx(-(sp(-1) + sp(1)) / 2, rel=1e-6)
    assert gan.d_loss(r, f, "hinge").item() == pytest.approx((1 + 0) / 2 + (0 + 2) / 2)
    assert gan.g_loss(f, "hinge").item() == pytest.approx(0.0)
    # logits, not probabilities: exact far out where sigmoid-then-log would give inf (or 100)
    assert gan.d_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item() == pytest.approx(400)


def test_minimax_saturates_where_non_saturating_does_not():
    fake = torch.tensor([-10.0], requires_grad=True)  # D confidently rejects the fake
    (g_mm,) = torch.autograd.grad(gan.g_loss(fake, "minimax"), fake)
    (g_ns,) = torch.autograd.grad(gan.g_loss(fake, "ns"), fake)
    assert abs(g_mm.item()) == pytest.approx(torch.sigmoid(torch.tensor(-10.0)).item(), rel=1e-4)
    assert abs(g_mm.item()) < 1e-4 and g_ns.item() == pytest.approx(-1.0, abs=1e-4)


def snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def same(m, snap):
    return all(torch.equal(p, s) for p, s in zip(m.parameters(), snap))


def test_d_step_leaves_G_alone_and_g_step_leaves_D_alone():
    torch.manual_seed(0)
    G, D = gan.Generator(8, 1, 4, 16), gan.Discriminator(1, 4, 16)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-2) for m in (G, D))
    g0, d0 = snapshot(G), snapshot(D)
    fake = G(torch.randn(6, 8))
    stats = gan.d_step(D, opt_d, torch.rand(6, 1, 16, 16) * 2 - 1, fake)
    assert same(G, g0) and all(p.grad is None for p in G.parameters())  # detached fakes
    assert not same(D, d0) and 0 <= stats["d_acc"] <= 1
    d1, dgrad = snapshot(D), [p.grad.clone() for p in D.parameters()]
    gan.g_step(D, opt_g, fake)
    assert same(D, d1)  # and D, frozen, got no new gradients from G's loss
    assert all(torch.equal(p.grad, g) for p, g in zip(D.parameters(), dgrad))
    assert not same(G, g0) and all(p.requires_grad for p in D.parameters())  # and thawed again


@pytest.mark.parametrize("size", [16, 28, 32, 48, 64, 128])
def test_dcgan_shapes_layers_and_init(size):
    torch.manual_seed(0)
    G, D = gan.Generator(100, 3, 8, size), gan.Discriminator(3, 8, size)
    x = G(torch.randn(4, 100))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert D(x).shape == (4,)
    n = int(math.log2(size)) - 2  # stride-2 stages: depth follows log2 of the size
    assert sum(isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2) for m in G.modules()) == n
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in D.modules()) == n
    bns = [m for m in [*G.modules(), *D.modules()] if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * n - 1 and all(b.eps == 1e-5 and b.momentum == 0.1 for b in bns)
    assert not isinstance(D.features[1], nn.BatchNorm2d)  # none on D's input layer
    assert isinstance(G.net[-1], nn.Tanh) and not isinstance(G.net[-2], nn.BatchNorm2d)
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax)) for m in D.modules())  # logits out
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert w.std().item() == pytest.approx(0.02, rel=0.05)  # N(0, 0.02)


def test_unsupported_sizes():
    assert gan.stages(28) == (2, 7) and gan.stages(64) == (4, 4)
    assert gan.stages(30) is None and gan.stages(8) is None and gan.stages(100) is None


@pytest.mark.slow
def test_learns_a_gaussian_and_d_accuracy_returns_to_chance():
    """G(z) = A z + b against N(mu, Sigma) in 2-D: the moments match, and D, which first tells
    the two apart easily, ends near chance."""
    torch.manual_seed(0)
    mu, L = torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    G = nn.Linear(2, 2)
    D = nn.Sequential(
        nn.Linear(2, 32),
        nn.LeakyReLU(0.2),
        nn.Linear(32, 32),
        nn.LeakyReLU(0.2),
        nn.Linear(32, 1),
        nn.Flatten(0),
    )
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-3, betas=(0.5, 0.999)) for m in (G, D))

    def moment_error():
        with torch.no_grad():
            s = G(torch.randn(20000, 2))
        return (s.mean(0) - mu).norm().item() + (torch.cov(s.T) - L @ L.T).norm().item()

    err0, accs = moment_error(), []
    for _ in range(3000):
        x = torch.randn(256, 2) @ L.T + mu
        fake = G(torch.randn(256, 2))
        stats = gan.d_step(D, opt_d, x, fake)
        gan.g_step(D, opt_g, fake)
        accs.append(stats["d_acc"].item())
    err = moment_error()
    assert err < err0 / 5, (err0, err)
    assert max(accs[:100]) > 0.8 and np.mean(accs[-300:]) < 0.65, (
        max(accs[:100]),
        np.mean(accs[-300:]),
    )


# -----------------------------------------------------------------------------
# the CLI contract
TINY = ["--tiny", "--batch-size", "16", "--log-every", "1", "--sample-every", "2"]


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
def test_cli_train_resume_exact_and_sample(fake_mnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("gan.py", *TINY, "--data-dir", fake_mnist, "--out", a, "--steps", 4)
    run("gan.py", *TINY, "--data-dir", fake_mnist, "--out", b, "--steps", 2)
    p = run("gan.py", *TINY, "--data-dir", fake_mnist, "--out", b, "--steps", 4, "--resume")
    assert "from step 2" in p.stdout and "d_gz" in p.stdout
    la, lb = logs(a), logs(b)
    for s in (3, 4):
        assert {k: v for k, v in la[s].items() if k not in ("t", "img_s")} == {
            k: v for k, v in lb[s].items() if k not in ("t", "img_s")
        }
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 4
    for k in ("G", "D"):
        assert all(torch.equal(ca[k][n], cb[k][n]) for n in ca[k])
    assert (a / "samples_000002.png").exists() and (a / "samples_000004.png").exists()
    run("gan.py", "--out", a, "--sample", 10, "--batch-size", 4)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (10, 28, 28, 1) and z["arr_0"].dtype == np.uint8 and "arr_1" not in z
    # the hinge loss and an EMA of G: trains, and --sample draws from the EMA
    e = tmp_path / "ema"
    run("gan.py", *TINY, "--data-dir", fake_mnist, "--out", e, "--steps 2 --loss hinge --ema 0.9")
    ck = torch.load(e / "ckpt.pt", weights_only=True)
    assert ck["ema"] is not None and not torch.equal(
        ck["ema"]["net.0.weight"], ck["G"]["net.0.weight"]
    )
    run("gan.py", "--out", e, "--sample", 4)


@pytest.mark.slow
def test_cli_bad_input(fake_mnist, tmp_path):
    out = tmp_path / "run"
    cli = lambda *a: run("gan.py", "--out", out, *a, check=False)
    data = ["--data-dir", fake_mnist]
    assert_one_line_error(
        cli("--tiny", "--data-dir", tmp_path / "none", "--no-download"), "mnist not found in"
    )
    assert_one_line_error(cli("--sample", 4), "no checkpoint")
    assert_one_line_error(cli("--loss", "wgan"), "--loss")
    assert_one_line_error(cli("--ema", "1.5"), "--ema")
    assert_one_line_error(cli("--tiny", *data, "--image-size", 30), "image size 30")
    assert_one_line_error(cli("--tiny", *data, "--dataset", "svhn"), "unknown dataset")
    run("gan.py", *TINY, *data, "--out", out, "--steps", 1)
    assert_one_line_error(cli(*data, "--steps", 2, "--resume"), "does not fit")  # not --tiny
    torch.save({"step": 1, "model": {}}, out / "ckpt.pt")  # loads, but is not this script's
    assert_one_line_error(cli("--sample", 4), "not a gan.py checkpoint")
    assert_one_line_error(cli(*data, "--tiny", "--steps", 2, "--resume"), "not a gan.py checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_one_line_error(cli("--sample", 4), "corrupted")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_keep_G_and_D_identical(fake_mnist, tmp_path):
    """Two D forwards (real, fake) before one backward, and a G step through a frozen D, under
    DDP: both ranks end with the same G and D weights (BatchNorm's running statistics are each
    rank's own between DDP's broadcasts, and are not compared). G's EMA starts from rank 0's
    init too, as DDP's replicas do."""
    torchrun(
        "gan",
        *TINY,
        "--sample-every 0 --steps 3 --ema 0.9 --data-dir",
        fake_mnist,
        "--out",
        tmp_path,
    )
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(k.startswith("1.") for k in w0) and any(k.startswith("2.") for k in w0)  # D, EMA
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if "running" not in k), [
        k for k in w0 if not torch.equal(w0[k], w1[k])
    ]
