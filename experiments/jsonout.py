"""One way for the experiment scripts to emit their JSON: printed to stdout and, if asked, written to a file."""

import json
import os


def emit(doc, out: str | None = None, *, indent: int = 1, quiet: bool = False) -> str:
  """Print `doc` as JSON (unless quiet) and write it to `out` if given.

  The file is written to a temporary name and renamed over `out`, so a run killed mid-write leaves the
  previous complete document, never a truncated one.
  """
  text = json.dumps(doc, indent=indent)
  if not quiet:
    print(text)
  if out:
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, out)
  return text
