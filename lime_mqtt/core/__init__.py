"""Pure and synchronous: errors, topic names, the wire codec, the client protocol, typed messages."""
