"""Training: state, optimizer, the data-parallel step, checkpoints, metrics and the loop."""
