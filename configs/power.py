"""Windows of a long multichannel series (e.g. the ETT power-load data), 4.0M-parameter 1-D UNet.

  python train.py --config=configs/power.py --workdir=runs/power \
      --config.data.path=ETTh1.csv --config.data.columns=HUFL,HULL,MUFL,MULL,LUFL,LULL,OT
  python sample.py --ckpt=runs/power --num_samples=256 --method=ddim --num_steps=50 --eval

Windows of 512 steps (any multiple of 8: --config.data.window=...), every stride-th start; in
time order, the series is split into training (80%), validation (10%) and test (10%) parts, and
no window crosses a boundary. The network is trained on windows with a mix of masks, so the same
run generates, forecasts (sample.py --task=forecast) and imputes (--task=impute). Values are z-scored per channel with
statistics of the training part, saved with the checkpoint, so sample.py writes samples in the
original units. Meant for an accelerator (one H200: 31 steps/s, so 100,000 steps in about 53
minutes; docs/time_series.md); configs/power_small.py runs on a laptop CPU.
"""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'series'
  config.data.path = ''
  config.data.columns = ''  # every column but data.time_column
  config.data.window = 512
  config.data.stride = 1
  config.data.normalization = 'zscore'
  config.data.val_fraction = 0.1
  config.data.test_fraction = 0.1  # the final 10%: only sample.py --task=... --eval reads it
  config.model = default.model_1d()
  # One network for generation, forecasting and imputation: it also takes the observed values
  # and their mask, drawn per window from training.mask_mix (CSDI's recipe).
  config.model.observed_input = True
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.999
  config.training.num_steps = 100_000
  config.training.batch_size = 64
  config.training.checkpoint_every = 5000
  config.training.sample_every = 5000
  config.training.num_sample_images = 4
  return config
