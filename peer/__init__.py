"""The block-peer side of the swarm: spans of transformer blocks, their caches, sampling, serving.

Nothing is imported here on purpose: the gateway imports `common.peer_client` and must not pay for
(or even have) torch; the tensor modules are imported explicitly by whoever needs them.
"""
