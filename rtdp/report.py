"""The JSON report every `rtdp` verb can write (--report)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
