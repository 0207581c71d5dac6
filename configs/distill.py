"""Progressive distillation (Salimans & Ho 2022) of a trained run into 32-, 16-, 8-, 4-, 2- and
1-step students:

  python train.py --config=configs/digits.py --workdir=runs/digits
  python distill.py --teacher=runs/digits --workdir=runs/digits_distilled
  python sample.py --ckpt=runs/digits_distilled --num_steps=4 --out=runs/digits_distilled/four

Each stage trains a student (the teacher's network, predicting v) to take one DDIM step where
its teacher takes two, then the student teaches the next stage. The network, schedule and data
are the teacher's; this config holds what distillation adds. On the digits run: about 13
minutes on a 2-core CPU (6 stages of 1,200 steps); the 4-step student comes within 10% of the
teacher's DDIM 50 in digits FD and the 1-step one draws readable digits (docs/distillation.md).
sample.py takes the 1-step student unless --num_steps picks another (docs/distillation.md).
"""

import ml_collections

from ddpm_jax.configs import default


def get_config():
  config = ml_collections.ConfigDict()
  config.distill = ml_collections.ConfigDict(dict(
      # The first student halves the teacher's deterministic DDIM sampler at start_steps
      # (trailing spacing); each stage halves again down to final_steps. A power-of-two ratio.
      start_steps=64,
      final_steps=1,
      steps_per_stage=1200,
      student_prediction='v',  # v | x0 (eps is unstable at one step from noise)
  ))
  # Adam as in training; the rate falls linearly to 0 over each stage, as in the paper.
  config.optim = default.get_config().optim
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 0
  config.optim.ema_decay = 0.995
  config.training = ml_collections.ConfigDict(dict(
      batch_size=64,  # global, over all devices and hosts
      seed=0,
      log_every=50,
      checkpoint_every=200,  # and at each stage's end
      keep_checkpoints=2,
      max_nonfinite_steps=20,
      num_sample_images=64,  # a grid per stage, drawn with the stage's own steps
      # Digits teachers: each student's digits quality at its step count at its stage's end
      # (metrics.jsonl, quality.png); ignored for other data.
      eval_quality=True,
      eval_samples=500,
  ))
  return config
