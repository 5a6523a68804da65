"""A small OpenAI-compatible chat server that answers as an AlpacaEval-style judge, with scripted faults.

The test gives it `decide(instruction, first, second) -> P(first wins)` and, per instruction, a list of faults that
its successive requests meet first: "429" (rate limited, Retry-After), "500", "400", "401", "403", "garbage" (a
reply naming no model), "slow" (answers after `slow_s`, past the client's timeout), and 200 replies a proxy or a
broken server sends: "html" (a login page), "truncated" (JSON cut short), "nochoices" (JSON without choices).
`fault_all` applies one fault to every request (e.g. a judge that always refuses). Every request is recorded with
its `usage`-worthy size; replies report `usage` (prompt tokens: the prompt's words).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# alpaca_eval's alpaca_eval_clf.txt (the weighted_alpaca_eval_gpt4_turbo annotator), as the client fills it in
PARTS = re.compile(r'## Instruction\n\n\{\n    "instruction": """(.*)""",\n\}\n\n## Model Outputs\n\n.*?'
                   r'"model_identifier": "m",\n        "output": """(.*)"""\n    \},\n    \{\n'
                   r'        "model_identifier": "M",\n        "output": """(.*)"""\n    \}\n\}\n\n## Task', re.S)

Decide = Callable[[str, str, str], float]


@dataclass
class FakeJudge:
    decide: Decide
    faults: dict[str, list[str]] = field(default_factory=dict)  # instruction -> faults, consumed in order
    api_key: str | None = None  # when set, requests must carry it as a Bearer token
    logprobs: bool = True  # answer with top log-probs (a vLLM/OpenAI judge) or text only
    slow_s: float = 1.5
    fault_all: str | None = None  # one fault for every request
    retry_after: dict[str, str] = field(default_factory=lambda: {"retry-after-ms": "10"})  # on 429 and 500
    requests: list[dict] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # fault kind (or "ok") -> count
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> FakeJudge:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = judge._answer(self.path, self.headers.get("Authorization"), body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                if isinstance(payload, bytes) and "Content-Type" not in headers:
                    headers = {**headers, "Content-Type": "text/html"}
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _answer(self, path: str, auth: str | None, body: dict) -> tuple[int, dict[str, str], dict | bytes]:
        if path != "/v1/chat/completions":
            return 404, {}, {"error": {"message": f"no route {path}"}}
        if self.api_key and auth != f"Bearer {self.api_key}":
            with self._lock:
                self.requests.append({"fault": "401", "auth": auth})
            return 401, {}, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
        instruction, first, second = PARTS.search(body["messages"][-1]["content"]).groups()  # type: ignore[union-attr]
        with self._lock:
            pending = self.faults.get(instruction)
            fault = pending.pop(0) if pending else self.fault_all or "ok"
            self.served[fault] += 1
            self.requests.append({"instruction": instruction, "first": first, "second": second, "fault": fault,
                                  "auth": auth, "t": time.monotonic()})
        retry_soon = self.retry_after  # the openai client honours it: keeps the test quick
        if fault == "429":
            return 429, retry_soon, {"error": {"message": "rate limited", "type": "rate_limit"}}
        if fault == "500":
            return 500, retry_soon, {"error": {"message": "overloaded"}}
        if fault in ("400", "401", "403"):
            return int(fault), {}, {"error": {"message": {"400": "prompt too long", "401": "bad key",
                                                          "403": "model not allowed"}[fault]}}
        if fault == "html":
            return 200, {}, b"<html><body>Sign in to the proxy</body></html>"
        if fault == "truncated":
            return 200, {"Content-Type": "application/json"}, \
                b'{"id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess'
        if fault == "nochoices":
            return 200, {}, {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": []}
        if fault == "slow":
            time.sleep(self.slow_s)
        p_first = self.decide(instruction, first, second)
        text = "Both are fine" if fault == "garbage" else ("m" if p_first >= 0.5 else "M")
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        if self.logprobs:
            top = ([{"token": "Both", "logprob": -0.01, "bytes": list(b"Both")}] if fault == "garbage" else
                   [{"token": t, "logprob": math.log(max(p, 1e-300)), "bytes": list(t.encode())}
                    for t, p in (("m", p_first), ("M", 1 - p_first)) if p > 0])
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        return 200, {}, {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                                                        "total_tokens": prompt_tokens + 1}}
