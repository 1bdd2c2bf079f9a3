"""cfg_ldm.py: guidance identities, cross-attention semantics, the autoencoder's KL and scale
factor, captions, the three stages' CLI with exact resume, bad input, DDP, learning."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run, torchrun

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
    """(ctx, mask) of c and of the null condition."""
    return model.cond(c), model.cond(c, torch.ones(len(c), dtype=torch.bool))


# --- guidance
def test_guidance_1_is_the_conditional_sample_and_0_the_unconditional_exactly():
    model, sched, off = tiny_ldm(), L.make_schedule(100), torch.autocast("cpu", enabled=False)
    c = torch.arange(6) % 10
    x_T = torch.randn(6, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = [
            L.ddim_sample(lambda x, t, a=a: model.unet(x, t, *a), sched, x_T, 5, clip=True)
            for a in conds(model, c)
        ]
        for s, want in zip((1.0, 0.0), alone):
            assert torch.equal(L.Sampler(model, None, sched, off, 5)(x_T, c, s), want)
    assert not torch.allclose(*alone)  # the context matters


def test_doubled_batch_equals_two_calls():
    model = tiny_ldm()
    c, x, t = torch.arange(5), torch.randn(5, 4, 7, 7), torch.randint(0, 100, (5,))
    cond, null = conds(model, c)
    with torch.no_grad():
        e_c, e_u = model.unet(x, t, *cond), model.unet(x, t, *null)
        got = L.cfg_eps(model.unet, x, t, cond, null, 3.0)
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

    def fake(x, t, c, drop, concat):
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
    null_row = model.cond.emb.weight.grad[model.cond.null]  # the null id's embedding learns
    assert null_row.abs().sum() > 0 and model.cond.null == 10


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


def test_folder_metadata_in_load_order_and_missing_ones_are_an_error(tmp_path, capsys):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in (2, 0, 1)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert L.folder_metadata(str(tmp_path), "text") == ["caption 0", "caption 1", "caption 2"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(SystemExit) as e:
        L.folder_metadata(str(tmp_path), "text")
    assert e.value.code == 2 and "no text for 2 images" in capsys.readouterr().err


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
    assert_one_line_error(p, "--cond text", "metadata.jsonl")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_stay_identical(fake_mnist, tmp_path):
    """The AE and the LDM stage each train under torchrun with replicas bit-identical."""
    out = tmp_path / "run"
    for name in ("ae", "ldm"):
        torchrun("cfg_ldm", TINY, "--stage", name, "--steps 3 --data-dir", fake_mnist, "--out", out)
        w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name


def dropped_over_conditional(out, x):
    """L_simple with the condition dropped over L_simple with it, on the same z_0, t and eps:
    above 1 when the trained model uses its condition."""
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    model, ae = L.LDM(**ck["model_args"]["ldm"]).eval(), L.AutoencoderKL(**ck["model_args"]["ae"])
    model.load_state_dict(ck["ema"])
    ae.load_state_dict(ck["ae"])
    task, g = model.cond.kind, torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = ae.to_latent(x, g)
        t = torch.randint(50, 100, (len(x),), generator=g)  # where the condition matters most
        eps = torch.randn(z0.shape, generator=g)
        zt, c = L.q_sample(L.make_schedule(100), z0, t, eps), torch.zeros(len(x)).long()
        cc = L.concat_input(task, ae, x, 4, z0.shape[-2:], L.random_masks(len(x), 28, g))
        # inpainting's condition tells nothing about the holes: score the fully known cells
        w = (cc[:, -1:] == 1).float() if task == "inpaint" else torch.ones_like(z0[:, :1])
        se = lambda drop: (model(zt, t, c, torch.full((len(x),), drop), cc) - eps).square() * w
        return (se(True).sum() / se(False).sum()).item()


@pytest.mark.slow
def test_autoencoder_and_latent_diffusion_learn_on_real_digits(tmp_path):
    """The AE reaches 17 dB test PSNR in 150 steps; 150 LDM steps bring L_simple down by a third;
    the SR and inpainting models learn to use their conditions."""
    base = ["--dataset mnist-12k --batch-size 32 --lr 1e-3 --sample-every 0"]
    base += ["--log-every 25 --tiny"]
    p = run("cfg_ldm.py", *base, "--out", tmp_path, "--stage ae --steps 150", timeout=600)
    assert float(p.stdout.split("test PSNR ")[1].split()[0]) > 17, p.stdout
    run("cfg_ldm.py", *base, "--out", tmp_path, "--stage ldm --steps 150", timeout=600)
    ls = logged(tmp_path)
    assert ls[150] < 0.67 * ls[25], ls
    x = L.to_float(L.load_split(L.Config(dataset="mnist-12k"), train=False)[0][:256], "cpu")
    for task in ("sr", "inpaint"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "ae.pt").write_bytes((tmp_path / "ae.pt").read_bytes())
        flags = f"--stage ldm --steps 150 --cond {task} --T 100"
        run("cfg_ldm.py", *base, "--out", tmp_path / task, flags, timeout=600)
        ratio = dropped_over_conditional(tmp_path / task, x)
        # measured 1.20 (sr) and 1.09 (inpaint, known cells); an untrained U-Net gives 1.00 +- 0.005
        assert ratio > {"sr": 1.1, "inpaint": 1.04}[task], (task, ratio)


# --- layout, super-resolution, inpainting
def test_layout_tokens_are_a_set_and_padding_is_masked():
    """Permuting a layout's boxes, or adding padding rows (whatever their values), leaves eps
    unchanged for the same noise; another layout changes it."""
    model, x, t = tiny_ldm("layout"), torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    boxes = torch.tensor([[[3, 1, 2, 20, 30], [7, 25, 0, 31, 9], [-1] * 5]] * 2)
    boxes[1, 2] = torch.tensor([0, 4, 4, 9, 9])
    eps = model(x, t, boxes)
    perm = boxes[:, [2, 0, 1]]
    assert torch.allclose(model(x, t, perm), eps, atol=1e-5)
    padded = torch.cat([boxes, torch.full((2, 2, 5), -1)], 1)
    padded[:, 3, 1:] = torch.tensor([5, 6, 7, 8])  # a padding row (label -1) with coordinates
    assert torch.allclose(model(x, t, padded), eps, atol=1e-5)
    moved = boxes.clone()
    moved[:, 0, 1] += 5
    assert (model(x, t, moved) - eps).abs().max() > 1e-3


def test_canvases_hold_each_digit_in_its_box_and_nothing_else():
    """Digit d is the constant image d + 1, so every box must hold one value exactly, its label
    must be that digit's, and every pixel outside the boxes must be 0."""
    x, y = (
        (torch.arange(12) + 1).to(torch.uint8).view(12, 1, 1, 1).expand(12, 1, 28, 28),
        torch.arange(12) % 10,
    )
    canvas, boxes = L.make_canvases(x, y, 40, seed=3)
    again = L.make_canvases(x, y, 40, seed=3)
    assert torch.equal(canvas, again[0]) and torch.equal(boxes, again[1])
    assert not torch.equal(boxes, L.make_canvases(x, y, 40, seed=4)[1])
    inside = torch.zeros_like(canvas, dtype=torch.bool)
    for i, k in (boxes[..., 0] >= 0).nonzero().tolist():
        label, x0, y0, x1, y1 = boxes[i, k].tolist()
        assert 20 <= x1 - x0 <= 40 and 20 <= y1 - y0 <= 40 and x1 <= 64 and y1 <= 64
        assert not inside[i, :, y0:y1, x0:x1].any()  # no two boxes overlap
        inside[i, :, y0:y1, x0:x1] = True
        v = canvas[i, :, y0:y1, x0:x1].unique()
        assert len(v) == 1 and y[int(v) - 1] == label
    assert (canvas[~inside] == 0).all() and (boxes[:, 0, 0] >= 0).all()
    n = (boxes[..., 0] >= 0).sum(1)
    assert n.max() <= 3 and len(n.unique()) > 1


def test_layout_tokens_quantise_corners_to_the_grid():
    boxes = torch.tensor([[[2, 0, 32, 64, 63], [-1] * 5]])
    assert L.layout_tokens(boxes, 64, 32).tolist() == [[[2, 0, 16, 31, 31], [-1] * 5]]


def test_concat_conditions():
    """The U-Net's input channels are the latent's plus the condition's; SR's condition is the
    block mean; the condition is zeroed where the context is dropped; paste-back is exact."""
    cfg = L.Config(tiny=True, cond="sr")
    assert L.ldm_args(cfg, 4, 10, 1)["ldm"]["unet"]["in_ch"] == 5
    x = torch.randn(3, 1, 28, 28)
    blocks = x.view(3, 1, 7, 4, 7, 4).mean((3, 5))
    assert torch.allclose(L.sr_condition(x, 4, (7, 7)), blocks, atol=1e-6)
    model, z, t = tiny_ldm("inpaint", in_ch=4), torch.randn(3, 4, 7, 7), torch.tensor([1, 50, 99])
    unet = dict(in_ch=9, out_ch=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
    model = L.LDM(dict(unet, heads=2, ctx_dim=32), dict(kind="inpaint", dim=32)).eval()
    cc, drop, c = torch.randn(3, 5, 7, 7), torch.tensor([True, False, True]), torch.zeros(3).long()
    mixed = model(z, t, c, drop, cc)
    assert torch.equal(mixed[drop], model(z, t, c, drop, torch.zeros_like(cc))[drop])
    assert torch.equal(mixed[~drop], model(z, t, c, drop * 0 > 0, cc)[~drop])
    hole = L.random_masks(3, 28, torch.Generator().manual_seed(0))
    out = L.paste_known(x, hole, torch.randn_like(x))
    assert torch.equal(out[hole == 0], x[hole == 0]) and not torch.equal(out, x)
    assert torch.equal(L.paste_known(x, torch.zeros_like(hole), torch.randn_like(x)), x)
    cond = L.inpaint_condition(None, x, hole)  # --pixel: the masked image and the known share
    assert torch.equal(cond[:, 1:], 1 - hole) and (cond[:, :1][hole > 0] == 0).all()


def test_masks_cover_a_fifth_to_three_fifths_and_repeat_for_a_seed():
    for n, size in ((200, 28), (60, 64)):
        m = L.random_masks(n, size, torch.Generator().manual_seed(1))
        share = m.flatten(1).mean(1)
        assert 0.2 <= share.min() and share.max() <= 0.6 and set(m.unique().tolist()) == {0, 1}
        rect = m.flatten(1).sum(1) == m.amax(2).sum((1, 2)) * m.amax(3).sum((1, 2))  # a box
        assert 0.3 < rect.float().mean() < 0.7  # both kinds
    again = L.random_masks(60, 64, torch.Generator().manual_seed(1))
    assert torch.equal(m, again)


def test_repaint_paste_keeps_only_wholly_known_latent_cells():
    sched, g = L.make_schedule(100), torch.Generator().manual_seed(0)
    known = torch.ones(1, 1, 8, 8)
    known[..., :3, :3] = 0  # cell (0, 0) of the 2x2 latent is partly unknown
    z_known, z = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = L.repaint_paste(sched, z_known, known, g)(z, -1)
    assert torch.equal(out[..., 0, 0], z[..., 0, 0]) and torch.equal(
        out[..., 1, :], z_known[..., 1, :]
    )
    noised = L.repaint_paste(sched, z_known, known, g)(z, 99)
    assert torch.equal(noised[..., 0, 0], z[..., 0, 0]) and not torch.equal(
        noised[..., 1, 1], z_known[..., 1, 1]
    )


def test_bad_user_inputs_are_one_line(tmp_path, capsys):

    def error(fn, *args):
        with pytest.raises(SystemExit) as e:
            fn(*args)
        assert e.value.code == 2
        return capsys.readouterr().err

    boxes = L.read_layouts(
        [[[3, 0, 0, 20, 20]], [[1, 40, 40, 60, 60], [2, 0, 0, 5, 5]]], 64, 10, "f"
    )
    assert boxes.shape == (2, 2, 5) and boxes[0, 1].tolist() == [-1] * 5
    assert "box [40, 40, 70, 60] is not inside the 64x64 canvas" in error(
        L.read_layouts, [[[1, 40, 40, 70, 60]]], 64, 10, "f"
    )
    assert "not inside" in error(L.read_layouts, [[[1, 9, 3, 4, 5]]], 64, 10, "f")  # x0 >= x1
    assert "not inside" in error(L.read_layouts, [[[1, -2, 3, 4, 5]]], 64, 10, "f")
    assert "a label is out of range 0-9" in error(L.read_layouts, [[[12, 0, 0, 9, 9]]], 64, 10, "f")
    assert "out of range" in error(L.read_layouts, [[[-3, 0, 0, 9, 9]]], 64, 10, "f")
    assert "a layout is a list" in error(L.read_layouts, [[[1, 2, 3]]], 64, 10, "f")
    u8, y = torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2).long()
    msg = error(L.conditions, L.Config(cond="sr", sr_factor=3), u8, y)
    assert "--sr-factor 3 does not divide the image size 28" in msg
    msg = error(L.check_flags, L.Config(stage="ldm", cond="layout"))
    assert "--cond layout: --stage ldm on --dataset mnist-layout" in msg
    msg = error(L.check_flags, L.Config(stage="ldm", dataset="mnist-layout"))
    assert "is for --cond layout, not --cond class" in msg


@pytest.mark.slow
def test_cli_layout_sr_inpaint_resume_exactly_and_sample(fake_mnist, tmp_path):
    """Each task: 3 steps in one go equal 2 steps, --resume, 1 more; then --sample, --layout,
    --uncond-paste, and their bad inputs as one line."""

    tasks = {
        "sr": "--cond sr",
        "inpaint": "--cond inpaint",
        "layout": "--cond layout --dataset mnist-layout",
    }
    for task, flags in tasks.items():
        a, b = tmp_path / task / "a", tmp_path / task / "b"
        a.mkdir(parents=True)
        b.mkdir()
        if task != "inpaint":  # inpaint shares sr's autoencoder; layout's sees 64x64 canvases
            extra = "--dataset mnist-layout --f 8" if task == "layout" else ""
            stage(a, fake_mnist, "ae", "--steps 1", *extra.split())
        ae = (tmp_path / ("sr" if task == "inpaint" else task) / "a" / "ae.pt").read_bytes()
        for d in (a, b):
            (d / "ae.pt").write_bytes(ae)
        stage(a, fake_mnist, "ldm", "--steps 3", *flags.split())
        stage(b, fake_mnist, "ldm", "--steps 2", *flags.split())
        stage(b, fake_mnist, "ldm", "--steps 3 --resume", *flags.split())
        ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
        assert ca["step"] == cb["step"] == 3 and ca["data"] == cb["data"]
        same(ca, cb, ("model", "ema"))
    sample = lambda task, *f, check=True: run(
        "cfg_ldm.py", "--out", tmp_path / task / "a", "--sample 3 --sample-steps 2", *f, check=check
    )
    sample("sr")  # arr_2: the low-res inputs; arr_3: the originals, for evaluate.py
    z = np.load(tmp_path / "sr" / "a" / "samples.npz")
    assert z["arr_0"].shape == z["arr_3"].shape == (3, 28, 28, 1) and len(z["arr_1"]) == 3
    assert z["arr_2"].shape == (3, 7, 7, 1) and z["arr_2"].dtype == np.uint8
    block_means = z["arr_3"].reshape(3, 7, 4, 7, 4, 1).mean((2, 4))
    assert np.abs(z["arr_2"] - block_means).max() <= 0.5  # the area-averaged input, rounded
    for extra in ([], ["--uncond-paste"]):  # ours, then the unconditional model + paste-back
        sample("inpaint", *extra)
        z = np.load(tmp_path / "inpaint" / "a" / ("uncond_paste" if extra else "") / "samples.npz")
        hole, out, orig = z["arr_2"] > 0, z["arr_0"], z["arr_3"]
        assert hole.shape == out.shape and 0 < hole.mean() < 1  # masks, 1 = hole
        assert np.array_equal(out[~hole], orig[~hole])  # the known pixels, pasted back
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps([[[3, 0, 0, 30, 30], [5, 32, 32, 64, 60]], [[1, 10, 10, 40, 40]]]))
    sample("layout", "--layout", layout)
    z = np.load(tmp_path / "layout" / "a" / "samples.npz")
    assert z["arr_0"].shape == (3, 64, 64, 1) and z["arr_1"].tolist()[1] == [1, -1]
    assert z["arr_2"].shape == (3, 2, 5) and z["arr_2"][2].tolist()[1] == [5, 32, 32, 64, 60]
    layout.write_text(json.dumps([[[3, 0, 0, 30, 80]]]))
    assert_one_line_error(sample("layout", "--layout", layout, check=False), "not inside the 64x64")
    p = sample("layout", "--uncond-paste", check=False)
    assert_one_line_error(p, "--uncond-paste is inpainting's baseline")
