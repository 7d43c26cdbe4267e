"""User errors at the command line: one short message naming the culprit, status 2, no traceback.

A gin typo, a missing data file, a broken row (named by file and line), a missing model; each
checked before any model loads. `--debug` / `PREFOPT_DEBUG=1` show the traceback instead.
"""

import json
import os
import subprocess
import sys

import pytest

from prefopt_jax import cli
from prefopt_jax.commands.train import split_gin_args
from prefopt_jax.errors import ConfigError
from prefopt_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_DPO = "configs/experiments/dpo_smollm2_lora.gin"


def prefopt(*args, debug="0"):
    env = {**os.environ, "PREFOPT_DEBUG": debug, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "prefopt_jax.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(proc, *needles):
    message = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in message and len(message.splitlines()) <= 5, message
    for needle in needles:
        assert needle in message, message


def pairs(n):
    return [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}.",
             "rejected": f" Bad answer {i}."} for i in range(n)]


def test_gin_typo_names_the_binding_and_close_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PREFOPT_DEBUG", raising=False)
    argv = ["train", "configs/experiments/tiny.gin", "--gin.LoopConfig.stepz=3",
            f"--gin.LoopConfig.output_dir='{tmp_path}'"]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) <= 5 and "Traceback" not in message, message
    assert "LoopConfig.stepz" in message and "close names: LoopConfig.steps" in message, message
    with pytest.raises(ConfigError, match="stepz"):  # --debug: the error and its traceback
        cli.main(["--debug", *argv])
    assert not os.listdir(tmp_path)  # nothing written


def test_broken_row_is_named_by_file_and_line(tmp_path):
    rows = pairs(12)
    rows[7]["rejected"] = rows[7]["chosen"]  # row 7 counting from 0: line 8
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = prefopt("train", LORA_DPO, f"--gin.DATA_PATH='{path}'",
                   f"--gin.LoopConfig.output_dir='{tmp_path / 'run'}'")
    assert_user_error(proc, f"{path} line 8, field 'rejected': chosen identical to rejected")


def test_missing_data_and_model_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)

    def no_loading(spec):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loop, "load_model", no_loading)
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["train", LORA_DPO, f"--gin.DATA_PATH='{missing}'",
                     f"--gin.LoopConfig.output_dir='{tmp_path / 'run'}'"]) == 2
    err = capsys.readouterr().err
    assert f"data source {missing}: no such file or directory" in err, err
    assert len(err.strip().splitlines()) <= 5 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(4)))
    assert cli.main(["train", LORA_DPO, f"--gin.DATA_PATH='{tmp_path / 'ok.jsonl'}'",
                     f"--gin.ModelSpec.source='{tmp_path / 'no_model'}'",
                     f"--gin.LoopConfig.output_dir='{tmp_path / 'run'}'"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no_model") in err and len(err.strip().splitlines()) <= 5, err


@pytest.mark.parametrize("command", ["train", "eval", "generate", "data", "convert"])
def test_help_mentions_gin_overrides_or_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text.lower(), text
    if command in ("train", "eval"):
        assert "--gin.NAME=VALUE" in text, text


def test_gin_bindings_in_every_form_gin_users_type(capsys):
    rest, bindings = split_gin_args(["a.gin", "--gin.X.y=1", "--gin", "X.z='b'", "--gin=W.v=2",
                                     "--debug"])
    assert rest == ["a.gin", "--debug"] and bindings == ["X.y=1", "X.z='b'", "W.v=2"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "configs/experiments/tiny.gin", "--gin"])
    assert exit_.value.code == 2
    assert "--gin needs a binding" in capsys.readouterr().err


def test_the_installed_command_finds_reward_modules_in_the_working_directory(tmp_path):
    # The console script, not `python -m` (which puts the working directory on sys.path itself),
    # run outside the repository: includes resolve without gin's "Path not found" noise.
    script = os.path.join(os.path.dirname(sys.executable), "prefopt")
    assert os.path.exists(script), f"{script}: the package's console script is not installed"
    (tmp_path / "my_rewards.py").write_text(
        "def lengths(prompts, completions, **fields):\n"
        "    open('calls.txt', 'a').write(f'{len(completions)}\\n')\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    proc = subprocess.run(
        [script, "train", os.path.join(ROOT, "configs/experiments/grpo_tiny.gin"),
         "--gin", "RLConfig.rewards=['my_rewards:lengths']", "--gin", "LoopConfig.steps=1",
         f"--gin=LoopConfig.output_dir='{tmp_path / 'run'}'"],
        cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "calls.txt").read_text().split() == ["16"]  # 4 prompts x 4 samples
    assert "Path not found" not in proc.stderr, proc.stderr[-2000:]
