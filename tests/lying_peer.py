"""A peer that lies, for tests only: the real peer process with its servicer wrapped.

Run as ``python -m tests.lying_peer [python -m swarm.cli] peer ...``: it patches the servicer class
of `peer.server` and runs the real CLI (so `LocalSwarm.spawn_peer(..., wrap=LIAR)` starts one).
Environment:

* ``LIE_MODE``: ``perturb`` (noise of 10 % of each row's spread on the hidden states), ``nan`` (a
  NaN in the hidden states), ``shape`` (one row short), ``token`` (a token id past the vocabulary);
* ``LIE_FRACTION``: the share of steps it lies on (default 1), drawn from ``LIE_SEED``;
* ``LIE_THROUGHPUT``: the throughput it announces (high: routes prefer it, as an attacker's would).
"""

from __future__ import annotations

import inspect
import os
import random
import sys

import torch

import peer.server
from peer import tensor_codec
from peer.servicer import PeerServicer

LIAR = (sys.executable, "-m", "tests.lying_peer")


class LyingServicer(PeerServicer):
    def __init__(self, *args, **kwargs):
        self._announced = float(os.environ.get("LIE_THROUGHPUT", "0"))
        self._measured = 0.0
        super().__init__(*args, **kwargs)
        self.mode = os.environ.get("LIE_MODE", "perturb")
        self.fraction = float(os.environ.get("LIE_FRACTION", "1"))
        self.rng = random.Random(int(os.environ.get("LIE_SEED", "0")))
        self.lies = 0

    @property
    def throughput(self) -> float:
        return self._announced or self._measured

    @throughput.setter
    def throughput(self, value: float) -> None:
        self._measured = value

    # The real servicer either yields its responses or writes them with `context.write` (gRPC
    # tells the two apart by the kind of function): lie the same way it answers.
    if inspect.isasyncgenfunction(PeerServicer.Inference):

        async def Inference(self, request_iterator, context):
            async for response in super().Inference(request_iterator, context):
                self.maybe_lie(response)
                yield response

    else:

        async def Inference(self, request_iterator, context):
            return await super().Inference(request_iterator, _LyingContext(context, self))

    def maybe_lie(self, response) -> None:
        if response.WhichOneof("kind") == "result" and self.rng.random() < self.fraction:
            self.lie(response.result)

    def lie(self, result) -> None:
        self.lies += 1
        if self.mode == "token":
            result.token_id = self.span.config.vocab_size + 7
            return
        if not result.HasField("hidden"):
            return
        hidden = tensor_codec.decode(result.hidden).to(torch.float32)
        if self.mode == "perturb":
            spread = hidden.std(dim=-1, keepdim=True)
            hidden = hidden + 0.1 * spread * torch.randn(
                hidden.shape, generator=torch.Generator().manual_seed(self.lies)
            )
        elif self.mode == "nan":
            hidden[-1, 0] = float("nan")
        elif self.mode == "shape":
            hidden = hidden[:-1] if hidden.shape[0] > 1 else hidden[:, :-1]
        result.hidden.CopyFrom(tensor_codec.encode(hidden, tensor_codec.DTYPES[result.hidden.dtype]))


class _LyingContext:
    """The RPC's context, with every response passing through the liar on its way out."""

    def __init__(self, context, liar: LyingServicer):
        self._context = context
        self._liar = liar

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, response) -> None:
        self._liar.maybe_lie(response)
        await self._context.write(response)


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "swarm.cli"] or (argv and argv[0] == sys.executable):
        argv = argv[argv.index("swarm.cli") + 1 :]
    peer.server.PeerServicer = LyingServicer
    from swarm.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
