"""Checkpoint rotation keeps the newest train.keep_last step tags, and never the ones it is told to protect."""
import pytest

from mfrnet_ds.engine import ckpt


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_rotation_keeps_the_newest_keep_last_and_the_protected(tmp_path, keep_last):
    tags = [f"step{s:08d}" for s in (10, 20, 30, 40, 50)]
    for tag in tags:
        (tmp_path / tag).mkdir()
    (tmp_path / "latest").write_text(tags[-1])
    ckpt._rotate(tmp_path, keep_last, protect={tags[0]})    # tags[0]: the best one
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == sorted({tags[0], *tags[-keep_last:]})
    assert (tmp_path / "latest").is_file()
