"""README's "Train on your own data" commands, run as written on a small random model.

The commands are read from README.md's section, so the README and this test cannot drift: the
data file and output directory point into tmp_path, the model is a one-layer random model with
SmolLM2's tokenizer (same chat template and vocabulary), and training runs 2 steps.
"""

import json
import os
import re
import shlex

from prefopt_jax import cli
from prefopt_jax.models import save_pretrained
from prefopt_jax.models.hf import builtin_path
from prefopt_jax.models.presets import tiny_config
from prefopt_jax.models.spec import random_model
from prefopt_jax.models.tokenizer import load_gguf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("prefopt ")]


def test_readme_own_data_commands_train_and_chat(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    tokenizer = load_gguf_tokenizer(builtin_path("smollm2-135m-instruct"))
    model_dir = tmp_path / "small_model"
    save_pretrained(random_model(tiny_config(vocab_size=len(tokenizer))), model_dir, tokenizer)
    rows = [{"prompt": [{"role": "user", "content": f"Describe day {i}."}],
             "chosen": [{"role": "assistant", "content": f"Day {i} was bright and kind."}],
             "rejected": [{"role": "assistant", "content": f"Day {i} was dull."}]}
            for i in range(16)]
    data = tmp_path / "my_prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mine"
    swap = {"my_prefs.jsonl": str(data), "runs/mine": str(out),
            "smollm2-135m-instruct": str(model_dir)}
    inspect, train, generate = readme_commands()
    assert [c[1] for c in (inspect, train, generate)] == ["data", "train", "generate"]

    def run(argv, *extra):
        argv = argv[1:]
        for old, new in swap.items():
            argv = [a.replace(old, new) for a in argv]
        return cli.main(argv + list(extra))

    assert run(inspect) == 0
    assert "format preference (conversational)" in capsys.readouterr().out
    assert run(train, f"--gin.ModelSpec.source='{model_dir}'", "--gin.LoopConfig.steps=2") == 0
    said = capsys.readouterr().out
    assert "step 2/2" in said and f"outputs in {out}" in said, said
    assert {"config.json", "generation_config.json", "model.safetensors",
            "prefopt_run.json"} <= set(os.listdir(out / "export"))
    assert run(generate, "--model", str(out / "export"), "--max-new-tokens", "4") == 0
    assert capsys.readouterr().out.strip()  # the (random) model's reply
