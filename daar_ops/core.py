"""The ground floor every other module stands on: key names, the one budget rule, the one JSONL
reader/writer, ranking with the package-wide tie rule, and null-safe stats/meta access.

No Data-Juicer import, no model, no numpy-heavy math: everything above (algorithms, models, ops,
pipeline, reports, tools) imports from here instead of repeating a literal or a rule.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

# -------------------------------------------------------------------------------------------------
# key names: Data-Juicer's columns and every stats/meta key an operator of this package writes

STATS_FIELD = "__dj__stats__"
META_FIELD = "__dj__meta__"

# DaaR stage 1 (domain_pseudo_label_mapper)
PSEUDO_DOMAIN_KEY = "daar_pseudo_domain"          # meta: nearest domain's name
DOMAIN_SIMILARITY_KEY = "daar_domain_similarity"  # stats: one similarity per domain
CENTROIDS_SHA_KEY = "daar_centroids_sha256"       # stats: which centroid file labelled the sample
SYNTHESIS_META_KEY = "daar_synthesis"             # meta of synthetic samples
# DaaR stage 2 (diversity_reward_filter / diversity_reward_selector)
REWARD_KEY = "daar_diversity_reward"
PROBS_KEY = "daar_domain_probs"
PROBE_DOMAIN_KEY = "daar_probe_domain"
CHECKPOINT_SHA_KEY = "daar_checkpoint_sha256"     # stats: which probe checkpoint scored the sample
# Section 3 contrastive pools
PHI_INTER_KEY = "daar_phi_inter"
PHI_INTRA_KEY = "daar_phi_intra"
# QDIT
QDIT_RANK_KEY = "qdit_rank"
QDIT_GAIN_KEY = "qdit_gain"
# DS2
DS2_RATING_KEY = "ds2_rating"
DS2_RATING_FAILURES_KEY = "ds2_rating_failures"
DS2_RATING_MASS_KEY = "ds2_rating_mass"
DS2_SCORE_KEY = "ds2_score"
DS2_RAW_KEY = "ds2_raw_score"
DS2_CURATED_KEY = "ds2_curated_score"
DS2_CORRUPTED_KEY = "ds2_corrupted"
DS2_CONFIDENCE_KEY = "ds2_confidence"
DS2_LONG_TAIL_KEY = "ds2_long_tail"
DS2_SELECTED_KEY = "ds2_selected"

# Ground truth of the example pools: evaluation tools may read it, selection never does.
GROUND_TRUTH_DOMAIN_FIELD = "domain"
# fields of the example pools that only evaluation reads: removed from what selection methods get
EVAL_ONLY_FIELDS = (GROUND_TRUTH_DOMAIN_FIELD, "source")


def as_dict(value: Any) -> dict[str, Any]:
    """A stats/meta cell as a fresh dict: a missing, null or non-dict value is empty.

    Every op reads ``__dj__stats__`` / ``__dj__meta__`` through this, so one bad row never raises
    inside a batch (which Data-Juicer's ``skip_op_error`` would turn into a lost batch)."""
    return dict(value) if isinstance(value, Mapping) else {}


def is_number(value: Any) -> bool:
    """A finite real number; bools are not numbers here (a parameter check's first test)."""
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; an unavailable CUDA device is
    a ValueError. Callers above the algorithms resolve devices; algorithms receive the result."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return device


def default_pool() -> str:
    """The pool every command uses by default: ``$DAAR_OPS_POOL``, else the shared example pool
    beside a source checkout (``../shared/data/daar_pool/``); a wheel user passes ``--pool``."""
    env = os.environ.get("DAAR_OPS_POOL")
    if env:
        return env
    return str(Path(__file__).resolve().parents[2] / "shared" / "data" / "daar_pool" /
               "daar_pool.jsonl.gz")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that reports it, or a CPU with
    AMX or AVX512-BF16 (detected, never assumed: CPUs of one machine kind differ). Elsewhere bf16
    is emulated, as exact as native but slower."""
    import torch

    if str(device).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: read the CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` where :func:`native_bf16` holds for ``device``, else ``float32``;
    any other name is checked and normalised (``bf16`` -> ``bfloat16``)."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]


def uniform_dicts(cells: Sequence[Any]) -> list[dict[str, Any]]:
    """The stats/meta cells of a batch as dicts with the same keys (a missing key is None).

    An Arrow struct column has one set of fields; a batch where one row's cell was null (now
    ``{}`` plus an op's keys) and another's carried other keys must not leave the writer to infer
    a field's type from rows that lack it (it then types the field ``null`` and fails on the
    next real value)."""
    dicts = [as_dict(c) for c in cells]
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [{k: d.get(k) for k in keys} for d in dicts]


# -------------------------------------------------------------------------------------------------
# the budget rule and ranking


def budget(n: int, ratio: float | None = None, num: int | None = None) -> int:
    """How many of ``n`` samples a selection keeps: exactly one of ``ratio`` (in [0, 1]; keeps
    ``floor(ratio * n)``, as Data-Juicer's ``topk_specified_field_selector``) and ``num`` (an
    integer >= 0; all ``n`` when larger). The one rule of every method in this package, so the
    same ratio keeps the same count for DaaR, QDIT, DS2 and the contrastive bands."""
    if (ratio is None) == (num is None):
        raise ValueError("give exactly one of a ratio and a number of samples")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num is not None:
        if isinstance(num, bool) or int(num) != num or num < 0:
            raise ValueError(f"the number of samples must be an integer >= 0, got {num!r}")
        return min(int(num), n)
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the ratio must be in [0, 1], got {ratio}")
    # The epsilon keeps e.g. 0.7 * 90 (= 62.999999999999993) from flooring to 62.
    return min(n, int(math.floor(ratio * n + 1e-9)))


def rank_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices best first: score descending, ties to the earlier sample, non-finite last.

    The package-wide tie rule: deterministic and independent of sort stability."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    key = np.where(finite, s, -np.inf)
    idx = np.arange(len(s))
    # lexsort: last key is primary. Primary: non-finite after finite; then -score; then index.
    return np.lexsort((idx, -key, ~finite))


# -------------------------------------------------------------------------------------------------
# JSONL in and out


@dataclass
class JsonlReport:
    """What :func:`read_jsonl` met besides records: malformed lines and lines whose bytes were
    not valid UTF-8 (read with ``surrogateescape``, so nothing is replaced; those lines are kept).

    A location is the line number when one file is read, ``"<shard>:<line>"`` when a folder of
    shards is read, so every report names the file it is about."""

    path: str
    malformed: list[int | str] = field(default_factory=list)
    non_dict: list[int | str] = field(default_factory=list)
    invalid_utf8: list[int | str] = field(default_factory=list)

    @property
    def skipped(self) -> list[int | str]:
        return sorted(self.malformed + self.non_dict, key=_location_key)

    def message(self) -> str:
        parts = []
        if self.malformed:
            parts.append(f"{len(self.malformed)} lines skipped that are not JSON or nest too "
                         f"deeply (first: {_where(self.malformed[0])})")
        if self.non_dict:
            parts.append(f"{len(self.non_dict)} JSON lines skipped that are not objects (first: "
                         f"{_where(self.non_dict[0])})")
        if self.invalid_utf8:
            parts.append(f"{len(self.invalid_utf8)} lines with bytes that are not UTF-8 kept as "
                         f"\\udcXX escapes (first: {_where(self.invalid_utf8[0])})")
        return f"{self.path}: " + "; ".join(parts) if parts else ""


def _where(location: int | str) -> str:
    return f"line {location}" if isinstance(location, int) else location


def _location_key(location: int | str) -> tuple[str, int]:
    if isinstance(location, int):
        return "", location
    name, _, line = location.rpartition(":")
    return name, int(line)


JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def jsonl_files(path: str | os.PathLike, strict: bool = True) -> list[Path]:
    """The files :func:`iter_jsonl` reads: ``path`` itself, or a folder's JSONL(.gz) shards in name
    order (suffixes in any case). A folder holding any other entry (hidden ones aside) is refused
    naming it, instead of leaving its records out silently; ``strict=False`` ignores them (a
    second pass over a folder that was already read strictly)."""
    path = Path(path)
    if path.is_dir():
        entries = sorted(q for q in path.iterdir() if not q.name.startswith("."))
        shards = [q for q in entries if q.is_file() and q.name.lower().endswith(JSONL_SUFFIXES)]
        others = [q.name + ("/" if q.is_dir() else "") for q in entries if q not in shards]
        if others and strict:
            raise ValueError(
                f"{path}: a folder of shards may hold only JSONL files ({', '.join(JSONL_SUFFIXES)}"
                f"), but it also holds {', '.join(others[:5])}"
                + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                + "; rename them to .jsonl to read them or move them out of the folder")
        return shards
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def iter_jsonl(path: str | os.PathLike, report: JsonlReport | None = None, strict: bool = True
               ) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for every non-blank line of a JSONL(.gz) file or a directory of
    shards (``strict``: see :func:`jsonl_files`); a line that is not a JSON object yields
    ``(line, None)`` and is noted in ``report``.

    A UTF-8 byte-order mark at the start of a file is dropped; a line nested too deeply for the
    JSON parser is malformed (skipped and reported), not a crash. A truncated or corrupt ``.gz``
    is a ValueError naming the file (not a bare EOFError)."""
    path = Path(path)
    report = report if report is not None else JsonlReport(str(path))
    files = jsonl_files(path, strict)
    sharded = path.is_dir()
    for file in files:
        with _reading(file), _open_bytes(file) as handle:
            for number, raw in enumerate(handle, 1):
                where = f"{file.name}:{number}" if sharded else number
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="surrogateescape")
                    report.invalid_utf8.append(where)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    report.malformed.append(where)
                    yield number, None
                    continue
                if not isinstance(record, dict):
                    report.non_dict.append(where)
                    yield number, None
                    continue
                yield number, record


_BOM = b"\xef\xbb\xbf"


def _open_bytes(file: Path):
    return gzip.open(file, "rb") if file.name.lower().endswith(".gz") else open(file, "rb")


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A truncated or corrupt file read inside is a ValueError naming it (not a bare EOFError);
    a missing one stays FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise ValueError(f"{file}: cannot be read to the end ({type(err).__name__}: {err}); is "
                         f"the file truncated or not gzip?") from err


def read_jsonl(path: str | os.PathLike, limit: int | None = None, strict: bool = False
               ) -> tuple[list[dict[str, Any]], JsonlReport]:
    """The records of a JSONL(.gz) file (or directory of shards) and a :class:`JsonlReport`.

    Tolerant by default: malformed lines are skipped and reported; ``strict=True`` makes the first
    one a ValueError naming the file and line."""
    report = JsonlReport(str(path))
    records: list[dict[str, Any]] = []
    for number, record in iter_jsonl(path, report):
        if record is None:
            if strict:
                where = report.skipped[-1] if report.skipped else number
                raise ValueError(f"{path}:{number}: not a JSON object" if isinstance(where, int)
                                 else f"{path}/{where}: not a JSON object")
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records, report


def read_json_records(path: str | os.PathLike, limit: int | None = None) -> list[Any]:
    """The items of a file holding one JSON list (its first non-blank character is ``[``; .gz
    allowed), else the records of JSONL as :func:`read_jsonl` with ``strict=True`` reads them (a
    malformed line is a ValueError naming the file and line). A list's items come as they are,
    objects or not; ``limit`` keeps the first ones."""
    path = Path(path)
    if not (path.is_file() and _first_byte(path) == b"["):
        return read_jsonl(path, limit, strict=True)[0]
    with _reading(path), _open_bytes(path) as handle:
        raw = handle.read()
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid JSON list ({type(err).__name__}: {err})") from err
    return items[:limit]


def _first_byte(file: Path) -> bytes:
    """The file's first byte that is not ASCII whitespace (a byte-order mark skipped); b"" when
    there is none."""
    with _reading(file), _open_bytes(file) as handle:
        head = handle.read(1 << 16)
        head = head[len(_BOM):] if head.startswith(_BOM) else head
        while head:
            head = head.lstrip()
            if head:
                return head[:1]
            head = handle.read(1 << 16)
    return b""


def dumps_record(record: Mapping[str, Any]) -> bytes:
    """One JSONL line as UTF-8 bytes. Text that UTF-8 cannot carry (a lone surrogate from a
    ``"\\ud800"`` escape, or the escapes of invalid input bytes) is written as JSON ``\\u``
    escapes, so the record reads back equal instead of failing after all the work."""
    try:
        return (json.dumps(record, ensure_ascii=False, sort_keys=True, default=_json_default)
                + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True, sort_keys=True, default=_json_default)
                + "\n").encode("ascii")


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records atomically (a temporary file, then a rename); returns the count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "wb") as handle:
            for record in records:
                handle.write(dumps_record(record))
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
