"""`--verify`: every hop's outputs recomputed elsewhere before use (verifier), by whom (opinions), and the
fraud proofs kept when a node lies (evidence). Sessions see only the `SessionVerifier` protocol."""
