"""What the gateway and the peers share: the DHT (`swarm.dht`), the DHT node process and the CLI."""
