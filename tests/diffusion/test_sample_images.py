"""`prefopt sample-images` writes a labelled PNG grid of a saved diffusion model's samples,
class by class, and the mean reward of those very samples; bad classes are named."""

import json

import numpy as np
from PIL import Image

from prefopt_jax import cli
from prefopt_jax.commands.sample_images import sample_grid
from prefopt_jax.diffusion import digits, rewards, sampling, spec


def saved_model(tmp_path, random_dit):
    model = random_dit(seed=3)
    schedule = spec.Schedule(num_steps=50)
    return spec.save(model, schedule, str(tmp_path / "model")), model, schedule


def test_grid_and_rewards_of_a_saved_model(tmp_path, random_dit, capsys):
    directory, model, schedule = saved_model(tmp_path, random_dit)
    out = tmp_path / "grid.png"
    argv = ["sample-images", "--model", directory, "--out", str(out), "--per-class", "3",
            "--classes", "2,5", "--steps", "4", "--reward", "contrast", "--scale", "2",
            "--seed", "1"]
    assert cli.main(argv) == 0
    height, width = digits.grid_shape(6, 16, 16, 3, True)
    assert Image.open(out).size == (width, height)
    report = json.loads((tmp_path / "grid.json").read_text())
    config = sampling.SamplerConfig(method="ddim", num_steps=4, clip_x0=1.0)
    images, labels = sample_grid(model, schedule, config, [2, 5], 3, seed=1)
    np.testing.assert_array_equal(labels, [2, 2, 2, 5, 5, 5])
    want = np.asarray(rewards.stroke_contrast(images, labels))
    assert abs(report["mean"] - want.mean()) < 1e-6
    assert abs(report["per_class"]["5"] - want[3:].mean()) < 1e-6
    assert "wrote 6 samples" in capsys.readouterr().out


def test_a_class_the_model_lacks_is_named(tmp_path, random_dit, capsys):
    directory, _, _ = saved_model(tmp_path, random_dit)
    argv = ["sample-images", "--model", directory, "--out", str(tmp_path / "g.png"),
            "--classes", "3,11"]
    assert cli.main(argv) == 2
    assert "the model has classes 0...9; got [11]" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
