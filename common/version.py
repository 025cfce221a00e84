"""The project's version: announced in every peer's record (`PeerRecord.version`) and served by the gateway.

Bump it when a peer's answers to the same request change, not only for releases: re-execution
checks compare a sampled token only between peers of one version (`gateway.verification`), since
the same seed draws alike only with the same sampler (0.2.0: inverse-transform draws, 0.1.0:
`torch.multinomial`). `pyproject.toml` reads it from here.
"""

VERSION = "0.2.0"
