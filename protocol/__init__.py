"""What every side shares: `wire/` (talking to one node: the node interface, gRPC, codec, signing, TLS,
identities) and `dht/` (finding nodes: the DHT and its signed records, and the coverage they add up to);
two leaves any folder may import: `version.py` and `serving.py` (running a long-lived server process)."""
