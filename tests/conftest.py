"""Test session setup: one persistent XLA compilation cache shared by this process and its subprocesses.

Many tests start the command line in a subprocess (multi-device, kill-and-resume, the work-directory
contract); they compile the same tiny programs again and again. A cache in a fresh temporary directory
per session makes the repeats cheap without carrying anything between sessions.
"""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="vdiff-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment: jax reads it at import)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
