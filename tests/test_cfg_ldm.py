"""cfg_ldm.py: guidance identities, cross-attention semantics, the autoencoder's KL and scale
factor, captions, the three stages' CLI with exact resume, bad input, DDP, learning."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, assert_one_line_error, run, torchrun

import cfg_ldm as L


def tiny_ldm(kind="class", seed=0, in_ch=4):
    """A tiny LDM with every weight random (zero-initialised layers would hide the context)."""
    torch.manual_seed(seed)
    unet = dict(in_ch=in_ch, out_ch=in_ch, ch=16, ch_mult=(1, 2), num_res_blocks=1)
    unet |= dict(attn_levels=(1,), heads=2, ctx_dim=32)
    cond = dict(kind=kind, dim=32, n_classes=10, layers=1, heads=2, max_len=16)
    model = L.LDM(unet, cond).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def conds(model, c):
    drop = torch.ones(len(c), dtype=torch.bool)
    return (*model.cond(c), *model.cond(c, drop))


# --- guidance
def test_guidance_1_is_the_conditional_sample_and_0_the_unconditional_exactly():
    model, sched, off = tiny_ldm(), L.make_schedule(100), torch.autocast("cpu", enabled=False)
    c = torch.arange(6) % 10
    x_T = torch.randn(6, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    ctx, mask, null, null_mask = conds(model, c)
    with torch.no_grad():
        alone = [
            L.ddim_sample(lambda x, t, a=a, m=m: model.unet(x, t, a, m), sched, x_T, 5, clip=True)
            for a, m in ((ctx, mask), (null, null_mask))
        ]
        for s, want in zip((1.0, 0.0), alone):
            assert torch.equal(L.generate(model, None, sched, x_T, c, s, off, 5), want)
    assert not torch.allclose(*alone)  # the context matters


def test_doubled_batch_equals_two_calls():
    model = tiny_ldm()
    c, x, t = torch.arange(5), torch.randn(5, 4, 7, 7), torch.randint(0, 100, (5,))
    ctx, mask, null, null_mask = conds(model, c)
    with torch.no_grad():
        e_c, e_u = model.unet(x, t, ctx, mask), model.unet(x, t, null, null_mask)
        got = L.cfg_eps(model.unet, x, t, ctx, mask, null, null_mask, 3.0)
    torch.testing.assert_close(got, e_u + 3.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)


def test_classifier_guidance_with_a_linear_log_p_moves_eps_by_its_weights():
    sched, s = L.make_schedule(1000), 2.5
    w, eps, x = torch.randn(3, 4, 7, 7), torch.randn(3, 4, 7, 7), torch.randn(3, 4, 7, 7)
    t = torch.tensor([0, 500, 999])
    log_p = lambda x, t: (x * w).flatten(1).sum(1) + 7.0  # grad_x log p = w
    got = L.classifier_eps(sched, eps, x, t, log_p, s)
    want = eps - s * (1 - sched["alpha_bar"][t]).sqrt().view(-1, 1, 1, 1) * w
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# --- cross-attention
def test_cross_attention_is_a_set_function_of_the_context_and_depends_on_it():
    torch.manual_seed(0)
    attn = L.Attention(16, 8, heads=2)
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(attn(x, ctx, mask), attn(x, ctx[:, perm], mask[:, perm]))
    assert not torch.allclose(attn(x, ctx, mask), attn(x, ctx + 0.5, mask))


def test_spatial_transformer_starts_as_the_identity():
    st = L.SpatialTransformer(16, 8, heads=2)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(st(x, torch.randn(2, 3, 8), None), x)


def test_padding_of_short_captions_changes_nothing():
    """Whatever sits at the padding positions (embeddings, context tokens) cannot change the
    context of the real tokens or the U-Net's prediction; a real byte does."""
    model = tiny_ldm("text")
    ids = L.tokenize(["a thin 3", "the 7"], 16)  # 9 and 6 real tokens of 16
    x, t = torch.randn(2, 4, 7, 7), torch.tensor([3, 50])
    with torch.no_grad():
        ctx, mask = model.cond(ids)
        a = model.unet(x, t, ctx, mask)
        noisy = torch.where(mask[..., None], ctx, torch.randn_like(ctx) * 10)
        assert torch.equal(model.unet(x, t, noisy, mask), a)
        model.cond.pos[:, 9:] += 5.0  # the embeddings of padding positions only
        ctx2, mask2 = model.cond(ids)
        assert torch.equal(ctx2[mask], ctx[mask]) and torch.equal(mask2, mask)
        ids[0, 3] = 80  # a real byte: the prediction changes
        assert not torch.allclose(a[0], model.unet(x, t, *model.cond(ids))[0])


def test_tokenizer_takes_any_string():
    ids = L.tokenize(["", "ü €", "x" * 100], 16)
    assert ids.shape == (3, 16) and (ids[:, 0] == 1).all()  # the start token: no empty row
    assert (ids[0, 1:] == 0).all()
    assert ids[1, 1:7].tolist() == [b + 2 for b in "ü €".encode()] and ids[1, 7] == 0
    assert (ids[2, 1:] == ord("x") + 2).all()  # cut at max_len


# --- classifier-free training
def test_null_context_rate_and_gradient():
    p, n, seen = 0.1, 40000, []

    def fake(x, t, c, drop):
        seen.append(drop)
        return torch.zeros_like(x)

    torch.manual_seed(0)
    L.ldm_loss(fake, L.make_schedule(10), torch.randn(n, 1, 1, 1), torch.zeros(n), p)
    rate = torch.cat(seen).float().mean().item()
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / n)

    model = tiny_ldm()
    drop = torch.tensor([True, False])
    model(
        torch.randn(2, 4, 7, 7), torch.tensor([1, 2]), torch.tensor([3, 4]), drop
    ).sum().backward()
    assert model.cond.null.grad is not None and model.cond.null.grad.abs().sum() > 0


# --- the autoencoder
def test_kl_against_its_closed_form_distribution():
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    want = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(L.gaussian_kl(mean, logvar), want)


def test_scale_factor_is_applied_at_encode_and_decode_and_whitens_the_latents():
    torch.manual_seed(0)
    ae = L.AutoencoderKL(in_ch=1, ch=8, z_ch=4, f=4).eval()
    ae.encoder[-1].weight.data *= 4  # latents far from unit variance
    x_u8 = torch.randint(0, 256, (600, 1, 28, 28), dtype=torch.uint8)
    scale = L.latent_scale(ae, x_u8, torch.device("cpu"))
    ae.scale_factor.fill_(scale)
    x = L.to_float(x_u8[:50], "cpu")
    with torch.no_grad():
        z = ae.to_latent(x, torch.Generator().manual_seed(3))
        mean, logvar = ae.encode(x)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, scale * (mean + (0.5 * logvar).exp() * noise))
        torch.testing.assert_close(ae.from_latent(z), ae.decode(z / scale))
        z_all = ae.to_latent(L.to_float(x_u8, "cpu"))
    assert z.shape == (50, 4, 7, 7) and abs(z_all.std().item() - 1) < 0.1
    assert abs(scale - 1) > 0.2  # the factor did something


# --- captions
def test_held_out_prompts_never_appear_in_training_and_name_their_digit():
    made = {L.digit_caption(d, a, r / 100) for d in range(10) for a in range(3) for r in range(100)}
    for d in range(10):
        prompt = f"a {L.HELD_OUT[d]} {d}"
        assert prompt not in made and f"a {L.HELD_OUT[d]} {L.WORDS[d]}" in made
        assert f"a thin {d}" in made or f"a thick {d}" in made  # the numeral with the other word
        assert L.prompt_digit_and_attr(prompt) == (d, 2 if L.HELD_OUT[d] == "thick" else 0)
    assert L.prompt_digit_and_attr("the digit seven") == (7, 1)
    assert L.prompt_digit_and_attr("a cat") == (-1, 1)


def test_thickness_splits_each_digit_into_thirds():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (900, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(900) % 10
    a = L.thickness(x, y, L.ink_tertiles(x, y))
    counts = torch.bincount(a[y == 3], minlength=3)
    assert counts.min() >= 28 and counts.max() <= 32


def test_folder_captions_in_load_order_and_missing_ones_are_an_error(tmp_path, capsys):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in (2, 0, 1)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert L.folder_captions(str(tmp_path)) == ["caption 0", "caption 1", "caption 2"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(SystemExit) as e:
        L.folder_captions(str(tmp_path))
    assert e.value.code == 2 and "no caption for 2 images" in capsys.readouterr().err


# --- the CLI: three stages, exact resume, sampling, bad input
TINY = "--tiny --batch-size 8 --log-every 1 --sample-every 0 --T 100"


def stage(out, data, name, *flags, check=True):
    return run(
        "cfg_ldm.py", TINY, "--stage", name, "--data-dir", data, "--out", out, *flags, check=check
    )


def logged(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "log.jsonl"))}


def same(ca, cb, keys):
    for k in keys:
        assert all(torch.equal(ca[k][n], cb[k][n]) for n in ca[k]), k


@pytest.mark.slow
def test_cli_three_stages_resume_exactly_and_sample(fake_mnist, tmp_path):
    """Each stage: 4 steps in one go equal 2 steps, --resume, 2 more, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    stages = [
        ("ae", "ae.pt", ("model",), ""),
        ("ldm", "ckpt.pt", ("model", "ema"), "--cond text"),
        ("classifier", "classifier.pt", ("model",), ""),
    ]
    for name, file, keys, flags in stages:
        stage(a, fake_mnist, name, "--steps 4", *flags.split())
        stage(b, fake_mnist, name, "--steps 2", *flags.split())
        stage(b, fake_mnist, name, "--steps 4 --resume", *flags.split())
        ca, cb = (torch.load(d / file, weights_only=True) for d in (a, b))
        assert ca["step"] == cb["step"] == 4 and ca["data"] == cb["data"]
        same(ca, cb, keys)
    ae = torch.load(a / "ae.pt", weights_only=True)
    assert ae["model_args"]["ae"]["f"] == 4 and ae["scale_factor"] == cb["scale_factor"] > 0
    ck = torch.load(a / "ckpt.pt", weights_only=True)
    assert ck["test_prompts"][4] == "a thick 4" and len(ck["tertiles"]) == 10
    p = run("cfg_ldm.py", "--out", a, "--sample 12 --batch-size 5 --sample-steps 3 --sweep 0,1,4")
    z = np.load(a / "sweep" / "cfg_s4" / "samples.npz")
    assert z["arr_0"].shape == (12, 28, 28, 1) and z["arr_1"].tolist()[:3] == [0, 1, 2]
    assert (a / "guidance_cfg.png").exists() and '"attr_acc"' in p.stdout
    p = run(
        "cfg_ldm.py",
        "--out",
        a,
        "--sample 3 --sample-steps 2 --guide classifier",
        "--prompt",
        "seven, thick|a 2",
    )
    assert np.load(a / "samples.npz")["arr_1"].tolist() == [7, 2, 7]


@pytest.mark.slow
def test_bad_input_is_one_line(fake_mnist, tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(
        stage(out, fake_mnist, "ldm", "--steps 1", check=False), "run --stage ae first"
    )
    stage(out, fake_mnist, "ae", "--steps 1")
    stage(out, fake_mnist, "ldm", "--steps 1")
    sample = lambda *f: run(
        "cfg_ldm.py", "--out", out, "--sample 2 --sample-steps 2", *f, check=False
    )
    assert_one_line_error(sample("--guide classifier"), "run --stage classifier first")
    assert_one_line_error(sample("--prompt", "a thin 3"), "needs a text model")
    assert_one_line_error(sample("--labels 3,10"), "classes 0-9")
    assert_one_line_error(sample("--guidance -1"), "--guidance -1.0: must be at least 0")
    assert_one_line_error(sample("--sweep 1,-2"), "scales must be at least 0")
    assert_one_line_error(sample("--sample-steps 200"), "this model has T=100")
    run(
        "ddpm_ddim.py",
        "--tiny --steps 1 --batch-size 8 --sample-every 0 --T 100 --data-dir",
        fake_mnist,
        "--out",
        tmp_path / "ddpm",
    )
    foreign = run("cfg_ldm.py", "--out", tmp_path / "ddpm", "--sample 2", check=False)
    assert_one_line_error(foreign, "not a cfg_ldm.py checkpoint")
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    flags = ["--stage ldm --pixel --cond text --dataset", f"folder:{tmp_path / 'imgs'}"]
    p = run("cfg_ldm.py", TINY, *flags, "--out", out, check=False)
    assert_one_line_error(p, "--cond text needs captions")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_stay_identical(fake_mnist, tmp_path):
    """The AE and the LDM stage each train under torchrun with replicas bit-identical."""
    out = tmp_path / "run"
    for name in ("ae", "ldm"):
        torchrun("cfg_ldm", TINY, "--stage", name, "--steps 3 --data-dir", fake_mnist, "--out", out)
        w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "MNIST").exists(), reason="needs ../shared/data")
def test_autoencoder_and_latent_diffusion_learn_on_real_digits(tmp_path):
    """The AE reaches 17 dB test PSNR in 150 steps; 150 LDM steps bring L_simple down by a third."""
    base = [
        "--data-dir",
        SHARED_DATA,
        "--out",
        tmp_path,
        "--batch-size 32 --lr 1e-3 --sample-every 0",
    ]
    p = run("cfg_ldm.py", *base, "--stage ae --tiny --steps 150 --log-every 50", timeout=600)
    assert float(p.stdout.split("test PSNR ")[1].split()[0]) > 17, p.stdout
    run("cfg_ldm.py", *base, "--stage ldm --tiny --steps 150 --log-every 25", timeout=600)
    ls = logged(tmp_path)
    assert ls[150] < 0.67 * ls[25], ls
