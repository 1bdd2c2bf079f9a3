"""progan.py: equalised learning rate, PixelNorm, minibatch stddev, the WGAN-GP + drift loss,
fade-in of G, D and the reals, the schedule, StyleGAN's mapping / truncation / noise, then the
CLI: exact resume mid-fade, sampling, bad input, DDP, learning."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_dies, assert_one_line_error, run, stop_after, torchrun

import progan as P

SMALL = dict(size=16, img_ch=1, fmap_base=64, fmap_max=16)  # channels 16 at every resolution
FLAGS = "--tiny --image-size 16 --phase-kimg 0.048 --batch-sizes 4:8,8:8,16:8 --sample-every 0"
FLAGS += " --ema-kimg 0.05"  # an EMA that follows these 240 images (half-life: 50)


def adam_step(module, loss_fn, lr=1e-3):
    """One Adam step (the paper's betas) on loss_fn(module); returns the parameters before."""
    before = [p.detach().clone() for p in module.parameters()]
    opt = torch.optim.Adam(module.parameters(), lr, betas=(0.0, 0.99), eps=1e-8)
    loss_fn(module).backward()
    opt.step()
    return before


def test_equalized_lr_he_scale_gradients_and_equal_adam_rates():
    torch.manual_seed(0)
    for cin in (1, 8, 64):
        conv = P.EqualizedConv2d(cin, 256, 3)
        he = math.sqrt(2 / (cin * 9))  # He's std for fan_in = cin k^2
        w_eff = conv.weight * conv.c
        assert w_eff.std().item() == pytest.approx(
            he, rel=0.05
        )  # stored N(0, 1), scaled at run time
        assert conv.weight.std().item() == pytest.approx(1.0, rel=0.05)

        # the stored weight's gradient is c times the effective weight's
        x = torch.randn(2, cin, 6, 6)
        w = w_eff.detach().requires_grad_(True)
        F.conv2d(x, w, conv.bias, padding=1).square().sum().backward()
        conv(x).square().sum().backward()
        assert torch.allclose(conv.weight.grad, conv.c * w.grad, rtol=1e-5, atol=1e-7)

        # one Adam step moves every layer's effective weights by lr in units of its He std
        conv.weight.grad = None
        before = adam_step(conv, lambda m, x=x: m(x).square().sum())[0]
        moved = ((conv.weight - before) * conv.c).abs().mean().item() / he
        assert moved == pytest.approx(1e-3, rel=1e-3)
        plain = nn.Conv2d(cin, 256, 3, padding=1)  # without: the rate is lr / std, fan-in bound
        w0 = adam_step(plain, lambda m, x=x: m(x).square().sum())[0]
        assert (plain.weight - w0).abs().mean().item() / he != pytest.approx(1e-3, rel=0.1)


def test_mapping_layers_learn_100x_slower():
    """StyleGAN's mapping: lr_mul 0.01 -> the same effective init, and an Adam step changes the
    effective weights and biases 0.01x as much as a plain equalised layer's."""
    torch.manual_seed(0)
    slow, fast = P.EqualizedLinear(64, 64, lr_mul=0.01), P.EqualizedLinear(64, 64)
    assert (slow.weight * slow.c).std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    x = torch.randn(8, 64)
    moves = []
    for layer in (slow, fast):
        w0, b0 = adam_step(layer, lambda m: m(x).sin().sum())
        dw = ((layer.weight - w0) * layer.c).abs().mean()  # effective weight change
        db = ((layer.bias - b0) * layer.lr_mul).abs().mean()  # effective bias change
        moves.append((dw.item(), db.item()))
    assert moves[0][0] / moves[1][0] == pytest.approx(0.01, rel=1e-3)
    assert moves[0][1] / moves[1][1] == pytest.approx(0.01, rel=1e-3)


def test_pixel_norm_and_minibatch_stddev_by_hand():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4) * 7
    assert torch.allclose(P.pixel_norm(x).square().mean(1), torch.ones(3, 4, 4), atol=1e-5)
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    y = P.minibatch_stddev(x, group=4)
    assert y.shape == (8, 4, 2, 2) and torch.equal(y[:, :3], x)
    a = x.numpy()
    for m in range(2):  # 8 samples, groups of 4: sample g M + m (M = 2) is in group m
        members = a[m::2]  # (4, 3, 2, 2)
        want = np.sqrt(members.var(0, ddof=0) + 1e-8).mean()  # biased variance
        for b in range(m, 8, 2):
            assert np.allclose(y[b, 3].numpy(), want, rtol=1e-12)
    assert not np.allclose(y[0, 3], np.sqrt(a[0::2].var(0, ddof=1) + 1e-8).mean())


class LinearCritic(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w, self.b = (
            nn.Parameter(torch.randn(n, dtype=torch.float64)),
            nn.Parameter(torch.tensor(0.3, dtype=torch.float64)),
        )

    def forward(self, x, alpha=1.0):
        return x.flatten(1) @ self.w + self.b


def test_critic_loss_terms_on_a_linear_critic():
    """D(x) = w.x + b: the penalty is (|w| - 1)^2 for any x_hat, the drift E D(x)^2, and the
    bias gradient of the loss is the drift's alone: eps 2 E D(x)."""
    torch.manual_seed(0)
    D = LinearCritic(16)
    real, fake = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4).double()
    with torch.no_grad():
        r, f = D(real), D(fake)
    w, b = D.w.detach().clone(), D.b.item()
    s = P.d_step(D, torch.optim.SGD(D.parameters(), lr=1.0), real, fake, 1.0, 10.0, 1e-3)
    assert s["gp"].item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-6)  # float32
    assert s["drift"].item() == pytest.approx(r.square().mean().item(), rel=1e-6)
    assert s["w_dist"].item() == pytest.approx((r.mean() - f.mean()).item(), rel=1e-6)
    assert D.b.item() == pytest.approx(b - 1e-3 * 2 * r.mean().item(), rel=1e-6)


def test_r1_on_a_linear_critic_and_its_lazy_weight():
    """D(x) = w.x + b: grad_x D = w for every x, so R1 = |w|^2 exactly; the D step's update with
    gamma differs from the one without by lr gamma w (gamma / 2 |w|^2 differentiated), and the
    lazy form, gamma times the interval 16, by 16 times that."""
    torch.manual_seed(0)
    real, fake = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4).double()
    D = LinearCritic(16)
    x = real.clone().requires_grad_(True)
    assert P.r1_penalty(D(x), x).item() == pytest.approx(D.w.norm().item() ** 2, rel=1e-6)
    # the step's scores are float32 (as under autocast): agreement to float32's precision
    w0, moved = D.w.detach().clone(), {}
    for gamma in (0.0, 10.0, 160.0):
        D.w.data.copy_(w0)
        s = P.d_step_logistic(D, torch.optim.SGD(D.parameters(), lr=0.01), real, fake, 1.0, gamma)
        moved[gamma] = D.w.detach() - w0
        want = w0.norm().item() ** 2 if gamma else 0.0
        assert s["r1"].item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(moved[10.0] - moved[0.0], -0.01 * 10.0 * w0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved[160.0] - moved[0.0], -0.01 * 160 * w0, rtol=1e-4, atol=1e-5)


def test_ema_half_life_in_images_across_a_batch_change():
    """After k images the old weights' share is 0.5^(k / half-life), whatever batches made k."""
    m = nn.Linear(1, 1, bias=False)
    m.weight.data.fill_(1.0)
    ema = P.common.EMA(m)
    m.weight.data.fill_(0.0)  # from now on the EMA only forgets the old weight
    for step, batch in enumerate([64] * 50 + [16] * 200 + [32] * 25):  # 3,200 + 3,200 + 800
        ema.update(m, step, P.ema_decay(batch, ema_kimg=10))
    assert ema.module.weight.item() == pytest.approx(0.5 ** (7200 / 10000), rel=1e-5)  # float32
    assert P.ema_decay(64, 0) == 0.0  # --ema-kimg 0: the EMA is G itself


def test_brightness_is_the_last_style_under_adain_and_not_under_demodulation():
    """Instance norm gives every channel of the last layer the spatial mean y_b of that layer's
    style, so the image's mean is the last style's alone: other styles on the layers before
    change the image, not its mean. Demodulation normalises weights, not activations (unit norm
    per sample and output channel), and the same swap moves the mean."""
    torch.manual_seed(0)
    s = torch.rand(3, 5) + 0.5
    wt = P.demodulate(torch.randn(4, 5, 3, 3), s)
    assert wt.shape == (3, 4, 5, 3, 3)
    torch.testing.assert_close(wt.pow(2).sum((2, 3, 4)), torch.ones(3, 4))
    means = {}
    for demod in (False, True):
        torch.manual_seed(1)
        G = P.StyleGenerator(z_dim=16, n_mlp=2, demod=demod, **SMALL).eval()
        with torch.no_grad():
            for p in G.parameters():  # every weight random (noise scales and toRGB included)
                p.add_(torch.randn_like(p) * 0.3)
            w, w2 = G.map(torch.randn(2, 16)), G.map(torch.randn(2, 16))
            noise = G.noise(2, 16)
            a = G.synthesis([w] * 6, 16, 1.0, noise)
            b = G.synthesis([w2] * 5 + [w], 16, 1.0, noise)  # all but the last style swapped
        assert not torch.allclose(a, b, atol=1e-3)
        means[demod] = (a.mean((1, 2, 3)), b.mean((1, 2, 3)))
    torch.testing.assert_close(*means[False], atol=1e-5, rtol=1e-5)
    assert (means[True][0] - means[True][1]).abs().min() > 1e-3


def test_demodulated_layers_keep_the_signal_through_depth():
    """Demodulation maps unit-variance inputs to unit-variance outputs and LReLU halves the mean
    square (to (1 + 0.2^2) / 2), so StyleGAN2 multiplies by sqrt(2) after it (bias_act's gain):
    one layer keeps E[x^2] near 1.04, not 0.52, and eight layers do not fade the content to
    their biases and noise (0.52^8 = 0.005)."""
    torch.manual_seed(0)
    x, w, zero = torch.randn(8, 64, 8, 8), torch.randn(8, 16), torch.zeros(8, 1, 8, 8)
    ms = []
    with torch.no_grad():
        for _ in range(8):
            x = P.StyleLayer(64, 64, 16, demod=True)(x, w, zero)
            ms.append(x.pow(2).mean().item())
    assert 0.85 < ms[0] < 1.25 and 0.3 < ms[-1] < 3, ms


def test_adam_restarts_at_every_fade_and_every_stable_phase():
    idx = lambda n: P.phase_index(n, 32, 1.0)  # 1,000 images a phase
    starts = [n for n in range(1, 12000) if idx(n) != idx(n - 1)]
    assert starts == [1000, 2000, 3000, 4000, 5000, 6000]  # 3 x (fade, stable), then none
    assert idx(0) == 0 and idx(6000) == idx(10**9) == 6


def test_fade_in_endpoints_and_real_blending():
    torch.manual_seed(0)
    G, D = P.Generator(z_dim=8, **SMALL), P.Discriminator(**SMALL)
    z = torch.randn(4, 8)
    with torch.no_grad():
        # G at alpha 0: the previous resolution's image, upsampled; at alpha 1: the new path alone
        assert torch.equal(G(z, 16, 0.0), P.upsample(G(z, 8, 1.0)))
        new = G(z, 16, 1.0)
        G.to_rgb[1].weight.add_(1.0)  # the old toRGB no longer matters
        assert torch.equal(G(z, 16, 1.0), new) and not torch.equal(G(z, 16, 0.5), new)
        # D at alpha 0: the previous D on the downsampled input; at alpha 1: the new path alone
        x = torch.randn(4, 1, 16, 16)
        assert torch.equal(D(x, 0.0), D(F.avg_pool2d(x, 2), 1.0))
        new = D(x, 1.0)
        D.from_rgb[1].weight.add_(1.0)
        assert torch.equal(D(x, 1.0), new) and not torch.equal(D(x, 0.5), new)
    for a in (0.0, 0.3, 1.0):  # the reals: alpha x + (1 - alpha) upsample(avgpool(x))
        want = a * x + (1 - a) * F.avg_pool2d(x, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
        assert torch.allclose(P.blend_reals(x, a), want, atol=1e-6)


def test_schedule_at_phase_boundaries():
    ph = lambda n: P.phase(n, 32, 1.0, {8: 32}, 16)[:3]  # 1,000 images a phase
    assert ph(0) == (4, 1.0, 16) and ph(999) == (4, 1.0, 16)  # stable at 4x4
    assert ph(1000) == (8, 0.0, 32) and ph(1999) == (8, 0.999, 32)  # fade into 8x8
    assert ph(2000) == (8, 1.0, 32) and ph(2999) == (8, 1.0, 32)  # stable at 8x8
    assert ph(3000) == (16, 0.0, 16) and ph(3500) == (16, 0.5, 16) and ph(4500)[1] == 1.0
    assert ph(5000) == (32, 0.0, 16) and ph(6000) == (32, 1.0, 16) and ph(10**7) == (32, 1.0, 16)
    seen = [ph(n) for n in range(0, 9000, 7)]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))  # the resolution never decreases
    assert all(0 <= a <= 1 for _, a, _ in seen)
    assert P.total_steps(32, 1.0, {}, 10) == 7 * 100  # 4 stable, then 3 x (fade, stable)


def test_style_truncation_and_noise():
    torch.manual_seed(0)
    G = P.StyleGenerator(z_dim=16, n_mlp=2, **SMALL).eval()
    G.w_avg.normal_()
    z = torch.randn(5, 16)
    w = G.map(z)
    assert torch.equal(G.truncate(w, 0.0), G.w_avg.expand(5, -1))  # psi 0: the mean w for all z
    assert G.truncate(w, 1.0) is w  # psi 1: nothing changes
    with torch.no_grad():
        a, b = G(z, 16, psi=0.0), G(z, 16, psi=0.0)  # noise scales are 0 at init: deterministic
        assert torch.equal(a, b) and torch.allclose(a, a[:1].expand_as(a), atol=1e-5)
        assert not torch.allclose(G(z, 16), a)
        G.blocks[0].l2.noise_scale.fill_(0.5)  # one layer's noise on: outputs vary call to call
        assert not torch.equal(G(z, 16), G(z, 16))
    before = G.w_avg.clone()
    with torch.no_grad():
        G(z, 8)  # eval mode: w_avg stays
        assert torch.equal(G.w_avg, before)
        G.train()
        G(z, 8)  # training mode tracks it: w_avg <- lerp(w_avg, mean w, 0.005)
    assert torch.allclose(G.w_avg, before + 0.005 * (w.mean(0) - before), atol=1e-6)
    mixed = G(z, 16, z2=torch.randn(5, 16), cutoff=3)
    assert mixed.shape == (5, 1, 16, 16)


def test_no_noise_holds_every_noise_scale_at_zero_through_training():
    """noise=False (--no-noise): Adam steps on a loss that rewards noise leave every scale at 0 and
    the image independent of the noise draw; noise=True: the same steps move the scales."""
    for noise in (True, False):
        torch.manual_seed(0)
        G = P.StyleGenerator(z_dim=16, n_mlp=2, demod=True, noise=noise, **SMALL)
        opt = torch.optim.Adam(G.parameters(), 1e-2)
        z = torch.randn(4, 16)
        for _ in range(3):
            opt.zero_grad()
            (-G(z, 16).var(0).mean()).backward()  # varied images pay: the noise would help
            opt.step()
        scales = [m.noise_scale for m in G.modules() if isinstance(m, P.StyleLayer)]
        assert (
            len(scales) == 6
            and P.model_args(P.Config(arch="style2", noise=noise), 1)["G"]["noise"] == noise
        )
        assert all(s.abs().sum() > 0 for s in scales) == noise
        assert all(s.abs().sum() == 0 for s in scales) == (not noise)
        with torch.no_grad():
            assert torch.equal(G(z, 16), G(z, 16)) == (not noise)


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["pro", "style", "style2"])
def test_cli_resume_mid_fade_is_exact_then_sample(fake_mnist, tmp_path, arch):
    """48 images a phase at batch 8: 4x4 steps 1-6, fade to 8x8 steps 7-12, stable 13-18, fade
    to 16x16 19-24, stable 25-30. Stopped in the second fade and resumed: the same losses, alpha
    and weights as an uninterrupted run, and Adam restarted at the last phase's start; --sample
    draws the same images for any --batch-size."""
    a, b, data = tmp_path / "a", tmp_path / "b", ["--data-dir", fake_mnist, "--arch", arch]
    run("progan.py", FLAGS, *data, "--out", a, "--log-every 1")
    k = stop_after("progan.py", FLAGS, *data, "--out", b, "--ckpt-every 0 --log-every 1", step=20)
    assert 20 <= k < 24, k  # inside the fade into 16x16
    run("progan.py", FLAGS, *data, "--out", b, "--resume", "--log-every 1")
    la, lb = logs(a), logs(b)
    assert max(la) == 30 and la[21]["res"] == 16 and 0 < la[21]["alpha"] < 1
    drop = lambda r: {key: v for key, v in r.items() if key not in ("t", "img_s")}
    assert [drop(la[s]) for s in range(k + 1, k + 4)] == [drop(lb[s]) for s in range(k + 1, k + 4)]
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    for key in ("G", "D", "ema"):
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]), key
    assert ca["nimg"] == 240 and ca["opt_res"] == 16 and ca["opt_phase"] == 4
    names = [n for n, _ in P.Discriminator(**ca["model_args"]["D"]).named_parameters()]
    steps = {names[int(i)]: int(s["step"]) for i, s in cb["opt_d"]["state"].items()}
    assert set(steps.values()) == {6}  # Adam restarted at the stable phase's start, step 25
    assert not any(n.startswith("from_rgb.1.") for n in steps)  # the fade's old path: unused
    G = P.build_g(arch, ca["model_args"]["G"])  # the class alone rebuilds it
    G.load_state_dict(ca["ema"])

    run("progan.py", "--out", a, "--sample", 10, "--batch-size", 4)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (10, 14, 14, 1) and z["arr_0"].dtype == np.uint8  # padding cropped
    run("progan.py", "--out", a, "--sample", 10, "--batch-size", 3)  # the same z and noise,
    other = np.load(a / "samples.npz")["arr_0"].astype(int)  # up to float rounding of the batch
    assert np.abs(other - z["arr_0"]).max() <= 1 and (other != z["arr_0"]).mean() < 0.005
    run("progan.py", "--out", a, "--sample", 10, "--batch-size", 4)  # the same call: bit for bit
    assert np.array_equal(np.load(a / "samples.npz")["arr_0"], z["arr_0"])
    assert (a / "samples.png").exists() and (a / "interp.png").exists()
    if arch != "pro":
        spread = lambda x: np.abs(x.astype(float) - x[:1]).mean()  # mean distance to sample 0
        run("progan.py", "--out", a, "--sample", 10, "--psi", 0.0)
        z0 = np.load(a / "samples.npz")["arr_0"]  # psi 0: every sample from the mean w; they
        assert 0 < spread(z0) < spread(z["arr_0"])  # still differ by the noise inputs,
        # which the flat 4x4 constant's instance norm amplifies early on (exact: test above)


def test_bad_input(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert_one_line_error(run("progan.py", "--image-size", 30, check=False), "--image-size 30")
    cfg = lambda **k: P.Config(data_dir=str(fake_mnist), out=str(out), device="cpu", **k)
    check = lambda **k: lambda: P.check_flags(cfg(**k))
    assert_dies(capsys, check(image_size=4), "power of two")
    for spec in ("4-64", "3:8", "4:x", "4:0"):
        assert_dies(capsys, check(batch_sizes=spec), "--batch-sizes")
    assert_dies(capsys, check(batch_sizes="4:6"), "--mbstd-group")
    assert_dies(capsys, check(psi=0.5), "--arch style")
    assert_dies(capsys, lambda: P.load_trained(cfg(sample=4)), "no checkpoint")
    out.mkdir()
    torch.save({"step": 1, "G": {}, "D": {}}, out / "ckpt.pt")  # gan.py's keys
    assert_dies(capsys, lambda: P.load_trained(cfg(sample=4)), "not a", "checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_dies(capsys, lambda: P.load_trained(cfg(sample=4)), "corrupted")
    small = dict(tiny=True, image_size=8, phase_kimg=0.016, batch_sizes="4:8,8:8", steps=2)
    P.train(cfg(**small, sample_every=0, threads=1))  # a pro checkpoint; resumed as style:
    assert_dies(capsys, lambda: P.train(cfg(**small, arch="style", resume=True)), "arch pro")
    P.train(cfg(**small, arch="style2", sample_every=0, threads=1))  # resumed with other G flags
    again = lambda **k: lambda: P.train(cfg(**small, arch="style2", resume=True, **k))
    assert_dies(capsys, again(noise=False), "trained with noise True")  # same shapes, another G
    assert_dies(capsys, again(map_lr=0.1), "trained with map_lr 0.01")
    assert_dies(capsys, lambda: P.train(cfg(**small, batch_size=512)), "larger than")


@pytest.mark.slow
def test_ddp_two_ranks_stay_in_step(fake_mnist, tmp_path):
    """Through a fade, with blocks unused at low resolution (find_unused_parameters)."""
    torchrun("progan", FLAGS, "--steps 14 --data-dir", fake_mnist, "--out", tmp_path)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {k.split(".")[0] for k in w0} == {"0", "1", "2"}  # G, D, EMA
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [
        k for k in w0 if not torch.equal(w0[k], w1[k])
    ]


@pytest.mark.slow
def test_learns_the_bars(fake_mnist, tmp_path):
    """200 --tiny steps grown 4 -> 8 on the fake digits (a bar whose position is the label): the
    EMA G's samples move toward the data, measured as each sample's distance to its nearest
    training image against the untrained G's."""
    flags = "--tiny --image-size 8 --phase-kimg 1 --batch-sizes 4:16,8:16 --steps 200"
    run(
        "progan.py",
        flags,
        "--log-every 100 --sample-every 0 --data-dir",
        fake_mnist,
        "--out",
        tmp_path,
    )
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    x, _, _ = P.load_data(P.Config(data_dir=str(fake_mnist), image_size=8))
    x = x.float().flatten(1) / 127.5 - 1  # (N, 64) in [-1, 1]
    z = torch.randn(200, ck["model_args"]["G"]["z_dim"], generator=torch.Generator().manual_seed(1))
    nearest = lambda G: torch.cdist(P.generate(G, z, 8, 1.0).flatten(1), x).min(1).values.mean()
    trained, untrained = P.Generator(**ck["model_args"]["G"]), P.Generator(**ck["model_args"]["G"])
    trained.load_state_dict(ck["ema"])
    d1, d0 = nearest(trained).item(), nearest(untrained).item()
    assert ck["nimg"] == 3200 and d1 < 0.5 * d0, (d1, d0)
