"""Triton Python-backend model serving a tmanet export as sequences (copied as ``model.py`` by
``tmanet triton-repo``; see :mod:`tmanet.runtime.triton_repo` for the contract).

One ``execute()`` batch of requests from different sequences is one ``push_batch(..., streams=...)`` of a
:class:`~tmanet.runtime.StreamingSegmenter` with one stream per candidate sequence.

Two facts of the Python backend stub shape this file: it embeds the system libpython and ignores PYTHONPATH,
so the folder holding tmanet is added with ``site.addsitedir`` (which also processes an editable install's
``.pth``): the one ``tmanet serve`` names in ``TMANET_SITE_PACKAGES``, else one given to ``triton-repo
--site-packages`` (none by default, so a repository holds no path of the machine that wrote it); and it
predates numpy 2, so
tensors cross through torch's DLPack (exact) instead of ``as_numpy()`` / ``Tensor(name, ndarray)``.
"""
import json
import os
import re
import site
from pathlib import Path


def _add_site_packages():
    """The stub imports this file before triton_python_backend_utils (which needs numpy), so the folder is found
    here, at import: the server's environment first, else the ``site_packages`` parameter of config.pbtxt."""
    if os.environ.get("TMANET_SITE_PACKAGES"):
        site.addsitedir(os.environ["TMANET_SITE_PACKAGES"])
        return
    config = (Path(__file__).resolve().parent.parent / "config.pbtxt").read_text()
    found = re.search(r'key:\s*"site_packages"\s*value:\s*\{\s*string_value:\s*("(?:[^"\\]|\\.)*")', config)
    if found and json.loads(found.group(1)):
        site.addsitedir(json.loads(found.group(1)))


_add_site_packages()

import numpy as np  # noqa: E402  (after the site is added)
import torch.utils.dlpack  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from tmanet.runtime import StreamingSegmenter  # noqa: E402
from tmanet.runtime.sequence_slots import SequenceSlots, ServerFull  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        export_dir = Path(args["model_repository"]) / args["model_version"] / "export"
        options = json.loads(params.get("options") or "{}")   # the backend's own options
        streams = int(config["max_batch_size"])
        device = params.get("device", "cpu")
        if args.get("model_instance_kind") == "GPU":  # a KIND_GPU instance runs on the GPU Triton gave it
            device = f"cuda:{args['model_instance_device_id']}"
        self.seg = StreamingSegmenter.open(export_dir, backend=params.get("backend", "ort"),
                                           device=device, num_streams=streams,
                                           max_gap=None, **options)  # verifies the manifest's SHA256
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds") or 1_000_000)
        self.slots = SequenceSlots(streams, idle_us / 1e6)  # Triton's default timeout is 1 s

    @staticmethod
    def _error(message, code_name):
        code = getattr(pb_utils.TritonError, code_name, None)  # error codes: Triton 23.09 and later
        return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)

    def _input(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else torch.utils.dlpack.from_dlpack(tensor.to_dlpack())

    def execute(self, requests):
        responses = [None] * len(requests)
        pending = []  # (request index, stream, frame, wants logits, ends)
        for k, request in enumerate(requests):
            start, end = (self._input(request, n) for n in ("START", "END"))
            try:
                stream, restart = self.slots.stream_for(request.correlation_id(), bool(start.reshape(-1)[0]))
            except KeyError as e:
                responses[k] = pb_utils.InferenceResponse(error=self._error(str(e.args[0]), "INVALID_ARG"))
                continue
            except ServerFull as e:  # refused at its START, never dropped later: the client may retry
                responses[k] = pb_utils.InferenceResponse(error=self._error(str(e), "UNAVAILABLE"))
                continue
            if restart:
                self.seg.release(stream)
            frame = self._input(request, "FRAME").numpy()[0]
            pending.append((k, stream, frame, "LOGITS" in request.requested_output_names(),
                            bool(end.reshape(-1)[0])))
        while pending:  # one round per push: a sequence has at most one frame in each
            seen, round_, later = set(), [], []
            for item in pending:
                (later if item[1] in seen else round_).append(item)
                seen.add(item[1])
            self._push(round_, responses, requests)
            pending = later
        return responses

    def _push(self, items, responses, requests):
        self.seg.return_logits = any(item[3] for item in items)
        results = self.seg.push_batch(np.stack([i[2] for i in items]),
                                      streams=[i[1] for i in items])
        for (k, stream, _, logits, end), res in zip(items, results):
            outputs = [pb_utils.Tensor.from_dlpack("MASK", torch.from_numpy(res.mask[None]))]
            if logits:
                outputs.append(pb_utils.Tensor.from_dlpack("LOGITS", torch.from_numpy(res.logits[None])))
            responses[k] = pb_utils.InferenceResponse(output_tensors=outputs)
            if end:
                self.slots.release(requests[k].correlation_id())
                self.seg.release(stream)

    def finalize(self):
        self.seg.close()
