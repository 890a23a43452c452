"""
Preheat: warm files and container images into the CDN cache before anyone
asks, so the first pull of a release is already P2P and the origin sends
one copy.

A job is created with C{POST /api/v1/preheats} and polled with
C{GET /api/v1/preheats/{id}}; its status goes WAITING -> RUNNING -> SUCCESS
or FAILED (with C{error}).

  - C{type: file}: the URL is fetched into the CDN exactly as a peer's first
    request would (same task id: the URL minus C{filter} keys plus
    C{identifier}; same single-flight origin fetch).
  - C{type: image}: the URL is a manifest URL,
    C{http[s]://REGISTRY/v2/NAME/manifests/REFERENCE}.  The manifest is read
    with the OCI and Docker v2 media types accepted; an index (manifest list)
    is expanded to every platform's manifest; the config blob and every layer
    blob are then warmed.  Registry auth: a C{WWW-Authenticate: Bearer
    realm=...,service=...,scope=...} challenge is answered by getting a token
    from the realm (with the job's C{Authorization} header, e.g. Basic, if it
    has one); a registry with plain Basic auth takes the job's
    C{Authorization} header directly.

A registry blob's task id is L{blob_task_id}: its digest alone, as dfdaemon
derives it, so a preheated layer is found whatever repository, registry
host or mirror a host later names it by; the CDN also checks the fetched
bytes against the digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger

from ..core.ids import BadInput, check_url, parse_digest, task_id
from .cdn import CdnTask

log = Logger()

WAITING, RUNNING, SUCCESS, FAILED = "WAITING", "RUNNING", "SUCCESS", "FAILED"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

#: a manifest bigger than this is refused
MAX_MANIFEST = 4 << 20
#: nested indexes followed at most this deep
MAX_DEPTH = 3
#: blobs of one image warmed at once
BLOB_CONCURRENCY = 4

_MANIFEST_URL = re.compile(r"/v2/(?P<name>[a-z0-9]+(?:[._\-/][a-z0-9]+)*)/manifests/(?P<ref>[A-Za-z0-9_.:+\-]{1,200})\Z")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


class PreheatError(Exception):
    """Why a job failed, for its C{error} field."""


def blob_task_id(blob_url: str, digest: str) -> str:
    """
    The task id of a registry blob: from its digest (C{sha256:<hex>}) alone,
    the id dfdaemon and C{dfget --digest} derive, so a preheated blob is found
    whatever URL names it.
    """
    return task_id(blob_url, digest=digest)


def parse_manifest_url(url: str) -> tuple[str, str, str]:
    """C{(base URL of the registry, repository name, reference)} of a manifest URL."""
    check_url(url)
    parts = urlsplit(url)
    m = _MANIFEST_URL.match(parts.path)
    if m is None or parts.query or parts.fragment:
        raise BadInput(f"image URL {url!r} is not of the form https://REGISTRY/v2/NAME/manifests/TAG_OR_DIGEST")
    ref = m.group("ref")
    if ":" in ref:
        parse_digest(ref)
    return f"{parts.scheme}://{parts.netloc}", m.group("name"), ref


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """C{Bearer realm="...",service="..."} to C{("bearer", {...})}."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in _CHALLENGE_PARAM.findall(rest)}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@define(eq=False)
class PreheatJob:
    id: str
    type: str
    url: str
    headers: dict[str, str]
    filter: list[str]
    identifier: str | None
    created: float
    status: str = WAITING
    start_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    # the CDN tasks it warms: (task id, url, digest or None)
    tasks: list[tuple[str, str, str | None]] = field(factory=list)
    cdn_status: dict[str, str] = field(factory=dict)
    #: a small integer id, for APIs whose job ids are numbers (Dragonfly 2's open API)
    number: int = 0

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.type, self.url, tuple(sorted(self.headers.items())), tuple(self.filter), self.identifier)

    @property
    def finished(self) -> bool:
        return self.status in (SUCCESS, FAILED)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ID": self.id,
            "type": self.type,
            "url": self.url,
            "status": self.status,
            "startTime": _iso(self.start_time if self.start_time is not None else self.created),
            "finishTime": _iso(self.finish_time),
            "tasks": [
                {"taskId": tid, "url": url, "digest": digest, "status": self.cdn_status.get(tid, "waiting")}
                for tid, url, digest in self.tasks
            ],
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class _RegistrySession:
    """One job's conversation with one registry: credentials and the token."""

    def __init__(self, http: Any, clock: Any, headers: dict[str, str], timeout: float) -> None:
        self.http = http
        self.clock = clock
        self.timeout = timeout
        self.authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        self.others = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        self.token: str | None = None

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What requests to the registry carry (the CDN's blob fetches too)."""
        out = dict(self.others)
        if self.token is not None:
            out["Authorization"] = f"Bearer {self.token}"
        elif self.authorization is not None:
            out["Authorization"] = self.authorization
        out.update(extra or {})
        return out

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[Any, bytes]:
        d: Deferred = self.http.get(url, headers={k: [v] for k, v in headers.items()})
        d.addTimeout(self.timeout, self.clock)
        response = await d
        length = response.length if isinstance(response.length, int) else None
        if length is not None and length > MAX_MANIFEST:
            raise PreheatError(f"{url}: answer of {length} bytes is too large")
        cd: Deferred = response.content()
        cd.addTimeout(self.timeout, self.clock)
        body = await cd
        if len(body) > MAX_MANIFEST:
            raise PreheatError(f"{url}: answer of {len(body)} bytes is too large")
        return response, body

    async def get(self, url: str, scope: str, extra: dict[str, str]) -> tuple[Any, bytes]:
        """GET C{url}, answering one Bearer challenge with a token for C{scope}."""
        try:
            response, body = await self._get(url, self.headers(extra))
            if response.code == 401 and self.token is None:
                challenges = response.headers.getRawHeaders(b"www-authenticate", [])
                bearer = [c for c in (parse_challenge(h.decode("latin-1")) for h in challenges) if c[0] == "bearer"]
                if bearer:
                    await self._fetch_token(bearer[0][1], scope)
                    response, body = await self._get(url, self.headers(extra))
                elif self.authorization is None:
                    raise PreheatError(f"registry needs credentials for {url}: give an Authorization header in 'headers'")
        except PreheatError:
            raise
        except Exception as e:
            raise PreheatError(f"registry {url} unreachable: {e}") from None
        if response.code in (401, 403):
            raise PreheatError(f"registry refused the credentials for {url}: HTTP {response.code}")
        return response, body

    async def _fetch_token(self, params: dict[str, str], scope: str) -> None:
        realm = params.get("realm")
        if not realm:
            raise PreheatError("registry's Bearer challenge names no realm")
        try:
            check_url(realm)
        except BadInput as e:
            raise PreheatError(f"registry's token realm: {e}") from None
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": self.authorization} if self.authorization else {}
        try:
            response, body = await self._get(url, headers)
        except PreheatError:
            raise
        except Exception as e:
            raise PreheatError(f"token service {realm} unreachable: {e}") from None
        if response.code != 200:
            raise PreheatError(f"token service {realm} answered HTTP {response.code}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise PreheatError(f"token service {realm} sent no token")
        self.token = token


class Preheater:
    """
    The job table and the jobs' work.

    @param node: the L{SuperNode} (its CDN does the fetching).
    @param http: a treq-like client for the registry and token service.
    @param max_jobs: jobs kept; the oldest finished go first.
    @param keep_finished: seconds a finished job stays visible.
    @param max_running: jobs run at once; the others wait.
    """

    def __init__(
        self,
        node: Any,
        http: Any,
        clock: Any,
        max_jobs: int = 1000,
        keep_finished: float = 24 * 3600.0,
        max_running: int = 4,
        timeout: float = 30.0,
    ) -> None:
        self.node = node
        self.http = http
        self.clock = clock
        self.max_jobs = max_jobs
        self.keep_finished = keep_finished
        self.max_running = max_running
        self.timeout = timeout
        self.jobs: dict[str, PreheatJob] = {}
        self._numbers: dict[int, str] = {}
        self._next_number = 1
        self._queue: list[PreheatJob] = []
        self._running = 0

    # -- the table -------------------------------------------------------------

    def create(
        self, type: str, url: str, headers: dict[str, str] | None = None,
        filter: list[str] | None = None, identifier: str | None = None,
    ) -> tuple[PreheatJob, bool]:
        """A job for this request: C{(job, created)}; an identical unfinished job is reused."""
        if type not in ("file", "image"):
            raise BadInput(f"preheat type {type!r} is not 'file' or 'image'")
        if type == "image":
            parse_manifest_url(url)
        else:
            check_url(url)
        job = PreheatJob(
            id="", type=type, url=url, headers=dict(headers or {}), filter=list(filter or []),
            identifier=identifier, created=self.clock.seconds(),
        )
        for other in self.jobs.values():
            if not other.finished and other.key == job.key:
                return other, False
        self.prune(room=1)
        if len(self.jobs) >= self.max_jobs:
            raise OverflowError(f"{self.max_jobs} preheat jobs are waiting or running")
        job.id = uuid.uuid4().hex
        job.number = self._next_number
        self._next_number += 1
        self._numbers[job.number] = job.id
        self.jobs[job.id] = job
        self._queue.append(job)
        log.info("preheat {job}: {type} {url}", job=job.id, type=type, url=url)
        self.clock.callLater(0, self._start_next)
        return job, True

    def by_number(self, number: int) -> PreheatJob | None:
        """The job with this L{PreheatJob.number}, if it is still kept."""
        job_id = self._numbers.get(number)
        job = self.jobs.get(job_id) if job_id is not None else None
        if job is None:
            self._numbers.pop(number, None)
        return job

    def prune(self, room: int = 0) -> None:
        """
        Forget finished jobs past C{keep_finished}, and the oldest finished
        ones until C{room} more jobs fit under C{max_jobs}.
        """
        now = self.clock.seconds()
        for job_id, job in list(self.jobs.items()):
            if job.finished and job.finish_time is not None and now - job.finish_time > self.keep_finished:
                del self.jobs[job_id]
                self._numbers.pop(job.number, None)
        finished = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.finish_time or 0.0)
        while len(self.jobs) + room > self.max_jobs and finished:
            gone = finished.pop(0)
            del self.jobs[gone.id]
            self._numbers.pop(gone.number, None)

    # -- running -----------------------------------------------------------------

    def _start_next(self) -> None:
        while self._queue and self._running < self.max_running:
            job = self._queue.pop(0)
            self._running += 1
            d = Deferred.fromCoroutine(self._run(job))
            d.addBoth(self._ended)

    def _ended(self, _: Any) -> None:
        self._running -= 1
        self._start_next()

    async def _run(self, job: PreheatJob) -> None:
        job.status, job.start_time = RUNNING, self.clock.seconds()
        try:
            if job.type == "file":
                tid = task_id(job.url, identifier=job.identifier, filter_keys=job.filter)
                job.tasks = [(tid, job.url, None)]
                await self._warm(job, tid, job.url, job.headers, None)
            else:
                await self._run_image(job)
        except PreheatError as e:
            job.error = str(e)
        except Exception as e:  # a bug: the job must still end
            log.failure("preheat {job} crashed", job=job.id)
            job.error = f"internal error: {e}"
        job.finish_time = self.clock.seconds()
        job.status = FAILED if job.error is not None else SUCCESS
        log.info(
            "preheat {job}: {status} ({n} tasks){error}",
            job=job.id, status=job.status, n=len(job.tasks), error=f": {job.error}" if job.error else "",
        )

    async def _warm(self, job: PreheatJob, tid: str, url: str, headers: dict[str, str], digest: str | None) -> None:
        """Fetch one task into the CDN (or find it there) and wait for the end of the fetch."""
        task: CdnTask = self.node.cdn.ensure(tid, url, headers, digest)
        job.cdn_status[tid] = task.status
        if task.status in ("waiting", "running"):
            ended: Deferred = Deferred()
            assert task.done is not None
            # a fresh Deferred: the task's own is shared with others
            def settled(result: Any) -> Any:
                ended.callback(None)
                return result

            task.done.addBoth(settled)
            await ended
        job.cdn_status[tid] = task.status
        if task.status != "success":
            message = task.error.message if task.error is not None else task.status
            raise PreheatError(f"{url}: {message}")

    async def _run_image(self, job: PreheatJob) -> None:
        base, name, ref = parse_manifest_url(job.url)
        session = _RegistrySession(self.http, self.clock, job.headers, self.timeout)
        scope = f"repository:{name}:pull"
        blobs: dict[str, None] = {}  # digests, in order, once each
        await self._expand(session, base, name, ref, scope, blobs, 0)
        job.tasks = [
            (blob_task_id(f"{base}/v2/{name}/blobs/{d}", d), f"{base}/v2/{name}/blobs/{d}", d) for d in blobs
        ]
        blob_headers = session.headers()
        sem = DeferredSemaphore(BLOB_CONCURRENCY)
        errors: list[str] = []

        async def one(tid: str, url: str, digest: str | None) -> None:
            try:
                await self._warm(job, tid, url, blob_headers, digest)
            except PreheatError as e:
                errors.append(str(e))

        def start(tid: str, url: str, digest: str | None) -> Deferred[None]:
            return Deferred.fromCoroutine(one(tid, url, digest))

        pending = [sem.run(start, tid, url, digest) for tid, url, digest in job.tasks]
        for d in pending:
            await d
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise PreheatError(errors[0] + more)

    async def _expand(
        self, session: _RegistrySession, base: str, name: str, ref: str, scope: str,
        blobs: dict[str, None], depth: int,
    ) -> None:
        """Collect the config and layer digests of C{ref}, following indexes."""
        url = f"{base}/v2/{name}/manifests/{ref}"
        response, body = await session.get(url, scope, {"Accept": ACCEPT})
        if response.code == 404:
            raise PreheatError(f"manifest {url} not found (HTTP 404)")
        if response.code != 200:
            raise PreheatError(f"registry answered HTTP {response.code} for manifest {url}")
        if ref.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != ref:
            raise PreheatError(f"manifest {url} does not match its digest")
        try:
            doc = json.loads(body)
        except ValueError:
            raise PreheatError(f"manifest {url} is not JSON") from None
        if not isinstance(doc, dict):
            raise PreheatError(f"manifest {url} is not a JSON object")
        ctype = (response.headers.getRawHeaders(b"content-type", [b""])[0] or b"").decode("latin-1").split(";")[0].strip()
        media = doc.get("mediaType") or ctype
        if media in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise PreheatError(f"manifest {url} is Docker schema 1, which is not supported")
        if media in INDEX_TYPES or (media not in MANIFEST_TYPES and "manifests" in doc):
            if depth >= MAX_DEPTH:
                raise PreheatError(f"manifest {url}: indexes nested deeper than {MAX_DEPTH}")
            entries = doc.get("manifests")
            if not isinstance(entries, list) or not entries:
                raise PreheatError(f"index {url} lists no manifests")
            for entry in entries:
                await self._expand(session, base, name, _digest_of(entry, url), scope, blobs, depth + 1)
            return
        if media in MANIFEST_TYPES or "layers" in doc:
            config = doc.get("config")
            layers = doc.get("layers")
            if not isinstance(config, dict) or not isinstance(layers, list):
                raise PreheatError(f"manifest {url} has no config or layers")
            blobs[_digest_of(config, url)] = None
            for layer in layers:
                if isinstance(layer, dict) and layer.get("urls"):
                    continue  # a foreign layer: served from elsewhere, not by this registry
                blobs[_digest_of(layer, url)] = None
            return
        raise PreheatError(f"manifest {url} has an unknown media type {media!r}")


def _digest_of(descriptor: Any, url: str) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    if not isinstance(digest, str):
        raise PreheatError(f"manifest {url}: a descriptor has no digest")
    try:
        algo, hexpart = parse_digest(digest)
    except BadInput as e:
        raise PreheatError(f"manifest {url}: {e}") from None
    if algo != "sha256":
        raise PreheatError(f"manifest {url}: digest {digest} is not sha256")
    return f"sha256:{hexpart}"
