"""Bulk loading: the store's own script calls for many invoices, without per-call client cost.

redis-py spends ~30 µs packing each command; a million invoices through it
take minutes. Here the store computes the KEYS/ARGV of its scripts once, for
a template invoice whose identity (id, foreign id, token, address, txids)
is spelled with markers; each invoice's calls are the template's with the
markers replaced, encoded as RESP by hand and written down one connection,
a few thousand at a time (hiredis parses the replies). The scripts are the
real ones (EVALSHA), so the data is exactly what the store would write.

An argument no marker can be replaced in (the stored invoice is deflated:
worker/store/codec.py) is given as a function of the values instead, called
for each invoice (`Template.render`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import hiredis

Command = Sequence[str | bytes | int]
# A template argument computed from each invoice's values (see `Template.render`).
Computed = Callable[[dict[str, str]], bytes]
Arg = str | bytes | Computed

# Commands written before their replies are read.
CHUNK = 2_000


def encode(command: Command) -> bytes:
    """One command in the Redis protocol (RESP)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def evalsha(sha: str, call: tuple[Sequence[str], Sequence[Arg | int]]) -> list[Arg]:
    """An EVALSHA command for a script call given as (KEYS, ARGV): text, bytes or computed."""
    keys, args = call
    text: list[Arg] = [a if isinstance(a, bytes) or callable(a) else str(a) for a in args]
    return ["EVALSHA", sha, str(len(keys)), *keys, *text]


class Template:
    """Commands for one invoice, with markers to be replaced by another invoice's values.

    A text argument has its markers replaced; a bytes one is sent as it is; a
    function is called with the values (an argument whose markers cannot be
    replaced in place, like a deflated invoice).
    """

    def __init__(self, commands: Iterable[Sequence[Arg]]) -> None:
        self.commands = [list(c) for c in commands]

    def render(self, values: dict[str, str]) -> list[list[str | bytes]]:
        out = []
        for command in self.commands:
            rendered: list[str | bytes] = []
            for arg in command:
                if isinstance(arg, str):
                    for marker, value in values.items():
                        if marker in arg:
                            arg = arg.replace(marker, value)
                    rendered.append(arg)
                elif isinstance(arg, bytes):
                    rendered.append(arg)
                else:
                    rendered.append(arg(values))
            out.append(rendered)
        return out


class BulkConnection:
    """One raw connection that writes commands in chunks and checks every reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> BulkConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer)

    async def run(self, commands: Iterable[Command]) -> int:
        """Send every command (CHUNK per round trip); raise on the first error reply."""
        sent, batch = 0, []
        for command in commands:
            batch.append(encode(command))
            if len(batch) == CHUNK:
                await self._round_trip(batch)
                sent += len(batch)
                batch = []
        if batch:
            await self._round_trip(batch)
            sent += len(batch)
        return sent

    async def _round_trip(self, batch: list[bytes]) -> None:
        self.writer.write(b"".join(batch))
        replies = 0
        while replies < len(batch):
            reply = self.parser.gets()
            if reply is False:
                self.parser.feed(await self.reader.read(1 << 20))
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"bulk load: Redis said {reply}")
            replies += 1

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
