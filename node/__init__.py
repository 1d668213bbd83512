"""The volunteer server: serves a span of blocks over signed gRPC."""
