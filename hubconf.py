"""torch.hub entrypoints for NVIDIA's SSD300 (ResNet-50) COCO detector and its processing utilities.

    model = torch.hub.load("<owner>/<repo>", "nvidia_ssd", model_math="fp32")
    utils = torch.hub.load("<owner>/<repo>", "nvidia_ssd_processing_utils")
"""

dependencies = ["torch", "torchvision", "numpy", "skimage", "scipy", "matplotlib", "requests", "tqdm", "PIL"]

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_OWN_PACKAGES = ("ssd", "utils")
_loaded: dict = {}


def _owned(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OWN_PACKAGES)


def _package(name: str):
    """Import this repository's ``ssd`` or ``utils`` without disturbing the caller's modules of the same names.

    torch.hub imports this file with the repository on sys.path, so a plain ``import ssd`` would either pick
    up a module the caller already imported or leave ours in sys.modules to shadow theirs afterwards. Ours are
    imported with the caller's set aside, then the caller's are put back; our modules bind each other at import
    time and keep working.
    """
    if not _loaded:
        saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _owned(k)]}
        sys.path.insert(0, _HERE)
        try:
            for package in _OWN_PACKAGES:
                _loaded[package] = importlib.import_module(package)
        finally:
            sys.path.remove(_HERE)
            for key in [k for k in sys.modules if _owned(k)]:
                del sys.modules[key]
            sys.modules.update(saved)
    return _loaded[name]


def nvidia_ssd(pretrained: bool = True, model_math: str = "fp32", **kwargs):
    """SSD300 with a ResNet-50 backbone, trained on COCO by NVIDIA.

    Args:
        pretrained (bool): load NVIDIA's published COCO weights (default True); False gives the untrained model
            and downloads nothing.
        model_math (str): 'fp32' (default) or 'fp16'. fp16 converts the weights to half precision and keeps
            BatchNorm in float32; feed it ``x.half()`` on CUDA (on CPU it works but is ~100x slower).
        weights (str): which published checkpoint: 'fp32', 'fp16' or 'amp' (default: the one named by
            model_math; if its URLs fail, 'amp' is tried with a warning).
        checkpoint (str or Path): a local file or URL to load instead; the SSD_CHECKPOINT environment variable
            does the same (this argument wins). Training checkpoints and bare state dicts both work.
        force_download (bool): fetch the checkpoint again even if cached (``force_reload`` is accepted too).
        progress (bool): show a download progress bar (default True).

    Returns:
        An ``SSD300`` module in eval mode. ``model(x)`` with x of shape N x 3 x 300 x 300 returns
        ``(locs, confs)``: N x 4 x 8732 box offsets and N x 81 x 8732 class logits. ``model.detect(images)``
        returns one ``Detections`` per image with boxes in original pixels.

    Checkpoints are cached in ``torch.hub.get_dir()/checkpoints``.

    Example:
        >>> model = torch.hub.load("<owner>/<repo>", "nvidia_ssd", model_math="fp32")
        >>> detections = model.detect("photo.jpg")
        >>> print(detections[0])
    """
    # torch.hub.load consumes force_reload itself; accept it too when this function is called directly.
    force_download, force_reload = kwargs.pop("force_download", False), kwargs.pop("force_reload", False)
    force_download = force_download or force_reload
    options = {k: kwargs.pop(k) for k in ("weights", "checkpoint", "progress") if k in kwargs}
    if kwargs:
        raise TypeError(
            f"nvidia_ssd: unexpected keyword argument(s) {sorted(kwargs)}; expected pretrained, model_math, "
            "weights, checkpoint, force_download, progress"
        )
    return _package("ssd").builder.build_ssd300(pretrained, model_math, force_download=force_download, **options)


def nvidia_ssd_processing_utils():
    """The helpers of NVIDIA's SSD notebook, without their defects (CPU support, grayscale fix, no downloads).

    Returns:
        An object with ``load_image(path_or_url)``, ``rescale(img, h, w)``, ``crop_center(img, cx, cy)``,
        ``normalize(img, mean=128, std=128)``, ``prepare_input(path_or_url)`` (300 x 300 x 3 float array in
        [-1, 1]), ``prepare_tensor(inputs, fp16=False, device=None)`` (N x 3 x 300 x 300 tensor, on CUDA when
        available), ``decode_results(predictions, criteria=0.5, max_output=20)`` (per image ``[boxes, labels,
        scores]``, boxes relative ltrb, ascending scores), ``pick_best(detections, threshold=0.3)`` and
        ``get_coco_object_dictionary()`` (the 80 COCO names).

    Example:
        >>> utils = torch.hub.load("<owner>/<repo>", "nvidia_ssd_processing_utils")
        >>> tensor = utils.prepare_tensor([utils.prepare_input("photo.jpg")])
        >>> results = utils.decode_results(model(tensor))
        >>> best = [utils.pick_best(r, 0.40) for r in results]
    """
    return _package("utils").Processing()
