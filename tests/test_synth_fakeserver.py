"""A real HTTP chat-completions server on 127.0.0.1 that misbehaves on purpose, plus tests of the fake itself.

Other synth tests import `FakeLLM` from here. It answers /v1/chat/completions with schema-shaped JSON made
of random words (so nothing is accidentally a duplicate), implements the minimal /v1/files + /v1/batches
endpoints of the Batch API, and injects faults from a script: {request number: fault} or a callable.
Faults: "429" (with Retry-After), "500", "stall" (sleep past the client timeout), "malformed" (HTTP 200 with
a non-JSON body), "badjson" (content is not JSON), "length" (truncated, finish_reason=length), "refusal",
"wrapped" (valid JSON inside prose and a code fence), "duplicate" (repeat the previous example of the same
shape verbatim), "nearduplicate" (the same plus one character), "drop" (batch only: the line never runs), or a
function (payload, prompt) -> the payload to send instead (junk content in well-formed JSON).
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("alpha bravo cedar delta ember fjord glade harbor island juniper kelp lagoon meadow nectar orchid "
         "pebble quartz river summit tundra umber valley willow xenon yarrow zephyr anchor beacon canyon dune "
         "estuary falcon granite heron iris jasper kestrel lichen marble nimbus oasis prairie quill reef sierra "
         "thistle upland vortex wharf yonder zinnia amber basalt cobalt dahlia egret fern garnet hazel indigo "
         "jade krill lotus maple nova opal pine quince rowan sage teal ursa violet wren yew zircon").split()


class FakeLLM:
    def __init__(self, faults=None, *, reject_json_schema: bool = False, delay: float = 0.0, stall: float = 3.0,
                 retry_after: str = "0.2", seed: int = 0, score_fn=None, logprobs: bool = True):
        self.faults = faults or {}
        self.reject_json_schema, self.delay, self.stall, self.retry_after = reject_json_schema, delay, stall, retry_after
        self.rng = random.Random(seed)
        self.score_fn = score_fn
        self.logprobs = logprobs
        self.lock = threading.Lock()
        self.n = 0
        self.log: list[dict] = []            # one entry per chat request: time, prompt, fault, response_format
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.last_example: dict[tuple, str] = {}  # by field names, so a "duplicate" fits the asked schema
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def prompts(self) -> list[str]:
        return [e["prompt"] for e in self.log]

    # -- content ----------------------------------------------------------------------------------------
    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def _payload(self, prompt: str, schema: dict | None) -> dict:
        if "Think up" in prompt:
            n = int(re.search(r"Think up (\d+)", prompt).group(1))
            return {"tasks": [f"Find {self._words(6)} for {self._words(3)}." for _ in range(n)]}
        if "Answer with a JSON object {\"score\"" in prompt:
            q = re.search(r"Query: (.*)", prompt).group(1)
            p = re.search(r"Passage: (.*)", prompt).group(1)
            return {"score": self.score_fn(q, p) if self.score_fn else self.rng.randint(0, 3)}
        keys = list((schema or {}).get("required") or re.findall(r'^- "(\w+)"', prompt, re.M))
        m = re.search(r"at least (\d+) words", prompt)
        long_n = int(m.group(1)) + 5 if m else 40
        # the lengths the prompt asks for ("about 200 words", "at least 50 words long"): validation rejects far less
        about = re.search(r"about (\d+) words", prompt)
        classify = re.search(r"text to classify, (?:at least )?(\d+) words", prompt)
        sized = {"positive_document": about, "hard_negative_document": about, "input_text": classify}

        def n_words(k):
            if sized.get(k) is not None:
                return int(sized[k].group(1))
            if m and k in ("input", "positive_document"):
                return long_n
            return self.rng.randint(8, 30)
        return {k: self._words(n_words(k)) for k in keys}

    def _chat(self, body: dict, fault: str | None) -> tuple[int, dict | str, dict]:
        prompt = body["messages"][-1]["content"]
        rf = body.get("response_format") or {}
        if self.reject_json_schema and rf.get("type") == "json_schema":
            # What llama.cpp's server does: a validation error surfaced as HTTP 500.
            return 500, {"error": {"message": "1 validation error: body.response_format.type: Input should be "
                                              "'text' or 'json_object'"}}, {}
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": self.retry_after}
        if fault == "500":
            return 500, {"error": {"message": "internal error"}}, {}
        if fault == "malformed":
            return 200, '{"id": "x", "choices": [ {"mess', {}
        schema = rf.get("schema") or (rf.get("json_schema") or {}).get("schema")
        payload = self._payload(prompt, schema)
        if callable(fault):   # a junk answer: fault(payload, prompt) -> the payload sent instead
            payload = fault(payload, prompt)
        content = json.dumps(payload, ensure_ascii=False)
        finish, refusal = "stop", None
        shape = tuple(sorted(payload))
        if fault in ("duplicate", "nearduplicate") and shape in self.last_example:
            content = self.last_example[shape]
            if fault == "nearduplicate":  # one extra character in the first field
                prev = json.loads(content)
                first = next(iter(prev))
                content = json.dumps({**prev, first: prev[first] + "."})
        if "score" not in payload and "tasks" not in payload:
            self.last_example[shape] = content
        if fault == "badjson":
            content = "Sure! I cannot format this as JSON, but here goes: key = value"
        elif fault == "length":
            content, finish = content[: max(1, len(content) // 2)], "length"
        elif fault == "refusal":
            content, refusal = None, "I can't help with that."
        elif fault == "wrapped":
            content = f"Here is the example you asked for:\n```json\n{content}\n```\nHope it helps!"
        message = {"role": "assistant", "content": content}
        if refusal:
            message["refusal"] = refusal
        choice = {"index": 0, "message": message, "finish_reason": finish}
        if body.get("logprobs") and self.logprobs and "score" in payload and fault is None:
            top = [{"token": str(s), "logprob": -abs(s - payload["score"]) * 1.5 - 0.05, "bytes": None}
                   for s in range(4)]
            choice["logprobs"] = {"content": [{"token": "{\"", "logprob": 0.0, "bytes": None, "top_logprobs": []},
                                              {"token": "score", "logprob": 0.0, "bytes": None, "top_logprobs": []},
                                              {"token": "\":", "logprob": 0.0, "bytes": None, "top_logprobs": []},
                                              {"token": str(payload["score"]), "logprob": -0.05, "bytes": None,
                                               "top_logprobs": top}]}
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content or "") // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {"id": f"chatcmpl-{self.n}", "object": "chat.completion", "created": int(time.time()),
                     "model": body.get("model", "fake"), "choices": [choice], "usage": usage}, {}

    def _next_fault(self, prompt: str) -> tuple[int, str | None]:
        with self.lock:
            self.n += 1
            n = self.n
        fault = self.faults(n, prompt) if callable(self.faults) else self.faults.get(n)
        return n, fault

    # -- batch API --------------------------------------------------------------------------------------
    def _run_batch(self, batch: dict) -> None:
        out_lines, err_lines = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            item = json.loads(line)
            n, fault = self._next_fault(item["body"]["messages"][-1]["content"])
            self.log.append({"t": time.time(), "prompt": item["body"]["messages"][-1]["content"], "fault": fault,
                             "batch": True})
            if fault == "drop":
                continue  # the batch expired before this one ran
            status, body, _ = self._chat(item["body"], fault)
            if isinstance(body, str):
                err_lines.append({"custom_id": item["custom_id"], "error": {"message": "bad body"}})
                continue
            out_lines.append({"id": f"req-{n}", "custom_id": item["custom_id"],
                              "response": {"status_code": status, "body": body}, "error": None})
        fid = f"file-out-{len(self.files)}"
        self.files[fid] = "".join(json.dumps(x) + "\n" for x in out_lines).encode()
        batch.update(status="completed", output_file_id=fid,
                     request_counts={"total": len(out_lines) + len(err_lines), "completed": len(out_lines),
                                     "failed": len(err_lines)})
        if err_lines:
            eid = f"file-err-{len(self.files)}"
            self.files[eid] = "".join(json.dumps(x) + "\n" for x in err_lines).encode()
            batch["error_file_id"] = eid

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, status: int, body, headers=None):
                data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                m = re.fullmatch(r"/v1/batches/([\w-]+)", self.path)
                if m and m.group(1) in fake.batches:
                    b = fake.batches[m.group(1)]
                    if b["status"] == "validating":
                        b["status"] = "in_progress"
                    elif b["status"] == "in_progress":
                        fake._run_batch(b)
                    return self._send(200, b)
                m = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
                if m and m.group(1) in fake.files:
                    return self._send(200, fake.files[m.group(1)])
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                raw = self._body()
                if self.path == "/v1/chat/completions":
                    body = json.loads(raw)
                    prompt = body["messages"][-1]["content"]
                    n, fault = fake._next_fault(prompt)
                    fake.log.append({"t": time.time(), "prompt": prompt, "fault": fault,
                                     "response_format": (body.get("response_format") or {}).get("type"),
                                     "max_tokens": body.get("max_tokens")})
                    if fake.delay:
                        time.sleep(fake.delay)
                    if fault == "stall":
                        time.sleep(fake.stall)
                    status, out, headers = fake._chat(body, fault)
                    return self._send(status, out, headers)
                if self.path == "/v1/files":
                    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                    content = next(p.get_payload(decode=True) for p in msg.iter_parts() if p.get_filename())
                    fid = f"file-{len(fake.files)}"
                    fake.files[fid] = content
                    return self._send(200, {"id": fid, "object": "file", "bytes": len(content),
                                            "created_at": int(time.time()), "filename": "batch.jsonl",
                                            "purpose": "batch", "status": "processed"})
                if self.path == "/v1/batches":
                    body = json.loads(raw)
                    bid = f"batch-{len(fake.batches)}"
                    fake.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                                         "input_file_id": body["input_file_id"], "status": "validating",
                                         "completion_window": body["completion_window"],
                                         "created_at": int(time.time()),
                                         "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                    return self._send(200, fake.batches[bid])
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        return Handler


# -- tests of the fake itself: if these fail, the other synth tests prove nothing ----------------------------

def test_fake_speaks_chat_completions_through_the_openai_client():
    import asyncio

    import openai

    async def go(url):
        c = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0,
                               http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
        ok = await c.chat.completions.create(model="m", messages=[{"role": "user", "content":
                                             'Write\n- "S1": a\n- "S2": b'}])
        try:
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            raise AssertionError("fault 2 should have been a 429")
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "0.2"
        await c.close()
        return ok

    with FakeLLM({2: "429"}) as fake:
        resp = asyncio.run(go(fake.base_url))
    assert set(json.loads(resp.choices[0].message.content)) == {"S1", "S2"}
    assert resp.usage.completion_tokens > 0 and len(fake.log) == 2


def test_fake_rejects_json_schema_like_llama_cpp():
    import urllib.request

    with FakeLLM(reject_json_schema=True) as fake:
        req = urllib.request.Request(fake.base_url + "/chat/completions", method="POST", data=json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "x"}],
             "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}).encode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(req, timeout=5)
            raise AssertionError("expected HTTP 500")
        except urllib.error.HTTPError as e:
            assert e.code == 500 and b"response_format" in e.read()
