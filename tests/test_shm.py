"""Loader workers and /dev/shm: too little shared memory is one clear error before any worker starts."""
import shutil

import pytest

from mfrnet_ds.config import UserError
from mfrnet_ds.stream.pipeline import PREFETCH, check_shared_memory


def test_too_little_shared_memory_is_a_user_error_naming_the_fix(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    batch = free // (2 * (PREFETCH + 1)) + 1      # two workers' batches just do not fit
    with pytest.raises(UserError) as e:
        check_shared_memory(2, batch, shm=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "data.num_workers=2" in msg and "--shm-size=" in msg


def test_enough_shared_memory_or_no_workers_passes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_shared_memory(2, free // (4 * (PREFETCH + 1)), shm=tmp_path)
    check_shared_memory(0, 10 * free, shm=tmp_path)     # no workers: no shared memory used
