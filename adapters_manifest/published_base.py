"""What a gateway tells the store about its base model, so that `adapters push` from anywhere
checks an adapter exactly as that gateway will: module shapes, largest rank, serving dtype, limits.

Written by each gateway at start to `bases/<served name>.json`, beside the manifest."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

from adapters_manifest.validation import BaseModelSpec, ValidationLimits


class PublishedBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    base_model: str  # the served name: what records call it
    module_shapes: dict[str, tuple[int, int]]
    max_lora_rank: int | None
    serving_dtype: str | None
    max_weights_bytes: int
    max_config_bytes: int
    max_header_bytes: int
    published_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def of(cls, base_model: str, spec: BaseModelSpec, limits: ValidationLimits) -> PublishedBase:
        return cls(
            base_model=base_model,
            module_shapes=spec.module_shapes,
            max_lora_rank=spec.max_lora_rank,
            serving_dtype=spec.serving_dtype,
            max_weights_bytes=limits.max_weights_bytes,
            max_config_bytes=limits.max_config_bytes,
            max_header_bytes=limits.max_header_bytes,
        )

    def spec(self) -> BaseModelSpec:
        return BaseModelSpec(
            module_shapes=dict(self.module_shapes), max_lora_rank=self.max_lora_rank, serving_dtype=self.serving_dtype
        )

    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_weights_bytes=self.max_weights_bytes,
            max_config_bytes=self.max_config_bytes,
            max_header_bytes=self.max_header_bytes,
        )
