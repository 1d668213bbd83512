"""The wire: the one client interface to a node (node_client) and its signed gRPC implementation over TLS
(grpc_node), the tensor codec, identities, signatures, allow lists and the relay link. Protobuf and gRPC
stay in here and in node/."""
