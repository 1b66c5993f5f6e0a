"""The command line and the train loop's reports: compile message, metrics.jsonl rows (lr, wall-clock),
sample grids in TensorBoard, --mode=sample / --mode=eval file names, --list, one-line config errors.

One tiny training run (module-scoped fixture) serves the in-process tests; two small subprocesses check
what only a process shows (the exit status and stderr of the command line)."""

import io
import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from experiments.configs import base
from experiments.configs import quickstart
from _overrides import set_keys
from vdiff import grid
from vdiff import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = quickstart.get_config("tiny")
  # 20 steps, rows every 5; one periodic sample at step 10 besides the final one at step 20.
  c.training.update(sample_every=10)
  c.sample.update(num_samples=4, num_steps=5)
  return set_keys(c, overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny training run; records the order of the loop's messages and of the progress bar's creation."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  events = []
  mp = pytest.MonkeyPatch()
  say, progress = train._say, train._progress
  mp.setattr(train, "_say", lambda msg: (events.append(("say", msg, time.time())), say(msg)))

  def recording_progress(**kw):
    events.append(("progress", kw.get("desc"), time.time()))
    return progress(**kw)

  mp.setattr(train, "_progress", recording_progress)
  t0 = time.time()
  try:
    result = train.train_and_evaluate(tiny_config(), workdir)
  finally:
    mp.undo()
  t1 = time.time()
  return {"workdir": workdir, "events": events, "t0": t0, "t1": t1, "result": result}


def test_compile_message_comes_before_the_progress_bar(run):
  # The train step is compiled ahead of time with its own message and duration; the training bar (whose
  # rate and ETA tqdm measures from its creation) is created only afterwards.
  kinds = [(k, m) for k, m, _ in run["events"]]
  names = [m if k == "say" else f"<bar {m}>" for k, m in kinds]
  i_compiling = names.index("compiling the train step...")
  i_compiled = next(i for i, m in enumerate(names) if m.startswith("compiled in "))
  i_bar = names.index("<bar train>")
  assert i_compiling < i_compiled < i_bar, names
  seconds = float(names[i_compiled].split()[2])
  assert names[i_compiled] == f"compiled in {seconds:.1f} s"
  # The printed duration is the time between the two messages (to the printed 0.1 s).
  t_compiling, t_compiled = run["events"][i_compiling][2], run["events"][i_compiled][2]
  assert abs(seconds - (t_compiled - t_compiling)) <= 0.06 + 0.05 * seconds


def test_metrics_rows_have_lr_wall_seconds_and_time(run):
  rows = [json.loads(l) for l in open(os.path.join(run["workdir"], "metrics.jsonl"))]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
  # The quickstart's schedule (optim.lr_schedule='constant'): linear warm-up from 0 to 2e-3 over
  # warmup_steps = 5 updates (the tiny word), then 2e-3. The row at step s reports the rate of its last
  # update, number s - 1 counted from 0: 2e-3 * min(s - 1, 5) / 5.
  expected = [2e-3 * min(s - 1, 5) / 5 for s in (5, 10, 15, 20)]
  np.testing.assert_allclose([r["lr"] for r in train_rows], expected, rtol=1e-6)
  assert train_rows[0]["lr"] == pytest.approx(1.6e-3, rel=1e-6)
  # The same numbers from the function the optimiser is built with.
  lr_fn = train.lr_schedule_from_config(tiny_config())
  np.testing.assert_allclose([r["lr"] for r in train_rows],
                             [float(lr_fn(s - 1)) for s in (5, 10, 15, 20)], rtol=0)
  walls = [r["wall_seconds"] for r in train_rows]
  assert all(0 < a < b for a, b in zip(walls, walls[1:])), walls
  assert walls[-1] <= run["t1"] - run["t0"]
  times = [r["time"] for r in train_rows]
  assert all(run["t0"] <= x <= run["t1"] for x in times), (run["t0"], times, run["t1"])
  # wall_seconds and time are one clock: their difference is the run's start, the same in every row.
  starts = [x - w for x, w in zip(times, walls)]
  assert max(starts) - min(starts) < 1e-3, starts


def _read_events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing: length u64, its crc u32, the data,
  its crc u32)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  events, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
    pos += 12 + n + 4
  return events


def test_sample_grids_are_in_tensorboard(run):
  tb = os.path.join(run["workdir"], "tensorboard")
  images = {}
  for f in os.listdir(tb):
    for e in _read_events(os.path.join(tb, f)):
      for v in e.summary.value:
        if v.tag == "samples" and v.HasField("image"):
          images[e.step] = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
  assert sorted(images) == [10, 20], sorted(images)
  for step in (10, 20):
    # The TensorBoard picture is make_grid of the samples written to samples_<step>.npz (17 levels).
    samples = np.load(os.path.join(run["workdir"], f"samples_{step:08d}.npz"))["samples"]
    expected = grid.make_grid(samples, 17)[..., 0]
    got = images[step] if images[step].ndim == 2 else images[step][..., 0]
    np.testing.assert_array_equal(got, expected)


def test_mode_sample_names_its_file_by_the_sampler_settings(run, capsys):
  workdir = run["workdir"]
  before = open(os.path.join(workdir, "samples_00000020.png"), "rb").read()
  config = tiny_config(**{"sample.sampler": "ddim", "sample.num_steps": 3, "sample.eta": 0.5})
  samples = train.sample_checkpoint(config, workdir)
  base_path = os.path.join(workdir, "samples_00000020_ddim_n3_eta0.5_w0")
  assert f"{base_path}.png" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(base_path + ".npz")["samples"], samples)
  assert Image.open(base_path + ".png").size == Image.open(os.path.join(workdir,
                                                                        "samples_00000020.png")).size
  # The training's own final samples are untouched.
  assert open(os.path.join(workdir, "samples_00000020.png"), "rb").read() == before
  config = tiny_config(**{"sample.sampler": "ddpm", "sample.num_steps": 4,
                          "sample.guidance_weight": 1.5})
  train.sample_checkpoint(config, workdir)
  assert os.path.exists(os.path.join(workdir, "samples_00000020_ddpm_n4_eta0_w1.5.png"))
  assert os.path.exists(base_path + ".npz")


# (sampler, its config keys, the file name's settings part, NFE per sample by each sampler's formula).
NEW_SAMPLERS = [
    ("dpm_solver++", {"sample.num_steps": 4}, "dpm_solver++_n4_o2_multistep_logSNR_w0", 4),
    ("dpm_solver", {"sample.num_steps": 3, "sample.order": 3, "sample.method": "singlestep"},
     "dpm_solver_n3_o3_singlestep_logSNR_w0", 3),
    ("heun", {"sample.num_steps": 3}, "heun_n3_w0", 2 * 3 - 1),
    ("pc", {"sample.num_steps": 3, "sample.corrector_steps": 2},
     "pc_n3_reverse_diffusion_langevin_snr0.16_c2_w0", 3 * (1 + 2)),
    ("langevin", {"sample.num_steps": 3, "sample.steps_per_level": 2}, "langevin_n3_s2_lr2e-05_sig0.01_w0",
     3 * 2 + 1),
]


@pytest.mark.parametrize("sampler,keys,name,nfe", NEW_SAMPLERS, ids=[s[0] for s in NEW_SAMPLERS])
def test_mode_sample_runs_every_fast_and_score_sampler(run, capsys, sampler, keys, name, nfe):
  """--mode=sample with sample.sampler = dpm_solver++ | dpm_solver | heun | pc | langevin: the file is
  named by the sampler's settings, the NFE printed and recorded is the sampler's own count (DPM-Solver:
  one per step; Heun: 2N - 1; pc: N predictor + N corrector_steps corrector evaluations, the final
  denoising reusing the last predictor's mean; langevin: L steps_per_level + 1), and the samples equal a direct call of the sampler function with the
  run's EMA denoiser, schedule and `train.sample_key` (an independent path to the same numbers)."""
  from vdiff import dpm_solver, score_samplers, sampling  # pylint: disable=import-outside-toplevel
  workdir = run["workdir"]
  config = tiny_config(**{"sample.sampler": sampler, **keys})
  samples = train.sample_checkpoint(config, workdir)
  base_path = os.path.join(workdir, f"samples_00000020_{name}")
  out = capsys.readouterr().out
  assert f"{base_path}.png" in out and f"{nfe:g} network evaluations (NFE) per sample" in out
  saved = np.load(base_path + ".npz")
  np.testing.assert_array_equal(saved["samples"], samples)
  assert float(saved["nfe"]) == nfe and str(saved["sampler"]) == sampler
  assert json.load(open(os.path.join(workdir, "samples.json")))["nfe"] == nfe
  _, model, state, step = train._restore_for_inference(config, workdir)  # pylint: disable=protected-access
  params = state.ema_params
  eps_fn, sched = model.eps_fn(params), model.schedule(params)
  shape = (config.sample.num_samples,) + model.data_shape
  rng = train.sample_key(config.seed, step)
  s = config.sample
  if sampler.startswith("dpm_solver"):
    direct = dpm_solver.dpm_solver(rng, eps_fn, sched, shape, num_steps=s.num_steps, order=s.order,
                                   algorithm=sampler, method=s.method, skip_type=s.skip_type,
                                   num_levels=model.num_levels)
  elif sampler == "heun":
    direct = dpm_solver.heun(rng, eps_fn, sched, shape, num_steps=s.num_steps, num_levels=model.num_levels)
  elif sampler == "pc":
    direct = score_samplers.pc_sampler(rng, eps_fn, sched, shape, num_steps=s.num_steps,
                                       predictor=s.predictor, corrector=s.corrector, snr=s.snr,
                                       corrector_steps=s.corrector_steps, num_levels=model.num_levels)
  else:
    smin = max(s.sigma_min, float(np.exp(0.5 * sched.gamma(0.0))) * (1 + 1e-5))
    direct = score_samplers.annealed_langevin(rng, eps_fn, sched, shape, num_noise_levels=s.num_steps,
                                              steps_per_level=s.steps_per_level, step_size=s.step_size,
                                              sigma_min=smin, num_levels=model.num_levels)
  assert direct.nfe == nfe
  np.testing.assert_array_equal(np.asarray(direct.samples), samples)
  assert set(sampling.DEFAULT_OPTIONS) <= set(config.sample)


def test_mode_eval_keeps_the_training_eval_json(run):
  workdir = run["workdir"]
  before = open(os.path.join(workdir, "eval.json")).read()
  # Another number of time samples gives another figure than training's evaluation.
  result = train.evaluate_checkpoint(tiny_config(**{"eval.num_time_samples": 2}), workdir)
  assert open(os.path.join(workdir, "eval.json")).read() == before
  written = json.load(open(os.path.join(workdir, "eval_elbo.json")))
  assert written["step"] == 20 and written["estimator"] == "elbo"
  assert written["bpd"] == pytest.approx(result["bpd"], rel=1e-12)
  assert json.loads(before)["bpd"] == pytest.approx(run["result"]["bpd"], rel=1e-12)


def test_mode_sample_keeps_samples_drawn_with_other_unnamed_settings(run):
  """sample.num_samples is not in the file name: a second --mode=sample with another count moves the
  first pair of files to ..._replaced_1 instead of overwriting it (before, the first draw was lost);
  the same draw again moves nothing. Reference: the arrays sample_checkpoint returned."""
  workdir = run["workdir"]
  keys = {"sample.sampler": "ddim", "sample.num_steps": 2}
  base = os.path.join(workdir, "samples_00000020_ddim_n2_eta0_w0")
  four = train.sample_checkpoint(tiny_config(**keys, **{"sample.num_samples": 4}), workdir)
  png = open(base + ".png", "rb").read()
  two = train.sample_checkpoint(tiny_config(**keys, **{"sample.num_samples": 2}), workdir)
  assert (four.shape[0], two.shape[0]) == (4, 2)
  np.testing.assert_array_equal(np.load(base + "_replaced_1.npz")["samples"], four)
  assert open(base + "_replaced_1.png", "rb").read() == png
  np.testing.assert_array_equal(np.load(base + ".npz")["samples"], two)
  train.sample_checkpoint(tiny_config(**keys, **{"sample.num_samples": 2}), workdir)
  assert not os.path.exists(base + "_replaced_2.npz")
  np.testing.assert_array_equal(np.load(base + ".npz")["samples"], two)


def _history(workdir):
  path = os.path.join(workdir, "eval_history.jsonl")
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_mode_eval_keeps_every_earlier_result(run):
  """A second --mode=eval with other settings replaces eval_elbo.json only after appending the first
  result to eval_history.jsonl (before, the first result was simply overwritten). Reference: the dicts
  evaluate_checkpoint returned."""
  workdir = run["workdir"]
  first = train.evaluate_checkpoint(tiny_config(**{"eval.num_time_samples": 3}), workdir)
  before = _history(workdir)
  second = train.evaluate_checkpoint(tiny_config(**{"eval.num_time_samples": 1}), workdir)
  assert first["bpd"] != second["bpd"]
  rows = _history(workdir)
  assert len(rows) == len(before) + 1 and rows[:-1] == before
  assert rows[-1]["file"] == "eval_elbo.json" and rows[-1]["replaced_at"]
  assert rows[-1]["result"]["num_time_samples"] == 3
  assert rows[-1]["result"]["bpd"] == pytest.approx(first["bpd"], rel=1e-12)
  current = json.load(open(os.path.join(workdir, "eval_elbo.json")))
  assert current["num_time_samples"] == 1
  assert current["bpd"] == pytest.approx(second["bpd"], rel=1e-12)


def test_resumed_run_keeps_the_earlier_eval_json(tmp_path):
  """A finished run resumed to more steps evaluates again; its earlier eval.json (step 2) is appended
  to eval_history.jsonl before eval.json takes the step-4 result, and a file that is not JSON is kept
  as text rather than lost."""
  workdir = str(tmp_path / "w")
  keys = {"training.sample_every": 0, "sample.num_samples": 0, "eval.num_examples": 16}
  train.train_and_evaluate(tiny_config(**keys, **{"training.num_steps": 2}), workdir)
  at_2 = json.load(open(os.path.join(workdir, "eval.json")))
  train.train_and_evaluate(tiny_config(**keys, **{"training.num_steps": 4}), workdir)
  at_4 = json.load(open(os.path.join(workdir, "eval.json")))
  assert (at_2["step"], at_4["step"]) == (2, 4)
  rows = _history(workdir)
  assert [(r["file"], r["result"]["step"]) for r in rows] == [("eval.json", 2)]
  assert rows[0]["result"]["bpd"] == at_2["bpd"]
  from vdiff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "eval_ode.json")
  with open(path, "w") as f:
    f.write("not json")
  workdir_lib.replace_json(path, {"step": 4})
  assert _history(workdir)[-1]["text"] == "not json"
  assert json.load(open(path)) == {"step": 4}


def test_list_shows_every_config_its_words_and_keys():
  from experiments import main  # pylint: disable=g-import-not-at-top
  text = main.list_configs()
  configs = sorted(f for f in os.listdir(os.path.join(REPO, "experiments", "configs"))
                   if f.endswith(".py") and f not in ("__init__.py", "base.py"))
  assert configs and all(f"  {f}: " in text for f in configs), configs
  for word in base.WORDS:
    assert word in text
  from experiments.configs import study  # pylint: disable=g-import-not-at-top
  assert "words: one of " + ", ".join(study.VARIANTS) in text
  # Each config's own values of the main keys (the quickstart changes gamma_min and the batch size).
  assert "model.schedule.gamma_min=-8.0" in text and "training.batch_size=64" in text
  # Every base key with its default.
  for key, value in [("training.batch_size", 128), ("eval.estimator", "elbo"), ("data.path", ""),
                     ("sample.sampler", "vdm_ancestral")]:
    assert f"  {key} = {value!r}\n" in text


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))


def test_cli_list_needs_no_config_or_workdir():
  proc = _cli("--list")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "quickstart.py: " in proc.stdout and "training.num_steps = 10000000" in proc.stdout


def test_cli_refused_estimator_is_one_line_and_exit_2(tmp_path):
  workdir = str(tmp_path / "w")
  proc = _cli("--config=experiments/configs/quickstart.py:tiny", f"--workdir={workdir}",
              "--config.eval.estimator=cdm")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr
  assert len(lines) == 1 and lines[0].startswith("[vdiff] invalid config: "), lines
  assert "eval.estimator='cdm' does not apply to model family 'vdm'" in lines[0]
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_make_tfds_writes_a_dataset_tfds_reads_without_tensorflow(tmp_path, capsys):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from experiments import make_tfds  # pylint: disable=g-import-not-at-top
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  assert importlib.util.find_spec("tensorflow") is None  # written and read with TensorFlow absent
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  test_x = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  train_y, test_y = np.arange(7) % 3, np.array([2, 0, 1])
  npz = data_lib.make_npz(str(tmp_path / "mine.npz"), train_x, test_x, train_labels=train_y,
                          test_labels=test_y, num_labels=4)
  data_dir = str(tmp_path / "tfds")
  assert make_tfds.main([f"--npz={npz}", "--name=vdiff_cli_test", f"--data_dir={data_dir}"]) == 0
  assert f"--config.data.data_dir={data_dir}" in capsys.readouterr().out
  # tfds itself reads it back, records in the order written, features as given.
  source = tfds.data_source("vdiff_cli_test", split="test", data_dir=data_dir)
  assert len(source) == 3
  for i in range(3):
    np.testing.assert_array_equal(source[i]["image"], test_x[i])
    assert source[i]["label"] == test_y[i]
  assert source.dataset_info.features["label"].num_classes == 4
  # vdiff's TFDS loader (data.name = the dataset name, data.data_dir = the directory).
  ds = data_lib.load("vdiff_cli_test", split="train", data_dir=data_dir)
  np.testing.assert_array_equal(ds.images, train_x)
  np.testing.assert_array_equal(ds.labels, train_y)
  assert ds.num_levels == 256 and ds.num_labels == 4
  # A file vdiff cannot store as TFDS: one line, exit 2.
  bad = data_lib.make_npz(str(tmp_path / "k17.npz"), train_x % 17, test_x % 17, num_levels=17)
  assert make_tfds.main([f"--npz={bad}", "--name=other", f"--data_dir={data_dir}"]) == 2
  assert "num_levels=17" in capsys.readouterr().err


def test_a_missing_tfds_data_dir_or_split_is_one_clear_error(tmp_path):
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  images = np.zeros((2, 4, 4, 1), np.uint8)
  data_lib.write_tfds("vdiff_split_test", {"train": images, "test": images}, data_dir=data_dir)
  empty = str(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"TFDS dataset 'vdiff_split_test' is not prepared in "
                                       rf"data.data_dir='{re.escape(empty)}'.*experiments.make_tfds"):
    data_lib.load("vdiff_split_test", split="train", data_dir=empty)
  with pytest.raises(ValueError, match=r"has no split 'validation' .*it has \['train', 'test'\]"):
    data_lib.load("vdiff_split_test", split="validation", data_dir=data_dir)
  # A part of a split that exists still loads.
  assert data_lib.load("vdiff_split_test", split="train[:1]", data_dir=data_dir).images.shape == (1, 4, 4, 1)


def test_a_signal_during_compilation_stops_the_run_with_a_checkpoint(tmp_path):
  """SIGTERM that arrives while the train step compiles (the first seconds to minutes of every run) is
  caught like one during training: the run saves a checkpoint after its first step and stops. Before,
  the handler was installed only after compilation, so the signal met the default action (the process
  died with nothing saved). A sentinel handler stands for the default action here: it would receive the
  signal if vdiff did not catch it."""
  import signal  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  uncaught = []
  old = signal.signal(signal.SIGTERM, lambda signum, frame: uncaught.append(signum))
  say = train._say

  def say_and_signal(msg):
    say(msg)
    if msg.startswith("compiling the train step"):
      os.kill(os.getpid(), signal.SIGTERM)

  mp = pytest.MonkeyPatch()
  mp.setattr(train, "_say", say_and_signal)
  try:
    result = train.train_and_evaluate(tiny_config(**{"training.sample_every": 0}), workdir)
  finally:
    mp.undo()
    signal.signal(signal.SIGTERM, old)
  assert not uncaught, "SIGTERM during compilation reached the default handler"
  assert result.get("preempted") and result["signal"] == "SIGTERM", result
  assert result["step"] == 1, result
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
