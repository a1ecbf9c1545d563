"""The model shape `megalora plan` works from: a local folder, a cached hub snapshot, or the
published shape of a flagship model (no download)."""
from __future__ import annotations

import json
from pathlib import Path

from megalora.config import Config, ConfigError
from megalora.demo import ensure_demo_assets
from megalora.hub import resolve_model
from megalora.known_models import KNOWN


def model_config_for_plan(cfg: Config) -> dict:
    name = cfg.model.model
    local = Path(name)
    if name != "demo" and local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ConfigError(f"`model`: {local} has no config.json")
        return json.loads(path.read_text())
    if name == "demo":
        return json.loads((ensure_demo_assets().model_dir / "config.json").read_text())
    try:
        return json.loads((Path(resolve_model(name, use_hf=cfg.model.use_hf, allow_patterns=["config.json"]))
                           / "config.json").read_text())
    except ValueError:
        if name in KNOWN:
            return KNOWN[name]
        raise ConfigError(f"`model`: {name} is neither a local folder nor a hub id whose config.json is cached, "
                          f"and its shape is not built in (built in: {', '.join(KNOWN)}); pass a local folder") from None
