"""SSD training augmentation: NVIDIA's recipe (random IoU-constrained crop, horizontal flip, resize, colour jitter,
normalise) by default, a light one, or none; with SSD's zoom-out and scale jitter as options.

Recipes (``augment``): ``"nvidia"`` (the steps below; ``True`` means it), ``"light"`` (steps 2 to 5: flip and colour
jitter, no crop, for data whose framing matters), ``"none"`` (steps 3 and 5: the evaluation path; ``False`` means
it). Options, for any recipe but ``"none"``: ``zoom_out`` (torchvision's ``v2.RandomZoomOut``, as SSD's paper
expands: half of the time the image is placed on a canvas 1 to 4 times its sides, filled with the model's mean colour,
before the crop) and ``scale_jitter`` (``v2.ScaleJitter`` to 0.5..1.5 of the input size, keeping the aspect ratio,
then ``v2.RandomCrop`` to the input size, padded with the mean colour where the image is smaller; after the flip).
These two draw from torch's global generator (the DataLoader seeds it in every worker), not from ``generator``.

The steps and their parameters follow NVIDIA's ``SSDTransformer`` (DeepLearningExamples, PyTorch/Detection/SSD):

1. SSD random crop, sampled as NVIDIA's ``SSDCropping`` samples it: draw one of the seven options uniformly (keep
   the whole image; a patch whose IoU with every box is above 0.1, 0.3, 0.5, 0.7 or 0.9; any patch), then try
   ``max_trials`` patches (NVIDIA: one) of relative width and height drawn uniformly in [0.3, 1], rejected unless
   0.5 <= w / h <= 2, with left and top drawn uniformly in [0, 1 - w] and [0, 1 - h]. A patch is accepted when its
   IoU with every box is above the option's minimum and at least one box centre lies strictly inside it; boxes
   whose centre is outside are dropped, the others are clipped to the patch. When no patch is accepted, the option
   is drawn again, so a call ends only on an accepted patch or on the keep-the-image option: the distribution of
   outcomes is NVIDIA's (tested against counts made with NVIDIA's own code).
   Images without boxes are never cropped (no patch can satisfy the centre rule, so NVIDIA's loop can only end
   on the keep-the-image option). Option sets without that option (``crop_min_ious=(0.9,)``) stop after
   :data:`MAX_CROP_ROUNDS` draws and keep the whole image, so an impossible option cannot loop forever.
2. Horizontal flip with probability 0.5.
3. Resize to the model's input size with its resize rule (:func:`ssd.transforms.resize`, the fast variant; for
   NVIDIA's spec the antialiased bilinear resize of uint8 pixels that matches PIL's, which NVIDIA uses).
4. Colour jitter: brightness 0.125, contrast 0.5, saturation 0.5, hue 0.05, applied in a random order.
5. Normalise as the model's spec says (:func:`ssd.transforms.normalize`; NVIDIA: [0, 1], ImageNet mean and std).

Everything about the input comes from the ``InputSpec`` given (``model.spec.input``): size, resize rule, value
range, mean and std. Rules with whole grey levels (``"antialias"``, ``"bilinear"``) jitter the resized uint8 pixels,
as NVIDIA does; ``"torch_bilinear"`` jitters float pixels in [0, 1] before resizing, then normalises and resizes as
``detect`` does (without jitter the output is ``preprocess_for_detection``'s, exactly).

Where torchvision.transforms.v2 is exact, it does the work: the crop, flip and colour adjustments are v2's
functionals (``TF.crop``, ``TF.horizontal_flip``, ``TF.adjust_*``) on ``tv_tensors``. Its random transforms are not
NVIDIA's, so the draws stay ours: ``v2.RandomIoUCrop`` samples differently (up to 40 trials per option, a fresh
option only when all fail, scale and aspect drawn per trial, the centre rule applied after the IoU test), which
changes the distribution of crops that tests/test_training_crop.py checks against NVIDIA's own code;
``v2.RandomPhotometricDistort`` is the SSD paper's distortion (each change with probability 0.5, a channel
shuffle), not NVIDIA's ``ColorJitter`` (all four changes, in a random order); ``v2.RandomHorizontalFlip`` and
``v2.ColorJitter`` are the same operations but draw from the global generator, and ``generator`` must reproduce a
run; ``v2.SanitizeBoundingBoxes`` drops boxes under one pixel of the output, where NVIDIA keeps every box with an
area (see the end of ``__call__``).

The patch is sampled in relative coordinates, as NVIDIA does, and then rounded to whole pixels; boxes are cropped
with the rounded window so that they stay aligned with the pixels actually kept. Every random draw goes through
``torch`` (the given ``torch.Generator``, or the global RNG when None), so a seeded generator reproduces a run.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..boxes import box_iou
from ..models.spec import InputSpec
from ..transforms import normalize, resize

__all__ = ["CROP_MIN_IOUS", "MAX_CROP_ROUNDS", "RECIPES", "SCALE_JITTER_RANGE", "ZOOM_OUT_SIDES", "SSDAugmentation",
           "recipe_name"]

RECIPES = ("nvidia", "light", "none")
# SSD's zoom-out: the canvas is 1 to 4 times the image's sides (the paper's "expansion" up to 16x the area).
ZOOM_OUT_SIDES = (1.0, 4.0)
# Scale jitter: the image scaled to this range of the input size (aspect ratio kept) before a crop or pad to it.
SCALE_JITTER_RANGE = (0.5, 1.5)

# None: keep the whole image; -inf: any patch (NVIDIA's (None, None) option); the rest: minimum IoU with every box.
CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)
# Option draws after which the whole image is kept. With the keep-the-image option among seven, a call needs more
# than this many draws with probability (6/7) ** 1000 < 1e-66: it only bounds option sets that lack that option.
MAX_CROP_ROUNDS = 1000


def recipe_name(augment: object) -> str:
    """The recipe ``augment`` names: True -> "nvidia", False -> "none", or one of :data:`RECIPES`."""
    if augment is True:
        return "nvidia"
    if augment is False:
        return "none"
    if isinstance(augment, str) and augment in RECIPES:
        return augment
    raise ValueError(f"augment: expected one of {', '.join(map(repr, RECIPES))} (or True/False), got {augment!r}")


def _to_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected an H x W x 3 uint8 array, got {image.dtype} {tuple(image.shape)}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a 3 x H x W uint8 tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    raise TypeError(f"image: expected a numpy array or torch.Tensor, got {type(image).__name__}")


def _check_targets(boxes: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    box_tensor = torch.as_tensor(boxes) if isinstance(boxes, (np.ndarray, torch.Tensor)) else None
    if box_tensor is None:
        raise TypeError(f"boxes: expected a torch.Tensor or numpy array, got {type(boxes).__name__}")
    if box_tensor.numel() == 0:
        box_tensor = box_tensor.reshape(0, 4)
    if box_tensor.ndim != 2 or box_tensor.shape[1] != 4:
        raise ValueError(f"boxes: expected shape (n, 4) in pixels ltrb, got {tuple(box_tensor.shape)}")
    box_tensor = box_tensor.to(torch.float32)
    if not bool(torch.isfinite(box_tensor).all()):
        raise ValueError("boxes: expected finite coordinates, got NaN or infinity")
    label_tensor = torch.as_tensor(labels) if isinstance(labels, (np.ndarray, torch.Tensor)) else None
    if label_tensor is None:
        raise TypeError(f"labels: expected a torch.Tensor or numpy array, got {type(labels).__name__}")
    if label_tensor.dtype.is_floating_point or label_tensor.shape != (box_tensor.shape[0],):
        got = f"{label_tensor.dtype} {tuple(label_tensor.shape)}"
        raise ValueError(f"labels: expected {box_tensor.shape[0]} integer labels, got {got}")
    return box_tensor, label_tensor.to(torch.int64)


class SSDAugmentation:
    """Callable ``(image, boxes, labels) -> (image, boxes, labels)`` for SSD training.

    Args:
        input_spec: the model's input (``model.spec.input``): output size, resize rule and normalisation.
        augment: the recipe: "nvidia" (True), "light" or "none" (False: the evaluation path, resize and normalise
            only); see the module docstring.
        generator: source of randomness; the global torch RNG when None.
        max_trials: patches tried per option draw before the option is drawn again (NVIDIA's: 1).
        crop_min_ious: the crop options (see :data:`CROP_MIN_IOUS`); ``(None,)`` disables cropping.
        flip_p: probability of the horizontal flip.
        color_jitter: False leaves colours alone (geometry-only augmentation).
        zoom_out: add SSD's zoom-out (``v2.RandomZoomOut``) before the crop.
        scale_jitter: add scale jitter (``v2.ScaleJitter`` and ``v2.RandomCrop``) after the flip.

    Call with ``image`` as an H x W x 3 uint8 numpy array or a 3 x H x W uint8 tensor, ``boxes`` an n x 4 array or
    tensor of ltrb pixel coordinates and ``labels`` n integers. Returns a 3 x S x S float32 tensor normalised as
    ``input_spec`` says, the kept boxes as ltrb relative to the output (0..1, float32) and
    their labels (int64).
    """

    def __init__(
        self,
        input_spec: InputSpec,
        augment: bool | str = True,
        generator: torch.Generator | None = None,
        max_trials: int = 1,
        crop_min_ious: tuple[float | None, ...] = CROP_MIN_IOUS,
        flip_p: float = 0.5,
        color_jitter: bool = True,
        zoom_out: bool = False,
        scale_jitter: bool = False,
    ) -> None:
        if not isinstance(input_spec, InputSpec):
            raise TypeError(f"input_spec: expected an InputSpec (model.spec.input), got {type(input_spec).__name__}")
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
            raise ValueError(f"max_trials: expected a positive int, got {max_trials!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if not crop_min_ious:
            raise ValueError("crop_min_ious: expected at least one option, got none")
        if isinstance(flip_p, bool) or not isinstance(flip_p, (int, float)) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1], got {flip_p!r}")
        self.input_spec = input_spec
        self.size = input_spec.size
        self.recipe = recipe_name(augment)
        self.augment = self.recipe != "none"
        self.crop = self.recipe == "nvidia"
        # The mean colour in 0..255 (the spec's mean is in its value range), the fill of zoom-out and padding.
        fill = [round(min(255.0, max(0.0, m * 255 / input_spec.value_range))) for m in input_spec.mean]
        self.zoom_out = None
        if zoom_out and self.augment:
            self.zoom_out = v2.RandomZoomOut(fill=fill, side_range=ZOOM_OUT_SIDES, p=0.5)
        self.scale_jitter = None
        if scale_jitter and self.augment:
            self.scale_jitter = v2.Compose([
                v2.ScaleJitter((self.size, self.size), scale_range=SCALE_JITTER_RANGE, antialias=True),
                v2.RandomCrop((self.size, self.size), pad_if_needed=True, fill=fill),
            ])
        self.generator = generator
        self.max_trials = max_trials
        self.crop_min_ious = tuple(crop_min_ious)
        self.brightness = 0.125
        self.contrast = 0.5
        self.saturation = 0.5
        self.hue = 0.05
        self.flip_p = float(flip_p)
        self.color_jitter = bool(color_jitter)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _sample_crop(self, boxes_rel: torch.Tensor) -> tuple[int, tuple[float, float, float, float] | None] | None:
        """The option that ended the sampling and its relative (left, top, right, bottom) patch (None: the
        keep-the-image option); None when the image is kept without drawing (no boxes, or no option succeeded
        within :data:`MAX_CROP_ROUNDS` draws)."""
        if boxes_rel.shape[0] == 0:
            return None
        centres = 0.5 * (boxes_rel[:, :2] + boxes_rel[:, 2:])
        for _ in range(MAX_CROP_ROUNDS):
            option = int(torch.randint(len(self.crop_min_ious), (), generator=self.generator))
            min_iou = self.crop_min_ious[option]
            if min_iou is None:
                return option, None
            for _ in range(self.max_trials):
                w = self._uniform(0.3, 1.0)
                h = self._uniform(0.3, 1.0)
                if not 0.5 <= w / h <= 2.0:
                    continue
                left = self._uniform(0.0, 1.0 - w)
                top = self._uniform(0.0, 1.0 - h)
                patch = (left, top, left + w, top + h)
                ious = box_iou(boxes_rel, torch.tensor([patch]))
                if not bool((ious > min_iou).all()):
                    continue
                inside = (
                    (centres[:, 0] > patch[0]) & (centres[:, 0] < patch[2])
                    & (centres[:, 1] > patch[1]) & (centres[:, 1] < patch[3])
                )
                if bool(inside.any()):
                    return option, patch
        return None

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        # ColorJitter's semantics with our own draws, so that the generator controls them too.
        factors = {
            "brightness": self._uniform(1 - self.brightness, 1 + self.brightness),
            "contrast": self._uniform(1 - self.contrast, 1 + self.contrast),
            "saturation": self._uniform(1 - self.saturation, 1 + self.saturation),
            "hue": self._uniform(-self.hue, self.hue),
        }
        adjust = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        names = list(factors)
        for index in torch.randperm(4, generator=self.generator).tolist():
            name = names[index]
            image = adjust[name](image, factors[name])
        return image

    def __call__(
        self, image: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = _to_chw_uint8(image)
        height, width = int(img.shape[1]), int(img.shape[2])
        box_tensor, label_tensor = _check_targets(boxes, labels)
        bboxes = tv_tensors.BoundingBoxes(box_tensor, format="XYXY", canvas_size=(height, width))

        if self.zoom_out is not None:
            img, bboxes = self.zoom_out(img, bboxes)
            height, width = int(img.shape[1]), int(img.shape[2])
            box_tensor = bboxes.as_subclass(torch.Tensor)
        if self.augment:
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            sampled = self._sample_crop(box_tensor / scale) if self.crop else None
            patch = sampled[1] if sampled is not None else None
            if patch is not None:
                centres = 0.5 * (box_tensor[:, :2] + box_tensor[:, 2:]) / scale[:2]
                keep = (
                    (centres[:, 0] > patch[0]) & (centres[:, 0] < patch[2])
                    & (centres[:, 1] > patch[1]) & (centres[:, 1] < patch[3])
                )
                left, top = int(patch[0] * width), int(patch[1] * height)
                right, bottom = int(patch[2] * width), int(patch[3] * height)
                # Rounding can shrink a thin patch to nothing; keep at least one pixel.
                right, bottom = max(right, left + 1), max(bottom, top + 1)
                crop = {"top": top, "left": left, "height": bottom - top, "width": right - left}
                img = TF.crop(img, **crop)
                kept = tv_tensors.wrap(bboxes[keep], like=bboxes)
                bboxes = TF.crop(kept, **crop)
                label_tensor = label_tensor[keep]
            if float(torch.rand((), generator=self.generator)) < self.flip_p:
                img = TF.horizontal_flip(img)
                bboxes = TF.horizontal_flip(bboxes)
            if self.scale_jitter is not None:
                img, bboxes = self.scale_jitter(img, bboxes)

        crop_h, crop_w = int(img.shape[1]), int(img.shape[2])
        jitter = self.augment and self.color_jitter
        if self.input_spec.resize == "torch_bilinear":
            # A float rule: jitter the [0, 1] pixels (before resizing, as torchvision's recipe distorts colours
            # first), then normalise and resize exactly as detect does.
            img = img.float() / 255
            if jitter:
                img = self._jitter(img)
            out = resize(normalize(img, self.input_spec), self.size, "torch_bilinear")
        else:
            img = resize(img, self.size, self.input_spec.resize)
            if img.dtype != torch.uint8:
                # A CUDA image: torch has no uint8 antialiased kernel there. Jitter whole levels, as on the CPU.
                img = img.round_().clamp_(0, 255).to(torch.uint8)
            if jitter:
                img = self._jitter(img)
            out = normalize(img, self.input_spec)

        # Relative to the (cropped) canvas: resizing does not change relative coordinates. Clamp because a
        # box may stick out of the original image; the crop already clipped the ones it kept.
        relative = bboxes.as_subclass(torch.Tensor) / torch.tensor([crop_w, crop_h, crop_w, crop_h])
        relative = relative.clamp(0.0, 1.0).to(torch.float32)
        # A box wholly outside the image, or cut to a sliver by the pixel rounding of the patch, has no area left;
        # the encoder rejects such boxes, so they go (with their labels).
        nonempty = (relative[:, 2] > relative[:, 0]) & (relative[:, 3] > relative[:, 1])
        return out.contiguous(), relative[nonempty], label_tensor[nonempty]
