"""vae.py: the KL, the reparameterization and the IWAE bound against closed forms, then the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_dies, assert_one_line_error, run

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
# PPCA (Tipping & Bishop 1999) and the linear VAE that reaches it
f64 = torch.float64


def ppca_data(n, D=6, k=2, seed=0):
    """n draws of a known PPCA model (distinct column scales, sigma 0.5, mean 1) and its C."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, k, generator=g, dtype=f64) * torch.linspace(3, 1.5, k, dtype=f64)
    x = torch.randn(n, k, generator=g, dtype=f64) @ W.T + 1.0
    x += 0.5 * torch.randn(n, D, generator=g, dtype=f64)
    return x, W @ W.T + 0.25 * torch.eye(D, dtype=f64)


def test_ppca_closed_form_is_the_maximum_likelihood():
    """Eqs. 7-8 are a maximum: the exact log-likelihood's gradient in W, mu and sigma^2 vanishes
    there (to float64 precision), and random perturbations of the three lower it."""
    x = ppca_data(500)[0]
    m = V.PPCA(6, 2).fit(x)
    W, mu, s2 = (t.clone().requires_grad_() for t in (m.W, m.mu, m.sigma2))

    def ll_at(W, mu, s2):
        m.W, m.mu, m.sigma2 = W, mu, s2  # the buffers may hold tensors that need grad
        return m.log_prob(x).mean()

    ll = ll_at(W, mu, s2)
    ll.backward()
    for t in (W, mu, s2):
        assert t.grad.abs().max() < 1e-9, t.grad
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            d = [1e-3 * torch.randn(t.shape, generator=g, dtype=f64) for t in (W, mu, s2)]
            assert ll_at(W + d[0], mu + d[1], s2 + d[2].abs()) < ll
        assert ll_at(W, mu, s2 * 1.01) < ll and ll_at(W, mu, s2 * 0.99) < ll  # sigma^2 alone
        assert ll_at(1.01 * W, mu, s2) < ll and ll_at(0.99 * W, mu, s2) < ll  # W's scale alone


def test_ppca_log_prob_is_the_multivariate_normal_on_held_out_points():
    x, _ = ppca_data(400, D=7, k=3)
    m = V.PPCA(7, 3).fit(x[:300])
    C = m.W @ m.W.T + m.sigma2 * torch.eye(7, dtype=f64)
    ref = torch.distributions.MultivariateNormal(m.mu, C).log_prob(x[300:])
    assert torch.allclose(m.log_prob(x[300:]), ref, rtol=0, atol=1e-10)


def test_ppca_posterior_is_gaussian_conditioning():
    """(z, x) is jointly Gaussian with Cov(z, x) = W^T and Cov(x) = C, so
    E[z|x] = W^T C^-1 (x - mu) and Cov[z|x] = I - W^T C^-1 W; Eq. 6 must equal both, for any W."""
    g = torch.Generator().manual_seed(2)
    m = V.PPCA(5, 2)
    m.W.copy_(torch.randn(5, 2, generator=g, dtype=f64))  # not orthogonal columns: the general case
    m.mu.copy_(torch.randn(5, generator=g, dtype=f64))
    m.sigma2.fill_(0.3)
    x = torch.randn(8, 5, generator=g, dtype=f64)
    C = m.W @ m.W.T + 0.3 * torch.eye(5, dtype=f64)
    mean, cov = m.posterior(x)
    assert torch.allclose(mean, (m.W.T @ torch.linalg.solve(C, (x - m.mu).T)).T, atol=1e-12)
    assert torch.allclose(cov, torch.eye(2, dtype=f64) - m.W.T @ torch.linalg.solve(C, m.W))


def test_ppca_fit_converges_to_the_true_covariance():
    errs = []
    for n in (300, 3000, 30000):
        x, C = ppca_data(n, D=10, k=3, seed=3)
        m = V.PPCA(10, 3).fit(x)
        C_hat = m.W @ m.W.T + m.sigma2 * torch.eye(10, dtype=f64)
        errs.append(((C_hat - C).norm() / C.norm()).item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02, errs


def test_linear_vae_elbo_reaches_the_ppca_likelihood():
    """Lucas et al. 2019: a VAE with linear decoder N(W z + mu, sigma^2 I) and linear Gaussian
    encoder q(z|x) = N(A x + b, diag(v)) has the PPCA maximum likelihood as its ELBO optimum, and
    the ELBO is tight there (the true posterior, Eq. 6, is in q's family). Trained by the exact
    (analytic) ELBO with L-BFGS, it ends within 1e-6 nats of the closed-form log-likelihood, below
    it, and its C = W W^T + sigma^2 I matches PPCA's."""
    torch.manual_seed(0)
    x, _ = ppca_data(2000)
    D, k = 6, 2
    ppca = V.PPCA(D, k).fit(x)
    target = ppca.log_prob(x).mean().item()
    W, A = ((0.1 * torch.randn(s, dtype=f64)).requires_grad_() for s in ((D, k), (k, D)))
    b, log_v, mu = (torch.zeros(n, dtype=f64, requires_grad=True) for n in (k, k, D))
    log_s2 = torch.zeros((), dtype=f64, requires_grad=True)

    def elbo():
        m, v, s2 = x @ A.T + b, log_v.exp(), log_s2.exp()  # q's mean (N, k), variances (k,)
        sq = (x - m @ W.T - mu).pow(2).sum(1) + (W.pow(2) * v).sum()  # E_q |x - W z - mu|^2
        rec = -0.5 * (D * torch.log(2 * math.pi * s2) + sq / s2)  # E_q log p(x|z)
        return (rec - V.gaussian_kl(m, log_v.expand_as(m))).mean()

    opt = torch.optim.LBFGS(
        [W, A, b, log_v, mu, log_s2],
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -elbo()
        loss.backward()
        return loss

    opt.step(closure)  # full batch, deterministic: quasi-Newton reaches the optimum in ~1 s
    final = elbo().item()
    assert target - 1e-6 < final <= target + 1e-9, (final, target)
    eye = torch.eye(D, dtype=f64)
    C, C_ppca = W @ W.T + log_s2.exp() * eye, ppca.W @ ppca.W.T + ppca.sigma2 * eye
    assert torch.allclose(C.detach(), C_ppca, atol=0.02 * C_ppca.abs().max().item())


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
def test_cli_ppca_fit_sample_nll_and_rebuild(fake_mnist, tmp_path, capsys):
    """--ppca: no steps; the checkpoint rebuilds PPCA from model_args alone; --nll gives the
    bits/dim the fit printed (the same seeded dequantization), --sample the decoder means."""
    out = tmp_path / "ppca"
    p = run("vae.py", "--ppca", "--z-dim", 5, "--data-dir", fake_mnist, "--out", out)
    bits = float(p.stdout.split("test ")[1].split(" bits/dim")[0])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["ppca"] == dict(dim=784, k=5, shape=[1, 28, 28]) and ck["step"] == 0
    m = V.PPCA(**ck["model_args"]["ppca"])
    m.load_state_dict(ck["model"])
    assert m.W.shape == (784, 5) and m.sigma2 > 0 and 0 < bits < 8
    assert (out / "reconstructions.png").exists() and (out / "interpolation.png").exists()
    cfg = lambda **k: V.Config(out=str(out), device="cpu", **k)  # in-process: no 2 s imports
    capsys.readouterr()
    V.nll(cfg(nll=1))  # no data flag: the run's, from the checkpoint
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["exact"] and r["n"] == 64 and r["nll_bpd"] == pytest.approx(bits, abs=1e-4)
    V.sample(cfg(sample=6))
    z = np.load(out / "samples.npz")["arr_0"]
    assert z.shape == (6, 28, 28, 1) and z.dtype == np.uint8 and z.std() > 0
    assert_one_line_error(run("vae.py", "--ppca", "--ae", check=False), "--ppca")
    big = cfg(ppca=True, z_dim=784, data_dir=str(fake_mnist))
    assert_dies(capsys, lambda: V.fit_ppca(big), "0 < k < D")


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
def test_learns_on_real_digits(tmp_path):
    """150 --tiny steps on real MNIST bring the negative ELBO far below its starting value."""
    run(
        "vae.py",
        "--tiny --dataset mnist-12k",
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
