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

# 64 MiB filled, freed and filled again: the minor page faults of each repeat after two to warm up. The median
# of eight: now and then a small allocation lands in the freed block and one repeat takes fresh pages.
PROBE = """
import json, resource, statistics, sys, torch
from mfrnet_ds.engine import malloc
on = malloc.apply(sys.argv[1], torch.device(sys.argv[2]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(16 << 20)
each = []
for _ in range(8):
    start = faults()
    torch.ones(16 << 20)
    each.append(faults() - start)
print(json.dumps({"on": on, "faults": statistics.median(each)}))
"""


def probe(mode: str, device: str = "cpu") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PAGES = (64 << 20) // 4096


def fresh_every_time(faults: float) -> bool:
    # a fresh mmap per tensor: a fault per 4 KiB page, or per 2 MiB where transparent huge pages are "always"
    return faults >= (64 << 20) // (2 << 20)


def test_reuse_keeps_large_blocks_mapped():
    default, reuse = probe("default"), probe("reuse")
    assert default["on"] is False and fresh_every_time(default["faults"]), default
    assert reuse["on"] is True and reuse["faults"] < min(PAGES / 50, default["faults"] / 20), (reuse, default)


def test_auto_means_reuse_on_cpu_only():
    cpu = probe("auto", "cpu")
    assert cpu["on"] is True and cpu["faults"] < PAGES / 50, cpu
    cuda = probe("auto", "cuda")           # a device string is enough: nothing runs on it
    assert cuda["on"] is False and fresh_every_time(cuda["faults"]), cuda


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="train.malloc='mmap'"):
        malloc.apply("mmap", torch.device("cpu"))


def test_config_key_is_checked():
    from mfrnet_ds.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.malloc"):
        load_config(None, ["train.malloc=mmap"])
