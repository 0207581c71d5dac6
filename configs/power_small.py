"""A CPU-sized variant of configs/power.py: 64-step windows and a 0.5M-parameter 1-D UNet.

  python train.py --config=configs/power_small.py --workdir=runs/power_small \
      --config.data.path=ETTh1.csv
  python sample.py --ckpt=runs/power_small --num_samples=1000 --method=ddim --num_steps=50 --eval
  python sample.py --ckpt=runs/power_small --task=forecast --horizon=24 --eval
  python sample.py --ckpt=runs/power_small --task=impute --eval --block=24

ETTh1.csv: https://github.com/zhouhaoyi/ETDataset (ETT-small/). About 10 minutes on a 2-core
CPU (8,000 steps of batch 64). One run generates windows,
forecasts the last steps of a window and fills gaps (the network is trained on windows with a
mix of masks; see configs/power.py). docs/time_series.md gives the ETTh1 numbers:
the generation metrics, and CRPS / MAE of forecasts and imputations on the test part against
seasonal-naive, climatology, interpolation and seasonal-profile baselines.
"""

from ddpm_jax.configs import power


def get_config():
  config = power.get_config()
  config.data.window = 64
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (16,)
  config.model.num_heads = 1
  config.model.num_groups = 8
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995
  config.training.num_steps = 8000
  config.training.checkpoint_every = 1000
  config.training.sample_every = 2000
  return config
