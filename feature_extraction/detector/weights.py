"""Loading and saving BUTD detector weights: pure converters for the two published layouts.

Layouts
-------
``hub``  ``unc-nlp/frcnn-vg-finetuned/pytorch_model.bin``: a plain torch state dict, 640 keys, detectron2
         names, ``nn.BatchNorm2d`` norms (with ``num_batches_tracked``), anchors stored as
         ``proposal_generator.anchor_generator.cell_anchors.0``. Old ``gamma``/``beta`` names are accepted.
``d2``   py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``: a pickle of
         ``{"model": {name: numpy array}, "__author__": ..., ...}`` with the same detectron2 names and
         FrozenBatchNorm norms. Loaded as that code loads it: a norm without ``running_mean``/``running_var``
         gets 0/1 (FrozenBatchNorm2d._load_from_state_dict, version None); absent cell anchors are generated.
         Background is the LAST class there too (detectron2's FastRCNNOutputLayers: K foreground + 1, and
         inference drops ``scores[:, :-1]``), and the anchors are detectron2's size-major DefaultAnchorGenerator
         order, the order the hub port inherited: no class or anchor permutation is needed.
``ldot`` our own directory: ``config.json`` + ``model.safetensors`` (hub names without ``num_batches_tracked``).

Every converter is a pure function state dict -> state dict that checks names and shapes against the model
built from the config, and raises :class:`DetectorWeightsError` listing missing, unexpected and mis-shaped keys.
Pickles are only read through :class:`RestrictedUnpickler` (numpy arrays and plain containers) or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feature_extraction.detector.config import DetectorConfig, RuntimeOptions
from feature_extraction.detector.network import BUTDDetector, cell_anchors
from feature_extraction.errors import FeatureExtractionError

FORMAT_NAME = "ldot-butd-detector"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
SENTINEL_KEY = "backbone.stem.conv1.weight"


class DetectorWeightsError(FeatureExtractionError, ValueError):
    """A checkpoint that does not fit the detector (lists what is missing / unexpected / mis-shaped)."""


class UnsafePickleError(FeatureExtractionError, pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays and plain containers."""


# --------------------------------------------------------------------------- restricted unpickling
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED: dict[tuple[str, str], str] = {
    **{(m, "_reconstruct"): "multiarray._reconstruct" for m in _NUMPY_CORE[:2]},
    **{(m, "scalar"): "multiarray.scalar" for m in _NUMPY_CORE[:2]},
    **{(m, "_frombuffer"): "numeric._frombuffer" for m in _NUMPY_CORE[2:]},
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("collections", "OrderedDict"): "OrderedDict",
    ("_codecs", "encode"): "codecs.encode",  # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
}


def _numpy_attr(path: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    if path == "ndarray":
        return np.ndarray
    if path == "dtype":
        return np.dtype
    module, name = path.split(".")
    return getattr(getattr(core, module), name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, numpy scalars/dtypes and plain containers.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
    :class:`UnsafePickleError` before it is imported or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        key = _ALLOWED.get((module, name))
        if key is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from a weights pickle: only numpy arrays and plain "
                "containers are allowed (this file may be malicious or not a detectron2 weights file)"
            )
        if key == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if key == "codecs.encode":
            import codecs

            return codecs.encode
        return _numpy_attr(key)


def read_restricted_pickle(path: str | Path) -> Any:
    """Read a (possibly Python 2, latin-1) pickle of numpy arrays safely."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


# --------------------------------------------------------------------------- converters
def expected_shapes(config: DetectorConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the detector's state dict for ``config`` (built on the meta device)."""
    with torch.device("meta"):
        model = BUTDDetector(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(state: dict[str, torch.Tensor], config: DetectorConfig, source: str) -> dict[str, torch.Tensor]:
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    bad = sorted(f"{k}: file {tuple(state[k].shape)} != model {want[k]}" for k in set(want) & set(state)
                 if tuple(state[k].shape) != want[k])
    if missing or unexpected or bad:
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20} more)" if len(xs) > 20 else "") if xs else "none"

        raise DetectorWeightsError(
            f"{source} checkpoint does not match the detector config: "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; shape mismatches [{show(bad)}]"
        )
    return state


def _rename_old(key: str) -> str:
    head, _, last = key.rpartition(".")
    last = {"gamma": "weight", "beta": "bias"}.get(last, last)
    return f"{head}.{last}" if head else last


def convert_hub_state_dict(state: Mapping[str, Any], config: DetectorConfig | None = None) -> dict[str, torch.Tensor]:
    """``unc-nlp/frcnn-vg-finetuned`` state dict (or ours) -> this detector's state dict.

    Renames ``gamma``/``beta`` to ``weight``/``bias``, drops BatchNorm ``num_batches_tracked`` counters, casts
    floating tensors to float32 and checks every name and shape (raises :class:`DetectorWeightsError`).
    """
    cfg = config or DetectorConfig()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not isinstance(value, torch.Tensor):
            raise DetectorWeightsError(f"hub checkpoint value for {key!r} is a {type(value).__name__}, not a tensor")
        new = _rename_old(key)
        if new in out:
            raise DetectorWeightsError(f"hub checkpoint has both {key!r} and its new name {new!r}")
        out[new] = value.float() if value.is_floating_point() else value
    return _check(out, cfg, "hub")


def convert_d2_state_dict(state: Mapping[str, Any], config: DetectorConfig | None = None) -> dict[str, torch.Tensor]:
    """py-bottom-up-attention (detectron2 ``.pkl``) model dict of numpy arrays -> this detector's state dict."""
    cfg = config or DetectorConfig()
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    caffe2 = [k for k in list(state)[:50] if k.endswith(("_w", "_b", "_s")) and "." not in k]
    if caffe2:
        raise DetectorWeightsError(
            f"this pickle uses Caffe2 blob names ({caffe2[:3]} ...), not detectron2 module names; "
            "only py-bottom-up-attention's detectron2-format weights are supported"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(np.array(value, copy=True))
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().clone()
        else:
            raise DetectorWeightsError(f"pickle value for {key!r} is a {type(value).__name__}, not an array")
        out[_rename_old(key)] = tensor.float() if tensor.is_floating_point() else tensor
    # FrozenBatchNorm2d of that code fills absent statistics with 0 / 1 (no eps adjustment for version None).
    for key in [k for k in out if k.endswith(".norm.weight")]:
        prefix = key[: -len("weight")]
        if prefix + "bias" in out:
            out.setdefault(prefix + "running_mean", torch.zeros_like(out[key]))
            out.setdefault(prefix + "running_var", torch.ones_like(out[key]))
    if ANCHORS_KEY not in out:
        out[ANCHORS_KEY] = cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)
    return _check(out, cfg, "detectron2 .pkl")


def detect_layout(state: Mapping[str, Any]) -> str:
    """``"d2"`` for a py-bottom-up-attention pickle payload, ``"hub"`` for a torch state dict."""
    if "model" in state and isinstance(state["model"], Mapping):
        return "d2"
    values = list(state.values())[:5]
    if any(isinstance(v, np.ndarray) for v in values):
        return "d2"
    if SENTINEL_KEY in state or any(k.startswith("backbone.") for k in state):
        return "hub"
    raise DetectorWeightsError(
        f"unrecognised detector checkpoint (no {SENTINEL_KEY!r}); first keys: {list(state)[:5]}"
    )


def convert_state_dict(state: Mapping[str, Any], config: DetectorConfig | None = None) -> dict[str, torch.Tensor]:
    """Sniff the layout by its sentinel keys and convert."""
    layout = detect_layout(state)
    return convert_d2_state_dict(state, config) if layout == "d2" else convert_hub_state_dict(state, config)


# --------------------------------------------------------------------------- files
def read_checkpoint(path: str | Path) -> tuple[Mapping[str, Any], DetectorConfig | None]:
    """Read weights from a file or an ldot/hub directory; returns (raw state, config if the file has one)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_FILE, "pytorch_model.bin"):
            if (path / name).is_file():
                return _read_file(path / name, config_dir=path)
        pkls = sorted(path.glob("*.pkl"))
        if len(pkls) == 1:
            return _read_file(pkls[0])
        raise DetectorWeightsError(f"no {WEIGHTS_FILE}, pytorch_model.bin or single .pkl in {path}")
    if not path.is_file():
        raise DetectorWeightsError(f"detector weights not found: {path}")
    return _read_file(path, config_dir=path.parent if path.name == WEIGHTS_FILE else None)


def _read_file(path: Path, config_dir: Path | None = None) -> tuple[Mapping[str, Any], DetectorConfig | None]:
    suffix = path.suffix.lower()
    config = None
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        if config_dir is not None and (config_dir / CONFIG_FILE).is_file():
            config = read_config(config_dir)
        return load_file(str(path)), config
    if suffix == ".pkl":
        data = read_restricted_pickle(path)
        if not isinstance(data, Mapping):
            raise DetectorWeightsError(f"{path} holds a {type(data).__name__}, not a dict of weights")
        return data, None
    if suffix in (".bin", ".pt", ".pth"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), None
        except pickle.UnpicklingError as exc:
            raise UnsafePickleError(f"refusing to load {path}: {exc}") from exc
    raise DetectorWeightsError(f"unknown detector weights format {suffix!r} ({path}); expected .bin, .pkl or .safetensors")


def read_config(directory: str | Path) -> DetectorConfig:
    """The ``DetectorConfig`` of an ldot detector directory (refuses other formats / newer versions)."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DetectorWeightsError(f"cannot read {path} ({exc}): re-download or re-import the detector") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DetectorWeightsError(f"{directory} is not an {FORMAT_NAME} directory (format={found!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DetectorWeightsError(f"{path}: format_version {version!r} is not a number: re-download the detector")
    if version > FORMAT_VERSION:
        raise DetectorWeightsError(
            f"{directory} was written by a newer ldot (format version {version} > {FORMAT_VERSION}); "
            "upgrade ldot to read it"
        )
    return DetectorConfig.from_dict(meta.get("config"), str(path))


def load_detector(
    source: str | Path | Mapping[str, Any],
    config: DetectorConfig | None = None,
    device: str | torch.device = "cpu",
    options: RuntimeOptions | None = None,
    dtype: torch.dtype = torch.float32,
) -> BUTDDetector:
    """Build the detector and load weights strictly from a path (``.bin``, ``.pkl``, ``.safetensors``, a
    directory) or an in-memory state dict; the layout is sniffed from the suffix and sentinel keys.

    ``options`` (default: all speed-ups on) are applied after loading; ``dtype`` other than float32 is meant for
    CUDA only.
    """
    if dtype != torch.float32 and torch.device(device).type != "cuda":
        raise ValueError(f"{dtype} is only supported on CUDA; on CPU the detector runs in float32")
    if isinstance(source, Mapping):
        raw, file_config = source, None
    else:
        raw, file_config = read_checkpoint(source)
    cfg = config or file_config or DetectorConfig()
    state = convert_state_dict(raw, cfg)
    model = BUTDDetector(cfg, options)
    model.load_state_dict(state, strict=True)
    model.optimize()
    return model.to(device=device, dtype=dtype)


def save_detector(model: BUTDDetector, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (loadable with :func:`load_detector`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    tmp.replace(directory / WEIGHTS_FILE)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "bn_folded": bool(model.options.fold_bn),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def open_detector(name: str, device: str = "auto", half: bool = False) -> BUTDDetector:
    """The BUTD detector from a registry name, model folder or weights file, on ``device``."""
    import torch

    from feature_extraction.detector.weights import load_detector
    from models.core.device import pick_device
    from models.hub.installed import check_model_files
    from models.hub.load import resolve_source

    dev = pick_device(device)
    if half and dev.type != "cuda":
        raise FeatureExtractionError("half precision runs on a GPU only (on the CPU the detector runs in float32)")
    source = resolve_source(name)
    if source.is_dir():
        check_model_files(source)  # damaged weights are refused before they are used
    return load_detector(source, device=dev, dtype=torch.float16 if half else torch.float32)
