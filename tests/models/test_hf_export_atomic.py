"""``save_pretrained`` never leaves a half-written export: temporary directory, then rename."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from prefopt_jax.models import from_pretrained, hf, save_pretrained


def test_fresh_export_is_renamed_into_place(tmp_path, tiny_model):
    out = save_pretrained(tiny_model(seed=1), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left
    from_pretrained(out)


def test_existing_export_is_replaced_file_by_file_keeping_others(tmp_path, tiny_model):
    out = tmp_path / "export"
    save_pretrained(tiny_model(seed=1), out)
    (out / "notes.txt").write_text("kept")
    save_pretrained(tiny_model(seed=2), out)
    assert (out / "notes.txt").read_text() == "kept"
    expected = tmp_path / "expected"
    save_pretrained(tiny_model(seed=2), expected)
    got, want = load_file(str(out / "model.safetensors")), load_file(
        str(expected / "model.safetensors"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected", "export"]


def test_failed_write_keeps_the_previous_export(tmp_path, tiny_model, monkeypatch):
    out = save_pretrained(tiny_model(seed=1), tmp_path / "export")
    before = load_file(str(out / "model.safetensors"))

    def killed(model, directory, tokenizer):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "_write_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_model(seed=2), out)
    after = load_file(str(out / "model.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
