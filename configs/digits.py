"""The offline default: scikit-learn's 8x8 digits (bundled, no download) on a laptop CPU.

  python train.py --config=configs/digits.py --workdir=runs/digits

About 10 minutes on a 2-core CPU (3,000 steps of batch 64, ~0.2 s/step with the 0.7M-parameter
UNet); <workdir>/samples/step_0003000.png then shows digits you can read.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'digits'
  config.model = default.model_small()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995
  config.training.num_steps = 3000
  config.training.batch_size = 64
  config.training.log_every = 50
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  return config
