"""torch.hub entrypoints: NVIDIA's SSD300 (ResNet-50) COCO detector and its processing utilities, mmdetection's
SSD300, SSD512 and SSDLite, and torchvision's SSD300 and SSDLite. Each model entrypoint is
``ssd.registry.build_model`` for its name.

    model = torch.hub.load("OWNER/REPO", "nvidia_ssd", model_math="fp32")
    utils = torch.hub.load("OWNER/REPO", "nvidia_ssd_processing_utils")
"""

dependencies = ["torch", "torchvision", "numpy", "skimage", "scipy", "matplotlib", "requests", "tqdm", "PIL"]

import hashlib  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

_HERE = os.path.dirname(os.path.realpath(__file__))
_OWN_PACKAGES = ("ssd", "utils")
_DISTRIBUTION = "ssd-hub"  # pyproject.toml's project name: `pip install .` installs `ssd` under it
# torch.hub executes this file afresh on every load, so what must outlive one load (the lock, the loaded
# packages) lives in one module registered in sys.modules; dict.setdefault makes its creation atomic.
_STATE = sys.modules.setdefault("_ssd_hub_state", types.ModuleType("_ssd_hub_state"))
vars(_STATE).setdefault("lock", threading.RLock())
vars(_STATE).setdefault("loaded", {})


def _owned(name: str, packages: tuple[str, ...] = _OWN_PACKAGES) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _is_ours(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return os.path.realpath(path).startswith(_HERE + os.sep)


def _find_theirs(name: str):
    """Where the caller's ``name`` comes from: its module if imported, else its import spec (None if none)."""
    if name in sys.modules:
        module = sys.modules[name]
        return None if _is_ours(module) else module
    from importlib.machinery import PathFinder

    theirs = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]
    return PathFinder.find_spec(name, theirs)


def _caller_has_own(name: str) -> bool:
    """Whether the caller has a module ``name`` of its own, imported or importable from its sys.path."""
    return _find_theirs(name) is not None


def _package_folder(found) -> str | None:
    """The folder of the caller's package ``found`` (a module or an import spec), or None for a plain module."""
    locations = getattr(found, "submodule_search_locations", None)
    if locations is None:
        locations = getattr(found, "__path__", None)
    locations = list(locations or [])
    return os.path.realpath(locations[0]) if len(locations) == 1 else None


def _tree_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _our_version() -> str | None:
    with open(os.path.join(_HERE, "ssd", "__init__.py"), encoding="utf-8") as handle:
        match = re.search(r"^__version__ = [\"']([^\"']+)[\"']", handle.read(), flags=re.M)
    return match.group(1) if match else None


def _distribution_of(folder: str):
    """The installed distribution that owns the package in ``folder`` (its ``__init__.py``), or None."""
    from importlib import metadata

    site = os.path.dirname(folder)
    package = os.path.basename(folder)
    for dist in metadata.distributions(path=[site]):
        files = dist.files or []
        if any(str(f).replace(os.sep, "/") == f"{package}/__init__.py" for f in files):
            return dist
    return None


def _same_project(name: str) -> tuple[bool, bool]:
    """Whether the caller's importable ``name`` is this project: ``(same project, same release)``.

    The same release is the same distribution (``ssd-hub``) at our version, or the very same files (another
    checkout of this commit); another version of the distribution is this project at another release.
    """
    found = _find_theirs(name)
    folder = _package_folder(found) if found is not None else None
    if name != "ssd" or folder is None:
        return False, False
    dist = _distribution_of(folder)
    if dist is not None and (dist.metadata["Name"] or "").lower().replace("_", "-") == _DISTRIBUTION:
        return True, dist.version == _our_version()
    return (True, True) if _tree_digest(folder) == _tree_digest(os.path.join(_HERE, "ssd")) else (False, False)


def _import_all(names: tuple[str, ...]) -> dict:
    packages = {name: importlib.import_module(name) for name in names}
    for package in packages.values():
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):  # that one runs the command line
                importlib.import_module(info.name)
    return packages


def _import_installed(name: str):
    """The caller's ``name`` (this project, installed), imported as the caller would, all of it as ours would be:
    without our checkout, which torch.hub puts first on sys.path while it loads."""
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.getcwd()) != _HERE]
    try:
        return _import_all((name,))[name]
    finally:
        sys.path[:] = saved


def _load_beside_callers(private: tuple[str, ...]) -> dict:
    """Load ``private`` (some of ours) under private names (``_ssd_hub_<hash>.ssd``), leaving the caller's alone.

    Ours are imported with the caller's modules set aside, then renamed, module and class alike, so that pickle,
    ``torch.save(model)`` and lazy imports inside our code resolve to ours through sys.modules.
    """
    prefix = "_ssd_hub_" + hashlib.sha1(_HERE.encode()).hexdigest()[:12]
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _owned(k, private)]}
    sys.path.insert(0, _HERE)
    try:
        packages = _import_all(private)
    finally:
        sys.path.remove(_HERE)
        ours = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _owned(k, private)]}
        sys.modules.update(saved)
    root = sys.modules.get(prefix)
    if root is None:
        root = types.ModuleType(prefix)
        root.__path__ = []
        sys.modules[prefix] = root
    for old, module in ours.items():
        new = f"{prefix}.{old}"
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) == old and isinstance(value, (type, types.FunctionType)):
                value.__module__ = new
        module.__name__ = new
        module.__package__ = f"{prefix}.{module.__package__}" if module.__package__ else prefix
        if module.__spec__ is not None:
            module.__spec__.name = new
        sys.modules[new] = module
    return packages


# The installed release's error classes that a private copy's derive from (ssd/copies.py), by module and name.
_SHARED_ERRORS = ("io.http.DownloadError", "io.images.ImageLoadError", "io.images.ImageFetchError",
                  "weights.loader.InvalidCheckpointError", "weights.checkpoints.CheckpointUnavailableError",
                  "backends.base.BackendError")


def _installed_errors() -> dict:
    """The installed ``ssd``'s error classes named in _SHARED_ERRORS (those it has), imported without our
    checkout on sys.path."""
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.getcwd()) != _HERE]
    twins = {}
    try:
        for key in _SHARED_ERRORS:
            module, name = key.rsplit(".", 1)
            try:
                twin = getattr(importlib.import_module(f"ssd.{module}"), name, None)
            except Exception:  # noqa: BLE001 - a release without that module, or one that fails: nothing to share
                continue
            if isinstance(twin, type) and issubclass(twin, BaseException):
                twins[key] = twin
    finally:
        sys.path[:] = saved
    return twins


def _load_packages() -> dict:
    same_project, same_release = _same_project("ssd")
    packages = {}
    if same_release:
        # The importable ``ssd`` is this release (``pip install .`` of this project, or the same files): it is the
        # library, so hub models, ``import ssd`` and its functions and errors are one and the same.
        packages["ssd"] = _import_installed("ssd")
    private = tuple(p for p in _OWN_PACKAGES if p not in packages and _caller_has_own(p))
    if private:
        # This project at another release: our errors derive from its errors, named before ours are imported.
        _STATE.error_twins = _installed_errors() if same_project and "ssd" in private else {}
        try:
            packages.update(_load_beside_callers(private))
        finally:
            _STATE.error_twins = {}
    rest = tuple(p for p in _OWN_PACKAGES if p not in packages)
    if rest:
        # Appended even when torch.hub put the checkout first: it removes its own entry after the load.
        sys.path.append(_HERE)
        packages.update(_import_all(rest))
    return packages


def _package(name: str):
    """This repository's ``ssd`` or ``utils``, loaded once per process, like an import.

    Where the importable ``ssd`` is this same release (installed with pip, say), that one is used. Where the caller
    has no ``ssd`` or ``utils`` of its own, ours are imported under those names and the checkout stays on sys.path
    (at the end), so DataLoader workers and other processes can import them too. Otherwise they are loaded under
    private names beside the caller's; the library's functions accept models of either copy (recognised by their
    spec), and where the caller's ``ssd`` is this project at another release, our errors subclass its errors.
    """
    with _STATE.lock:
        packages = _STATE.loaded.get(_HERE)
        if packages is None:
            packages = _STATE.loaded[_HERE] = _load_packages()
    return packages[name]


def nvidia_ssd(pretrained: bool = True, model_math: str = "fp32", **kwargs):
    """SSD300 with a ResNet-50 backbone, trained on COCO by NVIDIA.

    Args:
        pretrained (bool): load NVIDIA's published COCO weights (default True); False gives the untrained model
            and downloads nothing.
        model_math (str): 'fp32' (default) or 'fp16'. fp16 converts the weights to half precision and keeps
            BatchNorm in float32; feed it ``x.half()`` on CUDA (on CPU it works but is ~100x slower).
        weights (str): which published checkpoint: 'fp32', 'fp16' or 'amp' (default: the one named by
            model_math; if its URLs fail, 'amp' is tried with a warning).
        checkpoint (str or Path): a local file, an http(s) URL or a file:// URL to load instead; the
            SSD_CHECKPOINT environment variable does the same (this argument wins). Training checkpoints and bare
            state dicts both work. See docs/troubleshooting-downloads.md for what each failure raises.
        force_download (bool): fetch the checkpoint again even if cached.
        progress (bool): show a download progress bar (default True).
        num_classes (int), class_names (list of str): fine-tune on other classes (num_classes counts the
            background): new classification heads, everything else from the checkpoint. A checkpoint written by
            ``ssd train`` brings its own classes.

    Returns:
        An ``SSD300`` module in eval mode. ``model(x)`` with x of shape N x 3 x 300 x 300 returns
        ``(locs, confs)``: N x 4 x 8732 box offsets and N x 81 x 8732 class logits. ``model.detect(images)``
        returns one ``Detections`` per image with boxes in original pixels.

    Checkpoints are cached in ``torch.hub.get_dir()/checkpoints``: published ones under their file names, URL
    downloads under ``url-<hash of the URL>-<file name>``.

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "nvidia_ssd", model_math="fp32")
        >>> detections = model.detect("photo.jpg")
        >>> print(detections[0])
    """
    return _package("ssd").registry.build_model("nvidia_ssd", pretrained, model_math=model_math, **kwargs)


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
        >>> utils = torch.hub.load("OWNER/REPO", "nvidia_ssd_processing_utils")
        >>> tensor = utils.prepare_tensor([utils.prepare_input("photo.jpg")])
        >>> results = utils.decode_results(model(tensor))
        >>> best = [utils.pick_best(r, 0.40) for r in results]
    """
    return _package("utils").Processing()


def ssd300_vgg16(pretrained: bool = True, **kwargs):
    """SSD300 with a VGG16 backbone, trained on COCO by mmdetection (box AP 25.5 on COCO val2017; 300 x 300 input).

    Args:
        pretrained (bool): load mmdetection's published checkpoint (default True; sha256-checked, cached with
            the other checkpoints); False gives the untrained model.
        checkpoint (str or Path): a local file, an http(s) URL or a file:// URL to load instead: an
            mmdetection-format ``.pth`` (its meta's class names become the model's) or a checkpoint written by
            ``ssd train`` for this model; the SSD_CHECKPOINT environment variable does the same (this argument wins).
        force_download (bool): fetch the checkpoint again even if cached.
        progress (bool): show a download progress bar (default True).
        num_classes (int), class_names (list of str): other classes (num_classes counts the background), for
            fine-tuning: new classification heads, everything else from the checkpoint.
        model_math (str) or half (bool): 'fp16' / True converts the weights to half precision, BatchNorm kept in
            float32 (for CUDA).

    Returns:
        A module in eval mode: ``model(x)`` (x: N x 3 x 300 x 300, RGB minus mean [123.675, 116.28, 103.53])
        returns ``(locs N x 4 x 8732, confs N x 81 x 8732)``, background at index 0; ``model.detect(images)``
        applies mmdetection's test recipe (score > 0.02, NMS 0.45, 200 per image).

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "ssd300_vgg16")
        >>> print(model.detect("photo.jpg", threshold=0.4)[0])
    """
    return _package("ssd").registry.build_model("ssd300_vgg16", pretrained, **kwargs)


def ssd512_vgg16(pretrained: bool = True, **kwargs):
    """SSD512 with a VGG16 backbone, trained on COCO by mmdetection (box AP 29.5 on COCO val2017; 512 x 512 input).

    Arguments as ``ssd300_vgg16``. ``model(x)`` (x: N x 3 x 512 x 512) returns ``(locs N x 4 x 24564,
    confs N x 81 x 24564)``, background at index 0.

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "ssd512_vgg16")
        >>> print(model.detect("photo.jpg", threshold=0.4)[0])
    """
    return _package("ssd").registry.build_model("ssd512_vgg16", pretrained, **kwargs)


def ssdlite320_mobilenet_v2(pretrained: bool = True, **kwargs):
    """SSDLite with a MobileNetV2 backbone, trained on COCO by mmdetection (box AP 21.3; 320 x 320 input).

    Arguments as ``ssd300_vgg16``. ``model(x)`` (x: N x 3 x 320 x 320, (RGB - mean) / [58.395, 57.12, 57.375])
    returns ``(locs N x 4 x 3234, confs N x 81 x 3234)``, background at index 0.

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "ssdlite320_mobilenet_v2")
        >>> print(model.detect("photo.jpg", threshold=0.4)[0])
    """
    return _package("ssd").registry.build_model("ssdlite320_mobilenet_v2", pretrained, **kwargs)


def tv_ssd300_vgg16(pretrained: bool = True, **kwargs):
    """torchvision's SSD300 with a VGG16 backbone, trained on COCO (box AP 25.1 on COCO val2017; 300 x 300 input).

    Arguments as ``ssd300_vgg16``; ``checkpoint=`` takes a torchvision state dict (``torch.save(model.state_dict())``
    of ``torchvision.models.detection.ssd300_vgg16``, or torchvision's published file) or an ``ssd train`` checkpoint
    of this model.

    Returns:
        A module in eval mode: ``model(x)`` (x: N x 3 x 300 x 300, RGB in 0..255 minus torchvision's mean,
        about [123, 117, 104]) returns ``(locs N x 4 x 8732, confs N x 91 x 8732)``, background at index 0 and label
        k = COCO category id k (the ten unused ids are named "N/A-<id>"); ``model.detect(images)`` applies
        torchvision's recipe (NMS 0.45, 400 candidates per class) with scores above 0.4.

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "tv_ssd300_vgg16")
        >>> print(model.detect("photo.jpg")[0])
    """
    return _package("ssd").registry.build_model("tv_ssd300_vgg16", pretrained, **kwargs)


def tv_ssdlite320_mobilenet_v3_large(pretrained: bool = True, **kwargs):
    """torchvision's SSDLite320 with a MobileNetV3-Large backbone, trained on COCO (box AP 21.3; 320 x 320 input).

    Arguments as ``tv_ssd300_vgg16``. ``model(x)`` (x: N x 3 x 320 x 320, RGB in [0, 1] mapped to [-1, 1]) returns
    ``(locs N x 4 x 3234, confs N x 91 x 3234)``; ``model.detect(images)`` applies torchvision's recipe (NMS 0.55,
    300 candidates per class) with scores above 0.4.

    Example:
        >>> model = torch.hub.load("OWNER/REPO", "tv_ssdlite320_mobilenet_v3_large")
        >>> print(model.detect("photo.jpg")[0])
    """
    return _package("ssd").registry.build_model("tv_ssdlite320_mobilenet_v3_large", pretrained, **kwargs)
