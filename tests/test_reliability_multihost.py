"""Multi-host: 2 processes x 1 CPU device equal 1 process x 2 devices bit for bit.

`python train.py` as two processes joined by `jax.distributed.initialize` on localhost (CPU
collectives over gloo), each with one device and reading its own half of every global batch
of 2, against one process with two devices and the same global batch. Both run at once.
The state after 3 steps must be bit-identical (the per-device programs are the same and a sum
of two values does not depend on their order).

Meanwhile SIGTERM goes to process 1 only: JAX's preemption sync point makes both processes
save the same step, equal to the single-process state of that step, and exit with status 0.
(Resuming is the single-process code path, tested in test_reliability_preemption.py; a
multi-host restart is left out here to keep this file's time down.)
"""
import re
import signal

import pytest

from ciae_jax.data import synthetic
import test_reliability_helpers as rh


def _start_two_processes(dataset, workdir, cache_dir):
  port = rh.free_port()
  return [rh.Process(rh.train_command(dataset, workdir, extra=[
      "--config.checkpoint_every_steps=1", f"--config.keep_checkpoints={rh.TOTAL_STEPS}",
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--process_id={index}"]), rh.subprocess_env(cache_dir, devices=1))
          for index in range(2)]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_stop_together(tmp_path, cache_dir):
  dataset, single, multi = tmp_path / "synthetic", tmp_path / "single", tmp_path / "multi"
  # Generated once here rather than by three processes queueing on its lock.
  synthetic.generate_synthetic_dataset(dataset, num_train=8, num_val=2, image_size=(128, 128),
                                       seed=0)
  reference = rh.Process(rh.train_command(dataset, single, extra=[
      "--config.checkpoint_every_steps=1", f"--config.keep_checkpoints={rh.TOTAL_STEPS}"]),
                         rh.subprocess_env(cache_dir, devices=2))
  hosts = _start_two_processes(dataset, multi, cache_dir)
  for index, host in enumerate(hosts):
    host.wait_for(rf"JAX process {index}/2, 1 local / 2 global devices", timeout=300)
  # Process 1 alone gets the notice, after step 3.
  hosts[1].wait_for(rf"step 3/{rh.TOTAL_STEPS}: loss", timeout=400)
  hosts[1].send(signal.SIGTERM)
  for host in hosts:
    assert host.wait(300) == 0, host.output[-4000:]
  assert reference.wait(300) == 0, reference.output[-4000:]
  assert "JAX process 0/1, 2 local / 2 global devices" in reference.output
  for output in (reference.output, *(h.output for h in hosts)):
    assert "(pmap, 2 devices, global batch 2)" in output, output[-3000:]

  # Both hosts stop at the same step, the sync point after the notice.
  stopped = {int(m.group(1)) for h in hosts for m in re.finditer(
      rf"Preempted: checkpoint saved at step (\d+) of {rh.TOTAL_STEPS}", h.output)}
  assert len(stopped) == 1, [h.output[-2000:] for h in hosts]
  stopped_at = stopped.pop()
  assert 3 <= stopped_at < rh.TOTAL_STEPS, stopped_at
  assert rh.checkpoint_steps(multi) == list(range(1, stopped_at + 1))
  for step in (3, stopped_at):
    rh.assert_trees_equal(rh.read_checkpoint(multi, step), rh.read_checkpoint(single, step),
                          f"2 processes vs 1 process, step {step}")
