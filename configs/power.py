"""Windows of a long multichannel series (e.g. the ETT power-load data), 4.0M-parameter 1-D UNet.

  python train.py --config=configs/power.py --workdir=runs/power \
      --config.data.path=../shared/data/ETTh1.csv --config.data.columns=HUFL,HULL,MUFL,MULL,LUFL,LULL,OT
  python sample.py --ckpt=runs/power --num_samples=256 --method=ddim --num_steps=50 --eval

Windows of 512 steps (any multiple of 8: --config.data.window=...), every stride-th start; the
final 10% of the series is held out for validation. Values are z-scored per channel with
statistics of the training part, saved with the checkpoint, so sample.py writes samples in the
original units. Meant for an accelerator; configs/power_small.py runs on a laptop CPU.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'series'
  config.data.path = ''
  config.data.columns = ''  # every column but data.time_column
  config.data.window = 512
  config.data.stride = 1
  config.data.normalization = 'zscore'
  config.data.val_fraction = 0.1
  config.model = default.model_1d()
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.999
  config.training.num_steps = 100_000
  config.training.batch_size = 64
  config.training.checkpoint_every = 5000
  config.training.sample_every = 5000
  config.training.num_sample_images = 4
  config.sampling.num_steps = 50
  return config
