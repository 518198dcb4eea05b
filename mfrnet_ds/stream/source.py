"""Where the shards are: a local folder, an http(s):// URL, or a `pipe:` command (`data.shards`, --shards).

    data/shards/rgbnt201                                   a folder on this node (or a shared filesystem)
    http://10.0.0.1:8000/rgbnt201                          the same files under a URL (any static server)
    pipe:aws s3 cp s3://bucket/rgbnt201/{name} -           a command that writes one file to stdout

Every file of a shard set (manifest.json, each tar, the pixel-baseline cache) is addressed by its name inside
the set: a URL is the base URL + "/" + name; a `pipe:` command is run by `sh -c` with `{name}` replaced by the
shell-quoted name (`{name}` must occur; `{{`/`}}` stand for literal braces), and whatever it writes to stdout
is the file. A command that exits non-zero failed, whatever it wrote.

A remote read can fail half way (a server restarted, a dropped connection, a killed CLI). Such a failure is
transient more often than not, so `open_checked` streams report it as an exception (a short body is detected
against Content-Length, a pipe by its exit status) and `reader.iter_shard` retries the shard
(RETRIES times, backoff BACKOFF_S x 2^attempt), skipping the samples it already gave; what is still missing
after the last retry is counted as damaged. Nothing is cached on local disk.
"""
from __future__ import annotations

import shlex
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

RETRIES = 3            # re-reads of one shard after a failed transfer, before its rest counts as damaged
BACKOFF_S = 0.5        # wait before retry k: BACKOFF_S x 2^k (0.5, 1, 2 s)
TIMEOUT_S = 60.0       # a socket that delivers nothing for this long is a failed transfer
_CHUNK = 1 << 16


class TransferError(OSError):
    """A remote file could not be read to its end: the connection dropped, the command failed."""


class ShardSource:
    """The place a shard set lives; `str()` is how it was given."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        if self.spec.startswith("pipe:"):
            self.kind, self.command = "pipe", self.spec[len("pipe:"):].strip()
            if "{name}" not in self.command:
                raise ValueError(f"{self.spec}: a pipe: shard source needs {{name}} where the file name goes, "
                                 "e.g. pipe:aws s3 cp s3://bucket/shards/{name} -")
        elif self.spec.startswith(("http://", "https://")):
            self.kind = "http"
        else:
            self.kind = "dir"

    def __str__(self) -> str:
        return self.spec

    @property
    def is_remote(self) -> bool:
        return self.kind != "dir"

    @property
    def local_dir(self) -> Path | None:
        return Path(self.spec) if self.kind == "dir" else None

    def where(self, name: str) -> str:
        """The address of one file, for messages."""
        if self.kind == "http":
            return f"{self.spec.rstrip('/')}/{name}"
        if self.kind == "pipe":
            return f"pipe:{self._command(name)}"
        return str(Path(self.spec) / name)

    def _command(self, name: str) -> str:
        return self.command.replace("{name}", shlex.quote(name)).replace("{{", "{").replace("}}", "}")

    def open_checked(self, name: str, timeout: float = TIMEOUT_S):
        """A binary stream of one file that raises TransferError instead of ending early; FileNotFoundError
        when the server answers 404. Close it (a pipe's command is stopped)."""
        if self.kind == "dir":
            return open(Path(self.spec) / name, "rb")
        if self.kind == "http":
            try:
                response = urllib.request.urlopen(self.where(name), timeout=timeout)
            except urllib.error.HTTPError as exn:
                if exn.code == 404:
                    raise FileNotFoundError(f"{self.where(name)}: HTTP 404 not found") from None
                raise TransferError(f"{self.where(name)}: HTTP {exn.code} {exn.reason}") from None
            except (urllib.error.URLError, OSError) as exn:
                raise TransferError(f"{self.where(name)}: {getattr(exn, 'reason', exn)}") from None
            return _HttpBody(response, self.where(name))
        return _PipeBody(self._command(name))

    def read_bytes(self, name: str) -> bytes:
        """A whole (small) file: the manifest, a cache."""
        with self.open_checked(name) as f:
            return f.read()


class _HttpBody:
    """A response body that raises TransferError when it ends before its Content-Length (http.client's
    read(n) just returns b"" there) or when the socket fails."""

    def __init__(self, response, url: str):
        self.response, self.url, self.got = response, url, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length is not None else None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.response.read() if n is None or n < 0 else self.response.read(n)
        except Exception as exn:  # http.client.IncompleteRead, ConnectionResetError, socket timeout ...
            raise TransferError(f"{self.url}: transfer failed after {self.got} bytes: {type(exn).__name__}: "
                                f"{exn}") from None
        self.got += len(data)
        if not data and n != 0 and self.length is not None and self.got < self.length:
            raise TransferError(f"{self.url}: connection closed after {self.got} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.response.close()


    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _PipeBody:
    """stdout of `sh -c COMMAND`; at its end the command's exit status decides whether the file was whole."""

    def __init__(self, command: str):
        self.command, self.got = command, 0
        self.stderr = tempfile.TemporaryFile()     # a file, not a pipe: a chatty command never blocks on it
        self.proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read() if n is None or n < 0 else self.proc.stdout.read(n)
        self.got += len(data)
        if not data and n != 0:
            code = self.proc.wait()
            if code:
                self.stderr.seek(0)
                err = self.stderr.read().decode(errors="replace").strip().splitlines()
                raise TransferError(f"pipe:{self.command}: exited {code} after {self.got} bytes"
                                    + (f": {err[-1][:300]}" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:   # closed before its end (a reader that needed only part): stop it
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
