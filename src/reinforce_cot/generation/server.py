"""A generation server for one stage: started from `generation.launch`, waited for, stopped afterwards.

A recipe stage that samples from the checkpoint an earlier stage just wrote cannot point at a server
started by hand beforehand: `generation.launch` is a command template (`{model}`, `{host}`, `{port}`,
`{python}` filled in from the checkpoint and `generation.base_url`) that `Launched` runs in its own
process group, logging to server.log, until something answers at the URL; `close()` stops it (SIGTERM,
then SIGKILL after 30 s). `answers` is the probe, also used to check a server started by hand.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from reinforce_cot.generation.base import GenerationError

log = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # what the SDK sends without a key (it insists on one); servers without --api-key ignore it


def answers(base_url: str, api_key: str | None, timeout: float) -> bool:
    """Whether anything answers HTTP at `base_url`/models (any status: some servers 500 there)."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=0) as client:
        try:
            client.models.with_raw_response.list()
        except openai.APIStatusError:
            pass  # it answered, with an error
        except openai.APIConnectionError:
            return False
    return True


class Launched:
    """A server process started from a command template and stopped by `close()` (safe to call twice)."""

    def __init__(self, template: str, base_url: str, model: str, log_path: Path, timeout_s: float, api_key=None):
        url = urlparse(base_url)
        cmd = template.format(model=model, port=url.port or 80, host=url.hostname, python=sys.executable)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the generation server: %s (log: %s)", cmd, log_path)
        self.log = log_path.open("a")
        self.proc: subprocess.Popen | None = subprocess.Popen(
            shlex.split(cmd), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.close()
                raise GenerationError(
                    f"generation.launch={template!r}: the server exited with code {code} before answering; "
                    f"see {log_path}"
                )
            if answers(base_url, api_key, timeout=2.0):
                return
            time.sleep(0.5)
        self.close()
        raise GenerationError(
            f"generation.launch={template!r}: no answer at {base_url} after {timeout_s:.0f} s; see {log_path} "
            "or raise generation.launch_timeout_s"
        )

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc = None
