"""EngineProcess: the BatchEngine and its model in a child process, so that the server's HTTP and
streaming work never takes the model's interpreter time (the GIL), as ``transformers serve`` keeps its
model apart from its API servers.

The server process keeps the tokenizer, the request checks and the event loop; the child (started
with multiprocessing's ``spawn``) loads the model, runs a BatchEngine and sends back every request's
updates. Two one-way pipes join them:

    commands, server -> child: ("submit", id, prompt_ids, params), ("cancel", id), ("rejected",),
                               ("metrics", n), ("stop",)
    events,   child -> server: ("ready", EngineInfo), ("failed", is_input_error, message),
                               ("updates", [(id, Update), ...]), ("metrics", n, text), ("stopped",)

Updates are batched: the engine's sinks append to an ``Outbox`` and one sender thread sends whatever
has gathered as one message, so a decode step of B sequences costs one pickle and one write, not B.
The bounded queue is kept here in the server process (a request waits until its first update), so a
full queue answers 429 with no round trip. The child stops when told to, or when its command pipe
ends because the server process died (it is also a daemon process, ended when its parent exits).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from functools import partial

from tqdm import tqdm

from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig
from .engine import BatchEngine, GenerationRequest, QueueFull, Update

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30  # the longest /metrics waits for the engine process's answer
STOP_TIMEOUT_S = 30  # the longest stop() waits for the engine process to end before killing it


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches."""

    model: str
    config: OffloadConfig
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of the loaded model: where its tokenizer is, its context length."""

    directory: str
    context_length: int


def _final(update: Update) -> bool:
    return update.finish_reason is not None or update.error is not None


class EngineProcess:
    """The server's side of an engine running in a child process: ``submit``, ``cancel``, ``queue_depth``,
    ``running``, ``start`` and ``stop`` as BatchEngine has them, plus ``metrics_text`` (rendered by the child).

    ``EngineProcess(spec)`` returns once the model is loaded; a load that fails raises MoEOffloadError (bad
    input, with the child's message) or RuntimeError, and leaves no process behind."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.max_queue = spec.max_queue
        context = multiprocessing.get_context("spawn")
        child_commands, self._commands = context.Pipe(duplex=False)
        self._events, child_events = context.Pipe(duplex=False)
        self.process = context.Process(target=run_engine_process, args=(spec, child_commands, child_events),
                                       name="moe-offload-engine", daemon=True)
        self.process.start()
        child_commands.close()
        child_events.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the request tables below
        self._jobs: dict[int, GenerationRequest] = {}
        self._job_ids: dict[int, int] = {}  # id(GenerationRequest) -> its id in the child
        self._waiting: set[int] = set()  # submitted, no update yet
        self._next_id = itertools.count()
        self._replies: dict[int, list] = {}  # metrics request -> [threading.Event, text]
        self._stopped = False
        try:
            self.info = self._wait_ready()
        except BaseException:  # a failed load, or Ctrl-C while loading (the child ignores SIGINT): end it now
            if self.process.is_alive():
                self.process.kill()
            self._end_process()
            raise
        self._receiver = threading.Thread(target=self._receive, name="moe-offload-engine-events", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> EngineInfo:
        try:
            message = self._events.recv()
        except (EOFError, OSError):
            self.process.join(timeout=STOP_TIMEOUT_S)
            raise RuntimeError(f"the engine process exited with code {self.process.exitcode} while loading the "
                               "model") from None
        if message[0] == "failed":
            _, input_error, text = message
            raise (MoEOffloadError if input_error else RuntimeError)(text)
        return message[1]

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._jobs) - len(self._waiting)

    def start(self) -> None:
        """The engine runs from the moment the model is loaded; kept so that the server's lifespan can call it."""

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request`` in the engine process; raises QueueFull when ``max_queue`` requests already wait."""
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self._send(("rejected",))
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            job_id = next(self._next_id)
            self._jobs[job_id], self._job_ids[id(request)] = request, job_id
            self._waiting.add(job_id)
            sent = self._send(("submit", job_id, request.prompt_ids, request.params))
        if not sent:
            self._deliver([(job_id, Update("", len(request.prompt_ids), 0, error="the engine process has ended"))])

    def cancel(self, request: GenerationRequest) -> None:
        """The client is gone: forget ``request`` here and drop it in the engine process."""
        request.cancelled = True
        with self._lock:
            job_id = self._job_ids.pop(id(request), None)
            if job_id is None:
                return
            del self._jobs[job_id]
            self._waiting.discard(job_id)
        self._send(("cancel", job_id))

    def metrics_text(self) -> str:
        """The engine process's /metrics text (blocks until it answers)."""
        reply = [threading.Event(), None]
        number = next(self._next_id)
        self._replies[number] = reply
        if not self._send(("metrics", number)) or not reply[0].wait(REPLY_TIMEOUT_S):
            self._replies.pop(number, None)
            raise RuntimeError("the engine process did not answer")
        return reply[1]

    def stop(self) -> None:
        """Stop the engine (requests still waiting or running get a failure update) and end its process."""
        if self._stopped:
            return
        self._stopped = True
        self._send(("stop",))
        self._receiver.join(timeout=STOP_TIMEOUT_S)
        self._end_process()

    def _end_process(self) -> None:
        self.process.join(timeout=STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("the engine process did not stop in %s s; killing it", STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join(timeout=STOP_TIMEOUT_S)
        self._commands.close()
        self._events.close()

    def _send(self, message: tuple) -> bool:
        """Send a command; False when the engine process is gone."""
        try:
            with self._send_lock:
                self._commands.send(message)
            return True
        except (BrokenPipeError, OSError, ValueError):  # ValueError: the pipe is closed here
            return False

    def _receive(self) -> None:
        """The events thread: hand updates to their requests until the engine process stops or dies."""
        while True:
            try:
                message = self._events.recv()
            except (EOFError, OSError):
                break
            if message[0] == "updates":
                self._deliver(message[1])
            elif message[0] == "metrics":
                reply = self._replies.pop(message[1], None)
                if reply is not None:
                    reply[1] = message[2]
                    reply[0].set()
            elif message[0] == "stopped":
                break
        with self._lock:
            left = [(job_id, Update("", len(job.prompt_ids), 0, error="the engine process has ended"))
                    for job_id, job in self._jobs.items()]
        self._deliver(left)

    def _deliver(self, updates: list[tuple[int, Update]]) -> None:
        with self._lock:
            targets = []
            for job_id, update in updates:
                self._waiting.discard(job_id)
                job = self._jobs.pop(job_id, None) if _final(update) else self._jobs.get(job_id)
                if job is not None:
                    targets.append((job, update))
                    if _final(update):
                        self._job_ids.pop(id(job), None)
                        job.finished = True
        for job, update in targets:
            try:
                job.sink(update)
            except RuntimeError:  # the server's event loop is closed: nobody listens any more
                job.cancelled = True


class Outbox:
    """The engine process's updates, gathered and sent by one thread: whatever arrived since the last
    send goes as one message."""

    def __init__(self, events) -> None:
        self._events = events
        self._send_lock = threading.Lock()
        self._ready = threading.Condition()
        self._items: list[tuple[int, Update]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moe-offload-outbox", daemon=True)
        self._thread.start()

    def put(self, job_id: int, update: Update) -> None:
        with self._ready:
            self._items.append((job_id, update))
            self._ready.notify()

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self._events.send(message)

    def close(self) -> None:
        """Send what is left, then stop the sender."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._items and not self._closed:
                    self._ready.wait()
                items, self._items = self._items, []
            if items:
                try:
                    self.send(("updates", items))
                except (BrokenPipeError, OSError):  # the server process is gone
                    return
            elif self._closed:
                return


def run_engine_process(spec: EngineSpec, commands, events) -> None:
    """The engine process: load the model, report ready (or why not), then serve commands until told to
    stop or until the server process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server stops us
    # tqdm's default lock holds a multiprocessing semaphore, which a spawned child leaves for the resource
    # tracker to complain about; a thread lock is all one process needs.
    tqdm.set_lock(threading.RLock())
    from ..cli.common import load_tokenizer
    from ..loading.loader import from_pretrained

    try:
        model = from_pretrained(spec.model, spec.config)
    except Exception as err:  # noqa: BLE001 (reported to the server, which raises it)
        events.send(("failed", isinstance(err, MoEOffloadError), str(err)))
        return
    try:
        tokenizer = load_tokenizer(model)
        info = EngineInfo(model.config._name_or_path, model.config.max_position_embeddings)
    except Exception as err:  # noqa: BLE001
        model.offload.close()
        events.send(("failed", isinstance(err, MoEOffloadError), str(err)))
        return
    try:
        _serve_commands(BatchEngine(model, tokenizer, spec.max_batch, spec.max_queue, spec.prefill_chunk), commands,
                        events, info)
    finally:
        model.offload.close()


def _serve_commands(engine: BatchEngine, commands, events, info: EngineInfo) -> None:
    from .metrics import render_metrics

    outbox = Outbox(events)
    requests: dict[int, GenerationRequest] = {}

    def sink(job_id: int, update: Update) -> None:
        if _final(update):
            requests.pop(job_id, None)
        outbox.put(job_id, update)

    engine.start()
    outbox.send(("ready", info))
    while True:
        try:
            message = commands.recv()
        except (EOFError, OSError):  # the server process is gone
            break
        kind = message[0]
        if kind == "submit":
            _, job_id, prompt_ids, params = message
            request = requests[job_id] = GenerationRequest(prompt_ids, params, engine.tokenizer,
                                                           partial(sink, job_id))
            try:
                engine.submit(request)
            except QueueFull as err:
                sink(job_id, Update("", len(prompt_ids), 0, error=str(err)))
        elif kind == "cancel":
            request = requests.pop(message[1], None)
            if request is not None:
                engine.cancel(request)
        elif kind == "rejected":
            engine.counters.requests["rejected"] += 1
        elif kind == "metrics":
            outbox.send(("metrics", message[1], render_metrics(engine)))
        elif kind == "stop":
            break
    engine.stop()  # fails what still waits or runs; those updates go out before "stopped"
    outbox.close()
    try:
        outbox.send(("stopped",))
    except (BrokenPipeError, OSError):
        pass
