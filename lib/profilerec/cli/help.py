"""`profilerec --help` and `profilerec <job> --help`, written from the jobs and from the config
dataclasses' field descriptions (config.setting), so the help says what the code does."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from typing import Any, Iterable

from profilerec.config import iter_settings

EXAMPLES = """examples:
  profilerec demo --work_dir /tmp/work --train.epochs 5
  profilerec evaluate --split valid --max_cases 500
  profilerec train --help"""


def print_help(text: str) -> None:
    """Print `text` on stdout; a reader that stops early (`| head`) ends it quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # stdout now points nowhere, so the interpreter's flush at exit has nothing to complain of
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main_help(jobs: Iterable[tuple[str, str]]) -> str:
    """The command's usage and one line per job (name, summary)."""
    lines = ["usage: profilerec <job> [--config FILE.yaml] [--setting value ...]", "", "jobs:"]
    jobs = list(jobs)
    width = max(len(name) for name, _ in jobs) + 2
    for name, summary in jobs:
        lines += _wrapped(summary, indent=2 + width, first=f"  {name:<{width}}")
    lines += ["", "`profilerec <job> --help` lists the job's settings, with their defaults.", "", EXAMPLES]
    return "\n".join(lines)


def job_help(name: str, config: Any, summary: str, derived: Iterable[str], console: Any) -> str:
    """Usage of one job and every setting of its config (sections as dotted names) and of the
    console, each with its type, default and description; `derived` settings are left out."""
    derived = set(derived)
    script = "pipeline" if name == "demo" else name
    lines = [f"usage: profilerec {name} [--config FILE.yaml] [--setting value ...]",
             f"       python jobs/{script}.py [--config FILE.yaml] [--setting value ...]", ""]
    lines += _wrapped(summary, indent=0)
    doc = " ".join((type(config).__doc__ or "").split("\n\n", 1)[1:]).split()
    if doc:
        lines += [""] + _wrapped(" ".join(doc), indent=0)
    lines += ["", "settings (YAML keys of --config; dotted names are sections):"]
    lines += _settings(s for s in iter_settings(config) if s.name not in derived)
    if derived:
        lines += ["", "The sections' input and output locations are set from work_dir, and their Ray settings "
                      "from the top-level ray section."]
    lines += ["", "console settings (every job):"]
    lines += _settings(iter_settings(console))
    return "\n".join(lines)


def _settings(settings: Iterable[Any]) -> list[str]:
    lines = []
    for s in settings:
        lines.append(f"  --{s.name} {s.type}  (default: {_shown(s.default)})")
        lines += _wrapped(s.help, indent=6)
    return lines


def _shown(value: Any) -> str:
    """A default as it would be typed after the flag."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _wrapped(text: str, indent: int, first: str = "") -> list[str]:
    width = max(60, min(shutil.get_terminal_size().columns, 100))
    return textwrap.wrap(text, width=width, initial_indent=first or " " * indent,
                         subsequent_indent=" " * indent) or ([first] if first else [])
