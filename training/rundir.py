"""A sweep's output directory: what run it holds, and claiming it for a run.

`sweep_config.json` holds the run's identity (its resolved configuration without the fields that
may change on resume). Claiming a directory:
  * empty or missing: it becomes this run's;
  * holding this run: it is resumed (or left alone when finished);
  * holding another run, or other files: refused, unless `overwrite`, which moves the old
    directory aside to `<dir>.replaced-<time>` (printed) and starts afresh, so the directory
    holds only this run's files.
Nothing is written before the caller has validated the whole configuration.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

CONFIG_FILE = "sweep_config.json"
SUMMARY_FILE = "sweep.json"


class RunDirError(ValueError):
    """An output directory that holds another run."""


def claim(out: Path, identity: dict, overwrite: bool, defaults: dict, config_name: str = CONFIG_FILE,
          summary_name: str = SUMMARY_FILE) -> bool:
    """Make `out` this run's directory; True if it already holds this run, finished (its summary
    file written). `defaults`: identity fields' defaults, for run directories written before a
    field existed."""
    config_file = out / config_name
    if out.exists() and any(out.iterdir()):
        if overwrite:
            backup = _move_aside(out)
            print(f"--overwrite: moved the previous contents of {out} to {backup}")
        elif not config_file.exists():
            raise RunDirError(f"{out} is not empty and holds no run of this kind: choose another --output_dir or pass --overwrite")
        else:
            # fields a later version no longer has do not change what is trained by this one
            recorded = {k: v for k, v in json.loads(config_file.read_text()).items() if k in identity or k in defaults}
            theirs = {**defaults, **recorded}
            if theirs != identity:
                diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
                raise RunDirError(f"{out} holds another run (differs in: {', '.join(diff)}): "
                                  "choose another --output_dir or pass --overwrite")
            return (out / summary_name).exists()
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(identity, indent=2))
    return False


def _move_aside(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while backup.exists():
        backup = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
        n += 1
    out.rename(backup)
    return backup


def write_summary(out: Path, summary: dict) -> None:
    """sweep.json (everything) and sweep.csv (one row per member)."""
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    rows = summary["members"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
