"""The torch.hub entrypoints, loaded as torch.hub loads them, and the caller's modules left alone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO


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
    assert public == {"nvidia_ssd", "nvidia_ssd_processing_utils"}  # what torch.hub.list would show


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
    from checkpoint_factory import save_training_checkpoint
    from test_model import forward_error

    monkeypatch.setenv("SSD_CHECKPOINT", str(save_training_checkpoint(tmp_path / "ckpt.pt", distributed=True)))
    model = torch.hub.load(str(REPO), "nvidia_ssd", source="local", model_math="fp32")
    assert forward_error(model, forward_golden) < 1e-4
