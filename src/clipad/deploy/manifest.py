"""What an exported ONNX model is: the manifest ``clipad export`` writes beside it and into it.

The manifest is one JSON object, stored twice: in the model's own metadata (``metadata_props``
key ``"clipad"``, so the ``.onnx`` file alone is enough to run it) and as a sidecar
``<model>.onnx.json`` for people and tools that do not parse ONNX. :class:`OnnxDetector
<clipad.deploy.runtime.OnnxDetector>` reads the embedded copy (the sidecar only when a tool
stripped the metadata).

Contents (``format`` "clipad-onnx", ``schema`` 1)::

    clipad_version, method, options          what was exported (options as the saved detector's)
    backbone, pretrained, image_size         the tower and its weights source; input size
    class_name, shots                        the class the constants were computed for;
                                             reference images folded in (0: zero-shot)
    input: {name, dtype, layout, height, width, range, channels}
    outputs: [pred_score, (pred_label), anomaly_map, (pred_mask)]
    thresholds: null or {image, pixel, image_range, pixel_range, provenance,
                         image_threshold, pixel_threshold}   (the last two in output units)
    opset, fixed_graph: {...}                how the graph differs from the eager path, if at all
    verification: null or {images, max_score_diff, max_map_diff, label_agreement, ...}

Pure Python (json only): the runtime reads it without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidValueError, MissingFileError, shorten

FORMAT = "clipad-onnx"
SCHEMA = 1
#: key of the manifest in the ONNX model's ``metadata_props``
METADATA_KEY = "clipad"
#: the graph's one input
INPUT_NAME = "image"
#: output names, as anomalib's exported models name them; the label and mask outputs exist only
#: when the detector carried calibrated thresholds
SCORE, LABEL, MAP, MASK = "pred_score", "pred_label", "anomaly_map", "pred_mask"
INPUT_FORMATS = ("uint8", "float")


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def input_contract(input_format: str, height: int, width: int) -> dict[str, Any]:
    """The ``input`` entry: uint8 RGB ``[B, H, W, 3]`` (0..255) or float32 ``[B, 3, H, W]`` in [0, 1];
    the graph resizes nothing (H, W: the model size) and normalises inside."""
    if input_format not in INPUT_FORMATS:
        raise InvalidValueError(f"input format must be one of {', '.join(INPUT_FORMATS)}; got {input_format!r}")
    if input_format == "uint8":
        return {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB", "height": height,
                "width": width, "range": [0, 255]}
    return {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": "RGB", "height": height,
            "width": width, "range": [0.0, 1.0]}


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest (the JSON object itself is :attr:`data`)."""

    data: Mapping[str, Any]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def class_name(self) -> str:
        return self.data["class_name"]

    @property
    def input_format(self) -> str:
        return "uint8" if self.data["input"]["dtype"] == "uint8" else "float"

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) the graph takes."""
        return int(self.data["input"]["height"]), int(self.data["input"]["width"])

    @property
    def outputs(self) -> list[str]:
        return list(self.data["outputs"])

    @property
    def image_threshold(self) -> float | None:
        """The image threshold in output units (0.5 where scores are normalised), or None."""
        th = self.data.get("thresholds")
        return None if th is None else th.get("image_threshold")

    @property
    def pixel_threshold(self) -> float | None:
        th = self.data.get("thresholds")
        return None if th is None else th.get("pixel_threshold")

    def to_json(self) -> str:
        return json.dumps(dict(self.data), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_manifest(text: str | bytes, origin: str) -> Manifest:
    """The manifest in ``text`` (JSON), checked; ``origin`` names where it came from in errors.

    Raises:
        InvalidValueError: not JSON, not a clipad-onnx manifest, a newer schema, or an entry of
            the wrong kind (the message names the entry).
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidValueError(f"{origin}: the clipad manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidValueError(f"{origin}: not a clipad ONNX manifest (no \"format\": \"{FORMAT}\"); "
                                "export the model with `clipad export`")
    if data.get("schema") != SCHEMA:
        raise InvalidValueError(f"{origin}: manifest schema {shorten(data.get('schema'), 40)} is not the {SCHEMA} this "
                                "clipad reads; use the clipad version that exported it, or export again")

    def bad(entry: str, what: str) -> InvalidValueError:
        return InvalidValueError(f"{origin}: manifest entry '{entry}' must be {what}; got {shorten(data.get(entry), 80)}")

    for key in ("method", "class_name", "backbone"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(key, "a non-empty string")
    inp = data.get("input")
    if not isinstance(inp, dict) or inp.get("dtype") not in ("uint8", "float32") or inp.get("name") != INPUT_NAME:
        raise bad("input", f"an object with name '{INPUT_NAME}' and dtype uint8 or float32")
    for key in ("height", "width"):
        if not isinstance(inp.get(key), int) or isinstance(inp.get(key), bool) or inp[key] < 1:
            raise InvalidValueError(f"{origin}: manifest entry 'input.{key}' must be a positive integer; got "
                                    f"{shorten(inp.get(key), 40)}")
    outputs = data.get("outputs")
    if not isinstance(outputs, list) or SCORE not in outputs or MAP not in outputs or not set(outputs) <= {SCORE, LABEL, MAP, MASK}:
        raise bad("outputs", f"a list holding {SCORE} and {MAP} (and {LABEL}, {MASK} with thresholds)")
    th = data.get("thresholds")
    if th is not None:
        if not isinstance(th, dict):
            raise bad("thresholds", "null or an object")
        for key in ("image_threshold", "pixel_threshold"):
            if th.get(key) is not None and not _number(th[key]):
                raise InvalidValueError(f"{origin}: manifest entry 'thresholds.{key}' must be a finite number or null; "
                                        f"got {shorten(th[key], 40)}")
    return Manifest(data)


def read_sidecar(model_path: str | Path) -> Manifest:
    """The sidecar manifest of ``model_path`` (``<model>.onnx.json``)."""
    path = sidecar_path(model_path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"'{model_path}' carries no clipad metadata and its manifest '{path}' does not exist; "
                               "export the model with `clipad export`") from None
    return parse_manifest(text, f"'{path}'")
