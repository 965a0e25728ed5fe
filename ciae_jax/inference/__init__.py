"""ciae_jax.inference: from images to panoptic segmentations, on device and around it.

- `detection`: FCOS decoding (per-level top-k) and class-wise NMS, static shapes.
- `panoptic`: queries -> `S = P V^T` -> segments (paper IV-C, Eq. 16), and the oracle mode.
- `semantic_stuff`: stuff pixels from the semantic branch (`model.stuff_from="semantic"`).
- `preprocess`: host preprocessing (decode, resize, normalise, pad to a canvas), no TF.
- `predictor`: `Predictor`, a restored model on images of any size; `BasePredictor`.
- `export_lib`: the prediction as `jax.export` programs and `ExportedPredictor`, which runs them.
- `program_cache`: traced programs kept between processes (the demo's quick start).
"""
