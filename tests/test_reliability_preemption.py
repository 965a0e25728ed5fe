"""Preemption: SIGKILL at a random moment, SIGTERM at a random step, resumed bit for bit.

`python train.py` in subprocesses (tiny synthetic config, one CPU device, a checkpoint after
every step, 8 steps):
  A: uninterrupted, keeps every checkpoint: the reference.
  B: killed with SIGKILL a random time after a random step's log line (possibly inside a
     step, a checkpoint write or a deletion of an old one).
  C: the same command again: resumes from B's last complete checkpoint, and gets SIGTERM
     after a random later step; it must save the step it is at and exit with status 0.
  D: the same command again: resumes from C's checkpoint and finishes.
Every checkpoint left by B and C, and D's final one, must equal A's checkpoint of the same
step bit for bit (params, optimizer state, memory, rng, step), read with orbax directly.
"""
import random
import re
import signal
import time

import pytest

import test_reliability_helpers as rh

KEEP = 2  # B-D keep two checkpoints: old ones are deleted while the run goes on.


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
  chooser = random.Random()
  kill_after, kill_delay = chooser.randint(1, 4), chooser.uniform(0.0, 0.5)
  context = f"(SIGKILL {kill_delay:.2f} s after step {kill_after})"
  env = rh.subprocess_env(cache_dir)
  dataset = tmp_path / "synthetic"
  reference, workdir = tmp_path / "a", tmp_path / "run"
  every_step = ["--config.checkpoint_every_steps=1"]

  code, output = rh.run(rh.train_command(dataset, reference, extra=every_step + [
      f"--config.keep_checkpoints={rh.TOTAL_STEPS}"]), env)
  assert code == 0, output[-4000:]
  assert rh.checkpoint_steps(reference) == list(range(1, rh.TOTAL_STEPS + 1))
  command = rh.train_command(dataset, workdir,
                             extra=every_step + [f"--config.keep_checkpoints={KEEP}"])

  # B: SIGKILL.
  run_b = rh.Process(command, env)
  run_b.wait_for(rf"step {kill_after}/{rh.TOTAL_STEPS}: loss", timeout=300)
  time.sleep(kill_delay)
  run_b.send(signal.SIGKILL)
  assert run_b.wait(60) == -signal.SIGKILL, context
  left_by_b = rh.checkpoint_steps(workdir)
  # Old checkpoints are deleted once a new one is complete: K + 1 may be left for a moment.
  assert len(left_by_b) <= KEEP + 1 and all(s <= kill_after + 1 for s in left_by_b), (
      left_by_b, context)
  for step in left_by_b:  # Intact: exactly the reference's state of that step.
    rh.assert_trees_equal(rh.read_checkpoint(workdir, step),
                          rh.read_checkpoint(reference, step), f"B step {step} {context}")
  resume_b = max(left_by_b, default=0)

  # C: resumes automatically, then SIGTERM.
  term_after = chooser.randint(resume_b + 1, rh.TOTAL_STEPS - 2)
  context += f", SIGTERM after step {term_after}"
  run_c = rh.Process(command, env)
  if resume_b:
    run_c.wait_for(rf"Resumed from checkpoint at step {resume_b} ", timeout=300)
  run_c.wait_for(rf"Training from step {resume_b} to {rh.TOTAL_STEPS} ", timeout=300)
  run_c.wait_for(rf"step {term_after}/{rh.TOTAL_STEPS}: loss", timeout=300)
  run_c.send(signal.SIGTERM)
  assert run_c.wait(120) == 0, (context, run_c.output[-4000:])
  match = re.search(rf"Preempted: checkpoint saved at step (\d+) of {rh.TOTAL_STEPS}",
                    run_c.output)
  assert match, (context, run_c.output[-4000:])
  stopped_at = int(match.group(1))
  # The step running when the signal came (the next one at most) is finished and saved.
  assert term_after <= stopped_at <= term_after + 1, (stopped_at, context)
  assert f"step {stopped_at + 1}/{rh.TOTAL_STEPS}" not in run_c.output, context
  assert rh.checkpoint_steps(workdir)[-1] == stopped_at, context
  rh.assert_trees_equal(rh.read_checkpoint(workdir, stopped_at),
                        rh.read_checkpoint(reference, stopped_at),
                        f"C's SIGTERM checkpoint {stopped_at} {context}")
  # Unfinished checkpoints a killed run leaves are cleaned up by the next start.
  assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name], context

  # D: resumes from the SIGTERM checkpoint and ends where the uninterrupted run ended.
  run_d = rh.Process(command, env)
  assert run_d.wait(300) == 0, (context, run_d.output[-4000:])
  assert f"Resumed from checkpoint at step {stopped_at} " in run_d.output, context
  rh.assert_trees_equal(rh.read_checkpoint(workdir, rh.TOTAL_STEPS),
                        rh.read_checkpoint(reference, rh.TOTAL_STEPS),
                        f"final state {context}")
