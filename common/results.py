"""An experiment's results.json, rewritten atomically after every measurement (a killed run keeps
what it measured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ResultsFile:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data
        self.save()

    def put(self, *keys_and_value: Any) -> None:
        """put("kd", "runs", name, row): data["kd"]["runs"][name] = row, the levels created as needed."""
        *keys, value = keys_and_value
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)
