r"""Exports a trained CIAE as serialised JAX programs (StableHLO), one per canvas.

  python -m ciae_jax.export --config configs/synthetic.py --workdir runs/synthetic \
      --output exported [--checkpoint_step N] [--platforms cpu,cuda] [--batch_size 1]

Writes OUTPUT/export.json (categories, canvases, the resize rule and the normalisation, each
program's file, inputs and outputs), OUTPUT/weights.npz (variables and memory, the programs'
first argument) and one `canvas_HxW.jaxexport` per canvas of the config, lowered for every
platform in `--platforms` (`ciae_jax/inference/export_lib.py`). Read them back with
`export_lib.ExportedPredictor(OUTPUT)`, or without this package with `examples/serve_exported.py`.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ciae_jax import console
from ciae_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding the checkpoints.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for export.json and the programs.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "Platforms each program is lowered for (jax.export).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per call of each program.")
_KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [p for p in _PLATFORMS.value if p not in _KNOWN_PLATFORMS]
  if unknown or not _PLATFORMS.value:
    raise app.UsageError(f"--platforms {','.join(_PLATFORMS.value)}: choose among "
                         f"{','.join(_KNOWN_PLATFORMS)}")
  if _BATCH.value < 1:
    raise app.UsageError(f"--batch_size {_BATCH.value}: must be >= 1")
  launch.check_checkpoint(_WORKDIR.value, _STEP.value)
  console.configure()
  launch.start()
  from ciae_jax import hparams  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import export_lib  # pylint: disable=g-import-not-at-top
  from ciae_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  hp = hparams.HParams.from_config(_CONFIG.value)
  restored = predictor.restore_for_inference(hp, _WORKDIR.value, _STEP.value)
  print(f"exporting step {restored.step} of {_WORKDIR.value} for {','.join(_PLATFORMS.value)}",
        flush=True)
  export_lib.write_export(hp, restored, _OUTPUT.value, platforms=tuple(_PLATFORMS.value),
                          batch_size=_BATCH.value, log=lambda line: print(line, flush=True))
  print("wrote", os.path.join(_OUTPUT.value, export_lib.MANIFEST))


if __name__ == "__main__":
  launch.define_flags()
  flags.mark_flags_as_required(["config", "workdir", "output"])
  app.run(main)
