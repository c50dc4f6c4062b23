"""OpenAI Batch API mode: write the requests as JSONL, upload, submit, poll, collect.

The submitted batch's id is saved (atomically) beside the output before we start polling, so a rerun after a
crash or Ctrl-C polls and collects that same batch instead of paying for it twice. Lines the batch could not
serve (errors, expiry) stay unfinished in the ledger and go into the next run's batch. There is no
re-asking inside a batch: a truncated or unparseable answer is final, like any other rejection.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from pathlib import Path
from typing import Callable

from embforge.common import atomic_write_json

from .client import ChatRequest, ChatResult, LLMClient, interpret
from .config import BatchConfig
from .cost import CostTracker
from .runner import Progress

DONE = ("completed", "failed", "expired", "cancelled")


def _save(path: Path, state: dict) -> None:
    atomic_write_json(path, state)


class BatchExecutor:
    def __init__(self, client: LLMClient, cfg: BatchConfig, state_path: Path, *, progress: bool = True):
        self.client, self.cfg, self.state_path, self.progress = client, cfg, Path(state_path), progress
        # No error round-trip to negotiate the format inside a batch: use the client's current mode.
        self.mode = client.mode

    def request_lines(self, requests: list[ChatRequest]) -> bytes:
        lines = [json.dumps({"custom_id": r.id, "method": "POST", "url": "/v1/chat/completions",
                             "body": r.body(self.client.model, self.mode)}, ensure_ascii=False)
                 for r in requests]
        return ("\n".join(lines) + "\n").encode("utf-8")

    async def _submit(self, requests: list[ChatRequest]) -> dict:
        sdk = self.client.sdk
        data = self.request_lines(requests)
        f = await sdk.files.create(file=("embforge-batch.jsonl", io.BytesIO(data)), purpose="batch")
        b = await sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                     completion_window=self.cfg.completion_window)
        state = {"batch_id": b.id, "input_file_id": f.id, "request_ids": [r.id for r in requests],
                 "submitted_at": time.time()}
        _save(self.state_path, state)
        return state

    async def _wait(self, batch_id: str, total: int):
        bar = Progress(total, f"batch {batch_id}", self.progress)
        done_before = 0
        deadline = time.monotonic() + self.cfg.max_wait
        try:
            while True:
                b = await self.client.sdk.batches.retrieve(batch_id)
                counts = getattr(b, "request_counts", None)
                done = (getattr(counts, "completed", 0) or 0) + (getattr(counts, "failed", 0) or 0)
                if done > done_before:
                    bar.update(done - done_before, status=b.status)
                    done_before = done
                if b.status in DONE:
                    return b
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} still {b.status} after {self.cfg.max_wait:.0f}s; "
                                       f"rerun the same command to keep waiting and collect it")
                await asyncio.sleep(self.cfg.poll_interval)
        finally:
            bar.close()

    async def _file_lines(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        content = await self.client.sdk.files.content(file_id)
        text = content.text if hasattr(content, "text") else content.read().decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    async def run(self, requests: list[ChatRequest], handle: Callable[[ChatRequest, ChatResult], None],
                  tracker: CostTracker) -> None:
        by_id = {r.id: r for r in requests}
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else None
        if state and not set(state["request_ids"]) & set(by_id):
            state = None  # that batch was collected already (its results are in the ledger)
        if state is None:
            state = await self._submit(requests)
        b = await self._wait(state["batch_id"], len(state["request_ids"]))
        if b.status != "completed":
            print(f"[synth] batch {b.id} ended as {b.status}; its unfinished requests go into the next run",
                  file=sys.stderr, flush=True)
        for line in await self._file_lines(getattr(b, "output_file_id", None)):
            req = by_id.get(line.get("custom_id"))
            if req is None:
                continue
            resp = line.get("response") or {}
            res = ChatResult(status="failed", attempts=1, mode=self.mode)
            if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
                tracker.add(self.client.model, resp["body"].get("usage"))
                interpret(resp["body"], req, res)
            else:
                res.reason = f"http_{resp.get('status_code')}"
                res.raw = resp.get("body")
            handle(req, res)
        for line in await self._file_lines(getattr(b, "error_file_id", None)):
            req = by_id.get(line.get("custom_id"))
            if req is not None:
                res = ChatResult(status="failed", reason="batch_error", attempts=1, mode=self.mode,
                                 errors=[json.dumps(line.get("error"))[:500]])
                handle(req, res)
        self.state_path.unlink(missing_ok=True)
