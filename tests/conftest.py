"""Test session setup: one persistent XLA compilation cache shared by this process and its subprocesses.

Many tests start the command line in a subprocess (multi-device, kill-and-resume, the work-directory
contract); they compile the same tiny programs again and again. A cache in a fresh temporary directory
per test process (each pytest-xdist worker has its own) makes the repeats cheap without carrying
anything between sessions; the directory is removed when the process's session ends (a directory
set by the caller in JAX_COMPILATION_CACHE_DIR is used and kept).
"""

import os
import shutil
import tempfile

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # a cache the caller chose is kept
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdiff-xla-cache-")
_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment: jax reads it at import)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """Remove the compilation cache this process created (its subprocesses have all exited by now)."""
  if _OWN_CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)
