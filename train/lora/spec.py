"""What LoRA a model gets (`LoraSpec`), and the one reader of what a checkpoint recorded about it.

A spec comes from three places, each read by one function:
- the `lora` section of the config (`LoraSpec.from_section`), for training;
- a training checkpoint's meta.json (`read_trained_model`), for export, its verify and the
  PEFT conversions;
- a PEFT adapter's adapter_config.json (`peft_import.lora_spec_of_peft_adapter`), for import
  and `megalora verify --adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from megalora.config import ConfigError
from megalora.train.lora.options import _DTYPES, LoraOptions


@dataclass(frozen=True)
class LoraSpec:
    """Which modules get LoRA (see `apply.py` for the target names) and with what
    hyper-parameters; `per_projection`: one adapter per HF projection inside fused layers."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    dtype: str = "float32"
    target_modules: tuple[str, ...] = ("all-linear",)
    target_regex: str | None = None
    exclude_modules: tuple[str, ...] = ()
    per_projection: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"lora_dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        self.options  # rank and dropout checked once, where they are used

    @property
    def options(self) -> LoraOptions:
        """The per-adapter hyper-parameters the LoRA modules take."""
        return LoraOptions(rank=self.rank, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                           dtype=_DTYPES[self.dtype])

    @classmethod
    def from_section(cls, section: Any) -> "LoraSpec":
        """From the config's `LoraSection` (or anything with its field names; a spec as it is).
        `tuner_type` other than lora is refused here, `adapters` is not part of the spec."""
        if isinstance(section, LoraSpec):
            return section
        if getattr(section, "tuner_type", None) not in (None, "lora"):  # None: not given, LoRA (said at start)
            raise ConfigError(f"lora.tuner_type={section.tuner_type!r}: only 'lora' is offered")
        targets = section.target_modules
        return cls(rank=int(section.lora_rank), alpha=float(section.lora_alpha),
                   dropout=float(getattr(section, "lora_dropout", 0.0)),
                   use_rslora=bool(getattr(section, "use_rslora", False)),
                   dtype=getattr(section, "lora_dtype", "float32"),
                   target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
                   target_regex=getattr(section, "target_regex", None),
                   exclude_modules=tuple(getattr(section, "exclude_modules", None) or ()),
                   per_projection=bool(getattr(section, "lora_per_projection", False)))


@dataclass(frozen=True)
class TrainedModel:
    """What a training checkpoint's meta.json says about the model it trained."""

    base_model: Path
    num_layers: int | None
    lora: LoraSpec


def read_trained_model(meta: Mapping[str, Any], *, where: str | Path) -> TrainedModel:
    """Base model, trained layers and LoRA spec from a checkpoint's meta.json (already parsed):
    the one reader of them. `where` names the file in errors."""
    config = meta.get("config") or {}
    lora = config.get("lora")
    if not lora or "base_model" not in meta:
        raise ConfigError(f"{where}: needs keys 'base_model' and 'config.lora'")
    targets = lora.get("target_modules", ["all-linear"])
    try:
        spec = LoraSpec(rank=int(lora["lora_rank"]), alpha=float(lora["lora_alpha"]),
                        dropout=float(lora.get("lora_dropout", 0.0)), use_rslora=bool(lora.get("use_rslora", False)),
                        dtype=lora.get("lora_dtype", "float32"),
                        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
                        target_regex=lora.get("target_regex"), exclude_modules=tuple(lora.get("exclude_modules") or ()),
                        per_projection=bool(lora.get("lora_per_projection", False)))
    except KeyError as err:
        raise ConfigError(f"{where}: config.lora lacks {err}") from None
    num_layers = (config.get("model") or {}).get("num_layers")
    return TrainedModel(base_model=Path(meta["base_model"]), num_layers=int(num_layers) if num_layers else None,
                        lora=spec)
