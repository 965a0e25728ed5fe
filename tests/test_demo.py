"""The demo as a new user runs it: the README's command, word for word, and its argument checks.

The command runs in a folder laid out like the repository after the main job: `configs/` (a
link to the repository's), `runs/synthetic` (a checkpoint of the main job's model at its
initialisation: params, model state, memory) and `data/synthetic` (a small COCO-layout dataset
holding the README's image).
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_demo_command() -> list[str]:
  """The words of the README's demo command (the code block of "## Predicting and exporting"
  that runs `ciae_jax.demo`)."""
  readme = (REPO_ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  block, = (b for b in blocks if "-m ciae_jax.demo" in b)
  return shlex.split(block.replace("\\\n", " "))


def _run(words, cwd, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true", CIAE_JAX_CACHE_DIR=str(cwd / "jax_cache"),
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  assert words[0] == "python"
  result = subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  return result.returncode, result.stdout + result.stderr


def test_the_readme_demo_command_writes_a_legible_picture(user_folder):
  words = readme_demo_command()
  assert words[:3] == ["python", "-m", "ciae_jax.demo"], words
  code, output = _run(words, user_folder)
  assert code == 0, output[-4000:]
  out = user_folder / words[words.index("--output") + 1]
  assert out.is_file(), output[-4000:]  # The picture itself, not the log line naming it.
  picture = np.asarray(Image.open(out))
  # input | panoptic | embedding PCA, each the 128-pixel image scaled to 512, under titles.
  assert picture.shape[1] == 3 * 512 + 2 * 8 and 512 < picture.shape[0] < 600, picture.shape
  assert picture.std() > 0
  assert (user_folder / "jax_cache").is_dir() and any((user_folder / "jax_cache").iterdir())


def test_wrong_arguments_fail_before_anything_is_loaded(user_folder, tmp_path):
  words = readme_demo_command()
  image = words.index("--image") + 1
  missing = list(words)
  missing[image] = "data/synthetic/val2017/000000000001.jpg"
  code, output = _run(missing, user_folder)
  assert code != 0 and "no such file" in output, output[-2000:]
  assert "000002000000.jpg" in output  # The images that are there, as a hint.
  assert "xla_bridge" not in output  # JAX never started its backends.
  no_checkpoint = list(words)
  no_checkpoint[words.index("--workdir") + 1] = str(tmp_path / "empty")
  code, output = _run(no_checkpoint, user_folder)
  assert code != 0 and "no checkpoint" in output, output[-2000:]
