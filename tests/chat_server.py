"""The smallest honest OpenAI-compatible chat-completions server: it runs a saved model for real.

Why: `transformers serve` serves the tiny text model (tests/test_generation.py uses it), but not the
tiny Qwen2.5-VL, whose stock processor needs torchvision. This server speaks the same schema
(`POST /v1/chat/completions` with `messages`, `n`, `temperature`, `max_tokens`; `GET /v1/models`,
`GET /health`), decodes images sent as base64 data URLs (never local paths or remote URLs), applies the
checkpoint's own chat template and calls `generate`. Requests are served one at a time (a lock):
concurrency is the client's business.

Fault injection for tests, each off by default:
    --exit-after N        the process dies (os._exit) after answering N requests: a crash mid-way
    --malformed-every K   every K-th answer is a 200 without usable content (alternately not JSON, and
                          a choice without message.content)

    python tests/chat_server.py --model <checkpoint folder> --port 8011 [--kind vlm|lm]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def load(model_dir: str, kind: str):
    from omegaconf import OmegaConf

    from reinforce_cot import models

    cfg = OmegaConf.create({"kind": kind, "dtype": "float32", "attn_implementation": "sdpa"})
    return models.load_processing_class(model_dir, cfg), models.load_model(model_dir, cfg)


def decode_image(url: str):
    from PIL import Image

    if not url.startswith("data:image/"):
        raise ValueError("only base64 data URLs are accepted for images")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def to_processor_messages(messages: list[dict]) -> tuple[list[dict], list]:
    """OpenAI content parts -> the processor's ({"type": "image"} placeholders, PIL images)."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    images.append(decode_image(part["image_url"]["url"]))
                    parts.append({"type": "image"})
                elif part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out, images


class Server:
    def __init__(self, model_dir: str, kind: str, exit_after: int, malformed_every: int):
        self.processing_class, self.model = load(model_dir, kind)
        self.model.eval()
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.model_dir, self.exit_after, self.malformed_every = model_dir, exit_after, malformed_every
        self.lock = threading.Lock()
        self.answered = 0

    def complete(self, body: dict) -> dict:
        import torch

        messages, images = to_processor_messages(body["messages"])
        n = int(body.get("n") or 1)
        temperature = float(body.get("temperature", 1.0))
        prompt = self.processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if images:
            enc = self.processing_class(text=[prompt] * n, images=images * n, padding=True, return_tensors="pt")
        else:
            enc = self.tokenizer([prompt] * n, padding=True, return_tensors="pt", add_special_tokens=False)
        kwargs = dict(max_new_tokens=int(body.get("max_tokens") or 64), pad_token_id=self.tokenizer.pad_token_id)
        kwargs |= dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            ids = self.model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": "stop" if (new[i] == eos).any() else "length",
            }
            for i, t in enumerate(texts)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_dir,
            "choices": choices,
            "usage": {
                "prompt_tokens": int(enc["input_ids"].shape[1]),
                "completion_tokens": int(new.numel()),
                "total_tokens": int(enc["input_ids"].numel() + new.numel()),
            },
        }


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: tests read stdout only on failure
            sys.stderr.write("chat_server: " + fmt % args + "\n")

        def _send(self, status: int, payload: bytes, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, json.dumps({"object": "list", "data": [{"id": server.model_dir}]}).encode())
            elif self.path == "/health":
                self._send(200, b'{"status": "ok"}')
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._send(404, b'{"error": "not found"}')
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    result = server.complete(body)
                    server.answered += 1
                    count = server.answered
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, json.dumps({"error": {"message": str(e)}}).encode())
            if server.malformed_every and count % server.malformed_every == 0:
                if (count // server.malformed_every) % 2:
                    self._send(200, b"<html>upstream hiccup</html>", ctype="text/html")
                else:
                    self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant"}}]}).encode())
            else:
                self._send(200, json.dumps(result).encode())
            if server.exit_after and count >= server.exit_after:
                os._exit(3)  # as a crash would: no clean shutdown, in-flight requests see a reset

    return Handler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kind", default="vlm", choices=["vlm", "lm"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--exit-after", type=int, default=0)
    p.add_argument("--malformed-every", type=int, default=0)
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("chat_server: loopback only (it runs arbitrary prompts through a local model)")
    server = Server(a.model, a.kind, a.exit_after, a.malformed_every)
    httpd = ThreadingHTTPServer((a.host, a.port), make_handler(server))
    print(f"chat_server: serving {a.model} on http://{a.host}:{a.port}/v1", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
