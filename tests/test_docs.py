"""README.md is a one-page front door whose links all resolve, and its code runs as written."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODELS = "ddpm_ddim gan cgan_pix2pix cyclegan stargan progan vae vqvae flow cfg_ldm".split()


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_readme_is_one_page_with_a_row_and_a_page_per_model_file():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for m in MODELS:
        assert f"| `{m}.py` |" in text, m
        assert (ROOT / "docs" / f"{m}.md").is_file(), m


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"


@pytest.mark.slow
def test_readme_loads_and_samples_a_ddpm_from_its_class_alone(tmp_path):
    """The three lines under "Using a trained model" run as written, on a 2-step --tiny run, with
    only the classes and functions the README names copied out of ddpm_ddim.py."""
    out = tmp_path / "runs" / "ddpm_ddim"
    cmd = [sys.executable, str(ROOT / "ddpm_ddim.py"), "--tiny", "--steps", "2", "--batch-size"]
    cmd += ["8", "--sample-every", "0", "--dataset", "mnist-12k", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    names = re.findall(r"`(\w+)`", text.split("## Using a trained model")[1].split("```")[0])
    import ddpm_ddim

    env = {n: getattr(ddpm_ddim, n) for n in names if hasattr(ddpm_ddim, n)}
    assert {"UNet", "ddim_sample", "make_schedule"} <= env.keys(), names
    import torch

    env["torch"] = torch
    prog = f"import os\nos.chdir({str(tmp_path)!r})\n" + code
    exec(compile(prog, "README", "exec"), env)  # noqa: S102 - the README's own lines
    assert env["x"].shape == (16, 1, 28, 28) and env["x"].abs().max() <= 1


def test_readme_table_is_the_one_compare_writes():
    """Every figure in README's table is in docs/compare.jsonl for that row: the table equals what
    `python compare.py --report` writes from the lines (a hand-edited number fails here)."""
    import compare

    text = (ROOT / "README.md").read_text()
    rows = compare.read_lines(ROOT / "docs" / "compare.jsonl")
    assert compare.readme_table(rows, text) == text, "run: python compare.py --report"
    assert sum(line.startswith("| `") and ".py` |" in line for line in text.splitlines()) == 10
