"""GGUF files: a small, validating reader and the conversion to a transformers model.

gguf-py's GGUFReader builds a numpy view per metadata element, which takes seconds on a 150k-token
vocabulary; this reader parses the header with `struct` and maps tensor data lazily, checking every
offset against the file size so a truncated or corrupt file fails with a clear message instead of a
numpy error deep inside a dequantizer.

Config and tokenizer are converted by transformers' GGUF integration, which is slow for large
vocabularies, so the result is cached in `~/.cache/lmpress/gguf/<sha256>/` (or `$LMPRESS_CACHE`).
Weights are dequantized with the `gguf` package on every load (every type it knows).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptModel, UnsupportedModel

MAGIC = b"GGUF"

# GGUF value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first): GGUF stores ne0 (the contiguous dim) first
    qtype: int
    offset: int  # absolute offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _mm: mmap.mmap | None = None

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 array of shape [rows, bytes_per_row] (a view of the mapped file)."""
        t = self.tensors[name]
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return buf.reshape(rows, t.nbytes // rows)

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """Dequantized array in torch's shape order, float32, or `dtype` (np.float16: each slice rounded as it is
        dequantized, so no float32 copy of the whole tensor is ever held)."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.qtype)
        raw = self.raw(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            out = raw.view(np.float32).astype(dtype)  # a copy: own the memory, the mapping is read-only
        elif qtype == gguf.GGMLQuantizationType.F16:
            out = raw.view(np.float16).astype(dtype)
        else:  # in slices of rows: numpy's dequantization makes several temporaries of its output's size
            try:
                step = max(1, (1 << 24) // max(1, raw.shape[1]))  # ~16 MB of packed bytes per slice
                out = None
                for i in range(0, raw.shape[0], step):
                    part = gguf.quants.dequantize(raw[i:i + step], qtype)  # [rows of the slice, row width]
                    if out is None:
                        out = np.empty((raw.shape[0],) + part.shape[1:], dtype=dtype)
                    out[i:i + step] = part
            except NotImplementedError as e:
                raise UnsupportedModel(f"{self.path.name}: tensor {name} has type {qtype.name}, which the installed "
                                       f"gguf package cannot dequantize (pip install -U gguf)") from e
        return out.astype(dtype, copy=False).reshape(t.shape)

    def drop_pages(self):
        """Unmap the file pages read so far from this process (they stay in the OS page cache; the next read
        faults them back in): streaming reads the file block by block, and without this every page read stays
        in the process's resident memory until the end — 490 MB for Qwen2.5-0.5B's Q4_K_M file."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self):
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n):
        if self.pos + n > len(self.buf):
            raise CorruptModel(f"{self.path}: GGUF header is truncated (needed {n} bytes at offset {self.pos}); "
                               f"the file is incomplete, download or copy it again")

    def scalar(self, vtype):
        fmt = _SCALARS[vtype]
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self):
        n = self.scalar(10)
        if n > 1 << 30:
            raise CorruptModel(f"{self.path}: GGUF string of {n} bytes at offset {self.pos}: the file is corrupt")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar(4), self.scalar(10)
            if etype in _NP:  # numeric arrays in one read
                size = np.dtype(_NP[etype]).itemsize * count
                self.need(size)
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos).copy()
                self.pos += size
                return arr
            if etype not in (8, 9):
                raise CorruptModel(f"{self.path}: unknown GGUF array element type {etype}: the file is corrupt")
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise CorruptModel(f"{self.path}: unknown GGUF value type {vtype} at offset {self.pos}: the file is corrupt")
        return self.scalar(vtype)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header; tensor data stays memory-mapped. Raises CorruptModel on any inconsistency."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise CorruptModel(f"{path}: not a GGUF file (no 'GGUF' magic at the start)")
        if size < 24:
            raise CorruptModel(f"{path}: GGUF header is truncated ({size} bytes); download or copy it again")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(mm, path)
    cur.pos = 4
    version = cur.scalar(4)
    if version not in (2, 3):
        mm.close()
        raise UnsupportedModel(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        mm.close()
        raise CorruptModel(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys: the file is corrupt")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.scalar(4)
        if ndim > 8:
            raise CorruptModel(f"{path}: tensor {name} has {ndim} dimensions: the file is corrupt")
        ne = [cur.scalar(10) for _ in range(ndim)]
        qtype, offset = cur.scalar(4), cur.scalar(10)
        infos.append((name, ne, qtype, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    out = GGUFFile(path=path, version=version, metadata=meta, _mm=mm)
    for name, ne, qtype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            out.close()
            raise UnsupportedModel(f"{path}: tensor {name} has unknown GGML type {qtype} (pip install -U gguf)")
        n = int(np.prod(ne)) if ne else 1
        if ne and ne[0] % block:
            out.close()
            raise CorruptModel(f"{path}: tensor {name} row of {ne[0]} is not a multiple of its block size {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            out.close()
            raise CorruptModel(f"{path}: tensor {name} ends at byte {start + nbytes} but the file has only {size} "
                               f"bytes: the file is truncated, download or copy it again")
        out.tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("LMPRESS_CACHE", Path.home() / ".cache" / "lmpress"))


def converted_dir(path: Path) -> Path:
    """Folder holding config.json and tokenizer files converted from this GGUF (made once per file hash)."""
    target = cache_root() / "gguf" / file_sha256(path)
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            try:
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except IndexError:  # a special-token id outside the vocabulary (e.g. 0xFFFFFFFF for "none")
                tok = _tokenizer_from_metadata(read_gguf(path))
        except (ValueError, KeyError, NotImplementedError) as e:
            raise UnsupportedModel(f"{path}: transformers cannot convert this GGUF's config or tokenizer ({e})") from e
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # GGUF writes 0xFFFFFFFF for "none"
            v = getattr(config, key, None)
            if isinstance(v, int) and not 0 <= v < config.vocab_size:
                setattr(config, key, None)
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tokenizer_from_metadata(gf: GGUFFile):
    """transformers' GGUF tokenizer conversion, fed with metadata whose invalid special-token ids are dropped."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING

    meta, tokens = gf.metadata, gf.metadata.get("tokenizer.ggml.tokens", [])
    gf.close()
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
    for key in list(tok_dict):  # numeric arrays come back as numpy; the converter wants lists
        if isinstance(tok_dict[key], np.ndarray):
            tok_dict[key] = tok_dict[key].tolist()
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tokens):
            tok_config[name] = tokens[int(tid)]
    backend, extra = convert_gguf_tokenizer(gf.arch, tok_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)


def gguf_state_dict(gf: GGUFFile, model: torch.nn.Module, keys: set[str] | None = None,
                    dtype=np.float32) -> dict[str, torch.Tensor]:
    """Dequantize the tensors of `gf` and name them as `model` (built from the converted config) expects; only
    those `keys` of the model's state dict when given (streaming reads one block at a time). dtype: of the
    dequantized values (GGUFFile.tensor)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    cfg = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(gf.arch, TensorProcessor)(config=cfg)
    mapping = _name_map(gf, model, processor)
    parsed = {"config": cfg, "tensors": {}}
    out = {}
    for name in gf.tensors:
        if keys is not None and name in mapping and mapping[name] not in keys:
            continue  # (an unmapped tensor may be split by the processor into wanted pieces: processed)
        res = processor.process(weights=gf.tensor(name, dtype), name=name, tensor_key_mapping=mapping,
                                parsed_parameters=parsed)
        if res.name in mapping:
            out[mapping[res.name]] = torch.from_numpy(np.ascontiguousarray(res.weights))
    out.update(parsed["tensors"])  # processors that split fused tensors put the pieces here
    return out if keys is None else {k: v for k, v in out.items() if k in keys}


def _name_map(gf: GGUFFile, model: torch.nn.Module, processor) -> dict[str, str]:
    """GGUF tensor name -> state-dict key, from gguf-py's table of standard names (one table, built once)."""
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gf.arch), None)
    if arch is None:
        raise UnsupportedModel(f"{gf.path}: GGUF architecture '{gf.arch}' is unknown to the installed gguf package")
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    mapping = {}
    for key in model.state_dict():
        base, dot, suffix = processor.preprocess_name(key).rpartition(".")
        parts = base.split(".")
        for i in range(len(parts)):  # names may be relative to a sub-module (e.g. "transformer.h.0..." vs "h.0...")
            g = table.get_name(".".join(parts[i:]))
            if g is not None:
                mapping.setdefault(f"{g}.{suffix}", key)
                break
    return mapping
