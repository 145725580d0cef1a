"""Local, non-blocking channel from the engine's scheduler process to the API server.

Contract:
- transport: ZeroMQ PUSH → PULL over ``ipc://`` socket files named after the server
  instance and the receiving process (``<instance>.<pid>.sock``), inside a private
  directory (mode 0700, owned by this user, never a symlink); each socket file is
  chmod 0600 after bind. Never TCP. Senders deliver to every receiver of the
  instance (several API server processes each keep an index).
- wire format: one JSON object per message (UTF-8, at most ``MAX_MESSAGE_BYTES``),
  ``{"v": 1, "op": ...}`` with plain fields only; nothing is ever unpickled.
  Ops: ``evict_path`` (``ns`` str, ``path`` list of 16-hex-digit block ids),
  ``evict_paths`` (``items``: ``[ns, path]`` pairs, what one engine step evicted; at
  most ``MAX_BATCH_PATHS`` pairs and ``MAX_PATH`` ids in all), ``evict`` (``rid`` str, ``from`` int >= 0), ``reset``, ``metrics`` (``items``:
  ``[name, {label: value}, delta]`` triples), ``record`` (``ns``, ``rid``, ``path``
  and ``ends``: non-decreasing token ends, one per block; a request EngineCore
  admitted, for the indexes of the other API servers, ``hooks/vllm/share.py``).
- ``Sender.send`` never blocks and never raises: ``NOBLOCK`` with a bounded high-water
  mark; a message that does not fit, or finds no receiver, is dropped and counted
  (``channel_dropped``).
- ``Receiver`` runs one daemon thread that validates every message (malformed ones are
  ignored and counted as ``channel_malformed``) and hands valid ones to ``apply``;
  an exception from ``apply`` is counted and never stops the thread. It applies what
  has arrived in batches: after a wake-up that found messages it waits ``gap_ms``
  before it looks again. Between windows it sleeps until the socket or its wake-up
  pipe is readable (an in-process message, ``flush`` and ``stop`` write one byte to
  the pipe), so an idle server's receiver costs no CPU at all. A message waits at most
  about ``gap_ms``; ``flush()`` ends a window early and returns once what had arrived
  is applied (for a reader that needs the index as of now, the debug view).
- one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a sender whose instance has a
  receiver in the same process hands messages to it directly (bounded queue), with
  the same validation and drop rules.
pyzmq is imported lazily: it ships with vLLM and SGLang, not with cp_engine.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import socket
import stat
import tempfile
import threading
from typing import Any, Callable

from . import faults, metrics

__all__ = [
    "MAX_MESSAGE_BYTES", "ChannelError", "Sender", "Receiver", "socket_dir", "socket_path",
    "parse_message", "encode", "hex_ids", "eviction_messages", "apply_to_pipeline", "MetricsForwarder", "forward_metrics", "engine_sender", "start_receiver",
    "stop_all",
]

logger = logging.getLogger("cp_engine.hooks")

VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
MAX_PATH = 4096  # block ids per evict_path (the request-level block cap), and per evict_paths
MAX_BATCH_PATHS = 256  # paths per evict_paths
MAX_METRIC_ITEMS = 256
DEFAULT_HWM = 1024
# A wake-up of the receiver thread costs the API server far more CPU than the messages
# it applies: a thread coming back from a wait runs on cold caches, so its poll, its
# first messages and its window wait cost ~70-180 µs of thread CPU each, about 250 µs
# per wake-up in all, against ~6 µs per message on a warm thread. So the cost follows
# the wake-ups, not the messages: batching by this window bounds them to ~1000 / gap_ms
# a second while messages flow. The index learns of an eviction up to that much later,
# which only delays when it stops aligning to the evicted path (a missed hit, never a
# wrong answer); readers that need the index as of now call ``flush()``.
DEFAULT_GAP_MS = 1000
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_IPC_PATH_MAX = 100  # sockaddr_un holds 108 bytes on Linux; keep a margin


class ChannelError(RuntimeError):
    """The channel cannot be set up safely (the caller runs without eviction sync)."""


# --------------------------------------------------------------------------- paths
def socket_dir() -> str:
    """Private directory for this user's channel sockets, created 0700 if missing.

    Raises ``ChannelError`` when the directory exists but is not a real directory
    owned by this user, or cannot be made private.
    """
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isdir(base):
        base = tempfile.gettempdir()
    path = os.path.join(base, f"cp_engine-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ChannelError(f"cannot create {path}: {exc}") from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise ChannelError(f"{path} is not a directory owned by uid {uid}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)  # ours: tighten what a lax umask left
    return path


def socket_path(instance_id: str, tag: str | None = None) -> str:
    """Socket file of one receiver (``tag``: its pid by default) of ``instance_id``.

    Every API server process of an instance binds its own file; senders deliver to
    each of them (``--api-server-count`` > 1 runs several)."""
    tag = str(os.getpid()) if tag is None else tag
    if not _SAFE_ID.match(instance_id or "") or not tag.isdigit():
        raise ChannelError(f"unusable instance id {instance_id!r} / tag {tag!r}")
    path = os.path.join(socket_dir(), f"{instance_id}.{tag}.sock")
    if len(path.encode()) > _IPC_PATH_MAX:
        raise ChannelError(f"socket path too long for ipc: {path}")
    return path


def _receiver_files(directory: str, instance_id: str) -> dict[str, str]:
    """tag -> socket path of every receiver file of ``instance_id`` in ``directory``."""
    prefix, out = f"{instance_id}.", {}
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".sock"):
            tag = name[len(prefix):-len(".sock")]
            if tag.isdigit():
                out[tag] = os.path.join(directory, name)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


# --------------------------------------------------------------------------- format
def encode(msg: dict) -> bytes:
    return json.dumps({"v": VERSION, **msg}, separators=(",", ":"), allow_nan=False).encode()


def _bad(reason: str) -> None:
    metrics.inc("channel_malformed", 1)
    logger.debug("cp_engine channel: ignored malformed message (%s)", reason)
    return None


def parse_message(raw: Any) -> dict | None:
    """A validated, normalised message, or ``None`` (counted) for anything else."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) > MAX_MESSAGE_BYTES:
            return _bad("too large")
        try:
            obj = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _bad("not JSON")
    else:
        obj = raw
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        return _bad("not a v1 object")
    op = obj.get("op")
    if op == "evict_path":
        ns, path = obj.get("ns"), obj.get("path")
        if not isinstance(ns, str) or len(ns) > 256:
            return _bad("ns")
        if not isinstance(path, list) or not 0 < len(path) <= MAX_PATH:
            return _bad("path length")
        if not all(isinstance(h, str) and _HEX16.match(h) for h in path):
            return _bad("path ids")
        return {"op": op, "ns": ns, "path": [int(h, 16) for h in path]}
    if op == "evict_paths":
        items = obj.get("items")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH_PATHS:
            return _bad("items length")
        out, ids = [], 0
        for it in items:
            if not (isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) and len(it[0]) <= 256
                    and isinstance(it[1], list) and it[1]):
                return _bad("items item")
            ids += len(it[1])
            if ids > MAX_PATH or not all(isinstance(h, str) and _HEX16.match(h) for h in it[1]):
                return _bad("items ids")
            out.append((it[0], [int(h, 16) for h in it[1]]))
        return {"op": op, "items": out}
    if op == "evict":
        rid, start = obj.get("rid"), obj.get("from")
        if not isinstance(rid, str) or not 0 < len(rid) <= 512:
            return _bad("rid")
        if start is not None and (type(start) is not int or start < 0):
            return _bad("from")
        return {"op": op, "rid": rid, "from": start}
    if op == "reset":
        return {"op": op}
    if op == "record":
        ns, rid, path, ends = obj.get("ns"), obj.get("rid"), obj.get("path"), obj.get("ends")
        if not isinstance(ns, str) or len(ns) > 256 or not isinstance(rid, str) or not 0 < len(rid) <= 512:
            return _bad("record ns/rid")
        if not isinstance(path, list) or not 0 < len(path) <= MAX_PATH or not isinstance(ends, list) \
                or len(ends) != len(path):
            return _bad("record path length")
        if not all(isinstance(h, str) and _HEX16.match(h) for h in path):
            return _bad("record path ids")
        if not all(type(e) is int and e >= 0 for e in ends) or any(b < a for a, b in zip(ends, ends[1:])):
            return _bad("record ends")
        return {"op": op, "ns": ns, "rid": rid, "path": [int(h, 16) for h in path], "ends": ends}
    if op == "metrics":
        items = obj.get("items")
        if not isinstance(items, list) or len(items) > MAX_METRIC_ITEMS:
            return _bad("metrics items")
        out = []
        for it in items:
            if not (isinstance(it, list) and len(it) == 3 and isinstance(it[0], str)
                    and isinstance(it[1], dict) and type(it[2]) in (int, float)
                    and math.isfinite(it[2])
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in it[1].items())):
                return _bad("metrics item")
            out.append((it[0], it[1], it[2]))
        return {"op": op, "items": out}
    return _bad(f"unknown op {op!r}")


def hex_ids(ids) -> list[str]:
    """Wire form of block ids (uint64 → 16 hex digits)."""
    return [format(int(b) & 0xFFFFFFFFFFFFFFFF, "016x") for b in ids]


def eviction_messages(items: list[tuple[str, list[str]]]) -> list[dict]:
    """The messages that carry ``items`` (``(ns, hex path)`` pairs, in order): one
    ``evict_path`` for a single pair, else ``evict_paths`` within the per-message caps."""
    if len(items) == 1:
        ns, path = items[0]
        return [{"op": "evict_path", "ns": ns, "path": path}]
    out: list[dict] = []
    chunk: list[list] = []
    ids = 0
    for ns, path in items:
        if chunk and (len(chunk) >= MAX_BATCH_PATHS or ids + len(path) > MAX_PATH):
            out.append({"op": "evict_paths", "items": chunk})
            chunk, ids = [], 0
        chunk.append([ns, path])
        ids += len(path)
    if chunk:
        out.append({"op": "evict_paths", "items": chunk} if len(chunk) > 1
                   else {"op": "evict_path", "ns": chunk[0][0], "path": chunk[0][1]})
    return out


def apply_to_pipeline(pipe: Any) -> Callable[[dict], None]:
    """The API server's handler: apply a validated message to ``pipe``."""

    def apply(msg: dict) -> None:
        op = msg["op"]
        if op == "evict_path":
            removed = pipe.evict_path(msg["ns"], msg["path"])
            metrics.inc("evictions_applied", 1)
            logger.debug("cp_engine: evict_path ns=%s depth=%d removed=%s", msg["ns"], len(msg["path"]), removed)
        elif op == "evict_paths":
            for ns, path in msg["items"]:  # in the order the engine evicted them
                pipe.evict_path(ns, path)
            metrics.inc("evictions_applied", len(msg["items"]))
        elif op == "evict":
            pipe.evict(msg["rid"], from_token=msg["from"])
            metrics.inc("evictions_applied", 1)
        elif op == "reset":
            pipe.reset()
            metrics.inc("cache_resets_applied", 1)
        elif op == "record":
            if pipe.config.reorder:  # the index is only kept when reordering is on
                ends = msg["ends"]  # the first block's weight also covers the prompt before it
                lengths = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
                pipe.index.record(msg["rid"], msg["path"], namespace=msg["ns"], token_lengths=lengths)
        elif op == "metrics":
            metrics.merge(msg["items"])

    return apply


# --------------------------------------------------------------------------- receiver
_local_lock = threading.Lock()
_local_receivers: dict[str, "Receiver"] = {}


class Receiver:
    """Binds the instance's socket and applies messages on one daemon thread."""

    def __init__(self, instance_id: str, apply: Callable[[dict], None], hwm: int = DEFAULT_HWM,
                 tag: str | None = None, gap_ms: int = DEFAULT_GAP_MS) -> None:
        self.instance_id = instance_id
        self.tag = str(os.getpid()) if tag is None else tag
        self.apply = apply
        self.hwm = hwm
        self.gap_ms = gap_ms
        self.wakeups = 0  # wake-ups that found messages
        self.passes = 0  # looks at the socket and the queue
        self._wake_r: socket.socket | None = None  # the wake-up pipe (see ``_wake``)
        self._wake_w: socket.socket | None = None
        self._poke = threading.Event()  # ends a window early (flush, stop)
        self._in_window = False
        self.path = ""
        self.received = 0
        self.applied = 0
        self.failed = 0
        self._local: queue.Queue = queue.Queue(maxsize=hwm)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = None
        self._sock = None

    def start(self) -> "Receiver":
        import zmq

        self.path = socket_path(self.instance_id, self.tag)
        if os.path.lexists(self.path):
            # A leftover of a crashed process with this pid: ours to replace.
            os.unlink(self.path)
        for tag, path in _receiver_files(os.path.dirname(self.path), self.instance_id).items():
            if tag != self.tag and not _pid_alive(int(tag)):
                try:
                    os.unlink(path)  # a dead API server's file: senders would queue into it
                except OSError:
                    pass
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.bind(f"ipc://{self.path}")
        os.chmod(self.path, 0o600)
        self._sock = sock
        # A socket pair, not os.pipe: a closed socket object refuses writes instead of
        # writing to whatever file reuses its descriptor number.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        with _local_lock:
            _local_receivers[self.instance_id] = self
        self._thread = threading.Thread(target=self._run, name="cp_engine-channel", daemon=True)
        self._thread.start()
        return self

    def deliver_local(self, msg: dict) -> bool:
        """In-process delivery (same validation as the socket); False when full."""
        try:
            self._local.put_nowait(msg)
        except queue.Full:
            return False
        self._wake()
        return True

    def _wake(self) -> None:
        """Make the thread's wait return: the queue and the events cannot wake a poll."""
        w = self._wake_w
        if w is None:
            return
        try:
            w.send(b"\0")
        except OSError:
            pass  # a full pipe already wakes it; a closed one has no thread to wake

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _handle(self, raw: Any) -> None:
        self.received += 1
        msg = parse_message(raw)
        if msg is None:
            return
        try:
            # Fault point "channel": a raise or a stall of this thread; senders never
            # wait for it (NOBLOCK, bounded queues), so the scheduler is unaffected.
            faults.check_fault("channel")
            self.apply(msg)
            self.applied += 1
        except Exception as exc:  # the index must never take the thread down
            self.failed += 1
            faults.record_failure("channel_apply", exc)

    def _run(self) -> None:
        import zmq

        sock = self._sock
        poller = zmq.Poller()  # one for the thread's life: Socket.poll builds one per call
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        after_window = False
        while not self._stop.is_set():
            try:
                before = self.received
                # Right after a window: take what gathered without waiting for more;
                # otherwise sleep until a message or a wake-up byte arrives.
                ready = dict(poller.poll(0 if after_window else None))
                after_window = False
                if self._wake_r in ready:
                    self._drain_wake()
                if sock in ready:
                    for _ in range(self.hwm):  # bounded drain per wake-up
                        try:
                            self._handle(sock.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                while True:
                    try:
                        self._handle(self._local.get_nowait())
                    except queue.Empty:
                        break
                self.passes += 1
                if self.received != before:
                    self.wakeups += 1
                    if self.gap_ms > 0:
                        self._in_window = True
                        self._poke.wait(self.gap_ms / 1000)  # let the next ones gather
                        self._poke.clear()
                        self._in_window = False
                        after_window = True
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                metrics.inc("hook_failures", 1, hook="channel_receive")
                self._stop.wait(0.1)
        self._close_wake()  # a stop that gave up waiting for this thread left them open

    def flush(self, timeout: float = 1.0) -> None:
        """End the current batching window, if any, and return once the messages that
        had arrived are applied (at most ``timeout`` seconds). Outside a window the
        thread is asleep only while nothing is waiting: any message wakes it."""
        import time

        thread = self._thread
        if not self._in_window or thread is None:
            return
        seen = self.passes
        self._poke.set()
        deadline = time.monotonic() + timeout
        while self.passes == seen and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)

    def stop(self, timeout: float = 2.0) -> None:
        with _local_lock:
            if _local_receivers.get(self.instance_id) is self:
                del _local_receivers[self.instance_id]
        self._stop.set()
        self._poke.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = None
        if self.path and os.path.lexists(self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self._thread is None or not self._thread.is_alive():
            self._close_wake()
        # else the thread is stuck in ``apply``: it closes the pair when it ends

    def _close_wake(self) -> None:
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()


# --------------------------------------------------------------------------- sender
class Sender:
    """Engine-side end of the channel; ``send`` never blocks or raises.

    Delivers to every receiver file of the instance (re-listed at most every
    ``refresh_s``); ``metrics`` messages go to one receiver only, so counters are not
    multiplied. A message no receiver could take is dropped and counted.
    """

    def __init__(self, instance_id: str, hwm: int = DEFAULT_HWM, refresh_s: float = 2.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.instance_id = instance_id
        self.hwm = hwm
        self.refresh_s = refresh_s
        self._clock = clock or time.monotonic
        self.sent = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._pid = -1
        self._ctx = None
        self._socks: dict[str, Any] = {}  # socket path -> PUSH socket
        self._next_refresh = 0.0
        self._broken = False

    def _peers(self) -> list:
        import zmq

        if self._pid != os.getpid():
            # A zmq context does not survive fork: a forked child builds its own.
            self._ctx = zmq.Context()
            self._socks = {}
            self._next_refresh = 0.0
            self._pid = os.getpid()
        now = self._clock()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_s
            files = set(_receiver_files(socket_dir(), self.instance_id).values())
            for path in [p for p in self._socks if p not in files]:
                self._socks.pop(path).close(0)
            for path in sorted(files - set(self._socks)):
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, self.hwm)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"ipc://{path}")
                self._socks[path] = sock
        return [self._socks[p] for p in sorted(self._socks)]

    def send(self, msg: dict, min_receivers: int = 1) -> bool:
        """Deliver ``msg``; with fewer than ``min_receivers`` receivers nothing is sent
        or counted (False)."""
        ok = False
        try:
            local = _local_receivers.get(self.instance_id)
            if local is not None and min_receivers > 1:
                return False  # one process, one index
            if local is not None:
                ok = local.deliver_local({"v": VERSION, **msg})
            elif not self._broken:
                import zmq

                data = encode(msg)
                if len(data) <= MAX_MESSAGE_BYTES:
                    with self._lock:
                        peers = self._peers()
                        if min_receivers > 1 and len(peers) < min_receivers:
                            return False
                        if msg.get("op") == "metrics":
                            peers = peers[:1]
                        ok = bool(peers)
                        for sock in peers:
                            try:
                                sock.send(data, zmq.NOBLOCK)
                            except zmq.Again:  # that receiver is full (or gone)
                                ok = False
        except ChannelError as exc:
            self._broken = True  # an unsafe socket directory: stop trying, say why once
            logger.warning("cp_engine channel disabled: %s", exc)
        except Exception as exc:
            metrics.inc("hook_failures", 1, hook="channel_send")
            logger.debug("cp_engine channel: send failed: %r", exc)
        if ok:
            self.sent += 1
            metrics.inc("channel_sent", 1)
        else:
            self.dropped += 1
            metrics.inc("channel_dropped", 1)
        return ok

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for sock in self._socks.values():
                    sock.close(0)
                if self._ctx is not None:
                    self._ctx.term()
            self._socks = {}
            self._ctx = None
            self._pid = -1


class MetricsForwarder:
    """Sends this process's counter increments to the API server's ``/metrics``.

    ``maybe_flush()`` is cheap to call often: at most one message per ``interval_s``;
    nothing is sent when the receiver lives in this process (same counters already).
    A call inside the interval arms one trailing flush for the interval's end (a daemon
    timer), so increments made just before traffic stops reach ``/metrics`` within
    ``interval_s`` instead of waiting for the next request. A dropped message loses only
    that interval's increments.
    """

    def __init__(self, sender: "Sender", interval_s: float = 1.0, clock: Callable[[], float] | None = None,
                 timer: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        import time

        self.sender = sender
        self.interval_s = interval_s
        self._clock = clock or time.monotonic
        self._timer_factory = timer or threading.Timer
        self._next = 0.0
        self._last: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._armed_pid = 0  # the process whose trailing timer is pending (0: none)

    def maybe_flush(self) -> bool:
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._arm(self._next - now)
                return False
            self._next = now + self.interval_s
            return self._flush()

    def _arm(self, delay: float) -> None:
        # A timer does not survive fork: a child re-arms its own.
        if self._armed_pid == os.getpid() or self.sender.instance_id in _local_receivers:
            return
        timer = self._timer_factory(delay, self._trailing)
        timer.daemon = True
        timer.start()
        self._armed_pid = os.getpid()

    def _trailing(self) -> None:
        try:
            with self._lock:
                self._armed_pid = 0
                self._next = self._clock() + self.interval_s
                self._flush()
        except Exception:
            pass  # a timer thread has nobody to raise to

    def _flush(self) -> bool:
        if self.sender.instance_id in _local_receivers:
            return False
        items = []
        for name, labels, v in metrics.snapshot():
            if name == "channel_sent":
                continue  # every flush sends: forwarding this would never settle
            key = (name, tuple(sorted(labels.items())))
            delta = v - self._last.get(key, 0)
            if delta:
                items.append([name, labels, delta])
                self._last[key] = v
            if len(items) >= MAX_METRIC_ITEMS:
                break
        return bool(items) and self.sender.send({"op": "metrics", "items": items})


# --------------------------------------------------------------------------- process singletons
_singleton_lock = threading.Lock()
_sender: Sender | None = None
_receiver: Receiver | None = None


def engine_sender() -> Sender:
    """This process's sender, for the instance id ``hooks.runtime`` agreed on."""
    global _sender
    with _singleton_lock:
        if _sender is None:
            from .runtime import instance_id

            _sender = Sender(instance_id())
        return _sender


def start_receiver(pipe: Any = None, **options: Any) -> Receiver:
    """Start (once per process) the API server's receiver applying to ``pipe``
    (default: the process pipeline from ``hooks.runtime``); ``options`` go to
    ``Receiver`` (``gap_ms``, ``hwm``). Raises ``ChannelError`` or zmq
    errors when the socket cannot be set up; callers fail open."""
    global _receiver
    with _singleton_lock:
        if _receiver is None:
            from . import runtime

            target = pipe if pipe is not None else runtime.pipeline()
            _receiver = Receiver(runtime.instance_id(), apply_to_pipeline(target), **options).start()
        return _receiver


_forwarder: MetricsForwarder | None = None


def forward_metrics() -> None:
    """Engine side: push counter increments to the API server's ``/metrics``.

    Cheap enough for every request (a clock check; at most one message a second);
    increments made after the last call wait for the next one. Never raises.
    """
    global _forwarder
    try:
        fwd = _forwarder
        if fwd is None:
            fwd = _forwarder = MetricsForwarder(engine_sender())
        fwd.maybe_flush()
    except Exception:
        pass


def stop_all() -> None:
    """Close this process's sender and receiver (uninstall, tests)."""
    global _sender, _receiver, _forwarder
    with _singleton_lock:
        if _receiver is not None:
            _receiver.stop()
        if _sender is not None:
            _sender.close()
        _sender = _receiver = _forwarder = None
