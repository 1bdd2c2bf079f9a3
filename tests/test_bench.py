"""bench.py runs end to end on a tiny configuration and reports every column."""

import json

from conftest import assert_one_line_error, run

SMALL = "--batch-size 4 --sample-batch 2 --warmup 1 --iters 1 --device cpu"


def test_bench_tiny_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run("bench.py", "--tiny --image-size 28 --channels 1", SMALL, "--out", out)
    r = json.load(open(out))
    row = r["rows"][0]
    assert row["model"] == "ddpm_ddim.UNet" and row["params_M"] == 0.63
    assert all(row[k] > 0 for k in ("train_img_s", "ddim50_img_s", "ddpm1000_img_s"))
    assert r["info"]["shape"] == [1, 28, 28]


def test_bench_autoencoders_gans_and_flows_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run(
        "bench.py",
        "--models vae,vqvae,gan,flow,cfg_ldm,cyclegan,stargan --tiny --image-size 28 --channels 1",
        SMALL,
        "--out",
        out,
    )
    rows = {r["model"]: r for r in json.load(open(out))["rows"]}
    assert rows["vae.VAE"]["train_img_s"] > 0 and rows["vae.VAE"]["sample_img_s"] > 0
    assert rows["vqvae.VectorQuantizer ema"]["quantizer_fwd_bwd_img_s"] > 0
    assert all(
        rows["vqvae.VQVAE + CodePrior"][k] > 0
        for k in ("train_img_s", "prior_train_img_s", "sample_img_s")
    )
    for m in ("gan.py DCGAN", "cgan_pix2pix.py cGAN", "cgan_pix2pix.py pix2pix 32px"):
        assert rows[m]["train_img_s"] > 0 and rows[m]["sample_img_s"] > 0, m
    assert rows["gan.py DCGAN, D not frozen in G step"]["train_img_s"] > 0
    for m in ("pixels", "latents", "latents + encoder"):
        assert rows[f"cfg_ldm.LDM on {m}"]["cfg_ddim50_img_s"] > 0, m
    for m in ("flow.py glow", "flow.py glow --lu", "flow.py realnvp"):
        assert rows[m]["train_img_s"] > 0 and rows[m]["sample_img_s"] > 0, m
    for m in ("cyclegan.py 28px, 6 blocks", "stargan.py 28px, D 2 layers"):
        assert rows[m]["train_img_s"] > 0 and rows[m]["sample_img_s"] > 0, m


def test_bench_bad_input():
    assert_one_line_error(run("bench.py", "--models", "nope", check=False), "no benchmark for nope")
    assert_one_line_error(run("bench.py", "--image-size", 30, check=False), "--image-size 30")
