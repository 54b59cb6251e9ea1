"""LoRA's options, named as in the `peft` package."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltatune.config import Regex, TargetedConfig
from deltatune.errors import ConfigError

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA options, named as in the `peft` package."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[Regex, int] = field(default_factory=dict)
    alpha_pattern: dict[Regex, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LORA"
        if self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        self._check_rank_pattern()
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ConfigError(
                f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}."
            )

    def _check_rank_pattern(self) -> None:
        bad = {k: v for k, v in self.rank_pattern.items() if v <= 0}
        if bad:
            raise ConfigError(
                f"rank_pattern ranks must be positive integers, got {bad}; use r >= 1 per pattern."
            )

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module rank and alpha from rank_pattern/alpha_pattern (peft's rule: the pattern ends the name)."""
        return _pattern_value(self.rank_pattern, key, self.r), _pattern_value(
            self.alpha_pattern, key, self.lora_alpha
        )


def _pattern_value(patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default
