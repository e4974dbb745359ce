"""NVIDIA's seed pipeline (golden and reference numbers, bounded cost) and the detection transform."""
from __future__ import annotations

import io
import pathlib
import tracemalloc

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssd import transforms
from ssd.compat.nvidia import crop_center, normalize, prepare_input, rescale, seed_preprocess
from ssd.io.images import load_rgb
from ssd.models import NVIDIA_SSD300
from ssd.models.spec import InputSpec
from ssd.models.ssd_vgg16 import MMDET_SSD300
from ssd.transforms import preprocess_for_detection, to_tensor_chw

NVIDIA_INPUT = NVIDIA_SSD300.input
IMAGENET_MEAN, IMAGENET_STD = NVIDIA_INPUT.mean, NVIDIA_INPUT.std
MMDET_INPUT = MMDET_SSD300.input

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(img: np.ndarray) -> np.ndarray:
    """NVIDIA's pipeline, literally: img_as_float, rescale, crop_center, normalize."""
    return normalize(crop_center(rescale(skimage.img_as_float(img), 300, 300), 300, 300))


def png_file(tmp_path: pathlib.Path, name: str, image: np.ndarray | Image.Image, **options) -> pathlib.Path:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    path = tmp_path / name
    image.save(path, **options)
    return path


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skimage.data.chelsea()


# ---------------------------------------------------------------- the seed pipeline


def test_prepare_input_matches_golden(tmp_path, forward_golden):
    path = png_file(tmp_path, "astronaut.png", skimage.data.astronaut())
    out = prepare_input(path)
    golden = forward_golden["image"]
    assert out.shape == golden.shape == (300, 300, 3) and out.dtype == np.float64
    diff = np.abs(out - golden)
    assert diff.mean() < 1e-3
    assert diff.max() < 1e-6  # the golden is float32: this is its rounding, nothing more


RANDOM_SHAPES = [(480, 640), (640, 480), (300, 300), (512, 512), (1, 1), (2, 5), (5, 2), (7, 3), (301, 299),
                 (299, 301), (6, 600), (600, 6), (123, 457), (1001, 37), (150, 150), (200, 1000)]


@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_seed_preprocess_equals_reference(shape):
    rng = np.random.default_rng(shape[0] * 7919 + shape[1])
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = reference(img)
    got = seed_preprocess(img)
    assert got.shape == expected.shape == (300, 300, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(seed_preprocess(skimage.img_as_float(img)), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera"])
def test_seed_preprocess_equals_reference_on_photos(name):
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.dstack([img] * 3)
    np.testing.assert_allclose(seed_preprocess(img), reference(img), rtol=0, atol=1e-9)


def test_seed_preprocess_sixteen_bit_and_single_channel():
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (90, 130, 3), dtype=np.uint16)
    np.testing.assert_allclose(seed_preprocess(deep), reference(deep), rtol=0, atol=1e-9)
    gray = rng.random((50, 70, 1))
    np.testing.assert_allclose(seed_preprocess(gray), reference(gray), rtol=0, atol=1e-9)


@pytest.mark.timeout(30)
def test_a_thin_strip_never_builds_the_full_intermediate():
    strip = np.random.default_rng(1).random((6, 6000, 3))
    # Resized whole, this strip would be 300 x 300000 x 3 float64: 2.2 GB.
    tracemalloc.start()
    try:
        out = seed_preprocess(strip)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (300, 300, 3) and np.all(np.abs(out) <= 1.0)
    assert peak < 20 * 2**20
    tall = np.ascontiguousarray(strip.transpose(1, 0, 2))
    assert seed_preprocess(tall).shape == (300, 300, 3)


def test_a_large_photo_only_reads_its_centre():
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = seed_preprocess(photo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A float64 copy of the photo alone would be 72 MB; the work is done in bounded slabs.
    assert peak < 25 * 2**20
    # The crop keeps the central 1500 x 1500: pixels far outside it cannot change the result.
    edited = photo.copy()
    edited[:, :200] = 0
    edited[:, -200:] = 255
    np.testing.assert_array_equal(seed_preprocess(edited), out)


def test_slab_by_slab_conversion_is_exact(monkeypatch):
    import ssd.compat.nvidia

    # Force many small slabs on a small image: the result must not depend on how the rows are split.
    monkeypatch.setattr(ssd.compat.nvidia, "_CHUNK_ELEMENTS", 5000)
    img = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    np.testing.assert_allclose(seed_preprocess(img), reference(img), rtol=0, atol=1e-9)


def test_seed_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match=r"expected an H x W x C array \(ndim 3\), got shape \(4, 5\)"):
        seed_preprocess(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="non-empty"):
        seed_preprocess(np.zeros((0, 5, 3)))
    with pytest.raises(TypeError, match="int32"):
        seed_preprocess(np.zeros((4, 5, 3), np.int32))


# ---------------------------------------------------------------- NVIDIA's reference helpers


def test_reference_helpers_keep_nvidia_semantics(chelsea):
    img = skimage.img_as_float(chelsea)  # 300 x 451: already 300 high
    resized = rescale(img, 300, 300)
    assert resized.shape == (300, 451, 3)
    portrait = rescale(img.transpose(1, 0, 2), 300, 300)
    assert portrait.shape == (451, 300, 3)
    assert rescale(img[:200, :200], 300, 300).shape == (300, 300, 3)
    crop = crop_center(resized, 300, 300)
    np.testing.assert_array_equal(crop, resized[:, 225 - 150:225 + 150])
    assert crop_center(np.zeros((10, 20, 3)), 4, 6).shape == (6, 4, 3)  # cropx is the width
    np.testing.assert_allclose(normalize(np.array([0.0, 0.5, 1.0])), [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(normalize(np.array([1.0]), mean=0, std=256), [1.0])


def test_reference_helpers_validate():
    img = np.zeros((10, 20, 3))
    with pytest.raises(ValueError, match=r"input_height: expected a positive integer, got 0"):
        rescale(img, 0, 300)
    with pytest.raises(ValueError, match=r"expected an H x W x C array"):
        rescale(np.zeros(5), 300, 300)
    with pytest.raises(ValueError, match=r"expected an image of at least 30 x 6, got 10 x 20"):
        crop_center(img, 6, 30)
    with pytest.raises(ValueError, match="cropx: expected a positive integer, got -1"):
        crop_center(img, -1, 3)
    with pytest.raises(ValueError, match="non-zero std"):
        normalize(img, std=0)


# ---------------------------------------------------------------- prepare_input on every mode and source


def test_grayscale_equals_its_three_channel_copy(tmp_path):
    gray = skimage.data.camera()[:300, :420]
    from_gray = prepare_input(png_file(tmp_path, "gray.png", gray))
    from_rgb = prepare_input(png_file(tmp_path, "rgb.png", np.dstack([gray] * 3)))
    np.testing.assert_array_equal(from_gray, from_rgb)


def _modes(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    rgb = skimage.data.coffee()
    palette = Image.fromarray(rgb).convert("P")
    gray = skimage.data.camera()
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    return {
        "RGBA": png_file(tmp_path, "logo.png", skimage.data.logo()),
        "LA": png_file(tmp_path, "la.png", la),
        "P": png_file(tmp_path, "p.png", palette),
        "P+transparency": png_file(tmp_path, "pt.png", palette, transparency=3),
        "CMYK": png_file(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK")),
        "I;16": png_file(tmp_path, "deep.png", gray.astype(np.uint16) * 257),
    }


def test_every_mode_gives_a_valid_input(tmp_path):
    for mode, path in _modes(tmp_path).items():
        with Image.open(path) as im:
            # Pillow 10.1 (the floor) opens 16-bit PNGs as 32-bit "I", Pillow 13 as "I;16"
            assert im.mode == mode.split("+")[0] or (mode == "I;16" and im.mode == "I")
        out = prepare_input(path)
        assert out.shape == (300, 300, 3) and out.dtype == np.float64, mode
        assert out.min() >= -1.0 and out.max() <= 1.0, mode
    deep = prepare_input(tmp_path / "deep.png")
    np.testing.assert_allclose(deep, prepare_input(np.dstack([skimage.data.camera()] * 3)), atol=1e-12)


def test_every_source_gives_what_the_file_gives(tmp_path, http_server, chelsea):
    path = png_file(tmp_path, "cat.png", chelsea)
    data = path.read_bytes()
    expected = prepare_input(path)
    np.testing.assert_allclose(expected, reference(chelsea), atol=1e-9)
    sources = [
        str(path),
        http_server.add("/cat.png", data),
        data,
        io.BytesIO(data),
        Image.open(io.BytesIO(data)),
        chelsea,
        torch.from_numpy(chelsea.copy()).permute(2, 0, 1),
    ]
    for src in sources:
        np.testing.assert_array_equal(prepare_input(src), expected)
    float_tensor = torch.from_numpy(skimage.img_as_float(chelsea)).permute(2, 0, 1)
    np.testing.assert_allclose(prepare_input(float_tensor), expected, atol=1e-12)


# ---------------------------------------------------------------- the detection transform


def test_to_tensor_chw_shares_memory(chelsea):
    tensor = to_tensor_chw(chelsea)
    assert tensor.shape == (3, 300, 451) and tensor.dtype == torch.uint8
    assert tensor.data_ptr() == chelsea.__array_interface__["data"][0]  # a view, no copy
    assert torch.equal(tensor[1], torch.from_numpy(chelsea[:, :, 1]))
    gray = to_tensor_chw(skimage.data.camera())
    assert gray.shape == (3, 512, 512) and torch.equal(gray[0], gray[2])
    assert to_tensor_chw(skimage.img_as_float(chelsea)).dtype == torch.float32
    frozen = chelsea.copy()
    frozen.flags.writeable = False
    assert to_tensor_chw(frozen).shape == (3, 300, 451)
    assert torch.equal(to_tensor_chw(chelsea[:, ::-1]), to_tensor_chw(chelsea[:, ::-1].copy()))
    with pytest.raises(ValueError, match="H x W x 3"):
        to_tensor_chw(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(TypeError, match="int64"):
        to_tensor_chw(np.zeros((4, 5, 3), np.int64))


def test_preprocess_shapes_dtypes_and_layouts(chelsea):
    images = [to_tensor_chw(chelsea), to_tensor_chw(skimage.data.astronaut())]
    out = preprocess_for_detection(images, NVIDIA_INPUT)
    assert out.shape == (2, 3, 300, 300) and out.dtype == torch.float32 and out.is_contiguous()
    half = preprocess_for_detection(images, NVIDIA_INPUT, dtype=torch.float16, memory_format=torch.channels_last)
    assert half.dtype == torch.float16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half.float(), out, atol=2e-3, rtol=1e-3)
    small = preprocess_for_detection(images, NVIDIA_INPUT, size=64, device="cpu")
    assert small.shape == (2, 3, 64, 64)
    assert preprocess_for_detection([], NVIDIA_INPUT).shape == (0, 3, 300, 300)
    batch = torch.stack([images[0], images[0]])
    torch.testing.assert_close(preprocess_for_detection(batch, NVIDIA_INPUT),
                               preprocess_for_detection([images[0]] * 2, NVIDIA_INPUT))


def test_preprocess_uint8_and_float_agree(chelsea):
    as_uint8 = preprocess_for_detection([to_tensor_chw(chelsea)], NVIDIA_INPUT)
    as_float = preprocess_for_detection([to_tensor_chw(chelsea).float() / 255], NVIDIA_INPUT)
    # uint8 is resized as uint8 (PIL's rounding to whole levels), float in float: at most one level apart.
    level = 1 / 255 / min(IMAGENET_STD)
    assert (as_float - as_uint8).abs().max() <= level * 1.001


def test_preprocess_mixed_sizes_equal_one_by_one(chelsea):
    images = [to_tensor_chw(chelsea), to_tensor_chw(skimage.data.coffee()), to_tensor_chw(chelsea),
              to_tensor_chw(skimage.data.camera()), to_tensor_chw(chelsea).float() / 255]
    together = preprocess_for_detection(images, NVIDIA_INPUT)
    for i, image in enumerate(images):
        torch.testing.assert_close(together[i], preprocess_for_detection([image], NVIDIA_INPUT)[0], atol=0,
                                   rtol=0)


def test_preprocess_matches_torchvision_and_pil():
    from torchvision.transforms.v2 import functional as tvf

    for name in ["astronaut", "rocket"]:
        img = getattr(skimage.data, name)()
        ours = preprocess_for_detection([to_tensor_chw(img)], NVIDIA_INPUT)[0]
        # The uint8 image is resized as uint8, exactly as torchvision's transforms resize it.
        resized = tvf.resize(to_tensor_chw(img), [300, 300], antialias=True)
        tv = tvf.normalize(resized.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
        # NVIDIA evaluated with PIL's bilinear resize; ours reproduces it but for one grey level on a few pixels.
        pil = torch.from_numpy(np.array(Image.fromarray(img).resize((300, 300), Image.BILINEAR))).permute(2, 0, 1)
        levels = (ours * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
        diff = (levels - pil.float()).abs()
        assert diff.max() <= 1.001 and (diff > 0.5).float().mean() < 0.01
        # torchvision 0.29 resizes uint8 as ours does, exactly; torchvision 0.20 (the floor) rounds one grey level
        # differently on ~13% of the pixels (it is the one that strays from PIL; ours is the same under both).
        if ((resized.float() - pil.float()).abs() > 0.5).float().mean() < 0.01:
            torch.testing.assert_close(ours, tv, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(ours, tv, atol=1.001 / 255 / min(IMAGENET_STD), rtol=0)


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match=r"images\[1\]: expected a tensor of shape 3 x H x W"):
        preprocess_for_detection([torch.zeros(3, 4, 4), torch.zeros(4, 4, 3)], NVIDIA_INPUT)
    with pytest.raises(TypeError, match="int64"):
        preprocess_for_detection([torch.zeros(3, 4, 4, dtype=torch.int64)], NVIDIA_INPUT)
    with pytest.raises(TypeError, match="ndarray"):
        preprocess_for_detection([np.zeros((3, 4, 4))], NVIDIA_INPUT)
    with pytest.raises(ValueError, match="size"):
        preprocess_for_detection([torch.zeros(3, 4, 4)], NVIDIA_INPUT, size=0)


@cuda
def test_preprocess_on_cuda_matches_cpu(chelsea):
    images = [to_tensor_chw(chelsea), to_tensor_chw(skimage.data.coffee()), to_tensor_chw(chelsea)]
    cpu = preprocess_for_detection(images, NVIDIA_INPUT)
    gpu = preprocess_for_detection(images, NVIDIA_INPUT, device="cuda", memory_format=torch.channels_last)
    assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    on_device = preprocess_for_detection([t.cuda() for t in images], NVIDIA_INPUT)
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device.cpu(), cpu, atol=1e-4, rtol=0)


def test_load_rgb_of_prepare_input_source_is_consistent(tmp_path, chelsea):
    # prepare_input is seed_preprocess(load_rgb(...)): the two public entry points agree.
    path = png_file(tmp_path, "cat.png", chelsea)
    np.testing.assert_array_equal(prepare_input(path), seed_preprocess(load_rgb(path)))


# ---------------------------------------------------------------- the resize rules

# torchvision's two COCO SSDs feed GeneralizedRCNNTransform with these (torchvision/models/detection/ssd.py and
# ssdlite.py): pixels in [0, 1], (x - mean) / std, a fixed square size, no padding (size_divisible=1).
TORCHVISION_INPUTS = {
    "ssd300_vgg16": InputSpec(size=300, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255),
                              resize="torch_bilinear"),
    "ssdlite320": InputSpec(size=320, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="torch_bilinear"),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_INPUTS))
def test_torch_bilinear_is_torchvisions_generalized_rcnn_transform(name):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.transforms.functional import convert_image_dtype

    spec = TORCHVISION_INPUTS[name]
    size = spec.size
    theirs = GeneralizedRCNNTransform(size, size, list(spec.mean), list(spec.std), size_divisible=1,
                                      fixed_size=(size, size)).eval()
    images = [to_tensor_chw(skimage.data.astronaut()), to_tensor_chw(skimage.data.chelsea())]
    expected = theirs([convert_image_dtype(image, torch.float32) for image in images])[0].tensors
    assert expected.shape == (2, 3, size, size)
    # The same operations in the same order on the same float32 values: equal, not merely close.
    torch.testing.assert_close(preprocess_for_detection(images, spec), expected, rtol=0, atol=0)
    as_float = [convert_image_dtype(image, torch.float32) for image in images]
    torch.testing.assert_close(preprocess_for_detection(as_float, spec), expected, rtol=0, atol=0)


def test_torch_bilinear_has_no_uint8_form():
    spec = TORCHVISION_INPUTS["ssdlite320"]
    image = to_tensor_chw(skimage.data.chelsea())
    assert not transforms.has_uint8_resize(spec) and transforms.has_uint8_resize(NVIDIA_INPUT)
    with pytest.raises(ValueError, match="input_spec.resize: expected a rule with a lossless uint8 result"):
        transforms.resize_uint8(image, spec)
    # It resizes float pixels (uint8 as 0..255 floats): the values keep their scale.
    out = transforms.resize(image, 64, "torch_bilinear")
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64) and 0 <= float(out.min()) < float(out.max()) <= 255


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_antialias_exact_is_pil_and_fast_is_within_one_level(name):
    img = getattr(skimage.data, name)()
    pil = torch.from_numpy(np.array(Image.fromarray(img).resize((300, 300), Image.BILINEAR))).permute(2, 0, 1)
    exact = transforms.resize(to_tensor_chw(img), 300, "antialias", exact=True)
    assert exact.dtype == torch.uint8 and torch.equal(exact, pil)
    assert torch.equal(transforms.resize_uint8(to_tensor_chw(img), NVIDIA_INPUT, exact=True), pil)
    fast = transforms.resize(to_tensor_chw(img), 300, "antialias")
    assert fast.dtype == torch.uint8
    diff = (fast.int() - pil.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    # A batch is resized image by image; an image already at the size is returned as it is.
    batch = torch.stack([to_tensor_chw(img)] * 2)
    assert torch.equal(transforms.resize(batch, 300, "antialias", exact=True), torch.stack([pil, pil]))
    assert torch.equal(transforms.resize(pil, 300, "antialias", exact=True), pil)


def test_resize_and_normalize_refuse_bad_arguments():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="rule: expected one of 'antialias', 'bilinear', 'torch_bilinear', got 'ne"):
        transforms.resize(image, 4, "nearest")
    with pytest.raises(ValueError, match="size: expected a positive integer, got 0"):
        transforms.resize(image, 0, "bilinear")
    with pytest.raises(ValueError, match="exact: PIL's filter resizes 3-channel uint8 CPU images"):
        transforms.resize(image.float(), 4, "antialias", exact=True)
    with pytest.raises(ValueError, match="images: expected a 3 x H x W or N x 3 x H x W tensor"):
        transforms.normalize(torch.zeros(2, 8, 8), NVIDIA_INPUT)
    with pytest.raises(TypeError, match="int64"):
        transforms.normalize(torch.zeros(3, 8, 8, dtype=torch.int64), NVIDIA_INPUT)
    with pytest.raises(TypeError, match="input_spec: expected an InputSpec"):
        preprocess_for_detection([image], None)
    with pytest.raises(ValueError, match="InputSpec.resize: expected one of"):
        InputSpec(size=300, mean=(0, 0, 0), std=(1, 1, 1), resize="bicubic")


def test_normalize_is_the_specs_formula():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[:, None, :]  # every grey level, 3 x 1 x 256
    for spec in (NVIDIA_INPUT, MMDET_INPUT, TORCHVISION_INPUTS["ssd300_vgg16"]):
        mean = torch.tensor(spec.mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64).view(3, 1, 1)
        expected = (pixels.double() / 255 * spec.value_range - mean) / std
        # A few float32 roundings (2**-24 relative) of operands of at most 1 (x / 255, mean), scaled by 1 / std
        # (at most 255), plus the result's own rounding (values up to ~151): below 1e-4.
        for given in (pixels, pixels.float() / 255):
            torch.testing.assert_close(transforms.normalize(given, spec).double(), expected, rtol=0, atol=1e-4)
    # NVIDIA's training arithmetic, bit for bit: (x / 255 - mean) / std in float32.
    mean = torch.tensor(NVIDIA_INPUT.mean).view(3, 1, 1)
    std = torch.tensor(NVIDIA_INPUT.std).view(3, 1, 1)
    assert torch.equal(transforms.normalize(pixels, NVIDIA_INPUT), (pixels.float() / 255.0 - mean) / std)
