"""Where CLIP weights come from: a local file, an open_clip tag, or nothing (random init).

Resolution order for ``pretrained`` (user-facing: docs/weights.md):

1. an existing file path:
   - an OpenAI TorchScript archive (``~/.cache/clip/ViT-L-14-336px.pt``) or a state dict taken
     from one (it keeps the ``input_resolution`` entry);
   - any other state dict (``.bin``, ``.pt``, ``.pth``, ``.safetensors``): open_clip checkpoints,
     and also ``model.state_dict()`` of OpenAI's own code, whose keys are exactly open_clip's.
   Pickled files are read with ``torch.load(weights_only=True)`` only; TorchScript archives with
   ``torch.jit.load`` (no Python pickle is executed for them).
2. an open_clip pretrained tag (``laion400m_e31``, ``openai``, ...): taken from the Hugging Face
   cache or ``~/.cache/clip`` when present, downloaded once otherwise. With no network (or with
   ``HF_HUB_OFFLINE=1``) and no cached copy, :class:`~clipad.errors.WeightsNotFound` is raised
   after one quick reachability probe, never after a storm of retries.
3. ``None``: random initialisation, seeded so that the same seed gives the same weights.

QuickGELU or GELU (:func:`choose_quick_gelu`): OpenAI trained CLIP with QuickGELU
(``x * sigmoid(1.702 x)``), as did MetaCLIP, DFN and LAION's ViT-B-32 400M runs; most other
open_clip releases use exact GELU. Running weights with the other activation gives no error, only
different (worse) features, so the choice is made from the evidence and contradictions are errors:

- an architecture name ending in ``-quickgelu`` always uses QuickGELU;
- an OpenAI TorchScript archive, or a state dict with ``input_resolution``: QuickGELU;
- an open_clip tag: what open_clip records for it (``openai`` tags: QuickGELU);
- any other file: nothing in it tells (OpenAI's and open_clip's state dicts have the same keys),
  so the architecture's open_clip releases decide when they agree (``ViT-L-14-336``: only
  ``openai``, QuickGELU; ``ViT-B-16-plus-240``: GELU; ``tiny`` and architectures without
  releases: GELU, open_clip's default); when they disagree (``ViT-B-16``, ``ViT-L-14``...) the
  caller must say ``quick_gelu=True/False`` or use the ``-quickgelu`` name.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ClipadError, InvalidTypeError, InvalidValueError, UnknownNameError, WeightsNotFound

HF_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``pretrained`` argument.

    kind: "random" | "file" | "tag"; path: the local file to read (None for random);
    quick_gelu: whether the weights were trained with QuickGELU activations.
    """

    kind: str
    path: Path | None
    quick_gelu: bool
    tag: str | None = None


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (OpenAI's released ``.pt`` files are such archives)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _is_torchscript_file(path: Path) -> bool:
    try:
        return is_torchscript_archive(path)
    except (zipfile.BadZipFile, OSError):  # a damaged zip: let torch.load report it
        return False


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint file without unpickling arbitrary objects.

    Returns ``(state_dict, is_openai)``; ``is_openai`` is True for files that are certainly
    OpenAI's (a TorchScript archive, or a state dict still holding ``input_resolution``), which
    need QuickGELU. False means "cannot tell", not "GELU": a plain state dict of OpenAI's code has
    the same keys as an open_clip one (see :func:`choose_quick_gelu`).
    """
    path = Path(path)
    is_openai = False
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError...: a bad file either way
            raise WeightsNotFound(f"cannot read checkpoint '{path}' as a .safetensors file ({exc})") from exc
    elif _is_torchscript_file(path):
        try:
            with warnings.catch_warnings():  # torch's TorchScript deprecation notice is not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:  # noqa: BLE001 - a damaged archive is a bad file
            raise WeightsNotFound(
                f"cannot read checkpoint '{path}' as a TorchScript archive ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        is_openai = True
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
            raise WeightsNotFound(
                f"cannot read checkpoint '{path}' as a tensor-only file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). clipad never unpickles arbitrary "
                "objects; convert it to .safetensors or pass an OpenAI/open_clip checkpoint."
            ) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise WeightsNotFound(f"checkpoint '{path}' holds no state dict")
    if not all(isinstance(k, str) for k in sd):
        raise WeightsNotFound(f"checkpoint '{path}' is not a state dict (its keys are not all parameter names)")
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "input_resolution" in sd:
        is_openai = True
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsNotFound(f"checkpoint '{path}' is not a state dict of tensors (non-tensor entries: {others[:5]})")
    return sd, is_openai


def _host_reachable(host: str = HF_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One bounded probe (DNS + TCP connect) run in a thread, since DNS lookups cannot time out."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_tag_file(cfg: dict, cache_dir: str | None) -> Path | None:
    """The local copy of a tag's weights, if the HF cache or ~/.cache/clip already holds it."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for name in candidates:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url", "")
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return local
    return None


def _download_tag(cfg: dict, cache_dir: str | None) -> Path:
    import open_clip.pretrained as ocp

    # Bound hub timeouts so a flaky connection fails in seconds rather than minutes.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    return Path(ocp.download_pretrained(cfg, cache_dir=cache_dir))


def offline_message(backbone: str, tag: str, why: str, *, cli: bool = False) -> str:
    """What to do when the weights of ``tag`` are neither cached nor downloadable (``why``), worded
    for Python callers (``pretrained='/path'``) or, with ``cli``, for the command line
    (``--pretrained /path``), where Python syntax would be typed as is and fail."""
    local = f"--pretrained /path/to/{backbone}.safetensors" if cli else f"pretrained='/path/to/{backbone}.safetensors'"
    random = "--pretrained none" if cli else "pretrained=None"
    return (
        f"no cached weights for backbone '{backbone}' with pretrained tag '{tag}', and {why}. Download them "
        "once on a connected machine (they land in the Hugging Face cache, ~/.cache/huggingface, or "
        f"~/.cache/clip), or pass a local file: {local} (open_clip .bin/.pt/.safetensors or an OpenAI .pt), "
        f"or {random} for random weights."
    )


def resolve(backbone: str, pretrained: str | os.PathLike | None, cache_dir: str | None = None) -> WeightsSource:
    """Turn a ``pretrained`` argument into a local file (downloading a tag if needed).

    Raises:
        WeightsNotFound: a tag that is neither cached nor downloadable (offline), or an unreadable file.
        UnknownNameError: a string that is neither a file nor a tag of ``backbone``.
    """
    if pretrained is None:
        return WeightsSource("random", None, quick_gelu=False)
    as_path = Path(os.path.expanduser(str(pretrained)))
    if as_path.is_file():
        return WeightsSource("file", as_path, quick_gelu=False)
    if as_path.exists():
        # neutral wording: the same text reaches Python callers and the command line (--pretrained)
        raise WeightsNotFound(f"pretrained weights '{pretrained}' name a directory, not a checkpoint file")

    import open_clip

    tag = str(pretrained)
    cfg = open_clip.get_pretrained_cfg(backbone, tag)
    if not cfg:
        looks_like_path = os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise WeightsNotFound(f"pretrained checkpoint file '{tag}' does not exist")
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        raise UnknownNameError(
            f"'{tag}' is neither a file nor an open_clip pretrained tag of '{backbone}'; "
            f"tags for '{backbone}': {', '.join(tags) if tags else '(none: pass a local file)'}"
        )
    quick_gelu = bool(cfg.get("quick_gelu", False))
    cached = _cached_tag_file(cfg, cache_dir)
    if cached is not None:
        return WeightsSource("tag", cached, quick_gelu=quick_gelu, tag=tag)

    def offline(why: str) -> WeightsNotFound:
        return WeightsNotFound(
            offline_message(backbone, tag, why), backbone=backbone, tag=tag, reason=why,
            cli_message=offline_message(backbone, tag, why, cli=True),
        )

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("CLIPAD_OFFLINE", "") not in ("", "0"):
        raise offline("offline mode is set (HF_HUB_OFFLINE/CLIPAD_OFFLINE)")
    if not _host_reachable():
        raise offline(f"{HF_HOST} cannot be reached (no network?)")
    try:
        path = _download_tag(cfg, cache_dir)
    except Exception as exc:  # noqa: BLE001 - report any download failure the same way
        raise offline(f"the download failed ({type(exc).__name__}: {exc})") from exc
    return WeightsSource("tag", path, quick_gelu=quick_gelu, tag=tag)


def release_activations(backbone: str) -> dict[str, bool]:
    """open_clip's pretrained tags of ``backbone`` -> whether each was trained with QuickGELU
    (empty for ``tiny`` and for architectures without releases)."""
    if backbone == "tiny":
        return {}
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(backbone)
    return {t: bool(open_clip.get_pretrained_cfg(backbone, t).get("quick_gelu", False)) for t in tags}


def _weights_activation(source: WeightsSource | None, openai_file: bool) -> tuple[bool | None, str]:
    """(what the weights themselves say: True/False/None = cannot tell, why)."""
    if source is not None and openai_file:
        return True, f"'{source.path}' is an OpenAI checkpoint (TorchScript archive or state dict with input_resolution), trained with QuickGELU"
    if source is not None and source.kind == "tag":
        act = "QuickGELU" if source.quick_gelu else "GELU"
        return source.quick_gelu, f"open_clip records the pretrained tag '{source.tag}' as trained with {act}"
    return None, ""


def choose_quick_gelu(
    backbone: str,
    *,
    requested: bool | None,
    arch_quick_gelu: bool,
    source: WeightsSource | None,
    openai_file: bool = False,
    config_activation: bool = False,
) -> bool:
    """Whether ``backbone`` must run QuickGELU (True) or GELU (False); rules in the module docstring.

    Args:
        requested: the caller's ``quick_gelu``: None = decide from the evidence (auto).
        arch_quick_gelu: the architecture config's own flag (True for ``-quickgelu`` names).
        source: the resolved weights (None or kind "random" for random weights).
        openai_file: :func:`read_state_dict` recognised the file as OpenAI's.
        config_activation: the method runs the architecture config's activation whatever the
            weights say (auto -> ``arch_quick_gelu``); an explicit request is then checked against
            the name only, so a saved detector of such a method reloads as it ran.

    Raises:
        InvalidValueError: ``requested`` contradicts the architecture name or the weights.
        ClipadError: auto, and a file whose activation cannot be told for an architecture whose
            releases use both.
    """
    if requested is not None and not isinstance(requested, bool):
        raise InvalidTypeError(f"quick_gelu must be None (auto), True or False; got {requested!r}")
    weights_say, why = _weights_activation(source, openai_file)
    if config_activation:
        weights_say = None  # the method's official code ignores what the weights were trained with
        if requested is None:
            return arch_quick_gelu
    if requested is not None:
        if arch_quick_gelu and not requested:
            raise InvalidValueError(
                f"quick_gelu=False contradicts the backbone name '{backbone}', whose '-quickgelu' architecture is "
                f"built with QuickGELU; drop quick_gelu (or pass True), or use '{backbone.removesuffix('-quickgelu')}' "
                "for GELU weights"
            )
        if weights_say is not None and weights_say != requested:
            raise InvalidValueError(
                f"quick_gelu={requested} contradicts the weights: {why}; running them with "
                f"{'QuickGELU' if requested else 'GELU'} changes every output. Drop quick_gelu (auto) or pass {weights_say}"
            )
        return requested
    if arch_quick_gelu:
        return True
    if weights_say is not None:
        return weights_say
    if source is None or source.kind != "file":  # random weights: the architecture's own activation
        return False
    releases = release_activations(backbone)
    kinds = set(releases.values())
    if len(kinds) > 1:
        quick = ", ".join(t for t, q in releases.items() if q)
        plain = ", ".join(t for t, q in releases.items() if not q)
        import open_clip

        named = f"{backbone}-quickgelu"
        alias = f", or backbone '{named}'" if named in open_clip.list_models() else ""
        raise ClipadError(
            f"cannot tell whether the weights in '{source.path}' were trained with QuickGELU or GELU: the file "
            f"does not say (OpenAI's and open_clip's state dicts have the same keys), and open_clip's releases of "
            f"'{backbone}' use both (QuickGELU: {quick}; GELU: {plain}). Pass quick_gelu=True (CLI: --quick-gelu on{alias}) "
            "for OpenAI-trained weights or the QuickGELU releases, quick_gelu=False (--quick-gelu off) for the GELU "
            "ones; the wrong choice gives no error, only worse features"
        )
    return kinds == {True}
