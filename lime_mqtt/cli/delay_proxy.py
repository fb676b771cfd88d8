"""A TCP proxy that adds latency: every byte is forwarded ``delay_ms`` after it arrived, in
each direction, in order (so a round trip gains twice the delay and throughput is kept).

This kernel has no ``tc netem``, so the rig's added round trip comes from here:
``python -m lime_mqtt.cli.delay_proxy --listen HOST:PORT --to HOST:PORT --delay-ms D``. The delay
can change while it runs: SIGUSR1 makes it read ``--delay-file`` again (a number of ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


class Delay:
    """The one-way delay in seconds, read again from a file on SIGUSR1."""

    def __init__(self, ms: float, file: Path | None) -> None:
        self.seconds = ms / 1000
        self.file = file

    def reload(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.seconds = float(self.file.read_text().strip()) / 1000
                log.info("delay now %.1f ms each way", self.seconds * 1000)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """Forward what ``reader`` gives to ``writer``, each piece ``delay`` after it came."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while data := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay.seconds, data))
        queue.put_nowait((time.monotonic() + delay.seconds, b""))

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(read(), name="delay-read")
        while True:
            due, data = await queue.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


async def serve(listen: tuple[str, int], to: tuple[str, int], delay: Delay) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*to)
        except OSError as exc:
            log.warning("cannot reach %s:%d: %s", *to, exc)
            writer.close()
            return
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_pump(reader, up_writer, delay), name="delay-up")
                tasks.create_task(_pump(up_reader, writer, delay), name="delay-down")
        except* OSError:
            pass  # one side went away
        finally:
            for w in (writer, up_writer):
                w.close()

    server = await asyncio.start_server(connection, *listen)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, delay.reload)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        log.info("delaying %s:%d -> %s:%d by %.1f ms each way", *listen, *to, delay.seconds * 1000)
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, type=_address)
    parser.add_argument("--to", required=True, type=_address)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added each way (a round trip gets twice)")
    parser.add_argument("--delay-file", type=Path, help="read again on SIGUSR1: the one-way delay in ms")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.listen, args.to, Delay(args.delay_ms, args.delay_file)))


if __name__ == "__main__":
    main()
