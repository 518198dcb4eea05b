"""Shards read over HTTP and through `pipe:` commands (mfrnet_ds/stream/source.py) give what the same files give
from disk; a server that drops the connection mid-shard is retried, and what stays missing is damage, counted
and logged, never a silent short epoch.

The servers are real: a small http.server subclass of our own on loopback that cuts chosen shards after N
bytes (in a thread of this process), and for the training run `python -m http.server` in one network
namespace with the trainer in another (tests/test_multinode.py's TwoNodes; root only, skipped otherwise)."""
from __future__ import annotations

import functools
import http.server
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from launcher import ROOT, kill_session, read_train_log, tiny_shards, tiny_train_args
from mfrnet_ds.stream import source as src
from mfrnet_ds.stream.eval_stream import EvalStream
from mfrnet_ds.stream.train_stream import TrainStream
from mfrnet_ds.stream.reader import Damage, ManifestError, iter_shard, read_manifest

CUT = 200_000         # bytes of a shard the dropping server sends before it closes the connection (~6 samples)
ALWAYS = 10 ** 6      # "drop every request"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


class DroppingServer:
    """Serves a folder on 127.0.0.1; `drops[name] = n` cuts the next n requests of that file after CUT bytes
    (Content-Length announced, then the socket shut). `requests` lists every path asked for."""

    def __init__(self, folder):
        self.drops: dict[str, int] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def copyfile(self, source, outputfile):
                name = self.path.lstrip("/")
                owner.requests.append(name)
                if owner.drops.get(name, 0) > 0:
                    owner.drops[name] -= 1
                    outputfile.write(source.read(CUT))
                    outputfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                super().copyfile(source, outputfile)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(src, "BACKOFF_S", 0.05)


def _keys_and_bytes(samples) -> list:
    return [None if s is None else (s.key, s.images, s.meta) for s in samples]


def test_a_dropped_connection_is_retried_and_reads_what_disk_reads(shards, quick_retries, caplog):
    with DroppingServer(shards) as server, caplog.at_level(logging.WARNING, "mfrnet_ds.stream"):
        server.drops["train-000001.tar"] = 2
        damage = Damage()
        got = _keys_and_bytes(iter_shard(server.url, "train-000001.tar", damage))
    want = _keys_and_bytes(iter_shard(shards, "train-000001.tar", Damage()))
    assert got == want and len(want) > 10
    assert damage.count == 0
    assert server.requests.count("train-000001.tar") == 3          # two cut transfers, then a whole one
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "connection closed after 200000 of" in retries[0], retries
    assert "retry 1 of 3" in retries[0] and "retry 2 of 3" in retries[1]


def test_a_server_that_keeps_dropping_is_damage_never_a_short_epoch(shards, quick_retries):
    manifest = read_manifest(shards)
    with DroppingServer(shards) as server:
        # evaluation: the samples after the cut are damaged rows, the batches are all there
        server.drops["query-000001.tar"] = ALWAYS
        disk = EvalStream(shards, "query", batch_size=16, img_size=(64, 32))
        remote = EvalStream(server.url, "query", batch_size=16, img_size=(64, 32))
        want, got = list(disk), list(remote)
        assert len(got) == len(want)
        damaged = torch.cat([b["damaged"] for b in got])
        shard_size = next(s["num_samples"] for s in manifest["splits"]["query"]["shards"]
                          if s["name"] == "query-000001.tar")
        assert 0 < int(damaged.sum()) < shard_size
        assert server.requests.count("query-000001.tar") == 1 + src.RETRIES
        assert any("gave up after 3 retries" in e for e in remote.damage.events), remote.damage.events
        undamaged = ~damaged
        assert torch.equal(torch.cat([b["images"] for b in got])[undamaged],
                           torch.cat([b["images"] for b in want])[undamaged])

        # training: a shard that never arrives whole costs samples, noted as damage, not batches
        server.drops["train-000002.tar"] = ALWAYS
        stream = TrainStream(server.url, global_batch=16, num_instances=4, img_size=(64, 32), num_workers=1)
        batches = list(stream)
    assert len(batches) == stream.num_batches == len(TrainStream(shards, global_batch=16, num_instances=4,
                                                                 img_size=(64, 32), num_workers=1))
    assert stream.damage.count > 0
    assert any("train-000002.tar: gave up after 3 retries" in e for e in stream.damage.events)


def test_pipe_source_reads_what_disk_reads_and_a_failing_command_is_damage(shards, quick_retries):
    want = _keys_and_bytes(iter_shard(shards, "train-000000.tar", Damage()))
    assert _keys_and_bytes(iter_shard(f"pipe:cat {shards}/{{name}}", "train-000000.tar", Damage())) == want
    assert read_manifest(f"pipe:cat {shards}/{{name}}") == read_manifest(shards)
    # a CLI that dies half way through (exit 3 after 200000 bytes): retried, then the rest counted as damaged
    failing = f"pipe:head -c 200000 {shards}/{{name}}; exit 3"
    damage = Damage()
    got = list(iter_shard(failing, "train-000000.tar", damage, expected=len(want)))
    assert 0 < len(got) < len(want) and damage.count == len(want) - len(got)
    assert any("exited 3 after 200000 bytes" in e and "gave up after 3 retries" in e for e in damage.events)


def test_remote_manifest_errors_name_the_url(shards, tmp_path):
    with DroppingServer(tmp_path) as server:          # an empty folder: every file is a 404
        with pytest.raises(ManifestError, match=rf"{server.url}/manifest.json: not found"):
            read_manifest(server.url)
    with pytest.raises(ManifestError, match=r"http://127.0.0.1:9/x/manifest.json: cannot be read"):
        read_manifest("http://127.0.0.1:9/x")            # nothing listens on the discard port
    with pytest.raises(ManifestError, match=r"needs \{name\} where the file name goes"):
        read_manifest("pipe:aws s3 cp s3://bucket/shards -")
    with pytest.raises(ManifestError, match="pipe:cat /nonexistent/manifest.json: cannot be read: exited 1 after 0 bytes: cat: "):
        read_manifest("pipe:cat /nonexistent/{name}")


# ---- a training run that reads its shards only over HTTP, from another network namespace ---------------------

STEPS = 2


def _start_training(args: list[str], netns: str | None, log) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch/train.py"), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log) -> None:
    try:
        code = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    assert code == 0, f"{' '.join(proc.args)} exited {code}\n{open(log).read()[-4000:]}"


@pytest.mark.slow
def test_training_over_http_from_another_node_matches_disk(shards, tmp_path):
    from test_multinode import TwoNodes

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    net = TwoNodes()
    server = over_http = from_disk = None
    try:
        try:
            net.up()
        except (RuntimeError, FileNotFoundError) as e:
            pytest.skip(f"cannot make network namespaces here: {e}")
        server_log = tmp_path / "http_server.log"
        server = subprocess.Popen(["ip", "netns", "exec", net.ns[0], sys.executable, "-m", "http.server", "8000",
                                   "--bind", net.addr[0], "--directory", str(shards)],
                                  stdout=open(server_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{net.addr[0]}:8000"
        common = ("model.frm.ep_size=1", f"train.max_steps={STEPS}", "train.eval_on_stop=true")
        t0 = time.perf_counter()
        # both runs at once (one process each): their start-up, mostly imports, overlaps
        over_http = _start_training(tiny_train_args(url, tmp_path / "http", *common), net.ns[1],
                                    tmp_path / "http.log")
        from_disk = _start_training(tiny_train_args(shards, tmp_path / "disk", *common), None,
                                    tmp_path / "disk.log")
        _finish(over_http, tmp_path / "http.log")
        _finish(from_disk, tmp_path / "disk.log")
        wall = time.perf_counter() - t0
    finally:
        for proc in (over_http, from_disk, server):
            if proc is not None:
                kill_session(proc)
        net.down()

    text = (tmp_path / "http.log").read_text()
    # the end-of-run files (manifest copy, expert pictures from the query shards) work from a URL too
    assert "finalize_run" not in text and "end of run: " in text and "experts" in text, text[-3000:]
    over_http = [r["loss"] for r in read_train_log(tmp_path / "http")]
    from_disk = [r["loss"] for r in read_train_log(tmp_path / "disk")]
    assert len(over_http) == STEPS and all(math.isfinite(x) for x in over_http)
    assert over_http == pytest.approx(from_disk, rel=1e-6, abs=1e-7), (over_http, from_disk)
    import json
    assert json.loads((tmp_path / "http/metrics.json").read_text())["mAP"] == \
        pytest.approx(json.loads((tmp_path / "disk/metrics.json").read_text())["mAP"], abs=1e-6)
    served = server_log.read_text()
    manifest = read_manifest(shards)
    wanted = ["manifest.json"] + [s["name"] for split in ("train", "query") for s in manifest["splits"][split]["shards"]]
    missing = [n for n in wanted if f'"GET /{n} HTTP/1.1" 200' not in served]
    assert not missing, f"never requested from the server: {missing}\n{served[-3000:]}"
    print(f"training over HTTP from the other namespace and from disk, side by side: {wall:.1f}s, "
          f"losses {[round(x, 4) for x in over_http]}")
