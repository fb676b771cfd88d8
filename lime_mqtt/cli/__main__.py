"""``python -m lime_mqtt.cli``: the lime-mqtt command."""

import sys

from lime_mqtt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
