"""The top layer: the one CLI (`swarm.cli`), the local launcher (`swarm.launcher`) and
`swarm status`. It starts peers, gateways and DHT nodes; nothing below imports it."""
