"""Transforms, TFDS sources (under tfds mock data), image folders and the grain pipeline."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from viscoin_jax.data import pipeline, sources, synthetic, transforms as T
from viscoin_jax.data.pipeline import iterator_state, make_dataset, make_iterator

# ---------------------------------------------------------------------------------------------
# Transforms


def _rand_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_to_float_range_and_values():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    y = T.to_float(x)
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_allclose(y[..., 0].ravel(), np.arange(256) / 127.5 - 1, atol=1e-6)


def test_eval_center_crop_is_numpy_slicing():
    rng = np.random.default_rng(0)
    img = _rand_image(rng, 37, 52)
    out = T.EvalTransform(37).map({"image": img, "label": np.int64(3)})
    np.testing.assert_array_equal(out["image"], T.to_float(img[:, 7:44]))
    assert out["label"].dtype == np.int32 and out["label"] == 3
    tall = _rand_image(rng, 61, 30)  # crop_fraction 0.5 of 30 -> 15 px centred square
    out = T.EvalTransform(15, crop_fraction=0.5).map({"image": tall})
    np.testing.assert_array_equal(out["image"], T.to_float(tall[23:38, 7:22]))


def test_resize_of_a_ramp_is_linear():
    """Antialiased bilinear downscaling by 2 keeps a linear ramp linear (source x = 2j + 0.5)."""
    x = np.arange(100)
    img = np.broadcast_to((2 * x + 10)[None, :, None], (20, 100, 3)).astype(np.uint8)
    out = T.resize(np.ascontiguousarray(img), 20, 50).astype(np.int64)
    j = np.arange(2, 48)
    np.testing.assert_allclose(out[:, j, 0], np.broadcast_to(4 * j + 11, (20, j.size)), atol=1)
    assert T.resize(img, 20, 100) is img  # same size: untouched


def test_flip_and_determinism():
    rng = np.random.default_rng(1)
    img = _rand_image(rng, 24, 24)
    tr = T.TrainTransform(24, random_crop=False, flip=True)
    seen = set()
    for seed in range(16):
        out = tr.random_map({"image": img}, np.random.default_rng(seed))
        again = tr.random_map({"image": img}, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], again["image"])
        flipped = np.array_equal(out["image"], T.to_float(img[:, ::-1]))
        assert flipped or np.array_equal(out["image"], T.to_float(img))
        seen.add(flipped)
    assert seen == {True, False}


def test_random_resized_crop_boxes():
    rng = np.random.default_rng(2)
    for h, w in [(37, 52), (64, 64), (15, 90)]:
        for _ in range(200):
            y0, x0, bh, bw = T.random_resized_crop_box(h, w, rng, (0.35, 1.0), (3 / 4, 4 / 3))
            assert 0 <= y0 and y0 + bh <= h and 0 <= x0 and x0 + bw <= w
            if (h, w) != (15, 90):
                area = bh * bw / (h * w)
                assert 0.35 - 0.06 <= area <= 1.0
                assert 3 / 4 - 0.1 <= bw / bh <= 4 / 3 + 0.1
    # An image too elongated for any box: centred fallback with the ratio clamped to 4/3.
    y0, x0, bh, bw = T.random_resized_crop_box(10, 200, rng, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (bh, bw) == (10, 13) and x0 == (200 - 13) // 2
    # The train transform output is resize(crop(box)) with the box drawn first from its rng.
    img = _rand_image(rng, 37, 52)
    tr = T.TrainTransform(20, flip=False)
    out = tr.random_map({"image": img}, np.random.default_rng(9))
    box = T.random_resized_crop_box(37, 52, np.random.default_rng(9), tr.scale, tr.ratio)
    np.testing.assert_array_equal(out["image"], T.to_float(T.resize(T.crop(img, box), 20)))


def test_transform_errors():
    with pytest.raises(ValueError, match="scale"):
        T.TrainTransform(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="ratio"):
        T.TrainTransform(32, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_fraction"):
        T.EvalTransform(32, crop_fraction=0.0)
    with pytest.raises(ValueError, match="uint8"):
        T.EvalTransform(8).map({"image": np.zeros((8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        T.EvalTransform(8).map({"image": np.zeros((8, 8), np.uint8)})


# ---------------------------------------------------------------------------------------------
# TFDS under mock data


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _numpy_bbox_crop(image, bbox):
    h, w = image.shape[:2]
    ya, yb = sorted(bbox[[0, 2]])
    xa, xb = sorted(bbox[[1, 3]])
    y0, x0 = int(np.floor(ya * h)), int(np.floor(xa * w))
    y1, x1 = max(int(np.ceil(yb * h)), y0 + 1), max(int(np.ceil(xb * w)), x0 + 1)
    return image[y0:y1, x0:x1]


def test_cub200_bbox_crop_under_mock_data(tfds):
    with tfds.testing.mock_data(num_examples=6):
        raw = tfds.data_source("caltech_birds2011", split="train")
        src = sources.TfdsSource("caltech_birds2011", "train", bbox_crop=True)
        full = sources.TfdsSource("caltech_birds2011", "train", bbox_crop=False)
        assert len(src) == 6 and src.num_classes == 200
        smaller = 0
        for i in range(6):
            rec = raw[i]
            ex = src[i]
            np.testing.assert_array_equal(ex["image"], _numpy_bbox_crop(rec["image"], rec["bbox"]))
            np.testing.assert_array_equal(full[i]["image"], rec["image"])
            assert ex["label"] == rec["label"] and ex["label"].dtype == np.int32
            smaller += ex["image"].size < rec["image"].size
        assert smaller >= 3  # the crop really crops
        batches = list(make_dataset(name="cub200", split="train", resolution=24, batch_size=4,
                                    train=True, num_epochs=1, shard_index=0, shard_count=1))
        assert len(batches) == 1  # 6 examples, drop_remainder for train
        b = batches[0]
        assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
        assert -1 <= b["image"].min() and b["image"].max() <= 1
        np.testing.assert_array_equal(b["label"], [raw[int(i)]["label"] for i in b["index"]])


def test_colorectal_histology_under_mock_data(tfds):
    with tfds.testing.mock_data(num_examples=5):
        raw = tfds.data_source("colorectal_histology", split="train")
        ev = list(make_dataset(name="colorectal_histology", split="train", resolution=150,
                               batch_size=2, train=False, shard_index=0, shard_count=1))
        assert [len(b["label"]) for b in ev] == [2, 2, 1]
        for b in ev:  # eval at the native 150 px: exactly the stored pixels, in order
            for row, i in enumerate(b["index"]):
                assert raw[int(i)]["image"].shape == (150, 150, 3)
                np.testing.assert_array_equal(b["image"][row], T.to_float(raw[int(i)]["image"]))
                assert b["label"][row] == raw[int(i)]["label"]
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in ev]), np.arange(5))
        assert pipeline.make_source(name="colorectal_histology", split="test").num_classes == 8


def test_missing_tfds_data_is_a_clear_error(tmp_path, tfds):
    with pytest.raises(FileNotFoundError, match="tfds build colorectal_histology"):
        sources.open_tfds("colorectal_histology", "train", data_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        sources.open_tfds("colorectal_histology", "train", data_dir=tmp_path)
    assert not any(tmp_path.rglob("*.array_record*"))  # and nothing was downloaded
    with pytest.raises(ValueError, match="no data set named"):
        sources.open_tfds("no_such_dataset_xyz", "train")
    with pytest.raises(FileNotFoundError, match="caltech_birds2011"):
        make_dataset(name="cub200", data_dir=str(tmp_path), shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_tree(root, rng):
    images = {}
    for cls, shapes in [("TUM", [(17, 23), (9, 9)]), ("ADI", [(12, 31)]), ("MUS", [(20, 8)])]:
        (root / cls).mkdir(parents=True)
        for k, (h, w) in enumerate(shapes):
            img = _rand_image(rng, h, w)
            name = f"img{k}.{'tif' if cls == 'MUS' else 'png'}"
            Image.fromarray(img).save(root / cls / name)
            images[f"{cls}/{name}"] = img
    (root / "TUM" / "notes.txt").write_text("not an image")
    return images


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    images = _write_tree(tmp_path / "train", rng)
    src = sources.ImageFolderSource(tmp_path / "train")
    assert src.class_names == ("ADI", "MUS", "TUM")
    assert [f.replace("\\", "/") for f in src.files] == ["ADI/img0.png", "MUS/img0.tif",
                                                         "TUM/img0.png", "TUM/img1.png"]
    for i, f in enumerate(src.files):
        ex = src[i]
        np.testing.assert_array_equal(ex["image"], images[f.replace("\\", "/")])
        assert ex["label"] == src.class_names.index(f.split("/")[0].split("\\")[0])
    batches = list(make_dataset(name="nct_crc_he", data_dir=str(tmp_path), split="train",
                                resolution=8, batch_size=4, train=False,
                                shard_index=0, shard_count=1))
    b = batches[0]
    np.testing.assert_array_equal(b["label"], [0, 1, 2, 2])
    np.testing.assert_array_equal(  # eval: centre square of the shorter side, resized to 8
        b["image"][3], T.to_float(T.resize(images["TUM/img1.png"], 8)))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.ImageFolderSource(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class folders.*1 images directly"):
        sources.ImageFolderSource(flat)
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "a" / "x.png")
    with pytest.raises(ValueError, match=r"class folder .*b has no images"):
        sources.ImageFolderSource(tree)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "b" / "y.jpg")
    (tree / "b" / "z.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot read image .*z\.png"):
        sources.load_image(tree / "b" / "z.png")
    src = sources.ImageFolderSource(tree, bad_images="skip")
    assert src[1]["image"].shape == (4, 4, 3)  # the jpg reads
    with pytest.raises(ValueError, match="needs data_dir"):
        make_dataset(name="nct_crc_he", shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------------------------
# Pipeline

SYN = dict(name="synthetic/blob_4class", resolution=16, synthetic_size=40, shard_index=0,
           shard_count=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_values_and_determinism():
    it = make_iterator(SYN, batch_size=8, train=False)
    b = next(it)
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    src = synthetic.SyntheticConcepts("blob_4class", 16, 40)
    np.testing.assert_array_equal(b["index"], np.arange(8))  # eval: in order
    for row in range(8):
        np.testing.assert_array_equal(b["image"][row], T.to_float(src[row]["image"]))
        assert b["factors"]["colour"][row] == src[row]["factors"]["colour"]
    np.testing.assert_array_equal(b["label"], synthetic.label_from_factors("blob_4class",
                                                                           b["factors"]))
    a1 = _take(make_iterator(SYN, batch_size=8, seed=5), 10)
    a2 = _take(make_iterator(SYN, batch_size=8, seed=5), 10)
    _assert_same_batches(a1, a2)
    b1 = _take(make_iterator(SYN, batch_size=8, seed=6), 1)
    assert not np.array_equal(a1[0]["index"], b1[0]["index"])
    # train: each epoch of 40 is a permutation, and the next epoch is shuffled differently
    idx = np.concatenate([b["index"] for b in a1])
    assert sorted(idx[:40]) == list(range(40)) and sorted(idx[40:80]) == list(range(40))
    assert not np.array_equal(idx[:40], idx[40:80])


def test_train_flips_keep_synthetic_factors_true():
    b = next(make_iterator(SYN, resolution=32, batch_size=32, seed=3))
    m = synthetic.measure_factors(b["image"])
    assert np.abs(m["center_x"] - b["factors"]["center_x"]).max() < 1.5 / 32
    np.testing.assert_array_equal(m["colour"], b["factors"]["colour"])
    src = synthetic.SyntheticConcepts("blob_4class", 32, 40)
    flipped = [not np.isclose(b["factors"]["center_x"][r], src[int(i)]["factors"]["center_x"])
               for r, i in enumerate(b["index"])]
    assert 0 < sum(flipped) < 32
    with pytest.raises(ValueError, match="not allowed"):
        make_dataset(SYN, batch_size=4, augment="crop_flip")


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_round_trip(threads):
    opts = dict(SYN, batch_size=6, seed=1, read_threads=threads)
    it = make_iterator(opts)
    _take(it, 5)  # 30 of 40 examples: the continuation crosses an epoch boundary
    state = json.loads(json.dumps(iterator_state(it)))
    expected = _take(it, 6)
    resumed = make_iterator(opts, state=state)
    _assert_same_batches(_take(resumed, 6), expected)
    with pytest.raises(ValueError, match="does not fit"):
        pipeline.restore_iterator(make_iterator(opts), {"bogus": 1})


def test_hosts_get_disjoint_shares():
    # eval: 40 examples over 3 hosts -> 13 each (one dropped), disjoint, same batch counts
    shares = [np.concatenate([b["index"] for b in make_dataset(
        SYN, batch_size=5, train=False, shard_index=k, shard_count=3)]) for k in range(3)]
    assert [len(s) for s in shares] == [13, 13, 13]
    all_idx = np.concatenate(shares)
    assert len(set(all_idx.tolist())) == 39
    # train: within each epoch the two hosts split the permutation between them
    per_host = [np.concatenate([b["index"] for b in _take(make_iterator(
        SYN, batch_size=5, seed=2, shard_index=k, shard_count=2), 8)]) for k in range(2)]
    single = np.concatenate([b["index"] for b in _take(make_iterator(SYN, batch_size=10, seed=2),
                                                       8)])
    for epoch in range(2):
        h0, h1 = (p[20 * epoch:20 * (epoch + 1)] for p in per_host)
        assert not set(h0.tolist()) & set(h1.tolist())
        assert sorted(np.concatenate([h0, h1]).tolist()) == list(range(40))
    # global batch j (10 rows) is host 0's batch j then host 1's: the one-host batch j, in order
    for k in range(2):
        np.testing.assert_array_equal(per_host[k].reshape(8, 5), single.reshape(8, 10)[:, 5 * k:5 * k + 5])


def test_position_is_the_global_batch_count_for_any_host_count():
    """A position saved by one host layout resumes under another (same global batch of 12): every
    host of the new layout continues with its block of the global batches that followed."""
    opts = dict(SYN, seed=3)
    one = make_iterator(opts, batch_size=12, shard_index=0, shard_count=1)
    _take(one, 2)
    states = []
    for k in range(3):
        it = make_iterator(opts, batch_size=4, shard_index=k, shard_count=3)
        _take(it, 2)
        states.append(json.loads(json.dumps(iterator_state(it))))
    assert states[0] == states[1] == states[2] == iterator_state(one)
    expected = np.concatenate([b["index"] for b in _take(one, 3)]).reshape(3, 12)
    for k in range(2):  # two hosts resume the position the three saved
        resumed = make_iterator(opts, batch_size=6, shard_index=k, shard_count=2, state=states[0])
        got = np.stack([b["index"] for b in _take(resumed, 3)])
        np.testing.assert_array_equal(got, expected[:, 6 * k:6 * k + 6])


def test_a_position_saved_in_host_examples_is_converted():
    """Checkpoints written before positions counted global batches hold grain's own state (this
    host's examples consumed): it resumes at the same batch."""
    opts = dict(SYN, seed=3, batch_size=4)
    it = make_iterator(opts)
    _take(it, 3)
    expected = _take(it, 2)
    _assert_same_batches(_take(make_iterator(opts, state={"next_index": 12}), 2), expected)


def test_options_errors():
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'.*cub200.*nct_crc_he"):
        make_dataset(name="imagenet")
    with pytest.raises(ValueError, match="unknown data options"):
        make_dataset(SYN, batchsize=3)
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(name="synthetic/blob_binary", shard_index=0)
    with pytest.raises(ValueError, match="augment"):
        make_dataset(SYN, augment="rotate")
    cfg = pipeline.data_config(name="synthetic/blob_shape", resolution=16, synthetic_size=8,
                               batch_size=4, shard_index=0, shard_count=1)
    assert next(iter(make_dataset(cfg, train=False)))["image"].shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="unknown data option"):
        pipeline.data_config(resolutoin=3)
    assert set(pipeline.known_datasets()) >= {"synthetic/blob_binary", "cub200",
                                             "colorectal_histology", "nct_crc_he"}
    assert math.isclose(pipeline.DataOptions().crop_ratio[1], 4 / 3)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(16)
    gray = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    gray[0, :3] = (0, 257 * 100, 65535)
    Image.fromarray(gray).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow reads it as 16-bit
    image = sources.load_image(tmp_path / "deep.png")
    expected = np.floor(gray.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], expected)
    assert tuple(image[0, :3, 0]) == (0, 100, 255)
    # 8-bit images are unchanged
    rgb = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(sources.load_image(tmp_path / "rgb.png"), rgb)


def _folder_with_bad_files(root, rng):
    for name in ("ADI", "TUM"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(root / name / f"{i}.png")
    good = (root / "TUM" / "1.png").read_bytes()
    (root / "ADI" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "TUM" / "2.png").write_bytes(b"")  # empty
    return [str(root / "ADI" / "1.png"), str(root / "TUM" / "2.png")]


def test_unreadable_images_fail_at_the_start_listing_them(tmp_path):
    bad = _folder_with_bad_files(tmp_path / "train", np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 of 6 images in .* cannot be read") as info:
        make_dataset(name="nct_crc_he", data_dir=str(tmp_path), split="train", resolution=4,
                     batch_size=2, train=False, shard_index=0, shard_count=1)
    for path in bad:
        assert path in str(info.value)
    assert "bad_images='skip'" in str(info.value)


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path, caplog):
    bad = _folder_with_bad_files(tmp_path / "train", np.random.default_rng(1))
    caplog.set_level("WARNING")
    src = sources.ImageFolderSource(tmp_path / "train", bad_images="skip")
    assert len(src) == 4 and src.skipped == 2
    assert not {str(src.root / f) for f in src.files} & set(bad)
    assert any("skipping 2 unreadable images of 6" in r.getMessage() for r in caplog.records)
    batches = list(make_dataset(name="nct_crc_he", data_dir=str(tmp_path), split="train",
                                resolution=4, batch_size=2, train=False, bad_images="skip",
                                shard_index=0, shard_count=1))
    assert sum(len(b["label"]) for b in batches) == 4  # the whole pass reads
    with pytest.raises(ValueError, match="bad_images must be one of"):
        make_dataset(name="nct_crc_he", data_dir=str(tmp_path), split="train", bad_images="ignore",
                     shard_index=0, shard_count=1)


def test_class_balanced_order_takes_classes_in_turn():
    rng = np.random.default_rng(5)
    labels = np.sort(rng.integers(0, 3, 23))
    order = sources.class_balanced_order(labels)
    assert sorted(order) == list(range(23))
    for n in range(1, 24):  # every prefix: class counts differ by at most one while all remain
        counts = np.bincount(labels[order[:n]], minlength=3)
        left = np.bincount(labels, minlength=3) - counts
        live = counts[left > 0]
        assert live.size == 0 or live.max() - live.min() <= 1


def test_a_file_damaged_after_a_check_is_found_by_the_next(tmp_path):
    _folder_with_bad_files(tmp_path / "train", np.random.default_rng(2))
    assert len(sources.ImageFolderSource(tmp_path / "train", bad_images="skip")) == 4
    (tmp_path / "train" / "ADI" / "0.png").write_bytes(b"not a png any more")
    assert len(sources.ImageFolderSource(tmp_path / "train", bad_images="skip")) == 3
