"""Monitoring: TensorBoard event files, progress/ETA, image grids, the NaN guard in the loop."""

import io
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from viscoin_jax.training import monitor
from viscoin_jax.training.checkpoint import Checkpointer
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import run_training
from viscoin_jax.trainers.toy import ToyIterator, ToyTask
from toy_run import TOY, run_args

RUN = run_args()


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


# ----------------------------------------------------------------------------------------------
# Reading event files back with the protobuf runtime (an independent decoder)


def _event_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="tb_events_test.proto", package="tbtest")

    def message(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, extra in fields:
            m.field.add(name=fname, number=number, type=ftype,
                        label=F.LABEL_REPEATED if extra == "repeated" else F.LABEL_OPTIONAL,
                        type_name=extra if extra not in (None, "repeated") else None)

    message("PluginData", ("plugin_name", 1, F.TYPE_STRING, None),
            ("content", 2, F.TYPE_BYTES, None))
    message("Metadata", ("plugin_data", 1, F.TYPE_MESSAGE, ".tbtest.PluginData"))
    message("Shape")
    message("Tensor", ("dtype", 1, F.TYPE_INT32, None),
            ("tensor_shape", 2, F.TYPE_MESSAGE, ".tbtest.Shape"),
            ("string_val", 8, F.TYPE_BYTES, "repeated"))
    message("Img", ("height", 1, F.TYPE_INT32, None), ("width", 2, F.TYPE_INT32, None),
            ("colorspace", 3, F.TYPE_INT32, None), ("encoded_image_string", 4, F.TYPE_BYTES, None))
    message("Value", ("tag", 1, F.TYPE_STRING, None), ("simple_value", 2, F.TYPE_FLOAT, None),
            ("image", 4, F.TYPE_MESSAGE, ".tbtest.Img"),
            ("tensor", 8, F.TYPE_MESSAGE, ".tbtest.Tensor"),
            ("metadata", 9, F.TYPE_MESSAGE, ".tbtest.Metadata"))
    m = fdp.message_type.add(name="Summary")
    m.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                type_name=".tbtest.Value")
    message("Event", ("wall_time", 1, F.TYPE_DOUBLE, None), ("step", 2, F.TYPE_INT64, None),
            ("file_version", 3, F.TYPE_STRING, None),
            ("summary", 5, F.TYPE_MESSAGE, ".tbtest.Summary"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def read_events(path):
    """TFRecord framing (length, masked CRC32C of length, data, masked CRC32C of data)."""
    Event = _event_class()
    data = Path(path).read_bytes()
    events, pos = [], 0

    def masked(b):
        crc = monitor.crc32c(b)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert len_crc == masked(data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert data_crc == masked(record)
        events.append(Event.FromString(record))
        pos += 12 + length + 4
    return events


def scalars_of(events):
    out = {}
    for e in events:
        for v in e.summary.value:
            if not v.HasField("image") and not v.HasField("tensor"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_crc32c_known_values():
    assert monitor.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert monitor.crc32c(b"") == 0
    assert monitor.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector


def test_writer_event_file(tmp_path, caplog):
    writer = monitor.create_default_writer(tmp_path / "tb", just_logging=False)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with caplog.at_level("INFO", logger="viscoin_jax.train"):
        writer.write_scalars(3, {"train/loss": np.float32(0.25), "lr": 1e-3})
        writer.write_scalars(7, {"train/loss": 0.125})
        writer.write_images(7, {"grid": img})
        writer.write_texts(8, {"note": "héllo"})
    writer.close()
    assert "[3] train/loss=0.25, lr=0.001" in caplog.text

    events = read_events(writer_path := next((tmp_path / "tb").glob("events.out.tfevents.*")))
    assert writer_path.name.startswith("events.out.tfevents.")
    assert events[0].file_version == "brain.Event:2"
    assert scalars_of(events) == {"train/loss": [(3, 0.25), (7, 0.125)],
                                  "lr": [(3, pytest.approx(1e-3))]}
    (image_value,) = [v for e in events for v in e.summary.value if v.tag == "grid"]
    image = image_value.image
    assert (image.height, image.width, image.colorspace) == (5, 7, 3)
    decoded = np.asarray(Image.open(io.BytesIO(image_value.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, img)
    (text_value,) = [v for e in events for v in e.summary.value if v.tag == "note"]
    assert text_value.metadata.plugin_data.plugin_name == "text"
    assert text_value.tensor.string_val == ["héllo".encode()] and text_value.tensor.dtype == 7

    with pytest.raises(ValueError, match="expected uint8"):
        monitor.MetricWriter(None).write_images(0, {"x": np.zeros((4, 4, 3), np.float32)})
    quiet = monitor.create_default_writer(tmp_path / "quiet", just_logging=True)
    quiet.write_scalars(1, {"a": 1.0})
    quiet.close()
    assert not (tmp_path / "quiet").exists()


def test_progress_rate_and_eta(caplog):
    now = [100.0]
    progress = monitor.Progress(1000, every_steps=10, every_secs=None, clock=lambda: now[0])
    assert progress(5) is None  # the first call starts the clock
    now[0] += 2.5
    assert progress(9) is None  # not due
    now[0] += 2.5
    with caplog.at_level("INFO", logger="viscoin_jax.train"):
        report = progress(10)
    assert report["steps_per_sec"] == pytest.approx(1.0)  # 5 steps in 5 s
    assert report["eta_seconds"] == pytest.approx(990.0)
    assert "step 10/1000: 1 steps/s, 16m30s left" in caplog.text
    timed = monitor.Progress(100, every_steps=None, every_secs=30, clock=lambda: now[0])
    timed(0)
    now[0] += 60
    assert timed(3)["steps_per_sec"] == pytest.approx(0.05)
    # the rate is timed after `sync` (the steps in flight finishing), not at dispatch
    synced = monitor.Progress(100, every_steps=5, every_secs=None, clock=lambda: now[0])
    synced(0)
    now[0] += 1.0

    def finish_in_flight_steps():
        now[0] += 4.0
    assert synced(5, sync=finish_in_flight_steps)["steps_per_sec"] == pytest.approx(1.0)
    assert synced(6, sync=lambda: pytest.fail("sync runs only when a report is due")) is None
    assert monitor.format_duration(3 * 3600 + 61) == "3h01m01s"


def test_image_grid_layout():
    rng = np.random.default_rng(1)
    images = rng.uniform(-1.2, 1.2, (5, 3, 4, 3)).astype(np.float32)
    grid = monitor.image_grid(images, ncols=3, padding=1, pad_value=-1.0)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    expected = np.zeros((9, 16, 3), np.uint8)  # pad value -1 -> 0
    for i, img in enumerate(images):
        r, c = divmod(i, 3)
        cell = np.round((np.clip(img, -1, 1) + 1) * 255 / 2).astype(np.uint8)
        expected[1 + r * 4:1 + r * 4 + 3, 1 + c * 5:1 + c * 5 + 4] = cell
    np.testing.assert_array_equal(grid, expected)
    # default: a near-square grid, white padding; gray images stay single-channel
    gray = monitor.image_grid(np.full((4, 2, 2, 1), 0.0, np.float32))
    assert gray.shape == (2 * 4 + 2, 2 * 4 + 2, 1)
    assert gray[0, 0, 0] == 255 and gray[2, 2, 0] == 128
    for bad in (np.zeros((3, 4, 3)), np.zeros((2, 3, 4, 2))):
        with pytest.raises(ValueError, match="expected images of shape"):
            monitor.image_grid(bad)


def test_write_image_grid_png(tmp_path):
    images = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    path = monitor.write_image_grid(None, 12, "samples/fake", images, tmp_path)
    assert path == tmp_path / "samples_fake_00000012.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), monitor.image_grid(images))


def test_check_finite_and_means():
    history = [(1, {"loss": np.float32(1.0)}), (2, {"loss": np.float32(3.0), "acc": 0.5})]
    monitor.check_finite(history, None)
    assert monitor.mean_metrics(history) == {"acc": 0.5, "loss": 2.0}
    bad = history + [(3, {"loss": np.float32(np.nan), "acc": np.inf}), (4, {"loss": np.nan})]
    with pytest.raises(monitor.NonFiniteLossError,
                       match=r"step 3: acc=inf, loss=nan; .*last good checkpoint is step 2"):
        monitor.check_finite(bad, 2)
    with pytest.raises(monitor.NonFiniteLossError, match="no checkpoint was saved yet"):
        monitor.check_finite(bad, None)


# ----------------------------------------------------------------------------------------------
# The guard and the writers inside the loop


class NanTask(ToyTask):
    """The toy task whose batch number `at` (0-based) holds a NaN, as corrupt data would."""

    def __init__(self, config, at):
        super().__init__(config)
        self.at = at

    def make_train_iterator(self, data_state):
        inner = super().make_train_iterator(data_state)
        at = self.at

        class Iterator:
            def __next__(self):
                index = inner.index
                batch = next(inner)
                if index == at:
                    batch["x"] = batch["x"].copy()
                    batch["x"][0, 0] = np.nan
                return batch

            def get_state(self):
                return inner.get_state()
        return Iterator()


def test_nan_guard_stops_without_saving_the_bad_state(tmp_path):
    config = load_config(TOY, RUN)
    with pytest.raises(monitor.NonFiniteLossError,
                       match=r"non-finite metrics at step 5: .*loss=nan.*last good checkpoint is "
                             r"step 4"):
        run_training(NanTask(config, at=4), config, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 4]  # step 6 (a save step) was never written
    restored = ckpt.restore(None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))


def _numpy_mse(params, batches):
    layers = params["layers"]
    total = []
    for b in batches:
        h = b["x"].astype(np.float64)
        for i in range(3):
            h = h @ np.asarray(layers[i]["kernel"][...], np.float64) + np.asarray(
                layers[i]["bias"][...], np.float64)
            h = np.tanh(h) if i < 2 else h
        total.append(np.mean((h - b["y"]) ** 2))
    return float(np.mean(total))


def test_loop_writes_metrics_samples_and_keeps_best(tmp_path):
    config = load_config(TOY, [*RUN[:-1], "--config.train.num_steps=4",
                               "--config.train.eval_every=2", "--config.train.sample_every=3",
                               "--config.checkpoint.max_to_keep=1",
                               "--config.checkpoint.best_metric=eval/mse",
                               "--config.checkpoint.best_mode=min"])
    result = run_training(ToyTask(config), config, tmp_path)
    assert result.step == 4

    # evaluation: the mean MSE over the eval batches, checked against numpy
    eval_batches = list(ToyIterator(seed=0, global_batch=16, features=12, stream=1, num_batches=2))
    params = jax.device_get(result.state["task"]["params"])
    assert result.eval_metrics["eval/mse"] == pytest.approx(_numpy_mse(params, eval_batches),
                                                            rel=1e-5)

    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    scalars = scalars_of(read_events(event_file))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]
    assert [s for s, _ in scalars["eval/mse"]] == [2, 4]
    assert scalars["eval/mse"][-1][1] == pytest.approx(result.eval_metrics["eval/mse"], rel=1e-6)
    assert scalars["train/loss"][-1][1] == pytest.approx(result.train_metrics["loss"], rel=1e-6)

    png = tmp_path / "images" / "first_layer_00000003.png"
    assert np.asarray(Image.open(png)).shape == (12 + 4, 48 + 4)  # one gray cell + padding

    # keep-best: the checkpoint with the lower eval/mse of steps 2 and 4, plus the latest (4)
    best = 2 if scalars["eval/mse"][0][1] < scalars["eval/mse"][1][1] else 4
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == sorted({best, 4})


def test_loop_rejects_batches_of_the_wrong_size(tmp_path):
    class ShortBatches(ToyTask):
        def make_train_iterator(self, data_state):
            inner = super().make_train_iterator(data_state)
            return iter(lambda: {k: v[:8] for k, v in next(inner).items()}, None)

    config = load_config(TOY, RUN)
    with pytest.raises(ValueError,
                       match=r"batch entry \['x'\] has 8 rows .*config.train.batch_size is 16"):
        run_training(ShortBatches(config), config, tmp_path)


def test_scalars_history_reads_back_in_order(tmp_path):
    rng = np.random.default_rng(5)
    values = rng.normal(size=(4, 2))
    writer = monitor.MetricWriter(tmp_path)
    for step, (a, b) in zip((3, 7, 11, 20), values):
        writer.write_scalars(step, {"train/loss": a} if step == 7 else {"train/loss": a, "eval/fid": b})
    writer.close()
    history = monitor.read_scalars(tmp_path)
    assert history["train/loss"] == [(s, float(v)) for s, v in zip((3, 7, 11, 20), values[:, 0])]
    assert history["eval/fid"] == [(s, float(v)) for s, v in zip((3, 11, 20), values[[0, 2, 3], 1])]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        monitor.read_scalars(tmp_path / "nothing")


def test_divergence_watch_warns_once_when_a_loss_leaves_its_range():
    rng = np.random.default_rng(7)
    watch = monitor.DivergenceWatch(orders=2)
    calm = [(s, {"loss": v, "accuracy": 1e6 * s, "G_loss": -v})  # non-loss metrics are ignored
            for s, v in enumerate(np.exp(-np.linspace(0, 8, 40)) * rng.uniform(0.5, 1.5, 40), 1)]
    assert watch(calm) == []  # falling by 3 orders of magnitude is fine
    wobble = [(41, {"loss": 0.9}), (42, {"loss": 1e-3})]  # back up to its old size: in range
    assert watch(wobble) == []
    largest = max(abs(m["loss"]) for _, m in calm + wobble)
    up = [(43, {"loss": 150 * largest, "G_loss": 5.0}), (44, {"loss": 1e4 * largest})]
    warnings = watch(up)
    assert len(warnings) == 1 and "loss is" in warnings[0] and "at step 43" in warnings[0]
    assert watch([(45, {"loss": 1e6 * largest})]) == []  # said once while it stays out
    assert watch([(46, {"loss": 0.5 * largest})]) == []  # back in range: re-armed
    again = watch([(47, {"G_loss": np.float32(-1e9)})])  # |value|, any *_loss
    assert len(again) == 1 and again[0].startswith("G_loss is 1e+09 at step 47")
    assert monitor.DivergenceWatch(orders=2)([(1, {"loss": 0.0}), (2, {"loss": 5.0})]) == []


def test_a_huge_learning_rate_is_reported(tmp_path, caplog):
    config = load_config(TOY, RUN + ["--config.toy.learning_rate=1e6", "--config.toy.input_noise=0"])
    caplog.set_level("WARNING", logger="viscoin_jax.train")
    result = run_training(ToyTask(config), config, tmp_path)  # trains on, with finite losses
    assert result.step == config.train.num_steps
    warned = [r.getMessage() for r in caplog.records if "the run is diverging" in r.getMessage()]
    assert warned and warned[0].startswith("loss is "), [r.getMessage() for r in caplog.records]
