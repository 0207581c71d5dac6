"""The offline default: scikit-learn's 8x8 digits (bundled, no download) on a laptop CPU.

  python train.py --config=configs/digits.py --workdir=runs/digits

8-13 minutes on a 2-core CPU (5,000 steps of batch 64 at 6.6-10 steps/s with the 1.0M-parameter
UNet, after ~15 s of compilation); <workdir>/samples/step_0005000.png then shows digits you can
read. Then: python sample.py --ckpt=runs/digits --method=ddim --num_steps=50 --out=runs/digits/ddim
"""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'digits'
  config.model = default.model_small()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995
  config.training.num_steps = 5000
  config.training.batch_size = 64
  config.training.log_every = 50
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.training.eval_every = 1000
  return config
