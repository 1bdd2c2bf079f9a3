"""cgan_pix2pix.py: the projection D, the U-Net's skips, the PatchGAN's receptive field, the A|B
loader and jitter, the losses and schedule, learning tests, then the CLI of both tasks."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, run

import cgan_pix2pix as P


def test_projection_discriminator_is_psi_plus_class_embedding_dot_features():
    torch.manual_seed(0)
    D = P.ProjectionDiscriminator(1, 4, 28, n_classes=10).eval()
    with torch.no_grad():
        D.embed.weight.normal_()  # make the label matter at initialisation
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 3, 3, 7, 9])
    h = D.features(x)  # (B, c, s0, s0)
    phi = h.sum((2, 3))  # (B, c)
    want = h.flatten(1) @ D.psi.weight.flatten() + D.psi.bias + (D.embed.weight[y] * phi).sum(1)
    assert torch.allclose(D(x, y), want, atol=1e-5)  # Miyato & Koyama Eq. 3
    assert not torch.allclose(D(x, y), D(x, (y + 1) % 10))


def test_conditional_generator_uses_the_label_and_has_dcgan_layers():
    torch.manual_seed(0)
    G = P.ConditionalGenerator(100, 10, 50, 1, 8, 28)
    z = torch.randn(4, 100)
    a, b = G(z, torch.zeros(4, dtype=torch.long)), G(z, torch.ones(4, dtype=torch.long))
    assert a.shape == (4, 1, 28, 28) and a.abs().max() <= 1 and not torch.allclose(a, b)
    for m in [
        G,
        P.ProjectionDiscriminator(1, 8, 28),
        P.UNetGenerator(1, 1, 4, 32),
        P.PatchDiscriminator(),
    ]:
        bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
        assert bns and all(b.eps == 1e-5 and b.momentum == 0.1 for b in bns)
        assert not any(isinstance(b, (nn.Sigmoid, nn.Softmax)) for b in m.modules())  # logits


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_unet_skips_at_every_scale(size):
    torch.manual_seed(0)
    G = P.UNetGenerator(3, 2, 2, size)
    n = int(math.log2(size))  # depth follows the size: down to 1x1
    assert len(G.down) == n and len(G.up) == n
    enc, dec = [], []
    for m in G.down:
        m.register_forward_hook(lambda mod, i, o: enc.append(o))
    for m in G.up:
        m.register_forward_hook(lambda mod, i, o: dec.append(i[0]))
    out = G(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2, size, size) and out.abs().max() <= 1
    assert enc[-1].shape[-1] == 1 and torch.equal(dec[0], enc[-1])  # the bottleneck
    for k in range(1, n):  # decoder layer k sees the encoder's features at its own scale
        skip = enc[n - 1 - k]
        assert dec[k].shape[-1] == skip.shape[-1] == size >> (n - k)
        assert torch.equal(dec[k][:, -skip.shape[1] :], skip)
    drops = [any(isinstance(m, nn.Dropout) for m in u.modules()) for u in G.up]
    assert drops == [i < 3 and i < n - 1 for i in range(n)]  # the first three decoder layers


def test_patchgan_receptive_field_and_output_shape():
    assert {rf: P.receptive_field(P.PatchDiscriminator(2, 2, n)) for rf, n in P.PATCH.items()} == {
        16: 16,
        34: 34,
        70: 70,
        142: 142,
        286: 286,
    }
    torch.manual_seed(0)
    D = P.PatchDiscriminator(6, 2, 3).eval()  # the 256 configuration; eval: no batch coupling
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    out = D(torch.randn(1, 3, 256, 256), x)
    assert out.shape == (1, 1, 30, 30)
    out[0, 0, 15, 15].backward()  # which input pixels reach one output unit?
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero().T
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_losses_schedule_and_halved_d_loss():
    r, f = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    sp = lambda v: math.log1p(math.exp(v))  # -log sigmoid(-v)
    assert P.d_loss(r, f).item() == pytest.approx((sp(0) + sp(-2)) / 2 + (sp(-1) + sp(1)) / 2)
    assert P.g_loss(f).item() == pytest.approx((sp(1) + sp(-1)) / 2)
    assert P.l1_loss(torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])).item() == 1.25
    assert [P.lr_factor(s, 10) for s in (0, 4, 5, 6, 8, 10)] == [1, 1, 1, 0.8, 0.4, 0]
    torch.manual_seed(0)
    D, G = P.PatchDiscriminator(2, 4, 1), P.UNetGenerator(1, 1, 4, 16)
    opt_d, opt_g = (torch.optim.SGD(m.parameters(), 0.0) for m in (D, G))
    a, b = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    fake = G(a)
    half = P.d_step(D, opt_d, b, fake, a, scale=0.5)["loss_d"]
    assert half.item() == pytest.approx(0.5 * P.d_loss(D(b, a), D(fake, a)).item(), rel=1e-5)
    s = P.g_step(D, opt_g, fake, a, b, lambda_l1=100.0)
    assert s["l1"].item() == pytest.approx((fake - b).abs().mean().item(), rel=1e-5)
    g0 = [p.grad.clone() for p in G.parameters()]
    P.g_step(D, opt_g, G(a), a, b, lambda_l1=0.0)  # the adversarial part alone: other gradients
    assert not all(torch.allclose(p.grad, g) for p, g in zip(G.parameters(), g0))


def write_pairs(folder, n, size, seed=0):
    """pix2pix's layout: each file is A | B side by side; here B = 255 - A, A random noise."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([a, 255 - a], 1)).save(folder / f"{i}.png")


def test_aligned_loader_splits_pairs_and_jitters_a_and_b_alike(tmp_path):
    write_pairs(tmp_path / "train", 4, 32)
    A, B, y = P.load_aligned(tmp_path, "train", 32)
    assert A.shape == B.shape == (4, 3, 32, 32) and A.dtype == torch.uint8 and (y == 0).all()
    assert torch.equal(B, 255 - A)  # the left half is A, the right half B
    ab = torch.cat([A, B], 1).float()
    torch.manual_seed(0)
    out = torch.cat([P.jitter(ab, 36, 32) for _ in range(8)])  # (32, 6, 32, 32)
    assert out.shape == (32, 6, 32, 32)
    assert torch.allclose(out[:, 3:], 255 - out[:, :3], atol=1e-3)  # one crop and flip for both
    orig = ab.repeat(8, 1, 1, 1)
    assert not torch.allclose(out, orig)  # the jitter changes the pairs...
    cfg = P.Config(direction="BtoA")
    x, t = P.split_ab(ab, cfg.direction, 3)
    assert torch.equal(x, ab[:, 3:]) and torch.equal(t, ab[:, :3])  # ...and BtoA swaps them


def test_mnist_edges_are_outlines_of_the_digit(fake_mnist):
    a, b, y = P.mnist_edges(P.Config(data_dir=str(fake_mnist)), train=False)
    assert a.shape == b.shape == (64, 1, 32, 32) and len(y) == 64
    assert set(a.unique().tolist()) <= {0, 255} and (a > 0).any()
    inside = (b > 0) & (a == 0)  # a thick bar has an interior that is not edge
    assert inside.any() and ((a > 0) & (b == 0)).any()  # and edges on both sides of its border


def test_cgan_steps_learn_a_conditional_gaussian_mixture():
    """The file's D and G steps, on MLPs: G(z, y) must put each class at its own mode."""
    torch.manual_seed(0)
    means = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])

    class Gen(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.net = (
                nn.Embedding(3, 4),
                nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2)),
            )

        def forward(self, z, y):
            return self.net(torch.cat([z, self.e(y)], 1))

    class Disc(nn.Module):  # a projection D on MLP features
        def __init__(self):
            super().__init__()
            self.phi, self.psi, self.e = (
                nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2)),
                nn.Linear(32, 1),
                nn.Embedding(3, 32),
            )

        def forward(self, x, y):
            h = self.phi(x)
            return self.psi(h).view(-1) + (self.e(y) * h).sum(1)

    G, D = Gen(), Disc()
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-3, betas=(0.5, 0.999)) for m in (G, D))

    def acc():  # share of samples nearest to their requested class's mean
        y = torch.arange(3000) % 3
        with torch.no_grad():
            s = G(torch.randn(3000, 2), y)
        return (torch.cdist(s, means).argmin(1) == y).float().mean().item()

    acc0 = acc()
    for _ in range(1500):
        y = torch.randint(0, 3, (256,))
        x = means[y] + 0.3 * torch.randn(256, 2)
        fake = G(torch.randn(256, 2), y)
        P.d_step(D, opt_d, x, fake, y)
        P.g_step(D, opt_g, fake, y)
    assert acc0 < 0.6 and acc() > 0.95, (acc0, acc())


# -----------------------------------------------------------------------------
# the CLI contract
TINY = ["--tiny", "--batch-size", "16", "--log-every", "1", "--sample-every", "2"]


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


def resume_is_exact(task_args, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("cgan_pix2pix.py", *TINY, *task_args, *data, "--out", a, "--steps", 4)
    run("cgan_pix2pix.py", *TINY, *task_args, *data, "--out", b, "--steps", 2)
    p = run("cgan_pix2pix.py", *TINY, *task_args, *data, "--out", b, "--steps", 4, "--resume")
    assert "from step 2" in p.stdout
    la, lb = logs(a), logs(b)
    for s in (3, 4):
        assert {k: v for k, v in la[s].items() if k not in ("t", "img_s")} == {
            k: v for k, v in lb[s].items() if k not in ("t", "img_s")
        }
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 4 and all(
        torch.equal(ca["G"][k], cb["G"][k]) for k in ca["G"]
    )
    assert (a / "samples_000002.png").exists()
    return a, la


@pytest.mark.slow
def test_cli_cgan(fake_mnist, tmp_path):
    a, la = resume_is_exact([], ["--data-dir", fake_mnist], tmp_path)
    assert "l1" not in la[4] and la[4]["lr"] == 2e-4
    run("cgan_pix2pix.py", "--out", a, "--sample", 30, "--batch-size", 8)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (30, 28, 28, 1) and z["arr_0"].dtype == np.uint8
    assert (z["arr_1"] == np.arange(30) % 10).all()
    from PIL import Image

    w, h = Image.open(a / "samples.png").size  # one column per class: 30 samples, 3 rows
    assert (w, h) == (2 + 10 * 30, 2 + 3 * 30)


@pytest.mark.slow
def test_cli_pix2pix_mnist_edges(fake_mnist, tmp_path):
    a, la = resume_is_exact(["--task", "pix2pix"], ["--data-dir", fake_mnist], tmp_path)
    assert la[3]["lr"] == 2e-4 and la[4]["lr"] == pytest.approx(1e-4) and la[4]["l1"] > 0
    p = run("cgan_pix2pix.py", "--out", a, "--sample", 20, "--data-dir", fake_mnist)
    r = json.loads(p.stdout.splitlines()[-2])
    assert r["n"] == 20 and 0 < r["l1"] < 1 and r["psnr"] > 0
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (20, 28, 28, 1) and len(z["arr_1"]) == 20  # labels of the sources
    assert (a / "samples.png").exists() and (a / "pix2pix_eval.jsonl").exists()


def test_cli_pix2pix_aligned_folders(tmp_path):
    write_pairs(tmp_path / "facades" / "train", 4, 32)
    write_pairs(tmp_path / "facades" / "val", 2, 32, seed=1)
    out, data = tmp_path / "run", ["--data-dir", tmp_path / "facades"]
    run(
        "cgan_pix2pix.py",
        "--task pix2pix --dataset aligned",
        *data,
        "--image-size 32 --tiny --batch-size 2 --steps 2 --direction BtoA --out",
        out,
    )
    p = run("cgan_pix2pix.py", "--out", out, "--sample", 5, *data)
    assert json.loads(p.stdout.splitlines()[-2])["n"] == 2  # the whole val split
    z = np.load(out / "samples.npz")
    assert z["arr_0"].shape == (2, 32, 32, 3) and "arr_1" not in z


@pytest.mark.slow
def test_cli_bad_input(fake_mnist, tmp_path):
    out = tmp_path / "run"
    cli = lambda *a: run("cgan_pix2pix.py", "--out", out, *a, check=False)
    data = ["--data-dir", fake_mnist]
    assert_one_line_error(cli("--task", "cyclegan"), "--task")
    assert_one_line_error(cli("--task", "pix2pix", "--dataset", "cifar10"), "for pix2pix")
    assert_one_line_error(cli("--dataset", "aligned"), "no class labels")
    assert_one_line_error(cli("--task", "pix2pix", "--direction", "up"), "--direction")
    assert_one_line_error(cli("--task", "pix2pix", "--patch", 50), "--patch")
    assert_one_line_error(
        cli("--task", "pix2pix", "--dataset", "aligned", "--data-dir", tmp_path), "no images"
    )
    assert_one_line_error(cli("--tiny", *data, "--image-size", 30), "image size 30")
    assert_one_line_error(
        cli("--tiny", "--data-dir", tmp_path / "none", "--no-download"), "mnist not found in"
    )
    assert_one_line_error(cli("--sample", 4), "no checkpoint")
    run("cgan_pix2pix.py", *TINY, *data, "--out", out, "--steps", 1)
    assert_one_line_error(
        cli("--task", "pix2pix", "--tiny", *data, "--steps", 2, "--resume"),
        "not a cgan_pix2pix.py --task pix2pix",
    )
    torch.save({"step": 1, "model": {}}, out / "ckpt.pt")
    assert_one_line_error(cli("--sample", 4), "not a cgan_pix2pix.py checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_one_line_error(cli("--sample", 4), "corrupted")


@pytest.mark.slow
def test_pix2pix_learns_on_real_digits(tmp_path):
    """60 --tiny steps (lr 1e-3) on real edge maps: the L1 to the target digits halves."""
    run(
        "cgan_pix2pix.py",
        "--task pix2pix --tiny --digits mnist-12k",
        "--out",
        tmp_path,
        "--steps 60 --batch-size 32 --lr 1e-3 --log-every 10 --sample-every 0",
    )
    l1 = {s: r["l1"] for s, r in logs(tmp_path).items()}
    assert l1[60] < 0.5 * l1[10], l1
