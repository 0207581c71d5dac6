"""Series metrics (numpy and scoringrules): generated windows [N, L, C] against real ones, and
probabilistic forecasts / imputations against the values they hid, with honest baselines.

Generated windows, each 0 for identical sets and growing with the difference:
  marginal      mean over channels of the Wasserstein-1 distance between value distributions;
  acf           mean absolute difference of the per-channel autocorrelation up to ``max_lag``;
  cross_corr    mean absolute difference of the channel-channel correlation matrices;
  discriminative  |accuracy - 0.5| of a small classifier told to separate the two sets.
"""

from __future__ import annotations

import warnings

import numpy as np
import scoringrules

from ddpm_jax.series_data import denormalize
from ddpm_jax.errors import InputError

METRIC_NAMES = ('marginal', 'acf', 'cross_corr', 'discriminative')


def wasserstein_1d(a: np.ndarray, b: np.ndarray, num_quantiles: int = 1000) -> float:
  """W1 between the empirical distributions of two 1-D samples: the mean |quantile gap|."""
  q = (np.arange(num_quantiles) + 0.5) / num_quantiles
  return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def marginal_distance(x: np.ndarray, y: np.ndarray) -> float:
  """Mean over channels of W1 between the values of x [N, L, C] and y [M, L, C]."""
  return float(np.mean([wasserstein_1d(x[..., c].ravel(), y[..., c].ravel())
                        for c in range(x.shape[-1])]))


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
  """Mean over windows of each channel's autocorrelation at lags 1..max_lag -> [max_lag, C]."""
  centred = x - x.mean(axis=1, keepdims=True)
  variance = np.maximum((centred ** 2).mean(axis=1), 1e-12)  # [N, C]
  lags = [np.mean(centred[:, lag:] * centred[:, :-lag], axis=1) / variance
          for lag in range(1, max_lag + 1)]
  return np.stack(lags).mean(axis=1)


def acf_error(x: np.ndarray, y: np.ndarray, max_lag: int = 24) -> float:
  max_lag = min(max_lag, x.shape[1] - 1)
  return float(np.mean(np.abs(autocorrelation(x, max_lag) - autocorrelation(y, max_lag))))


def channel_correlation(x: np.ndarray) -> np.ndarray:
  """[C, C] correlation of the channels over every time step of every window."""
  flat = x.reshape(-1, x.shape[-1])
  corr = np.corrcoef(flat, rowvar=False)
  return np.nan_to_num(np.atleast_2d(corr))


def cross_correlation_error(x: np.ndarray, y: np.ndarray) -> float:
  num_channels = x.shape[-1]
  if num_channels < 2:
    return 0.0
  upper = np.triu_indices(num_channels, k=1)
  return float(np.mean(np.abs(channel_correlation(x)[upper] - channel_correlation(y)[upper])))


def discriminative_score(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
  """|accuracy - 0.5| of an MLP on held-out windows (balanced classes, 70/30 split)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier
  rng = np.random.default_rng(seed)
  n = min(len(x), len(y))
  x, y = x[rng.permutation(len(x))[:n]], y[rng.permutation(len(y))[:n]]
  features = np.concatenate([x, y]).reshape(2 * n, -1)
  scale = features.std(axis=0) + 1e-8
  features = (features - features.mean(axis=0)) / scale
  labels = np.concatenate([np.zeros(n), np.ones(n)])
  order = rng.permutation(2 * n)
  features, labels = features[order], labels[order]
  cut = int(0.7 * 2 * n)
  classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
  with warnings.catch_warnings():  # an unconverged fit still gives a valid held-out accuracy
    warnings.simplefilter('ignore', ConvergenceWarning)
    classifier.fit(features[:cut], labels[:cut])
  accuracy = classifier.score(features[cut:], labels[cut:])
  return float(abs(accuracy - 0.5))


def compare(x: np.ndarray, y: np.ndarray, max_lag: int = 24, seed: int = 0) -> dict:
  """Every metric of x against y (both [N, L, C], in the same units)."""
  return {'marginal': marginal_distance(x, y), 'acf': acf_error(x, y, max_lag),
          'cross_corr': cross_correlation_error(x, y),
          'discriminative': discriminative_score(x, y, seed)}


def gaussian_baseline(reference: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
  """Independent Gaussian noise with each channel's mean and variance: [num, L, C]."""
  rng = np.random.default_rng(seed)
  mean = reference.mean(axis=(0, 1))
  std = reference.std(axis=(0, 1))
  return rng.normal(mean, std, (num,) + reference.shape[1:])


def evaluate_against_data(samples: np.ndarray, source, stats: dict, max_windows: int = 1000,
                          seed: int = 0) -> dict:
  """Generated windows against real ones, all in original units. Returns {row: {metric: value}}.

  Rows: generated vs real training windows (the distribution the model was fitted to) and vs
  the held-out validation windows; as references, real training vs real validation windows
  (how far two real samples of the series are apart) and independent Gaussian noise with each
  channel's mean and variance vs real training windows.
  """
  if source.validation is None:
    raise InputError('the series has no validation part as long as one window; raise '
                     'data.val_fraction')
  rng = np.random.default_rng(seed)

  def real(windows, n):
    picks = np.sort(rng.choice(len(windows), min(n, len(windows)), replace=False))
    return denormalize(windows.get_batch(picks)['x'], stats)

  train, validation = real(source.train, max_windows), real(source.validation, max_windows)
  return {
      'generated vs real train': compare(samples, train, seed=seed),
      'generated vs real validation': compare(samples, validation, seed=seed),
      'real train vs real validation': compare(real(source.train, max_windows), validation,
                                               seed=seed),
      'gaussian noise vs real train': compare(gaussian_baseline(train, len(samples), seed), train,
                                              seed=seed),
  }


def format_table(table: dict) -> str:
  """A plain-text table: one row per comparison, one column per metric."""
  width = max(len(name) for name in table) + 2
  lines = [' ' * width + ''.join(f'{m:>16}' for m in METRIC_NAMES)]
  for name, row in table.items():
    lines.append(f'{name:<{width}}' + ''.join(f'{row[m]:>16.4f}' for m in METRIC_NAMES))
  return '\n'.join(lines)


# ---- Probabilistic forecasts and imputations: samples against the hidden true values ---------


def _crps(samples: np.ndarray, observations: np.ndarray) -> np.ndarray:
  """CRPS of each observation [...] under its ensemble samples [S, ...] (scoringrules)."""
  return np.asarray(scoringrules.crps_ensemble(observations, np.moveaxis(samples, 0, -1),
                                               m_axis=-1), np.float64)


# Central intervals whose coverage is reported: a calibrated forecast covers 50% and 90%.
COVERAGE_LEVELS = (0.5, 0.9)
# The energy score's pairwise term holds [windows, S, S, D] distances: windows are scored in
# chunks of about this many entries, and at most ENERGY_SAMPLES samples of each.
ENERGY_BUDGET = 1 << 25
ENERGY_SAMPLES = 1000


def energy_score(samples: np.ndarray, target: np.ndarray, hidden: np.ndarray) -> np.ndarray:
  """[K] energy score of each window's hidden entries as one vector (scoringrules):
  E||X - y|| - E||X - X'|| / 2 over samples X [K, S, L, C] of target y [K, L, C]. Observed
  entries are zeroed in both, so they add nothing; past ENERGY_SAMPLES samples, the first
  ENERGY_SAMPLES are used."""
  samples = samples[:, :ENERGY_SAMPLES]
  weights = hidden.astype(np.float64)
  flat_samples = (samples * weights[:, None]).reshape(samples.shape[0], samples.shape[1], -1)
  flat_target = (target * weights).reshape(target.shape[0], -1)
  chunk = max(1, ENERGY_BUDGET // (flat_samples.shape[1] ** 2 * flat_samples.shape[2]))
  scores = [np.asarray(scoringrules.es_ensemble(flat_target[i:i + chunk],
                                               flat_samples[i:i + chunk],
                                               m_axis=-2, v_axis=-1), np.float64)
            for i in range(0, len(flat_target), chunk)]
  return np.concatenate(scores)


def interval_coverage(samples: np.ndarray, target: np.ndarray, hidden: np.ndarray,
                      level: float) -> float:
  """The share of hidden entries of target [K, L, C] inside the central ``level`` interval of
  their samples [K, S, L, C] (the empirical (1 - level)/2 and (1 + level)/2 quantiles)."""
  low, high = np.quantile(samples, ((1 - level) / 2, (1 + level) / 2), axis=1)
  inside = (low <= target) & (target <= high)
  return float(inside[hidden].mean())


def probabilistic_scores(samples: np.ndarray, target: np.ndarray, hidden: np.ndarray) -> dict:
  """Scores of samples [K, S, L, C] (S = 1 for a point forecast) for target [K, L, C] on the
  entries where ``hidden`` [K, L, C] is true, in the units of the arrays:

    crps            mean CRPS over the hidden entries (the MAE for a point forecast);
    crps_normalized sum of CRPS / sum of |target| (as CSDI reports it);
    crps_sum        CRPS of the sum over hidden channels at each time step, normalised by the
                    sum of |that sum| (as TimeGrad and CSDI report it);
    energy          mean over windows of the energy score of the hidden entries as one vector
                    (CRPS scores each entry alone; this also scores how they move together);
    mae, mse, rmse  of the sample median; mae_mean, mse_mean of the sample mean;
    coverage_50, coverage_90  the share of hidden entries inside the central 50% / 90%
                    interval of the samples (None for a point forecast).
  """
  hidden = hidden.astype(bool)
  if not hidden.any():
    raise InputError('nothing is hidden: there is nothing to score')
  crps = _crps(np.moveaxis(samples, 1, 0), target)  # [K, L, C]
  error = (np.median(samples, axis=1) - target)[hidden]
  mean_error = (samples.mean(axis=1) - target)[hidden]
  weights = hidden.astype(np.float64)
  summed_samples = np.einsum('kslc,klc->skl', samples, weights)  # [S, K, L]
  summed_target = np.einsum('klc,klc->kl', target, weights)
  steps = hidden.any(axis=-1)  # [K, L]
  crps_sum = _crps(summed_samples, summed_target)[steps]
  ensemble = samples.shape[1] > 1
  scores = {'crps': float(crps[hidden].mean()),
            'crps_normalized': float(crps[hidden].sum() / np.abs(target[hidden]).sum()),
            'crps_sum': float(crps_sum.sum() / np.abs(summed_target[steps]).sum()),
            'energy': float(energy_score(samples, target, hidden).mean()),
            'mae': float(np.abs(error).mean()),
            'mse': float((error ** 2).mean()),
            'rmse': float(np.sqrt((error ** 2).mean())),
            'mae_mean': float(np.abs(mean_error).mean()),
            'mse_mean': float((mean_error ** 2).mean())}
  for level in COVERAGE_LEVELS:
    scores[f'coverage_{round(level * 100)}'] = (
        interval_coverage(samples, target, hidden, level) if ensemble else None)
  return scores


def seasonal_naive(history: np.ndarray, horizon: int, season: int) -> np.ndarray:
  """history [K, T, C] -> [K, horizon, C]: each step repeats the value one season earlier (the
  last value when the history is shorter than a season)."""
  if season < 1 or season > history.shape[1]:
    return np.repeat(history[:, -1:], horizon, axis=1)
  steps = np.arange(horizon)
  return history[:, history.shape[1] - season + steps % season]


def climatology_samples(train_rows: np.ndarray, count: int, shape: tuple,
                        seed: int = 0) -> np.ndarray:
  """[K, count, L, C]: every step drawn from the training rows [N, C] (the marginal law of the
  training part; channels drawn jointly), the same ensemble for every window."""
  rng = np.random.default_rng(seed)
  rows = train_rows[rng.integers(0, len(train_rows), (count,) + tuple(shape[1:-1]))]
  return np.broadcast_to(rows[None], (shape[0], count) + tuple(shape[1:])).copy()


def linear_interpolation(windows: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """windows [K, L, C] with mask (1 = observed) -> hidden entries filled by linear interpolation
  between the observed neighbours of each channel (flat beyond the first and last)."""
  filled = windows.copy()
  steps = np.arange(windows.shape[1])
  for k in range(windows.shape[0]):
    for c in range(windows.shape[2]):
      seen = mask[k, :, c] > 0
      if seen.any() and not seen.all():
        filled[k, ~seen, c] = np.interp(steps[~seen], steps[seen], windows[k, seen, c])
  return filled


def seasonal_profile(train_rows: np.ndarray, first_row: int, rows: np.ndarray,
                     season: int) -> np.ndarray:
  """The mean of the training rows [N, C] (row 0 at series row ``first_row``) at each phase of
  the season, looked up for the series rows ``rows`` [...] -> [..., C]."""
  phase = (np.arange(len(train_rows)) + first_row) % season
  profile = np.stack([train_rows[phase == p].mean(axis=0) for p in range(season)])
  return profile[rows % season]
