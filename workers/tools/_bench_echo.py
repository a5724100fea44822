"""The deployed-shape baseline: a raw nats-py responder in a process of its own.

`python -m workers.tools._bench_echo NATS_URL SUBJECT` answers every request on SUBJECT
(queue group `echo`) with its payload, prints `ready` once subscribed, and exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from nats.aio.client import Client
from nats.aio.msg import Msg


async def _serve(url: str, subject: str) -> None:
    client = Client()
    await client.connect(url, name="lukhas-bench-echo", max_reconnect_attempts=0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def reply(msg: Msg) -> None:
        await msg.respond(msg.data)

    await client.subscribe(subject, queue="echo", cb=reply,
                           pending_msgs_limit=65_536, pending_bytes_limit=64 * 1024 * 1024)
    await client.flush()
    print("ready", flush=True)
    await stop.wait()
    await client.drain()


def main() -> None:
    url, subject = sys.argv[1], sys.argv[2]
    asyncio.run(_serve(url, subject))


if __name__ == "__main__":
    main()
