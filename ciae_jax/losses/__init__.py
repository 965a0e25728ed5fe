"""ciae_jax.losses."""
