"""The torch.hub entrypoints, loaded as torch.hub loads them, and the caller's modules left alone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import REPO


def run_python(code: str, cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_local_load_untrained(hub_dir):
    model = torch.hub.load(str(REPO), "nvidia_ssd", source="local", pretrained=False)
    assert type(model).__name__ == "SSD300" and not model.training
    assert not (hub_dir / "checkpoints").exists()


def test_help_shows_arguments_outputs_and_example():
    # torch.hub.help(repo, name) returns the entrypoint's docstring; it takes GitHub repositories only, so
    # read the same docstring from the local hubconf.
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    text = hubconf.nvidia_ssd.__doc__
    for part in ("model_math", "weights", "checkpoint", "SSD_CHECKPOINT", "force_download", "N x 4 x 8732",
                 "N x 81 x 8732", "Example"):
        assert part in text
    assert "decode_results" in hubconf.nvidia_ssd_processing_utils.__doc__
    public = {name for name in vars(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    # what torch.hub.list would show
    assert public == {"nvidia_ssd", "nvidia_ssd_processing_utils", "ssd300_vgg16", "ssd512_vgg16",
                      "ssdlite320_mobilenet_v2", "tv_ssd300_vgg16", "tv_ssdlite320_mobilenet_v3_large"}
    for name, accuracy, size in (("ssd300_vgg16", "25.5", "300 x 300"), ("ssd512_vgg16", "29.5", "512 x 512"),
                                 ("ssdlite320_mobilenet_v2", "21.3", "320 x 320")):
        text = getattr(hubconf, name).__doc__
        assert accuracy in text and size in text and "Example" in text
    assert "num_classes" in hubconf.ssd300_vgg16.__doc__


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument.*'pretrainde'"):
        torch.hub.load(str(REPO), "nvidia_ssd", source="local", pretrainde=False)


def test_importing_hubconf_does_no_work(tmp_path):
    code = f"""
        import importlib.util, os, sys, torch
        torch.hub.set_dir({str(tmp_path / 'hub')!r})
        spec = importlib.util.spec_from_file_location("hubconf", {str(REPO / 'hubconf.py')!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        wrote = os.path.exists(torch.hub.get_dir())
        print(module.dependencies[:2], 'ssd' in sys.modules, 'utils' in sys.modules, wrote)
    """
    done = run_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("]", 1)[1].split() == ["False", "False", "False"]


CALLER_MODULES = {
    "ssd.py": "WHO = 'caller ssd'\n",
    "utils.py": "WHO = 'caller utils'\n",
}


@pytest.mark.parametrize("imported_first", [True, False])
def test_callers_own_ssd_and_utils_survive(tmp_path, imported_first):
    """The caller has its own top-level ``ssd`` and ``utils``; loading ours must neither use nor replace them."""
    for name, text in CALLER_MODULES.items():
        (tmp_path / name).write_text(text)
    pre = "import ssd, utils\nbefore = (ssd, utils)\n" if imported_first else ""
    code = f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(tmp_path)!r})
        {pre.replace(chr(10), chr(10) + ' ' * 8)}
        model = torch.hub.load({str(REPO)!r}, "nvidia_ssd", source="local", pretrained=False)
        helpers = torch.hub.load({str(REPO)!r}, "nvidia_ssd_processing_utils", source="local")
        import ssd, utils
        print(ssd.WHO, "|", utils.WHO)
        {"assert (ssd, utils) == before" if imported_first else ""}
        # Our objects keep working after the caller's modules are back in place.
        from skimage import data
        found = model.detect(data.chelsea())
        x = helpers.prepare_tensor([helpers.prepare_input(np.asarray(data.chelsea()))], device="cpu")
        results = helpers.decode_results(model(x))
        print(type(found[0]).__name__, len(results), len(helpers.get_coco_object_dictionary()))
    """
    done = run_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "caller ssd | caller utils"
    assert lines[1] == "Detections 1 80"


def test_hub_load_with_checkpoint_from_environment(tmp_path, hub_dir, monkeypatch, forward_golden):
    from helpers import forward_error
    from helpers.checkpoints import save_training_checkpoint

    monkeypatch.setenv("SSD_CHECKPOINT", str(save_training_checkpoint(tmp_path / "ckpt.pt", distributed=True)))
    model = torch.hub.load(str(REPO), "nvidia_ssd", source="local", model_math="fp32")
    assert forward_error(model, forward_golden) < 1e-4


IMPORT_LIKE = """
    import io, pickle, sys, threading, numpy as np, torch
    {prelude}
    repo = {repo!r}
    first = torch.hub.load(repo, "nvidia_ssd", source="local", pretrained=False)
    second = torch.hub.load(repo, "nvidia_ssd", source="local", pretrained=False)
    assert type(first) is type(second), "loading twice gave two classes"

    # torch.save of the whole module, then torch.load(weights_only=False), in this process.
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again) is type(first)
    x = torch.rand(1, 3, 300, 300)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(first(x), again(x)))

    # Detections and the processing utils pickle.
    found = first.detect(np.zeros((40, 60, 3), np.uint8), threshold=0.0, max_detections=3)[0]
    assert repr(pickle.loads(pickle.dumps(found))) == repr(found)
    utils = torch.hub.load(repo, "nvidia_ssd_processing_utils", source="local")
    assert type(pickle.loads(pickle.dumps(utils))) is type(utils)

    # Four threads loading at once all succeed, with one class.
    results, errors = [], []
    def load():
        try:
            results.append(type(torch.hub.load(repo, "nvidia_ssd", source="local", pretrained=False)))
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and results == [type(first)] * 4, (errors, results)

    # DataLoader workers receive our objects (the default start method, and spawn where ours are importable).
    # The dataset (a list of our objects) travels to each worker; len is what the workers send back.
    methods = ["fork", "spawn"] if {spawn_too} else ["fork"]
    for method in methods:
        loader = torch.utils.data.DataLoader([found, found], num_workers=2, batch_size=None, collate_fn=len,
                                             multiprocessing_context=method)
        assert [int(n) for n in loader] == [len(found)] * 2
    print("ok", type(first).__module__)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hub_load_behaves_like_an_import(tmp_path):
    done = run_python(IMPORT_LIKE.format(repo=str(REPO), prelude="", spawn_too=True), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "ssd.models.ssd300_resnet50"]


@pytest.mark.timeout(300)
def test_hub_load_beside_the_callers_own_modules_still_pickles(tmp_path):
    # The caller's ssd/utils keep their names, ours get private ones, and pickling, torch.save, threads and
    # forked workers still work (spawned workers would need our modules under importable names).
    for name, text in CALLER_MODULES.items():
        (tmp_path / name).write_text(text)
    prelude = f"sys.path.insert(0, {str(tmp_path)!r}); import ssd as theirs"
    check_theirs = "\n    import ssd, utils\n    assert ssd is theirs and utils.WHO == 'caller utils'\n"
    done = run_python(IMPORT_LIKE.format(repo=str(REPO), prelude=prelude, spawn_too=False) + check_theirs,
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "ok" and done.stdout.split()[1].startswith("_ssd_hub_")


def test_hub_load_uses_an_importable_copy_of_the_same_files(tmp_path):
    """Another folder holding this very ``ssd`` (no installed distribution): the same files, so the same library."""
    import shutil

    shutil.copytree(REPO / "ssd", tmp_path / "elsewhere" / "ssd", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'elsewhere')!r})
        import ssd
        model = torch.hub.load({str(REPO)!r}, "nvidia_ssd", source="local", pretrained=False)
        where = sys.modules[type(model).__module__].__file__
        elsewhere = {str(tmp_path / 'elsewhere' / 'ssd')!r}
        print(type(model).__module__, where.startswith(ssd.__path__[0]), ssd.__path__[0] == elsewhere)
    """
    done = run_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ssd.models.ssd300_resnet50", "True", "True"]
