r"""Writes benchmarks/gpu/references.npz, the CPU values the GPU run's correctness stage checks.

Run on the CPU (it refuses another backend), from the repository root:

  PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/gpu/make_references.py \
      [--sample PATH/coco_panoptic_sample] [--out benchmarks/gpu/references.npz]

The COCO sample root defaults to $CIAE_COCO_SAMPLE, else `../shared/data/coco_panoptic_sample`
beside the repository (as the tests find it). The file holds the two sample images resized to
the model input as uint8 with their ground-truth segment arrays (so the GPU machine needs
nothing but the working tree), the losses of two train steps, the panoptic maps of the
inference with the stepped weights, and how many pixels flip when the input, the weights and the
memory are perturbed by 1e-4 (the allowance; `correctness.py`). Deterministic: the same values
on every run on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import correctness  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_SAMPLE = HERE.parents[2] / "shared" / "data" / "coco_panoptic_sample"


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sample", default=os.environ.get("CIAE_COCO_SAMPLE") or DEFAULT_SAMPLE)
  parser.add_argument("--out", default=str(correctness.REFERENCES))
  args = parser.parse_args(argv)
  if jax.default_backend() != "cpu":
    parser.error(f"references are computed on the CPU; the default backend is "
                 f"{jax.default_backend()!r} (set JAX_PLATFORMS=cpu)")
  inputs = correctness.build_inputs(args.sample)
  result = correctness.run(inputs, noise_seeds=tuple(range(correctness.PERTURBATION_DRAWS)))
  flips = [int(np.sum(noisy != result["panoptic"])) for noisy in result["noisy_panoptic"]]
  meta = {"losses": result["losses"], "update_norms": result["update_norms"],
          "allowed_pixels": max(flips),
          "perturbation_flips": flips, "perturbation": correctness.PERTURBATION,
          "segments": int(np.sum(result["query_valid"])),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "matmul_precision": "highest", "seed": correctness.SEED,
          "steps": correctness.STEPS, "canvas": list(correctness.CANVAS),
          "image_ids": [int(i) for i in inputs["image_id"]]}
  np.savez_compressed(args.out, meta_json=np.asarray(json.dumps(meta, sort_keys=True)),
                      panoptic=result["panoptic"], **inputs)
  size = pathlib.Path(args.out).stat().st_size
  print(f"wrote {args.out} ({size / 1024:.0f} KiB): losses {result['losses']}, "
        f"update norms {result['update_norms']}, "
        f"{meta['segments']} segments, pixels flipped by the perturbation {flips}")
  return meta


if __name__ == "__main__":
  main()
