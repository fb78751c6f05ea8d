"""The shard read socket (read_channel.py) on its own: a server on a thread's event loop, as in a
shard actor, and a ReadClient on the test's loop, as in an ingress replica."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from profilerec.service.read_channel import ChannelClosed, ReadClient, ReadFailed, serve_reads, socket_path


@pytest.fixture
def shard_socket():
    """A read server answering `echo` and `slow` (which blocks its loop, like a shard applying a
    large batch) on its own thread; yields its path."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def slow(seconds: float) -> dict:
        time.sleep(seconds)
        return {"slept": seconds}

    operations = {"echo": lambda **args: args, "slow": slow}
    path = socket_path(f"test-read-channel-{time.time_ns()}")
    server = asyncio.run_coroutine_threadsafe(serve_reads(path, operations), loop).result(10)
    yield path, server, loop
    asyncio.run_coroutine_threadsafe(_close(server), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.mark.parametrize("quick_wait_s", [0.0, 0.5])
def test_a_read_is_answered_and_its_connection_reused(shard_socket, quick_wait_s):
    path, _, _ = shard_socket
    client = ReadClient(path, quick_wait_s)

    async def reads():
        answers = [await client.call("echo", user_id=f"u{i}", k=i) for i in range(3)]
        connections = (client.quick is not None, len(client.idle))
        client.close()
        return answers, connections

    answers, connections = asyncio.run(reads())
    assert answers == [{"user_id": f"u{i}", "k": i} for i in range(3)]
    # one connection served all three reads: the blocking one, or one idle asyncio stream
    assert connections == ((True, 0) if quick_wait_s else (False, 1))


def test_a_read_slower_than_the_quick_wait_finishes_on_the_event_loop(shard_socket):
    path, _, _ = shard_socket
    client = ReadClient(path, quick_wait_s=0.02)

    async def reads():
        ticks = 0

        async def ticker():  # runs only while the slow read yields the loop
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # let the ticker start
        slow = await client.call("slow", seconds=0.3)
        task.cancel()
        quick = await client.call("echo", user_id="u")
        handed_over = len(client.idle)
        client.close()
        return slow, ticks, quick, handed_over

    slow, ticks, quick, handed_over = asyncio.run(reads())
    assert slow == {"slept": 0.3}
    assert ticks >= 5  # the loop ran other work while the shard was busy
    assert quick == {"user_id": "u"}
    assert handed_over == 1  # the slow read's connection, kept for the asyncio path


def test_errors_name_the_cause(shard_socket):
    path, server, loop = shard_socket
    client = ReadClient(path, quick_wait_s=0.5)
    with pytest.raises(ReadFailed, match="unknown read operation 'write'"):
        asyncio.run(client.call("write", user_id="u"))
    with pytest.raises(ReadFailed, match="TypeError"):
        asyncio.run(client.call("slow", user_id="u"))
    client.close()
    asyncio.run_coroutine_threadsafe(_close(server), loop).result(10)
    with pytest.raises(ChannelClosed):
        asyncio.run(client.call("echo", user_id="u"))


async def _close(server: asyncio.AbstractServer) -> None:
    """Stop listening and end the connections being served."""
    server.close()
    handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
