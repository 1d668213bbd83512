"""The wire: generated protobuf code, tensor codec, identities, signing, DHT record schemas."""
