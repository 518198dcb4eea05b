"""train.malloc (engine/malloc.py): with reuse, a large tensor allocated again after a free takes no new page
faults; with glibc's defaults every one does. Each case runs in its own process (the setting is process-wide)."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from mfrnet_ds.engine import malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# 64 MiB filled, freed and filled again: the minor page faults per repeat, after two to warm up
PROBE = """
import json, resource, sys, torch
from mfrnet_ds.engine import malloc
on = malloc.apply(sys.argv[1], torch.device(sys.argv[2]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):          # the heap grows to hold it (the first two take their faults)
    torch.ones(16 << 20)
start = faults()
for _ in range(4):
    torch.ones(16 << 20)
print(json.dumps({"on": on, "faults": (faults() - start) / 4}))
"""


def probe(mode: str, device: str = "cpu") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reuse_keeps_large_blocks_mapped():
    default, reuse = probe("default"), probe("reuse")
    pages = (64 << 20) // 4096
    assert default["on"] is False and default["faults"] > pages / 2, default   # a fresh mmap every time
    assert reuse["on"] is True and reuse["faults"] < pages / 50, reuse          # the same pages again


def test_auto_means_reuse_on_cpu_only():
    assert probe("auto", "cpu")["on"] is True
    cuda = probe("auto", "cuda")           # a device string is enough: nothing runs on it
    assert cuda["on"] is False and cuda["faults"] > (64 << 20) // 4096 / 2, cuda


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="train.malloc='mmap'"):
        malloc.apply("mmap", torch.device("cpu"))


def test_config_key_is_checked():
    from mfrnet_ds.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.malloc"):
        load_config(None, ["train.malloc=mmap"])
