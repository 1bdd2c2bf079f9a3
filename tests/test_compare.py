"""compare.py: the rows it writes, their resumption, the report from the lines alone, and bad
lines as one-line errors that change nothing."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_one_line_error, run

import compare


def test_every_family_names_its_files_and_a_budget_that_adds_up():
    for name, fam in compare.FAMILIES.items():
        shares = [share for _, _, share in fam.stages]
        assert shares[-1] is None and sum(shares[:-1]) < 1, name  # the last stage: the rest
        assert all((compare.ROOT / script).is_file() for script, _, _ in fam.stages), name
        assert fam.kind in ("generator", "translator"), name
    h = compare.digest("dcgan", compare.FAMILIES["dcgan"], 10.0)
    assert h == compare.digest("dcgan", compare.FAMILIES["dcgan"], 10.0)  # a stable hash
    assert h != compare.digest("dcgan", compare.FAMILIES["dcgan"], 5.0)  # of the settings too


@pytest.mark.slow
def test_two_cheap_rows_resume_report_and_refuse_a_foreign_line(tmp_path):
    """ppca (closed form: the final point) and dcgan at 0.015, 0.03, 0.06 minutes: well-formed
    lines with every field; a second call measures nothing; the report comes from the lines
    alone; a malformed line stops the run in one line and leaves the file as it was."""
    docs = tmp_path / "docs"
    docs.mkdir()
    flags = ["--families", "ppca,dcgan", "--minutes", "0.06", "--samples", "100"]
    flags += ["--out", tmp_path / "runs", "--docs", docs]
    flags += ["--score-flags", f"--epochs 1 --cache-dir {tmp_path / 'cache'}"]

    def compare_py():  # --score-flags is one argument with spaces: not through run()
        cmd = [sys.executable, ROOT / "compare.py", *map(str, flags)]
        subprocess.run(cmd, check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})

    compare_py()
    rows = [json.loads(line) for line in (docs / "compare.jsonl").read_text().splitlines()]
    assert [(r["family"], r["minutes"]) for r in rows] == [
        ("ppca", 0.06),
        ("dcgan", 0.015),
        ("dcgan", 0.03),
        ("dcgan", 0.06),
    ]
    for r in rows:
        assert all(k in r for k in compare.FIELDS) and r["fid"] > 0 and r["n"] == 100, r
    assert rows[0]["bpd"] > 5 and all(r["steps"] > 0 for r in rows[1:])
    assert rows[1]["images"] < rows[2]["images"] < rows[3]["images"]  # resumed, not restarted
    assert 3.6 <= rows[3]["seconds"] < 3.6 + 30  # the budget, and at most one step more
    text = (docs / "compare.jsonl").read_text()
    compare_py()
    assert (docs / "compare.jsonl").read_text() == text  # nothing measured again
    (docs / "compare.md").unlink()
    (docs / "compare.png").unlink()
    run("compare.py", "--report", "--docs", docs)
    md = (docs / "compare.md").read_text()
    assert "| dcgan | 0.06 |" in md and "| ppca |" in md and (docs / "compare.png").stat().st_size
    (docs / "compare.jsonl").write_text(text + '{"family": "x"}\n')
    p = run("compare.py", "--report", "--docs", docs, check=False)
    assert_one_line_error(p, "compare.jsonl:5 is not a compare.py line")
    assert (docs / "compare.jsonl").read_text() == text + '{"family": "x"}\n'


def test_bad_flags_are_one_line(tmp_path):
    p = run("compare.py", "--families", "dcgan,nope", "--docs", tmp_path, check=False)
    assert_one_line_error(p, "unknown nope")


def test_readme_cells_come_from_the_lines():
    """Each `file.py` row's headline cell: its families at the longest budget, with the commit;
    a file with no line says so; the other cells and lines stay as they were."""
    text = "intro | x\n| `gan.py` | p | r | old | page |\n| `vae.py` | p | r | old | page |\n"
    row = {k: 0 for k in compare.FIELDS} | dict(family="dcgan", commit="abc1234", fid=123.456)
    rows = [row | dict(minutes=5.0, fid=300.0), row | dict(minutes=10.0)]
    new = compare.readme_table(rows, text).splitlines()
    assert new[0] == "intro | x"
    assert new[1] == "| `gan.py` | p | r | dcgan: FID-CNN 123.5 (`abc1234`) | page |"
    assert new[2].startswith("| `vae.py` | p | r | not measured yet") and new[2].endswith(
        "| page |"
    )


def test_an_interrupted_family_keeps_its_lines_and_never_mislabels_a_point(tmp_path, monkeypatch):
    """Each line is kept as soon as it is measured; a rerun after an interruption resumes the
    points still missing, and a run folder already past the next point (or of other settings)
    is measured again from nothing instead of being scored as that point."""
    fam, calls, kept = compare.FAMILIES["dcgan"], [], []
    h = compare.digest("dcgan", fam, 10.0)
    args = type("Args", (), dict(samples=10, score_flags="", run=1))()

    def call(cmd, timeout=3600):
        calls.append([str(c) for c in cmd])
        if len(calls) == 7:  # the third point's training: the machine stops here
            raise KeyboardInterrupt
        return '{"fid": 1.0}', 1.0

    monkeypatch.setattr(compare, "call", call)
    monkeypatch.setattr(compare, "checkpoint_facts", lambda out: dict(steps=1, images=1, seconds=1))
    out = tmp_path / "dcgan"
    with pytest.raises(KeyboardInterrupt):
        compare.measure("dcgan", fam, 10.0, out, set(), args, kept.append)
    assert [r["minutes"] for r in kept] == [2.5, 5.0]  # kept before the interruption
    trained = lambda: [c for c in calls if "--minutes" in c]
    calls.clear()
    done = {("dcgan", r["minutes"], h) for r in kept}
    compare.measure("dcgan", fam, 10.0, out, done, args, kept.append)
    assert [c[c.index("--minutes") + 1] for c in trained()] == ["10.0"]
    assert "--resume" in trained()[0] and out.exists()  # resumed: not past 10 minutes
    (out / "last.minutes").write_text(f"{h} 10.0")  # trained to 10, the 5-minute line lost
    calls.clear()
    compare.measure("dcgan", fam, 10.0, out, {("dcgan", 2.5, h)}, args, kept.append)
    assert "--resume" not in trained()[0]  # from nothing: 10 minutes are not 5
    assert [c[c.index("--minutes") + 1] for c in trained()] == ["5.0", "10.0"]


def test_a_repeated_row_gives_the_spread_and_never_replaces_the_first_run(tmp_path):
    """Lines of `--run 2` stand beside run 1's of the same hash in a spread table with the
    largest relative FID-CNN difference; the tables and README's cells keep run 1's figures."""
    row = {k: 0 for k in compare.FIELDS} | dict(family="dcgan", minutes=10.0, hash="h", commit="c")
    rows = [
        row | dict(fid=100.0, train_img_s=100.0),
        row | dict(fid=120.0, run=2, train_img_s=110.0),
        row | dict(fid=1.0, hash="x", run=2),
        row | dict(fid=90.0, run=3, train_img_s=180.0, commit="d"),
    ]
    assert compare.latest(rows)[("dcgan", 10.0)]["fid"] == 100.0
    compare.report(rows, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    runs = [ln.split(" | ")[2] for ln in md.split("Run-to-run")[1].splitlines() if "dcgan" in ln]
    assert runs == ["1", "2", "3"]  # run 1 once, each repeat under it
    assert "| dcgan | 10 | 1 | 100 |" in md and "| dcgan | 10 | 3 | 90 |  |  | 180 | d |" in md
    assert compare.spread([row | dict(fid=None), row | dict(run=2)])[0] == "## Run-to-run spread"
    assert (
        "differs by up to 20% (20% at 10 minutes) and training images/s by up to 80%" in md
        and "| 1 |" not in md.split("Run-to-run")[0]
    )
    assert "dcgan: FID-CNN 100 (`c`)" in compare.readme_table(
        rows, "| `gan.py` | p | r | x | y |\n"
    )


def test_a_translator_row_shows_its_no_learning_baseline_beside_it(tmp_path):
    """The translators' table puts each row's baseline (bicubic, mean fill, the source) beside
    it, and ldm_inpaint's PSNR in the holes fills the psnr column."""
    row = {k: 0 for k in compare.FIELDS} | dict(minutes=10.0, hash="h", commit="c", run=1)
    inpaint = dict(psnr_in_holes=9.25, cond_acc=0.5, mean_fill_psnr_in_holes=10.75)
    inpaint |= dict(mean_fill_cond_acc=0.625, mean_fill_fid=539.0)
    rows = [
        row | dict(family="ldm_inpaint") | inpaint,
        row | dict(family="unit", l1=0.025, l1_source_as_output=0.125),
        row | dict(family="pix2pix", l1=0.5),
    ]
    compare.report(rows, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    assert "| ldm_inpaint | 10 | 0.5 |  | 9.25 |" in md
    assert "| mean fill: psnr 10.75, digit acc 0.625, FID-CNN 539 |" in md
    assert "| source as output: L1 0.125 |" in md and "| pix2pix | 10 |  | 0.5 |" in md
    assert compare.baseline(row | dict(family="pix2pix")) == ""
