"""The DHT: starting peers (network), signed records and their validators (records, store, validator),
the model index, the relay directory, fraud reports, and the block coverage that records add up to."""
