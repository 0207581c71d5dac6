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
# The adaptive solve's tolerances, where the library's calls take them from too.
from ddpm_jax.sampling import ADAPTIVE_DEFAULTS


def model_small():
  """A 1.0M-parameter UNet (at one channel) for 8x8 / 16x16 images."""
  return ml_collections.ConfigDict(dict(
      ch=32,  # channels of the first level
      ch_mult=(1, 2),  # channels of each level, as multiples of ch; one downsampling between two
      num_res_blocks=2,  # residual blocks per level
      attn_resolutions=(4,),  # feature-map sizes (height, or length for series) with self-attention
      dropout=0.0,  # in the residual blocks
      num_heads=1,  # of each self-attention
      num_groups=8,  # GroupNorm groups (must divide every level's channels)
      num_classes=0,  # > 0: class-conditional, with a null label for classifier-free guidance
      spatial_dims=2,  # 2: images [B, H, W, C]; 1: series windows [B, L, C]
      dtype='float32',  # the network's arithmetic: float32 | bfloat16 | float16 | auto
      **MODEL_FIELD_DEFAULTS, **MODEL_INPUT_DEFAULTS))


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
      split='train',  # tfds split to train on
      path='',  # images / series: the file or folder to read
      data_dir='',  # tfds data_dir; '' means tfds's default (~/tensorflow_datasets)
      try_gcs=False,  # let tfds read a prepared copy from its public bucket
      image_size=0,  # height = width; 0 takes it from the data, any other value is checked
      channels=0,  # 0 takes it from the data
      random_flip=False,  # horizontal flips of training images
      num_examples=1024,  # synthetic only
      # series only:
      columns='',  # comma-separated CSV column names; '' = every numeric column
      time_column='date',  # a CSV column that orders the rows (dropped from the channels)
      window=512,  # steps per window (a multiple of 8)
      stride=1,  # steps between the starts of two windows
      normalization='zscore',  # or 'minmax' (to [-1, 1])
      val_fraction=0.1,  # validation part: the rows after the training part
      test_fraction=0.0,  # test part: the final rows, never trained on or used for selection
      # 'fractions' (the two above) or 'ett': the ETT benchmark's months (train rows 0-8,639,
      # validation 8,640-11,519, test 11,520-14,399; configs/ett.py)
      protocol='fractions',
      # > 0: the forecast horizon the run is made for: training's 'horizon' masks hide exactly
      # this many final steps, and under protocol 'ett' the window is lookback + horizon
      horizon=0,
      lookback=0,  # protocol 'ett': the steps before the horizon (window = lookback + horizon)
      fill_nan=False,  # True: fill NaNs by interpolation instead of refusing the series
  ))

  config.model = model_small()

  config.diffusion = ml_collections.ConfigDict(dict(
      # linear | cosine (discrete, T steps) | vp_linear | vp_cosine (continuous VP-SDE) |
      # rectified_flow (x_t = (1 - t) x0 + t eps; configs/digits_flow.py)
      schedule='linear',
      num_timesteps=1000,  # T of the discrete schedules
      beta_start=1e-4,  # linear: beta_1
      beta_end=0.02,  # linear: beta_T
      cosine_s=0.008,  # cosine (Nichol & Dhariwal): the offset s
      vp_beta_min=0.1,  # vp_linear: beta(0) of the VP-SDE
      vp_beta_max=20.0,  # vp_linear: beta(1)
      target='eps',  # eps | x0 | v | velocity (d x_t / dt; continuous schedules, weighting simple)
      weighting='simple',  # simple | snr | min_snr
      min_snr_gamma=5.0,  # min_snr: the weight is min(SNR, gamma) (Hang et al. 2023)
      # uniform | importance (discrete: Nichol & Dhariwal's loss-aware t) | logit_normal
      # (continuous: sigmoid of a standard normal, Esser et al. 2024)
      timestep_sampling='uniform',
      # independent | minibatch_ot (rectified_flow: each batch paired with its noise by
      # optimal transport, Tong et al. 2023; straighter ODE paths)
      coupling='independent',
  ))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3,  # Adam's, after the warm-up
      warmup_steps=200,  # linear warm-up from 0
      decay_steps=0,  # > 0: after warm-up, linearly down to 0 over this many steps
      grad_clip=1.0,  # global gradient norm clipping (0: off)
      b1=0.9,  # Adam
      b2=0.999,  # Adam
      eps=1e-8,  # Adam
      ema_decay=0.995,  # the run's last ~200 updates; the paper's 0.9999 suits 800k steps
      # K > 1: each step's gradient in K micro-batches (a scan: the activations of B / K
      # examples at a time), the same examples, t and noise, one update; K divides B / devices
      grad_accum_steps=1,
  ))

  config.training = ml_collections.ConfigDict(dict(
      num_steps=5000,  # optimiser updates
      batch_size=64,  # global, over all devices and hosts
      seed=0,  # parameters, data order, noise: one seed for all
      # Periods in steps; each also happens at the last step, and 0 means only then.
      log_every=50,  # metrics.jsonl and the progress line
      checkpoint_every=500,  # checkpoints (and the loss.png / quality.png redraw)
      sample_every=1000,  # samples/step_*.png grids
      keep_checkpoints=3,  # the newest ones kept
      max_nonfinite_steps=20,  # consecutive skipped updates before the run stops
      label_dropout=0.1,  # class-conditional only: probability of the null label
      num_sample_images=64,  # in each samples/step_*.png grid
      # Sample quality of the EMA parameters every eval_every steps (0: off), logged to
      # metrics.jsonl, TensorBoard and quality.png. Digits only: a classifier's feature
      # Frechet distance and confidence (ddpm_jax.digits_quality) of eval_samples DDIM samples.
      eval_every=0,
      eval_samples=500,  # samples per quality score
      eval_steps=20,  # DDIM steps of those samples
      # With model.observed_input (series): the probabilities of the mask kinds of
      # ddpm_jax.masking (none, points, block, horizon) drawn for each training window.
      mask_mix=(0.25, 0.25, 0.25, 0.25),
  ))

  config.sampling = ml_collections.ConfigDict(dict(
      # ddpm | ddim | dpm_solver++ | dpm_solver++3m | heun | euler | adaptive | euler_maruyama |
      # ode (euler, adaptive and the last two: continuous schedules). dpm_solver++ at 20 steps:
      # why is in docs/sampling.md.
      method='dpm_solver++',
      num_steps=20,  # reverse steps (ddpm takes all T)
      eta=0.0,  # ddim: 0 deterministic .. 1 (DDPM-like noise)
      # For the methods that take it (ddim: uniform | quadratic | karras | trailing, the
      # nested steps distilled students take; dpm_solver++(3m):
      # logsnr | karras; heun: karras | logsnr | uniform); '' or one a method does not take:
      # the method's own default (the first named).
      spacing='',
      rho=7.0,  # karras spacing (Karras et al. 2022)
      # adaptive only (it takes no num_steps): the diffrax solve's relative tolerance
      rtol=ADAPTIVE_DEFAULTS['rtol'],
      atol=ADAPTIVE_DEFAULTS['atol'],  # adaptive only: its absolute tolerance
      # adaptive only: bosh3 (order 3, the fewest calls at these tolerances) | tsit5 | dopri5
      # (order 5) | heun (order 2)
      solver=ADAPTIVE_DEFAULTS['solver'],
      # x_T in mirrored pairs (z, -z), samples 2k and 2k + 1: each an exact draw, an ensemble's
      # mean and median with less Monte Carlo error (forecasts); an odd batch's last sample is
      # unpaired
      antithetic=False,
      # heun only: EDM's stochastic churn (0: the deterministic sampler).
      s_churn=0.0,  # how much noise is added per step
      s_tmin=0.0,  # churn only between these noise levels
      s_tmax=1e30,  # (s_tmin and s_tmax: Karras et al.'s S_tmin, S_tmax)
      s_noise=1.0,  # scale of the added noise
      variance='small',  # ddpm: small (beta-tilde) | large (beta)
      clip_x0=True,  # clip predicted x0 to the data range [-1, 1] (images)
      guidance_scale=1.0,  # classifier-free guidance w: 1 conditional, 0 unconditional, > 1 guided
      batch_size=256,  # samples per device call in sample.py
  ))
  return config


def decay_over_training(config) -> None:
  """Decays ``config``'s rate to zero over the steps after warm-up: optim.decay_steps as
  references to training.num_steps less optim.warmup_steps, so that an override of either on
  the command line moves the decay with it."""
  config.optim.decay_steps = (config.training.get_ref('num_steps')
                              - config.optim.get_ref('warmup_steps'))
