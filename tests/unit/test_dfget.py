"""dfget's argument checks, progress bar and output installation (no daemon, no sockets)."""

import hashlib
import io
import os

import pytest

from dragonfly.cli import dfget


def opts_for(*argv):
    return dfget.validate(dfget.build_parser().parse_args(list(argv)))


def test_good_arguments(tmp_path):
    o = opts_for("-u", "http://origin/x?sig=1&a=2", "-o", str(tmp_path / "x"), "--header", "Authorization: Bearer t",
                 "--digest", "sha256:" + "A" * 64, "-f", "sig", "-e", "5m", "--node", "sn1,sn2:9000")
    assert o["headers"] == {"Authorization": "Bearer t"}
    assert o["digest"] == "sha256:" + "a" * 64
    assert o["filter"] == ["sig"]
    assert o["timeout"] == 300
    assert o["nodes"] == ["sn1:8002", "sn2:9000"]
    assert o["daemonArgs"] == []


def test_token_file_and_ca_go_to_the_dfpeer_dfget_starts(tmp_path):
    (tmp_path / "t").write_text("cluster-token\n")
    (tmp_path / "ca.pem").write_text("pem")
    o = opts_for("-u", "http://origin/x", "-o", str(tmp_path / "x"), "--node", "https://sn:8443",
                 "--cluster-token-file", str(tmp_path / "t"), "--cacerts", str(tmp_path / "ca.pem"))
    assert o["nodes"] == ["https://sn:8443"]
    assert o["daemonArgs"] == ["--cluster-token-file", str(tmp_path / "t"), "--supernode-ca", str(tmp_path / "ca.pem")]


@pytest.mark.parametrize(
    "argv",
    [
        ["-u", "ftp://origin/x"],
        ["-u", "http:///x"],
        ["-u", "http://origin/x", "--header", "no-colon"],
        ["-u", "http://origin/x", "--digest", "sha256:1234"],
        ["-u", "http://origin/x", "--digest", "md5:" + "0" * 32],
        ["-u", "http://origin/x", "--md5", "xyz"],
        ["-u", "http://origin/x", "-e", "soon"],
        ["-u", "http://origin/x", "--node", "host:99999"],
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, argv):
    with pytest.raises(dfget.Failure) as e:
        opts_for(*argv, "-o", str(tmp_path / "x"))
    assert e.value.code == dfget.EXIT_USAGE


def test_output_directory_must_exist(tmp_path):
    with pytest.raises(dfget.Failure) as e:
        opts_for("-u", "http://origin/x", "-o", str(tmp_path / "missing" / "x"))
    assert e.value.code == dfget.EXIT_USAGE
    with pytest.raises(dfget.Failure):
        opts_for("-u", "http://origin/x", "-o", str(tmp_path))


def test_progress_bar(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = dfget.Bar(True)
    bar.show(512 << 10, 1 << 20)
    bar.close()
    assert "50.0%" in err.getvalue() and "512.0 KiB/1.0 MiB" in err.getvalue()
    err.truncate(0)
    dfget.Bar(False).show(1, 2)
    assert err.getvalue() == ""


def _opts(tmp_path, **kw):
    base = {"output": str(tmp_path / "out.bin"), "digest": None, "md5": None, "copy": False}
    base.update(kw)
    return base


def test_install_links_a_verified_file_and_checks_its_length(tmp_path):
    src = tmp_path / "store.data"
    src.write_bytes(b"piece" * 1000)
    o = _opts(tmp_path)
    assert dfget.install(str(src), o, 5000, None, verified=True) == 5000
    assert os.stat(o["output"]).st_ino == os.stat(src).st_ino
    with pytest.raises(dfget.Failure) as e:
        dfget.install(str(src), _opts(tmp_path, output=str(tmp_path / "short.bin")), 4999, None, verified=True)
    assert e.value.code == dfget.EXIT_DIGEST
    assert not (tmp_path / "short.bin").exists()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_install_hashes_when_asked_and_leaves_nothing_on_mismatch(tmp_path):
    src = tmp_path / "store.data"
    src.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    o = _opts(tmp_path, digest="sha256:" + good, copy=True)
    dfget.install(str(src), o, 3, None, verified=True)
    assert os.stat(o["output"]).st_ino != os.stat(src).st_ino
    bad = _opts(tmp_path, output=str(tmp_path / "bad.bin"), md5="0" * 32)
    with pytest.raises(dfget.Failure):
        dfget.install(str(src), bad, 3, None, verified=True)
    assert not (tmp_path / "bad.bin").exists()
    # an unverified (back-to-source) file is compared with the dfpeer's hash
    with pytest.raises(dfget.Failure):
        dfget.install(str(src), _opts(tmp_path, output=str(tmp_path / "b2.bin")), 3, "f" * 64, verified=False)
    assert not (tmp_path / "b2.bin").exists()


def test_installing_the_same_file_twice_leaves_no_temp_name(tmp_path):
    src = tmp_path / "store.data"
    src.write_bytes(b"same")
    o = _opts(tmp_path)
    dfget.install(str(src), o, 4, None, verified=True)
    dfget.install(str(src), o, 4, None, verified=True)
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "store.data"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["-u", "file:///etc/passwd"], "only http and https"),
        (["-u", "ftp://origin/x"], "only http and https"),
        (["-u", "gopher://origin/x"], "only http and https"),
        (["-u", "javascript:alert(1)"], "only http and https"),
        (["-u", "origin/x"], "only http and https"),
        (["-u", ""], "only http and https"),
        (["-u", "http://"], "no host"),
        (["-u", "http://origin:port/x"], "bad port"),
        (["-u", "http://origin:70000/x"], "bad port"),
        (["-u", "http://origin/a b"], "whitespace"),
        (["-u", "http://origin/x\r\nHost: evil"], "whitespace"),
        (["-u", "http://[::1/x"], "cannot be parsed"),
        (["--header", "Name: a\r\nX-Injected: 1"], "Name: value"),
        (["--header", ": value"], "Name: value"),
        (["--header", "Bad Name: v"], "Name: value"),
        (["--header", "NoColon"], "Name: value"),
        (["--digest", "sha256:" + "g" * 64], "sha256:<hex>"),
        (["--digest", "sha1:" + "0" * 40], "sha256:<hex>"),
        (["--digest", "0" * 64], "sha256:<hex>"),
        (["--digest", "sha512:" + "0" * 128], "--digest takes sha256"),
        (["--md5", "0" * 31], "md5"),
        (["--locallimit", "fast"], ""),
        (["--totallimit", "10Q"], ""),
        (["--timeout=-5s"], ""),
        (["--node", "sn:0"], "host[:port]"),
        (["--cluster-token-file", "/nonexistent/token"], "not a readable file"),
        (["--cacerts", "/nonexistent/ca.pem"], "not a readable file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    """Through main(): exit 2, one line 'dfget: error: ...' naming the problem, nothing written."""
    if argv[0] != "-u":
        argv = ["-u", "http://origin/x", *argv]
    code = dfget.main([*argv, "-o", str(tmp_path / "out"), "--home", str(tmp_path / "home"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == dfget.EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfget: error: "), err
    assert says in lines[0]
    assert os.listdir(tmp_path) == []
