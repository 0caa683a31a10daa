"""Seeded fuzz of the main paths: random JSON values in every field, null / non-dict stats and
meta, random truncations and random bytes in the pool file.

For each case it checks what the package promises:

* the JSONL reader never crashes: records + reported bad lines = non-blank lines;
* every per-sample op (``domain_pseudo_label_mapper``, ``diversity_reward_filter`` without a
  range, ``ds2_rating_filter``) keeps every record and writes its stats for each;
* every selection keeps exactly ``budget(n, ratio)`` records (``diversity_reward_filter`` with
  ``select_ratio``, ``qdit_filter``, ``ds2_filter``): records in = records out + records dropped;
* ``daar-ops select`` (every few cases) either finishes with probe + selection = records read,
  or stops with a one-line user error (ValueError / OSError naming the problem);
* untrusted input and faults (every few cases, issue 22): probe manifests rewritten with their
  checksum recomputed (a tensor file outside the folder, a symlink, shapes larger than the
  tensors, a hub model id) are refused; a pool folder with a non-JSONL file is refused, one with
  a BOM or a deeply nested line loses nothing silently; ``select`` into a folder holding a user's
  file refuses and leaves it intact; a cache on a full or read-only file system (a small tmpfs,
  where the machine lets this process mount one) fails naming the folder and leaves no partial
  chunk.

A crash is any other exception; an unclear error is a user error whose message names nothing
(shorter than 20 characters) or a bare ``KeyError``/``IndexError``/``EOFError``/
``UnicodeError``. Tiny random models are built on the fly; nothing is downloaded. Last line:

    RESULT cases=<n> records_in=<n> records_out_plus_dropped=<n> crashes=<n> unclear_errors=<n>

Usage: ``.venv/bin/python tools/fuzz.py [--seconds 600] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

UNCLEAR = (KeyError, IndexError, EOFError, UnicodeError, AttributeError, TypeError)
FIELDS = ("instruction", "input", "output")


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.randint(-10**6, 10**6)
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, rng.random()])
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4 and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 5 and depth < 2:
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(3))}
    if kind == 6:
        return "".join(rng.choice(["\ud800", "\udfff", "\x00", "é", "😀", "\n", " "])
                       for _ in range(rng.randrange(1, 6)))
    if kind == 7:
        return ""
    if kind == 8:
        return "word " * rng.randrange(200, 800)
    words = ["def", "return", "sum", "7", "84", "Paris", "why", "because", "sort", "list"]
    return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))


def random_record(rng: random.Random, i: int) -> dict:
    rec = {f: random_value(rng) if rng.random() < 0.4 else f"{f} {i} " + str(random_value(rng))
           for f in FIELDS if rng.random() < 0.95}
    rec["id"] = i
    if rng.random() < 0.3:
        rec["__dj__stats__"] = rng.choice([None, "x", 3, [], {}, {"daar_diversity_reward": 9.0},
                                           {"ds2_score": None}, {"ds2_score": 2.0}])
    if rng.random() < 0.3:
        rec["__dj__meta__"] = rng.choice([None, "x", {}, {"daar_pseudo_domain": "qa"}])
    return rec


def write_pool(path: Path, records: list[dict], rng: random.Random) -> int:
    """JSONL with random bad lines; returns the number of non-blank lines written."""
    from daar_ops.core import dumps_record

    lines = [dumps_record(r) for r in records]
    for _ in range(rng.randrange(4)):
        junk = rng.choice([b"{not json\n", b"[1, 2]\n", b"\xff\xfe garbage\n", b"null\n",
                           bytes(rng.randrange(256) for _ in range(20)).replace(b"\n", b"") + b"\n"])
        lines.insert(rng.randrange(len(lines) + 1), junk)
    data = b"".join(lines)
    if rng.random() < 0.3:  # a truncated last line
        data = data[: max(1, len(data) - rng.randrange(1, 15))]
    path.write_bytes(data)
    return sum(1 for line in data.split(b"\n") if line.strip())


class Fuzz:
    def __init__(self, workdir: Path, seed: int):
        from daar_ops.algorithms.synthesis import DomainSpec
        from daar_ops.centroid_file import save_centroids
        from daar_ops.encoders import embed_texts
        from daar_ops.algorithms.probes import TrainConfig
        from daar_ops.features import LayerFeatureExtractor
        from daar_ops.probe_checkpoint import train_probe_checkpoint
        from daar_ops.testing import build_tiny_causal_lm

        self.workdir, self.seed = workdir, seed
        self.model = build_tiny_causal_lm(workdir / "tiny_model")
        words = {"coding": "def return sort list code", "math": "7 84 sum solve",
                 "qa": "Paris capital why because"}
        train = [{"instruction": f"{w} {i}", "input": "", "output": w, "__dj__meta__": {
            "daar_pseudo_domain": d}} for i in range(20) for d, w in words.items()]
        cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-3, val_fraction=0.2, hidden=[16])
        train_probe_checkpoint(train, workdir / "probe", model=str(self.model), layer=2,
                               max_length=32, config=cfg, use_cache=False, progress=False)
        ext = LayerFeatureExtractor(str(self.model), layer=0)
        feats = embed_texts(ext, list(words.values()), "embedding")
        save_centroids(workdir / "centroids", feats, [DomainSpec(d) for d in words],
                       ext.describe(), "embedding", "{instruction} {input} {output}",
                       [1] * len(words))
        self.synthetic = workdir / "synthetic.jsonl"
        self.synthetic.write_text("".join(json.dumps({"instruction": w, "input": "", "output": w,
                                                      "domain": d}) + "\n"
                                          for d, w in words.items()))
        self.cases = self.records_in = self.accounted = self.crashes = self.unclear = 0
        self.fs_skipped = False

    # -- bookkeeping -----------------------------------------------------------------------------
    def _fail(self, where: str, err: BaseException) -> None:
        user = isinstance(err, (ValueError, OSError)) and not isinstance(err, UNCLEAR)
        if user and len(str(err)) >= 20:
            return  # a clear user error is a defined outcome
        if user or isinstance(err, UNCLEAR):
            self.unclear += 1
        else:
            self.crashes += 1
        print(f"[{where}] {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr, limit=4)

    def _count(self, n_in: int, n_out: int, n_dropped: int, where: str) -> None:
        self.records_in += n_in
        self.accounted += n_out + n_dropped
        if n_in != n_out + n_dropped:
            print(f"[{where}] {n_in} in != {n_out} out + {n_dropped} dropped", file=sys.stderr)
            self.crashes += 1

    # -- one case --------------------------------------------------------------------------------
    def case(self, index: int) -> None:
        from data_juicer.core.data import NestedDataset

        from daar_ops.core import budget, read_jsonl
        from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
        from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper
        from daar_ops.ops.ds2_rating_filter import DS2RatingFilter
        from daar_ops.ops.ds2_selector import DS2Filter
        from daar_ops.ops.qdit_selector import QditFilter

        rng = random.Random(self.seed * 100003 + index)
        self.cases += 1
        n = rng.randrange(3, 30)
        pool = self.workdir / f"pool_{index}.jsonl"
        lines = write_pool(pool, [random_record(rng, i) for i in range(n)], rng)
        try:
            records, report = read_jsonl(pool)
        except Exception as err:  # noqa: BLE001 - the fuzz counts every failure
            self._fail("read_jsonl", err)
            return
        self._count(lines, len(records), len(report.skipped), "read_jsonl")
        if not records:
            return
        # ops see records as Data-Juicer loads them: JSON-compatible, one type per column
        from daar_ops.pipeline import _clean

        rows = [{k: (json.dumps(_clean(v), default=str) if k in FIELDS and not isinstance(v, str)
                     else _clean(v)) for k, v in r.items()
                 if k in FIELDS or k == "id"} for r in records]
        # An Arrow column holds one type per key, so a dataset cannot carry a non-dict stats cell
        # next to dict ones (those are fuzzed on the batch API in tests/test_dj_native.py); a null
        # cell, an empty dict and stale or foreign keys can.
        for r, orig in zip(rows, records):
            stats, meta = orig.get("__dj__stats__"), orig.get("__dj__meta__")
            r["__dj__stats__"] = dict(stats, seed=1.0) if isinstance(stats, dict) else (
                None if stats is None else {"seed": 1.0})
            r["__dj__meta__"] = meta if isinstance(meta, dict) and meta else None
        try:
            ds = NestedDataset.from_list(rows)
        except Exception as err:  # noqa: BLE001
            self._fail("NestedDataset.from_list", err)
            return
        model, probe = str(self.model), str(self.workdir / "probe")
        per_sample = [
            ("domain_pseudo_label_mapper", lambda: DomainPseudoLabelMapper(
                centroids_path=str(self.workdir / "centroids"), model=model, max_length=32,
                num_proc=1)),
            ("domain_pseudo_label_mapper cluster", lambda: DomainPseudoLabelMapper(
                samples_path=str(self.synthetic), model=model, feature="embedding",
                method="cluster", max_length=32, num_proc=1)),
            ("diversity_reward_filter", lambda: DiversityRewardFilter(
                checkpoint=probe, feature_cache=False, num_proc=1)),
            ("ds2_rating_filter", lambda: DS2RatingFilter(model=model, max_length=64,
                                                          text_template="{instruction}",
                                                          num_proc=1)),
        ]
        for name, make in per_sample:
            try:
                out = make().run(ds)
                self._count(len(ds), len(out), 0, name)
            except Exception as err:  # noqa: BLE001
                if os.environ.get("DAAR_FUZZ_DUMP"):
                    Path(os.environ["DAAR_FUZZ_DUMP"]).write_text(json.dumps(rows, default=str))
                self._fail(name, err)
        ratio = rng.choice([0.0, 0.2, 0.5, 1.0])
        selections = [
            ("diversity_reward_filter select_ratio", lambda: DiversityRewardFilter(
                checkpoint=probe, select_ratio=ratio, feature_cache=False)),
            ("qdit_filter", lambda: QditFilter(select_ratio=ratio, embedder="daar_features",
                                               model=model, feature="embedding",
                                               text_template="{instruction} {output}")),
            ("ds2_filter", lambda: DS2Filter(
                score_key="id", select_ratio=ratio, text_template="{instruction}",
                embedding_key="vec", k=2, k_pool=4, hoc_steps=10, detection_rounds=1)),
        ]
        vec_ds = ds.add_column("vec", [np.random.default_rng(i).normal(size=4).tolist()
                                       for i in range(len(ds))])
        for name, make in selections:
            try:
                src = vec_ds if name == "ds2_filter" else ds
                out = make().run(src)
                want = budget(len(src), ratio=ratio)
                if len(out) != want:
                    print(f"[{name}] kept {len(out)}, budget {want}", file=sys.stderr)
                    self.crashes += 1
                self._count(len(src), len(out), len(src) - want, name)
            except Exception as err:  # noqa: BLE001
                self._fail(name, err)
        if index % 5 == 0:
            self._select(pool, records, rng)
        if index % 5 == 2:
            self._untrusted_and_faults(index, rng)

    # -- untrusted artifacts, user folders, file-system faults -----------------------------------
    def _expect_refusal(self, where: str, action, *clues: str) -> None:
        """``action`` must raise a clear user error mentioning every clue; anything else counts."""
        try:
            action()
        except (ValueError, OSError) as err:
            if all(c in str(err) for c in clues) and len(str(err)) >= 20:
                return
            print(f"[{where}] unclear refusal {type(err).__name__}: {err}", file=sys.stderr)
            self.unclear += 1
            return
        except Exception as err:  # noqa: BLE001
            self._fail(where, err)
            return
        print(f"[{where}] was not refused", file=sys.stderr)
        self.crashes += 1

    def _untrusted_and_faults(self, index: int, rng: random.Random) -> None:
        import shutil

        from daar_ops.artifacts import manifest_digest
        from daar_ops.core import read_jsonl
        from daar_ops.probe_checkpoint import checkpoint_model, load_probe_checkpoint

        case = self.workdir / f"hostile_{index}"
        case.mkdir()
        probe = case / "probe"
        shutil.copytree(self.workdir / "probe", probe)
        secret = case / "secret.txt"
        secret.write_text("outside the artifact")

        def rewrite(**changes):
            path = probe / "manifest.json"
            manifest = json.loads((self.workdir / "probe" / "manifest.json").read_text())
            manifest.update(changes)
            manifest["manifest_sha256"] = manifest_digest(manifest)
            path.write_text(json.dumps(manifest))

        hostile = [({"tensor_file": rng.choice(["../secret.txt", str(secret), "../../x", ".."])},
                    "inside the artifact folder"),
                   ({"feature_dim": rng.choice([200_000, 10**9])}, "do not match the manifest"),
                   ({"hidden": [rng.choice([200_000, 10**7])]}, "do not match the manifest"),
                   ({"domains": ["only"]}, "do not match the manifest")]
        for changes, clue in hostile:
            rewrite(**changes)
            self._expect_refusal(f"hostile manifest {changes}",
                                 lambda: load_probe_checkpoint(probe), clue)
        rewrite()
        tensors = probe / "probes.safetensors"
        tensors.rename(case / "elsewhere.safetensors")
        tensors.symlink_to(case / "elsewhere.safetensors")
        self._expect_refusal("symlinked tensor file", lambda: load_probe_checkpoint(probe),
                             "symlink")
        _, manifest = load_probe_checkpoint(self.workdir / "probe")
        self._expect_refusal("hub model id", lambda: checkpoint_model(
            dict(manifest, model="org/name", model_path="/nowhere")), "nothing is downloaded")

        # a pool folder: a stray file is refused; a BOM and a 100,000-deep line lose nothing
        shards = case / "shards"
        shards.mkdir()
        good = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(7)]
        (shards / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(
            json.dumps(r).encode() + b"\n" for r in good[:4]))
        (shards / "b.JSONL").write_text("[" * 100_000 + "]" * 100_000 + "\n" + "".join(
            json.dumps(r) + "\n" for r in good[4:]))
        try:
            records, report = read_jsonl(shards)
            self._count(8, len(records), len(report.skipped), "pool folder")
        except Exception as err:  # noqa: BLE001
            self._fail("pool folder", err)
        (shards / "c.txt").write_text(json.dumps(good[0]) + "\n")
        self._expect_refusal("pool folder with a stray file", lambda: read_jsonl(shards), "c.txt")

        # select into a folder with a user's file: refused before any work, the file intact
        from daar_ops.pipeline import SelectConfig, run_select

        user_dir = case / "user_out"
        user_dir.mkdir()
        (user_dir / "notes.txt").write_text("mine")
        cfg = SelectConfig(pool=str(shards / "a.jsonl"), output_dir=str(user_dir),
                           model=str(self.model), synthetic=str(self.synthetic), progress=False)
        self._expect_refusal("select into a user folder", lambda: run_select(cfg), "notes.txt")
        if (user_dir / "notes.txt").read_text() != "mine" or len(list(user_dir.iterdir())) != 1:
            print("[select into a user folder] the user's folder changed", file=sys.stderr)
            self.crashes += 1
        self._fs_faults(case)

    def _fs_faults(self, case: Path) -> None:
        """A feature cache on a full and on a read-only tmpfs (skipped where mounting fails)."""
        import subprocess

        from daar_ops.feature_cache import FeatureCache
        from daar_ops.features import LayerFeatureExtractor

        extractor = LayerFeatureExtractor(str(self.model), layer=1, max_length=16)
        texts = [f"text {i} " + "word " * (i % 7) for i in range(400)]
        for mode, options, clue in (("full", "size=24k", "No space left"),
                                    ("read-only", "ro,size=24k", "cannot be written")):
            mount = case / f"fs_{mode}"
            mount.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                              capture_output=True).returncode != 0:
                self.fs_skipped = True
                continue
            try:
                self._expect_refusal(f"cache on a {mode} file system", lambda: FeatureCache(
                    extractor, mount, template=None, chunk_size=200).encode(texts, False), clue)
                left = [p.name for p in mount.rglob("*.tmp")]
                if left:
                    print(f"[cache on a {mode} file system] left {left}", file=sys.stderr)
                    self.crashes += 1
            finally:
                subprocess.run(["umount", str(mount)], capture_output=True)

    def _select(self, pool: Path, records: list[dict], rng: random.Random) -> None:
        from daar_ops.core import read_jsonl
        from daar_ops.pipeline import SelectConfig, run_select

        out = self.workdir / "select_out"
        cfg = SelectConfig(pool=str(pool), output_dir=str(out), model=str(self.model),
                           synthetic=str(self.synthetic), domains=["coding", "math", "qa"],
                           probe_size=max(1, len(records) // 2), select_ratio=0.5, epochs=1,
                           max_length=32, progress=False, cache_dir=str(self.workdir / "cache"),
                           pseudo_label_space="embedding", pseudo_label_method="fixed")
        try:
            result = run_select(cfg)
        except Exception as err:  # noqa: BLE001
            self._fail("daar-ops select", err)
            return
        probe = read_jsonl(out / "probe_pool.jsonl")[0]
        scores = read_jsonl(out / "scores.jsonl")[0]
        self._count(result.summary["pool_records"], len(probe) + len(scores), 0, "select")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cases", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from loguru import logger

    import data_juicer.ops  # noqa: F401  (its plugin loading logs; quiet it afterwards)

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="daar_fuzz_") as tmp:
        fuzz = Fuzz(Path(tmp), args.seed)
        logger.remove()  # the ops log every bad value they meet; the fuzz reports what matters
        logger.add(sys.stderr, level="ERROR")
        index = 0
        while time.monotonic() - start < args.seconds and (
                args.max_cases is None or index < args.max_cases):
            fuzz.case(index)
            index += 1
    if fuzz.fs_skipped:
        print("note: file-system fault cases skipped (this process cannot mount a tmpfs)")
    print(f"RESULT cases={fuzz.cases} records_in={fuzz.records_in} "
          f"records_out_plus_dropped={fuzz.accounted} crashes={fuzz.crashes} "
          f"unclear_errors={fuzz.unclear}")
    return 0 if fuzz.crashes == 0 and fuzz.unclear == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
