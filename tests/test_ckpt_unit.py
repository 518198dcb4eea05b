"""Checkpoint bookkeeping without a DeepSpeed engine: the `latest`/`best` pointers, COMPLETE markers, `resolve`,
and the rotation of old tags (engine/ckpt.py), on folder layouts built by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from mfrnet_ds.config import MissingFileError
from mfrnet_ds.engine import ckpt
from mfrnet_ds.config import TrainConfig
from mfrnet_ds.engine.ckpt import mark_best, read_pointer, resolve


def tag(step: int) -> str:
    return f"step{step:08d}"


def make_tags(ckpt_dir: Path, steps, complete: bool = True) -> None:
    for step in steps:
        (ckpt_dir / tag(step)).mkdir(parents=True)
        (ckpt_dir / tag(step) / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if complete:
            (ckpt_dir / tag(step) / "COMPLETE").write_text("ok\n")


def point(ckpt_dir: Path, name: str, step: int) -> None:
    (ckpt_dir / name).write_text(tag(step))


def tags_on_disk(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """mark_best ends in a barrier: a real gloo group of one process."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- pointers -------------------------------------------------------------------------------------------

def test_read_pointer_names_a_complete_tag(tmp_path):
    make_tags(tmp_path, [2, 4])
    (tmp_path / "latest").write_text(tag(4) + "\n")          # surrounding whitespace is not part of the tag
    assert read_pointer(tmp_path, "latest") == tag(4)


def test_read_pointer_ignores_a_tag_without_complete(tmp_path):
    make_tags(tmp_path, [2])
    make_tags(tmp_path, [4], complete=False)                 # a save cut short
    point(tmp_path, "latest", 4)
    assert read_pointer(tmp_path, "latest") is None
    point(tmp_path, "latest", 6)                             # a tag folder that is gone
    assert read_pointer(tmp_path, "latest") is None


def test_read_pointer_missing_or_empty(tmp_path):
    assert read_pointer(tmp_path, "latest") is None
    assert read_pointer(tmp_path / "absent", "best") is None
    make_tags(tmp_path, [2])
    (tmp_path / "latest").write_text("")                     # a pointer truncated by a crash before the rename
    assert read_pointer(tmp_path, "latest") is None


def test_read_pointer_garbled_text(tmp_path):
    make_tags(tmp_path, [2])
    (tmp_path / "latest").write_text("step0000\x00\x07garbage\n")
    assert read_pointer(tmp_path, "latest") is None


def test_read_pointer_garbled_bytes(tmp_path):
    make_tags(tmp_path, [2])
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00step")
    assert read_pointer(tmp_path, "latest") is None


def test_resolve_latest_best_and_a_tag_folder(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    make_tags(ckpts, [2, 4, 6])
    point(ckpts, "latest", 6)
    point(ckpts, "best", 4)
    assert resolve(run) == (ckpts, tag(6))                   # the run folder or its checkpoints folder
    assert resolve(ckpts) == (ckpts, tag(6))
    assert resolve(run, best=True) == (ckpts, tag(4))
    assert resolve(ckpts / tag(2)) == (ckpts, tag(2))        # one tag folder itself
    point(ckpts, "best", 8)                                  # best names nothing complete: latest
    assert resolve(run, best=True) == (ckpts, tag(6))


def test_resolve_without_a_complete_checkpoint(tmp_path):
    make_tags(tmp_path, [2], complete=False)
    point(tmp_path, "latest", 2)
    with pytest.raises(MissingFileError, match="no complete checkpoint"):
        resolve(tmp_path)
    with pytest.raises(MissingFileError):
        resolve(tmp_path / tag(2))


# ---- rotation and best ----------------------------------------------------------------------------------

def test_rotation_keeps_the_newest_and_what_is_protected(tmp_path):
    assert TrainConfig().keep_last == 2, "the layouts below assume the default of two kept tags"
    make_tags(tmp_path, [10, 20, 30, 40, 50])
    (tmp_path / "other").mkdir()                              # not a step tag: never touched
    ckpt._rotate(tmp_path, 2, protect={tag(20)})
    assert tags_on_disk(tmp_path) == ["other", tag(20), tag(40), tag(50)]
    ckpt._rotate(tmp_path, 2, protect=set())
    assert tags_on_disk(tmp_path) == ["other", tag(40), tag(50)]


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_rotation_keeps_the_newest_train_keep_last(tmp_path, keep_last):
    make_tags(tmp_path, [10, 20, 30, 40, 50])
    (tmp_path / "latest").write_text(tag(50))
    ckpt._rotate(tmp_path, keep_last, protect={tag(10)})      # tag 10: the best one
    assert tags_on_disk(tmp_path) == sorted({tag(10), *[tag(s) for s in (10, 20, 30, 40, 50)[-keep_last:]]})
    assert (tmp_path / "latest").is_file()


def test_rotation_orders_by_step_not_by_creation(tmp_path):
    make_tags(tmp_path, [300, 100, 200])                      # zero-padded names sort as the steps
    make_tags(tmp_path, [1000])
    ckpt._rotate(tmp_path, 2, protect=set())
    assert tags_on_disk(tmp_path) == [tag(300), tag(1000)]


def test_mark_best_points_and_retires_the_previous_best(tmp_path, one_process_group):
    make_tags(tmp_path, [10, 20, 30, 40])
    point(tmp_path, "latest", 40)
    mark_best(tmp_path, tag(10), rank=0)
    assert read_pointer(tmp_path, "best") == tag(10)
    ckpt._rotate(tmp_path, 2, protect={tag(40), read_pointer(tmp_path, "best")})   # as save() protects best
    assert tags_on_disk(tmp_path) == [tag(10), tag(30), tag(40)]
    mark_best(tmp_path, tag(40), rank=0)                       # the old best, kept only for being best, goes
    assert read_pointer(tmp_path, "best") == tag(40)
    assert tags_on_disk(tmp_path) == [tag(30), tag(40)]
    assert not list(tmp_path.glob(".*.tmp")), "the pointer is replaced through a temp file, then renamed"


def test_mark_best_keeps_the_old_best_when_latest_names_it(tmp_path, one_process_group):
    make_tags(tmp_path, [10, 20])
    point(tmp_path, "latest", 20)
    mark_best(tmp_path, tag(20), rank=0)
    mark_best(tmp_path, tag(10), rank=0)                       # the previous best is also latest: kept
    assert read_pointer(tmp_path, "best") == tag(10) and tags_on_disk(tmp_path) == [tag(10), tag(20)]


def test_mark_best_on_other_ranks_writes_nothing(tmp_path, one_process_group):
    make_tags(tmp_path, [10])
    mark_best(tmp_path, tag(10), rank=1)
    assert not (tmp_path / "best").exists()
