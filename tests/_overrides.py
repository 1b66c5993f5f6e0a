"""Shared by the tests that build configs: set dotted keys of an ml_collections config."""


def set_keys(config, overrides: dict):
  """config with each "a.b.c" key of overrides set to its value (in place; returns config)."""
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return config
