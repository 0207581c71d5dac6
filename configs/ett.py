"""ETTh1 / ETTh2 on the benchmark protocol of the forecasting literature: lookback 96, horizon 24.

  python train.py --config=configs/ett.py --workdir=runs/ett_h1 --config.data.path=ETTh1.csv
  python sample.py --ckpt=runs/ett_h1 --task=forecast --eval --num_windows=0 --num_samples=100

The split of the Informer / Autoformer / DLinear loaders (data.protocol='ett'): of the first
20 months of hourly rows, rows 0-8,639 train, 8,640-11,519 validate and 11,520-14,399 test; a
test window takes its 96 lookback rows from the rows before the test part, so the test part
holds 2,857 windows at horizon 24. All 7 channels are z-scored with the training rows'
statistics and the scores are on that scale (MSE, MAE, CRPS), beside a least-squares linear
map, seasonal naive and climatology on the same windows. --config.data.horizon=48 or 96 makes
a run for another horizon (the window is lookback + horizon). Training takes about N minutes on
a 2-core CPU; docs/time_series.md gives the numbers and benchmarks/ett_protocol.py reproduces
them. ETTh1.csv and ETTh2.csv: https://github.com/zhouhaoyi/ETDataset (folder ETT-small).
"""

from ddpm_jax.configs import power_small


def get_config():
  config = power_small.get_config()
  config.data.protocol = 'ett'
  config.data.lookback = 96
  config.data.horizon = 24
  config.data.window = config.data.get_ref('lookback') + config.data.get_ref('horizon')
  # Most training windows are forecasts of exactly data.horizon steps; the rest keep the run
  # able to generate and impute.
  config.training.mask_mix = (0.1, 0.1, 0.1, 0.7)
  # The network models a forecast's horizon as its difference from the least-squares linear
  # map of the lookback (TimeDiff's linear initialisation): on ETTh1 that took the median's
  # MSE from 0.58 to 0.31 and CRPS from 0.41 to 0.26 (docs/time_series.md).
  config.model.forecast_base = 'linear_map'
  config.model.attn_resolutions = ()
  config.training.num_steps = 6000
  config.training.checkpoint_every = 1000
  config.training.sample_every = 2000
  return config
