"""`prefopt data inspect` on a local file with a local tokenizer folder."""

import pytest

from prefopt_jax.cli import main
from prefopt_jax.data.synthetic import synthetic_rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return str(path)


def test_inspect_prints_format_lengths_truncation_and_layouts(tmp_path, tok_dir, write_jsonl,
                                                              capsys):
    path = write_jsonl(tmp_path / "hh.jsonl",
                       synthetic_rows(30, "implicit_preference", conversational=True))
    code = main(["data", "inspect", path, "--model", tok_dir, "--no-cache", "--max-length", "96",
                 "--prompt-truncation", "keep_end", "--rows", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "format implicit_preference (conversational), kind paired" in out
    assert "completions_truncated" in out and "example 1 (row 1)" in out
    for field in ("prompt length", "chosen length", "rejected length"):
        assert field in out
    for layout in ("padded", "packed", "prefix", "prefix_packed"):
        assert f"\n  {layout} " in out


def test_inspect_reports_bad_rows(tmp_path, tok_dir, write_jsonl, capsys):
    rows = synthetic_rows(5, "preference")
    rows[2]["chosen"] = rows[2]["rejected"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "inspect", path, "--model", tok_dir, "--no-cache"]) == 1
    assert "d.jsonl line 3, field 'rejected': chosen identical to rejected" in capsys.readouterr().out
    assert main(["data", "inspect", path, "--model", tok_dir, "--no-cache",
                 "--skip-bad-rows"]) == 0
    out = capsys.readouterr().out
    assert "rows_skipped: 1" in out and "e.g. row 2" in out


def layout_table(out):
    """{layout: (padding, tokens/row, rows/batch, row length, shapes)} from inspect's table."""
    rows = {}
    for line in out.split("layouts (")[1].splitlines()[2:]:
        name, *values = line.split()
        rows[name] = tuple(float(v) for v in values)
    return rows


def test_inspect_length_step_shows_finer_rows(tmp_path, tok_dir, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_rows(24, "preference", seed=5))
    args = ["data", "inspect", path, "--model", tok_dir, "--no-cache", "--batch-size", "4"]
    assert main(args) == 0
    coarse = layout_table(capsys.readouterr().out)
    assert main(args + ["--length-step", "8"]) == 0
    fine = layout_table(capsys.readouterr().out)
    assert set(fine) == set(coarse) == {"padded", "packed", "prefix", "prefix_packed"}
    for layout in fine:
        assert fine[layout][0] <= coarse[layout][0], layout  # padding
    assert fine["padded"][0] < coarse["padded"][0]
    assert fine["padded"][3] != coarse["padded"][3]  # mean row length
