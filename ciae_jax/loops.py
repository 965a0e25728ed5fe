"""Helpers of the memory-bounded loops (the CIAE loss engine, the CPU segment sums)."""
import jax
import jax.numpy as jnp


def chunk_window(index: jax.Array, chunk: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """`(start, fresh)` of chunk `index` of a loop over `num_rows` rows in chunks of `chunk`.

  The last chunk is shifted back to end at `num_rows` (as `dynamic_slice` would clamp it), so
  every chunk has the static size; `fresh` (`[chunk]` bool) marks its rows that no earlier
  chunk covered, the only ones it may add or write.
  """
  start = jnp.minimum(index * chunk, num_rows - chunk)  # []
  return start, jnp.arange(chunk) + start >= index * chunk  # [], [chunk]


def varying_zero(tree) -> jax.Array:
  """A float32 0 that depends on every array in `tree`.

  Loop carries start from it: under shard_map (check_vma) a carry must be "varying" over the
  mesh axes any input varies over, as the loop body's outputs are.
  """
  return sum((jnp.sum(jnp.asarray(leaf).reshape(-1)[:0].astype(jnp.float32))
              for leaf in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))
