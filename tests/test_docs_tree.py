"""docs/architecture.md names every module of the package, and every module it names exists."""
import pathlib
import re

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "ciae_jax"


def _named_in_docs():
  text = (REPO_ROOT / "docs" / "architecture.md").read_text()
  return set(re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.py)`", text))


def test_every_module_is_named():
  modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if p.name != "__init__.py"}
  missing = sorted(modules - _named_in_docs())
  assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_named_module_exists():
  # Package modules by their path in ciae_jax/; scripts elsewhere (benchmarks/, tools/, ...) by
  # their path or name anywhere in the repository.
  stale = sorted(name for name in _named_in_docs()
                 if not (PACKAGE / name).is_file()
                 and not any(PACKAGE not in p.parents for p in REPO_ROOT.rglob(name)))
  assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
