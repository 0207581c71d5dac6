"""MNIST from tensorflow-datasets (28x28 grey digits), class-conditional with classifier-free
guidance.

  python train.py --config=configs/mnist.py --workdir=runs/mnist
  python sample.py --ckpt=runs/mnist --labels=0,1,2,3,4,5,6,7,8,9 --guidance_scale=2

Needs MNIST prepared for tfds (ArrayRecord), once, with network:
  python -c "import tensorflow_datasets as tfds; tfds.builder('mnist').download_and_prepare(file_format='array_record')"
A GPU trains it in minutes; on a 2-core CPU expect about 0.5 s per step.
"""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'mnist'
  config.data.image_size = 28
  config.data.channels = 1
  config.model = default.model_small()
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
  config.model.attn_resolutions = (7,)
  config.model.num_groups = 32
  config.model.num_classes = 10
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.999
  config.training.num_steps = 30_000
  config.training.batch_size = 128
  config.training.checkpoint_every = 2000
  config.training.sample_every = 2000
  config.sampling.guidance_scale = 2.0
  return config
