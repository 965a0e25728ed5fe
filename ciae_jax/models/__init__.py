"""ciae_jax.models."""
