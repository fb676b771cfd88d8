"""The HTTP bridge (``lime-mqtt http``): an OpenAI-compatible API, a live dashboard and a
Prometheus endpoint, in front of the cluster's MQTT request topics (docs/http.md)."""
