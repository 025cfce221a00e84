"""Discovery: who serves which blocks. Peer records, the DHT that holds them, the announcer.

This layer sits below both the peer and the gateway and imports neither (see docs/ARCHITECTURE.md):
`records` (the record and the names in it), `entries` (values as merged entries, pure), `storage`
(kademlia storage that merges), `dht` (the node: `SwarmDHT`), `announcer` (the heartbeat),
`node` (a standalone bootstrap node).
"""
