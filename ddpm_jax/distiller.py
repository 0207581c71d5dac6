"""Progressive distillation of a trained run, stage by stage: what ``distill.py`` calls.

``distill(config, teacher, workdir)`` halves the teacher's deterministic DDIM sampler from
``distill.start_steps`` down to ``distill.final_steps`` (Salimans & Ho 2022, Algorithm 2; the
target math is ``ddpm_jax.distillation``). Each stage is a run of its own in
``<workdir>/students/<N>_steps/``: the teacher's network and data, a config.json that samples
with N trailing DDIM steps, orbax checkpoints, grids and metrics, so ``sample.py``,
``load_sampler`` and ``make_sample_fn`` take a student as they take any run. Starting again
resumes the unfinished stage from its newest checkpoint; finished stages are kept and teach the
next one.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time

import jax
import ml_collections

from ddpm_jax import (config_lib, distillation, file_checks, input_pipeline, sharding,
                      train_state, trainer)
from ddpm_jax.errors import InputError
from ddpm_jax.models import create_model
from ddpm_jax import workdir as workdir_lib


def stage_steps(distill_config) -> list[int]:
  """The students' step counts, largest first: start_steps / 2, ..., final_steps."""
  start, final = int(distill_config.start_steps), int(distill_config.final_steps)
  ratio = start // final if final >= 1 else 0
  if final < 1 or start <= final or start % final or ratio & (ratio - 1):
    raise InputError(f'distill.start_steps={start} must be distill.final_steps={final} (>= 1) '
                     f'times a power of two larger than 1, e.g. 32 and 1')
  steps = []
  while start > final:
    start //= 2
    steps.append(start)
  return steps


def check_teacher(path: str) -> pathlib.Path:
  """The teacher's workdir, or one line saying why ``path`` is not a trained run."""
  if not path:
    raise InputError('--teacher is required: the workdir of a trained run '
                     '(python train.py ... --workdir=runs/digits)')
  folder = pathlib.Path(path).expanduser()
  if not folder.exists():
    raise FileNotFoundError(f'--teacher {folder} does not exist; pass the --workdir of a '
                            f'trained run')
  if (folder / workdir_lib.STUDENTS).is_dir():
    return folder  # a distillation run: its fewest-step student teaches on
  if not (folder / 'config.json').is_file():
    raise FileNotFoundError(f'--teacher {folder} is not a training workdir (no config.json); '
                            f'pass the --workdir that train.py wrote')
  return folder


def check_teacher_config(config) -> None:
  """Refuses teachers whose sampling distillation does not reproduce yet."""
  if config.model.num_classes:
    raise InputError('class-conditional teachers are not distilled yet (guided distillation, '
                     'Meng et al. 2023, is not built); distil an unconditional run')
  if config_lib.observed_input(config):
    raise InputError('teachers trained with model.observed_input (series tasks) are not '
                     'distilled yet; distil a run of plain windows')


def student_config(teacher_config, config, num_steps: int, stage: int, teacher: dict):
  """The run config of the stage whose student takes ``num_steps`` steps: the teacher's network,
  schedule and data; the student's prediction; distillation's optimiser and periods; sampling
  with its own trailing DDIM steps."""
  student = copy.deepcopy(teacher_config)
  with student.unlocked():
    student.diffusion.target = config.distill.student_prediction
    student.diffusion.timestep_sampling = 'uniform'
    student.optim = ml_collections.ConfigDict(config.optim.to_dict())
    student.optim.decay_steps = config.distill.steps_per_stage
    training = config.training
    digits = teacher_config.data.name == 'digits' and training.eval_quality
    student.training.update(dict(
        num_steps=config.distill.steps_per_stage, batch_size=training.batch_size,
        seed=training.seed + stage, log_every=training.log_every,
        checkpoint_every=training.checkpoint_every, sample_every=0,
        keep_checkpoints=training.keep_checkpoints,
        max_nonfinite_steps=training.max_nonfinite_steps, label_dropout=0.0,
        num_sample_images=training.num_sample_images,
        eval_every=config.distill.steps_per_stage if digits else 0,
        eval_samples=training.eval_samples, eval_steps=num_steps))
    student.sampling.update(dict(method='ddim', num_steps=num_steps, spacing='trailing',
                                 eta=0.0, guidance_scale=1.0))
    student.distill = dict(teacher=teacher, teacher_steps=2 * num_steps, stage=stage + 1)
  return student


def prepare_workdir(workdir: pathlib.Path, record: dict) -> None:
  """Writes config.json (the distillation config and its teacher), or checks that the one a
  previous start wrote is the same."""
  path = workdir / 'config.json'
  text = json.dumps(record, indent=2, sort_keys=True)
  if path.is_file() and not (workdir / workdir_lib.STUDENTS).is_dir():
    raise InputError(f'--workdir {workdir} holds a training run, not a distillation; choose a '
                     f'new folder')
  if path.is_file():
    saved, wanted = json.loads(path.read_text()), json.loads(text)
    if saved != wanted:
      diffs = [key for key in sorted(set(saved) | set(wanted))
               if saved.get(key) != wanted.get(key)]
      raise InputError(f'{workdir} holds a distillation with other settings (differs in '
                       f'{", ".join(diffs)}); use a new --workdir or the original settings')
  sharding.barrier('distill_config_checked')
  if sharding.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / workdir_lib.STUDENTS).mkdir(exist_ok=True)
    path.write_text(text)


def _make_distill_step(model, tx, grid, teacher_params, teacher_prediction, config):
  """make_step for ``trainer.train_loop``: the jitted distill step with this stage's teacher."""
  def make_step(state_sharding, batch_sharding, replicated):
    step = jax.jit(
        lambda state, batch, teacher: train_state.distill_step(
            state, batch, teacher, model=model, tx=tx, grid=grid,
            teacher_prediction=teacher_prediction,
            student_prediction=config.diffusion.target,
            clip_x0=bool(config.sampling.clip_x0) and not config_lib.is_series(config),
            ema_decay=config.optim.ema_decay, random_flip=config.data.random_flip),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=0)
    return lambda state, batch: step(state, batch, teacher_params)
  return make_step


def distill(config, teacher: str, workdir: str) -> dict:
  """Distils the run at ``teacher`` into ``workdir`` (resuming what is there); returns
  {steps: student folder} of the finished stages."""
  teacher_dir = check_teacher(teacher)
  if not workdir:
    raise InputError('--workdir is required: the folder for the students')
  workdir = file_checks.check_writable_folder(workdir, '--workdir')
  if workdir.resolve() == teacher_dir.resolve():
    raise InputError('--workdir must differ from --teacher: the students are runs of their own')
  steps = stage_steps(config.distill)
  if config.distill.student_prediction not in distillation.STUDENT_PREDICTIONS:
    raise InputError(f'distill.student_prediction={config.distill.student_prediction!r}; choose '
                     f'one of {", ".join(distillation.STUDENT_PREDICTIONS)}')
  if config.optim.get('grad_accum_steps', 1) != 1:
    raise InputError('distill.py does not accumulate gradients yet; set '
                     'optim.grad_accum_steps=1 (or a smaller training.batch_size)')
  sharding.initialize_distributed()
  mesh = sharding.make_mesh()
  sharding.check_global_batch(config.training.batch_size, mesh)

  teacher = workdir_lib.load_run(teacher_dir)
  teacher_config, teacher_params = teacher.config, teacher.params
  check_teacher_config(teacher_config)
  teacher_record = {'path': str(teacher.workdir.resolve()), 'step': int(teacher.step)}
  prepare_workdir(workdir, {**json.loads(config_lib.to_json(config)), 'teacher': teacher_record})

  source = input_pipeline.create_source(teacher_config.data, seed=config.training.seed)
  info = source.info()
  if tuple(info.shape) != tuple(config_lib.data_shape(teacher_config)):
    raise InputError(f'the teacher was trained on examples of shape '
                     f'{list(config_lib.data_shape(teacher_config))}, but its data '
                     f'({teacher_config.data.name}) now gives {list(info.shape)}')
  model = create_model(teacher_config)
  schedule = config_lib.schedule_from_config(teacher_config)
  teacher_prediction = teacher_config.diffusion.target
  main = sharding.is_main_process()
  for stage, num_steps in enumerate(steps):
    folder = workdir_lib.student_folder(workdir, num_steps)
    if (folder / workdir_lib.STAGE_DONE).is_file():  # finished before: it teaches the next stage
      teacher_params = workdir_lib.load_run(folder).params
      teacher_prediction = config.distill.student_prediction
      continue
    stage_config = student_config(teacher_config, config, num_steps, stage, teacher_record)
    tx = train_state.make_optimizer(stage_config.optim)
    key = jax.random.fold_in(train_state.run_keys(stage_config.training.seed)[1], num_steps)
    params = teacher_params
    init = lambda: train_state.state_from_params(params, tx, key)
    data_iter = input_pipeline.make_iterator(source, stage_config.training.batch_size,
                                             stage_config.training.seed)
    make_step = _make_distill_step(model, tx, distillation.stage_grid(schedule, num_steps),
                                   teacher_params, teacher_prediction, stage_config)
    label = f'stage {stage + 1}/{len(steps)} ({2 * num_steps} -> {num_steps} steps)'
    if main:
      print(f'{label}: distilling into {folder}', flush=True)
    start = time.time()
    state = trainer.run_in_workdir(stage_config, folder, mesh, model, init, data_iter,
                                   info.stats, make_step, label)
    if main:
      (folder / workdir_lib.STAGE_DONE).write_text(json.dumps(
          {'steps': num_steps, 'teacher_steps': 2 * num_steps, 'step': int(state.step),
           'seconds_this_start': round(time.time() - start, 1)}, indent=2))
    sharding.barrier(f'stage_{num_steps}_done')
    teacher_params, teacher_prediction = state.ema_params, config.distill.student_prediction
  return workdir_lib.finished_students(workdir)
