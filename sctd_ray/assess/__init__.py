"""Teacher assessment: the engine (no Ray), shard planning, the shard-worker actor, the scan."""
