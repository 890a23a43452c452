"""dfdaemon setup on temporary config trees: containerd, docker, podman."""

from __future__ import annotations

import io
import json
import os
import tomllib

import pytest

from dragonfly.cli.dfdaemon import main
from dragonfly.daemon.setup import (
    BACKUP_SUFFIX,
    SetupError,
    apply,
    containerd_hosts,
    docker_daemon_json,
    plan,
    podman_registries,
)

MIRROR = "http://127.0.0.1:65001"


# -- containerd ----------------------------------------------------------------------------------


def test_containerd_new_files_name_dfdaemon_first_then_the_registry(tmp_path):
    changes = plan("containerd", str(tmp_path), ["https://r.example:5000", "docker.io"], MIRROR, all_registries=True)
    assert apply(changes, False, io.StringIO()) == 3
    one = tomllib.loads((tmp_path / "r.example:5000" / "hosts.toml").read_text())
    assert one["server"] == "https://r.example:5000"
    assert list(one["host"]) == [MIRROR] and one["host"][MIRROR]["capabilities"] == ["pull", "resolve"]
    hub = tomllib.loads((tmp_path / "docker.io" / "hosts.toml").read_text())
    assert hub["server"] == "https://registry-1.docker.io"
    default = tomllib.loads((tmp_path / "_default" / "hosts.toml").read_text())
    assert "server" not in default and list(default["host"]) == [MIRROR]
    # twice: nothing changes
    out = io.StringIO()
    assert apply(plan("containerd", str(tmp_path), ["https://r.example:5000", "docker.io"], MIRROR, True), False, out) == 0
    assert out.getvalue().count("unchanged") == 3


def test_containerd_keeps_every_other_setting_and_backs_up(tmp_path):
    existing = (
        '# ours\nserver = "https://r.example"\nca = "/etc/ca.pem"\n\n[header]\n  x-team = ["a"]\n\n'
        '[host."https://other-mirror.example"]\n  capabilities = ["pull"]\n  skip_verify = true\n'
    )
    path = tmp_path / "r.example" / "hosts.toml"
    path.parent.mkdir()
    path.write_text(existing)
    apply(plan("containerd", str(tmp_path), ["https://r.example"], MIRROR), False, io.StringIO())
    new = path.read_text()
    parsed = tomllib.loads(new)
    assert list(parsed["host"]) == [MIRROR, "https://other-mirror.example"]
    assert parsed["host"]["https://other-mirror.example"] == {"capabilities": ["pull"], "skip_verify": True}
    assert parsed["server"] == "https://r.example" and parsed["ca"] == "/etc/ca.pem" and parsed["header"] == {"x-team": ["a"]}
    assert new.startswith("# ours\n")
    assert (tmp_path / "r.example" / ("hosts.toml" + BACKUP_SUFFIX)).read_text() == existing
    assert containerd_hosts(new, "https://r.example", MIRROR) == new


def test_a_hosts_toml_that_does_not_parse_is_an_error_and_untouched(tmp_path):
    path = tmp_path / "r.example" / "hosts.toml"
    path.parent.mkdir()
    path.write_text("server = [unclosed\n")
    with pytest.raises(SetupError, match="not valid TOML"):
        plan("containerd", str(tmp_path), ["r.example"], MIRROR)
    assert path.read_text() == "server = [unclosed\n"
    assert not (tmp_path / "r.example" / ("hosts.toml" + BACKUP_SUFFIX)).exists()
    assert main(["setup", "containerd", "--target", str(tmp_path), "--registry", "r.example"]) == 1
    assert path.read_text() == "server = [unclosed\n"


# -- docker -------------------------------------------------------------------------------------------


def test_docker_daemon_json_gets_the_mirror_first_and_keeps_the_rest(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({"log-driver": "journald", "registry-mirrors": ["https://m.example"], "debug": True}))
    apply(plan("docker", str(path), [], MIRROR), False, io.StringIO())
    data = json.loads(path.read_text())
    assert data == {"log-driver": "journald", "registry-mirrors": [MIRROR, "https://m.example"], "debug": True}
    before = path.read_text()
    assert apply(plan("docker", str(path), [], MIRROR), False, io.StringIO()) == 0
    assert path.read_text() == before
    assert json.loads((tmp_path / ("daemon.json" + BACKUP_SUFFIX)).read_text())["registry-mirrors"] == ["https://m.example"]


def test_docker_new_file_and_bad_files(tmp_path):
    assert json.loads(docker_daemon_json(None, MIRROR)) == {"registry-mirrors": [MIRROR]}
    for bad, words in (("{not json", "not valid JSON"), ("[1]", "not a JSON object"), ('{"registry-mirrors": "x"}', "not a list")):
        path = tmp_path / "daemon.json"
        path.write_text(bad)
        assert main(["setup", "docker", "--target", str(path)]) == 1
        assert path.read_text() == bad
        with pytest.raises(SetupError, match=words):
            docker_daemon_json(bad, MIRROR)


# -- podman --------------------------------------------------------------------------------------------


def test_podman_adds_a_registry_with_its_mirror_or_a_mirror_to_an_existing_one(tmp_path):
    path = tmp_path / "registries.conf"
    path.write_text(
        'unqualified-search-registries = ["docker.io"]\n\n[[registry]]\nlocation = "r.example:5000"\nblocked = false\n\n'
        '[[registry.mirror]]\nlocation = "old-mirror.example"\n'
    )
    apply(plan("podman", str(path), ["r.example:5000", "https://docker.io"], MIRROR), False, io.StringIO())
    data = tomllib.loads(path.read_text())
    assert data["unqualified-search-registries"] == ["docker.io"]
    regs = {r["location"]: r for r in data["registry"]}
    assert [m["location"] for m in regs["r.example:5000"]["mirror"]] == ["127.0.0.1:65001", "old-mirror.example"]
    assert regs["r.example:5000"]["mirror"][0]["insecure"] is True and regs["r.example:5000"]["blocked"] is False
    assert [m["location"] for m in regs["docker.io"]["mirror"]] == ["127.0.0.1:65001"]
    before = path.read_text()
    assert apply(plan("podman", str(path), ["r.example:5000", "docker.io"], MIRROR), False, io.StringIO()) == 0
    assert path.read_text() == before


def test_podman_bad_file_is_untouched(tmp_path):
    path = tmp_path / "registries.conf"
    path.write_text("[[registry]\n")
    assert main(["setup", "podman", "--target", str(path), "--registry", "r.example"]) == 1
    assert path.read_text() == "[[registry]\n"
    assert podman_registries(None, "r.example", "127.0.0.1:1").startswith("[[registry]]")


# -- the command --------------------------------------------------------------------------------------


def test_dry_run_prints_the_change_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "daemon.json"
    path.write_text('{"debug": true}')
    assert main(["setup", "docker", "--target", str(path), "--mirror", "http://10.0.0.1:65001", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change" in out and '+  "registry-mirrors"' in out and "http://10.0.0.1:65001" in out
    assert path.read_text() == '{"debug": true}'
    assert not os.path.exists(str(path) + BACKUP_SUFFIX)
    assert main(["setup", "docker", "--target", str(path)]) == 0
    assert "changed" in capsys.readouterr().out


def test_setup_needs_registries_and_an_http_mirror(tmp_path):
    with pytest.raises(SetupError, match="name the registries"):
        plan("containerd", str(tmp_path), [], MIRROR)
    with pytest.raises(SetupError, match="--mirror"):
        plan("docker", str(tmp_path / "d.json"), [], "127.0.0.1:65001")
