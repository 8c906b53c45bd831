"""The GPU-decoding loader (``loader="nvjpeg"``, dmlfast.data.nvjpeg_loader) on the CPU: its batching,
its crop plans against the torch loader, its fallbacks, what ``auto`` picks, and the throughput
helpers of the training loop (channels_last, --compile, images/s without the compiling step).
The GPU path itself (batched nvJPEG decode on a side stream) runs in the CUDA-marked test."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dmlfast.data as D
from conftest import requires_cuda, write_colour_block_classes
from dmlfast import train
from dmlfast.data import nvjpeg_loader
from dmlfast.training.setup import resolve_loader
from dmlfast.training.throughput import EpochClock, prepare_model, to_model_layout

GREY_LEVEL = 1 / (0.226 * 255)  # one grey level in normalised ImageNet units (largest of the three channels)


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """12 images of different sizes: 8 RGB JPEGs, a greyscale JPEG, a CMYK JPEG and 2 PNGs."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        image = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((60 + 5 * i, 48 + 3 * i), Image.BICUBIC)
        suffix = ".png" if i in (0, 7) else ".jpg"
        if i == 4:
            image = image.convert("L")
        if i == 9:
            image = image.convert("CMYK")
        path = folder / f"{i:02d}{suffix}"
        image.save(path, quality=95)
        paths.append(path)
    return D.ImageList(paths, np.arange(12) % 4)


@pytest.mark.parametrize("train_mode", [True, False])
def test_cpu_decoding_matches_the_torch_loader(mixed_images, train_mode):
    """Same crops, flips and labels as the torch loader from the same seeds; pixels within one grey level
    (torch's antialiased resize against PIL's); PNG and CMYK files take the PIL fallback: identical."""
    kw = dict(train=train_mode, batch_size=4, image_size=24, resize_size=28, num_workers=0, seed=5)
    torch_batches = list(D.make_loader(mixed_images, loader="torch", **kw))
    nvjpeg = D.make_loader(mixed_images, loader="nvjpeg", **kw)
    assert nvjpeg.backend == "nvjpeg" and len(nvjpeg) == len(torch_batches) == 3
    fallbacks = {0, 7, 9}  # the PNGs and the CMYK JPEG: decoded by the workers with PIL, as the torch loader does
    for batch, (expected, expected_labels), (images, labels) in zip(nvjpeg.sampler, torch_batches, nvjpeg):
        assert images.shape == expected.shape == (4, 3, 24, 24) and images.dtype == torch.float32
        assert torch.equal(labels, expected_labels)
        assert (images - expected).abs().max().item() <= 1.01 * GREY_LEVEL
        for position, index in enumerate(batch):
            if index in fallbacks:
                assert torch.equal(images[position], expected[position])


def test_batches_split_jpegs_from_ready_images(mixed_images):
    cfg = D.TransformConfig(train=True, image_size=16, resize_size=16, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33),
                            hflip=True, normalization="imagenet")
    dataset = nvjpeg_loader._EncodedImages(mixed_images, cfg)
    batch = nvjpeg_loader._collate([dataset[(i, 100 + i)] for i in range(12)])
    assert batch["jpeg_positions"] == [1, 2, 3, 4, 5, 6, 8, 10, 11] and batch["ready_positions"] == [0, 7, 9]
    assert batch["plans"].shape == (9, 9) and all(t.dtype == torch.uint8 and t.dim() == 1 for t in batch["jpegs"])
    assert all(image.shape == (3, 16, 16) for image in batch["ready"])
    top, left, h, w, rh, rw, ct, cl, flip = batch["plans"][0].tolist()
    width, height = Image.open(mixed_images.paths[1]).size
    assert 0 <= top <= height - h and 0 <= left <= width - w and (rh, rw, ct, cl) == (16, 16, 0, 0) and flip in (0, 1)
    evaluation = nvjpeg_loader.crop_plan(300, 200, D.TransformConfig(False, 64, 72, (0.08, 1.0), (0.75, 1.33), False, "imagenet"), 0)
    assert evaluation == (0, 0, 200, 300, 72, 108, 4, 22, 0)  # shorter side 72, the 64 px centre (torchvision's rounding)


def test_decoder_failure_falls_back_to_the_cpu(mixed_images, monkeypatch):
    """A batch the device's decoder rejects is decoded on the CPU and sent to the device (here the meta device)."""
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg

    def decode_jpeg(data, mode, device="cpu"):
        calls.append(str(device))
        if str(device) != "cpu":
            raise RuntimeError("nvjpegDecodeBatched failed: unsupported sampling")
        return real(data, mode=mode)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    loader = D.make_loader(mixed_images, train=False, batch_size=4, image_size=16, loader="nvjpeg", num_workers=0)
    loader.device = torch.device("meta")
    jpegs = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in mixed_images.paths[1:4]]
    with pytest.warns(UserWarning, match="decoding JPEGs on meta failed .*unsupported sampling"):
        decoded = loader.decode(jpegs)
    assert calls == ["meta", "cpu"] and loader.cpu_fallbacks == 1
    assert [tuple(d.shape) for d in decoded] == [(3, 51, 65), (3, 54, 70), (3, 57, 75)] and decoded[0].device.type == "meta"


def test_auto_picks_dali_then_gpu_decoding_then_cpu_workers(monkeypatch):
    assert not D.gpu_decode_available("cpu")
    monkeypatch.setattr(D, "dali_available", lambda: True)
    assert D.choose_loader("auto", "cpu") == "dali"
    assert resolve_loader("auto", torch.device("cpu")) == "torch"  # training on a CPU: CPU workers, even with DALI
    monkeypatch.setattr(D, "dali_available", lambda: False)
    monkeypatch.setattr(D, "gpu_decode_available", lambda device: torch.device(device).type == "cuda")
    assert D.choose_loader("auto", "cuda") == "nvjpeg" and D.choose_loader("auto", "cpu") == "torch"
    assert resolve_loader("nvjpeg", torch.device("cpu")) == "nvjpeg"  # asked for: decodes on the CPU
    with pytest.raises(ValueError, match="loader must be one of"):
        D.choose_loader("pil", "cpu")


def test_training_with_the_nvjpeg_loader_on_the_cpu(tmp_path):
    root = write_colour_block_classes(tmp_path / "photos", suffix=".jpg")
    out = tmp_path / "run"
    assert train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", "4", "--model", "smallcnn",
                       "--epochs", "1", "--batch-size", "8", "--image-size", "16", "--embedding-size", "16", "--workers", "1",
                       "--loader", "nvjpeg", "--no-progress", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["loader"] == "nvjpeg"
    assert np.isfinite(json.loads((out / "summary.json").read_text())["history"][1]["loss"])


def test_compile_flag_compiles_the_backbone_in_place(tmp_path, monkeypatch):
    """--compile: the backbone compiled in place (state dict names unchanged, so checkpoints load in an
    uncompiled model); the compiling steps left out of images/s. Compiled with the eager backend here
    (inductor's C++ build takes minutes on 2 cores); the GPU check runs the default one."""
    compiled = []
    original = torch.nn.Module.compile

    def compile_eagerly(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    root = write_colour_block_classes(tmp_path / "photos")
    out = tmp_path / "run"
    assert train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", "4", "--model", "smallcnn",
                       "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--image-size", "16",
                       "--embedding-size", "16", "--workers", "0", "--loader", "torch", "--no-progress", "--compile",
                       "--output", str(out)]) == 0
    assert compiled == ["SmallCNN"]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in steps if r["kind"] == "step"] == [1, 1, 1, 1, 2, 2, 2, 2]
    model = prepare_model(train.make_model(json.loads((out / "config.json").read_text())), torch.device("cpu"))
    model.load_state_dict(torch.load(out / "last.pt", weights_only=False)["model"])  # plain names


def test_epoch_clock_leaves_out_the_compiling_step():
    clock = EpochClock(skip_first=True)
    for _ in range(3):
        clock.step_done(clock.start, 8)
    assert clock.images == 16 and clock.steps == 3 and clock.excluded_seconds > 0
    assert EpochClock().images == 0


def test_channels_last_only_for_convolutional_backbones_on_cuda():
    from dmlfast.models import build_model

    cnn = build_model("smallcnn", 8)
    x = torch.randn(2, 3, 16, 16)
    assert to_model_layout(cnn, x) is x  # a CPU tensor keeps its layout
    assert prepare_model(cnn, torch.device("cpu")).backbone.features[0].weight.is_contiguous()
    timm = pytest.importorskip("timm", reason="timm is not installed")
    assert timm and not build_model("timm:test_vit", 8, image_size=32).backbone.prefers_channels_last


@requires_cuda
@pytest.mark.cuda
def test_gpu_decoding_matches_cpu_decoding(mixed_images):
    """On a GPU: the prefetching side-stream path gives the CPU path's batches (nvJPEG's IDCT may differ
    from libjpeg's by a few grey levels)."""
    if not D.gpu_decode_available("cuda"):
        pytest.skip("torchvision cannot decode JPEGs on this GPU")
    kw = dict(train=True, batch_size=4, image_size=24, num_workers=1, seed=2, loader="nvjpeg")
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(D.make_loader(mixed_images, device="cpu", **kw),
                                                                  D.make_loader(mixed_images, device="cuda", **kw)):
        assert gpu_images.is_cuda and torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (gpu_images.cpu() - cpu_images).abs().mean().item() <= 2 * GREY_LEVEL
