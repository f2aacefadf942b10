"""Downloads against a loopback HTTP server: success, mirror fallback, checksum mismatch, offline."""
import functools
import hashlib
import http.server
import socket
import tarfile
import threading
import time

import pytest

from nnlab.cli import main
from nnlab.data import download as dl
from nnlab.data import load_dataset
from nnlab.errors import DataError
from test_data_cifar import make_batches
from test_data_mnist import make_mnist


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields (base_url, folder, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, log
    httpd.shutdown()
    httpd.server_close()


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def serve_mnist(monkeypatch, base, www, mirrors=("",)):
    make_mnist(www)
    remotes = [dl.Remote(p.name, md5(p), tuple(f"{base}{m}{p.name}" for m in mirrors))
               for p in sorted(www.glob("*.gz"))]
    monkeypatch.setitem(dl.REMOTES, "mnist", remotes)
    return remotes


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_mnist_then_reuse(server, monkeypatch, tmp_path, capsys):
    base, www, log = server
    serve_mnist(monkeypatch, base, www, mirrors=("missing/", ""))  # first mirror 404s
    assert main(["data", "info", "mnist", "--download"]) == 0
    assert '"train_size": 12' in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(
        p.name for p in www.glob("*.gz"))
    requests = len(log)
    d = load_dataset("mnist", download=True)  # files present with the right MD5: no request
    assert len(d.test) == 5 and len(log) == requests
    assert len(load_dataset("mnist").train) == 12  # found in the cache folder, no --data-dir


def test_checksum_mismatch_keeps_nothing(server, monkeypatch, tmp_path):
    base, www, _ = server
    remotes = serve_mnist(monkeypatch, base, www)
    monkeypatch.setitem(dl.REMOTES, "mnist", [dl.Remote(remotes[0].filename, "0" * 32, remotes[0].urls)])
    with pytest.raises(DataError, match=r"checksum mismatch .*expected 0{32}.*Put the official file"):
        dl.download("mnist")
    assert not any((tmp_path / "cache" / "mnist").glob("*"))  # no partial or bad file left


def test_offline_fails_fast_with_where_to_put_files(monkeypatch, tmp_path):
    port = closed_port()
    monkeypatch.setitem(dl.REMOTES, "mnist", [dl.Remote("train-images-idx3-ubyte.gz", "0" * 32,
                                                        (f"http://127.0.0.1:{port}/x.gz",))])
    start = time.monotonic()
    with pytest.raises(DataError, match=r"could not download .*Offline\? Put the official file "
                                        r"train-images-idx3-ubyte\.gz .* in .*cache/mnist"):
        load_dataset("mnist", download=True)
    assert time.monotonic() - start < dl.TIMEOUT_S


def test_download_cifar10_archive(server, monkeypatch, tmp_path):
    base, www, _ = server
    make_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = www / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(dl.REMOTES, "cifar10", [dl.Remote(archive.name, md5(archive), (base + archive.name,))])
    d = load_dataset("cifar10", download=True)
    assert (len(d.train), len(d.test), d.num_classes) == (20, 4, 10)
    assert (tmp_path / "cache" / "cifar10" / archive.name).is_file()


def test_no_download_for_image_folders(tmp_path):
    with pytest.raises(DataError, match="celeba64 has no download; .*--data-dir"):
        load_dataset("celeba64", download=True)


def test_official_checksums_are_md5_hex():
    for remotes in dl.REMOTES.values():
        for r in remotes:
            assert len(r.md5) == 32 and int(r.md5, 16) >= 0 and r.urls[0].startswith("https://")
