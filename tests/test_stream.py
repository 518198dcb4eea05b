"""Streaming loaders: global P x K batches split over ranks and micro steps, determinism and resume, aligned
augmentation, stream splitting, damaged shards, and distributed evaluation."""
from __future__ import annotations

import json
import logging
import shutil
import tarfile

import pytest
import torch

from mfrnet_ds.shards import build
from mfrnet_ds.stream import augment as aug
from mfrnet_ds.engine.step import device_images
from mfrnet_ds.stream.pipeline import eval_loader, read_manifest, train_loader
from mfrnet_ds.stream.train_stream import TrainStream
from mfrnet_ds.stream.reader import ManifestError

SIZE = (256, 128)
# torchvision 0.29 marks its image decoders deprecated (TorchCodec); they are what the pinned version has.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process loading runs small tensor ops on torch's thread pool; on a shared 2-core machine a
    second thread waiting for a busy core makes them many times slower (DataLoader workers use one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_pk(batch, p, k, size=SIZE):
    b = p * k
    assert batch["images"].shape == (b, 3, 3, *size) and batch["images"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.int64 and batch["camids"].dtype == torch.int64
    assert batch["labels"].shape == batch["camids"].shape == (b,)
    groups = batch["labels"].view(p, k)
    assert (groups == groups[:, :1]).all(), "each identity's K samples are consecutive"
    assert len(set(groups[:, 0].tolist())) == p, "P distinct identities"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_global_batch_is_p_ids_by_k_and_every_rank_gets_the_same_count(person_shards, num_workers):
    shares = []
    for rank in range(2):
        loader = train_loader(person_shards, global_batch=16, num_instances=4, img_size=SIZE,
                              num_workers=num_workers, rank=rank, world_size=2, batches_per_epoch=7)
        shares.append(list(loader))
    assert [len(s) for s in shares] == [7, 7]
    for half0, half1 in zip(*shares):
        assert half0["images"].shape[0] == half1["images"].shape[0] == 8
        batch = {k: torch.cat([half0[k], half1[k]]) for k in ("images", "labels", "camids")}
        _check_pk(batch, 4, 4)
        assert batch["images"].dtype == torch.uint8    # normalised and erased on the device (engine/step.py)
        for half in (half0, half1):
            for row, modality, top, left, h, w, _ in half["erase"]:
                assert 0 <= row < 8 and modality == -1 and top + h <= SIZE[0] and left + w <= SIZE[1]
        assert 0 <= batch["labels"].min() and batch["labels"].max() < 8
    # Default length: train samples // global batch, whatever the world size.
    assert len(train_loader(person_shards, global_batch=16, num_instances=4, img_size=SIZE, num_workers=0,
                            world_size=2)) == 96 // 16


@pytest.mark.parametrize("world_size, accum, num_workers", [(2, 1, 2), (4, 1, 0), (2, 2, 1), (8, 1, 2)])
def test_ranks_shares_concatenate_to_the_single_process_batch(person_shards, world_size, accum, num_workers):
    """The global P x K draw does not depend on the world size: rank r holds slice r of every micro step
    (also when a slice is half an identity), bit for bit the images one process would get."""
    kwargs = dict(global_batch=16, num_instances=4, img_size=(64, 32), num_workers=num_workers, seed=5, epoch=1,
                  batches_per_epoch=4)
    single = list(train_loader(person_shards, **kwargs))
    shares = [list(train_loader(person_shards, rank=r, world_size=world_size, accum=accum, **kwargs))
              for r in range(world_size)]
    micro = 16 // (accum * world_size)
    for b, whole in enumerate(single):
        for key in ("images", "labels", "camids"):
            parts = [s[b][key].view(accum, micro, *s[b][key].shape[1:]) for s in shares]
            rebuilt = torch.cat(parts, dim=1).flatten(0, 1)          # micro step major, then rank
            assert torch.equal(rebuilt, whole[key]), (b, key)
        # the erased blocks (and their noise seeds) travel with their rows
        boxes = sorted((m * world_size * micro + r * micro + i, *box) for r, share in enumerate(shares)
                       for row, *box in share[b]["erase"] for m, i in [divmod(row, micro)])
        assert boxes == sorted(tuple(box) for box in whole["erase"]), b   # (a worker hands tuples over as lists)
def test_resize_to_another_input_size(person_shards):
    batch = next(iter(train_loader(person_shards, global_batch=6, num_instances=3, img_size=(128, 64),
                                   num_workers=0)))
    _check_pk(batch, 2, 3, (128, 64))


def test_pool_factor_changes_the_mix_not_the_batch_shape(person_shards):
    """data.pool_factor reaches the stream: a smaller pool emits earlier, so other identities share a batch."""
    kwargs = dict(global_batch=8, num_instances=4, img_size=SIZE, num_workers=0, seed=3, batches_per_epoch=4)
    default = list(TrainStream(person_shards, **kwargs))
    small = list(TrainStream(person_shards, pool_factor=1, **kwargs))
    assert TrainStream(person_shards, **kwargs).pool_factor == 4
    for batch in default + small:
        assert batch["labels"].shape == (8,) and len(set(batch["labels"].tolist())) == 2
    assert [b["labels"].tolist() for b in default] != [b["labels"].tolist() for b in small]


def test_same_arguments_same_batches_and_resume_gives_the_tail(person_shards):
    kwargs = dict(global_batch=8, num_instances=4, img_size=SIZE, num_workers=2, seed=3, epoch=1, batches_per_epoch=7)
    full = list(train_loader(person_shards, **kwargs))
    again = list(train_loader(person_shards, **kwargs))
    in_process = list(TrainStream(person_shards, **kwargs))  # the order a 2-worker DataLoader gives
    resumed = list(train_loader(person_shards, start_batch=4, **kwargs))
    other_epoch = list(train_loader(person_shards, **{**kwargs, "epoch": 2}))
    assert len(full) == len(again) == len(in_process) == 7 and len(resumed) == 3
    for a, b, c in zip(full, again, in_process):
        for key in ("images", "labels", "camids"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
        assert a["erase"] == b["erase"] == [list(box) for box in c["erase"]]   # workers hand tuples over as lists
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(full, other_epoch))
    # Reading batches leaves the caller's random stream alone (DataLoader's iter() itself draws a
    # seed, so the dataset is used directly here).
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(TrainStream(person_shards, **{**kwargs, "num_workers": 0})))
    assert torch.equal(torch.rand(3), expected)


def _marker_images():
    images = []
    for fill in (40, 120, 200):  # three different modalities, one marker at one pixel
        image = torch.full((3, *SIZE), fill, dtype=torch.uint8)
        image[:, 50:53, 20:23] = 255
        images.append(image)
    return images


def _marker_position(image):
    brightest = image.mean(0)
    index = int(brightest.flatten().argmax())
    return divmod(index, SIZE[1])


def test_one_draw_keeps_a_marker_at_the_same_place_in_all_modalities():
    aligned = aug.TripletAugment(SIZE, erase_p=0.0)
    separate = aug.TripletAugment(SIZE, erase_p=0.0, aligned=False)
    positions = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = aligned(_marker_images())
        where = [_marker_position(out[m]) for m in range(3)]
        assert where[0] == where[1] == where[2], f"seed {seed}: {where}"
        positions.add(where[0])
    assert len(positions) > 5, "flip and crop really moved the marker"
    moved_apart = False
    for seed in range(20):
        torch.manual_seed(seed)
        out = separate(_marker_images())
        where = [_marker_position(out[m]) for m in range(3)]
        moved_apart |= len(set(where)) > 1
    assert moved_apart, "aligned=False draws per image"


def test_one_draw_includes_erasing():
    flat = [torch.full((3, *SIZE), 200, dtype=torch.uint8)] * 3
    torch.manual_seed(4)
    slot = torch.zeros(2, 3, 3, *SIZE)[1]  # writes into the caller's batch slot
    out = aug.TripletAugment(SIZE, erase_p=1.0)(flat, out=slot)
    assert out.data_ptr() == slot.data_ptr()
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    level = torch.tensor(200 / 127.5 - 1)
    kept = torch.isclose(out[0], level, atol=1e-5) | torch.isclose(out[0], torch.tensor(-1.0))  # image or padding
    assert 0 < (~kept).all(0).float().mean() < 0.4, "one erased block of noise"
    torch.manual_seed(4)
    out = aug.TripletAugment(SIZE, erase_p=1.0, aligned=False)(flat)
    assert not torch.equal(out[0], out[1])


def test_uint8_batches_erased_on_the_device_equal_the_float_path():
    """What the loader ships (uint8 + boxes), normalised and erased by the train step, is exactly the float
    sample the host-side path makes from the same draws."""
    images = [torch.randint(0, 256, (3, 40, 20), generator=torch.Generator().manual_seed(m), dtype=torch.uint8)
              for m in range(3)]
    for aligned in (True, False):
        transform = aug.TripletAugment(SIZE, erase_p=1.0, aligned=aligned)
        torch.manual_seed(7)
        on_host = transform(images)
        torch.manual_seed(7)
        moved = torch.empty(3, 3, *SIZE, dtype=torch.uint8)
        boxes = transform.to_uint8(images, moved)
        assert len(boxes) == (1 if aligned else 3)
        on_device = aug.erase_(device_images(moved.unsqueeze(0), torch.device("cpu"), torch.float32),
                               [(0, *box) for box in boxes])[0]
        assert torch.equal(on_device, on_host)


def _train_keys(person_shards):
    keys = set()
    for shard in read_manifest(person_shards)["splits"]["train"]["shards"]:
        with tarfile.open(person_shards / shard["name"]) as tar:
            keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    return keys


@pytest.mark.parametrize("maxcount, batch_size, mode", [(24, 8, "shard"), (48, 8, "label"), (48, 12, "sample")])
def test_four_streams_read_disjoint_samples_covering_the_split(person_tree, tmp_path, maxcount, batch_size, mode):
    build("rgbnt201", person_tree[0], tmp_path, maxcount=maxcount)
    for pass_index in (0, 1):
        seen = []
        stream = TrainStream(tmp_path, global_batch=batch_size, num_instances=4, img_size=SIZE, num_workers=4,
                             seed=9)
        assert stream.mode == mode
        for logical in range(4):
            seen.append({s.key for s in stream.iter_pass(logical, pass_index) if hasattr(s, "key")})
        assert all(seen), "every stream reads something"
        assert sum(len(s) for s in seen) == len(set().union(*seen)), "streams are disjoint"
        assert set().union(*seen) == _train_keys(tmp_path), "streams cover the split"


def _member_offsets(tar_path, suffix):
    with tarfile.open(tar_path) as tar:
        return [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(suffix)]


def test_truncated_shard_and_corrupt_member_do_not_stop_an_epoch(person_shards, tmp_path, caplog):
    damaged = tmp_path / "shards"
    shutil.copytree(person_shards, damaged)
    cut = damaged / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    broken = damaged / "train-000002.tar"
    offset, size = _member_offsets(broken, ".nir.jpg")[3]
    data = bytearray(broken.read_bytes())
    data[offset:offset + size] = b"\x00" * size  # tar stays valid, the image does not decode
    broken.write_bytes(bytes(data))
    kwargs = dict(global_batch=8, num_instances=4, img_size=(64, 32), num_workers=0, batches_per_epoch=14)
    stream = TrainStream(damaged, **kwargs)
    with caplog.at_level(logging.WARNING, logger="mfrnet_ds.stream"):
        batches = list(stream)
    assert len(batches) == 14
    for batch in batches:
        _check_pk(batch, 2, 4, (64, 32))
    assert stream.damage.count >= 2
    assert "train-000001.tar" in caplog.text and "train-000002.tar" in caplog.text
    # Two ranks decode only their own halves, yet stay in step with the one-process draw: damage found by one
    # rank never changes which identities later batches hold.
    halves = [list(TrainStream(damaged, rank=r, world_size=2, **kwargs)) for r in range(2)]
    for whole, h0, h1 in zip(batches, *halves):
        assert torch.equal(torch.cat([h0["labels"], h1["labels"]]), whole["labels"])
        assert torch.equal(torch.cat([h0["images"], h1["images"]]), whole["images"])


@pytest.mark.parametrize("world_size, num_workers, batch_size", [(2, 2, 7), (3, 1, 16), (1, 0, 96)])
def test_eval_every_sample_once_in_equal_full_batches(person_shards, world_size, num_workers, batch_size):
    manifest = read_manifest(person_shards)
    total = manifest["splits"]["query"]["num_samples"]
    seen, counts = [], []
    for rank in range(world_size):
        batches = list(eval_loader(person_shards, "query", batch_size=batch_size, img_size=SIZE, rank=rank,
                                   world_size=world_size, num_workers=num_workers))
        counts.append(len(batches))
        for batch in batches:
            assert batch["images"].shape == (batch_size, 3, 3, *SIZE)
            for key in ("pids", "camids", "sceneids", "index", "valid"):
                assert batch[key].shape == (batch_size,)
            seen += batch["index"][batch["valid"]].tolist()
            assert (batch["pids"][batch["valid"]] >= 5).all() and (batch["sceneids"] == -1).all()
    assert len(set(counts)) == 1
    assert sorted(seen) == list(range(total))


def test_eval_marks_damaged_samples_invalid_and_keeps_shapes(person_shards, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(person_shards, damaged)
    cut = damaged / "query-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    batches = list(eval_loader(damaged, "gallery", batch_size=10, img_size=SIZE, num_workers=0))
    valid = torch.cat([b["valid"] for b in batches])
    index = torch.cat([b["index"] for b in batches])
    total = read_manifest(damaged)["splits"]["gallery"]["num_samples"]
    assert sorted(index[: total].tolist()) == list(range(total))
    lost = set(index[~valid].tolist()) & set(range(24))
    assert lost and all(i < 24 for i in index[:total][~valid[:total]].tolist()), "only the cut shard's tail"
    assert valid[24:total].all()


def test_manifest_errors_name_the_file_and_key(tmp_path, person_shards):
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    manifest = json.loads((person_shards / "manifest.json").read_text())
    del manifest["num_cameras"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="num_cameras"):
        read_manifest(tmp_path)


def test_too_few_identities_for_a_batch_is_a_clear_error(person_shards):
    with pytest.raises(RuntimeError, match="identities"):
        next(iter(train_loader(person_shards, global_batch=36, num_instances=4, img_size=SIZE, num_workers=0)))
    with pytest.raises(ValueError, match="multiple of num_instances"):
        train_loader(person_shards, global_batch=10, num_instances=4, img_size=SIZE)
    with pytest.raises(ValueError, match="does not split evenly"):
        train_loader(person_shards, global_batch=16, num_instances=4, img_size=SIZE, world_size=3)


def test_shards_where_nothing_decodes_fail_clearly_instead_of_looping(person_shards, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(person_shards, damaged)
    for shard in read_manifest(damaged)["splits"]["train"]["shards"]:
        path = damaged / shard["name"]
        data = bytearray(path.read_bytes())
        for suffix in (".rgb.jpg", ".nir.jpg", ".tir.jpg"):
            for offset, size in _member_offsets(path, suffix):
                data[offset:offset + size] = b"\x00" * size   # tar stays valid, no image decodes
        path.write_bytes(bytes(data))
    stream = TrainStream(damaged, global_batch=8, num_instances=4, img_size=(64, 32), num_workers=0,
                         batches_per_epoch=2)
    with pytest.raises(RuntimeError, match="no sample that decodes"):
        next(iter(stream))


@pytest.mark.parametrize("num_workers, start", [(0, 0), (2, 3), (3, 1)])
def test_one_loader_for_several_epochs_gives_each_epochs_batches(person_shards, num_workers, start):
    """The run-long loader (workers kept across epochs) yields exactly what one loader per epoch yields, also
    when it starts inside an epoch (resume) and the worker count does not divide the epoch."""
    kwargs = dict(global_batch=8, num_instances=4, img_size=(64, 32), num_workers=num_workers, seed=2,
                  batches_per_epoch=5)
    run_long = list(train_loader(person_shards, epoch=1, start_batch=start, epochs=3, **kwargs))
    per_epoch = [b for e in (1, 2, 3) for b in train_loader(person_shards, epoch=e,
                                                             start_batch=start if e == 1 else 0, **kwargs)]
    assert len(run_long) == len(per_epoch) == 15 - start
    for a, b in zip(run_long, per_epoch):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
        assert a["erase"] == b["erase"]
