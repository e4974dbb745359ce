"""The 80 COCO categories the model predicts, shipped here so nothing is downloaded to name a detection.

Model label ``k`` (1..80) is ``COCO_NAMES[k - 1]``, whose official COCO category id is ``COCO_CATEGORY_IDS[k - 1]``
(ids run 1..90 with gaps, which is what COCO-style results files and evaluation expect).
"""
from __future__ import annotations

COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

NUM_CLASSES = len(COCO_NAMES) + 1  # what the model scores: label 0 is background, 1..80 the COCO categories


def label_name(label: int) -> str:
    """The COCO name of model label ``label`` (1..80)."""
    if not 1 <= int(label) <= len(COCO_NAMES):
        raise ValueError(f"label: expected an integer in 1..{len(COCO_NAMES)}, got {label!r}")
    return COCO_NAMES[int(label) - 1]


def category_id(label: int) -> int:
    """The official COCO category id (1..90, with gaps) of model label ``label`` (1..80)."""
    if not 1 <= int(label) <= len(COCO_CATEGORY_IDS):
        raise ValueError(f"label: expected an integer in 1..{len(COCO_CATEGORY_IDS)}, got {label!r}")
    return COCO_CATEGORY_IDS[int(label) - 1]
