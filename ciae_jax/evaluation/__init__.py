"""ciae_jax.evaluation: PQ, box AP and COCO-format export (NumPy, PIL, pycocotools).

- `pq`: panoptic quality identical to panopticapi's `pq_compute` (streaming
  `PQAccumulator`, file-based `pq_compute_files`, CLI `python -m
  ciae_jax.evaluation.pq`, `format_pq_table`); the counting lives in `pq_counts`
  (`PQAccumulator`, `ImageCounts`) and `pq_runs` (run-length intersections), and `pq`
  re-exports their public names.
- `box_ap`: COCO box AP of detections against the panoptic things (COCOeval).
- `export`: panoptic PNG / JSON and detection JSON writers, `segments_info`.

No TensorFlow or JAX here; submodules are imported on use.
"""
