"""``tmanet batch``: many recorded drives segmented on Ray, each exactly as ``tmanet run`` segments it.

Each input (a video, an image folder, a ``.npy`` clip, an MCAP / ``.db3`` / ``.bag``) is one recording with its
own streams and memory. It is cut into chunks of about ``chunk_frames`` output frames; the chunks go to Ray actors
(:class:`SegmentWorker`, one ``StreamingSegmenter`` each), the largest inputs first.

Why a chunk is exact: a stream's memory at frame s holds frames s-T..s-1, or fewer back to the stream's last
start (its first frame, or a time-gap reset, which restarts the memory). A chunk therefore starts decoding T
frames early (``warm``): those frames, with their timestamps, only fill the memory and their masks are dropped.
If no reset falls in s-T..s, the memory at s is those T frames, as in sequential processing; if one does, the
reset clears the memory in both and the frames from the reset on are the same. For a driving log, each camera
is its own stream: a chunk is a log-time range, and each camera starts reading at its own T-th message before
the range.

Entering part-way: ``.npy`` clips and image folders by index, videos by seeking to a keyframe and decoding
forward (each decoded frame checked against the packet index, :func:`tmanet.io.video.read_video_frames`), logs
by log-time ranges (the MCAP index skips the chunks outside). A source that cannot be entered exactly (a video
without a usable index, one topic of a log given as ``X.mcap:/TOPIC``) is processed whole, and the summary
says why.

Outputs (``OUT/<input name>/``): ``masks/000000.png ...`` (as ``tmanet run --save-masks``), or for a log
``masks.mcap`` with every image topic's ``<topic>/mask`` (as ``tmanet run --output x.mcap``). They are written in
a hidden staging folder beside it that is swapped into place when every chunk is done; ``done.json`` is
written last. An input whose ``done.json`` matches (input size and mtime, the export's manifest SHA256, the
options) is skipped.

Faults: a worker process that dies (killed, a node lost) fails its calls with ``RayActorError``; Ray restarts
the actor and the chunk goes back to the queue, at most ``retries`` times. An error raised by a chunk (an
unreadable input, a frame of the wrong size) fails its input alone.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tmanet.errors import UserError
from tmanet.io.driving_logs import is_log, log_reader, split_topic
from tmanet.io.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoIndex, open_frames, read_video_frames, video_index
from tmanet.manifest import load_manifest

DONE_FILE = "done.json"
IN_FLIGHT_PER_WORKER = 2  # a queued chunk per worker: it never waits for the driver between chunks
REVIVE_TRIES, REVIVE_PAUSE_S = 600, 0.2  # how long a dead worker may take to come back (~2 min)


# -- inputs -------------------------------------------------------------------------------------------------
def _is_frame_input(path: Path) -> bool:
    if is_log(path):
        return True
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())
    return path.suffix.lower() in (*VIDEO_SUFFIXES, ".npy")


def find_inputs(items) -> list[str]:
    """The inputs named by ``items``: paths (a file, an image folder, a rosbag2 folder, ``X.mcap:/TOPIC``),
    globs, and folders of such inputs (their direct entries). A path that does not exist stays in the list
    (it fails as an input); a glob that matches nothing or a folder without inputs is a UserError."""
    found = []
    for item in map(str, items):
        path, topic = split_topic(item)
        if topic is not None or path.exists() and (path.is_file() or _is_frame_input(path)):
            found.append(item)
        elif path.is_dir():
            entries = sorted(str(p) for p in path.iterdir() if not p.name.startswith(".") and _is_frame_input(p))
            if not entries:
                raise UserError(f"{path}: a folder without videos, image folders, .npy clips or ROS bags")
            found += entries
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"no input matches {item}")
            found += find_inputs(matches)
        else:
            found.append(item)  # missing: reported as a failed input, the others go on
    return list(dict.fromkeys(found))


def input_name(item: str) -> str:
    """The output folder's name: the file or folder name (``X.mcap:/cam/front`` -> ``X.mcap_cam_front``)."""
    path, topic = split_topic(item)
    return path.name + (topic.replace("/", "_") if topic else "")


def fingerprint(item: str) -> tuple[int, int]:
    """(size in bytes, latest mtime in ns) of an input file, or of a folder's files (image or rosbag2 folder)."""
    path = split_topic(item)[0]
    st = path.stat()
    if not path.is_dir():
        return st.st_size, st.st_mtime_ns
    files = [p.stat() for p in path.iterdir() if p.is_file()]
    return sum(f.st_size for f in files), max([st.st_mtime_ns] + [f.st_mtime_ns for f in files])


def manifest_sha256(export_dir) -> str:
    path = Path(export_dir) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"{export_dir}: not an export directory (no readable manifest.json: {e.strerror})") from None


def is_done(out: Path, record: dict) -> bool:
    """Whether ``out/done.json`` exists and matches ``record`` (input, size, mtime, manifest, options)."""
    try:
        done = json.loads((out / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(done.get(k) == v for k, v in record.items())


# -- planning: inputs -> chunks -----------------------------------------------------------------------------
@dataclass
class Chunk:
    """One piece of work for a worker. Frame sources: output frames ``start..stop-1`` (``stop`` None: to the
    end), decoding from ``warm``. Logs: output messages with ``begin <= log time < end`` (None: unbounded),
    camera ``topic`` read from ``warm_from[topic]`` on."""
    name: str
    item: str
    kind: str             # npy | images | video | frames (a source read whole) | log
    number: int
    stage: str
    frames: int | None    # output frames (None: unknown until read)
    start: int = 0
    stop: int | None = None
    warm: int = 0
    video_pts: list | None = None        # video: pts of frames warm..stop-1 and the keyframes to seek to
    video_keyframes: list | None = None
    topics: list | None = None
    begin: int | None = None
    end: int | None = None
    warm_from: dict | None = None


@dataclass
class Plan:
    name: str
    item: str
    kind: str
    frames: int | None
    chunks: list = field(default_factory=list)
    whole: str | None = None   # why the input is processed in one piece (when chunking was asked)


def plan_input(item: str, name: str, stage: str, chunk_frames: int | None, memory: int) -> Plan:
    """The chunks of one input; raises ValueError/UserError/FileNotFoundError when it cannot be read."""
    path, topic = split_topic(item)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if topic is None and is_log(path):
        return _plan_log(path, item, name, stage, chunk_frames, memory, log_reader(path))
    source = open_frames(item)
    kind, count = source.kind, source.count
    whole = None
    index = None
    if kind == "video":
        index = video_index(path)
        whole = index.why_not_seekable(path)
        count = len(index.pts) if whole is None else count
    elif not source.seekable:
        kind, whole = "frames", "one topic of a log is read whole (give the log itself to split it)"
    if whole is not None:
        kind = "frames"
    plan = Plan(name, item, kind, count, whole=whole if chunk_frames else None)
    step = chunk_frames if chunk_frames and whole is None else None
    starts = range(0, count, step) if step and count else [0]
    for number, start in enumerate(starts):
        stop = min(start + step, count) if step else None
        warm = max(0, start - memory)
        chunk = Chunk(name, item, kind, number, stage, (stop if stop is not None else count or 0) - start
                      if count is not None else None, start, stop, warm)
        if kind == "video":
            chunk.video_pts = index.pts[warm:stop]
            chunk.video_keyframes = [k for k in index.keyframes if k <= index.pts[warm]]
        plan.chunks.append(chunk)
    return plan


def _plan_log(path, item, name, stage, chunk_frames, memory, reader) -> Plan:
    """Log-time ranges of about ``chunk_frames`` messages (all cameras together), cut between distinct log
    times; each camera warms up from its own T-th message before the range."""
    topics = list(reader.image_topics(path))
    if not topics:
        raise UserError(f"{item}: no image topics")
    times = reader.log_times(path, topics) if chunk_frames else None
    count = len(times) if times is not None else reader.count_messages(path, topics)
    plan = Plan(name, item, "log", count)
    if not chunk_frames or not times:
        plan.chunks.append(Chunk(name, item, "log", 0, stage, count, topics=topics))
        return plan
    cuts = [0]
    for k in range(chunk_frames, len(times), chunk_frames):
        while k < len(times) and times[k][0] == times[k - 1][0]:
            k += 1  # never between two messages of one log time
        if k < len(times) and k > cuts[-1]:
            cuts.append(k)
    cuts.append(len(times))
    for number, (a, b) in enumerate(zip(cuts, cuts[1:])):
        warm_from = {}
        if a:
            seen = {}
            for log_time, t in reversed(times[:a]):
                if seen.get(t, 0) < memory:
                    seen[t] = seen.get(t, 0) + 1
                    warm_from[t] = log_time
        begin = times[a][0] if a else None
        end = times[b][0] if b < len(times) else None
        plan.chunks.append(Chunk(name, item, "log", number, stage, b - a, topics=topics, begin=begin, end=end,
                                 warm_from=warm_from))
    return plan


# -- the worker ---------------------------------------------------------------------------------------------
class SegmentWorker:
    """A Ray actor's state: one StreamingSegmenter, opened once, reset for each chunk."""

    def __init__(self, segmenter_options: dict):
        from .segmenter import StreamingSegmenter
        self.segmenter = StreamingSegmenter.open(**segmenter_options)

    def ready(self) -> int:
        return os.getpid()

    def run(self, chunk: Chunk) -> dict:
        """Segment one chunk into its input's staging folder; returns its frames and busy seconds."""
        started = time.perf_counter()
        seg = self.segmenter
        seg.num_streams = None  # as freshly opened: the next push (or add_stream) sets the stream count
        seg.reset()
        frames = _segment_log(seg, chunk) if chunk.kind == "log" else _segment_frames(seg, chunk)
        return {"frames": frames, "seconds": time.perf_counter() - started}


def _chunk_frames(chunk: Chunk):
    if chunk.kind == "video":
        index = VideoIndex(chunk.video_pts, chunk.video_keyframes, None)
        return read_video_frames(chunk.item, index, 0, len(chunk.video_pts))
    source = open_frames(chunk.item)
    return iter(source) if chunk.kind == "frames" else source.range(chunk.warm, chunk.stop)


# Fault injection for the tests (a real worker death at a known point, instead of a killer thread that polls for
# a worker inside a chunk): while this names a file that does not exist yet, the first worker to write a mask of
# a chunk creates the file and SIGKILLs itself. Embedded Ray's workers inherit the driver's environment.
KILL_ONCE_ENV = "TMANET_BATCH_KILL_ONCE"


def _maybe_die_once():
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _segment_frames(seg, chunk: Chunk) -> int:
    """Mask PNGs of frames ``start..stop-1`` named by their index in the input, as ``tmanet run --save-masks``."""
    from tmanet.io.threads import Prefetch
    from tmanet.io.video import save_mask_png
    # The chunks of one input write into one staged folder (swapped in whole when the input is complete), each
    # PNG a whole file under its final name (save_mask_png writes atomically).
    masks = Path(chunk.stage) / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    written = 0
    with Prefetch(_chunk_frames(chunk)) as frames:
        for index, (frame, timestamp) in enumerate(frames, start=chunk.warm):
            try:
                result = seg.push(frame, timestamp=timestamp)
            except ValueError as e:
                raise UserError(f"frame {index} of {chunk.item}: {e}") from None
            if index >= chunk.start:
                save_mask_png(result.mask, masks / f"{index:06d}.png", seg.palette)
                written += 1
                if written == 1:
                    _maybe_die_once()
    if chunk.frames is not None and written != chunk.frames:
        raise UserError(f"{chunk.item}: {written} frames read from frame {chunk.start}, {chunk.frames} expected")
    if written == 0:
        raise UserError(f"{chunk.item}: no frames")
    return written


def _segment_log(seg, chunk: Chunk) -> int:
    """``<topic>/mask`` of the messages in the chunk's log-time range into a part MCAP, as ``tmanet run`` on a
    log: each camera its own stream, timed by its header stamps."""
    from tmanet.io.mcap import McapImageWriter
    from tmanet.io.ros_images import output_topic

    from .camera_streams import CameraStreams, segment_messages
    warm_from = chunk.warm_from or {}
    start = min(warm_from.values(), default=chunk.begin)
    messages = log_reader(chunk.item).read_images(Path(chunk.item), chunk.topics, start=start, end=chunk.end)
    # a camera's messages before its warm-up are skipped
    messages = (m for m in messages if m[1] >= warm_from.get(m[0], chunk.begin or m[1]))
    streams = CameraStreams(lambda: seg)  # not closed here: the segmenter is the worker's
    part = Path(chunk.stage) / "parts" / f"part-{chunk.number:06d}.mcap"
    written = 0
    try:
        with McapImageWriter(part) as writer:
            for topic, log_time, publish_time, mask, _ in segment_messages(streams, messages, chunk.item):
                if chunk.begin is None or log_time >= chunk.begin:
                    writer.write(output_topic(topic, "mask"), mask, log_time, publish_time)
                    written += 1
    except ValueError as e:  # the log turned unreadable part-way
        raise UserError(str(e)) from None
    return written


def merge_parts(stage: Path, class_names=()) -> int:
    """The part MCAPs of a log's chunks, in order, into ``masks.mcap`` (the parts are removed): the messages
    are already in log-time order across parts, so this is a concatenation."""
    import shutil

    from tmanet.io.mcap import McapImageWriter, image_topics, read_images
    parts = sorted((stage / "parts").glob("part-*.mcap"))
    with McapImageWriter(stage / "masks.mcap", class_names) as writer:  # each camera's label_info, once
        for part in parts:
            for topic, log_time, publish_time, msg in read_images(part, image_topics(part)):
                writer.write_mask(topic, msg, log_time, publish_time)
    shutil.rmtree(stage / "parts")
    return writer.count


# -- the driver ---------------------------------------------------------------------------------------------
@dataclass
class BatchConfig:
    export_dir: str
    inputs: list
    out: str
    workers: int | None = None
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    backend: str = "ort"
    device: str = "cpu"
    chunk_frames: int | None = None
    retries: int = 2
    ray_address: str | None = None
    max_gap: float | None = 1.0
    resize: bool = False
    progress: bool = True
    backend_options: dict = field(default_factory=dict)   # the backend's own options (--precision ...)

    def segmenter_options(self) -> dict:
        from .backends import get_backend
        options = dict(directory=str(Path(self.export_dir).resolve()), backend=self.backend, device=self.device,
                       max_gap=self.max_gap, resize=self.resize, **self.backend_options)
        if "threads" in {opt.key for opt in get_backend(self.backend).options} and self.device == "cpu":
            options["threads"] = self.threads_per_worker  # a worker's CPU share
        return options

    def options_record(self) -> dict:
        return {"max_gap": self.max_gap, "resize": self.resize, "backend": self.backend}


@dataclass
class _InputState:
    plan: Plan
    record: dict
    stage_context: object
    remaining: int
    in_flight: int = 0
    frames: int = 0
    seconds: float = 0.0
    failed: str | None = None


def start_ray(config: BatchConfig):
    """Connect to ``config.ray_address``, or start an embedded Ray on this machine bound to 127.0.0.1.
    Returns the ray module and whether this call started (so must stop) it."""
    host = (config.ray_address or "127.0.0.1").rpartition(":")[0] or config.ray_address
    if config.ray_address is None or host == "localhost" or host.startswith("127."):
        # Ray's switch for a single-machine instance: this process and the servers it starts use the loopback
        # address (read when ray is imported; without it Ray binds all interfaces and names this machine by its
        # network address, which a cluster on 127.0.0.1 does not know).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import logging

    import ray
    if ray.is_initialized():
        return ray, False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if config.ray_address is None:
            cpus = max(os.cpu_count() or 1, (config.workers or 1) * config.threads_per_worker)
            ray.init(num_cpus=cpus, **common)
        else:
            ray.init(address=config.ray_address, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {config.ray_address}: {str(e).splitlines()[0]}") from None
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # ray.init's handler exits at once; ours unwinds (cleanup)
    return ray, True


def _worker_count(ray, config: BatchConfig, chunks: int) -> int:
    if config.workers:
        return min(config.workers, max(1, chunks))
    resources = ray.cluster_resources()
    if config.gpus_per_worker:
        fit = int(resources.get("GPU", 0) // config.gpus_per_worker)
    else:
        fit = int(resources.get("CPU", 1) // config.threads_per_worker)
    return max(1, min(fit, chunks))


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (UserError, ValueError, FileNotFoundError, OSError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_batch(config: BatchConfig) -> dict:
    """Segment every input of ``config``; returns the summary (see :func:`format_summary`)."""
    from tqdm import tqdm

    from tmanet.safe_files import PARTIAL_MARK, atomic_directory, write_json
    started = time.perf_counter()
    sha = manifest_sha256(config.export_dir)
    spec = load_manifest(config.export_dir, verify=False)
    out = Path(config.out)
    items = find_inputs(config.inputs)
    if not items:
        raise UserError("no inputs")
    names = {}
    for item in items:
        name = input_name(item)
        if name in names:
            raise UserError(f"inputs {names[name]} and {item} would both write {out / name}: rename one")
        names[name] = item
    summary = {"inputs": len(items), "done": 0, "skipped": 0, "failed": [], "whole": [], "frames": 0,
               "seconds": 0.0, "frames_per_second": 0.0, "workers": 0, "retries": 0,
               "startup_seconds": 0.0}

    # Skip what is done; the rest, largest first.
    todo = []
    for item in items:
        try:
            size, mtime = fingerprint(item)
        except OSError as e:
            summary["failed"].append({"input": item, "error": f"input not found: {item}" if isinstance(
                e, FileNotFoundError) else _error_line(e)})
            continue
        record = {"input": str(Path(item).resolve()) if ":/" not in item else item, "size": size,
                  "mtime_ns": mtime, "manifest_sha256": sha, "options": config.options_record()}
        if is_done(out / input_name(item), record):
            summary["skipped"] += 1
        else:
            todo.append((size, item, record))
    todo.sort(key=lambda entry: -entry[0])

    states: dict[str, _InputState] = {}
    queue: deque = deque()
    ray = None
    stop_ray = False
    actors = []
    bar = None

    def fail(state: _InputState, error: str):
        if state.failed is None:
            state.failed = error
            summary["failed"].append({"input": state.plan.item, "error": error})
        if state.in_flight == 0:
            _close_stage(state, error)  # no chunk of it writes any more: the staging folder goes

    try:
        for _, item, record in todo:
            name = input_name(item)
            context = atomic_directory(out / name)
            stage = context.__enter__()
            try:
                plan = plan_input(item, name, str(stage), config.chunk_frames, spec.memory_frames)
            except (UserError, ValueError, FileNotFoundError, OSError) as e:
                fail(_InputState(Plan(name, item, "?", 0), record, context, 0), _error_line(e))
                continue
            if plan.whole:
                summary["whole"].append({"input": item, "reason": plan.whole})
            states[name] = _InputState(plan, record, context, len(plan.chunks))
            queue.extend(plan.chunks)
        if not queue:
            return _finish(summary, started)

        ray, stop_ray = start_ray(config)
        worker_class = ray.remote(num_cpus=config.threads_per_worker, num_gpus=config.gpus_per_worker,
                                  max_restarts=-1, max_task_retries=0)(SegmentWorker)
        count = _worker_count(ray, config, len(queue))
        actors = [worker_class.remote(config.segmenter_options()) for _ in range(count)]
        try:
            ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or e
            raise UserError(f"a worker cannot open {config.export_dir}: {_error_line(cause)}") from None
        summary["workers"] = count
        summary["startup_seconds"] = round(time.perf_counter() - started, 3)  # planning, Ray, workers ready

        total = sum(c.frames or 0 for c in queue)
        bar = tqdm(total=total, desc="tmanet batch", unit="frame", disable=not config.progress)
        in_flight = {}  # ref -> (chunk, worker index)
        load = [0] * count
        attempts = {}
        reviving = {}  # ref of ready() -> worker index: Ray restarts a dead actor; it gets work when back
        revive_tries = [0] * count

        def submit():
            while queue:
                alive = [w for w in range(count) if all(w != r for r in reviving.values())]
                worker = min(alive, key=load.__getitem__, default=None)
                if worker is None or load[worker] >= IN_FLIGHT_PER_WORKER:
                    return
                chunk = queue.popleft()
                state = states[chunk.name]
                if state.failed is not None:
                    continue
                in_flight[actors[worker].run.remote(chunk)] = (chunk, worker)
                load[worker] += 1
                state.in_flight += 1

        def finalize(state: _InputState):
            stage = Path(state.plan.chunks[0].stage)
            if state.plan.kind == "log":
                merge_parts(stage, spec.class_names)
            for leftover in stage.rglob(f"*{PARTIAL_MARK}*"):  # from an attempt whose worker was killed
                leftover.unlink()
            _close_stage(state)  # the staging folder becomes OUT/<name>
            write_json(out / state.plan.name / DONE_FILE,
                       {**state.record, "frames": state.frames, "seconds": round(state.seconds, 3),
                        "chunks": len(state.plan.chunks), "whole": state.plan.whole})
            summary["done"] += 1
            summary["frames"] += state.frames

        def progress():
            finished = summary["done"] + len(summary["failed"])
            bar.set_postfix_str(f"inputs {finished}/{len(todo)}", refresh=False)

        def revive(worker: int):
            if all(worker != r for r in reviving.values()):
                reviving[actors[worker].ready.remote()] = worker

        submit()
        progress()
        while in_flight or (queue and reviving):
            ready, _ = ray.wait([*in_flight, *reviving], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in reviving:
                    worker = reviving.pop(ref)
                    try:
                        ray.get(ref)
                        revive_tries[worker] = 0
                    except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError):
                        revive_tries[worker] += 1
                        if revive_tries[worker] < REVIVE_TRIES:  # still restarting: ask again shortly
                            time.sleep(REVIVE_PAUSE_S)
                            revive(worker)
                    continue
                chunk, worker = in_flight.pop(ref)
                load[worker] -= 1
                state = states[chunk.name]
                state.in_flight -= 1
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
                    revive(worker)  # no more work to it until Ray has restarted it
                    key = (chunk.name, chunk.number)
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] > config.retries:
                        fail(state, f"chunk {chunk.number}: its worker died {attempts[key]} times "
                                    f"({_error_line(e)})")
                    elif state.failed is None:
                        summary["retries"] += 1
                        queue.appendleft(chunk)
                    else:
                        fail(state, state.failed)
                    continue
                except ray.exceptions.RayTaskError as e:
                    fail(state, _error_line(getattr(e, "cause", None) or e))
                    continue
                if state.failed is not None:
                    fail(state, state.failed)
                    continue
                state.frames += result["frames"]
                state.seconds += result["seconds"]
                state.remaining -= 1
                bar.update(result["frames"] if chunk.frames is None else chunk.frames)
                if state.remaining == 0:
                    try:
                        finalize(state)
                    except (UserError, ValueError, OSError) as e:
                        fail(state, _error_line(e))
                progress()
            submit()
        for chunk in queue:  # every worker lost for good (a cluster that cannot restart them)
            fail(states[chunk.name], "no worker left to run it (every worker died and none restarted)")
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:  # first: no worker writes into a staging folder any more
            ray.kill(actor)
        if stop_ray:
            ray.shutdown()
        for state in states.values():  # interrupted or an error: unfinished inputs leave no folder
            _close_stage(state, "unfinished")
    return _finish(summary, started)


def _close_stage(state: _InputState, error: str | None = None):
    """Close an input's staging folder (:func:`tmanet.safe_files.atomic_directory`): without ``error`` it
    replaces ``OUT/<name>``, with one it is deleted. Closing twice does nothing."""
    context, state.stage_context = state.stage_context, None
    if context is None:
        return
    if error is None:
        context.__exit__(None, None, None)
    else:
        exc = UserError(error)
        context.__exit__(UserError, exc, None)


def _finish(summary: dict, started: float) -> dict:
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["frames_per_second"] = round(summary["frames"] / summary["seconds"], 3) if summary["seconds"] else 0.0
    return summary


def format_summary(summary: dict) -> str:
    failed = summary["failed"]
    lines = [f"{summary['inputs']} inputs: {summary['done']} done, {summary['skipped']} skipped, {len(failed)} "
             f"failed; {summary['frames']} frames in {summary['seconds']:.1f} s "
             f"({summary['frames_per_second']:.2f} frames/s), {summary['workers']} workers, "
             f"{summary['retries']} retries"]
    lines += [f"  processed whole: {w['input']} ({w['reason']})" for w in summary["whole"]]
    lines += [f"  failed: {f['input']}: {f['error']}" for f in failed]
    return "\n".join(lines)
