"""The CPU fp32 plan runs a cached channels_last copy (same top detections, caller's model untouched), and the
thread plan keeps intra-op threads plus loaders within the cores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ssd.backends.plan as plan_module
from ssd.backends.plan import plan_for, thread_plan
from ssd.models import SSD300

from helpers import SAMPLE_PHOTOS, photo
from helpers.checkpoints import detecting_state_dict
from helpers.detections import assert_detect_results_agree, per_image_deltas, raw_outputs_recorder


@pytest.fixture(scope="module")
def model() -> SSD300:
    net = SSD300()
    net.load_state_dict(detecting_state_dict())
    return net.eval()


def test_contiguous_fp32_cpu_model_runs_a_cached_channels_last_copy(model):
    plan = plan_for(model, None)
    assert plan.memory_format == torch.channels_last and plan.runner is not None and plan.runner is not model
    assert plan_for(model, "fp32").runner is plan.runner  # cached while the weights stay the same
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's model is not converted
    conv = next(p for p in plan.runner.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    already = plan_module.channels_last_copy(model)
    assert plan_for(already, None).runner is None  # a channels_last model runs as it is


def test_cached_copy_follows_weight_changes():
    net = SSD300().eval()
    first = plan_for(net, None).runner
    with torch.no_grad():
        net.loc[0].bias.add_(1.0)
    second = plan_for(net, None).runner
    assert second is not first
    torch.testing.assert_close(second.loc[0].bias, net.loc[0].bias, rtol=0, atol=0)


def test_channels_last_keeps_top_detections_and_model_output(model, monkeypatch):
    photos = [photo(name) for name in SAMPLE_PHOTOS]
    x = torch.rand(1, 3, 300, 300)
    with torch.inference_mode():
        before = model(x)
    fast_raw, hook = raw_outputs_recorder(plan_module.channels_last_copy(model))
    fast = model.detect(photos)
    hook.remove()
    with torch.inference_mode():
        after = model(x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)  # model(x) stays bit-exact
    monkeypatch.setattr(plan_module, "CPU_CHANNELS_LAST", False)
    assert plan_for(model, None).runner is None
    reference_raw, hook = raw_outputs_recorder(model)
    reference = model.detect(photos)
    hook.remove()
    assert all(len(b) > 0 for b in reference)
    # Other convolution kernels: raw outputs a few float32 ulps of the partial sums apart (how many depends on the
    # CPU and the thread count), measured per image and carried through the decoding (tests/helpers/detections.py).
    deltas = per_image_deltas(fast_raw, reference_raw)
    assert max(max(d) for d in deltas) < 1e-3
    max_offset = float(torch.cat([r[0] for r in reference_raw]).abs().max())
    assert_detect_results_agree(fast, reference, deltas, model.spec.box_coder, max_offset=max_offset, top=10,
                                label="channels_last")


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
def test_thread_plan_stays_within_the_cores(cores, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    plan = thread_plan(cores)
    assert plan.intra_op >= 1 and plan.load_workers >= 1
    if cores >= 2:
        assert plan.intra_op + plan.load_workers <= cores


def test_thread_plan_scopes_the_forward_threads():
    before = torch.get_num_threads()
    plan = plan_module.ThreadPlan(intra_op=before + 1, load_workers=1)
    with plan.forward():
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value, expected", [("2", 2), (" 3 ", 3), ("", None)])
def test_thread_plan_takes_the_forward_threads_from_the_environment(value, expected, monkeypatch):
    monkeypatch.setenv("SSD_NUM_THREADS", value)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    plan = thread_plan(2)
    # Unset, 2 cores give the loader one and the network the other; set, the network gets what it says.
    assert plan.intra_op == (1 if expected is None else expected) and plan.load_workers == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "²"])
def test_thread_plan_refuses_a_bad_thread_count(value, monkeypatch):
    monkeypatch.setenv("SSD_NUM_THREADS", value)
    expected = rf"SSD_NUM_THREADS: expected a positive whole number of threads, got '{value}'"
    with pytest.raises(ValueError, match=expected):
        thread_plan(2)


def test_detect_runs_its_forward_pass_on_the_threads_the_environment_names(monkeypatch):
    # The thread count inside the network's forward pass, as detect runs it.
    from ssd.models import SSD300

    model = SSD300().eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    monkeypatch.setenv("SSD_NUM_THREADS", "3")
    model.detect(np.zeros((64, 64, 3), dtype=np.uint8))
    assert seen == [3]


def test_thread_tuner_times_both_counts_then_keeps_the_faster():
    tuner = plan_module.ThreadTuner(low=1, high=2, probe_every=8)
    assert tuner.choose() == (1, False)  # warm-up: first-call costs are not the steady state
    assert tuner.choose() == (1, True)
    tuner.record(1, 0.30)
    assert tuner.choose() == (2, True)
    tuner.record(2, 0.16)  # a quiet machine: two threads nearly halve the time
    picks = [tuner.choose() for _ in range(3, 17)]
    assert [t for t, _ in picks] == [2] * 5 + [1] + [2] * 7 + [1]  # calls 8 and 16 probe the other count again
    tuner.record(1, 0.30)
    tuner.record(2, 0.90)  # something else started running: two threads now wait on each other
    assert tuner.best == 1 and tuner.choose() == (1, True)


def test_backend_tunes_threads_only_when_no_count_is_given(monkeypatch):
    from ssd.backends import PyTorchBackend
    from ssd.models import SSD300

    monkeypatch.delenv("SSD_NUM_THREADS", raising=False)
    monkeypatch.setattr(plan_module, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = SSD300().eval()
        backend = PyTorchBackend(model)
        assert backend.tuner is not None and (backend.tuner.low, backend.tuner.high) == (1, 2)
        x = torch.zeros(1, 3, 300, 300)
        for _ in range(3):
            backend(x)
        assert set(backend.tuner.seconds) == {1, 2} and all(s > 0 for s in backend.tuner.seconds.values())
        assert torch.get_num_threads() == 2  # the caller's setting is restored after each pass
        assert PyTorchBackend(model, threads=1).tuner is None
        monkeypatch.setenv("SSD_NUM_THREADS", "1")
        assert PyTorchBackend(model).tuner is None
    finally:
        torch.set_num_threads(before)
