"""vqvae.py: the quantizer's lookup, gradients and EMA against closed forms, the prior's
causality, then the two-stage CLI, DDP and learning."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run, torchrun

import vqvae as Q


def test_quantized_vectors_are_codebook_rows_nearest_to_the_input():
    torch.manual_seed(0)
    vq = Q.VectorQuantizer(K=16, D=3).eval()
    z_e = torch.randn(2, 3, 4, 5)
    z_q, _, idx, _ = vq(z_e)
    assert idx.shape == (2, 4, 5) and idx.min() >= 0 and idx.max() < 16
    flat_q, flat_e = z_q.permute(0, 2, 3, 1).reshape(-1, 3), z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(flat_q, vq.embed[idx.flatten()], atol=1e-6)  # rows of the codebook
    brute = torch.cdist(flat_e, vq.embed).argmin(1)  # Eq. 2 by brute force
    assert torch.equal(idx.flatten(), brute)
    assert torch.allclose(vq.lookup(idx), z_q, atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    torch.manual_seed(0)
    vq = Q.VectorQuantizer(K=8, D=4)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _, _ = vq(z_e)
    G = torch.randn_like(z_q)
    (z_q * G).sum().backward()  # only the decoder-input path, no codebook or commitment loss
    assert torch.equal(z_e.grad, G)


def test_codebook_loss_moves_codes_and_commitment_moves_only_the_encoder():
    torch.manual_seed(0)
    vq = Q.VectorQuantizer(K=8, D=4)
    z_e = torch.randn(10, 4, requires_grad=True)
    z_q = F.embedding(torch.randint(8, (10,)), vq.embed)
    codebook, commit = Q.vq_losses(z_e, z_q)
    codebook.backward(retain_graph=True)
    assert z_e.grad is None and vq.embed.grad.abs().sum() > 0
    vq.embed.grad = None
    commit.backward()
    assert vq.embed.grad is None and z_e.grad.abs().sum() > 0
    # with EMA the codebook gets no gradient at all: its loss is only beta * commitment
    ema = Q.VectorQuantizer(K=8, D=4, ema=True).eval()
    x = torch.randn(2, 4, 3, 3)
    _, loss, idx, _ = ema(x)
    assert len(list(ema.parameters())) == 0  # the codebook is a buffer
    assert torch.allclose(loss, 0.25 * F.mse_loss(x, ema.lookup(idx)), atol=1e-6)


def test_ema_update_equals_the_closed_form_running_averages():
    vq = Q.VectorQuantizer(K=3, D=2, ema=True, decay=0.9, dead_threshold=0.0, eps=1e-5)
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.embed.copy_(e0), vq.embed_sum.copy_(e0)  # N_i = 1 (init), m_i = e_i
    z = torch.tensor([[1.0, 0.0], [0.0, -1.0], [9.0, 1.0]])  # -> codes 0, 0, 1; code 2 unused
    vq(z.view(3, 1, 1, 2).permute(0, 3, 1, 2))  # (B=3, D=2, 1, 1)
    n = torch.tensor([2.0, 1.0, 0.0])
    N = 0.9 * 1 + 0.1 * n  # Eq. 6
    m = 0.9 * e0 + 0.1 * torch.stack([z[0] + z[1], z[2], torch.zeros(2)])  # Eq. 7
    Ns = (N + 1e-5) / (N.sum() + 3e-5) * N.sum()  # Laplace smoothing
    assert torch.allclose(vq.cluster_size, N) and torch.allclose(vq.embed_sum, m)
    assert torch.allclose(vq.embed, m / Ns[:, None], atol=1e-5)  # Eq. 8


def test_a_dead_code_is_restarted_on_an_encoder_output():
    torch.manual_seed(0)
    vq = Q.VectorQuantizer(K=4, D=2, decay=0.5, dead_threshold=0.6)
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [100.0, 100.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 1.1], [-1.0, 0.9], [0.0, 0.1]])
    vq(z.view(4, 1, 1, 2).permute(0, 3, 1, 2))  # code 3 is never nearest: use 0.5 < 0.6
    assert any(torch.equal(vq.embed[3], r) for r in z), vq.embed[3]  # now one of the inputs
    assert torch.equal(vq.embed[:3], torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0]]))
    assert vq.cluster_size[3] == 0.6


def test_prior_is_causal():
    torch.manual_seed(0)
    prior = Q.CodePrior(K=10, L=12, dim=32, layers=2, heads=4, dropout=0.0).eval()
    idx = torch.randint(10, (2, 12))
    base = prior(idx)
    for j in range(12):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % 10
        out = prior(changed)
        assert torch.allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-5)  # logits at i <= j
        if j < 11:
            assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :])  # later ones do see it
    codes = Q.sample_codes(prior, 3, 12, 1.0, torch.Generator().manual_seed(0))
    assert codes.shape == (3, 12) and codes.max() < 10


# -----------------------------------------------------------------------------
# the CLI contract
TINY = [
    "--tiny",
    "--batch-size",
    "16",
    "--log-every",
    "1",
    "--sample-every",
    "2",
    "--num-codes",
    "32",
]


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
def test_cli_two_stages_resume_exact_sample_and_eval(fake_mnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    data = ["--data-dir", fake_mnist]
    run("vqvae.py", *TINY, *data, "--out", a, "--steps", 4, "--ema")
    run("vqvae.py", *TINY, *data, "--out", b, "--steps", 2, "--ema")
    assert (
        "from step 2"
        in run("vqvae.py", *TINY, *data, "--out", b, "--steps", 4, "--ema", "--resume").stdout
    )
    la, lb = logs(a), logs(b)
    assert la[3]["loss"] == lb[3]["loss"] and la[4]["loss"] == lb[4]["loss"]
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert all(
        torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]
    )  # incl. EMA codebook
    assert {"perplexity", "usage"} <= set(la[4]) and (a / "recon_000004.png").exists()
    assert_one_line_error(run("vqvae.py", "--out", a, "--sample", 4, check=False), "has no prior")
    # stage 2, with its own exact resume
    run("vqvae.py", *TINY, *data, "--out", a, "--stage", "prior", "--steps", 2)
    assert (
        "from step 2"
        in run(
            "vqvae.py", *TINY, *data, "--out", a, "--stage", "prior", "--steps", 3, "--resume"
        ).stdout
    )
    run("vqvae.py", *TINY, *data, "--out", b, "--stage", "prior", "--steps", 3)
    assert logs(a)[3]["nll"] == logs(b)[3]["nll"]
    assert (a / "samples_000002.png").exists()
    run("vqvae.py", "--out", a, "--sample", 5, "--batch-size", 2, "--temperature", 0.7)
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (5, 28, 28, 1) and z["arr_0"].dtype == np.uint8 and "arr_1" not in z
    r = json.loads(run("vqvae.py", "--out", a, "--eval", *data).stdout.splitlines()[-1])
    assert (
        r["n"] == 64 and 0 < r["codes_used"] <= 32 and r["psnr_db"] > 0 and r["prior_nll_nats"] > 0
    )
    assert_one_line_error(
        run("vqvae.py", *TINY, *data, "--out", a, "--steps", 5, "--resume", check=False),
        "already holds a prior",
    )


@pytest.mark.slow
def test_cli_bad_input(fake_mnist, tmp_path):
    out = tmp_path / "run"
    cli = lambda *a: run("vqvae.py", "--out", out, *a, check=False)
    data = ["--data-dir", fake_mnist]
    assert_one_line_error(
        cli("--tiny", "--data-dir", tmp_path / "none", "--no-download"), "mnist not found in"
    )
    assert_one_line_error(cli("--sample", 4), "no checkpoint")
    assert_one_line_error(cli("--stage", "pixelcnn"), "--stage")
    assert_one_line_error(cli("--stage", "prior"), "no checkpoint")
    assert_one_line_error(cli("--tiny", *data, "--image-size", 30), "image size 30")
    assert_one_line_error(cli("--num-codes", 1), "--num-codes 1")
    run("vqvae.py", *TINY, *data, "--out", out, "--steps", 1)
    assert_one_line_error(
        cli(*TINY, *data, "--stage", "prior", "--steps", 1, "--resume"), "no prior yet"
    )
    assert_one_line_error(cli(*data, "--steps", 2, "--resume"), "does not fit")  # not --tiny
    torch.save({"step": 1, "model": {}}, out / "ckpt.pt")  # loads, but is not this script's
    assert_one_line_error(cli("--sample", 4), "not a vqvae.py checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_one_line_error(cli("--eval", *data), "corrupted")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_keep_one_codebook(fake_mnist, tmp_path):
    """EMA statistics and dead-code restarts are summed/broadcast over ranks: replicas agree."""
    torchrun("vqvae", *TINY, "--ema --steps 3 --data-dir", fake_mnist, "--out", tmp_path)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [
        k for k in w0 if not torch.equal(w0[k], w1[k])
    ]


@pytest.mark.slow
def test_learns_on_real_digits(tmp_path):
    """A short --tiny stage 1 on real MNIST: the reconstruction error falls well below its start."""
    run(
        "vqvae.py",
        "--tiny --dataset mnist-12k",
        "--out",
        tmp_path,
        "--steps 100 --batch-size 32 --lr 2e-3 --log-every 20 --sample-every 0",
    )
    mse = {s: r["mse"] for s, r in logs(tmp_path).items()}
    assert mse[100] < 0.5 * mse[20], mse
