"""ciae_jax.evaluation."""
