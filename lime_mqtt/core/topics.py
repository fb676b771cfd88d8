"""Topic names (layout version 2), all under ``lime/v2/{cluster}/``. Documented in docs/topics.md.

Every message is published under its sender's identity, ``{role}/{name}``, which is also
the sender's MQTT user name: ``lime/v2/{cluster}/{role}/{name}/...``. A message meant for
one identity goes to ``{sender}/to/{receiver}/...``. So the broker's ACL binds each
message to its sender with two patterns on the user name (``%u``), one for writing under
one's own name and one for reading what is addressed to one (``lime_mqtt.broker.acl``),
and a receiver knows who sent a message from the topic it arrived on (:meth:`Topics.parse`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

PREFIX = "lime/v2"  # topic layout version 2

# Activations and sampled tokens go at QoS 0: they are on the per-token path, and the
# coordinator, which holds every request's history, retries a step that goes missing.
# Everything else (requests, responses, plans, status, control) is QoS 1.
STEP_QOS = 0

Role = Literal["device", "coordinator", "planner", "client", "operator"]
ROLES: tuple[Role, ...] = ("device", "coordinator", "planner", "client", "operator")


def valid_name(name: str) -> bool:
    """1 to 64 characters, none of them / + # NUL or whitespace (one topic level)."""
    return isinstance(name, str) and 0 < len(name) <= 64 and not any(
        c in "/+#\0" or c.isspace() for c in name
    )


valid_device_id = valid_name


def valid_arg(arg: str) -> bool:
    """A direct topic's last level (a stage, a request id, a fetch tag): 1 to 128
    characters, none of them / + # NUL or whitespace."""
    return 0 < len(arg) <= 128 and not any(c in "/+#\0" or c.isspace() for c in arg)


@dataclass(frozen=True)
class Identity:
    """Who a component is: a role and a name. Its MQTT user name is ``{role}/{name}``."""

    role: Role
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if not valid_name(self.name):
            raise ValueError(f"name {self.name!r} must be 1 to 64 characters without / + # NUL or white space")

    @property
    def username(self) -> str:
        return f"{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.username

    @classmethod
    def parse(cls, username: str) -> Identity:
        """``device/pi-1`` -> Identity("device", "pi-1"); ValueError for anything else."""
        role, sep, name = username.partition("/")
        if not sep:
            raise ValueError(f"user name {username!r} is not of the form role/name ({', '.join(ROLES)})")
        return cls(role, name)  # type: ignore[arg-type]  # checked in __post_init__


@dataclass(frozen=True)
class Route:
    """What a topic says: who sent it (``sender``), what kind of message it is, and for a
    direct message whom it is for (``to``) and its last level (``arg``: a stage number,
    a request id, a fetch tag)."""

    sender: Identity
    kind: str
    to: Identity | None = None
    arg: str | None = None


@dataclass(frozen=True)
class Topics:
    """Every topic of one cluster; pure string functions, no I/O."""

    cluster: str = "default"

    def __post_init__(self) -> None:
        if not self.cluster or any(c in self.cluster for c in "/+#\0"):
            raise ValueError(f"cluster name {self.cluster!r} must be non-empty without / + # or NUL")

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.cluster}"

    def of(self, who: Identity) -> str:
        """The subtree ``who`` publishes in (and nobody else can, with the ACL)."""
        return f"{self.root}/{who.username}"

    def direct(self, sender: Identity, to: Identity, kind: str, arg: str | None = None) -> str:
        tail = f"/{arg}" if arg is not None else ""
        return f"{self.of(sender)}/to/{to.username}/{kind}{tail}"

    def inbox(self, to: Identity, kind: str, sender_role: Role | None = None, any_arg: bool = False) -> str:
        """The filter for messages of ``kind`` addressed to ``to`` (from ``sender_role`` only, if given)."""
        role = sender_role or "+"
        return f"{self.root}/{role}/+/to/{to.username}/{kind}" + ("/+" if any_arg else "")

    # -- devices
    def device_status(self, device_id: str) -> str:
        return f"{self.root}/device/{device_id}/status"

    @property
    def all_device_status(self) -> str:
        return f"{self.root}/device/+/status"

    def device_telemetry(self, device_id: str) -> str:
        return f"{self.root}/device/{device_id}/telemetry"

    @property
    def all_device_telemetry(self) -> str:
        return f"{self.root}/device/+/telemetry"

    @functools.lru_cache(maxsize=1024)  # noqa: B019  (on the per-token path; few distinct)
    def stage_in(self, sender: Identity, device_id: str, stage: int) -> str:
        """Where ``sender`` (the coordinator for stage 0, else the device of stage - 1)
        sends a step to ``stage`` on ``device_id``."""
        return self.direct(sender, Identity("device", device_id), "stage", str(stage))

    def stage_inbox(self, device_id: str) -> str:
        """Every step sent to ``device_id``, for any of its stages, from anyone."""
        return self.inbox(Identity("device", device_id), "stage", any_arg=True)

    @functools.lru_cache(maxsize=1024)  # noqa: B019  (on the per-token path; few distinct)
    def result(self, device_id: str, coordinator: str) -> str:
        """Where the last stage sends a sampled token (or a stage error) to the coordinator."""
        return self.direct(Identity("device", device_id), Identity("coordinator", coordinator), "result")

    def results_inbox(self, coordinator: str) -> str:
        return self.inbox(Identity("coordinator", coordinator), "result", sender_role="device")

    def echo(self, device_id: str) -> str:
        """A device's messages to itself, to time its link through the broker."""
        me = Identity("device", device_id)
        return self.direct(me, me, "echo")

    # -- weights
    def weights_request(self, device_id: str) -> str:
        """Where a device asks every weight source for a manifest or a tensor."""
        return f"{self.root}/device/{device_id}/weights"

    @property
    def all_weights_requests(self) -> str:
        return f"{self.root}/device/+/weights"

    def weights_reply(self, source: Identity, device_id: str, tag: str) -> str:
        """Where a weight source answers one fetch (``tag``) of ``device_id``."""
        return self.direct(source, Identity("device", device_id), "weights", tag)

    def weights_inbox(self, device_id: str, tag: str) -> str:
        """Replies to one fetch, from any coordinator or device that serves weights."""
        return f"{self.root}/+/+/to/device/{device_id}/weights/{tag}"

    # -- coordinators
    def coordinator_status(self, name: str) -> str:
        return f"{self.root}/coordinator/{name}/status"

    @property
    def all_coordinator_status(self) -> str:
        return f"{self.root}/coordinator/+/status"

    def coordinator_telemetry(self, name: str) -> str:
        return f"{self.root}/coordinator/{name}/telemetry"

    @property
    def all_coordinator_telemetry(self) -> str:
        return f"{self.root}/coordinator/+/telemetry"

    def control(self, coordinator: str) -> str:
        """A coordinator's broadcast to every device: end of a request (free its KV cache)."""
        return f"{self.root}/coordinator/{coordinator}/control"

    @property
    def all_control(self) -> str:
        return f"{self.root}/coordinator/+/control"

    def answer(self, coordinator: str, client: str, request_id: str) -> str:
        """Where a coordinator sends the chunks and the answer of ``client``'s request."""
        return self.direct(Identity("coordinator", coordinator), Identity("client", client), "answer", request_id)

    def answers_inbox(self, client: str) -> str:
        return self.inbox(Identity("client", client), "answer", sender_role="coordinator", any_arg=True)

    # -- planner
    def plan(self, planner: str = "main") -> str:
        return f"{self.root}/planner/{planner}/plan"

    @property
    def all_plans(self) -> str:
        return f"{self.root}/planner/+/plan"

    def planner_status(self, planner: str = "main") -> str:
        return f"{self.root}/planner/{planner}/status"

    @property
    def all_planner_status(self) -> str:
        return f"{self.root}/planner/+/status"

    # -- clients
    def requests(self, client: str) -> str:
        """Where ``client`` sends its requests, cancels and resumes."""
        return f"{self.root}/client/{client}/requests"

    @property
    def all_requests(self) -> str:
        return f"{self.root}/client/+/requests"

    @functools.lru_cache(maxsize=1024)  # noqa: B019  (Topics are few and live as long as their users)
    def parse(self, topic: str) -> Route | None:
        """Who sent ``topic`` and what it is; None for a topic outside this cluster's
        layout (remembered for the 1024 latest topics: every step of a stage comes on
        one). Kinds: status, telemetry, weights (a request), plan, control, requests;
        direct ones (with ``to``): stage (``arg`` the stage), result, answer (``arg`` the
        request id), weights_reply (``arg`` the fetch tag), echo."""
        prefix = f"{self.root}/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        try:
            sender = Identity.parse(f"{parts[0]}/{parts[1]}") if len(parts) >= 3 else None
        except ValueError:
            return None
        if sender is None:
            return None
        rest = parts[2:]
        if len(rest) == 1:
            kind = rest[0]
            allowed = {"device": ("status", "telemetry", "weights"), "coordinator": ("status", "control", "telemetry"),
                       "planner": ("plan", "status"), "client": ("requests",)}.get(sender.role, ())
            return Route(sender, kind) if kind in allowed else None
        if rest[0] != "to" or len(rest) not in (4, 5):
            return None
        try:
            to = Identity.parse(f"{rest[1]}/{rest[2]}")
        except ValueError:
            return None
        kind, arg = rest[3], (rest[4] if len(rest) == 5 else None)
        direct = {"stage": True, "answer": True, "weights": True, "result": False, "echo": False}
        if kind not in direct or direct[kind] != (arg is not None) or (arg is not None and not valid_arg(arg)):
            return None
        return Route(sender, "weights_reply" if kind == "weights" else kind, to, arg)
