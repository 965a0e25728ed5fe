"""ciae_jax.evaluation: PQ, box AP and COCO-format files of predictions.

- `pq`: panoptic quality identical to panopticapi's `pq_compute` (streaming
  `PQAccumulator`, file-based `pq_compute_files`, CLI `python -m ciae_jax.evaluation.pq`,
  `format_pq_table`); the counting lives in `pq_counts` (`PQAccumulator`, `ImageCounts`) and
  `pq_runs` (run-length intersections), and `pq` re-exports their public names. NumPy only.
- `box_ap`: COCO box AP of detections against the panoptic things (pycocotools' COCOeval).
- `coco_format`: panoptic PNG / JSON and detection JSON writers, `segments_info`.
- `gather`: JSON objects between the processes of a multi-host job.
- `runner`: a split through the `Predictor` on every device and host, then PQ and box AP
  (`evaluate.py`); `tuning`: the inference thresholds' grid on a split.

Submodules are imported on use; `pq`, `pq_counts`, `pq_runs`, `box_ap` and `coco_format` import
no JAX.
"""
