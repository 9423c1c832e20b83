"""The download cache against a local HTTP server (with Range support) and a closed port."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from resnext.errors import DownloadError
from resnext.weights.download import default_cache_dir, download

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class _Server:
    """A thread serving files of one folder, honouring 'Range: bytes=N-', recording requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_at: int | None = None  # drop the connection once the body reaches this offset
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                target = server.root / self.path.lstrip("/")
                if not target.is_file():
                    self.send_error(404)
                    return
                data = target.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if server.cut_at is not None:
                    self.wfile.write(data[start : server.cut_at])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "w-1234.pth").write_bytes(PAYLOAD)
    srv = _Server(root)
    yield srv
    srv.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_full_hash_and_then_uses_cache(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = download(
        f"{server.url}/w-1234.pth", expected_hash=_sha(PAYLOAD), hash_kind="sha256", cache_dir=cache
    )
    assert path == cache / "w-1234.pth" and path.read_bytes() == PAYLOAD
    assert not (cache / "w-1234.pth.part").exists()
    server.close()  # a second call must not need the network at all
    again = download("http://127.0.0.1:9/w-1234.pth", expected_hash=_sha(PAYLOAD)[:8],
                     hash_kind="prefix", cache_dir=cache)  # fmt: skip
    assert again == path
    assert len(server.requests) == 1


def test_download_resumes_a_partial_file(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "w-1234.pth.part").write_bytes(PAYLOAD[:40_000])
    path = download(
        f"{server.url}/w-1234.pth",
        expected_hash=_sha(PAYLOAD)[:8],
        hash_kind="prefix",
        cache_dir=cache,
    )
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/w-1234.pth", "bytes=40000-")]


@pytest.mark.parametrize("hash_kind", ["sha256", "none"])
def test_cut_download_is_kept_and_resumed(server: _Server, tmp_path: Path, hash_kind: str) -> None:
    cache = tmp_path / "cache"
    url = f"{server.url}/w-1234.pth"
    expected = _sha(PAYLOAD) if hash_kind == "sha256" else ""
    server.cut_at = 40_000
    with pytest.raises(DownloadError, match="cut off at 40000 of 102400 bytes") as info:
        download(url, expected_hash=expected, hash_kind=hash_kind, cache_dir=cache)
    assert "resume" in str(info.value)
    # Neither stored as complete nor thrown away: the 40,000 bytes wait in the .part file.
    assert not (cache / "w-1234.pth").exists()
    assert (cache / "w-1234.pth.part").read_bytes() == PAYLOAD[:40_000]
    server.cut_at = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unhashed download's warning
        path = download(url, expected_hash=expected, hash_kind=hash_kind, cache_dir=cache)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/w-1234.pth", "bytes=40000-")


def test_checksum_mismatch_leaves_nothing_in_place(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        download(
            f"{server.url}/w-1234.pth",
            expected_hash="deadbeef",
            hash_kind="prefix",
            cache_dir=cache,
        )
    msg = str(info.value)
    assert "checksum mismatch" in msg and _sha(PAYLOAD) in msg
    assert not (cache / "w-1234.pth").exists() and not (cache / "w-1234.pth.part").exists()


def test_corrupt_cached_file_is_reported(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "w.pth").write_bytes(b"not the file")
    with pytest.raises(DownloadError, match="does not match"):
        download(
            "http://127.0.0.1:9/w.pth",
            expected_hash="00ff00ff",
            hash_kind="prefix",
            cache_dir=cache,
        )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_names_url_and_cache_path(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/models/x-0123abcd.pth"
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        download(url, expected_hash="0123abcd", hash_kind="prefix", cache_dir=cache, timeout=5)
    msg = str(info.value)
    assert url in msg and str(cache / "x-0123abcd.pth") in msg and "offline" in msg


def test_unhashed_download_warns(server: _Server, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="unverified"):
        path = download(f"{server.url}/w-1234.pth", cache_dir=tmp_path / "c")
    assert path.read_bytes() == PAYLOAD


def test_default_cache_dir_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RESNEXT_HOME", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RESNEXT_HOME")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert default_cache_dir() == tmp_path / "t" / "resnext"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h" / ".cache" / "torch" / "resnext"


def test_concurrent_downloads_of_one_file_take_turns(server: _Server, tmp_path: Path) -> None:
    # The ranks of one job asking for the same weights: one downloads, the others wait for it
    # and find the verified file, instead of writing the same .part at once.
    cache = tmp_path / "cache"
    results: list[Path | Exception] = []

    def fetch() -> None:
        try:
            results.append(
                download(
                    f"{server.url}/w-1234.pth",
                    expected_hash=_sha(PAYLOAD),
                    hash_kind="sha256",
                    cache_dir=cache,
                )
            )
        except Exception as exc:  # collected: a thread's exception would be lost
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [cache / "w-1234.pth"] * 4
    assert (cache / "w-1234.pth").read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_progress_says_where_the_download_goes_and_how_far_it_came(
    server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{server.url}/w-1234.pth"
    path = download(url, expected_hash=_sha(PAYLOAD), hash_kind="sha256", cache_dir=tmp_path,
                    progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert f"Downloading {url} to {path}" in err
    assert err.endswith("100.0% (0.1 of 0.1 MB)\n")  # 102,400 bytes of 102,400
    download(url, expected_hash=_sha(PAYLOAD), hash_kind="sha256", cache_dir=tmp_path,
             progress=True)  # fmt: skip
    assert capsys.readouterr().err == ""  # cached: nothing to say


class _BrokenStream:
    """A stderr whose reader has gone (a closed pipe)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("stderr", [_BrokenStream(), None], ids=["broken-pipe", "none"])
def test_a_stderr_that_cannot_be_written_does_not_stop_the_download(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, stderr: object
) -> None:
    monkeypatch.setattr("sys.stderr", stderr)
    path = download(f"{server.url}/w-1234.pth", expected_hash=_sha(PAYLOAD), hash_kind="sha256",
                    cache_dir=tmp_path, progress=True)  # fmt: skip
    assert path.read_bytes() == PAYLOAD and not list(tmp_path.glob("*.part"))
    assert capsys.readouterr().out == ""  # nothing went to stdout instead


def test_a_torchvision_builder_fetches_a_tag_with_progress_and_loads_it(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import dataclasses

    import torch

    import resnext
    from resnext.weights.table import WEIGHTS

    source = resnext.create_model("resnext_tiny")
    file = server.root / "tiny-0000.pth"
    torch.save(source.state_dict(), file)
    digest = _sha(file.read_bytes())
    file = file.rename(server.root / f"tiny-{digest[:8]}.pth")
    entry = dataclasses.replace(
        WEIGHTS["resnext50_32x4d.tv_in1k"], tag="resnext_tiny.test", model="resnext_tiny",
        url=f"{server.url}/{file.name}", hash=digest[:8], num_classes=10,
    )  # fmt: skip
    monkeypatch.setitem(WEIGHTS, entry.tag, entry)
    monkeypatch.setenv("RESNEXT_HOME", str(tmp_path / "cache"))
    from resnext.models import resnext_tiny

    model = resnext_tiny(weights="resnext_tiny.test")
    assert f"Downloading {entry.url}" in capsys.readouterr().err
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    resnext_tiny(weights="resnext_tiny.test", progress=False)  # from the cache, silently
    assert capsys.readouterr().err == "" and len(server.requests) == 1
