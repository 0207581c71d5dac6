"""Bits per dimension of a trained image run: the DDPM variational bound (discrete runs) or the
exact likelihood through the probability-flow ODE (continuous and flow runs).

  python -m ddpm_jax.bpd --ckpt=runs/digits
  python -m ddpm_jax.bpd --ckpt=runs/cifar10 --split=test --num_images=1000
  python -m ddpm_jax.bpd --ckpt=runs/digits_flow --method=ode --num_probes=4

--method=ode integrates the ODE with diffrax at --rtol/--atol, the divergence by Hutchinson's
estimator with --num_probes Rademacher probes (or --exact_divergence), on data dequantised as
score_sde does; it writes <workdir>/eval/bpd_ode.json. See ddpm_jax.ode_likelihood.

Scores the EMA network on the run's data (--split of a tensorflow-datasets set; digits has no
test split and is scored on its training images, which the output says) with both reverse
variances (beta-tilde_t 'small' and beta_t 'large'), T network calls per image. Writes
<workdir>/eval/bpd.json. See ddpm_jax.likelihood for the terms.
"""

from __future__ import annotations

import json

from absl import app, flags

from ddpm_jax import cli, evaluation
from ddpm_jax.errors import InputError
from ddpm_jax import workdir as workdir_lib

flags.DEFINE_string('ckpt', None, 'A training workdir or one of its checkpoints.')
flags.DEFINE_string('split', 'test', 'Split of a tensorflow-datasets set.')
flags.DEFINE_integer('num_images', 0, 'Score the first N images (0: all).')
flags.DEFINE_integer('batch_size', 100, 'Images per network call.')
flags.DEFINE_integer('seed', 0, 'Seed of the noise draws.')
flags.DEFINE_enum('method', 'bound', ['bound', 'ode'], 'bound: the DDPM variational bound '
                  '(discrete runs); ode: the probability-flow ODE likelihood (continuous runs).')
flags.DEFINE_integer('num_probes', 1, 'ode: Hutchinson probes per image.')
flags.DEFINE_bool('exact_divergence', False, 'ode: the exact divergence (one Jacobian-vector '
                  'product per dimension) instead of Hutchinson probes.')
flags.DEFINE_float('rtol', 1e-5, 'ode: relative tolerance of the solve.')
flags.DEFINE_float('atol', 1e-5, 'ode: absolute tolerance of the solve.')
flags.mark_flags_as_required(['ckpt'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS

  def run():
    if f.num_images < 0 or f.batch_size < 1:
      raise InputError('--num_images must be >= 0 and --batch_size >= 1')
    workdir = workdir_lib.resolve_checkpoint(f.ckpt)[0]
    if f.method == 'ode':
      result = evaluation.ode_bits_per_dim(
          f.ckpt, split=f.split, num_images=f.num_images, batch_size=f.batch_size, seed=f.seed,
          num_probes=f.num_probes, exact=f.exact_divergence, rtol=f.rtol, atol=f.atol)
      out = workdir / 'eval' / 'bpd_ode.json'
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(result, indent=2) + '\n')
      print(f'{result["data"]}, checkpoint {result["checkpoint"]}, {result["schedule"]}')
      print(f'ODE likelihood: {result["bpd"]:.4f} +- {result["bpd_standard_error"]:.4f} '
            f'bits/dim (divergence {result["divergence"]}, spread over probes '
            f'{result["probe_std"]:.4f}; {result["nfe_per_batch"]:.0f} calls per batch, '
            f'{result["seconds"]:.1f} s)')
      print(f'wrote {out}')
      return
    result = evaluation.bits_per_dim(f.ckpt, split=f.split, num_images=f.num_images,
                                     batch_size=f.batch_size, seed=f.seed)
    out = workdir / 'eval' / 'bpd.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'{result["data"]}, checkpoint {result["checkpoint"]}, T = {result["num_timesteps"]}')
    for variance in ('small', 'large'):
      r = result[variance]
      print(f'{variance:>5} variance: {r["bpd"]:.4f} +- {r["bpd_standard_error"]:.4f} bits/dim '
            f'(prior {r["prior"]:.2e}, decoder {r["decoder"]:.4f}, KL terms {r["kl"]:.4f}; '
            f'{r["seconds"]:.1f} s)')
    print(f'wrote {out}')
  cli.run('ddpm_jax.bpd', run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
