#!/usr/bin/env bash
# The test command (README "Tests"): installs the package with its pinned dependencies, then
# runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# `-e .` reads its dependencies from requirements.txt (pyproject.toml): the same pins.
python -m pip install -q -e . -r requirements-test.txt
# panopticapi-lite (the COCO panoptic API, our PQ reference) declares numpy<2, which jax 0.10 cannot
# use; its evaluation code needs only numpy and pillow, so it is installed without its dependencies.
python -m pip install -q --no-deps panopticapi-lite==0.2.0
# Lint first (settings in pyproject.toml): seconds, and a failure names file and line.
python -m ruff check .
python -m pytest -n 2 tests "$@"
