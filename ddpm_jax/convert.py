"""Converts between the diffusers format and a ddpm_jax run directory.

  python -m ddpm_jax.convert --from_diffusers=ddpm-cifar10-32 --workdir=runs/ddpm_cifar10
  python -m ddpm_jax.convert --to_diffusers=exported/ --ckpt=runs/digits

--from_diffusers reads a UNet2DModel folder (or a pipeline folder with unet/ and scheduler/)
and writes a run that sample.py --ckpt, ddpm_jax.load_sampler and train.py --workdir (fine-tuning
from step 0, fresh optimiser state) take as their own. --to_diffusers writes a run's EMA
parameters as a folder UNet2DModel.from_pretrained and DDPMScheduler.from_pretrained read.
Sections a diffusers folder does not describe (optim, training) come from --config.
"""

from __future__ import annotations

import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import cli, config_lib, interop, sharding, train_state
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import InputError

config_flags.DEFINE_config_file('config', cli.packaged_config('default'), 'Base config for the sections a '
                                'diffusers folder does not describe.', lock_config=False)
flags.DEFINE_string('from_diffusers', '', 'A diffusers UNet2DModel or pipeline folder to read.')
flags.DEFINE_string('workdir', '', 'With --from_diffusers: the run directory to write (new).')
flags.DEFINE_string('to_diffusers', '', 'A folder to write the diffusers files to (new).')
flags.DEFINE_string('ckpt', '', 'With --to_diffusers: the run (or one checkpoint) to export.')


def _check_new(path: pathlib.Path, flag: str) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise InputError(f'{flag} {path} exists and is not empty; choose a new folder')


def from_diffusers(folder, workdir, base_config) -> pathlib.Path:
  """Writes ``workdir`` as a run at step 0 whose parameters and EMA are the diffusers UNet's."""
  workdir = pathlib.Path(workdir).expanduser()
  _check_new(workdir, '--workdir')
  config, model, params = interop.load_diffusers(folder, base_config)  # checks all first
  tx = train_state.make_optimizer(config.optim)
  init = train_state.initial_state_fn(config, model, tx, config_lib.schedule_from_config(config),
                                      config_lib.data_shape(config))
  replicated = sharding.replicated(sharding.make_mesh())
  state = jax.jit(init, out_shardings=replicated)()
  params = jax.device_put(params, replicated)
  state = state.replace(params=params, ema_params=params)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config_lib.to_json(config))
  checkpointer = Checkpointer(workdir / 'checkpoints')
  try:
    checkpointer.save(0, state, None, {'converted_from': str(pathlib.Path(folder).absolute())})
  finally:
    checkpointer.close()
  return workdir


def to_diffusers(ckpt, folder) -> pathlib.Path:
  """Writes the EMA parameters of the run at ``ckpt`` as a diffusers folder."""
  folder = pathlib.Path(folder).expanduser()
  _check_new(folder, '--to_diffusers')
  run = workdir_lib.load_run(ckpt)
  config, params = run.config, run.params
  # Checked before anything is written: the configs must map.
  interop.unet_config_from_fields(config.model, config.data)
  interop.scheduler_config_from_fields(config.diffusion, config.sampling)
  return interop.save_diffusers(folder, config, params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS

  def run():
    if bool(f.from_diffusers) == bool(f.to_diffusers):
      raise InputError('give one of --from_diffusers=DIR (with --workdir) or --to_diffusers=DIR '
                       '(with --ckpt)')
    if f.from_diffusers:
      if not f.workdir:
        raise InputError('--from_diffusers needs --workdir: the run directory to write')
      out = from_diffusers(f.from_diffusers, f.workdir, f.config)
      print(f'wrote {out}: python sample.py --ckpt={out}')
    else:
      if not f.ckpt:
        raise InputError('--to_diffusers needs --ckpt: the run to export')
      out = to_diffusers(f.ckpt, f.to_diffusers)
      print(f'wrote {out}: UNet2DModel.from_pretrained({str(out)!r}), '
            f'DDPMScheduler.from_pretrained({str(out)!r})')
  cli.run('convert', run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
