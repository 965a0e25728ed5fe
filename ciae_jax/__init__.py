"""ciae_jax: CIAE panoptic segmentation (Gao et al.) in JAX/Flax.

Importing the package has no side effects and does not import TensorFlow; only
`ciae_jax.data` uses TensorFlow, lazily.
"""
