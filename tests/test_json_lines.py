"""``detect --jsonl`` and torchrun runs that lose nothing and say what they did: a rank's part missing at the merge,
ranks given different arguments, a frozen peer, record fingerprints for ``--resume``, damaged part lines, a part
path that is a folder, pictures that cannot be written, duplicated inputs, Ctrl-C, two processes on one GPU."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from ssd import distributed
from ssd.cli import main
from ssd.inference.jsonl import read_records

from helpers import GOLDEN, REPO
from helpers.checkpoints import detecting_state_dict, save_detecting_checkpoint
from helpers.processes import free_port, ssd_env, torchrun

IMAGES = GOLDEN / "minicoco" / "images"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_detecting_checkpoint(tmp_path_factory.mktemp("ckpt") / "detecting.pt")


@pytest.fixture()
def weights(checkpoint, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("SSD_CHECKPOINT", str(checkpoint))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return checkpoint


def photos(folder: pathlib.Path, count: int = 4, scale: int = 2) -> list[str]:
    """``count`` small pictures (minicoco's, shrunk) in ``folder``, as the sorted file names detect reports."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(IMAGES.iterdir())
    for k in range(count):
        pixels = np.asarray(Image.open(sources[k % len(sources)]).convert("RGB"))[::scale, ::scale]
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{k:02d}_{sources[k % len(sources)].stem}.png")
    return sorted(str(p) for p in folder.iterdir())


def strict_records(path: pathlib.Path) -> list[dict]:
    """Every line of ``path`` as strict JSON (no NaN), each line whole."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}")

    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a partial line"
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# torchrun: two ranks


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_rank_merge_lists_the_inputs_of_a_missing_part_and_fails(checkpoint, tmp_path):
    files = photos(tmp_path / "photos")
    out, elsewhere = tmp_path / "out", tmp_path / "node2"
    elsewhere.mkdir()
    # Rank 1 writes its part to another folder than rank 0 sees under the same --out: two machines whose --out is
    # not shared. Python runs sitecustomize at start-up in every process of the job; it redirects rank 1 only.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import pathlib
            import ssd.inference.jsonl as jsonl
            original = jsonl.part_path
            jsonl.part_path = lambda out, rank: original(pathlib.Path(os.environ["NODE2_OUT"]), rank)
    """))
    env = ssd_env(checkpoint, NODE2_OUT=str(elsewhere))
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    done = torchrun("detect", str(tmp_path / "photos"), "--out", str(out), "--no-pictures", checkpoint=checkpoint,
                    env=env)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "2 input(s) have no record in the parts" in done.stderr, done.stderr[-3000:]
    listed = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
    assert set(files[1::2]) <= set(listed) and not set(files[0::2]) & set(listed)
    assert [r["file"] for r in strict_records(out / "detections.jsonl")] == files[0::2]
    assert [r["file"] for r in read_records(elsewhere / "detections.rank1.jsonl")] == files[1::2]

    # Merging per node, as the docs say: the other node's part copied into --out, then one --resume run, which
    # finds everything done and merges.
    shutil.copy(elsewhere / "detections.rank1.jsonl", out)
    rerun = subprocess.run([sys.executable, "-m", "ssd", "detect", str(tmp_path / "photos"), "--out", str(out),
                            "--resume", "--no-pictures"], cwd=REPO, env=ssd_env(checkpoint), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: 4 image(s) already done" in rerun.stdout
    assert [r["file"] for r in strict_records(out / "detections.jsonl")] == files


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_given_different_out_folders_are_refused_before_any_work(checkpoint, tmp_path):
    photos(tmp_path / "photos", count=2)
    command = (f"exec {sys.executable} -m ssd detect {tmp_path / 'photos'} --out {tmp_path}/out$LOCAL_RANK "
               "--no-pictures")
    done = torchrun(checkpoint=checkpoint, launcher=("--no-python", "sh", "-c", command))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("detect: expected every rank to have the same --out, got rank 0: " in line
                          and "a --out they all share" in line for line in errors), done.stderr[-3000:]
    assert not list(tmp_path.glob("out*/detections*"))  # no work was done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_detect_with_an_exported_model_under_torchrun(checkpoint, tmp_path):
    files = photos(tmp_path / "photos", count=3)
    model = tmp_path / "ssd.onnx"
    pytest.importorskip("onnxruntime")
    assert main(["export", "--out", str(model), "--checkpoint", str(checkpoint)]) == 0
    done = torchrun("detect", str(tmp_path / "photos"), "--model", str(model), "--out", str(tmp_path / "out"),
                    checkpoint=None)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = strict_records(tmp_path / "out" / "detections.jsonl")
    assert [r["file"] for r in merged] == files and any(r["detections"] for r in merged)
    assert all((tmp_path / "out" / r["picture"]).is_file() for r in merged)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_peer_stops_the_run_at_the_timeout_with_a_message(checkpoint, tmp_path):
    photos(tmp_path / "photos", count=1)
    port = str(free_port())
    job = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    # A rank started by hand that joins the job and then never takes part (it waits on its stdin).
    peer = subprocess.Popen(
        [sys.executable, "-c", "import datetime, sys, torch.distributed as d; "
         "d.init_process_group('gloo', timeout=datetime.timedelta(minutes=4)); sys.stdin.read()"],
        cwd=REPO, env=ssd_env(None, RANK="1", LOCAL_RANK="1", **job), stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(tmp_path / "photos"), "--out",
                               str(tmp_path / "out"), "--timeout", "0.1"], cwd=REPO,
                              env=ssd_env(checkpoint, RANK="0", LOCAL_RANK="0", **job), capture_output=True,
                              text=True, timeout=240)
    finally:
        peer.stdin.close()
        try:
            peer.wait(60)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert "did not reach the exchange between ranks within the timeout of 6 s (--timeout)" in errors[0]
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("detections.rank*.jsonl"))  # stopped before any work


# ---------------------------------------------------------------------------------------------------------------
# One process: fingerprints, damaged parts, bad paths, pictures, duplicates


def test_resume_keeps_a_record_only_when_its_fingerprint_matches(weights, tmp_path, capsys):
    files = photos(tmp_path / "photos", count=3)
    out = tmp_path / "out"
    base = ["detect", str(tmp_path / "photos"), "--out", str(out), "--no-pictures", "--jsonl"]
    assert main(base) == 0
    part = out / "detections.rank0.jsonl"
    first = strict_records(part)
    assert [r["file"] for r in first] == files and all(len(r["fingerprint"]) == 32 for r in first)
    capsys.readouterr()

    assert main([*base, "--resume"]) == 0
    assert "resuming: 3 image(s) already done" in capsys.readouterr().out
    assert strict_records(part) == first  # nothing done twice
    # A file changed since (its modification time): only that one is done again.
    stat = os.stat(files[1])
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert main([*base, "--resume"]) == 0
    assert "resuming: 2 image(s) already done" in capsys.readouterr().out
    assert [r["file"] for r in strict_records(part)] == [*files, files[1]]
    # Other weights under another name: nothing is kept.
    other = tmp_path / "other.pt"
    torch.save({"model": detecting_state_dict(salt=1)}, other)
    assert main([*base, "--resume", "--checkpoint", str(other)]) == 0
    assert "resuming: 0 image(s) already done" in capsys.readouterr().out
    # Another threshold: no record of the earlier settings is kept, and the merge takes the new ones.
    assert main([*base, "--resume", "--threshold", "0.9"]) == 0
    assert "resuming: 0 image(s) already done" in capsys.readouterr().out
    merged = strict_records(out / "detections.jsonl")
    assert [r["file"] for r in merged] == files and "fingerprint" not in merged[0]
    assert all(d["score"] > 0.9 for r in merged for d in r["detections"])
    assert sum(len(r["detections"]) for r in merged) < sum(len(r["detections"]) for r in first)


def test_damaged_part_lines_are_skipped_and_reported(weights, tmp_path, capsys):
    files = photos(tmp_path / "photos", count=2)
    out = tmp_path / "out"
    args = ["detect", str(tmp_path / "photos"), "--out", str(out), "--no-pictures", "--jsonl"]
    assert main(args) == 0
    part = out / "detections.rank0.jsonl"
    good = part.read_text().splitlines()
    nan = json.loads(good[0])
    nan["detections"] = [{"name": "person", "score": float("nan")}]
    part.write_text("\n".join([json.dumps(nan), "garbage {", good[1], '{"file": 3}', good[0], '[1, 2]']) + "\n")
    (out / "detections.rank3.jsonl").write_bytes(b'{"file": "x", "error": NaN}\n\xff\xfe not utf-8\n')
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming: 2 image(s) already done" in captured.out
    assert f"warning: {part}: 4 damaged line(s) skipped" in captured.err
    assert f"warning: {out / 'detections.rank3.jsonl'}: 2 damaged line(s) skipped" in captured.err
    assert "Traceback" not in captured.err
    assert [r["file"] for r in strict_records(out / "detections.jsonl")] == files


@pytest.mark.parametrize("name", ["detections.rank0.jsonl", "detections.rank5.jsonl", "detections.jsonl"])
def test_a_part_or_merge_path_that_is_a_folder_is_one_error_line(weights, tmp_path, capsys, name):
    photos(tmp_path / "photos", count=1)
    (tmp_path / "out" / name).mkdir(parents=True)
    assert main(["detect", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'out' / name}: expected a JSON Lines file or nothing, got a folder; remove it "
                   "or choose another --out"]


def test_a_picture_that_cannot_be_written_is_reported_and_the_merge_happens(weights, tmp_path, capsys):
    files = photos(tmp_path / "photos", count=3)
    out = tmp_path / "out"
    blocked = pathlib.Path(files[1]).name
    (out / blocked).mkdir(parents=True)  # a folder where the second picture should go
    assert main(["detect", str(tmp_path / "photos"), "--out", str(out), "--jsonl"]) == 1
    captured = capsys.readouterr()
    merged = strict_records(out / "detections.jsonl")
    assert [r["file"] for r in merged] == files
    assert merged[1]["picture"] is None and merged[1]["picture_error"].startswith("cannot write")
    assert merged[1]["detections"] == strict_records(out / "detections.rank0.jsonl")[1]["detections"]
    assert all((out / r["picture"]).is_file() for r in (merged[0], merged[2]))
    assert f"{files[1]}: picture not saved: cannot write" in captured.err and "Traceback" not in captured.err
    # A resumed run tries that picture again.
    shutil.rmtree(out / blocked)
    assert main(["detect", str(tmp_path / "photos"), "--out", str(out), "--jsonl", "--resume"]) == 0
    assert "resuming: 2 image(s) already done" in capsys.readouterr().out
    assert (out / blocked).is_file() and strict_records(out / "detections.jsonl")[1]["picture"] == blocked


def test_a_duplicated_input_gives_one_record_in_json_and_json_lines(weights, tmp_path, capsys):
    files = photos(tmp_path / "photos", count=2)
    args = ["detect", files[0], files[1], files[0], "--no-pictures"]
    assert main([*args, "--out", str(tmp_path / "json")]) == 0
    assert "1 input(s) given more than once, detected once" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "jsonl"), "--jsonl"]) == 0
    report = json.loads((tmp_path / "json" / "detections.json").read_text())
    lines = strict_records(tmp_path / "jsonl" / "detections.jsonl")
    assert [i["file"] for i in report["images"]] == [r["file"] for r in lines] == files[:2]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_in_detect_jsonl_finishes_the_write_and_exits_130(checkpoint, tmp_path):
    files = photos(tmp_path / "photos", count=12, scale=3)
    out = tmp_path / "out"
    # SIG_DFL in the child whatever the parent's disposition: an inherited SIG_IGN would make Ctrl-C a no-op.
    process = subprocess.Popen([sys.executable, "-m", "ssd", "detect", str(tmp_path / "photos"), "--out", str(out),
                                "--jsonl", "--batch-size", "1"], cwd=REPO, env=ssd_env(checkpoint),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = 0
        while seen < 2:  # two "<file> (WxH): ..." lines: two images done, the run is in full swing
            line = process.stdout.readline()
            assert line, "the run ended before printing two results"
            seen += "): " in line
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and "rerun with --resume" in interrupted[0], stderr
    records = strict_records(out / "detections.rank0.jsonl")  # every line whole
    assert 2 <= len(records) < 12
    for record in records:
        with Image.open(out / record["picture"]) as picture:
            picture.load()  # whole pictures only
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left
    assert not (out / "detections.jsonl").exists()
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(tmp_path / "photos"), "--out", str(out),
                           "--jsonl", "--resume"], cwd=REPO, env=ssd_env(checkpoint), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(records)} image(s) already done" in done.stdout
    assert [r["file"] for r in strict_records(out / "detections.jsonl")] == files


# ---------------------------------------------------------------------------------------------------------------
# Options: --timeout, --device on a machine with fewer GPUs than processes


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "20000"])
def test_timeout_is_validated_with_one_error_line(weights, tmp_path, capsys, value):
    annotations = GOLDEN / "minicoco" / "instances.json"
    for command in (["detect", "--out", str(tmp_path / "o")],
                    ["evaluate", "--images", str(IMAGES), "--annotations", str(annotations)]):
        assert main([*command, "--timeout", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --timeout: expected minutes in (0, 10080]"), err
    assert distributed.check_timeout(1.5).total_seconds() == 90


def test_two_processes_on_one_gpu_are_told_so(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    message = ("--device: 2 processes on this machine want a GPU each, but it has 1 GPU (this process is "
               "LOCAL_RANK 1); start at most 1 per machine (torchrun --nproc-per-node 1) or use --device cpu")
    with pytest.raises(ValueError) as caught:
        distributed.resolve_device("cuda", "--device")
    assert str(caught.value) == message
    with pytest.raises(ValueError, match="2 processes on this machine want a GPU each"):
        distributed.resolve_device(None, "--device")  # the default, CUDA when available
    assert main(["detect", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: [rank 1] {message}"]
    with pytest.raises(ValueError, match=r"--device: 2 processes on this machine would all use cuda:0"):
        distributed.resolve_device("cuda:0", "--device")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.resolve_device("cuda", "--device") == torch.device("cuda", 0)
