"""
The messages of the SuperNode REST API (C{dragonfly/openapi.yaml}), as attrs
classes, shared by both ends: the dfpeer's L{dragonfly.peer.client.SupernodeClient}
builds requests and reads answers with them; the SuperNode's handlers
(L{dragonfly.supernode.api}) read requests with them once the body has passed
its schema check.

No I/O here: C{to_json} gives the JSON object, C{from_json} reads one.  A
field left at its default is not sent, so requests stay as small as they were
when they were built by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attrs import field, frozen


def _ints(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _strs(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _failures(values: Iterable[FailedPiece]) -> tuple[FailedPiece, ...]:
    return tuple(values)


def _proofs(values: Iterable[PieceProof]) -> tuple[PieceProof, ...]:
    return tuple(values)


#: seconds between heartbeats and between syncs the SuperNode asks for
HEARTBEAT_INTERVAL = 10.0
SYNC_INTERVAL = 0.5


# -- requests --------------------------------------------------------------------


def range_identifier(identifier: str | None, range_header: str) -> str:
    """
    The identifier of a download that is one byte range alone (C{prefetch}
    false): the range is part of its task id, so it never shares one with
    the whole file.
    """
    return f"{identifier or ''}#range={range_header}"


@frozen
class PeerRegistration:
    """C{POST /api/v1/peers}: a dfpeer and where its block port is."""

    peer_id: str
    ip: str
    port: int
    hostname: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"peerId": self.peer_id, "ip": self.ip, "port": self.port, "hostname": self.hostname}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PeerRegistration:
        return cls(body["peerId"], body["ip"], body["port"], body.get("hostname") or "")


@frozen
class TaskRequest:
    """C{POST /api/v1/tasks}: a peer takes part in the download of C{url}."""

    peer_id: str
    url: str
    headers: dict[str, str] = field(factory=dict)
    digest: str | None = None
    identifier: str | None = None
    filter: tuple[str, ...] = field(default=(), converter=_strs)
    #: the bytes the download wants first, one RFC 9110 byte range
    #: (C{bytes=a-b}, C{bytes=a-}, C{bytes=-n}): a Range request's
    range: str | None = None
    #: False: the download is C{range} alone (the CDN fetches only those bytes)
    prefetch: bool = True
    #: the tagged origin (a sync answer's C{origin}) of the pieces this peer
    #: holds, given back when it re-registers with a node that lacks the task
    #: (see L{dragonfly.core.piecetag}); such a node may adopt the task from
    #: the swarm instead of fetching it whole
    takeover: dict[str, Any] | None = None
    #: the answer may wait (a moment) for the origin's length when the CDN
    #: does not know it yet: the peer can do nothing before it, and polled
    #: for it otherwise (a registration with a C{range} always waits)
    wait_length: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peerId": self.peer_id, "url": self.url}
        if self.wait_length:
            out["waitLength"] = True
        if self.range:
            out["range"] = self.range
        if not self.prefetch:
            out["prefetch"] = False
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.digest:
            out["digest"] = self.digest
        if self.identifier is not None:
            out["identifier"] = self.identifier
        if self.filter:
            out["filter"] = list(self.filter)
        if self.takeover is not None:
            out["takeover"] = dict(self.takeover)
        return out

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskRequest:
        takeover = body.get("takeover")
        return cls(
            body["peerId"], body["url"], dict(body.get("headers") or {}), body.get("digest") or None,
            body.get("identifier"), body.get("filter") or (), body.get("range") or None,
            body.get("prefetch") is not False, dict(takeover) if isinstance(takeover, dict) else None,
            body.get("waitLength") is True,
        )


@frozen
class FailedPiece:
    """A piece that failed (bad SHA-256, connection lost), or index -1: the parent could not be reached."""

    index: int
    parent: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "parent": self.parent}


@frozen
class PieceProof:
    """A piece a peer holds, its digest and the tag a SuperNode of the cluster gave with it (see L{dragonfly.core.piecetag})."""

    index: int
    digest: str
    tag: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "digest": self.digest, "tag": self.tag}


@frozen
class SyncReport:
    """C{POST /api/v1/tasks/{taskId}/sync}: what a peer did since its last sync."""

    peer_id: str
    have: tuple[int, ...] = field(default=(), converter=_ints)
    failed: tuple[FailedPiece, ...] = field(default=(), converter=_failures)
    digests_from: int = 0
    starving: bool = False
    want: int | None = None
    banned: tuple[str, ...] = field(default=(), converter=_strs)
    peer_bytes: int = 0
    version: str | None = None
    #: send piece tags from this index on (the first one the peer lacks)
    tags_from: int = 0
    #: the pieces held, with digests and tags: sent when re-announcing to a node that may lack them
    proofs: tuple[PieceProof, ...] = field(default=(), converter=_proofs)
    #: the peer cannot serve the task yet (it is sizing or making its file):
    #: the scheduler names it to no other peer as a parent until it can
    preparing: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peerId": self.peer_id, "have": list(self.have), "digestsFrom": self.digests_from}
        if self.preparing:
            out["preparing"] = True
        if self.tags_from:
            out["tagsFrom"] = self.tags_from
        if self.proofs:
            out["proofs"] = [p.to_json() for p in self.proofs]
        if self.failed:
            out["failed"] = [f.to_json() for f in self.failed]
        if self.starving:
            out["starving"] = True
        if self.want is not None:
            out["want"] = self.want
        if self.banned:
            out["banned"] = list(self.banned)
        if self.peer_bytes:
            out["peerBytes"] = self.peer_bytes
        if self.version is not None:
            out["version"] = self.version
        return out

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SyncReport:
        return cls(
            body["peerId"],
            body.get("have") or (),
            tuple(FailedPiece(f["index"], f["parent"]) for f in body.get("failed") or ()),
            body.get("digestsFrom") or 0,
            bool(body.get("starving")),
            body.get("want"),
            body.get("banned") or (),
            body.get("peerBytes") or 0,
            body.get("version"),
            body.get("tagsFrom") or 0,
            tuple(PieceProof(p["index"], p["digest"], p["tag"]) for p in body.get("proofs") or ()),
            body.get("preparing") is True,
        )


# -- answers ---------------------------------------------------------------------


@frozen
class PeerRegistered:
    peer_id: str
    heartbeat_interval: float

    def to_json(self) -> dict[str, Any]:
        return {"peerId": self.peer_id, "heartbeatInterval": self.heartbeat_interval}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PeerRegistered:
        return cls(body["peerId"], float(body.get("heartbeatInterval", HEARTBEAT_INTERVAL)))


@frozen
class PeerEntry:
    """One registered peer, as C{GET /api/v1/peers} lists it."""

    peer_id: str
    ip: str
    port: int
    hostname: str = ""
    last_seen: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"peerId": self.peer_id, "ip": self.ip, "port": self.port, "hostname": self.hostname, "lastSeen": self.last_seen}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PeerEntry:
        return cls(body["peerId"], body["ip"], body["port"], body.get("hostname") or "", body.get("lastSeen") or 0.0)


@frozen
class TaskView:
    """
    The SuperNode's view of a CDN task (C{CdnTask} in the spec).  C{raw} is
    the whole JSON object, for fields a caller needs that are not typed here.
    """

    task_id: str
    url: str
    status: str
    content_length: int | None
    piece_size: int | None
    piece_count: int | None
    pieces_ready: int
    sha256: str | None
    version: str | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(eq=False, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskView:
        return cls(
            body.get("taskId", ""), body.get("url", ""), body.get("status", ""), body.get("contentLength"),
            body.get("pieceSize"), body.get("pieceCount"), body.get("piecesReady") or 0, body.get("sha256"),
            body.get("version"), body.get("error"), body,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


@frozen
class TaskRegistered:
    task_id: str
    task: TaskView

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskRegistered:
        return cls(body["taskId"], TaskView.from_json(body.get("task") or {}))


@frozen
class Parent:
    """A block-protocol address a peer may fetch pieces from: another peer, or the seed."""

    peer_id: str
    ip: str
    port: int
    seed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"peerId": self.peer_id, "ip": self.ip, "port": self.port, "seed": self.seed}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Parent:
        return cls(body["peerId"], body["ip"], body["port"], bool(body.get("seed")))


@frozen
class SyncAnswer:
    """The answer to a sync: the task's state, new digests, parents and the seed allowance."""

    task: TaskView
    digests_from: int
    digests: tuple[str, ...]
    parents: tuple[Parent, ...]
    seed_pieces: tuple[int, ...]
    sync_interval: float
    #: with a piece key (see L{dragonfly.core.piecetag}): the tags of the
    #: pieces from C{tags_from} on, and the tagged origin of the content
    tags_from: int = 0
    tags: tuple[str, ...] = ()
    origin: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SyncAnswer:
        origin = body.get("origin")
        return cls(
            TaskView.from_json(body.get("task") or {}),
            body.get("digestsFrom", 0),
            tuple(body.get("digests") or ()),
            tuple(Parent.from_json(p) for p in body.get("parents") or ()),
            tuple(body.get("seedPieces") or ()),
            float(body.get("syncInterval", SYNC_INTERVAL)),
            body.get("tagsFrom") or 0,
            tuple(body.get("tags") or ()),
            dict(origin) if isinstance(origin, dict) else None,
        )


@frozen
class TaskDetail:
    """C{GET /api/v1/tasks/{taskId}}: the task, its swarm's members and how many hold each piece."""

    task: TaskView
    peers: tuple[str, ...]
    availability: tuple[int, ...]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskDetail:
        return cls(TaskView.from_json(body), tuple(body.get("peers") or ()), tuple(body.get("availability") or ()))
