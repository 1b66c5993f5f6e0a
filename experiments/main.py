"""vdiff command line: train, evaluate or sample one experiment.

  python -m experiments.main --config=experiments/configs/NAME.py[:words] --workdir=DIR \
      [--mode=train|eval|sample] [--config.key=value ...]
  python -m experiments.main --list      # the configs, their argument words, main keys and defaults

--mode=train writes the work directory (vdiff/train.py), its eval.json and samples_<step>.png/.npz;
--mode=eval writes eval_<estimator>.json (the training's eval.json is kept); --mode=sample writes
samples_<step>_<sampler>_n<steps>_<its settings>_w<guidance_weight>.png/.npz (vdiff.sampling.settings_name)
and prints the path and the network evaluations (NFE) per sample. --help ends with every config key's
declared range (vdiff.config_schema), the table validation refuses out-of-range values by.

Exit status: 0 done (or stopped by SIGTERM after saving a checkpoint), 130 stopped by SIGINT (Ctrl-C;
a checkpoint was saved unless Ctrl-C came twice), 3 training.nan_policy='stop' stopped a non-finite run,
2 a command line that cannot be used (one line): an unknown flag, config key, config file or argument
word, a setting refused by validation (`[vdiff] invalid config:`), a --workdir that is a file or (for
eval and sample) holds no checkpoint, or a resume whose config changes a guarded key
(vdiff.workdir.HARMLESS_KEYS), 75 the work directory is locked by another live run, 76 another process
of a multi-process run was lost (vdiff.parallel.start_peer_watchdog), 1 any other error.

Multi-host runs: pass --coordinator_address/--num_processes/--process_id (or the VDIFF_* environment
variables, see vdiff.parallel.initialize_distributed) to every process.
"""

import difflib
import importlib
import json
import os
import re
import sys
import textwrap

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
EXIT_NONFINITE = 3  # exit status of a run stopped by training.nan_policy='stop'
EXIT_CONFIG_CHANGE = 2  # a refused config change, like other command-line argument errors
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the work directory; try again later
EXIT_SIGINT = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
EXIT_WORKDIR = 1  # any other refusal of the work directory (a checkpoint of another structure, ...)
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:words]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, eval.json, samples).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


EXIT_USAGE = 2  # exit status of a command line that cannot be parsed (an unknown flag or config key)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The keys --list shows for each config (every key and its base default follow them).
MAIN_KEYS = ("data.name", "model.family", "model.parameterization", "model.schedule.kind",
             "model.schedule.gamma_min", "model.schedule.gamma_max", "optim.learning_rate",
             "training.batch_size", "training.num_steps", "eval.estimator", "sample.sampler",
             "sample.num_steps")


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _leaf_items(config, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict, in definition order."""
  for key, value in config.items():
    name = f"{prefix}.{key}" if prefix else key
    if hasattr(value, "items"):
      yield from _leaf_items(value, name)
    else:
      yield name, value


def _summary(doc: str | None, width: int = 110) -> str:
  """A docstring's first paragraph on one line, cut to `width` characters."""
  paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
  return paragraph if len(paragraph) <= width else paragraph[:width - 3].rstrip() + "..."


def config_key_table() -> str:
  """Every config key with its declared range, base.py's default and meaning (vdiff.config_schema)."""
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  from vdiff import config_schema  # pylint: disable=import-outside-toplevel
  return ("Config keys (--config.KEY=VALUE; a value outside its range is refused in one line before any "
          "compute):\n" + config_schema.describe(base.get_base_config()))


def list_configs(configs_dir: str = CONFIGS_DIR) -> str:
  """The text of --list: each config file with its docstring's first line, its argument words and its
  main keys (`MAIN_KEYS`) with their values, then every key with its default from base.py. Configs are
  only built (get_config()), nothing is trained."""
  base = importlib.import_module("experiments.configs.base")
  lines = ["Configs (--config=experiments/configs/NAME.py[:word,word,...]):", ""]
  for fname in sorted(os.listdir(configs_dir)):
    if not fname.endswith(".py") or fname in ("__init__.py", "base.py"):
      continue
    name = fname[:-3]
    module = importlib.import_module(f"experiments.configs.{name}")
    lines.append(f"  {name}.py: {_summary(module.__doc__)}")
    # Configs with variants (one of FAMILIES / VARIANTS) take one variant word besides the base words.
    variants = getattr(module, "VARIANTS", None) or getattr(module, "FAMILIES", None)
    if variants:
      lines.append(f"    words: one of {', '.join(variants)}; and any of {', '.join(base.WORDS)}")
    else:
      lines.append(f"    words: any of {', '.join(base.WORDS)}")
    config = module.get_config()
    lines.append(textwrap.fill(", ".join(f"{k}={_lookup(config, k)!r}" for k in MAIN_KEYS), width=110,
                               initial_indent="    ", subsequent_indent="    ", break_long_words=False))
  lines += ["", "Argument words (experiments/configs/base.py): " + ", ".join(base.WORDS),
            "  " + " ".join((base.__doc__ or "").split("Argument words:", 1)[-1].split()), "",
            "Every key with its default (base.py; a config file changes some; override any with "
            "--config.KEY=VALUE):"]
  lines += [f"  {k} = {v!r}" for k, v in _leaf_items(base.get_base_config())]
  return "\n".join(lines)


def _config_keys(config, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict, sections included."""
  keys = []
  for key, value in config.items():
    name = f"{prefix}.{key}" if prefix else key
    keys.append(name)
    if hasattr(value, "items"):
      keys += _config_keys(value, name)
  return keys


def _flag_error_message(error: Exception, argv) -> str:
  """One line: the unknown config key and its nearest known key, or absl's message."""
  # The unknown key fails inside the --config flag's own parsing, before the flag holds a value: load the
  # config file again (its flag's parser) to list the known keys.
  config = None
  paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if paths:
    try:
      config = FLAGS["config"].parser.parse(paths[-1])
    except Exception:  # pylint: disable=broad-except
      config = None
  if config is not None:
    keys = _config_keys(config)
    for arg in argv[1:]:
      if arg == "--":
        break
      match = re.match(r"--config\.([^=]+)", arg)
      if match and match.group(1) not in keys:
        key = match.group(1)
        nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
        return (f"unknown config key {key!r} (from {arg}); the nearest known key is {nearest[0]!r}."
                if nearest else f"unknown config key {key!r} (from {arg}).")
  text = str(error)
  if "Error whilst parsing config file" in text or "Failed loading config file" in text:
    # The config file's get_config raised (e.g. an unknown argument word): its own message, not the
    # traceback ml_collections quotes.
    last = _last_exception_line(text)
    if last:
      return f"{paths[-1] if paths else '--config'}: {last.split(': ', 1)[1]}"
  return " ".join(text.split())


def _config_path_problem(argv) -> str | None:
  """One line when --config names no file (with the nearest config file's name), else None."""
  paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not paths:
    return None
  path = paths[-1].split(":", 1)[0]
  if os.path.isfile(path):
    return None
  where = os.path.dirname(path) or "."
  known = (sorted(n for n in os.listdir(where) if n.endswith(".py") and n != "__init__.py")
           if os.path.isdir(where) else [])
  nearest = difflib.get_close_matches(os.path.basename(path), known, n=1, cutoff=0.0)
  hint = f"; the nearest is {os.path.join(os.path.dirname(path), nearest[0])!r}" if nearest else ""
  return f"no config file {path!r} (from --config={paths[-1]}){hint}. --list shows every config."


def _last_exception_line(text: str) -> str | None:
  """The final "SomeError: message" line of a traceback quoted inside an error message, if any."""
  lines = [l.strip() for l in text.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception): ", l)]
  return lines[-1] if lines else None


def parse_flags(argv):
  """absl's flag parsing, except that a bad flag or config key gives one line and exit status 2.

  ml_collections reports an unknown `--config.<key>` as a Python traceback from inside the parser;
  here it is one line naming the key and the nearest known key, as for any other flag error.
  """
  if "--list" in argv[1:]:
    print(list_configs(), flush=True)
    sys.exit(0)
  if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
    # absl prints this module's docstring and the flags, then exits; the configs and the table of every
    # config key's range (vdiff.config_schema, the one the validator reads) follow.
    try:
      FLAGS(argv)
    finally:
      print("\n" + list_configs() + "\n\n" + config_key_table(), flush=True)
  problem = _config_path_problem(argv)
  if problem:
    sys.stderr.write(f"FATAL Flags parsing error: {problem}\n")
    sys.exit(EXIT_USAGE)
  try:
    rest = FLAGS(argv)
    FLAGS.config  # pylint: disable=pointless-statement  # the config file is loaded on first access
    return rest
  except Exception as e:  # pylint: disable=broad-except  # any failure to read the command line: one line
    sys.stderr.write(f"FATAL Flags parsing error: {_flag_error_message(e, argv)} (--helpshort lists "
                     "the flags.)\n")
    sys.exit(EXIT_USAGE)


def _workdir_problem(workdir: str, mode: str) -> str | None:
  """One line when --workdir cannot be used for `mode`, before anything is imported or written: a path
  that is a file or lies under one; for eval and sample, a directory without checkpoints."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    return f"--workdir={workdir} is a file, not a directory."
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    return f"--workdir={workdir} lies under {parent!r}, which is a file."
  if mode in ("eval", "sample"):
    ckpt = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt) or not any(n.isdigit() for n in os.listdir(ckpt)):
      return (f"--mode={mode} needs a trained work directory; {workdir} holds no checkpoint "
              f"({ckpt}). Train first (--mode=train).")
  return None


def _remove_if_created_empty(workdir: str, created: bool) -> None:
  """A refused run leaves no work directory behind: remove the directory this run created, if it is still
  empty (nothing of any run is in it)."""
  if created and os.path.isdir(workdir) and not os.listdir(workdir):
    os.rmdir(workdir)


def main(argv):
  del argv
  problem = _workdir_problem(FLAGS.workdir, FLAGS.mode)
  if problem:
    print(f"[vdiff] refused: {problem}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)
  created = not os.path.exists(FLAGS.workdir)  # removed again, if still empty, when refused
  from vdiff import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from vdiff import train  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  config = FLAGS.config
  from vdiff import workdir  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == "train":
      result = train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      result = train.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      samples = train.sample_checkpoint(config, FLAGS.workdir)
      result = {"num_samples": int(samples.shape[0]), "workdir": FLAGS.workdir}
  except train.ConfigError as e:
    _remove_if_created_empty(FLAGS.workdir, created)
    message = str(e)
    message = message[len("invalid config: "):] if message.startswith("invalid config: ") else message
    print(f"[vdiff] invalid config: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)
  except train.NonFiniteError as e:
    print(f"[vdiff] training stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_NONFINITE)
  except workdir.WorkdirError as e:
    print(f"[vdiff] refused: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_CHANGE if isinstance(e, workdir.ConfigChangeError) else
             EXIT_LOCKED if isinstance(e, workdir.WorkdirLockedError) else EXIT_WORKDIR)
  except KeyboardInterrupt:
    print("[vdiff] interrupted (SIGINT): stopped at once; the newest checkpoint is the last saved one.",
          file=sys.stderr, flush=True)
    # os._exit: an asynchronous checkpoint write may still be running in orbax's thread, and the
    # interpreter would wait for it; the next run moves its temporary directory aside.
    sys.stdout.flush()
    os._exit(EXIT_SIGINT)  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and FLAGS.mode in ("train", "eval") and "bpd" in result:
    how = result.get("summary", result["estimator"])  # the estimator and its convention
    params = "; raw parameters" if result.get("params") == "raw" else ""  # the EMA's unless said
    print(f"test bits/dim ({how}{params}; {result['num_examples']} images, step "
          f"{result['step']}): {result['bpd']:.4f} +- {result['bpd_stderr']:.4f}", flush=True)
  elif jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  if result.get("preempted") and result.get("signal") == "SIGINT":
    sys.exit(EXIT_SIGINT)


def run(argv) -> int:
  """The command line in this process: parse argv (argv[0] is the program name), run, and return the exit
  status that `python -m experiments.main` would exit with (tests drive many command lines this way)."""
  FLAGS.unparse_flags()
  for name in [n for n in FLAGS if n.startswith("config.")]:  # the last parse's override flags
    delattr(FLAGS, name)
  saved, sys.argv = sys.argv, list(argv)  # ml_collections reads the config overrides from sys.argv
  try:
    main(parse_flags(argv))
  except SystemExit as e:
    return 0 if e.code is None else int(e.code)
  finally:
    sys.argv = saved
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
