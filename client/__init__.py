"""The SDK: transport to nodes, routing, inference sessions, generation."""
