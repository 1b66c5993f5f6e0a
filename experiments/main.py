"""vdiff command line: train, evaluate or sample one experiment.

  python -m experiments.main --config=experiments/configs/NAME.py[:words] --workdir=DIR \
      [--mode=train|eval|sample] [--config.key=value ...]

Multi-host runs: pass --coordinator_address/--num_processes/--process_id (or the VDIFF_* environment
variables, see vdiff.parallel.initialize_distributed) to every process.
"""

import json
import sys

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
EXIT_NONFINITE = 3  # exit status of a run stopped by training.nan_policy='stop'
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:words]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, eval.json, samples).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from vdiff import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from vdiff import train  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  config = FLAGS.config
  if FLAGS.mode == "train":
    try:
      result = train.train_and_evaluate(config, FLAGS.workdir)
    except train.NonFiniteError as e:
      print(f"[vdiff] training stopped: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_NONFINITE)
  elif FLAGS.mode == "eval":
    result = train.evaluate_checkpoint(config, FLAGS.workdir)
  else:
    samples = train.sample_checkpoint(config, FLAGS.workdir)
    result = {"num_samples": int(samples.shape[0]), "workdir": FLAGS.workdir}
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and FLAGS.mode in ("train", "eval") and "bpd" in result:
    how = result.get("summary", result["estimator"])  # the estimator and its convention
    print(f"test bits/dim ({how}; {result['num_examples']} images, step "
          f"{result['step']}): {result['bpd']:.4f} +- {result['bpd_stderr']:.4f}", flush=True)
  elif jax.process_index() == 0:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
