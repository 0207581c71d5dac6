"""A quality measure for generated 8x8 digits that needs no download: a small classifier.

An MLP (64 -> 128 -> 64 -> 10) is trained once on the train part of scikit-learn's digits
(a fixed permutation: 1,000 train, 797 held out) with a fixed seed and cached as plain arrays
(``~/.cache/ddpm_jax/digits_classifier_v1.npz``). Generated digits are scored by
  fd             the Frechet distance between the classifier's 64-d penultimate features of the
                 samples and of its 1,000 train digits (an FID analogue; lower is better; the
                 held-out real digits give the floor a perfect model would reach);
  confidence     the mean top softmax probability (held-out real digits: see the README);
  label_agreement  for class-conditional samples, the fraction classified as their label.
FD depends on the sample count, so compare numbers measured with the same count.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import NamedTuple, Optional

import numpy as np

from ddpm_jax import image_metrics, input_pipeline, user_cache
from ddpm_jax.errors import InputError

CACHE_FILE = 'digits_classifier_v1.npz'
NUM_TRAIN = 1000
SEED = 0


def split() -> dict:
  """{'train_images', 'train_labels', 'heldout_images', 'heldout_labels'}: uint8 [N, 8, 8, 1]."""
  images, labels = input_pipeline.digits_arrays()
  order = np.random.default_rng(SEED).permutation(len(images))
  train, heldout = order[:NUM_TRAIN], order[NUM_TRAIN:]
  return {'train_images': images[train], 'train_labels': labels[train],
          'heldout_images': images[heldout], 'heldout_labels': labels[heldout]}


class DigitsClassifier(NamedTuple):
  weights: list  # [64, 128], [128, 64], [64, 10]
  biases: list
  reference_mu: np.ndarray  # [64] features of the train part
  reference_sigma: np.ndarray  # [64, 64]

  def _hidden_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0  # [N, 64]
    if x.shape[1] != self.weights[0].shape[0]:
      raise InputError(f'the digits classifier takes 8x8 one-channel images, got '
                       f'{list(np.shape(images))[1:]}')
    for weight, bias in zip(self.weights[:-1], self.biases[:-1]):
      x = np.maximum(x @ weight + bias, 0.0)
    return x, x @ self.weights[-1] + self.biases[-1]

  def features(self, images) -> np.ndarray:
    """uint8 [N, 8, 8, 1] -> penultimate activations [N, 64]."""
    return self._hidden_and_logits(images)[0]

  def probabilities(self, images) -> np.ndarray:
    """uint8 [N, 8, 8, 1] -> softmax [N, 10]."""
    logits = self._hidden_and_logits(images)[1]
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _cache_path() -> pathlib.Path:
  return user_cache.folder() / CACHE_FILE


def _train() -> dict:
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier
  data = split()
  model = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-3, max_iter=400,
                        random_state=SEED)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    model.fit(data['train_images'].reshape(NUM_TRAIN, -1) / 255.0, data['train_labels'])
  arrays = {f'w{i}': w for i, w in enumerate(model.coefs_)}
  arrays.update({f'b{i}': b for i, b in enumerate(model.intercepts_)})
  return arrays


def load_classifier() -> DigitsClassifier:
  """The cached classifier, trained (a few seconds) and cached on first use."""
  path = _cache_path()
  arrays = None
  if path.is_file():
    try:
      with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError):  # a damaged cache is retrained
      arrays = None
  if arrays is None:
    arrays = _train()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'{path.name}.{os.getpid()}.partial.npz')
    np.savez(partial, **arrays)
    os.replace(partial, path)  # atomic: concurrent runs never read half a file
  count = sum(1 for k in arrays if k.startswith('w'))
  weights = [arrays[f'w{i}'] for i in range(count)]
  biases = [arrays[f'b{i}'] for i in range(count)]
  partial_classifier = DigitsClassifier(weights, biases, np.zeros(0), np.zeros((0, 0)))
  mu, sigma = image_metrics.statistics(partial_classifier.features(split()['train_images']))
  return partial_classifier._replace(reference_mu=mu, reference_sigma=sigma)


def quality(images: np.ndarray, labels: Optional[np.ndarray] = None,
            classifier: Optional[DigitsClassifier] = None) -> dict:
  """{'fd', 'confidence'[, 'label_agreement']} of uint8 digits [N, 8, 8, 1] (N >= 2)."""
  classifier = classifier or load_classifier()
  if len(images) < 2:
    raise InputError(f'digits quality needs at least 2 samples, got {len(images)}')
  features = classifier.features(images)
  mu, sigma = image_metrics.statistics(features)
  probabilities = classifier.probabilities(images)
  result = {'fd': image_metrics.frechet_distance(mu, sigma, classifier.reference_mu,
                                                 classifier.reference_sigma),
            'confidence': float(probabilities.max(axis=1).mean())}
  if labels is not None:
    result['label_agreement'] = float(np.mean(probabilities.argmax(axis=1) == np.asarray(labels)))
  return result
