"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020): 35.7M-parameter UNet, T = 1000, eps target.

  python train.py --config=configs/cifar10.py --workdir=runs/cifar10

Batch 128, Adam 2e-4 with 5,000 warm-up steps, gradient clipping at 1, dropout 0.1, random
horizontal flips, EMA 0.9999, 800k steps; the network computes in bfloat16 on GPU/TPU with
float32 parameters, optimiser state and EMA (model.dtype='auto'; float32 on CPU). Needs
CIFAR-10 prepared for tfds (ArrayRecord):
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare(file_format='array_record')"
Meant for accelerators (any number: the global batch is split over all devices); on a 2-core
CPU one step takes about 45 s (docs/performance.md). --config.data.name=synthetic runs it on random data for
throughput measurements. The paper reports FID 3.17 with 1000-step ancestral sampling
(python sample.py --ckpt=runs/cifar10 --method=ddpm --num_samples=50000).
"""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_examples = 50_000  # for data.name=synthetic
  config.model = default.model_cifar10()
  config.model.dtype = 'auto'  # bfloat16 compute on GPU/TPU, float32 on CPU
  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000
  config.diffusion.target = 'eps'
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999
  config.training.batch_size = 128
  config.training.num_steps = 800_000
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000
  config.sampling.variance = 'large'  # for method=ddpm: the paper's FID 3.17 setting
  return config
