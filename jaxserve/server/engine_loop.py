"""The engine thread: the one caller of the (not thread-safe) Engine, bridged to asyncio.

HTTP handlers, on the event loop, hand requests and aborts to the thread through a queue;
the thread steps the engine while there is work and posts each step's outputs back to the
event loop in one batch, where every request's `RequestStream` receives its own. A step that
raises fails the requests it was running, and the thread goes on serving.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from jaxserve.engine.outputs import RequestOutput, finished_output, keep_newest
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.stats_log import DEFAULT_INTERVAL_S, StatsLog

log = logging.getLogger(__name__)

_ACCEPTED = object()   # the engine queued the request
MAX_CONSECUTIVE_FAILURES = 3  # then the engine thread gives up (see _fail_running)
MAX_FINISHED_KEPT = 1024  # finished outputs of resumed requests kept for reconnecting clients
_STOP = object()


class Overloaded(Exception):
    """The bound on requests waiting for their first token is reached."""


class EngineUnavailable(Exception):
    """The engine thread is not running (stopped, or died)."""


class EngineFailure(Exception):
    """The engine raised while running this request."""


class RequestStream:
    """The event-loop side of one request: its outputs, in order, ending with a finished one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.started = False          # has its first token
        # A reconnecting client's request, as it was asked: its stop strings and whether it wants
        # logprobs shape the rest of its stream as they shaped the start
        self.stop: Sequence[str] = ()
        self.logprobs = False
        self._items: asyncio.Queue = asyncio.Queue()

    async def next(self):
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aiter__(self):
        while True:
            out = await self.next()
            yield out
            if out.finished:
                return

    async def final(self) -> RequestOutput:
        async for out in self:
            last = out
        return last


class EngineLoop:
    def __init__(self, engine, metrics=None, max_waiting: int = 1024, stats_log_s: float = DEFAULT_INTERVAL_S):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self.stats_log = StatsLog(stats_log_s)
        self._clock = engine.clock
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: Dict[str, RequestStream] = {}   # event-loop side only
        self._num_waiting = 0                          # streams without a first token
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._dead = False
        # Requests the engine already holds when serving starts were resumed from a journal after
        # a crash: their clients may reconnect (`attach`); until then their latest output is kept.
        self._resumed: Dict[str, SamplingParams] = {rid: r.params for rid, r in engine.requests.items()}
        self._detached: Dict[str, RequestOutput] = {}
        # Resumed requests that finished while no client was attached: every reconnect gets their
        # whole output, until MAX_FINISHED_KEPT newer ones push them out (then 404).
        self._finished: "collections.OrderedDict[str, RequestOutput]" = collections.OrderedDict()
        self._draining = False
        self._failures = 0   # engine steps failed in a row
        # Requests that ended while the server drained: their clients may have been cut off
        # first, so they are handed to a peer too (see app._hand_over).
        self.finished_while_draining: List[RequestOutput] = []
        journal = getattr(engine, "journal", None)
        if journal is not None:  # ended before a crash: their clients may reconnect too
            self.keep_finished([finished_output(r, engine.tokenizer) for r in journal.finished_requests()])

    # -- event-loop side ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def drain(self) -> None:
        """The server is shutting down (SIGTERM): admit nothing more, and let requests whose
        clients are cut off stay unfinished (in the journal) instead of aborting them."""
        self._draining = True

    def keep_finished(self, outputs: Sequence[RequestOutput]) -> None:
        """Final outputs of requests that ended elsewhere (a peer that shut down) whose clients
        may reconnect here for them."""
        for out in outputs:
            keep_newest(self._finished, out.request_id, out, MAX_FINISHED_KEPT)

    async def add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                  priority: int = 0) -> RequestStream:
        """Queues a request; raises ValueError (bad input, naming the field), Overloaded or
        EngineUnavailable. Returns once the engine has accepted it."""
        if self._draining:
            raise EngineUnavailable("the server is shutting down")
        if not self.alive:
            raise EngineUnavailable("the engine is not running")
        if self._num_waiting >= self.max_waiting:
            raise Overloaded(f"{self._num_waiting} requests are already waiting to start "
                             f"(the bound is {self.max_waiting}); retry later")
        stream = self._streams[request_id] = RequestStream(request_id)
        self._num_waiting += 1
        self._inbox.put(("add", request_id, list(prompt_ids), params, self._clock(), priority))
        try:
            first = await stream.next()
        except BaseException:
            self.abort(request_id)
            raise
        assert first is _ACCEPTED, first
        return stream

    def attach(self, request_id: str) -> RequestStream:
        """A stream of a request resumed from the journal, for its reconnecting client: first its
        latest output (every token committed so far), then the rest. KeyError if there is no
        such resumed request; ValueError if a client is attached already."""
        stream = RequestStream(request_id)
        stream.started = True
        done = self._finished.get(request_id)
        if done is not None:   # every reconnect gets it: nothing is consumed
            stream.logprobs = done.logprobs is not None
            stream._items.put_nowait(done)
            return stream
        if request_id not in self._resumed:
            raise KeyError(request_id)
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r}: a client is already attached")
        params = self._resumed[request_id]
        stream.stop, stream.logprobs = tuple(params.stop), params.logprobs is not None
        last = self._detached.pop(request_id, None)
        if last is not None:
            stream._items.put_nowait(last)
        self._streams[request_id] = stream
        return stream

    async def take_over(self, requests: list) -> int:
        """Resumes requests a peer handed over (with their committed tokens); their clients
        reconnect with `attach`. Raises ValueError (e.g. an id in use) or EngineUnavailable."""
        if self._draining or not self.alive:
            raise EngineUnavailable("the server is shutting down" if self._draining else "the engine is not running")
        stream = RequestStream("take-over")
        key = f"take-over-{id(stream)}"
        self._streams[key] = stream
        stream.started = True  # not a waiting request
        new = {r.request_id: r.params for r in requests if r.request_id not in self._resumed}
        # before the engine resumes them: their outputs must be kept for their clients from the first
        self._resumed.update(new)
        self._inbox.put(("take_over", key, requests))
        try:
            return await stream.next()
        except ValueError:
            for rid in new:
                self._resumed.pop(rid, None)
            raise
        finally:
            self._streams.pop(key, None)

    def abort(self, request_id: str) -> None:
        """Stops a request (its client went away) and frees its pages; a no-op once it ended."""
        if self._release(request_id) and not self._draining:
            self._inbox.put(("abort", request_id))

    def _release(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.started:
            self._num_waiting -= 1
        return stream is not None

    def _deliver(self, batch: List[Tuple[str, object]]) -> None:
        for request_id, item in batch:
            if self._draining and isinstance(item, RequestOutput) and item.finished:
                self.finished_while_draining.append(item)
            stream = self._streams.get(request_id)
            if stream is None:
                if request_id in self._resumed and isinstance(item, RequestOutput):
                    self._keep_detached(item)   # for its client's reconnect
                continue   # otherwise aborted by its handler: nobody is listening
            if isinstance(item, RequestOutput):
                if item.token_ids and not stream.started:
                    stream.started = True
                    self._num_waiting -= 1
                if item.finished:
                    self._release(request_id)
                    self._resumed.pop(request_id, None)   # delivered to its reconnected client: done
            elif isinstance(item, BaseException):
                self._release(request_id)
            stream._items.put_nowait(item)

    def _keep_detached(self, out: RequestOutput) -> None:
        if not out.finished:
            self._detached[out.request_id] = out
            return
        self._detached.pop(out.request_id, None)
        self._resumed.pop(out.request_id, None)
        self.keep_finished([out])

    def _fail_all(self, error: BaseException) -> None:
        self._dead = True
        self._deliver([(rid, error) for rid in list(self._streams)])

    # -- engine thread ------------------------------------------------------------------------
    def _post(self, batch: list) -> None:
        if batch:
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:   # the event loop has closed: the server is shutting down
                pass

    def _run(self) -> None:
        try:
            while True:
                commands = self._take_commands()
                if commands is None:
                    return
                # An abort's output comes from the next step: take it even when nothing else runs.
                if self.engine.has_unfinished() or any(c[0] == "abort" for c in commands):
                    self._step()
                if self.metrics is not None:
                    self.metrics.observe_engine(self.engine)
                line = self.stats_log.line(self.engine, self._clock())
                if line:
                    log.info("engine: %s", line)
        except BaseException:
            log.exception("the engine thread died")
        finally:
            self._dead = True
            try:
                self._loop.call_soon_threadsafe(self._fail_all, EngineUnavailable("the engine stopped"))
            except RuntimeError:
                pass

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one bad step must not end the server
            self._fail_running(e)
            return
        self._failures = 0
        self._post([(o.request_id, o) for o in outputs])
        self.stats_log.count(outputs)
        if self.metrics is not None:
            self.metrics.observe_outputs(outputs)

    def _take_commands(self) -> Optional[list]:
        """Applies queued adds and aborts (waiting for one when idle); None once told to stop."""
        commands = [] if self.engine.has_unfinished() else [self._inbox.get()]
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        replies = []
        for command in commands:
            if command is _STOP:
                return None
            kind, request_id, *args = command
            if kind == "take_over":
                try:
                    reply = self.engine.resume(args[0], journal_them=True)
                except ValueError as e:
                    reply = e
                self._post([(request_id, reply)])
                continue
            if kind == "abort":
                if request_id in self.engine.requests:
                    self.engine.abort(request_id)
                continue
            prompt_ids, params, arrival_time, priority = args
            try:
                self.engine.add_request(request_id, prompt_ids, params, arrival_time=arrival_time,
                                        priority=priority)
                replies.append((request_id, _ACCEPTED))
            except ValueError as e:
                replies.append((request_id, e))
            except Exception as e:  # noqa: BLE001
                log.exception("add_request failed")
                replies.append((request_id, EngineFailure(f"the engine could not queue the request: {e}")))
        self._post(replies)
        return commands

    def _fail_running(self, error: Exception) -> None:
        """Fails the requests of the step that raised (the engine rebuilds what the step took;
        they stay unfinished in the journal, for a restart). Others go on. After
        MAX_CONSECUTIVE_FAILURES failed steps in a row the thread ends: /health answers 503,
        and an orchestrator restarts the server, which resumes everything from the journal."""
        self._failures += 1
        failed = self.engine.fail_step()   # raising here ends the thread
        log.error("engine step failed (%d in a row); failed its %d requests", self._failures, len(failed),
                  exc_info=error)
        failure = EngineFailure(f"the engine failed while running this request ({type(error).__name__}); "
                                "it was not finished and a restarted server resumes it")
        self._post([(out.request_id, failure) for out in failed])
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self._failures} engine steps failed in a row") from error
