"""Atomic text/JSON files: every report, table and record is written to a temp file in the same folder and then
renamed, so a reader (or a resumed run) never sees a half-written file. The temp name carries the pid and a random
tag: two processes writing the same file (two zoo builds sharing a manifest) must not share a temp file."""
from __future__ import annotations

import json
import os
import secrets
from typing import Any

import numpy as np


def write_text_atomic(path: str, text: str) -> str:
  """Writes `text` to `path` (folders created) via temp file + os.replace. Returns path."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
  try:
    with open(tmp, "w", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def json_default(o: Any):
  """json.dump `default`: numpy scalars/arrays, ConfigDicts (to_dict), anything else as str."""
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if hasattr(o, "to_dict"):
    return o.to_dict()
  return str(o)


def write_json(path: str, obj: Any, sort_keys: bool = True) -> str:
  """Atomic JSON (indent 2, numpy-aware)."""
  return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default))
