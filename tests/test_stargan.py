"""stargan.py: the gradient penalty, label tiling, exclusive groups, the domain loss, the two-headed
D, the built-in styles, then the CLI: exact resume mid-decay, sampling, --set, bad input, DDP."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_dies, assert_one_line_error, run, stop_after, torchrun

import stargan as S


def test_gradient_penalty_of_a_linear_critic_is_exact():
    """D(x) = w.x + b has gradient w everywhere: the penalty is (|w| - 1)^2, whatever x_hat."""
    torch.manual_seed(0)
    w, b = torch.randn(3 * 8 * 8, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    critic = lambda v: v.flatten(1) @ w + b
    real, fake = (torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(2))
    gp = S.gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-12)
    w.mul_(1 / w.norm())  # a unit-norm critic pays nothing
    assert S.gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-20)
    gp = S.gradient_penalty(lambda v: (v**2).flatten(1).sum(1), real, fake)  # grad 2 x_hat
    assert gp.requires_grad  # create_graph: the penalty trains D


def test_labels_are_tiled_as_channels_and_d_has_two_heads():
    torch.manual_seed(0)
    G = S.Generator(c_dim=4, dim=8, n_blocks=1, img_ch=3)
    seen = []
    G.net[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x, c = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    y = G(x, c)
    assert y.shape == x.shape and y.abs().max() <= 1
    inp = seen[0]  # (B, 3 + c_dim, S, S): the image, then c constant over space
    assert inp.shape == (2, 7, 32, 32) and torch.equal(inp[:, :3], x)
    assert torch.equal(inp[:, 3:], c[:, :, None, None].expand(-1, -1, 32, 32))
    assert not torch.allclose(G(x, c), G(x, c.flip(0)))  # the label matters
    for size, layers in ((32, 4), (128, 6)):  # down to 2x2: 6 layers at the paper's 128 px
        args = S.model_args(S.Config(tiny=True), 3, size, 5)["D"]
        assert args["n_layers"] == layers
        src, cls = S.Discriminator(**args)(torch.randn(2, 3, size, size))
        assert src.shape == (2, 1, 2, 2) and cls.shape == (2, 5)
    norms = [m for m in S.Discriminator(**args).modules() if "Norm" in type(m).__name__]
    assert not norms  # no normalisation in D: the gradient penalty is per sample


def test_domain_loss_is_ce_on_groups_and_bce_on_the_rest():
    torch.manual_seed(0)
    logits, groups = torch.randn(6, 5), [[0, 1, 2]]
    target = torch.cat(
        [F.one_hot(torch.tensor([0, 1, 2, 2, 1, 0]), 3), torch.rand(6, 2).round()], 1
    )
    want = F.cross_entropy(logits[:, :3], target[:, :3].argmax(1))
    want = want + sum(
        F.binary_cross_entropy_with_logits(logits[:, j], target[:, j].float()) for j in (3, 4)
    )
    assert S.domain_loss(logits, target, groups).item() == pytest.approx(want.item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum") / 6
    assert S.domain_loss(logits, target, []).item() == pytest.approx(bce.item(), rel=1e-6)


def test_identity_loss_adds_lambda_id_lambda_rec_times_the_own_domain_l1():
    """--lambda-id: the G step's loss gains lambda_id lambda_rec |G(x, c_org) - x|_1, nothing else:
    with plain SGD at lr 1 the update differs from the paper's by exactly that term's gradient."""
    torch.manual_seed(0)
    G0 = S.Generator(c_dim=4, dim=8, n_blocks=1, img_ch=3)
    D = S.Discriminator(**S.model_args(S.Config(tiny=True), 3, 16, 4)["D"])
    x, c_org = (
        torch.rand(3, 3, 16, 16) * 2 - 1,
        torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]] * 2)[:3],
    )
    c_trg = c_org.flip(0)
    idt = (G0(x, c_org) - x).abs().mean()
    grads = torch.autograd.grad(idt, list(G0.parameters()))
    after = []
    for lambda_id in (0.0, 0.5):
        G = S.Generator(c_dim=4, dim=8, n_blocks=1, img_ch=3)
        G.load_state_dict(G0.state_dict())
        opt = torch.optim.SGD(G.parameters(), lr=1.0)
        stats = S.g_step(G, D, opt, x, c_org, c_trg, [[0, 1, 2]], lambda_id=lambda_id)
        assert ("idt" in stats) == (lambda_id > 0)
        after.append([p.detach().clone() for p in G.parameters()])
    assert stats["idt"].item() == pytest.approx(idt.item(), rel=1e-6)
    for a, b, g in zip(*after, grads):  # extra step -lr * 0.5 * 10 * grad(idt)
        torch.testing.assert_close(b - a, -5.0 * g, atol=1e-5, rtol=1e-4)


def test_exclusive_groups_stay_one_hot_in_targets():
    names = ["red", "green", "blue", "thick"]
    groups = S.groups_of(names)
    assert groups == [[0, 1, 2]] and S.groups_of(["Black_Hair", "Male"]) == []  # one: no group
    torch.manual_seed(0)
    c = torch.cat([F.one_hot(torch.randint(3, (64,)), 3), torch.randint(2, (64, 1))], 1).float()
    for t in [S.shuffled_targets(c)] + [t for _, t in S.domain_targets(c, groups)]:
        assert (t[:, :3].sum(1) == 1).all() and ((t == 0) | (t == 1)).all()
    cols = S.domain_targets(c, groups)
    assert [i for i, _ in cols] == [0, 1, 2, 3]  # each colour set, then thick flipped
    assert torch.equal(cols[3][1][:, 3], 1 - c[:, 3]) and torch.equal(cols[3][1][:, :3], c[:, :3])
    assert S.parse_set("green=1,thick=1", names, groups).tolist() == [0, 1, 0, 1]


def test_mnist_styles_labels_match_the_pixels(fake_mnist):
    cfg = S.Config(data_dir=str(fake_mnist))
    x, c, y = S.mnist_styles(cfg, train=False)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and c.shape == (64, 4)
    grey, _ = S.common.load_images(S.common.Config(data_dir=str(fake_mnist)), train=False)
    ink = x.float().sum((2, 3))  # (N, 3)
    assert torch.equal(ink.argmax(1), c[:, :3].argmax(1))  # the ink is in the labelled channel
    assert (ink.sort(1).values[:, :2] == 0).all()  # and only there
    thick = S.dilate(grey)
    for i in range(64):
        want = thick[i] if c[i, 3] else grey[i]
        assert torch.equal(x[i, c[i, :3].argmax()][2:30, 2:30], want[0])
    assert 0 < c[:, 3].float().mean() < 1 and (c[:, :3].sum(0) > 0).all()
    x2, c2, _ = S.mnist_styles(cfg, train=False)
    assert torch.equal(x, x2) and torch.equal(c, c2)  # fixed per split


# -----------------------------------------------------------------------------
# the CLI contract
TINY = "--tiny --batch-size 4 --n-critic 2 --log-every 1 --sample-every 3"


def logs(out):
    return {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}


@pytest.mark.slow
def test_cli_resume_mid_decay_is_exact_then_sample(fake_mnist, tmp_path, capsys):
    a, b, data = tmp_path / "a", tmp_path / "b", ["--data-dir", fake_mnist]
    run("stargan.py", TINY, *data, "--out", a, "--steps", 16)
    k = stop_after("stargan.py", TINY, "--steps 16 --ckpt-every 0", *data, "--out", b, step=9)
    assert 9 <= k < 14, k  # past the middle: the LR is decaying
    run("stargan.py", TINY, *data, "--out", b, "--steps", 16, "--resume")
    la, lb = logs(a), logs(b)
    drop = lambda r: {key: v for key, v in r.items() if key not in ("t", "img_s")}
    assert [drop(la[s]) for s in range(k + 1, k + 4)] == [drop(lb[s]) for s in range(k + 1, k + 4)]
    assert la[9]["lr"] == 1e-4 and la[10]["lr"] == pytest.approx(1e-4 * 7 / 8)
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    for key in ("G", "D"):
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key])
    assert ca["attrs"] == ["red", "green", "blue", "thick"] and ca["groups"] == [[0, 1, 2]]
    G = S.Generator(**ca["model_args"]["G"])  # the class alone rebuilds it
    G.load_state_dict(ca["G"])

    p = run("stargan.py", "--out", a, "--sample", 20, "--batch-size", 8)
    r = json.loads(p.stdout.splitlines()[-2])
    assert r["n"] == 20 and 0 <= r["colour_acc"] <= 1 and 0 <= r["thick_acc"] <= 1
    z = np.load(a / "samples.npz")
    assert z["arr_0"].shape == (20, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    _, c, y = S.mnist_styles(S.Config(data_dir=str(fake_mnist)), train=False)
    assert (z["arr_1"] == y[:20].numpy()).all() and z["arr_2"].shape == (20, 4)
    cols = torch.stack([t for _, t in S.domain_targets(c[:20].float(), [[0, 1, 2]])], 1)
    trg = torch.from_numpy(z["arr_2"]).float()[:, None]  # each target: one of its grid columns
    assert ((cols == trg).all(2).sum(1) >= 1).all()
    assert (z["arr_2"][:, :3].sum(1) == 1).all()
    from PIL import Image

    w, h = Image.open(a / "samples.png").size  # 8 rows: input + 3 colours + thick flipped
    assert (w, h) == (2 + 5 * 34, 2 + 8 * 34)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    p = run("stargan.py", "--out", a, "--sample 1 --set blue=1,thick=1 --input", tmp_path / "x.png")
    assert (a / "x_translated.png").exists(), p.stderr
    assert "'blue': 1.0" in p.stdout and "'red': 0.0" in p.stdout
    cfg = lambda f, spec: S.Config(out=str(a), sample=1, device="cpu", input=str(f), set=spec)
    cli = lambda *f: lambda: S.sample(cfg(*f))  # in-process: each CLI call costs 2 s
    assert_dies(capsys, cli(tmp_path / "x.png", "red=1,blue=1"), "at most one of")
    assert_dies(capsys, cli(tmp_path / "x.png", "purple=1"), "--set")
    assert_dies(capsys, cli(tmp_path / "x.png", "red=2"), "each value is 0 or 1")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "y.png")
    assert_dies(capsys, cli(tmp_path / "y.png", "red=1"), "takes 32x32")


def test_cli_folder_with_metadata_attrs(tmp_path):
    from PIL import Image

    folder, rng = tmp_path / "faces", np.random.default_rng(0)
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "attrs": {"smile": i % 2, "hat": int(i > 1)}})
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = tmp_path / "run"
    run("stargan.py", f"--dataset folder:{folder} --tiny --batch-size 2 --steps 2 --out", out)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["attrs"] == ["hat", "smile"] and ck["groups"] == []
    run("stargan.py", "--out", out, "--sample", 3)
    z = np.load(out / "samples.npz")
    assert z["arr_0"].shape == (3, 16, 16, 3) and (z["arr_1"] == -1).all()
    assert z["arr_2"].shape == (3, 2)


def test_bad_input(fake_mnist, tmp_path, capsys):
    """One CLI call for the contract (exit 2, one line); the other checks in-process."""
    out = tmp_path / "run"
    assert_one_line_error(run("stargan.py", "--n-critic", 0, check=False), "--n-critic")
    load = lambda **k: lambda: S.load_data(S.Config(data_dir=str(fake_mnist), **k), True)
    assert_dies(capsys, load(dataset="faces"), "--dataset 'faces'")
    assert_dies(capsys, load(attrs="red,purple"), "subset of")
    assert_dies(capsys, load(dataset=f"folder:{tmp_path}"), "metadata.jsonl")
    (tmp_path / "celeba").mkdir()
    celeba = S.Config(dataset="celeba", data_dir=str(tmp_path))
    assert_dies(capsys, lambda: S.load_data(celeba, True), "list_attr_celeba")
    assert_dies(capsys, lambda: S.model_args(S.Config(), 3, 30, 4), "image size 30")
    trained = lambda: S.load_trained(S.Config(out=str(out), device="cpu"))
    assert_dies(capsys, trained, "no checkpoint")
    out.mkdir()
    torch.save({"step": 1, "G": {}, "D": {}}, out / "ckpt.pt")  # cgan_pix2pix.py's keys
    assert_dies(capsys, trained, "not a", "checkpoint")
    resume = S.Config(out=str(out), data_dir=str(fake_mnist), tiny=True, resume=True, steps=1)
    assert_dies(capsys, lambda: S.train(resume), "not a", "checkpoint")
    (out / "ckpt.pt").write_bytes(b"garbage")
    assert_dies(capsys, trained, "corrupted")


@pytest.mark.slow
def test_ddp_two_ranks_stay_in_step(fake_mnist, tmp_path):
    torchrun(
        "stargan", TINY, "--sample-every 0 --steps 4 --data-dir", fake_mnist, "--out", tmp_path
    )
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {k.split(".")[0] for k in w0} == {"0", "1"}  # G and D
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [
        k for k in w0 if not torch.equal(w0[k], w1[k])
    ]


@pytest.mark.slow
def test_learns_to_recolour_real_digits(tmp_path):
    """300 --tiny steps on real digits (lr 5e-4): the translations take the target colour
    (measured: 0.32 untrained, 0.69 after 200 steps, 1.00 after 400)."""
    flags = "--tiny --steps 300 --batch-size 16 --lr 5e-4 --log-every 100 --sample-every 0"
    run("stargan.py", flags, "--digits mnist-12k --out", tmp_path)
    p = run("stargan.py", "--out", tmp_path, "--sample", 300, "--batch-size", 300)
    r = json.loads(p.stdout.splitlines()[-2])
    assert r["colour_acc"] > 0.8, r
