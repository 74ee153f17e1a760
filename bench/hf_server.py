"""A minimal OpenAI-compatible server on HF transformers ``generate``: the baseline of ``sift.bench.compare``.

    python -m sift.bench.hf_server [--model file.gguf] [--port 8002] [--max-batch 64]

What a user gets by wrapping ``model.generate`` in a web server: static batching. Whatever
requests are waiting when the model is free become one left-padded batch that runs until
its longest request is done; requests that arrive meanwhile wait for the next batch. One
sampling setting per batch (the first request's). Streams one SSE chunk per token and
honours ``max_tokens``, ``ignore_eos`` (EOS masked per row until the row's ``max_tokens``)
and ``stream_options.include_usage``. Endpoints: /health, /v1/models, /v1/completions,
/v1/chat/completions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Job:
    prompt_ids: list
    max_tokens: int
    ignore_eos: bool
    temperature: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", str) ... then ("done", finish_reason, completion_tokens)
    token_ids: list = field(default_factory=list)
    text: str = ""
    done: bool = False

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class BatchStreamer:
    """``generate``'s streamer, mask and stopping rule for one batch: routes each step's
    tokens to their jobs, masks EOS of rows that must ignore it, stops rows that are done."""

    def __init__(self, jobs: list, tokenizer, eos_id: int) -> None:
        self.jobs, self.tokenizer, self.eos_id = jobs, tokenizer, eos_id
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt ids
            self.seen_prompt = True
            return
        for job, token in zip(self.jobs, value.view(-1).tolist()):
            if job.done:
                continue
            if token == self.eos_id and not job.ignore_eos:
                self._finish(job, "stop")
                continue
            job.token_ids.append(token)
            text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
            if len(text) > len(job.text) and not text.endswith("\ufffd"):  # hold back split UTF-8
                job.emit("text", text[len(job.text):])
                job.text = text
            if len(job.token_ids) >= job.max_tokens:
                self._finish(job, "length")

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        job.done = True
        job.emit("done", reason, len(job.token_ids))

    # a LogitsProcessor
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, job in enumerate(self.jobs):
            if job.ignore_eos and len(job.token_ids) < job.max_tokens:
                scores[row, self.eos_id] = -float("inf")
        return scores


class AllDone:
    """A StoppingCriteria: per-row done flags, so generate() stops when every job is finished."""

    def __init__(self, jobs: list) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([job.done for job in self.jobs], dtype=torch.bool)


class Batcher:
    """The one thread that runs ``generate`` over whatever jobs are waiting."""

    def __init__(self, model, tokenizer, max_batch: int) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.eos_id = tokenizer.eos_token_id
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="hf-batcher").start()

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._generate(batch)
            except Exception as e:  # keep serving; fail this batch's requests
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.emit("error", f"{type(e).__name__}: {e}")

    def _generate(self, batch: list) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(batch):  # left padding
            ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        streamer = BatchStreamer(batch, self.tokenizer, self.eos_id)
        temperature = batch[0].temperature
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(j.max_tokens for j in batch),
                                pad_token_id=self.eos_id, streamer=streamer,
                                logits_processor=LogitsProcessorList([streamer]),
                                stopping_criteria=StoppingCriteriaList([AllDone(batch)]), **sampling)


def build_app(model, tokenizer, model_name: str, max_batch: int):
    app = FastAPI()
    batcher = Batcher(model, tokenizer, max_batch)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf-baseline"}]}

    async def serve(body: dict, prompt_ids: list, chat: bool):
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, int(body.get("max_tokens") or 16), bool(body.get("ignore_eos")),
                  float(body.get("temperature") if body.get("temperature") is not None else 1.0), loop,
                  asyncio.Queue())
        batcher.jobs.put(job)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def choice(text: Optional[str], reason: Optional[str]) -> dict:
            if chat:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
            return {"index": 0, "text": text or "", "finish_reason": reason}

        def usage(n_out: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                    "total_tokens": len(prompt_ids) + n_out}

        async def events():
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    raise RuntimeError(event[1])
                yield event

        if not body.get("stream"):
            texts, reason, n_out = [], None, 0
            async for event in events():
                if event[0] == "text":
                    texts.append(event[1])
                else:
                    _, reason, n_out = event
                    break
            message = {"role": "assistant", "content": "".join(texts)}
            full = {"index": 0, "finish_reason": reason,
                    **({"message": message} if chat else {"text": message["content"]})}
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": model_name, "choices": [full], "usage": usage(n_out)})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse():
            def chunk(choices: list, **extra) -> str:
                return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                                              "choices": choices, **extra}) + "\n\n"
            async for event in events():
                if event[0] == "text":
                    yield chunk([choice(event[1], None)])
                    continue
                _, reason, n_out = event
                yield chunk([choice(None, reason)])
                if include_usage:
                    yield chunk([], usage=usage(n_out))
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=False)
        return await serve(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        return await serve(body, tokenizer.encode(text, add_special_tokens=False), chat=True)

    return app


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from sift.models.embedded import embedded_model_path

        path = embedded_model_path()
    kwargs = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
    folder = os.path.dirname(path) if path.endswith(".gguf") else path
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), **kwargs).eval()
    name = os.path.basename(path).split(".")[0]
    uvicorn.run(build_app(model, tokenizer, name, args.max_batch), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
