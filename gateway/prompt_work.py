"""Chat template rendering and tokenization, off the event loop and bounded.

A 4 MB prompt takes seconds to render and tokenize. Done on the event loop, eight of them stalled
every other request for ~20 s. Here the work runs in a small thread pool (the fast tokenizers
release the GIL while they encode), and at most one large prompt (over `LARGE_CHARS`) is worked on
at a time, so there is always a thread for the ordinary prompts of other users.

The tokenizers are shared by the threads: that is safe while nobody changes a tokenizer's
truncation or padding settings, which the gateway never does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

LARGE_CHARS = 64 * 1024


class PromptWork:
    def __init__(self, threads: int = 3):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prompt")
        self._large = asyncio.Semaphore(1)

    async def run(self, size: int, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in a worker thread; `size` (characters of prompt text) sorts it into a lane."""
        loop = asyncio.get_running_loop()
        if size <= LARGE_CHARS:
            return await loop.run_in_executor(self._executor, fn, *args)
        async with self._large:
            return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
