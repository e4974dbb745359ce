"""Seed-compatible processing helpers (NVIDIA's ``nvidia_ssd_processing_utils``), a thin facade over ``ssd``."""
from .processing import (  # noqa: F401
    Processing,
    crop_center,
    decode_results,
    get_coco_object_dictionary,
    load_image,
    normalize,
    pick_best,
    prepare_input,
    prepare_tensor,
    rescale,
)
