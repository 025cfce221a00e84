"""The serving layer: turns a validated request into choices run on the swarm and into the
response or the stream of events the client gets (one module per endpoint, in the spirit of
vLLM's `serving_chat` / `serving_completion`; the routes in `gateway.routes` stay thin)."""
