"""Every field the trainer and samplers read, with defaults; other configs override a few.

Sections: data, model, diffusion, optim, training, sampling. Alone it trains the small model
on the offline digits set with configs/digits.py's recipe (5,000 steps, Adam 1e-3 after 200
warm-up steps, EMA 0.995; readable digits in 8-13 minutes on a 2-core CPU), without the
periodic digits scores:

  python train.py --config=configs/default.py --workdir=runs/default
"""

import ml_collections

# Options of other released networks (diffusers' names), at the DDPM paper's values.
from ddpm_jax.config_lib import MODEL_FIELD_DEFAULTS, MODEL_INPUT_DEFAULTS


def model_small():
  """A 1.0M-parameter UNet (at one channel) for 8x8 / 16x16 images."""
  return ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.0, num_heads=1,
      num_groups=8, num_classes=0, spatial_dims=2, dtype='float32', **MODEL_FIELD_DEFAULTS,
      **MODEL_INPUT_DEFAULTS))


def model_cifar10():
  """The DDPM paper's CIFAR-10 network: 35,746,307 parameters."""
  return ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
      num_heads=1, num_groups=32, num_classes=0, spatial_dims=2, dtype='float32',
      **MODEL_FIELD_DEFAULTS, **MODEL_INPUT_DEFAULTS))


def model_1d():
  """A 1-D UNet for time-series windows [B, L, C] (L divisible by 8)."""
  return ml_collections.ConfigDict(dict(
      ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(64,), dropout=0.0,
      num_heads=4, num_groups=32, num_classes=0, spatial_dims=1, dtype='float32',
      **MODEL_FIELD_DEFAULTS, **MODEL_INPUT_DEFAULTS))


def get_config():
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict(dict(
      # 'digits' (scikit-learn's 8x8 digits, offline), 'synthetic' (random images),
      # 'images' (data.path: a folder of PNG/JPEG or a .npy/.npz uint8 [N, H, W, C] array),
      # 'series' (data.path: a CSV/.npy/.npz long series cut into windows), or any
      # tensorflow-datasets image set by name (cifar10, mnist, fashion_mnist, ...).
      name='digits',
      split='train',
      path='',
      data_dir='',  # tfds data_dir; '' means tfds's default (~/tensorflow_datasets)
      try_gcs=False,  # let tfds read a prepared copy from its public bucket
      image_size=0,  # height = width; 0 takes it from the data, any other value is checked
      channels=0,  # 0 takes it from the data
      random_flip=False,
      num_examples=1024,  # synthetic only
      # series only:
      columns='',  # comma-separated CSV column names; '' = every numeric column
      time_column='date',
      window=512,
      stride=1,
      normalization='zscore',  # or 'minmax' (to [-1, 1])
      val_fraction=0.1,  # validation part: the rows after the training part
      test_fraction=0.0,  # test part: the final rows, never trained on or used for selection
      fill_nan=False,
  ))

  config.model = model_small()

  config.diffusion = ml_collections.ConfigDict(dict(
      schedule='linear',  # linear | cosine | vp_linear | vp_cosine
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      cosine_s=0.008,
      vp_beta_min=0.1,
      vp_beta_max=20.0,
      target='eps',  # eps | x0 | v
      weighting='simple',  # simple | snr | min_snr
      min_snr_gamma=5.0,
      timestep_sampling='uniform',  # uniform | importance
  ))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3,
      warmup_steps=200,
      decay_steps=0,  # > 0: after warm-up, linearly down to 0 over this many steps
      grad_clip=1.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      ema_decay=0.995,  # the run's last ~200 updates; the paper's 0.9999 suits 800k steps
  ))

  config.training = ml_collections.ConfigDict(dict(
      num_steps=5000,
      batch_size=64,  # global, over all devices and hosts
      seed=0,
      # Periods in steps; each also happens at the last step, and 0 means only then.
      log_every=50,
      checkpoint_every=500,
      sample_every=1000,
      keep_checkpoints=3,
      max_nonfinite_steps=20,  # consecutive skipped updates before the run stops
      label_dropout=0.1,  # class-conditional only: probability of the null label
      num_sample_images=64,
      # Sample quality of the EMA parameters every eval_every steps (0: off), logged to
      # metrics.jsonl, TensorBoard and quality.png. Digits only: a classifier's feature
      # Frechet distance and confidence (ddpm_jax.digits_quality) of eval_samples DDIM samples.
      eval_every=0,
      eval_samples=500,
      eval_steps=20,
      # With model.observed_input (series): the probabilities of the mask kinds of
      # ddpm_jax.masking (none, points, block, horizon) drawn for each training window.
      mask_mix=(0.25, 0.25, 0.25, 0.25),
  ))

  config.sampling = ml_collections.ConfigDict(dict(
      # ddpm | ddim | dpm_solver++ | dpm_solver++3m | heun | euler_maruyama | ode. dpm_solver++
      # at 20 steps: benchmarks/sampler_accuracy.py and the digits FID/FD in the README.
      method='dpm_solver++',
      num_steps=20,
      eta=0.0,
      # For the methods that take it (ddim: uniform | quadratic | karras | trailing, the
      # nested steps distilled students take; dpm_solver++(3m):
      # logsnr | karras; heun: karras | logsnr | uniform); '' or one a method does not take:
      # the method's own default (the first named).
      spacing='',
      rho=7.0,  # karras spacing (Karras et al. 2022)
      # heun only: EDM's stochastic churn (0: the deterministic sampler).
      s_churn=0.0,
      s_tmin=0.0,
      s_tmax=1e30,
      s_noise=1.0,
      variance='small',  # ddpm: small (beta-tilde) | large (beta)
      clip_x0=True,
      guidance_scale=1.0,
      batch_size=256,  # samples per device call in sample.py
  ))
  return config
