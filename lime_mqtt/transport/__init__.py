"""The broker connection behind one interface: MQTT, an in-memory twin, a local Mosquitto."""
