"""Dependencies point one way (docs/architecture.md), checked on what importing really loads.

Each group of modules is imported in a fresh interpreter and the `ciae_jax` modules and
TensorFlow it pulls in are compared with what the layering allows: the device code (models,
losses, targets, memory, inference) and the train step load no TensorFlow and nothing of
evaluation or training's loop; the predictor, the export and evaluation load nothing of
`ciae_jax.training`.
"""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
  importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("ciae_jax", "tensorflow")))))
"""

# (modules imported, module prefixes they must not load)
CASES = {
    "device code": (["ciae_jax.models.ciae", "ciae_jax.losses.ciae", "ciae_jax.losses.fcos",
                     "ciae_jax.targets", "ciae_jax.memory", "ciae_jax.inference.panoptic",
                     "ciae_jax.inference.detection"],
                    ["tensorflow", "ciae_jax.training", "ciae_jax.evaluation", "ciae_jax.data",
                     "ciae_jax.inference.predictor"]),
    "train step": (["ciae_jax.training.step", "ciae_jax.training.train_state"],
                   ["tensorflow", "ciae_jax.evaluation", "ciae_jax.training.loop",
                    "ciae_jax.data.pipeline"]),
    "inference and evaluation": (["ciae_jax.inference.predictor", "ciae_jax.inference.export_lib",
                                  "ciae_jax.evaluation.runner", "ciae_jax.evaluation.tuning"],
                                 ["tensorflow", "ciae_jax.training"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_imports_point_one_way(case):
  modules, forbidden = CASES[case]
  result = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True,
                          text=True, cwd=REPO_ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(modules) <= set(loaded)  # The probe saw the modules themselves.
  wrong = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
  assert not wrong, f"importing {case} loads {wrong}"


def _module_imports():
  """{module: the ciae_jax modules it imports anywhere in its source (function bodies too)}."""
  package = REPO_ROOT / "ciae_jax"
  names = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in package.rglob("*.py")}
  graph = {}
  for name, path in names.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
      else:
        continue
      edges |= {t for t in targets if t in names and t != name}
    graph[name] = edges
  return graph


def _cycles(graph):
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph[node]):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_no_import_cycle():
  graph = _module_imports()
  assert len(graph) > 50 and graph["ciae_jax.training.step"]  # the walk sees the package
  assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
