"""``fdistill distill CONFIG [key=value ...]`` (also ``accelerate launch train/distill.py``): build the task the
config names, then train it (``fdistill.trainer.distill``)."""

from __future__ import annotations

import json
import os
from typing import Sequence

from ..config import dump_yaml, load_config
from ..pipelines import build_run_task
from ..trainer import Callback, distill


def main_from_args(config_path: str, overrides: list[str], dry_run: bool = False,
                   callbacks: Sequence[Callback] = ()) -> int:
    cfg = load_config(config_path, overrides)
    if dry_run:
        print(dump_yaml(cfg))
        return 0
    res = distill(cfg, build_run_task(cfg), callbacks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=1))
    return 0
