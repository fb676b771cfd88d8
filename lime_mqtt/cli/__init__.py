"""The lime-mqtt command line."""

from lime_mqtt.cli.main import main

__all__ = ["main"]
