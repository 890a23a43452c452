"""The task log helper, URL redaction and the JSON-lines observer for twistd --logger."""

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher

from dragonfly.core.logs import event_record, json_lines_observer, safe_url, task_log

TID = "ab" * 32


def test_task_log_fields_and_text():
    events = []
    publisher = LogPublisher(events.append)
    task_log(Logger(namespace="t", observer=publisher), LogLevel.warn, TID, "got {bytes} bytes", bytes=5, peerId="p")
    (e,) = events
    assert e["taskId"] == TID and e["task"] == TID[:12] and e["bytes"] == 5 and e["peerId"] == "p"
    assert e["log_level"] is LogLevel.warn
    assert event_record(e)["text"] == f"task {TID[:12]}: got 5 bytes"


def test_json_lines_observer_writes_one_object_per_event():
    out = io.StringIO()
    log = Logger(namespace="dragonfly.x", observer=json_lines_observer(out))
    task_log(log, LogLevel.info, TID, "done in {seconds:.1f}s", seconds=1.25, pieces=[1, 2], obj=object())
    log.info("plain {n}", n=3)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("boom")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = map(json.loads, lines)
    assert first["taskId"] == TID and first["seconds"] == 1.25 and first["pieces"] == [1, 2]
    assert first["text"] == f"task {TID[:12]}: done in 1.2s"
    assert first["level"] == "info" and first["namespace"] == "dragonfly.x"
    assert first["obj"].startswith("<object")
    assert second == {k: second[k] for k in ("time", "level", "namespace", "text", "n")}
    assert third["level"] == "critical" and "ZeroDivisionError" in third["failure"]


def test_safe_url_drops_secrets():
    assert safe_url("http://u:pw@h:8080/a/b?sig=xyz&t=1#f") == "http://h:8080/a/b?..."
    assert safe_url("https://h/a") == "https://h/a"
    assert "[" not in safe_url("http://[::1/x")
