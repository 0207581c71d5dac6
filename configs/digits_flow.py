"""configs/digits.py's network and budget, trained on the rectified-flow path (flow matching).

  python train.py --config=configs/digits_flow.py --workdir=runs/digits_flow

x_t = (1 - t) x0 + t eps with the network regressing the velocity eps - x0 (Lipman et al. 2023,
Liu et al. 2023): 5,000 steps, 10 min 41 s on a 2-core CPU (8.3 steps/s). Its grids and the
default sampler are Euler's method at 8 calls (digits FD about 1.15, confidence 0.95); then
  python sample.py --ckpt=runs/digits_flow --method=adaptive --out=runs/digits_flow/adaptive
solves the flow's ODE to a tolerance (FD about 0.68 in about 116 network calls: docs/sampling.md
has the quality per call).
"""

from ddpm_jax.configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.schedule = 'rectified_flow'
  config.diffusion.target = 'velocity'
  config.sampling.method = 'euler'
  config.sampling.num_steps = 8
  return config
