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


def start_when_admitted(client, model, frame, seq, deadline_s=DEADLINE_S, end=False):
    """The client's side of "server full": retry the START (polling) until the server admits it."""
    end_at = time.monotonic() + deadline_s
    while True:
        try:
            return infer(client, model, frame, seq, start=True, end=end)
        except InferenceServerException as e:
            assert "server full" in str(e), e
            assert time.monotonic() < end_at, "never admitted"
            time.sleep(0.1)


def test_a_start_beyond_capacity_is_refused_and_an_idle_stream_reclaimed(client, export, clips):
    """One stream: a second sequence's START is refused ("server full") while the first runs, and admitted once
    the first ends; an idle sequence's stream serves the next START once Triton has timed it out."""
    a, b, c = clips[0], clips[1], clips[2]
    ref_a = reference(export)
    check(*infer(client, "one", a[0], 1, start=True), ref_a.push(a[0]))
    with pytest.raises(InferenceServerException, match="server full"):
        infer(client, "one", b[0], 2, start=True)
    check(*infer(client, "one", a[1], 1), ref_a.push(a[1]))  # the running sequence is untouched
    check(*infer(client, "one", a[2], 1, end=True), ref_a.push(a[2]))
    check(*infer(client, "one", b[0], 2, start=True), reference(export).push(b[0]))  # its retry gets in
    # Sequence 2 now holds the stream and goes idle: a third sequence gets in once it has timed out.
    check(*start_when_admitted(client, "one", c[0], 3, deadline_s=DEADLINE_S + IDLE_MS / 1000),
          reference(export).push(c[0]))
    with pytest.raises(InferenceServerException, match="START"):  # sequence 2 timed out
        infer(client, "one", b[1], 2)
    # Free the stream. Sequence 3 may itself have gone idle meanwhile on a loaded machine (the timeout is wall
    # time), so the last request restarts it: valid whether or not Triton still holds it.
    infer(client, "one", c[1], 3, start=True, end=True)


def test_more_sequences_than_streams_complete_or_are_refused_at_start(server, export):
    """8 concurrent sequences on 4 streams: every frame after an admitted START is answered with the right
    mask (never dropped in the middle); a refused START says "server full" and its retry gets in later."""
    import threading
    clips8 = [make_noise_clip(4, H, W, 300 + s) for s in range(8)]
    refused, failures = [0] * 8, []
    barrier, tried = threading.Barrier(8), threading.Barrier(8)  # nobody ends before all 8 STARTs were tried

    def run(s):
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            ref, clip = reference(export), clips8[s]
            barrier.wait(timeout=DEADLINE_S)
            end_at = time.monotonic() + DEADLINE_S
            while True:  # the START, retried while the server is full
                try:
                    check(*infer(client, "tmanet", clip[0], 500 + s, start=True), ref.push(clip[0]))
                    break
                except InferenceServerException as e:
                    assert "server full" in str(e) and time.monotonic() < end_at, e
                    refused[s] += 1
                    if refused[s] == 1:
                        tried.wait(timeout=DEADLINE_S)
                    time.sleep(0.05)
            if not refused[s]:
                tried.wait(timeout=DEADLINE_S)
            for t in range(1, len(clip)):  # admitted: no refusal from here on
                check(*infer(client, "tmanet", clip[t], 500 + s, end=t == len(clip) - 1), ref.push(clip[t]))
        except BaseException as e:  # reported below with its sequence
            failures.append(f"sequence {s}: {e!r}")

    workers = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=3 * DEADLINE_S)
    assert not any(w.is_alive() for w in workers) and not failures, failures
    assert sum(r > 0 for r in refused) == 4  # 4 streams, and no sequence ended before all had tried


def test_a_client_that_disconnects_mid_request_leaves_the_server_serving(server, export, clips):
    import socket
    clip = clips[2]
    # A raw connection that sends the HTTP/2 preface and half a frame header, then hangs up.
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04")
    # A real client whose request is in flight when it gives up (deadline) or closes its channel.
    quitter = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        quitter.infer("tmanet", [frame_input(clip[0])], sequence_id=61, sequence_start=True, sequence_end=True,
                      client_timeout=0.001)
    quitter.async_infer("tmanet", [frame_input(clip[0])], lambda result, error: None, sequence_id=62,
                        sequence_start=True, sequence_end=True)
    quitter.close()
    fresh = grpcclient.InferenceServerClient(server.grpc_url)
    assert fresh.is_server_ready() and fresh.is_model_ready("tmanet")
    ref = reference(export)
    for t in range(3):
        check(*infer(fresh, "tmanet", clip[t], 63, start=t == 0, end=t == 2, logits=True), ref.push(clip[t]))


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
                   "max_candidate_sequences: 64", "max_sequence_idle_microseconds: 1500000",
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
    """... on a repository that was moved after it was written: it holds no path of the machine that wrote it."""
    import shutil
    written = tmp_path / "written" / "repo"
    write_triton_repo(export, written, max_sequences=1, threads=1)
    assert sys.prefix not in (written / "tmanet" / "config.pbtxt").read_text()
    repo = tmp_path / "moved" / "repo"
    repo.parent.mkdir()
    shutil.move(written, repo)
    http, grpc, metrics = free_ports(3)
    # Started with SIGINT ignored, as a script's background job is (`tmanet serve REPO &`): Ctrl-C still stops it.
    proc = subprocess.Popen([sys.executable, "-m", "tmanet.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = ""
        end = time.monotonic() + 180
        while "ready:" not in line:
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
    report = bench_serving(export, server.grpc_url, "tmanet", streams=2, frames=5, warmup=1, threads=1, rounds=2)
    assert report["frames_per_stream"] == 5 and report["input_size"] == [H, W]  # every frame asked for, 3 + 2
    for path in ("triton", "in_process"):
        assert report[path]["fps"] > 0 and report[path]["latency_ms"]["p50"] > 0
    assert report["throughput_ratio"] == report["triton"]["fps"] / report["in_process"]["fps"]
    assert "% of in-process" in format_report(report)


# -- admission, ports, identity, orphans -------------------------------------------------------------------
def test_sequence_slots_refuse_a_start_beyond_capacity_until_a_holder_ends_or_times_out():
    from tmanet.runtime.sequence_slots import REAPER_MARGIN_S, SequenceSlots, ServerFull, UnknownSequence
    now = [0.0]
    slots = SequenceSlots(2, idle_timeout_s=3.0, clock=lambda: now[0])
    assert slots.stream_for("a", True) == (0, True) and slots.stream_for("b", True) == (1, True)
    now[0] = 3.0 + REAPER_MARGIN_S  # "a" idle exactly up to the margin: still held
    with pytest.raises(ServerFull, match="server full"):
        slots.stream_for("c", True)
    assert slots.stream_for("a", False) == (0, False)  # "a" goes on: its stream was kept
    slots.release("b")
    assert slots.stream_for("c", True) == (1, True)  # an ended sequence's stream
    now[0] += 3.0 + REAPER_MARGIN_S + 0.01  # both idle beyond Triton's timeout: the oldest is reclaimed
    assert slots.stream_for("d", True) == (0, True)
    with pytest.raises(UnknownSequence):
        slots.stream_for("a", False)
    assert len(slots) == 2


def serve_command_line(repo, http, grpc, metrics):
    return [sys.executable, "-m", "tmanet.cli", "serve", str(repo), "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


def test_serve_refuses_ports_in_use_in_one_line_and_leaves_their_holder_alone(server, client, export, clips):
    import os
    import socket
    taken = subprocess.run(serve_command_line(server.repo, server.http_port, server.grpc_port, server.metrics_port),
                           capture_output=True, text=True, timeout=DEADLINE_S)
    lines = taken.stderr.strip().splitlines()
    assert taken.returncode == 1 and "ready" not in taken.stdout and len(lines) == 1, taken.stderr
    for needle in (f"HTTP port {server.http_port}", f"gRPC port {server.grpc_port}",
                   f"metrics port {server.metrics_port}", f"pid {server.process.pid} (tritonserver)"):
        assert needle in lines[0]
    assert lines[0].startswith("tmanet serve: error: cannot listen on 127.0.0.1")
    with socket.socket() as plain:  # any program's listener
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port, (grpc, metrics) = plain.getsockname()[1], free_ports(2)
        r = subprocess.run(serve_command_line(server.repo, port, grpc, metrics),
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"HTTP port {port} (held by pid {os.getpid()} (" in r.stderr
    assert server.ready()  # the other server serves on, untouched
    ref = reference(export)
    for t in range(2):
        check(*infer(client, "tmanet", clips[1][t], 71, start=t == 0, end=t == 1), ref.push(clips[1][t]))


def test_readiness_is_asked_of_our_server_only(server):
    """An impostor object whose ports reach the fixture's server is not ready: the server id differs."""
    impostor = TritonServer(server.repo, http_port=server.http_port, grpc_port=server.grpc_port,
                            metrics_port=server.metrics_port)
    impostor.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert server.ready() and not impostor.ready()
    finally:
        impostor.process.kill()
        impostor.process.wait()
    assert not impostor.ready()  # and a dead process is never ready


def test_a_server_that_exits_before_ready_is_one_line_with_its_reason(tmp_path):
    from tmanet.runtime.serve import ServerError
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "nope"\nmax_batch_size: 0\n'
                                                 'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                                 'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    with pytest.raises(ServerError, match=r"exited with status 1 before it was ready: .*backend 'nope'.*\(log: ") as e:
        http, grpc, metrics = free_ports(3)
        TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                     log_file=tmp_path / "log").start(timeout_s=DEADLINE_S)
    assert "\n" not in str(e.value)


def test_sigkill_of_serve_takes_tritonserver_along_and_the_next_start_cleans_up(export, tmp_path, monkeypatch):
    import os
    import re
    import tempfile

    from tmanet.runtime.serve import OWNERS_FILE, _start_time
    repo, scratch = tmp_path / "repo", tmp_path / "tmp"
    scratch.mkdir()
    write_triton_repo(export, repo, max_sequences=1, threads=1)
    proc = subprocess.Popen(serve_command_line(repo, *free_ports(3)), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, TMPDIR=str(scratch)))
    try:
        line, end = "", time.monotonic() + 180
        while "ready:" not in line:
            assert proc.poll() is None and time.monotonic() < end, "tmanet serve did not become ready"
            line = proc.stdout.readline()
        triton = int(re.search(r"\(pid (\d+)\)", line).group(1))
        [workdir] = scratch.glob("tmanet-triton-*")
    finally:
        proc.kill()
        proc.wait()
    end = time.monotonic() + DEADLINE_S
    while _start_time(triton) is not None:  # gone (or a zombie nobody reaps: not serving either)
        assert time.monotonic() < end, "tritonserver outlived tmanet serve"
        time.sleep(0.1)
    assert workdir.is_dir()  # a killed process cleans nothing up ...
    live = scratch / "tmanet-triton-live"  # ... and a live server's folder is kept
    live.mkdir()
    (live / OWNERS_FILE).write_text(json.dumps([[os.getpid(), _start_time(os.getpid())]]))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError, match="not a model repository"):  # the next start, even a failing one
        TritonServer(tmp_path / "missing").start()
    assert not workdir.exists() and live.is_dir()
