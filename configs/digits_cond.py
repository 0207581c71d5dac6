"""Class-conditional digits: labels 0-9 with classifier-free guidance (Ho & Salimans, 2022).

  python train.py --config=configs/digits_cond.py --workdir=runs/digits_cond
  python sample.py --ckpt=runs/digits_cond --labels=0,1,2,3,4,5,6,7,8,9 --guidance_scale=2

The digits recipe of configs/digits.py (same network, 5,000 steps, about 13 minutes on a 2-core
CPU) with a label embedding; one label in ten is replaced by the null label during training so
that the same network also predicts unconditionally. sampling.guidance_scale w mixes the two:
out = null + w (cond - null); 0 is unconditional, 1 plain conditional, larger sharpens the class
at some cost in variety (docs/evaluation.md's guidance table measures both).
"""

from ddpm_jax.configs import digits


def get_config():
  config = digits.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance_scale = 2.0
  return config
