"""What an export leaves on disk and how it is found and trusted: the export folder, its manifest, and the errors
every backend and the runtime raise about them.

    <dir>/encoder.onnx, denoiser.onnx, fused.onnx   the graphs (deploy/export.py writes them)
    <dir>/manifest.json                             names, shapes, opset, precision, the policy's spec, schedule
                                                    tables, normaliser, sampler settings, every graph's sha256,
                                                    and its own sha256 (`manifest_sha256`, over the rest)

The default folder is the checkpoint's `onnx/` (`onnx-fp16/` for fp16); any other is named with --export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from policy.checkpoint import file_sha256, weights_sha256

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the manifest carries its own hash
PRECISIONS = ("fp32", "fp16", "int8")
# Error against the float32 torch policy, on normalised values (actions span [-1, 1]): max abs for fp32 and fp16;
# for int8 the mean abs error of the encoder and of the sampled chunk on held-out data (INT8_CHECKED).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 3e-2}
INT8_CHECKED = ("encoder_mean", "sampled_chunk_mean")


class ExportError(ValueError):
    pass


class BackendUnavailable(ValueError):
    """The backend cannot run here (no such execution provider, no export): a setup problem the user fixes."""


def export_dir(checkpoint: str | Path, precision: str = "fp32") -> Path:
    """Where `rtdp export` writes, and the onnxruntime / TensorRT backends read, a checkpoint's graphs by default."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return Path(checkpoint) / ("onnx" if precision == "fp32" else f"onnx-{precision}")


def manifest_sha256(manifest: dict) -> str:
    """The hash of a manifest's canonical JSON without its own hash field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: str | Path, manifest: dict) -> dict:
    """Write manifest.json sealed with its own hash, so an edit to any field is refused on loading."""
    manifest = {**manifest, "manifest_sha256": manifest_sha256(manifest)}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_manifest(directory: str | Path, checkpoint: str | Path | None = None) -> dict:
    """Read manifest.json, verify its own hash and every graph file against its hash (and the checkpoint's weights,
    when given): an edited manifest, a missing, truncated or foreign file is refused before anything runs."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST}: run `rtdp export` first")
    try:
        manifest = json.loads(path.read_text())
        graphs = manifest["graphs"]
        if manifest.get("format") != FORMAT:
            raise ExportError(f"{path}: format {manifest.get('format')}, this rtdp reads {FORMAT}: export again")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path}: not a valid export manifest: {e}") from None
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise ExportError(f"{path} was edited after export (it does not match its manifest_sha256): export again "
                          f"rather than edit it")
    for name, spec in graphs.items():
        f = directory / spec["file"]
        if not f.is_file():
            raise ExportError(f"{name} graph {f} is missing")
        if file_sha256(f) != spec["sha256"]:
            raise ExportError(f"{name} graph {f} does not match its manifest hash: corrupt or replaced; export again")
    if checkpoint is not None:
        weights = weights_sha256(checkpoint)
        if weights != manifest["checkpoint"]["model_sha256"]:
            raise ExportError(f"the export in {directory} was made from other weights than {checkpoint}: "
                              f"export again")
    return manifest




def check_graph_io(graph: str, file: Path, declared: list[dict], actual: dict[str, tuple]) -> None:
    """The manifest's shapes for a graph's inputs or outputs against the shapes the engine reads from the graph
    itself (a dynamic axis is a name or a negative number there, "batch" in the manifest). An input the exporter
    dropped as unused may be absent from the graph."""
    for io in declared:
        name, want = io["name"], io["shape"]
        if name not in actual:
            continue
        got = list(actual[name])
        fixed = [(i, w) for i, w in enumerate(want) if not isinstance(w, str)]
        if len(got) != len(want) or any(not isinstance(got[i], int) or got[i] != w for i, w in fixed):
            raise ExportError(f"{graph} graph {file}: {name!r} has shape {got}, its manifest says {want}: the "
                              f"manifest and the graph disagree; export again")
