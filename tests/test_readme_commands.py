"""Every command in README.md's ```bash blocks names a script or module that exists, with flags it
accepts, and every import of its ```python blocks resolves: the README cannot drift from the code.

Flags are read from each program's own help (`--helpfull` for absl programs, `--help` for
argparse ones) in a subprocess, so nothing is trained or compiled; `--config.a.b=value` overrides
are checked against the config file the command names (variant included). The main job's command
itself is run by tests/test_main_job.py.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_ABSL_FLAG = re.compile(r"^\s+--(\[no\])?([\w.]+):", re.M)
_ARGPARSE_FLAG = re.compile(r"^\s+(?:-\w+(?: \S+)?, )?--([\w-]+)", re.M)


def fenced_blocks(text: str, language: str) -> list[str]:
  """The bodies of the fenced blocks of `language` in a Markdown text."""
  return [body for lang, body in _FENCE.findall(text) if lang == language]


def shell_commands(block: str) -> list[list[str]]:
  """The commands of a bash block as token lists: continuation lines joined, comments dropped,
  `a && b` split."""
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    tokens = shlex.split(line, comments=True)
    command = []
    for token in tokens + ["&&"]:
      if token == "&&":
        if command:
          commands.append(command)
        command = []
      else:
        command.append(token)
  return commands


@functools.cache
def accepted_flags(program: tuple[str, ...]) -> frozenset[str]:
  """The long flags a program accepts, from its help: `program` is e.g. ("train.py",) or
  ("-m", "ciae_jax.demo"). absl booleans count in both forms (`--x`, `--nox`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  run = lambda flag: subprocess.run([sys.executable, *program, flag], cwd=REPO_ROOT, env=env,
                                    capture_output=True, text=True, timeout=120, check=False)
  # absl prints every flag and exits with 1; argparse rejects the flag with its usage and 2.
  result = run("--helpfull")
  if result.returncode != 2:
    names = set()
    for no, name in _ABSL_FLAG.findall(result.stdout + result.stderr):
      names.add(name)
      if no:
        names.add("no" + name)
    assert names, f"{program}: no absl flags in its --helpfull:\n{result.stdout[-2000:]}"
    return frozenset(names)
  result = run("--help")
  assert result.returncode == 0, f"{program} --help failed:\n{result.stderr[-2000:]}"
  return frozenset(_ARGPARSE_FLAG.findall(result.stdout))


def load_config(spec: str):
  """The ConfigDict of `configs/x.py[:variant]`, as `--config` builds it."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("readme_config", REPO_ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def check_python(args: list[str], where: str) -> list[str]:
  """Problems of `python [-m MOD | SCRIPT] ARGS`: a missing module or script, an unknown flag,
  a `--config.x.y` override naming no field of the config."""
  if args[:2] == ["-m", "venv"]:
    return []
  if args[0] == "-m":
    program, rest = tuple(args[:2]), args[2:]
    if importlib.util.find_spec(args[1]) is None:
      return [f"{where}: no module {args[1]}"]
  else:
    program, rest = (args[0],), args[1:]
    if not (REPO_ROOT / args[0]).is_file():
      return [f"{where}: no script {args[0]}"]
  problems, config, overrides = [], None, []
  for i, token in enumerate(rest):
    if not token.startswith("--"):
      continue
    name, _, value = token[2:].partition("=")
    if name.startswith("config."):
      overrides.append(name[len("config."):])
      continue
    if name == "config":
      config = value or rest[i + 1]
    if name not in accepted_flags(program):
      problems.append(f"{where}: {' '.join(program)} does not accept --{name}")
  if overrides:
    if config is None:
      return problems + [f"{where}: --config.* overrides without --config"]
    config_dict = load_config(config)
    for override in overrides:
      node = config_dict
      for key in override.split("."):
        if key not in node:
          problems.append(f"{where}: {config} has no field {override}")
          break
        node = node[key]
  return problems


def check_command(tokens: list[str], where: str) -> list[str]:
  """Problems of one shell command of the README (empty when it is right)."""
  while tokens and re.fullmatch(r"\w+=\S*", tokens[0]):  # VAR=value before the program.
    tokens = tokens[1:]
  program, args = pathlib.PurePosixPath(tokens[0]).name, tokens[1:]
  if program == "python":
    return check_python(args, where)
  if program == "bash":
    return [] if (REPO_ROOT / args[0]).is_file() else [f"{where}: no script {args[0]}"]
  if program == "pip":
    files = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
    return [f"{where}: no file {f}" for f in files if not (REPO_ROOT / f).is_file()]
  if program == "export":
    return []
  return [f"{where}: the test does not know how to check `{program}`; teach it"]


def test_readme_shell_commands_name_existing_programs_and_flags():
  problems, count = [], 0
  for block in fenced_blocks(README.read_text(), "bash"):
    for tokens in shell_commands(block):
      count += 1
      problems += check_command(tokens, shlex.join(tokens)[:80])
  assert count >= 10, count  # The README's set-up, test, training, evaluation, export commands.
  assert not problems, "\n".join(problems)


def test_readme_python_imports_resolve():
  blocks = fenced_blocks(README.read_text(), "python")
  assert blocks
  for block in blocks:
    for node in ast.walk(ast.parse(block)):
      if isinstance(node, ast.ImportFrom):
        module = importlib.import_module(node.module)
        for alias in node.names:
          assert hasattr(module, alias.name) or importlib.util.find_spec(
              f"{node.module}.{alias.name}"), f"{node.module} has no {alias.name}"


def test_checks_find_wrong_commands():
  """The checks fail where the README would be wrong (so the tests above can fail)."""
  cases = {
      "python train.py --config configs/synthetic.py --workdir w --no_such_flag": "--no_such_flag",
      "python train.py --config configs/synthetic.py --config.model.no_such_field=1":
          "no field model.no_such_field",
      "python -m ciae_jax.no_such_module --x": "no module",
      "python benchmarks/no_such_script.py": "no script",
      "python benchmarks/train_speed.py --size 64,64 --no_such_flag 1": "--no_such_flag",
      "bash scripts/no_such.sh": "no script",
  }
  for command, message in cases.items():
    problems = check_command(shlex.split(command), "case")
    assert len(problems) == 1 and message in problems[0], (command, problems)
  # And right commands pass: an absl boolean in its negative form, a config variant's field.
  assert not check_command(shlex.split(
      "python train.py --config configs/coco_r50.py:r101 --nomultihost "
      "--config.dataset.root=/data"), "case")


@pytest.mark.parametrize("block,expected", [
    ("a --x \\\n    --y  # and =1\nb && c d\n", [["a", "--x", "--y"], ["b"], ["c", "d"]]),
])
def test_shell_commands_are_split_as_bash_reads_them(block, expected):
  assert shell_commands(block) == expected
