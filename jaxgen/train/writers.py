"""Metric writers: a JSON-lines file and TensorBoard event files, without TensorFlow.

A TensorBoard event file is a TFRecord stream of ``Event`` protocol buffers;
scalars need only four message fields, so they are encoded here by hand
(wire format: https://protobuf.dev/programming-guides/encoding/) and framed
with TFRecord's masked CRC-32C checksums.

Both writers work on a local folder or a bucket (``gs://...``): see
:class:`jaxgen.files.GrowingFile` for how a file grows where nothing can be appended.

Why not a library's writer (checked with tensorboardX 2.6.5, tensorboard 2.21):
``tf.summary`` and ``clu.metric_writers`` need TensorFlow. tensorboard's
writer without TensorFlow is an internal module (``tensorboard.summary.writer``),
public only as PyTorch's ``torch.utils.tensorboard.SummaryWriter``, and the
``tensorboard`` package is the server (grpcio, werkzeug, markdown,
tensorboard-data-server, protobuf). tensorboardX (numpy, packaging,
protobuf) writes the same scalar events, and with ``purge_step`` the
session-start event; but its ``gs://`` backend needs ``google-cloud-storage``,
writing through :class:`~jaxgen.files.GrowingFile` means replacing the
process-wide ``gs`` entry of its ``record_writer`` registry, and its events
reach the file from a queue thread every ``flush_secs`` unless each call
flushes. It has no public reader, so the checksum and parsing code below,
which :func:`read_events` and :func:`read_scalars` need, would stay. The
hand-written encoding and framing is about 60 lines and no dependency.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

from etils import epath

from jaxgen.files import GrowingFile, open_atomic


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked checksum: ``rot15(crc32c) + 0xa282ead8``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_SESSION_START = b"\x08\x01"  # SessionLog{status: START}


def _event(wall_time: float, step: int, *, summary: bytes = b"", file_version: str = "",
           session_log: bytes = b"") -> bytes:
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version:
        msg += _field(3, file_version.encode())
    if summary:
        msg += _field(5, summary)
    if session_log:
        msg += _field(7, session_log)
    return msg


def _scalar_summary(scalars: dict[str, float]) -> bytes:
    values = b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items()
    )
    return values


class TensorBoardWriter:
    """Appends scalar summaries to ``DIR/events.out.tfevents.<time>.<host>``.

    Args:
      logdir: folder TensorBoard is pointed at (created if missing).
      purge_after: a resumed run's step. The new file starts with a session-start
        event at ``purge_after + 1``, on which TensorBoard discards the events of
        that step and later from the files before it (its "orphaned data" purge):
        steps logged past the last checkpoint of a killed run are not shown twice.
    """

    def __init__(self, logdir: str | os.PathLike, purge_after: int | None = None) -> None:
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = epath.Path(logdir) / name
        self._file = GrowingFile(self.path)
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))
        if purge_after is not None:
            self._write(_event(time.time(), purge_after + 1, session_log=_SESSION_START))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.append(header + struct.pack("<I", masked_crc(header))
                          + record + struct.pack("<I", masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write ``values`` (tag -> number) at ``step``; non-finite values are kept as such."""
        self._write(_event(time.time(), int(step), summary=_scalar_summary(values)))

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_events(path: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` of every scalar event in a file, checksums verified.

    The inverse of :class:`TensorBoardWriter`, for tests and quick inspection. A
    session-start event appears as ``(step, None)``.
    """
    data = epath.Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc(header):
            raise ValueError(f"{path}: bad length checksum at byte {pos}.")
        record = data[pos + 12 : pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] != masked_crc(
            record
        ):
            raise ValueError(f"{path}: bad data checksum at byte {pos}.")
        pos += 16 + length
        step, scalars, start = _parse_event(record)
        if start:
            out.append((step, None))
        elif scalars:
            out.append((step, scalars))
    return out


def read_scalars(logdir: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
    """What TensorBoard shows for ``logdir``: the scalar events of its event files in
    name (creation) order, where a session-start event at step ``s`` discards the
    events of steps ``>= s`` read before it (TensorBoard's ``purge_orphaned_data``)."""
    out: list[tuple[int, dict[str, float]]] = []
    for path in sorted(epath.Path(logdir).glob("events.out.tfevents.*")):
        for step, scalars in read_events(path):
            if scalars is None:
                out = [(s, v) for s, v in out if s < step]
            else:
                out.append((step, scalars))
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            length, i = _read_varint(buf, i)
            value, i = buf[i : i + length], i + length
        yield number, value


def _parse_event(record: bytes) -> tuple[int, dict[str, float], bool]:
    step, scalars, start = 0, {}, False
    for number, value in _fields(record):
        if number == 2:
            step = value
        elif number == 7:
            start = any(n == 1 and v == 1 for n, v in _fields(value))
        elif number == 5:
            for _, v in _fields(value):
                tag, x = "", math.nan
                for n, w in _fields(v):
                    if n == 1:
                        tag = w.decode()
                    elif n == 2:
                        (x,) = struct.unpack("<f", w)
                scalars[tag] = x
    return step, scalars, start


def _drop_records_after(path: epath.Path, step: int) -> None:
    """Rewrite ``path`` (JSON lines) without the records of steps after ``step``."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with open_atomic(path) as f:
            f.write("".join(kept).encode())


class MetricWriter:
    """Writes each record to ``DIR/metrics.jsonl`` and TensorBoard events in ``DIR/tb``.

    Only process 0 writes; on other processes the calls do nothing.

    Args:
      workdir: the run's folder.
      enabled: whether this process writes (``jax.process_index() == 0``).
      after: a resumed run's step: records of later steps (logged before the
        run stopped, past its last checkpoint) are removed from ``metrics.jsonl``
        so that no step appears twice; TensorBoard is told to discard them from
        its event files (see :class:`TensorBoardWriter`).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 after: int | None = None) -> None:
        self.enabled = enabled
        if enabled:
            self.jsonl = epath.Path(workdir) / "metrics.jsonl"
            if after is not None and self.jsonl.exists():
                _drop_records_after(self.jsonl, after)
            resumed = after is not None and self.jsonl.exists()  # something was logged before
            self._tb = TensorBoardWriter(epath.Path(workdir) / "tb",
                                         purge_after=after if resumed else None)
            self._jsonl = GrowingFile(self.jsonl)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append ``{"step": step, **values}`` to the JSONL file and the event file."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        # JSON has no NaN; a diverged loss is written as null rather than invalid JSON.
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self._jsonl.append((json.dumps({"step": int(step), **clean}) + "\n").encode())
        self._tb.scalars(step, values)

    def close(self) -> None:
        """Close the files."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
