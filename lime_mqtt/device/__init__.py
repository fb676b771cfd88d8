"""The device agent: lifetime and status, plans and shards, scheduling, compute."""
