"""ddpm_ddim.py: the math against closed forms, then the CLI contract, DDP, and learning."""

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run, torchrun

import ddpm_ddim as D

# -----------------------------------------------------------------------------
# forward process


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_marginal_equals_composed_single_steps(kind):
    """q(x_t|x_0) = N(sqrt(ab_t) x0, 1 - ab_t) must equal T single steps
    x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) z."""
    s = D.make_schedule(1000, kind, dtype=torch.float64)
    mean, var = 1.0, 0.0  # moments of x_t given x_0 = 1, propagated one step at a time
    for t in range(1000):
        a = 1 - s["betas"][t].item()
        mean, var = math.sqrt(a) * mean, a * var + (1 - a)
        assert abs(mean - s["alpha_bar"][t].sqrt().item()) < 1e-5
        assert abs(var - (1 - s["alpha_bar"][t].item())) < 1e-5
    # and q_sample draws from it: Monte Carlo moments at a middle step
    torch.manual_seed(0)
    x0, t = torch.full((200000,), 0.7, dtype=torch.float64), torch.full((200000,), 400)
    xt = D.q_sample(s, x0, t, torch.randn_like(x0))
    ab = s["alpha_bar"][400]
    assert abs(xt.mean() - ab.sqrt() * 0.7) < 0.01 and abs(xt.var() - (1 - ab)) < 0.01


def test_linear_schedule_endpoints_and_cosine_closed_form():
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    assert s["betas"][0].item() == pytest.approx(1e-4) and s["betas"][-1].item() == pytest.approx(
        0.02
    )
    c = D.make_schedule(1000, "cosine", dtype=torch.float64)
    f = lambda t: (
        math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    )  # Nichol & Dhariwal Eq. 17
    for t in (0, 100, 500, 900):
        assert c["alpha_bar"][t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_posterior_matches_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): derived independently, against
    Eq. 6-7."""
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    x0, xt = (
        torch.tensor([0.3, -0.8], dtype=torch.float64),
        torch.tensor([1.1, 0.2], dtype=torch.float64),
    )
    for t in (1, 10, 500, 999):
        a, ab_prev = 1 - s["betas"][t], s["alpha_bar"][t - 1]
        prec = a / (1 - a) + 1 / (1 - ab_prev)  # precisions add
        mean = (a.sqrt() / (1 - a) * xt + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
        m, v = D.q_posterior(s, x0.double(), xt.double(), torch.tensor([t, t]))
        assert torch.allclose(m, mean, atol=1e-10) and torch.allclose(
            v.flatten(), 1 / prec, rtol=1e-10
        )


# -----------------------------------------------------------------------------
# samplers against an analytic target: data x0 ~ N(m, s^2) per dimension
M, S = 0.3, 0.25


def optimal_eps(sched):
    """E[eps | x_t] for Gaussian data: the best possible eps-predictor, in closed form."""

    def f(xt, t):
        ab = D.at(sched["alpha_bar"], t, xt)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * M) / (ab * S**2 + 1 - ab)

    return f


@pytest.mark.parametrize("var", ["large", "small"])
def test_ddpm_1000_steps_reaches_gaussian_target(var):
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    x = D.ddpm_sample(optimal_eps(s), s, x_T, var, clip=False, generator=g)
    assert abs(x.mean().item() - M) < 0.01 and abs(x.var().item() / S**2 - 1) < 0.04


def ddim_moments(s, steps, eta):
    """Exact output mean and variance of DDIM for Gaussian data: with the optimal eps every step is
    linear-Gaussian in u = x_t - sqrt(ab_t) M, u' = k u + sigma z (derived here from Eq. 12)."""
    ab = s["alpha_bar"].tolist()
    ts = torch.linspace(0, len(ab) - 1, steps).round().long().tolist()
    mu, var = -math.sqrt(ab[-1]) * M, 1.0  # x_T ~ N(0, 1)
    for t, tp in zip(reversed(ts), reversed([-1] + ts[:-1])):
        a, ap = ab[t], ab[tp] if tp >= 0 else 1.0
        sig2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        k = (math.sqrt(ap * a) * S**2 + math.sqrt(max(1 - ap - sig2, 0) * (1 - a))) / (
            a * S**2 + 1 - a
        )
        mu, var = k * mu, k * k * var + sig2
    return M + mu, var


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_its_closed_form_and_converges_to_target(eta):
    """DDIM-50 samples have the closed-form moments of the discretised chain. With uniform spacing
    those are biased low (first-order steps under-disperse: variance ratio ~0.83 at eta 0, ~0.67 at
    eta 1 for this target), and the bias vanishes as K -> T."""
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    x = D.ddim_sample(optimal_eps(s), s, x_T, 50, eta, clip=False, generator=g)
    mean, var = ddim_moments(s, 50, eta)
    assert abs(x.mean().item() - mean) < 0.01 and abs(x.var().item() / var - 1) < 0.04
    errs = [abs(ddim_moments(s, k, eta)[1] / S**2 - 1) for k in (50, 200, 1000)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.03, errs  # converges to the data variance
    x = D.ddim_sample(optimal_eps(s), s, x_T, 1000, eta, clip=False, generator=g)
    assert abs(x.mean().item() - M) < 0.01 and abs(x.var().item() / S**2 - 1) < 0.04


def test_samplers_fail_with_a_wrong_model():
    """The target tests can fail: a predictor that is off by 10% misses the moments."""
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    wrong = lambda xt, t: optimal_eps(s)(xt, t) * 0.9
    x = D.ddim_sample(
        wrong, s, torch.randn(20000, 1, 1, 1, dtype=torch.float64), 1000, 0.0, clip=False
    )
    assert abs(x.var().item() / S**2 - 1) > 0.1


def test_ddim_eta0_deterministic_and_eta1_full_steps_is_ddpm():
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    eps = optimal_eps(s)
    x_T = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    a = D.ddim_sample(eps, s, x_T, 50, 0.0, generator=torch.Generator().manual_seed(1))
    b = D.ddim_sample(eps, s, x_T, 50, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # with every step and eta = 1, a DDIM step is DDPM's step with sigma^2 = beta-tilde (posterior)
    xt = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    z = torch.randn_like(xt)
    for t in (999, 500, 10, 1):
        tt = torch.full((64,), t)
        for clip in (False, True):
            mean, _ = D.p_mean_logvar(eps, s, xt, tt, "small", clip)
            ddpm = mean + s["post_var"][t].sqrt() * z
            ddim = D.ddim_step(s, eps(xt, tt), xt, t, t - 1, 1.0, clip, z)
            assert torch.allclose(ddim, ddpm, atol=1e-10), (t, clip)
    # ... and it differs at eta = 0 (the test can fail)
    assert not torch.allclose(D.ddim_step(s, eps(xt, tt), xt, 1, 0, 0.0, False, z), ddpm, atol=1e-3)


# -----------------------------------------------------------------------------
# the variational bound


def test_discretized_gaussian_is_a_distribution_over_256_bins():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, logvar in ((0.1, -3.0), (0.95, -8.0), (-1.0, -1.0)):
        lp = D.discretized_gaussian_loglik(grid, torch.tensor(mean), torch.tensor(logvar))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def log_bin_reference(z: float, h: float) -> float:
    """log of the N(0, 1) mass on [z - h, z + h], by the trapezoid rule in float64 and in log
    space: independent of erf, log_ndtr and any cancellation."""
    u = torch.linspace(z - h, z + h, 20001, dtype=torch.float64)
    w = torch.full_like(u, 2 * h / 20000)
    w[[0, -1]] /= 2
    return torch.logsumexp(-0.5 * u**2 - 0.5 * math.log(2 * math.pi) + w.log(), 0).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z", [-9, -6, 0, 6, 9])
def test_discretized_gaussian_bin_mass_is_exact_in_the_tails(z, dtype):
    """A pixel z standard deviations from the mean: the true log-mass (9 sd: -38.9 nats), where
    ndtr(hi) - ndtr(lo) cancels to 0 in float32 at 6 sd and in float64 at 9 sd."""
    sigma = 0.125  # a power of two: mean = x - z sigma is exact in float32
    x = torch.zeros(1, dtype=dtype)
    got = D.discretized_gaussian_loglik(x, x - z * sigma, torch.full_like(x, 2 * math.log(sigma)))
    want = log_bin_reference(z, (1 / 255) / sigma)
    assert got.item() == pytest.approx(want, abs=1e-4), (got.item(), want)


def ddim_step_reference(s64, eps, xt, t, t_prev, eta, noise):
    """Song et al. Eq. 12 as written, in float64, x0_hat clipped to [-1, 1] and eps re-derived."""
    ab, abp = s64["alpha_bar"][t], s64["alpha_bar"][t_prev] if t_prev >= 0 else torch.tensor(1.0)
    x0 = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    sigma = eta * ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    return abp.sqrt() * x0 + (1 - abp - sigma**2).sqrt() * eps + sigma * noise


@pytest.mark.parametrize("t,t_prev", [(999, 888), (888, 777), (111, 0), (1, 0), (0, -1)])
def test_ddim_step_in_float32_matches_float64_at_both_ends_of_the_cosine_schedule(t, t_prev):
    """sqrt(1 - alpha_bar_prev - sigma^2) at eta = 1 cancels in float32 (t = 999: 2.44e-4 for
    2.78e-4); the step must not."""
    s32, s64 = (D.make_schedule(1000, "cosine", dtype=d) for d in (torch.float32, torch.float64))
    g = torch.Generator().manual_seed(0)
    xt, eps, noise = (torch.randn(2000, generator=g, dtype=torch.float64) for _ in range(3))
    want = ddim_step_reference(s64, eps, xt, t, t_prev, 1.0, noise)
    got = D.ddim_step(s32, eps.float(), xt.float(), t, t_prev, 1.0, noise=noise.float())
    err = ((got.double() - want).abs() / want.abs().clamp(min=1)).max().item()
    assert err < 2e-6, err


def test_ddim_trajectory_in_float32_follows_float64():
    """K = 10, eta = 1 on the cosine schedule: float32 ends where float64 ends."""
    s32, s64 = (D.make_schedule(1000, "cosine", dtype=d) for d in (torch.float32, torch.float64))
    eps_model = lambda x, t: 0.9 * x + 0.1 * torch.sin(3 * x)
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    run = lambda s, x: D.ddim_sample(
        eps_model, s, x, 10, 1.0, generator=torch.Generator().manual_seed(2)
    )
    x64, x32 = run(s64, x_T), run(s32, x_T.float())
    assert ((x32.double() - x64).norm() / x64.norm()).item() < 1e-5


@pytest.mark.parametrize("K,first", [(1, [999]), (2, [999, 0]), (3, [999, 500, 0])])
def test_ddim_starts_at_T_minus_1_for_every_K(K, first):
    """--sample-steps 1 once ran its one step from t = 0, returning the noise / sqrt(ab_0)."""
    seen = []

    def eps_model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    D.ddim_sample(eps_model, D.make_schedule(1000), torch.randn(2, 1, 4, 4), steps=K)
    assert seen == first


def test_normal_kl_closed_form():
    p = torch.distributions.Normal(torch.tensor(0.3), torch.tensor(0.5))
    q = torch.distributions.Normal(torch.tensor(-0.2), torch.tensor(1.3))
    kl = D.normal_kl(
        torch.tensor(0.3), torch.tensor(0.25).log(), torch.tensor(-0.2), torch.tensor(1.69).log()
    )
    assert kl.item() == pytest.approx(torch.distributions.kl_divergence(p, q).item(), rel=1e-6)


def test_nll_bound_above_and_close_to_exact_gaussian_likelihood():
    """Discretised N(M, S^2) data. With the optimal eps and the exact reverse variance
    Var(x_{t-1}|x_t) the model is the data distribution, so the bound equals the exact NLL
    (up to Monte Carlo noise); the fixed variances give looser bounds, 'small' the loosest."""
    s = D.make_schedule(1000, "linear", dtype=torch.float64)
    ab = s["alpha_bar"]
    exact_var = torch.log(
        s["post_var"] + s["post_c0"] ** 2 * S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
    )
    gaps = {}
    for var, reps in ((exact_var, 4), ("large", 1), ("small", 1)):
        for k in range(reps):
            g = torch.Generator().manual_seed(k)
            x0 = (torch.randn(128, 1, 8, 8, generator=g, dtype=torch.float64) * S + M + 1) * 127.5
            x0 = x0.round().clamp(0, 255) / 127.5 - 1  # 8-bit data in [-1, 1]
            exact = -D.discretized_gaussian_loglik(
                x0, torch.tensor(M), torch.tensor(2 * math.log(S))
            )
            bound = sum(D.vlb_terms(optimal_eps(s), s, x0, var=var, clip=False, generator=g))
            gap = D.bits_per_dim(bound - exact.flatten(1).sum(1), 64).mean().item() / reps
            gaps[var if isinstance(var, str) else "exact"] = (
                gaps.get(var if isinstance(var, str) else "exact", 0) + gap
            )
    assert abs(gaps["exact"]) < 0.015, gaps  # tight: the bound is the likelihood
    assert 0.05 < gaps["large"] < 0.2 and gaps["small"] > gaps["large"], gaps


# -----------------------------------------------------------------------------
# the U-Net


@pytest.mark.parametrize("size,ch", [(28, 1), (32, 3), (64, 3)])
def test_unet_shapes_and_time_dependence(size, ch):
    torch.manual_seed(0)
    m = D.UNet(**D.model_args(D.Config(tiny=True), ch, size)["unet"])
    for p in m.parameters():  # zero-initialised convs (block outputs, head) would hide t at init
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, ch, size, size)
    a, b = m(x, torch.tensor([0, 0])), m(x, torch.tensor([500, 500]))
    assert a.shape == x.shape and not torch.allclose(
        a, b
    )  # minDiffusion's bug: the model ignored t


def test_unet_matches_paper_size():
    build = lambda cfg, ch, size: D.UNet(**D.model_args(cfg, ch, size)["unet"])
    n = sum(p.numel() for p in build(D.Config(), 3, 32).parameters())
    assert abs(n / 1e6 - 35.7) < 0.1  # Ho et al. report 35.7M for the CIFAR-10 model
    assert sum(p.numel() for p in build(D.Config(tiny=True), 1, 28).parameters()) < 1e6


# -----------------------------------------------------------------------------
# the CLI contract
TINY = ["--tiny", "--batch-size", "16", "--log-every", "1", "--sample-every", "0"]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
def test_cli_train_resume_exact_and_sample(fake_mnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = [*TINY, "--data-dir", fake_mnist, "--T", 100]  # T = 100 keeps --nll and DDPM quick
    run("ddpm_ddim.py", *base, "--out", a, "--steps", 4, "--sample-every", 2)
    run("ddpm_ddim.py", *base, "--out", b, "--steps", 2)
    p = run("ddpm_ddim.py", *base, "--out", b, "--steps", 4, "--resume")
    assert "from step 2" in p.stdout
    la, lb = losses(a), losses(b)
    assert la[3] == lb[3] and la[4] == lb[4]  # the steps after resume are the same, bit for bit
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 4 and ca["data"] == cb["data"]
    for k in ("model", "ema"):
        assert all(torch.equal(ca[k][n], cb[k][n]) for n in ca[k])
    sa, sb = ca["opt"]["state"], cb["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert (a / "samples_000002.png").exists() and (a / "samples_000004.png").exists()
    run("ddpm_ddim.py", "--out", a, "--sample", 16, "--batch-size", 10, "--sample-steps", 5)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (16, 28, 28, 1) and z["arr_0"].dtype == np.uint8 and "arr_1" not in z
    assert (a / "samples.png").exists()
    run("ddpm_ddim.py", "--out", a, "--sample", 2, "--sampler", "ddpm", "--T", 1000)
    assert np.load(a / "samples.npz")["arr_0"].shape == (2, 28, 28, 1)
    p = run("ddpm_ddim.py", "--out", a, "--nll", 3, "--data-dir", fake_mnist)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert (
        r["n"] == 3
        and r["bpd"] == pytest.approx(r["L_T"] + r["L_1..T-1"] + r["L_0"])
        and r["bpd"] > 0
    )


def test_cli_folder_dataset_from_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    out = tmp_path / "run"
    run(
        "ddpm_ddim.py",
        *TINY,
        "--dataset",
        f"folder:{tmp_path / 'imgs'}",
        "--image-size 32 --batch-size 4 --steps 2 --out",
        out,
    )
    unet = torch.load(out / "ckpt.pt", weights_only=True)["model_args"]["unet"]
    assert (unet["in_ch"], unet["image_size"]) == (3, 32)


@pytest.mark.slow
def test_cli_bad_input(fake_mnist, tmp_path):
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    cli = lambda *a: run("ddpm_ddim.py", "--out", out, *a, check=False)
    data = ["--data-dir", fake_mnist]
    assert_one_line_error(cli("--tiny", "--data-dir", empty, "--no-download"), "mnist not found in")
    assert_one_line_error(cli("--sample", 4), "no checkpoint")
    assert_one_line_error(cli("--dataset", "imagenet21k"), "unknown dataset")
    assert_one_line_error(cli("--tiny", *data, "--image-size", 30), "image size 30")
    assert_one_line_error(cli("--sampler", "euler"), "--sampler")
    assert_one_line_error(cli("--sample", -5), "--sample -5")
    assert_one_line_error(cli("--sample-steps", 0), "--sample-steps 0")
    run("ddpm_ddim.py", *TINY, *data, "--out", out, "--steps", 1)
    # resuming with other model flags is a mismatch, not a crash
    assert_one_line_error(cli("--batch-size", 16, *data, "--steps", 2, "--resume"), "does not fit")
    ck = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(ck[: len(ck) // 2])  # truncated
    assert_one_line_error(cli("--sample", 4), "corrupted")
    assert_one_line_error(cli(*TINY, *data, "--steps", 3, "--resume"), "corrupted")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys):
    real = D.p_losses
    calls = []

    def poisoned(*a, **k):  # step 3 onwards returns nan
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(D, "p_losses", poisoned)
    cfg = D.Config(
        tiny=True,
        data_dir=str(fake_mnist),
        out=str(tmp_path),
        steps=10,
        batch_size=8,
        log_every=5,
        ckpt_every=2,
        sample_every=0,
    )
    with pytest.raises(SystemExit) as e:
        D.train(cfg)
    assert e.value.code == 1 and "not finite" in capsys.readouterr().err
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and all(v.isfinite().all() for v in ck["model"].values())


def test_sigterm_saves_at_a_step_boundary_and_exits_zero(fake_mnist, tmp_path):
    args = [
        sys.executable,
        str(ROOT / "ddpm_ddim.py"),
        *TINY,
        "--data-dir",
        str(fake_mnist),
        "--out",
        str(tmp_path),
        "--steps",
        "100000",
        "--ckpt-every",
        "0",
    ]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in p.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    last_logged = max(losses(tmp_path))
    assert 3 <= ck["step"] <= last_logged + 1 and ck["step"] < 100000


@pytest.mark.slow
def test_ddp_two_gloo_ranks_stay_identical(fake_mnist, tmp_path):
    out = tmp_path / "run"
    p = torchrun(
        "ddpm_ddim", *TINY, "--steps 3 --ckpt-every 2 --data-dir", fake_mnist, "--out", out
    )
    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # replicas bit-identical after 3 steps
    assert sorted(x.name for x in out.iterdir()) == ["ckpt.pt", "log.jsonl", "rank0.pt", "rank1.pt"]
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == [1, 2, 3]  # one writer
    assert p.stdout.count("step 3/3") == 1
    # the two ranks trained on different halves of each batch with different noise: weights moved
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert len(ck["rng"]) == 2 and ck["rng"][0]["torch"] != ck["rng"][1]["torch"]


@pytest.mark.slow
def test_learns_on_real_digits(tmp_path):
    """A few hundred --tiny steps on real MNIST bring L_simple far below its starting value."""
    run(
        "ddpm_ddim.py",
        "--tiny --dataset mnist-12k",
        "--out",
        tmp_path,
        "--steps 200 --batch-size 32 --lr 1e-3 --log-every 25 --sample-every 0",
        timeout=600,
    )
    ls = losses(tmp_path)
    assert ls[25] > 0.3 and ls[200] < 0.35 * ls[25], ls
