"""common.py: config parsing, atomic checkpoints, EMA, resumable batches, the nan guard."""

import dataclasses

import pytest
import torch

import common


@dataclasses.dataclass
class Cfg(common.Config):
    beta: float = 0.5  # a model knob
    ema: bool = False  # another


def test_parse_flags_both_spellings_and_bools(capsys):
    c = common.parse(
        Cfg, "x", ["--batch-size", "64", "--log_every=7", "--compile", "--no-amp", "--beta", "2"]
    )
    assert (c.batch_size, c.log_every, c.compile, c.amp, c.beta, c.out) == (
        64,
        7,
        True,
        False,
        2.0,
        "runs/x",
    )
    with pytest.raises(SystemExit) as e:
        common.parse(Cfg, "x", ["-h"])
    h = capsys.readouterr().out
    assert (
        e.value.code == 0
        and "--no-compile" in h
        and "a model knob (default: 0.5)" in h
        and "--batch-size" in h
    )


def test_save_ckpt_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.save_ckpt(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash(obj, f):  # the process dies half-way through writing the new checkpoint
        f.write(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_ckpt(path, {"step": 2, "w": torch.zeros(3)})
    assert (tmp_path / "ckpt.pt.tmp").read_bytes() == b"garbage"
    assert common.load_ckpt(path)["step"] == 1  # the previous checkpoint is intact
    monkeypatch.setattr(torch, "save", real_save)
    common.save_ckpt(path, {"step": 3, "w": torch.zeros(3)})  # a later save replaces the garbage
    assert common.load_ckpt(path)["step"] == 3 and not (tmp_path / "ckpt.pt.tmp").exists()


def test_load_ckpt_strips_compile_prefix_and_rejects_garbage(tmp_path, capsys):
    common.save_ckpt(tmp_path / "c.pt", {"step": 0, "model": {"_orig_mod.w": torch.ones(1)}})
    assert list(common.load_ckpt(tmp_path / "c.pt")["model"]) == ["w"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        common.load_ckpt(tmp_path / "bad.pt")
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_ema_follows_the_closed_form():
    m = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(m.weight)
    ema = common.EMA(m, decay=0.9)
    expected = 0.0
    for step in range(20):
        m.weight.data.fill_(float(step + 1))
        ema.update(m, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * (step + 1)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.module.weight.requires_grad


def test_batches_resume_mid_epoch_and_range():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 25
    y = torch.arange(10)
    a = common.Batches(x, y, 4, seed=3, device=torch.device("cpu"))
    seq = [next(a)[1].tolist() for _ in range(5)]  # 2 batches per epoch: crosses epochs
    assert all(len(s) == 4 and len(set(s)) == 4 for s in seq) and seq[0] != seq[2]
    b = common.Batches(x, y, 4, seed=3, device=torch.device("cpu"))
    for _ in range(3):
        next(b)
    c = common.Batches(x, y, 4, seed=3, device=torch.device("cpu"))
    c.load_state_dict(b.state_dict())
    assert [next(c)[1].tolist() for _ in range(2)] == seq[3:]
    xb, yb = next(a)
    assert (
        xb.min() >= -1
        and xb.max() <= 1
        and torch.allclose(xb.flatten(), yb.float() * 25 / 127.5 - 1)
    )


def test_logger_nan_guard_exits_1(tmp_path, capsys):
    data = common.Batches(
        torch.zeros(4, 1, 1, 1, dtype=torch.uint8), torch.zeros(4), 2, 0, torch.device("cpu")
    )
    log = common.Loop(common.Config(out=str(tmp_path), steps=10), data, 0)
    log.add(loss=torch.tensor(0.5))
    assert log.check(1) == {"loss": 0.5}
    log.add(loss=torch.tensor(float("inf")))
    with pytest.raises(SystemExit) as e:
        log.log(2)
    assert e.value.code == 1 and "not finite" in capsys.readouterr().err


def test_due_first_every_and_last():
    """Log lines at step 1, grids at step 200: signs of life long before --log-every and
    --sample-every (DDPM's default 1,000) come round."""
    assert [s for s in range(1, 2501) if common.due(s, 1000, 2500, first=200)] == [
        200,
        1000,
        2000,
        2500,
    ]
    assert [s for s in range(1, 11) if common.due(s, 100, 10, first=1)] == [1, 10]
    assert [s for s in range(1, 6) if common.due(s, 0, 5)] == [5]  # --ckpt-every 0: the end only


def test_threads_flag():
    """--threads N sets torch's CPU threads (fewer run faster on shared cores: docs/bench.md);
    without it torch's own default stands."""
    before = torch.get_num_threads()
    try:
        common.setup(common.Config(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        common.setup(common.Config(device="cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_minutes_stop_within_a_step_and_resume_to_the_total(tmp_path, monkeypatch):
    """--minutes: the loop's clock (pictures and checkpoints off it) stops the run at the first
    step boundary past the budget, with a checkpoint that carries the time spent; --resume with a
    larger budget goes on to the total. A fake clock: one second a step, 10 s for a picture."""
    now = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    x = torch.zeros(8, 1, 1, 1, dtype=torch.uint8)
    cfg = common.Config(out=str(tmp_path), steps=100, minutes=0.05, ckpt_every=0)  # 3 s
    data = common.Batches(x, torch.zeros(8), 2, 0, torch.device("cpu"))

    def train(start):
        loop = common.Loop(cfg, data, start)
        for step in range(start, cfg.steps):
            now[0] += 1.0  # the step
            loop.aside(lambda: now.__setitem__(0, now[0] + 10))  # a picture: off the clock
            if loop.end_step(step + 1, w=torch.ones(1)):
                return step + 1
        return cfg.steps

    assert train(0) == 3  # 3 steps of 1 s; the pictures' 30 s do not count
    ck = common.load_ckpt(tmp_path / "ckpt.pt")
    assert ck["step"] == 3 and ck["seconds"] == pytest.approx(3.0)
    cfg.minutes, cfg.resume = 0.1, True  # 6 s in all
    common.resume(cfg, data)
    assert cfg.seconds == pytest.approx(3.0) and train(3) == 6


@pytest.mark.slow
def test_a_stop_by_minutes_writes_what_a_stop_by_steps_writes(fake_mnist, tmp_path):
    """gan.py stopped by --minutes at step k, and again by --steps k: the same checkpoint."""
    from conftest import run

    flags = ["--tiny", "--batch-size", "8", "--sample-every", "0", "--data-dir", fake_mnist]
    run("gan.py", *flags, "--minutes", "0.02", "--out", tmp_path / "a")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    run("gan.py", *flags, "--steps", a["step"], "--out", tmp_path / "b")
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a.keys() == b.keys() and a["step"] == b["step"] > 1 and a["seconds"] >= 1.2
    assert a["data"] == b["data"] and a["config"]["minutes"] == 0.02
    for k in ("G", "D"):  # the same weights, bit for bit
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    adam = lambda ck: [s["exp_avg"] for s in ck["opt_g"]["state"].values()]
    assert adam(a) and all(torch.equal(u, v) for u, v in zip(adam(a), adam(b)))
