"""Serving on a real Triton Inference Server started on 127.0.0.1 by a fixture (bounded waits), stopped at
teardown: the sequence contract, against the in-process segmenter, over gRPC and HTTP."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tmanet.errors import UserError
from tmanet.runtime import StreamingSegmenter
from tmanet.runtime.serve import TritonServer, free_ports
from tmanet.runtime.triton_repo import write_triton_repo
from tmanet.test_clips import make_noise_clip

# A plain import: `make test` installs the serve extra, so a missing client is a broken install, not a skip.
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

H, W = 64, 128
TINY_ATOL = 1e-4
MASK_MARGIN = 1e-3
DEADLINE_S = 60.0   # bound on every wait for an observable effect
IDLE_MS = 3000      # the one-sequence model's idle timeout


@pytest.fixture(scope="module")
def export(tiny_export_dir):
    return tiny_export_dir(dynamic=True)


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repo"
    write_triton_repo(export, repo, model_name="tmanet", max_sequences=4, idle_timeout_ms=600_000, threads=1)
    write_triton_repo(export, repo, model_name="one", max_sequences=1, idle_timeout_ms=IDLE_MS, threads=1)
    write_triton_repo(export, repo, model_name="named", max_sequences=2, threads=1, sequence_id_type="string")
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=tmp / "server.log")
    srv.start(timeout_s=180)
    yield srv
    assert srv.stop() == 0  # a clean exit: models unloaded


@pytest.fixture
def client(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def clips():
    return [make_noise_clip(6, H, W, seed) for seed in (41, 42, 43, 44)]


def frame_input(frame, dtype="UINT8"):
    inp = grpcclient.InferInput("FRAME", [1, *frame.shape], dtype)
    inp.set_data_from_numpy(frame[None])
    return inp


def infer(client, model, frame, seq, start=False, end=False, logits=False):
    names = ["MASK", "LOGITS"] if logits else ["MASK"]
    res = client.infer(model, [frame_input(frame)], outputs=[grpcclient.InferRequestedOutput(n) for n in names],
                       sequence_id=seq, sequence_start=start, sequence_end=end)
    return res.as_numpy("MASK")[0], (res.as_numpy("LOGITS")[0] if logits else None)


def check(mask, logits, want):
    """Served mask (and logits when asked) against the in-process result."""
    part = np.sort(want.logits, axis=0)
    sure = part[-1] - part[-2] >= MASK_MARGIN
    assert mask.shape == (H, W) and np.array_equal(mask[sure], want.mask[sure])
    if logits is not None:
        assert float(np.abs(logits - want.logits).max()) <= TINY_ATOL


def reference(export):
    return StreamingSegmenter.open(export, return_logits=True)


def wait_done(futures, deadline_s=DEADLINE_S):
    end = time.monotonic() + deadline_s
    while not all(f["done"] for f in futures):
        assert time.monotonic() < end, "no answer within the deadline"
        time.sleep(0.05)


def send_async(client, model, frame, seq, start=False, end=False, names=("MASK",)):
    """An async gRPC request; the returned dict fills in 'done', 'result', 'error'."""
    state = {"done": False, "result": None, "error": None}

    def callback(result, error):
        state.update(result=result, error=error, done=True)
    client.async_infer(model, [frame_input(frame)], callback, sequence_id=seq, sequence_start=start,
                       sequence_end=end, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
    return state


# -- the contract ----------------------------------------------------------------------------------------
def test_interleaved_sequences_match_in_process_streams(server, client, export, clips):
    """4 sequences, random start times, each round's requests in flight together (one execute() batch)."""
    rng = np.random.default_rng(0)
    starts = [0, *rng.integers(1, 4, size=3)]
    refs = [reference(export) for _ in clips]
    sent = [0] * len(clips)
    for step in range(max(starts) + len(clips[0])):
        active = [s for s in rng.permutation(len(clips)) if starts[s] <= step and sent[s] < len(clips[s])]
        asked = {s: bool(rng.integers(2)) for s in active}
        pending = []
        for s in active:
            t = sent[s]
            names = ("MASK", "LOGITS") if asked[s] else ("MASK",)
            pending.append((s, t, send_async(client, "tmanet", clips[s][t], 100 + s, start=t == 0,
                                             end=t == len(clips[s]) - 1, names=names)))
        wait_done([p[2] for p in pending])
        for s, t, state in pending:
            assert state["error"] is None, state["error"]
            r = state["result"]
            check(r.as_numpy("MASK")[0], r.as_numpy("LOGITS")[0] if asked[s] else None, refs[s].push(clips[s][t]))
            assert asked[s] or r.as_numpy("LOGITS") is None
            sent[s] += 1
    assert sent == [len(c) for c in clips]


def test_start_restarts_and_end_frees_the_id(client, export, clips):
    clip, ref = clips[0], reference(export)
    for t in range(3):
        check(*infer(client, "tmanet", clip[t], 7, start=t == 0, logits=True), ref.push(clip[t]))
    ref.reset()  # START in the middle: the sequence's memory restarts at this frame
    check(*infer(client, "tmanet", clip[3], 7, start=True, logits=True), ref.push(clip[3]))
    check(*infer(client, "tmanet", clip[4], 7, end=True, logits=True), ref.push(clip[4]))
    with pytest.raises(InferenceServerException, match="START"):  # ended: no frame without a new START
        infer(client, "tmanet", clip[5], 7)
    fresh = reference(export)
    check(*infer(client, "tmanet", clip[5], 7, start=True, end=True, logits=True), fresh.push(clip[5]))


def test_string_sequence_ids(server, export, clips):
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    refs = {name: reference(export) for name in ("cam-front", "cam-rear")}
    for t in range(3):
        for k, (name, ref) in enumerate(refs.items()):
            inp = httpclient.InferInput("FRAME", [1, H, W, 3], "UINT8")
            inp.set_data_from_numpy(clips[k][t][None])
            res = client.infer("named", [inp], sequence_id=name, sequence_start=t == 0, sequence_end=t == 2,
                               outputs=[httpclient.InferRequestedOutput("MASK")])
            check(res.as_numpy("MASK")[0], None, ref.push(clips[k][t]))


def test_backlog_and_idle_timeout(client, export, clips):
    """One candidate sequence: a second one waits in Triton's backlog until the first ends; an idle sequence
    is dropped after the timeout and its stream serves the next one."""
    a, b, c = clips[0], clips[1], clips[2]
    infer(client, "one", a[0], 1, start=True)
    waiting = send_async(client, "one", b[0], 2, start=True)
    infer(client, "one", a[1], 1)
    assert not waiting["done"]  # the only slot is sequence 1's
    infer(client, "one", a[2], 1, end=True)
    wait_done([waiting])
    assert waiting["error"] is None
    check(waiting["result"].as_numpy("MASK")[0], None, reference(export).push(b[0]))
    # Sequence 2 now holds the slot and goes idle: a third sequence gets in once Triton has dropped it.
    third = send_async(client, "one", c[0], 3, start=True)
    wait_done([third], deadline_s=DEADLINE_S + IDLE_MS / 1000)
    assert third["error"] is None
    check(third["result"].as_numpy("MASK")[0], None, reference(export).push(c[0]))
    with pytest.raises(InferenceServerException, match="START"):  # sequence 2 timed out
        infer(client, "one", b[1], 2)
    # Free the slot. Sequence 3 may itself have gone idle meanwhile on a loaded machine (the timeout is wall
    # time), so the last request restarts it: valid whether or not Triton still holds it.
    infer(client, "one", c[1], 3, start=True, end=True)


def test_bad_requests_are_refused_and_change_nothing(server, client, export, clips):
    clip, ref = clips[3], reference(export)
    check(*infer(client, "tmanet", clip[0], 9, start=True, logits=True), ref.push(clip[0]))
    with pytest.raises(InferenceServerException, match="FRAME.*shape|shape.*FRAME"):
        infer(client, "tmanet", clip[1][:32], 9)
    with pytest.raises(InferenceServerException, match="FRAME"):
        client.infer("tmanet", [frame_input(clip[1].astype(np.float32), "FP32")], sequence_id=9)
    for t in (1, 2):  # the sequence goes on as if the bad requests had never been sent
        check(*infer(client, "tmanet", clip[t], 9, end=t == 2, logits=True), ref.push(clip[t]))
    assert client.is_server_ready() and client.is_model_ready("tmanet")


# -- the repository and the command ------------------------------------------------------------------------
def test_triton_repo_refuses_to_overwrite_and_checks_the_export(export, tmp_path):
    repo = tmp_path / "repo"
    folder = write_triton_repo(export, repo, idle_timeout_ms=1500, max_sequences=3, instances=2)
    config = (folder / "config.pbtxt").read_text()
    for needle in ('name: "FRAME" data_type: TYPE_UINT8 dims: [ 64, 128, 3 ]', "max_batch_size: 3",
                   "max_candidate_sequences: 3", "max_sequence_idle_microseconds: 1500000",
                   "CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64", "count: 2 kind: KIND_CPU"):
        assert needle in config
    assert (folder / "1" / "model.py").is_file() and (folder / "1" / "export" / "manifest.json").is_file()
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(UserError, match="exists"):
        write_triton_repo(export, repo)
    assert sorted(p.name for p in folder.rglob("*")) == before
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in export.iterdir():
        damaged.joinpath(f.name).write_bytes(f.read_bytes())
    (damaged / "memory_head.onnx").write_bytes(b"not a graph")
    with pytest.raises(Exception, match="SHA256"):
        write_triton_repo(damaged, tmp_path / "repo2")
    assert not (tmp_path / "repo2" / "tmanet").exists()


def test_serve_command_starts_prints_and_stops_on_sigint(export, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(export, repo, max_sequences=1, threads=1)
    http, grpc, metrics = free_ports(3)
    # Started with SIGINT ignored, as a script's background job is (`tmanet serve REPO &`): Ctrl-C still stops it.
    proc = subprocess.Popen([sys.executable, "-m", "tmanet.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = ""
        end = time.monotonic() + 180
        while "tritonserver ready:" not in line:
            assert proc.poll() is None and time.monotonic() < end, "tmanet serve did not become ready"
            line = proc.stdout.readline()
        assert f"127.0.0.1:{grpc}" in line and f"http://127.0.0.1:{http}" in line
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert client.is_model_ready("tmanet")
        meta = client.get_model_metadata("tmanet", as_json=True)
        assert json.dumps(meta).count("FRAME") == 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_serve_bench_reports_both_paths(server, export):
    from tmanet.runtime.serve_bench import bench_serving, format_report
    report = bench_serving(export, server.grpc_url, "tmanet", streams=2, frames=4, warmup=1, threads=1, rounds=2)
    assert report["frames_per_stream"] == 4 and report["input_size"] == [H, W]
    for path in ("triton", "in_process"):
        assert report[path]["fps"] > 0 and report[path]["latency_ms"]["p50"] > 0
    assert report["throughput_ratio"] == report["triton"]["fps"] / report["in_process"]["fps"]
    assert "% of in-process" in format_report(report)
