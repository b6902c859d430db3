"""Settings for `lora-gateway serve`: CLI flags > LORA_GATEWAY_* env vars > .env > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters_manifest.validation import ValidationLimits

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORA_GATEWAY_",
        env_file=".env",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="lora-gateway serve",
        protected_namespaces=(),
    )

    model: Path = Field(description="Folder of the base model (Hugging Face layout).")
    store: str = Field(
        default="adapter-store",
        description="Adapter store: s3://bucket/prefix, file:///path, or a plain path.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name of the base model in the API (default: the model folder's name)."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Also serve GET /metrics on this port, adapter names included (for the Inference Extension's "
        "endpoint picker and Prometheus; only they should reach it). /metrics on --port leaves them out.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="A scraper sending 'Authorization: Bearer TOKEN' to /metrics on --port gets the adapter names.",
    )

    # Engine
    max_loras: int = Field(default=4, ge=1, description="Distinct user adapters in one batch.")
    max_cpu_loras: int = Field(default=8, ge=1, description="User adapters resident in the engine.")
    max_lora_rank: int = Field(default=16, description=f"Largest adapter rank, one of {MAX_LORA_RANKS}.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16, description="Context length (default: the model's).")
    max_num_seqs: int | None = Field(default=None, ge=1, description="Sequences per engine step.")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="KV-cache memory in GiB.")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="vLLM's memory fraction (default: 0.15 on CPU, vLLM's own on GPU)."
    )
    cpu_lora_ops: Literal["auto", "vllm"] = Field(
        default="auto",
        description="On the CPU build: auto replaces vLLM's LoRA ops with the gateway's grouped ones where they "
        "were checked (vLLM 0.32.0); vllm keeps vLLM's own (base requests then go through the zero adapter).",
    )
    base_requests: Literal["auto", "plain", "zero-adapter"] = Field(
        default="auto",
        description="How base-model requests run next to adapter requests. auto: plain where vLLM's LoRA ops give "
        "LoRA-less tokens no delta (its GPU kernels; on the CPU build the gateway's grouped ops, which replace "
        "vLLM's for the checked vLLM versions), else through an all-zero adapter that takes one LoRA slot.",
    )

    engine_niceness: int | None = Field(
        default=None,
        ge=0,
        le=19,
        description="CPU priority (nice) of vLLM's engine processes, whose loops busy-poll: a higher value keeps "
        "the HTTP side answering on a host with few cores (default: 10 on the CPU build, 0 on GPU).",
    )
    engine_otlp_traces_endpoint: str | None = Field(
        default=None,
        description="Let vLLM export its own request spans to this OTLP endpoint; they join the gateway's "
        "traces (the gateway's own spans follow the standard OTEL_* variables).",
    )

    # vLLM's OpenAI layer, as `vllm serve` takes them
    chat_template: str | None = Field(
        default=None, description="A chat template (file or inline Jinja) instead of the model's own."
    )
    enable_auto_tool_choice: bool = Field(
        default=False, description="Let the model choose to call tools (tool_choice 'auto'); needs --tool-call-parser."
    )
    tool_call_parser: str | None = Field(
        default=None, description="vLLM's parser of tool calls in the model's output (e.g. hermes, llama3_json)."
    )
    reasoning_parser: str | None = Field(
        default=None, description="vLLM's parser of reasoning in the model's output (e.g. deepseek_r1, qwen3)."
    )

    prefix_cache_per_tenant: bool = Field(
        default=True,
        description="Give each tenant its own prefix-cache salt (vLLM's cache_salt): nobody can time whether "
        "another tenant sent a prompt prefix. Off: tenants share cached prefixes (faster, leaks timing).",
    )

    # Semantic routing
    routing: bool = Field(
        default=True,
        description="Serve model 'auto' (and 'owner/auto') with the caller's adapter whose routes match the prompt.",
    )
    route_threshold: float = Field(
        default=0.2,
        ge=-1,
        le=1,
        description="Least score (mean cosine similarity of an adapter's two closest routes) to route to it; "
        "below: the base.",
    )
    route_encoder: Path | None = Field(
        default=None,
        description="A sentence-transformers model folder for routing (default: the packaged all-MiniLM-L6-v2).",
    )

    # Adapter store, sync and disk cache
    sync_interval_s: float = Field(default=10.0, gt=0, description="Seconds between polls of the adapter store.")
    cache_dir: Path | None = Field(
        default=None, description="Local disk cache of adapter files (default: a temporary folder)."
    )
    cache_max_bytes: int = Field(default=10 << 30, ge=0, description="Disk cache budget (idle versions beyond it go).")
    download_parallelism: int = Field(default=4, ge=1, description="Adapter downloads at once.")

    # Adapter pool
    adapter_wait_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a request waits for engine seats, or for a free adapter slot, before 503.",
    )
    adapter_failure_ttl_s: float = Field(
        default=60.0, ge=0, description="How long a failed adapter load is remembered before a retry."
    )
    adapter_slot_aging_s: float = Field(
        default=1.0,
        ge=0,
        description="How long a request waits for an adapter slot before a busy resident adapter stops taking "
        "new requests, so that its slot frees for the waiter (new requests for it queue behind).",
    )
    max_slots_per_user: int | None = Field(
        default=None,
        ge=1,
        description="Adapter slots one user's requests may hold alone before that user's requests for another "
        "adapter wait behind other users' (default: max_cpu_loras - 1, at least 1; alone, a user may use all).",
    )

    adapter_queue_max: int = Field(
        default=1024,
        ge=1,
        description="Requests that may wait for an adapter slot at once; beyond, a 503 at once (Retry-After).",
    )
    warm_slots_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of max_cpu_loras that adapters marked warm may keep pinned in the engine (loaded "
        "before anyone asks, never evicted; one slot at least stays unpinned).",
    )
    engine_seats: int | None = Field(
        default=None,
        ge=0,
        description="Sequences the gateway lets into the engine at once, fairly across users and grouped by "
        "adapter (the rest wait in the gateway, not in vLLM's first-come queue). Default: the engine's "
        "max_num_seqs; 0: no limit, no grouping.",
    )
    adapter_grouping_passes: int | None = Field(
        default=None,
        ge=0,
        description="Later requests that may enter the engine ahead of one whose adapter waits for a place in "
        "vLLM's step (max_loras adapters) before the adapter inside holding fewest seats takes no more, so that "
        "it drains for the waiting one (default: max_loras; 0: at once).",
    )
    max_seqs_per_user: int | None = Field(
        default=None,
        ge=1,
        description="Engine seats (sequences: n, times the prompts of a batch) one user may hold at once "
        "(default: all but an eighth of engine_seats, so another user always gets in at once).",
    )

    # Tenants
    keys_file: Path | None = Field(
        default=None, description="API keys file (sha256 hashes; see `lora-gateway keys`); re-read when it changes."
    )
    trusted_user_header: str | None = Field(
        default=None, description="Take the user from this header, set by an authenticating proxy (instead of keys)."
    )
    trusted_admin_header: str | None = Field(
        default=None, description="With --trusted-user-header: the header whose value 'true' makes the caller admin."
    )
    insecure_no_auth: bool = Field(
        default=False, description="DEVELOPMENT ONLY: no authentication, every caller is the admin user 'dev'."
    )
    max_running_per_user: int = Field(default=64, ge=1, description="Requests one user may have generating at once.")
    max_queued_per_user: int = Field(default=512, ge=0, description="Further requests one user may have waiting.")
    queue_timeout_s: float = Field(default=60.0, gt=0, description="How long a waiting request waits before a 429.")
    max_uploads_per_user: int = Field(default=2, ge=1, description="Uploads one user may have in progress at once.")
    max_concurrent_uploads: int = Field(
        default=4, ge=1, description="Uploads in progress at once in all (each may take max_adapter_bytes of /tmp)."
    )
    max_adapters_per_user: int = Field(default=100, ge=1, description="Adapters one user may have in the store.")
    max_versions_per_adapter: int = Field(
        default=3,
        ge=2,
        description="Versions one adapter keeps, the current one included: replaced ones stay for version_grace_s.",
    )
    version_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="How long a replaced version's files stay in the store (replicas not synced yet may fetch "
        "them) before they are collected.",
    )
    max_list_page: int = Field(default=100, ge=1, le=10_000, description="Adapters in one page of GET /v1/adapters.")
    max_store_lookups_per_user: int = Field(
        default=4,
        ge=1,
        description="Store look-ups of names not yet synced one user may have at once (more wait, as requests do).",
    )
    adapter_miss_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a name the store does not have is answered 404 without asking the store again.",
    )

    # HTTP
    max_adapter_bytes: int = Field(default=512 << 20, ge=1024, description="Largest adapter weights file accepted.")
    max_adapter_config_bytes: int = Field(
        default=64 << 10, ge=1024, description="Largest adapter_config.json accepted (checked while it streams in)."
    )
    max_adapter_header_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest safetensors header of an adapter's weights file."
    )
    max_request_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body accepted.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="Time in-flight requests get on shutdown.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Time a client gets to send its request body.")
    upload_timeout_s: float = Field(default=600.0, gt=0, description="Time a client gets to upload an adapter.")
    keepalive_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="A connection that has not sent a complete request head within this time is closed: idle "
        "between requests, or sending its headers slowly. Keep a proxy's upstream idle timeout below it.",
    )
    stalled_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A response (a stream above all) whose client reads nothing for this long is cut off, and "
        "its generation aborted.",
    )

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> ServeSettings:
        chosen = [
            flag
            for flag, on in (
                ("--keys-file", self.keys_file is not None),
                ("--trusted-user-header", self.trusted_user_header is not None),
                ("--insecure-no-auth", self.insecure_no_auth),
            )
            if on
        ]
        if len(chosen) != 1:
            raise ValueError(
                "choose exactly one way to authenticate callers: --keys-file FILE (API keys), "
                "--trusted-user-header NAME (behind an authenticating proxy), or --insecure-no-auth "
                f"(development only); got {', '.join(chosen) or 'none'}"
            )
        if self.trusted_admin_header is not None and self.trusted_user_header is None:
            raise ValueError("--trusted-admin-header needs --trusted-user-header")
        return self

    @field_validator("max_lora_rank")
    @classmethod
    def _supported_rank(cls, value: int) -> int:
        if value not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {MAX_LORA_RANKS}")
        return value

    def validation_limits(self) -> ValidationLimits:
        """What every adapter this gateway uploads or loads must stay within."""
        return ValidationLimits(
            max_weights_bytes=self.max_adapter_bytes,
            max_config_bytes=self.max_adapter_config_bytes,
            max_header_bytes=self.max_adapter_header_bytes,
        )

    @property
    def base_model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name
