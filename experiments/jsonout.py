"""One way for the experiment scripts to emit their JSON: printed to stdout and, if asked, written to a file."""

import json


def emit(doc, out: str | None = None, *, indent: int = 1) -> str:
  text = json.dumps(doc, indent=indent)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
  return text
