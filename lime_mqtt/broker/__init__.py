"""A secure Mosquitto in one command (``lime-mqtt broker init``), documented in docs/broker.md.

``pki`` makes a private CA and the broker's TLS certificate (with the ``cryptography``
library), ``passwords`` writes Mosquitto's password file, ``acl`` its ACL file for topic
layout v2, and ``folder`` puts them together in one broker folder with a Mosquitto
configuration and a settings file per identity. Files and signals only: no MQTT here
(``lime_mqtt.transport.mosquitto.SecureBroker`` runs a broker from a folder).
"""

from __future__ import annotations

from lime_mqtt.broker.folder import DEFAULT_IDENTITIES, BrokerFolder, FolderConfig, Member

__all__ = ["DEFAULT_IDENTITIES", "BrokerFolder", "FolderConfig", "Member"]
