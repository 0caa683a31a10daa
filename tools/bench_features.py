"""Benchmark the layer-k feature extractor against the two obvious alternatives, in one process.

1. ours: ``LayerFeatureExtractor`` (embeddings + first k layers only, length-sorted token-budget
   batches, no attention mask needed under right padding);
2. full: the full model with ``output_hidden_states=True``, same batches, masked mean of
   ``hidden_states[k]``;
3. reference style: the model truncated to k layers as DaaR's reference code does, batch size 1,
   every input padded to 1024 tokens, unmasked mean of ``hidden_states[-1]`` (final norm included).

Timings are CPU seconds of this process (``time.process_time``) with one torch thread: on a shared,
noisy machine they measure the work done, not how often the scheduler ran something else; wall
seconds are printed beside them. Peak resident memory is measured in fresh child processes (peak
RSS only grows within a process).
Last line: ``RESULT speedup_vs_full=<x> speedup_vs_reference=<y> max_abs_diff=<z> peak_rss_ratio=<r>``
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from daar_ops.core import default_pool
from daar_ops.features import LayerFeatureExtractor
from daar_ops.text import TextTemplate

DEFAULT_POOL = Path(default_pool())  # $DAAR_OPS_POOL, else the shared pool (daar_ops.core)


@contextmanager
def timed(store: dict, key: str):
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    store[key] = (time.process_time() - cpu, time.perf_counter() - wall)


def load_texts(path: Path, n: int, template: str) -> list[str]:
    tpl = TextTemplate(template)
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as handle:
        return [tpl.render(json.loads(line)) for _, line in zip(range(n), handle)]


def tokenized_plan(ex: LayerFeatureExtractor, texts: list[str]) -> dict:
    """The extractor's own tokens and batches, so the full model runs on identical inputs."""
    ids, _, _ = ex.tokenize(texts)
    lengths = np.array([len(r) for r in ids])
    return {"ids": ids, "batches": ex.plan_batches(lengths), "pad_id": ex.fill_token_id,
            "layer": ex.layer, "dim": ex.hidden_size}


@torch.inference_mode()
def full_model_features(full, plan: dict) -> np.ndarray:
    ids, layer = plan["ids"], plan["layer"]
    lengths = np.array([len(r) for r in ids])
    out = np.zeros((len(ids), plan["dim"]), dtype=np.float32)
    for batch in plan["batches"]:
        width = int(lengths[batch].max())
        input_ids = torch.full((len(batch), width), plan["pad_id"], dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : lengths[i]] = torch.tensor(ids[i])
            mask[row, : lengths[i]] = 1
        hidden = full(input_ids=input_ids, attention_mask=mask,
                      output_hidden_states=True).hidden_states[layer]
        w = mask.unsqueeze(-1).float()
        out[batch] = ((hidden * w).sum(1) / w.sum(1)).numpy()
    return out


@torch.inference_mode()
def reference_style_features(model_path: str, layer: int, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:layer]
    out = []
    for text in texts:
        enc = tok(text, padding="max_length", truncation=True, max_length=1024, return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
        out.append(hidden[0].mean(0).numpy())
    return np.stack(out)


def _peak_rss_child(kind: str, model: str, layer: int, texts: list[str], plan: dict,
                    queue) -> None:
    torch.set_num_threads(1)
    if kind == "ours":
        LayerFeatureExtractor(model, layer=layer).encode(texts, progress=False)
    else:
        from transformers import AutoModel

        from daar_ops.models import resolve_model_path

        full = AutoModel.from_pretrained(resolve_model_path(model), dtype=torch.float32).eval()
        full_model_features(full, plan)
    queue.put(peak_rss_of_this_process_mb())


def peak_rss_of_this_process_mb() -> float:
    # VmHWM belongs to the address space, which exec replaces; ru_maxrss would carry over the
    # (larger) parent's peak into the spawned child.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(kind: str, model: str, layer: int, texts: list[str], plan: dict) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(kind, model, layer, texts, plan, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(f"the '{kind}' memory probe process failed (exit code {proc.exitcode})")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--n", type=int, default=256, help="records from the pool")
    parser.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    parser.add_argument("--template", default="{instruction} {input} {output}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-reference", type=int, default=None,
                        help="time the reference style on the first N records only and scale "
                             "(default: all; it is the slowest by far)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = load_texts(args.pool, args.n, args.template)

    ex = LayerFeatureExtractor(args.model, layer=args.layer)
    ex.encode(texts[:8], progress=False)  # warm-up
    times: dict[str, tuple[float, float]] = {}
    with timed(times, "ours"):
        ours = ex.encode(texts, progress=False)
    print(f"ours: {times['ours'][0]:.2f} CPU-s ({times['ours'][1]:.2f} s wall) for {len(texts)} texts, {int(ours.n_tokens.sum())} tokens "
          f"(median {int(np.median(ours.n_tokens))}), {ours.n_truncated} truncated, "
          f"{ex.n_parameters / 1e6:.1f}M parameters loaded")

    from transformers import AutoModel

    full = AutoModel.from_pretrained(ex.model_path, dtype=torch.float32).eval()
    plan = tokenized_plan(ex, texts)
    with timed(times, "full"):
        full_feats = full_model_features(full, plan)
    n_full_params = sum(p.numel() for p in full.parameters())
    del full
    max_abs_diff = float(np.abs(full_feats - ours.layer).max())
    print(f"full model: {times['full'][0]:.2f} CPU-s ({times['full'][1]:.2f} s wall, {n_full_params / 1e6:.1f}M parameters), "
          f"max |ours - hidden_states[{args.layer}]| = {max_abs_diff:.2e}")

    n_ref = args.n_reference or len(texts)
    with timed(times, "reference"):
        reference_style_features(ex.model_path, args.layer, texts[:n_ref])
    scale = len(texts) / n_ref
    times["reference"] = (times["reference"][0] * scale, times["reference"][1] * scale)
    print(f"reference style: {times['reference'][0]:.2f} CPU-s ({times['reference'][1]:.2f} s wall)"
          + (f", scaled from {n_ref} texts" if n_ref < len(texts) else ""))

    plan64 = tokenized_plan(ex, texts[:64])
    rss_ours = peak_rss_mb("ours", args.model, args.layer, texts[:64], plan64)
    rss_full = peak_rss_mb("full", args.model, args.layer, texts[:64], plan64)
    print(f"peak RSS (load + 64 texts, fresh process): ours {rss_ours:.0f} MB, full {rss_full:.0f} MB")
    print(f"wall-clock ratios (noisy on a shared machine): vs full "
          f"{times['full'][1] / times['ours'][1]:.2f}, vs reference "
          f"{times['reference'][1] / times['ours'][1]:.2f}")
    t_ours, t_full, t_ref = (times[k][0] for k in ("ours", "full", "reference"))
    print(f"RESULT speedup_vs_full={t_full / t_ours:.2f} speedup_vs_reference={t_ref / t_ours:.2f} "
          f"max_abs_diff={max_abs_diff:.2e} peak_rss_ratio={rss_ours / rss_full:.3f}")


if __name__ == "__main__":
    main()
