"""The bottom layer, imported by every other package and importing none of them (no torch):
structured logs and request ids (`logs`), where a model's files are (`model_dir`), and the typed
gRPC client of a peer (`peer_client`)."""
