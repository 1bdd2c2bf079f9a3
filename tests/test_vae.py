"""vae.py: the KL, the reparameterization and the IWAE bound against closed forms, then the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, assert_one_line_error, run

import vae as V


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    n = 200_000
    z = V.reparameterize(mu.expand(n, 3, 4), logvar.expand(n, 3, 4))  # (n, 3, 4)
    zero = torch.zeros_like(z)
    log_ratio = V.log_normal(z, mu, logvar) - V.log_normal(z, zero, zero)  # log q - log p
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    kl = V.gaussian_kl(mu, logvar)
    assert (kl > 0).all() and ((mc - kl).abs() < 4 * se + 1e-4).all(), (mc, kl, se)
    assert torch.allclose(V.gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def test_reparameterized_sample_has_the_requested_moments_and_gradients():
    mu = torch.tensor([1.5, -2.0, 0.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.01)], requires_grad=True)
    z = V.reparameterize(mu.expand(100_000, 3), logvar.expand(100_000, 3))
    assert torch.allclose(z.mean(0), mu, atol=0.03)
    assert torch.allclose(z.var(0), torch.tensor([1.0, 4.0, 0.01]), rtol=0.03)
    eps = torch.randn(3)
    V.reparameterize(mu, logvar, eps).sum().backward()  # dz/dmu = 1, dz/dlogvar = sigma eps / 2
    assert torch.allclose(mu.grad, torch.ones(3))
    assert torch.allclose(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_gradients_reach_the_encoder_through_z_and_ae_has_no_kl():
    torch.manual_seed(0)
    model = V.VAE(1, 8, 4, 28)
    x01 = torch.rand(4, 1, 28, 28).bernoulli()
    loss, rec, kl = V.loss_terms(model, x01, "bernoulli", beta=0.0)  # the KL's path is cut off
    loss.backward()
    enc = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in enc) and kl > 0
    loss, rec, kl = V.loss_terms(model, x01, "bernoulli", ae=True)
    assert kl == 0 and loss == rec
    assert torch.equal(model(x01, ae=True)[0], model(x01, ae=True)[0])  # no noise in an AE


def test_likelihoods_are_distributions():
    x = torch.rand(2, 1, 4, 4).bernoulli()
    logits = torch.randn(2, 1, 4, 4)
    want = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(V.log_px(x, logits, "bernoulli"), want, atol=1e-5)
    bins = torch.arange(256.0).view(256, 1, 1, 1) / 255  # every 8-bit value
    for mean, ls in [(0.3, -2.0), (0.0, -4.0), (1.2, 0.5), (0.5, -7.0)]:
        p = V.discretized_gaussian_loglik(bins, torch.tensor(mean), torch.tensor(ls)).exp().sum()
        assert p.item() == pytest.approx(1.0, abs=1e-4), (mean, ls)


def test_iwae_k1_is_the_elbo_in_expectation_and_rises_with_k():
    torch.manual_seed(0)
    model = V.VAE(1, 8, 4, 28).eval()
    with torch.no_grad():
        model.encoder.head.bias[4:] = 3.0  # q(z|x) much wider than the posterior: a loose ELBO
        model.decoder.fc[0].weight *= 5  # and a decoder that depends on z
    x01 = torch.rand(3, 1, 28, 28).bernoulli()
    iw, el = V.iwae_bound(model, x01, 1000, "bernoulli")  # el: mean of 1000 single-draw ELBOs
    assert (iw >= el).all()  # Jensen, for the same draws
    R = 1000  # IWAE with K = 1, drawn R times per image (the images repeated in one batch)
    k1 = V.iwae_bound(model, x01.repeat(R, 1, 1, 1), 1, "bernoulli")[0].view(R, 3)
    mu, logvar = model.encoder(x01 * 2 - 1)
    with torch.no_grad():  # E_q log p(x|z) by Monte Carlo, minus the analytic KL (Eq. 10)
        z = V.reparameterize(mu.expand(R, 3, 4), logvar.expand(R, 3, 4)).flatten(0, 1)
        lpx = V.log_px(x01.repeat(R, 1, 1, 1), model.decoder(z), "bernoulli").view(R, 3)
    elbo = lpx.mean(0) - V.gaussian_kl(mu, logvar)
    se = ((k1.var(0) + lpx.var(0)) / R).sqrt()  # both sides are Monte Carlo estimates
    assert ((k1.mean(0) - elbo).abs() < 4 * se).all(), (k1.mean(0), elbo, se)
    draws = [
        V.iwae_bound(model, x01.repeat(r, 1, 1, 1), k, "bernoulli")[0].view(r, 3)
        for k, r in [(10, 200), (100, 20)]
    ]
    (m1, s1), (m10, s10), (m100, s100) = [
        (d.mean(0), d.std(0) / len(d) ** 0.5) for d in [k1, *draws]
    ]
    assert (m1 + 3 * (s1 + s10) < m10).all() and (m10 + 3 * (s10 + s100) < m100).all(), (
        m1,
        m10,
        m100,
    )


# -----------------------------------------------------------------------------
# the CLI contract
TINY = ["--tiny", "--batch-size", "16", "--log-every", "1", "--sample-every", "2"]


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
def test_cli_train_resume_exact_sample_and_nll(fake_mnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("vae.py", *TINY, "--data-dir", fake_mnist, "--out", a, "--steps", 4)
    run("vae.py", *TINY, "--data-dir", fake_mnist, "--out", b, "--steps", 2)
    p = run("vae.py", *TINY, "--data-dir", fake_mnist, "--out", b, "--steps", 4, "--resume")
    assert "from step 2" in p.stdout
    la, lb = logs(a), logs(b)
    assert (
        la[3] == {**lb[3], "t": la[3]["t"], "img_s": la[3]["img_s"]}
        and la[4]["loss"] == lb[4]["loss"]
    )
    assert all(la[s]["kl"] > 0 for s in la)  # the KL is logged as a positive number
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 4 and all(
        torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]
    )
    for f in (
        "samples_000002.png",
        "samples_000004.png",
        "reconstructions.png",
        "interpolation.png",
    ):
        assert (a / f).exists(), f
    run("vae.py", "--out", a, "--sample", 10, "--batch-size", 4)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (10, 28, 28, 1) and z["arr_0"].dtype == np.uint8 and "arr_1" not in z
    r = json.loads(
        run(
            "vae.py", "--out", a, "--nll", 20, "--nll-n", 6, "--data-dir", fake_mnist
        ).stdout.splitlines()[-1]
    )
    assert r["n"] == 6 and r["K"] == 20 and r["log_px_iwae"] >= r["elbo"]
    assert r["nll_bpd"] == pytest.approx(r["nll_nats"] / (784 * math.log(2)))
    # the discretized Gaussian decoder (the RGB default) trains and has a likelihood in bits/dim
    g = tmp_path / "gauss"
    run("vae.py", *TINY, "--data-dir", fake_mnist, "--out", g, "--steps 2 --likelihood gaussian")
    r = json.loads(
        run(
            "vae.py", "--out", g, "--nll", 4, "--nll-n", 2, "--data-dir", fake_mnist
        ).stdout.splitlines()[-1]
    )
    assert r["likelihood"] == "gaussian" and r["log_px_iwae"] >= r["elbo"] and r["nll_bpd"] > 0
    # the plain AE trains without a KL term
    run("vae.py", *TINY, "--data-dir", fake_mnist, "--out", tmp_path / "ae", "--steps", 2, "--ae")
    assert all(r["kl"] == 0 for r in logs(tmp_path / "ae").values())


@pytest.mark.slow
def test_cli_bad_input(fake_mnist, tmp_path):
    out = tmp_path / "run"
    cli = lambda *a: run("vae.py", "--out", out, *a, check=False)
    data = ["--data-dir", fake_mnist]
    assert_one_line_error(
        cli("--tiny", "--data-dir", tmp_path / "none", "--no-download"), "mnist not found in"
    )
    assert_one_line_error(cli("--sample", 4), "no checkpoint")
    assert_one_line_error(cli("--likelihood", "poisson"), "--likelihood")
    assert_one_line_error(cli("--ae", "--nll", 10), "--nll needs a VAE")
    assert_one_line_error(cli("--tiny", *data, "--image-size", 30), "image size 30")
    run("vae.py", *TINY, *data, "--out", out, "--steps", 1)
    assert_one_line_error(cli(*data, "--steps", 2, "--resume"), "does not fit")  # not --tiny
    torch.save({"step": 1, "model": {}}, out / "ckpt.pt")  # loads, but is not this script's
    assert_one_line_error(cli("--sample", 4), "not a vae.py checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_one_line_error(cli("--sample", 4), "corrupted")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "MNIST").exists(), reason="needs ../shared/data")
def test_learns_on_real_digits(tmp_path):
    """150 --tiny steps on real MNIST bring the negative ELBO far below its starting value."""
    run(
        "vae.py",
        "--tiny --data-dir",
        SHARED_DATA,
        "--out",
        tmp_path,
        "--steps 150 --batch-size 64 --log-every 25 --sample-every 0",
    )
    ls = {s: r["loss"] for s, r in logs(tmp_path).items()}
    assert ls[25] > 250 and ls[150] < 0.6 * ls[25], ls


@pytest.mark.slow
def test_compile_trains_and_checkpoints_without_prefix(fake_mnist, tmp_path):
    """--compile (common.wrap, shared by every script) runs the compiled module; the checkpoint
    holds the raw module's names. On the VAE: the smallest graph, the cheapest cold compile."""
    run(
        "vae.py",
        *TINY,
        "--sample-every 0 --data-dir",
        fake_mnist,
        "--out",
        tmp_path,
        "--steps 2 --compile",
        timeout=600,
    )
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and not any("_orig_mod" in k for k in ck["model"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z", [-9, -6, 0, 6, 9])
def test_discretized_gaussian_bin_mass_is_exact_in_the_tails(z, dtype):
    """A pixel z standard deviations from the decoder's mean scores its true log-mass; the old
    ndtr(hi) - ndtr(lo) gave log(1e-12) = -27.6 at 9 sd in float32, with no gradient."""
    from test_ddpm_ddim import log_bin_reference

    sigma = 0.125  # a power of two: mean = x - z sigma is exact in float32
    x = torch.full((1,), 0.5, dtype=dtype)
    log_scale = torch.full_like(x, math.log(sigma), requires_grad=True)
    got = V.discretized_gaussian_loglik(x, x - z * sigma, log_scale)
    assert got.item() == pytest.approx(log_bin_reference(z, (0.5 / 255) / sigma), abs=1e-4)
    got.sum().backward()
    assert log_scale.grad.abs().item() > 0 and log_scale.grad.isfinite().all()
