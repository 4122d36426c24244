"""`hybrid-gpt serve`: checkpoints behind an OpenAI-compatible HTTP API (Starlette on uvicorn), and a web chat
that sends one prompt to two of them and streams both answers side by side.

Each model has one worker thread: requests wait in its queue (at most MAX_WAITING), and up to MAX_ACTIVE of them
are stepped in turn, one token each, so that concurrent streams all advance while the event loop only moves
text. A generation may run WINDOW text pieces ahead of its reader; a client that goes away cancels it, and the
worker drops it before its next token. The rules of a request are infer/api.py's; the tokens are the engine's
(generate), the conversation is rendered by the chat template as `hybrid-gpt chat` renders it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import anyio
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from hybrid_gpt.checkpoint import load_checkpoint, resolve
from hybrid_gpt.data.template import render
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer import api
from hybrid_gpt.infer.api import MAX_ACTIVE, MAX_WAITING, WINDOW, APIError, GenerationRequest
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT

PAGE = "serve_page.html"  # the web chat, beside this module
HISTORY = 256  # finished generations each worker remembers (Worker.finished)


# -- the models ---------------------------------------------------------------------------------------------

def model_labels(paths: list[str | Path]) -> list[str]:
    """A name for each checkpoint: its directory's name, lengthened by parent directories while two differ only
    there ("a/pretrain-hybrid", "b/pretrain-hybrid"), and numbered ("-2", "-3") where the same one comes twice."""
    roots = [Path(os.path.abspath(resolve(p)[0])) for p in paths]
    depth = [1] * len(roots)

    def label(i: int) -> str:
        parts = roots[i].parts[1:] or (roots[i].anchor,)
        return "/".join(parts[-depth[i]:])

    while True:
        labels = [label(i) for i in range(len(roots))]
        clash = [i for i in range(len(roots)) if any(labels[j] == labels[i] and roots[j] != roots[i]
                                                     for j in range(len(roots)))]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    out: list[str] = []
    for name in labels:
        unique, n = name, 1
        while unique in out:
            n += 1
            unique = f"{name}-{n}"
        out.append(unique)
    return out


@dataclass
class Served:
    """One loaded checkpoint: its name in the API, the model and tokenizer, and the worker that runs it."""

    label: str
    model: GPT
    tok: Tokenizer
    training: dict = field(default_factory=dict)
    worker: Worker | None = None

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def warmup(self) -> None:
        """One token generated and dropped: the first forward pass's one-off costs paid before any request."""
        start = [self.tok.bos_id if self.tok.bos_id is not None else 0]
        device = next(self.model.parameters()).device
        for _ in generate(self.model, torch.tensor([start], device=device), 1, temperature=0):
            pass

    def card(self) -> dict:
        """Its entry in /v1/models: OpenAI's fields, and ours (the layer pattern, the context, the stage)."""
        return {"id": self.label, "object": "model", "created": 0, "owned_by": "hybrid-gpt",
                "layers": self.model.config.layers, "context_length": self.context,
                "stage": self.training.get("stage"), "parameters": self.model.config.num_params()}


def load_models(paths: list[str | Path], device: str | torch.device = "cpu") -> list[Served]:
    """Each checkpoint loaded (HybridGPTError for one that is not), named by :func:`model_labels`."""
    served = []
    for label, path in zip(model_labels(paths), paths):
        model, tok, training = load_checkpoint(path, device)
        served.append(Served(label, model, tok, training))
    return served


# -- generation: one worker thread per model ---------------------------------------------------------------

class Job:
    """One generation: its prompt and sampling, the events its worker produces for the request handler
    (("text", piece), then ("end", finish_reason, completion_tokens) or ("error", message)), and its
    cancellation. ``tokens`` counts the tokens generated so far (a stop token that ends the reply is not one)."""

    def __init__(self, entry: Served, req: GenerationRequest, prompt: list[int]):
        self.entry, self.req, self.prompt = entry, req, prompt
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.seed = req.seed if req.seed is not None else secrets.randbelow(1 << 63)
        self.tokens, self.finish = 0, None
        self.cancelled = False
        self._lock = threading.Lock()
        self._events: deque = deque()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # the request's event loop, which the worker wakes
        self._pieces: Iterator[str] | None = None

    # the worker's side
    def has_room(self) -> bool:
        with self._lock:
            return len(self._events) < WINDOW

    def _emit(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop has closed (the server is stopping): nobody is reading
            self.cancelled = True

    def step(self) -> bool:
        """Generate one more piece; False once the job has ended (finished, failed or cancelled)."""
        if self.cancelled:
            self.close("cancelled")
            return False
        try:
            if self._pieces is None:
                self._pieces = self._generate()
            piece = next(self._pieces)
        except StopIteration:
            self._emit(("end", self.finish, self.tokens))
            return False
        except Exception as e:  # a failure of this generation, not of the worker: the request says so
            self.close("error")
            self._emit(("error", f"generation failed: {type(e).__name__}: {str(e)[:300]}"))
            return False
        if piece:
            self._emit(("text", piece))
        return True

    def close(self, reason: str) -> None:
        """End the generation where it is (its generators' cleanup runs: the model's mode is given back)."""
        if self._pieces is not None:
            self._pieces.close()
        self.finish = self.finish or reason

    def _generate(self) -> Iterator[str]:
        """Text pieces of the reply, up to a stop token, a stop string or max_tokens; sets ``finish``."""
        entry, req = self.entry, self.req
        tok = entry.tok
        stops = completion_stops(tok, req.kind)
        device = next(entry.model.parameters()).device
        idx = torch.tensor([self.prompt], dtype=torch.long, device=device)
        stream = generate(entry.model, idx, req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                          top_p=req.top_p, seed=self.seed, stop_tokens=stops)

        def tokens():
            for nxt in stream:
                token = int(nxt[0, 0])
                if token in stops:
                    self.finish = "stop"
                    return
                self.tokens += 1
                yield token

        scan = api.StopScan(req.stop)
        for piece in tok.decode_stream(tokens()):
            yield scan.feed(piece)  # "" too: the worker looks at the other jobs and at cancellation
            if scan.hit:
                self.finish = "stop"
                stream.close()
                return
        yield scan.flush()
        self.finish = self.finish or "length"

    # the request handler's side
    def cancel(self) -> None:
        if not self.cancelled and self.finish is None:
            self.cancelled = True
            self.entry.worker.wake()

    async def events(self):
        """The events as the worker produces them, up to the last ("end" or "error")."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                batch = list(self._events)
                self._events.clear()
            self.entry.worker.wake()  # room again in the window
            for event in batch:
                yield event
                if event[0] != "text":
                    return


class Worker:
    """A model's generations: a queue of jobs, up to MAX_ACTIVE of them stepped in turn on one thread (a model's
    forward passes never overlap), each one token at a time while its reader keeps up (see Job.has_room)."""

    def __init__(self, label: str, warmup: Callable[[], object] | None = None):
        self.label, self._warmup = label, warmup
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._closed = False
        self.finished: deque[dict] = deque(maxlen=HISTORY)  # {"id", "tokens", "finish"} of each ended job
        self._thread = threading.Thread(target=self._run, name=f"serve {label}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; APIError 503 when MAX_WAITING jobs already wait or the server is stopping."""
        with self._cond:
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
            if len(self._waiting) >= MAX_WAITING:
                raise APIError(503, f"the model {self.label} has {MAX_WAITING} requests waiting; try again later",
                               type="server_error", code="overloaded")
            self._waiting.append(job)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop: every job is cancelled and the thread ends after the token it is on."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *self._active]:
                job.cancelled = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def busy(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._active)

    def _ready_jobs(self) -> list[Job] | None:
        """The jobs to step now, waiting until there are some; None once closed."""
        with self._cond:
            while True:
                while self._waiting and len(self._active) < MAX_ACTIVE:
                    self._active.append(self._waiting.popleft())
                if self._closed and not self._active:
                    return None
                ready = [j for j in self._active if j.cancelled or self._closed or j.has_room()]
                if ready:
                    return ready
                self._cond.wait(timeout=1.0)

    def _run(self) -> None:
        if self._warmup is not None:  # the first request's time to first token is then the model's, not set-up's
            try:
                self._warmup()
            except Exception:  # a model that cannot generate says so to the first request, in its own words
                pass
        while (ready := self._ready_jobs()) is not None:
            for job in ready:
                if self._closed:
                    job.cancelled = True
                if not job.step():
                    self.finished.append({"id": job.id, "tokens": job.tokens, "finish": job.finish})
                    with self._cond:
                        self._active.remove(job)


def completion_stops(tok: Tokenizer, kind: str) -> set[int]:
    """The tokens that end a reply: the chat template's stop tokens (its turn end, another turn starting);
    for a plain completion also the document start of a tokenizer without a template."""
    if tok.template is not None or kind == "chat":
        return tok.stop_ids  # HybridGPTError without a template: a chat needs one
    return {tok.doc_start_id} - {None}


def prompt_ids(entry: Served, req: GenerationRequest) -> list[int]:
    """The prompt's tokens (a chat rendered in the model's template, ready for the assistant's reply), and
    ``req.max_tokens`` settled: what the request asked, or all the room left in the context (at most
    DEFAULT_MAX_TOKENS). APIError 400 when the prompt and the reply do not fit the context."""
    tok = entry.tok
    try:
        if req.kind == "chat":
            if tok.template is None:
                raise APIError(400, f"the model {entry.label} has no chat template (its tokenizer lacks the "
                                    "special tokens); use /v1/completions", param="model", code="no_chat_template")
            ids = render(tok, req.messages, add_generation_prompt=True).ids
        else:
            ids = tok.prompt_ids(req.prompt)
    except HybridGPTError as e:  # text that is not valid Unicode, a prompt with nothing to start from
        raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt",
                       code="invalid_value") from None
    error = api.context_error(entry.context, len(ids), req.max_tokens)
    if error:
        raise error
    if req.max_tokens is None:
        req.max_tokens = min(api.DEFAULT_MAX_TOKENS, entry.context - len(ids))
    return ids


# -- the HTTP side ------------------------------------------------------------------------------------------

def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_body(request: Request) -> dict:
    """The request's JSON object; 413 past MAX_BODY_BYTES. A body a little over is still read to its end (up to
    MAX_DRAIN_BYTES, dropped), so that the client, still sending, gets the answer instead of a reset connection."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > api.MAX_DRAIN_BYTES:
        raise api.body_too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > api.MAX_DRAIN_BYTES:
            raise api.body_too_large()
        if size <= api.MAX_BODY_BYTES:
            chunks.append(chunk)
    if size > api.MAX_BODY_BYTES:
        raise api.body_too_large()
    return api.parse_body(b"".join(chunks))


async def _watch_disconnect(receive, on_disconnect: Callable[[], None]) -> None:
    """Call ``on_disconnect`` when the client goes away (the body has been read: receive gives only that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EventStream(StreamingResponse):
    """Server-sent events that stop, and call ``on_disconnect``, as soon as the client goes away: whichever
    ASGI version the server speaks, the disconnect is watched for while the stream is written."""

    media_type = "text/event-stream"

    def __init__(self, content, on_disconnect: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            def gone():
                self.on_disconnect()
                tg.cancel_scope.cancel()

            tg.start_soon(_watch_disconnect, receive, gone)
            try:
                await self.stream_response(send)
            except OSError:  # the client closed the connection under a write
                self.on_disconnect()
            tg.cancel_scope.cancel()


class App:
    """The routes over the served models."""

    def __init__(self, models: list[Served]):
        self.models = {m.label: m for m in models}

    def entry(self, name: str) -> Served:
        if name not in self.models:
            raise api.model_not_found(name)
        return self.models[name]

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [m.card() for m in self.models.values()]})

    async def get_model(self, request: Request) -> JSONResponse:
        return JSONResponse(self.entry(request.path_params["model"]).card())

    async def page(self, request: Request) -> HTMLResponse:
        html = resources.files("hybrid_gpt.infer").joinpath(PAGE).read_text(encoding="utf-8")
        # Everything the page needs is in it: nothing is loaded from elsewhere, and it talks to this server only.
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'")
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    async def chat(self, request: Request):
        return await self._generate(request, "chat")

    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str):
        req = api.parse_request(await _read_body(request), kind)
        entry = self.entry(req.model)
        prompt = await anyio.to_thread.run_sync(prompt_ids, entry, req)  # tokenising is off the event loop too
        job = Job(entry, req, prompt)
        entry.worker.submit(job)
        if req.stream:
            return EventStream(self._stream(job), on_disconnect=job.cancel)
        return await self._whole(job, request)

    async def _whole(self, job: Job, request: Request) -> JSONResponse:
        pieces, end = [], None
        async with anyio.create_task_group() as tg:
            def gone():
                job.cancel()
                tg.cancel_scope.cancel()

            tg.start_soon(_watch_disconnect, request.receive, gone)
            try:
                async for event in job.events():
                    if event[0] == "text":
                        pieces.append(event[1])
                    else:
                        end = event
            finally:
                job.cancel()
                tg.cancel_scope.cancel()
        if end is None:  # the client went away: nobody reads this
            return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
        if end[0] == "error":
            raise APIError(500, end[1], type="server_error", code="generation_failed")
        counts = api.usage(len(job.prompt), end[2])
        return JSONResponse(api.completion_body(job.req, job.id, job.created, "".join(pieces), end[1], counts))

    async def _stream(self, job: Job):
        req = job.req
        try:
            if req.kind == "chat":
                yield api.sse(api.chunk_body(req, job.id, job.created, role=True))
            async for event in job.events():
                if event[0] == "text":
                    yield api.sse(api.chunk_body(req, job.id, job.created, text=event[1]))
                elif event[0] == "error":
                    yield api.sse(APIError(500, event[1], type="server_error", code="generation_failed").body())
                else:
                    yield api.sse(api.chunk_body(req, job.id, job.created, finish=event[1]))
                    if req.include_usage:
                        yield api.sse(api.chunk_body(req, job.id, job.created,
                                                     counts=api.usage(len(job.prompt), event[2])))
            yield api.sse("[DONE]")
        finally:
            job.cancel()  # the stream was closed early: the generation stops too


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error_response(e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method it does not take) in OpenAI's error shape."""
    messages = {404: f"no such endpoint: {request.url.path[:200]} (see /v1/models, /v1/chat/completions, "
                     "/v1/completions)", 405: f"{request.method} is not allowed on {request.url.path[:200]}"}
    return _error_response(APIError(e.status_code, messages.get(e.status_code, str(e.detail)),
                                    code="not_found" if e.status_code == 404 else None))


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


def build_app(models: list[Served]) -> Starlette:
    """The ASGI application over ``models`` (each given its worker here; the workers stop with the app)."""
    for m in models:
        m.worker = m.worker or Worker(m.label, warmup=m.warmup)
    app = App(models)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        await anyio.to_thread.run_sync(lambda: None)  # its first call sets up for a while (a quarter second here)
        yield
        for m in models:
            m.worker.close()

    routes = [Route("/", app.page, methods=["GET"]),
              Route("/v1/models", app.list_models, methods=["GET"]),
              Route("/v1/models/{model:path}", app.get_model, methods=["GET"]),
              Route("/v1/chat/completions", app.chat, methods=["POST"]),
              Route("/v1/completions", app.completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error})


# -- the server ---------------------------------------------------------------------------------------------

MAX_CONNECTIONS = 64  # open connections at once; uvicorn answers more with 503


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on ``host``:``port`` (0: a free port); HybridGPTError if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise HybridGPTError(f"cannot listen on {host}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise HybridGPTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class Service:
    """The models' app served by uvicorn on one bound socket: :meth:`run` in the foreground (Ctrl-C stops it),
    or :meth:`start` and :meth:`stop` on a thread (tests, scripts)."""

    def __init__(self, models: list[Served], host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
        import uvicorn

        self.models = models
        self.sock = listen(host, port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        config = uvicorn.Config(build_app(models), log_level=log_level, http="h11", ws="none", lifespan="on",
                                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM (uvicorn stops gracefully, then raises the signal again: Ctrl-C's
        KeyboardInterrupt ends the run here, as the way to stop a server)."""
        try:
            self.server.run(sockets=[self.sock])
        except KeyboardInterrupt:
            pass
        finally:
            self.sock.close()

    def start(self) -> "Service":
        self._thread = threading.Thread(target=self.run, name="serve http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise HybridGPTError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
