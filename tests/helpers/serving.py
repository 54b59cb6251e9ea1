"""A live `deltatune serve` for tests: uvicorn in a thread on a free 127.0.0.1 port, with the server's own
connection limits (server_config), and tiny LoRA adapters with random weights saved to folders."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch


@contextmanager
def serve_in_thread(app, settings):
    """Yields the base URL of `app` served by uvicorn in a daemon thread; stops it on exit."""
    import uvicorn

    from deltatune.apps.serve import server_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, settings, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def save_llama_adapters(base: str, folder: str, names: list[str], seed: int = 30, scale: float = 1.0) -> None:
    """LoRA adapters (r=4 on q/v/o) with random weights for the causal LM in `base`, one folder per name."""
    from transformers import AutoModelForCausalLM

    from deltatune import LoraConfig, get_peft_model

    for i, name in enumerate(names):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "o_proj"]),
        )
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        model.save_pretrained(f"{folder}/{name}")
