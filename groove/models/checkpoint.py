"""Where a model lives and what is in it, read without loading any weights.

A MODEL argument is a local checkpoint directory or a Hugging Face hub id. Everything here
reads only ``config.json`` and safetensors headers, so it is fast, needs no torch, and works
the same for the relay-side tools (``groove info``), the consumer and the node.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    *CONFIG_FILES,
]
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelError(Exception):
    """A model that cannot be found or used; the message is meant for the user as is."""


@dataclass
class TensorMeta:
    name: str
    dtype: str
    shape: list[int]
    file: str
    nbytes: int


@dataclass
class ModelRef:
    source: str
    name: str
    local_dir: Path | None  # None for a hub id

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None


@dataclass
class Checkpoint:
    ref: ModelRef
    config: dict
    tensors: dict[str, TensorMeta] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return HEAD_KEY not in self.tensors

    def layer_tensors(self, index: int) -> list[TensorMeta]:
        prefix = f"model.layers.{index}."
        return [t for n, t in self.tensors.items() if n.startswith(prefix)]

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.tensors)


def resolve(model: str, name: str | None = None) -> ModelRef:
    """Turn a MODEL argument into a reference; the network name is the hub id or the
    directory's basename unless ``name`` overrides it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {model} has no config.json (is it a Hugging Face checkpoint?)")
        return ModelRef(source=str(path.resolve()), name=name or path.resolve().name, local_dir=path.resolve())
    if path.exists():
        raise ModelError(f"model path {model} is a file; give the checkpoint's directory")
    looks_like_path = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
    if looks_like_path or not _HUB_ID.match(model):
        raise ModelError(f"model {model} not found: no such directory, and it is not a hub id like 'Qwen/Qwen2.5-0.5B'")
    return ModelRef(source=model, name=name or model, local_dir=None)


def hub_file(ref: ModelRef, filename: str, required: bool = True) -> Path | None:
    """A file of the checkpoint on local disk, downloaded (and cached) for hub ids."""
    if ref.local_dir is not None:
        p = ref.local_dir / filename
        if p.is_file():
            return p
        if required:
            raise ModelError(f"{filename} is missing from {ref.local_dir}")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(ref.source, filename))
    except EntryNotFoundError:
        if required:
            raise ModelError(f"{filename} is missing from hub model {ref.source}") from None
        return None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        if not required and "404" in str(exc):
            return None
        raise ModelError(f"cannot fetch {filename} of {ref.source} from the hub: {exc}") from None


MAX_TOKENIZER_BYTES = 64 << 20


def tokenizer_files(ref: ModelRef) -> dict[str, bytes]:
    """The checkpoint's tokenizer files by name (downloaded for hub ids), for a node to hand
    to the relay. Empty when there are none or they cannot be fetched: the node still
    serves, only the relay's HTTP API cannot tokenize for this model."""
    if ref.local_dir is not None:
        folder = ref.local_dir
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(ref.source, allow_patterns=TOKENIZER_PATTERNS))
        except Exception:  # the hub client raises many kinds of network errors
            return {}
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_PATTERNS if (folder / name).is_file()}
    if not ({"tokenizer.json", "tokenizer.model", "vocab.json"} & files.keys()) or sum(map(len, files.values())) > MAX_TOKENIZER_BYTES:
        return {}
    return files


def files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()[:16] if files else ""


def read_config(ref: ModelRef) -> dict:
    path = hub_file(ref, "config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def read_safetensors_header(path: Path) -> dict:
    return safetensors_layout(path)[0]


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """A safetensors file's header, and where its data starts (tensors' ``data_offsets``
    count from there)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes is implausible")
            return json.loads(f.read(n)), 8 + n
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from None


def weight_files(ref: ModelRef) -> list[str]:
    index = hub_file(ref, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if ref.local_dir is not None and not (ref.local_dir / "model.safetensors").is_file():
        if list(ref.local_dir.glob("*.bin")) or list(ref.local_dir.glob("*.pt")):
            raise ModelError(f"{ref.local_dir} holds only pickle weights (.bin/.pt); Groove loads safetensors only")
        raise ModelError(f"{ref.local_dir} has no model.safetensors or model.safetensors.index.json")
    return ["model.safetensors"]


def read_tensor_index(ref: ModelRef) -> dict[str, TensorMeta]:
    """Name -> dtype/shape/file for every tensor, from headers alone (remote headers for hub ids)."""
    files = weight_files(ref)
    headers: dict[str, dict] = {}
    if ref.local_dir is not None:
        for fname in files:
            headers[fname] = read_safetensors_header(ref.local_dir / fname)
    else:
        from huggingface_hub import get_safetensors_metadata

        try:
            meta = get_safetensors_metadata(ref.source)
        except Exception as exc:  # network or auth errors from the hub client vary widely
            raise ModelError(f"cannot read the safetensors metadata of {ref.source}: {exc}") from None
        for fname, fmeta in meta.files_metadata.items():
            headers[fname] = {
                n: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                for n, t in fmeta.tensors.items()
            }
    out: dict[str, TensorMeta] = {}
    for fname, header in headers.items():
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = TensorMeta(name, info["dtype"], list(info["shape"]), fname, end - start)
    return out


def load(model: str, name: str | None = None) -> Checkpoint:
    ref = resolve(model, name)
    return Checkpoint(ref=ref, config=read_config(ref), tensors=read_tensor_index(ref))


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash"}


def fingerprint(config: dict, tensors: dict[str, TensorMeta]) -> str:
    """Hash of the config and the tensor layout (DESIGN.md). Nodes are only ever chained
    when their fingerprints agree, whatever name they were started under."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{t.shape}\n".encode())
    return h.hexdigest()[:16]

