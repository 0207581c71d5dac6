"""Scores of a trained image run: FID / KID of its samples against its data or a statistics file
(``sample.py --eval``), the digits classifier measure, and the bits per dimension of held-out
data under the variational bound or through the probability-flow ODE (``python -m
ddpm_jax.bpd``)."""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Optional

import jax
import numpy as np

from ddpm_jax import (config_lib, digits_quality, diffusion, image_metrics, inception, inference,
                      input_pipeline, likelihood, ode_likelihood, progress)
from ddpm_jax import schedules as schedules_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models import create_model
from ddpm_jax.errors import InputError

FID_PROTOCOL = ('pytorch-fid: Inception-v3 (TF 2015-12-05) pool3, bilinear resize to 299 '
                '(align_corners=False, no antialias), 2x/255-1')


def _reference_set(config, workdir: pathlib.Path, fid_stats: str, features_fn):
  """The run's data as a FeatureSet (statistics cached in <workdir>/eval/), or ``fid_stats``."""
  if fid_stats:
    return image_metrics.feature_set(fid_stats, features_fn)
  cache = workdir / 'eval' / f'fid_stats_{config.data.name}_{config.data.split}.npz'
  if cache.is_file():
    return image_metrics.feature_set(str(cache), features_fn)
  source = input_pipeline.create_source(config.data, seed=config.training.seed)
  images, _ = inception.check_images(image_metrics.source_images(source), config.data.name)
  reference = image_metrics.images_feature_set(config.data.name, images, features_fn())
  image_metrics.save_statistics(cache, reference)
  return reference


def _note(text: str) -> None:
  print(f'note: {text}', file=sys.stderr, flush=True)


def check_before_sampling(config, fid_stats: str = '', inception_weights: str = '',
                          allow_unknown_weights: bool = False) -> None:
  """What evaluate_images will need, checked before any sample is drawn: the Inception weights
  (except for digits, scored without them) and the statistics file."""
  if config.data.name != 'digits':
    inception.find_weights(inception_weights, allow_unknown_weights, _note)
  if fid_stats and not pathlib.Path(fid_stats).expanduser().is_file():
    raise FileNotFoundError(f'--fid_stats {fid_stats} does not exist')


def evaluate_images(samples: np.ndarray, config, workdir: pathlib.Path,
                    labels: Optional[np.ndarray] = None, fid_stats: str = '',
                    inception_weights: str = '', allow_unknown_weights: bool = False) -> dict:
  """Scores uint8 samples [N, H, W, C]: {'fid', 'kid', 'kid_std', 'fid_reference', ...} and,
  for digits, {'digits_fd', 'digits_confidence'[, 'digits_label_agreement']}.

  Digits are scored by the classifier always and by FID when Inception weights are present;
  other images need the weights (a missing file is a one-line error saying where to get it).
  """
  images, note = inception.check_images(samples, 'samples')
  result = {'num_samples': int(len(samples))}
  if config.data.name == 'digits':
    scores = digits_quality.quality(samples, labels)
    result.update({f'digits_{k}': v for k, v in scores.items()})
    try:
      inception.find_weights(inception_weights, allow_unknown_weights, _note)
    except FileNotFoundError:
      print('note: no Inception weights, so no FID; the digits scores need none (see '
            'python -m ddpm_jax.fid for where to get them)', file=sys.stderr)
      return result
  if note:
    print(f'note: {note}', file=sys.stderr)
  params = inception.load_params(inception_weights, allow_unknown_weights, _note)
  extractor = inception.feature_extractor(params)
  reference = _reference_set(config, workdir, fid_stats, lambda: extractor)
  generated = image_metrics.images_feature_set('samples', images, extractor)
  result.update(image_metrics.compare(generated, reference))
  result['fid_reference'] = reference.name
  result['fid_protocol'] = FID_PROTOCOL
  return result


def _bound_data(config, split: str, num_images: int) -> tuple[np.ndarray, str]:
  """uint8 images [N, H, W, C] to score and a description of where they come from."""
  if config.data.name == 'digits':  # no test split exists: the bound is on training data
    images = image_metrics.source_images(input_pipeline.digits_source(), num_images)
    return images, f'digits (all {len(images)} are training images: the set has no test split)'
  data = config.data.copy_and_resolve_references()
  if data.name not in input_pipeline.BUILTIN:
    data.split = split
  source = input_pipeline.create_source(data, seed=0)
  images = image_metrics.source_images(source, num_images)
  where = f'{data.name} {data.split}' if data.name not in input_pipeline.BUILTIN else data.name
  return images, f'{where} ({len(images)} images)'


def _image_run(ckpt: str):
  run = workdir_lib.load_run(ckpt)
  if config_lib.is_series(run.config):
    raise InputError('bits per dimension is defined here for 8-bit images; this run models a '
                     'time series')
  return run


def _padded_batches(data: np.ndarray, batch_size: int):
  """(index, batch [batch_size, ...], n) for consecutive batches of ``data`` [N, ...]: the last
  one padded with copies of its last row, so that one compiled shape serves every batch; the
  first n rows are real."""
  for index, begin in enumerate(range(0, len(data), batch_size)):
    batch = data[begin:begin + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    yield index, batch, n


def _standard_error(values: np.ndarray) -> float:
  """The standard error of the mean of ``values`` [N] (NaN for one value)."""
  return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float('nan')


def ode_bits_per_dim(ckpt: str, *, split: str = 'test', num_images: int = 0,
                     batch_size: int = 100, seed: int = 0, num_probes: int = 1,
                     exact: bool = False, rtol: float = 1e-5, atol: float = 1e-5) -> dict:
  """Bits per dimension of the run's data through the probability-flow ODE of its EMA network
  (ddpm_jax.ode_likelihood), dequantised as score_sde does: batch i's uniform noise and probes
  come from fold_in(key(seed), i). Continuous runs (vp_*, rectified_flow) only."""
  run = _image_run(ckpt)
  config, params = run.config, run.params
  # The divergence takes forward-mode derivatives, which the fused GroupNorm's hand-written
  # backward pass (a custom_vjp) does not have; the plain one computes the same outputs.
  forward_config = config.copy_and_resolve_references()
  forward_config.model.fused_group_norm = False
  model = create_model(forward_config)
  schedule = config_lib.schedule_from_config(config)
  if not schedules_lib.is_continuous(schedule):
    raise InputError(f'checkpoint {run.step} uses the discrete {config.diffusion.schedule} '
                     f'schedule; the ODE likelihood needs a continuous run (vp_linear, '
                     f'vp_cosine, rectified_flow): use --method=bound for this one')
  images, description = _bound_data(config, split, num_images)
  batch_size = min(batch_size, len(images))

  @jax.jit
  def score(params, images, key):
    noise_key, probe_key = jax.random.split(key)
    x = ode_likelihood.dequantise(images, noise_key)
    result = ode_likelihood.ode_log_likelihood(
        inference.guided_model_fn(model, params, None, 1.0), schedule, x, probe_key,
        prediction=config.diffusion.target, num_probes=num_probes, exact=exact, rtol=rtol,
        atol=atol)
    dims = int(np.prod(images.shape[1:]))
    return ode_likelihood.dequantised_bits_per_dim(result.log_p, dims), result.nfe

  bar = progress.Progress(len(images), 'ODE likelihood', 'image')
  start, bits, calls = time.time(), [], []
  try:
    for index, batch, n in _padded_batches(images, batch_size):
      bpd, nfe = score(params, batch, jax.random.fold_in(jax.random.key(seed), index))
      bits.append(np.asarray(bpd)[:, :n])
      calls.append(int(nfe))
      bar.advance(n)
  finally:
    bar.close()
  bits = np.concatenate(bits, axis=1)  # [probes, images]
  per_image = bits.mean(axis=0)
  return {
      'data': description, 'checkpoint': run.step, 'schedule': config.diffusion.schedule,
      'bpd': float(per_image.mean()),
      'bpd_standard_error': _standard_error(per_image),
      'divergence': 'exact' if exact else f'hutchinson, {num_probes} rademacher probe(s)',
      # The Hutchinson noise: each image's spread over its probes, averaged over images.
      'probe_std': float(bits.std(axis=0, ddof=1).mean()) if len(bits) > 1 else 0.0,
      'rtol': rtol, 'atol': atol, 'nfe_per_batch': float(np.mean(calls)),
      'num_images': len(per_image), 'seconds': round(time.time() - start, 2),
  }


def bits_per_dim(ckpt: str, *, split: str = 'test', num_images: int = 0, batch_size: int = 100,
                 variances=diffusion.REVERSE_VARIANCES, seed: int = 0) -> dict:
  """The DDPM variational bound of the run's EMA network on ``split`` of its data, in bits per
  dimension, for each reverse variance: {'small': {'bpd', 'prior', 'decoder', 'kl'}, ...}."""
  run = _image_run(ckpt)
  config, model, params = run.config, run.model, run.params
  schedule = config_lib.schedule_from_config(config)
  if schedules_lib.is_continuous(schedule):
    raise InputError(f'checkpoint {run.step} uses the continuous-time '
                     f'{config.diffusion.schedule} schedule; the discrete bound needs a '
                     'linear or cosine (discrete) run: use --method=ode for this one')
  images, description = _bound_data(config, split, num_images)
  x0_all = input_pipeline.images_to_model(images)
  result = {'data': description, 'checkpoint': run.step,
            'num_timesteps': schedule.num_timesteps}
  batch_size = min(batch_size, len(images))
  for variance in variances:
    terms = likelihood.terms_fn(
        lambda p: inference.guided_model_fn(model, p, None, 1.0), schedule,
        prediction=config.diffusion.target, variance=variance, clip_x0=config.sampling.clip_x0)
    bar = progress.Progress(-(-len(images) // batch_size) * schedule.num_timesteps,
                            f'bound ({variance} variance)', 'term')
    start, parts = time.time(), []
    try:
      for index, x0, n in _padded_batches(x0_all, batch_size):
        key = jax.random.fold_in(jax.random.key(seed), index)
        bound = likelihood.bound(terms, params, schedule, x0, key, progress=bar.advance)
        parts.append(jax.tree.map(lambda a, n=n: a[:n], bound))
    finally:
      bar.close()
    total = np.concatenate([p.total for p in parts])
    result[variance] = {
        'bpd': float(total.mean()),
        'bpd_standard_error': _standard_error(total),
        'prior': float(np.concatenate([p.prior for p in parts]).mean()),
        'decoder': float(np.concatenate([p.decoder for p in parts]).mean()),
        'kl': float(np.concatenate([p.terms[:, 1:].sum(axis=1) for p in parts]).mean()),
        'seconds': round(time.time() - start, 2),
    }
  return result
