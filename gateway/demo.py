"""`make demo`: a tiny model, two users' adapters, the gateway on real vLLM, three completions."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gateway.auth.keys import add_key
from gateway.dev.process import ServerProcess, free_port, gateway_command
from gateway.dev.tiny_model import BASE_MODEL_NAME, make_model

USERS = ["alice/chat", "bob/chat"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lora-gateway demo", description=__doc__)
    parser.add_argument("--prompt", default="def parse(value):", help="the prompt sent to every model")
    parser.add_argument("--max-tokens", type=int, default=24)
    opts = parser.parse_args(argv)

    import openai

    with tempfile.TemporaryDirectory(prefix="lora-gateway-demo-") as tmp:
        work = Path(tmp)
        print(f"1. Building a tiny model and adapters for {', '.join(USERS)} (offline, seeded) ...", flush=True)
        tiny = make_model(work, USERS)
        # No built-in credentials: the demo makes a key for each user (only hashes are stored).
        keys_file = work / "keys.yaml"
        keys = {ref.split("/")[0]: add_key(keys_file, ref.split("/")[0])[0] for ref in USERS}
        port = free_port()
        command = gateway_command(
            tiny.base,
            tiny.store,
            port,
            served_model_name=BASE_MODEL_NAME,
            dtype="float32",
            max_lora_rank=8,
            keys_file=keys_file,
        )
        log_path = work / "gateway.log"
        print(f"2. Starting the gateway on http://127.0.0.1:{port} (vLLM on the CPU; ~30 s) ...", flush=True)
        started = time.monotonic()
        with ServerProcess(command, port, log_path) as server:
            print(f"   ready after {time.monotonic() - started:.0f} s", flush=True)
            print(f"3. One prompt, greedy decoding: {opts.prompt!r}")
            print("   Each user asks for model 'chat' with their own API key and gets their own adapter.\n", flush=True)
            rows = []
            first_user = next(iter(keys))
            for user, model in [(first_user, BASE_MODEL_NAME), *((user, "chat") for user in keys)]:
                client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=keys[user], max_retries=0)
                result = client.completions.create(
                    model=model, prompt=opts.prompt, max_tokens=opts.max_tokens, temperature=0
                )
                rows.append((f"{user}: {model}", result.choices[0].text))
            width = max(len(model) for model, _ in rows)
            print(f"   {'caller: model':<{width}} | completion")
            print(f"   {'-' * width}-+-{'-' * 40}")
            for model, text in rows:
                print(f"   {model:<{width}} | {text!r}")
            exit_code = server.stop()
        print(f"\n4. Gateway stopped (exit code {exit_code}).")
        if len({text for _, text in rows}) != len(rows):
            print("   unexpected: two models gave the same completion")
            return 1
        return 0 if exit_code == 0 else 1
