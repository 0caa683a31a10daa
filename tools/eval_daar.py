"""The DaaR selection that stage 1 leads to, against random (evaluation only).

Per pool (default: ``shared`` and ``bigbench`` from ``tools/build_pools.py``) and synthesis seed:
stage 1 (:func:`daar_ops.algorithms.pseudo_labels.pseudo_label`, a named method of
``tools/eval_pseudo_labels.py``) pseudo-labels a probe pool; psi_dom / psi_div are trained on the
probe pool's SmolLM2 layer-3 features and those labels
(:func:`daar_ops.algorithms.probes.train_daar_probes`, as the pipeline does); psi_div scores a
disjoint selection pool and the global top ``--ratio`` (paper: 20%) is kept. Reported against
random subsets of the same size (``--random-seeds``): the true-domain entropy of the selection
(nats; the ``domain`` field is read here only) and the MiniLM facility-location coverage of the
selection pool (:mod:`daar_ops.algorithms.coverage`). ``true-label probes`` (psi_dom trained on the
TRUE domains) is the reference of a perfect stage 1. Last line, per method:

    RESULT pool=<p> method=<m> [rule=<r>] entropy=<mean over seeds> entropy_std=<>
        entropy_random=<> entropy_random_std=<> coverage=<> coverage_std=<> coverage_random=<>
        coverage_random_std=<> pseudo_agreement=<> seeds=<n>

``--from-run DIR`` evaluates a ``daar-ops select`` run's artifacts instead (its ``checkpoint/``
and ``probe_pool.jsonl``; a finished run or the copy of an interrupted one): the selection pool
is rebuilt with the run's split (``--probe-size``, ``--seeds`` first value, the shared pool),
its first ``--max-pool`` records in split order (a seeded hash order, so a random sample of
it) are scored through ``--cache-dir``'s feature cache, and the global top ``--ratio`` is compared
with random subsets of that sample, as above (``RESULT pool=run ...``).

``--rules`` compares reward rules on the same probes (an offline study; the pipeline's rule is
``div``): ``div`` = psi_div's predicted entropy (the paper), ``dom_entropy`` = the entropy of
psi_dom's softmax, ``dom_entropy_t`` = the same after temperature scaling, T fitted by NLL on the
probe training's validation split and its (pseudo-)labels
(:func:`daar_ops.algorithms.selection.fit_temperature`; no ground truth), ``one_minus_max`` =
1 - psi_dom's largest probability. Each rule keeps its global top ``--ratio``; the RESULT lines
then carry ``rule=<r>``.

``--pipeline`` runs the old end-to-end check instead (``daar_ops.pipeline.run_select`` on the
shared pool, then the evaluation of its outputs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def entropy_nats(labels: list[str]) -> float:
    counts = Counter(labels)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else float("nan")


RULES = ("div", "dom_entropy", "dom_entropy_t", "one_minus_max")


def rule_rewards(probes, x_select: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 rules: list[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Reward per rule for the selection pool, and the temperature fit's numbers.

    ``x_val`` / ``y_val``: the probe training's validation rows and the labels psi_dom was trained
    on (pseudo-labels for a real run), where the temperature is fitted.
    """
    from daar_ops.algorithms.probes import predict
    from daar_ops.algorithms.selection import fit_temperature, softmax_uncertainty

    div_reward, _ = probes.score(x_select)
    logits = predict(probes.dom, x_select)
    val_logits = predict(probes.dom, x_val)
    temperature = fit_temperature(val_logits, y_val)

    def val_nll(t: float) -> float:
        z = val_logits.astype(np.float64) / t
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(len(y_val)), y_val].mean())

    fit = {"temperature": temperature, "val_nll": val_nll(1.0),
           "val_nll_scaled": val_nll(temperature), "n_val": len(y_val),
           "val_accuracy": float((val_logits.argmax(1) == y_val).mean())}
    out = {}
    for rule in rules:
        if rule == "div":
            out[rule] = np.asarray(div_reward, dtype=np.float64)
        elif rule == "dom_entropy":
            out[rule] = softmax_uncertainty(logits, "entropy")
        elif rule == "dom_entropy_t":
            out[rule] = softmax_uncertainty(logits, "entropy", temperature)
        elif rule == "one_minus_max":
            out[rule] = softmax_uncertainty(logits, "one_minus_max")
        else:
            raise ValueError(f"unknown rule {rule!r}; choose from {RULES}")
    return out, fit


def top_rows(reward: np.ndarray, n_keep: int) -> np.ndarray:
    """Sorted indices of the global top ``n_keep`` (the earlier row wins ties, as the pipeline)."""
    from daar_ops.core import rank_order

    return np.sort(rank_order(reward)[:n_keep])


def rule_tag(rule: str, rules: list[str]) -> str:
    return "" if rules == ["div"] else f" rule={rule}"


def run_pipeline_check(args: argparse.Namespace) -> None:
    from daar_ops.core import iter_jsonl as read_jsonl
    from daar_ops.pipeline import SelectConfig, run_select

    overrides = {k: getattr(args, k) for k in ("output_dir", "threads", "samples_per_domain",
                                               "probe_size", "pool_size")
                 if getattr(args, k) is not None}
    overrides["seed"] = args.seeds[0]
    cfg = SelectConfig.quick(**overrides) if args.quick else SelectConfig(**overrides)
    result = run_select(cfg)
    out, summary = result.output_dir, result.summary
    probe = [r for _, r in read_jsonl(out / "probe_pool.jsonl")]
    agree = [r["__dj__meta__"]["daar_pseudo_domain"] == r.get("domain") for r in probe]
    selected = [r.get("domain", "?") for _, r in read_jsonl(out / "selected.jsonl")]
    evaluation = {
        "pseudo_agreement": sum(agree) / len(agree),
        "selected_true_domains": dict(Counter(selected)),
        "domain_entropy": entropy_nats(selected),
        "probe_val_acc": summary["probe_metrics"].get("dom_val_accuracy", float("nan")),
        "stage_seconds": summary["stage_seconds"],
    }
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True))
    print(f"true domains of the selection: {evaluation['selected_true_domains']}")
    print(f"stage seconds: {summary['stage_seconds']} (total {summary['total_seconds']})")
    print(f"RESULT probe_val_acc={evaluation['probe_val_acc']:.4f} selected={summary['selected']} "
          f"pool={summary['selection_pool']} domain_entropy={evaluation['domain_entropy']:.4f} "
          f"pseudo_agreement={evaluation['pseudo_agreement']:.4f}")


def evaluate_run(args: argparse.Namespace) -> None:
    """Entropy and coverage of a select run's global top ratio on a sample of its pool."""
    from daar_ops.algorithms.coverage import facility_location_coverage
    from daar_ops.algorithms.probes import split_indices
    from daar_ops.core import iter_jsonl
    from daar_ops.pipeline import default_pool
    from daar_ops.pool import split_by_text
    from daar_ops.probe_checkpoint import DaarScorer
    from daar_ops.text import TextTemplate

    import eval_pseudo_labels as E

    run = Path(args.from_run)
    probe = [r for _, r in iter_jsonl(run / "probe_pool.jsonl")]
    agreement = float(np.mean([r["__dj__meta__"]["daar_pseudo_domain"] == r.get("domain")
                               for r in probe]))
    records = [r for _, r in iter_jsonl(default_pool()) if r is not None]
    scorer = DaarScorer(run / "checkpoint", feature_cache=True, cache_dir=args.cache_dir)
    tpl = TextTemplate(scorer.template)
    texts = tpl.render_all(records)
    _, pool_idx, _ = split_by_text(texts, args.probe_size or 5000, None, args.seeds[0])
    sample = pool_idx[:args.max_pool]
    select_texts = [texts[i] for i in sample]
    truth = [records[i]["domain"] for i in sample]  # evaluation only
    reward, _, _ = scorer.score_texts(select_texts, progress=True)
    cover_space = None if args.no_coverage else \
        E.Spaces("smollm2-135m-instruct", 3, args.threads).sentence(select_texts)
    n_keep = int(args.ratio * len(sample))

    def evaluate(keep: np.ndarray) -> tuple[float, float]:
        return (entropy_nats([truth[i] for i in keep]), float("nan") if cover_space is None else
                facility_location_coverage(cover_space, cover_space[keep]))

    rand = np.array([evaluate(np.sort(np.random.default_rng(100 + s).permutation(len(sample))
                                      [:n_keep])) for s in range(args.random_seeds)])
    names = scorer.domains
    x_sample = scorer.cache.encode(select_texts, progress=False).layer
    x_probe = scorer.cache.encode([tpl.render(r) for r in probe], progress=False).layer
    pseudo = np.array([names.index(r["__dj__meta__"]["daar_pseudo_domain"]) for r in probe])
    training = scorer.manifest.get("training", {})
    _, val_idx = split_indices(len(probe), float(training.get("val_fraction", 0.03)),
                               int(training.get("seed", args.seeds[0])))
    rewards, fit = rule_rewards(scorer.probes, x_sample, x_probe[val_idx], pseudo[val_idx],
                                args.rules)
    print(f"run {run}: pseudo-label agreement {agreement:.4f}; {len(sample)} of {len(pool_idx)} "
          f"selection-pool records scored, keep {n_keep}; random ({args.random_seeds} seeds): "
          f"entropy {rand[:, 0].mean():.4f} +- {rand[:, 0].std():.4f}, coverage "
          f"{rand[:, 1].mean():.4f} +- {rand[:, 1].std():.4f}")
    print(f"  psi_dom on its {fit['n_val']} validation rows (pseudo-labels): accuracy "
          f"{fit['val_accuracy']:.4f} (checkpoint says "
          f"{scorer.manifest.get('metrics', {}).get('dom_val_accuracy', float('nan')):.4f}); "
          f"temperature {fit['temperature']:.3f}, NLL {fit['val_nll']:.4f} -> "
          f"{fit['val_nll_scaled']:.4f}", flush=True)
    results = {}
    for rule in args.rules:
        keep = top_rows(rewards[rule], n_keep)
        results[rule] = evaluate(keep)
        print(f"  rule {rule:14s}: entropy {results[rule][0]:.4f} coverage {results[rule][1]:.4f}"
              f" selected {dict(sorted(Counter(truth[i] for i in keep).items()))}", flush=True)
    if args.retrain:
        # the same probe pool and trainer, per seed: probes on the run's pseudo-labels (the seed
        # spread of probe training) and on the TRUE domains (a perfect stage 1; evaluation only)
        from daar_ops.algorithms.probes import DaarProbes, TrainConfig, train_daar_probes

        targets = {"pseudo": [r["__dj__meta__"]["daar_pseudo_domain"] for r in probe],
                   "true": [r["domain"] for r in probe]}
        for kind, labels in targets.items():
            y = np.array([names.index(d) for d in labels])
            for seed in args.seeds:
                res = train_daar_probes(x_probe, y, names, TrainConfig(seed=seed), progress=False)
                r_rewards, r_fit = rule_rewards(DaarProbes(res.dom, res.div, names), x_sample,
                                                x_probe[res.val_idx], y[res.val_idx], args.rules)
                for rule in args.rules:
                    top = top_rows(r_rewards[rule], n_keep)
                    e, c = evaluate(top)
                    print(f"  retrained on {kind:6s} labels, seed {seed}, rule {rule} (T "
                          f"{r_fit['temperature']:.3f}): entropy {e:.4f} coverage {c:.4f} "
                          f"selected {dict(sorted(Counter(truth[i] for i in top).items()))}",
                          flush=True)
    for rule in args.rules:
        ent, cov = results[rule]
        print(f"RESULT pool=run method=select{rule_tag(rule, args.rules)} entropy={ent:.4f} "
              f"entropy_random={rand[:, 0].mean():.4f} "
              f"entropy_random_std={rand[:, 0].std():.4f} coverage={cov:.4f} "
              f"coverage_random={rand[:, 1].mean():.4f} coverage_random_std={rand[:, 1].std():.4f} "
              f"pseudo_agreement={agreement:.4f} scored={len(sample)}")


def selection_pool(name: str, n_probe: int, n_select: int) -> tuple[list[dict], list[dict]]:
    import eval_pseudo_labels as E

    probe = E.load_pool(name, n_probe)
    select_path = E.POOL_DIR / f"{name}_select.jsonl"
    if select_path.exists():
        with open(select_path, encoding="utf-8") as handle:
            rest = [json.loads(line) for line in handle if line.strip()]
    else:
        rest = E.load_pool(name, 10 ** 9)[n_probe:]
    return probe, rest[:n_select]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", nargs="+", default=["shared", "bigbench"])
    ap.add_argument("--methods", nargs="+", default=["default", "paper+kmeans3"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--n-probe", type=int, default=600,
                    help="probe pool: the pool's first n records (a subset of what "
                         "eval_pseudo_labels labels)")
    ap.add_argument("--n-select", type=int, default=800, help="selection pool size")
    ap.add_argument("--max-length", type=int, default=256,
                    help="tokens per text for the probes' layer-3 features (the pipeline uses "
                         "512; 256 keeps this tool affordable on a shared 2-core CPU)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=20,
                    help="probe epochs (20 on ~1,000 samples: the pipeline's --quick setting)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rules", nargs="+", default=["div"], choices=RULES,
                    help="reward rules to compare on the same probes (default: div, the "
                         "pipeline's psi_div); see the module docstring")
    ap.add_argument("--no-true-label", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pipeline", action="store_true",
                    help="old mode: run daar-ops select on the shared pool and evaluate it")
    ap.add_argument("--quick", action="store_true", help="--pipeline with the quick preset")
    ap.add_argument("--from-run", default=None, help="evaluate a select run's artifacts")
    ap.add_argument("--max-pool", type=int, default=None,
                    help="--from-run: score this many selection-pool records (default: all)")
    ap.add_argument("--cache-dir", default=None, help="--from-run: the run's feature cache")
    ap.add_argument("--retrain", action="store_true",
                    help="--from-run: also retrain the probes per --seeds on the run's "
                         "pseudo-labels and on the true domains")
    ap.add_argument("--no-coverage", action="store_true",
                    help="--from-run: entropy only (coverage embeds the sample with MiniLM)")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--samples-per-domain", type=int, default=None)
    ap.add_argument("--probe-size", type=int, default=None)
    ap.add_argument("--pool-size", type=int, default=None)
    args = ap.parse_args(argv)
    if args.pipeline:
        run_pipeline_check(args)
        return 0
    if args.from_run:
        evaluate_run(args)
        return 0

    import torch

    import eval_pseudo_labels as E
    from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS
    from daar_ops.algorithms.coverage import facility_location_coverage
    from daar_ops.algorithms.probes import DaarProbes, TrainConfig, train_daar_probes
    from daar_ops.algorithms.pseudo_labels import pseudo_label
    from daar_ops.feature_cache import FeatureCache
    from daar_ops.features import LayerFeatureExtractor
    from daar_ops.text import ALPACA_TEMPLATE, TextTemplate
    from stage1_synthetic import SynthSettings, synthetic_samples

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    domains = list(DEFAULT_DOMAINS)
    names = [d.name for d in domains]
    k = len(names)
    tpl = TextTemplate(ALPACA_TEMPLATE)
    spaces = E.Spaces("smollm2-135m-instruct", 3, args.threads)
    # Probe features as the pipeline: fp32 layer 3, the pipeline's template (feature cache).
    probe_cache = FeatureCache(LayerFeatureExtractor("smollm2-135m-instruct", layer=3,
                                                     max_length=args.max_length), None,
                               template=ALPACA_TEMPLATE)
    synth = {s: synthetic_samples(s, SynthSettings(), domains, threads=args.threads)[0]
             for s in args.seeds}
    report = {}
    lines = []
    for pool_name in args.pools:
        probe, select = selection_pool(pool_name, args.n_probe, args.n_select)
        probe_texts = [tpl.render(r) for r in probe]
        select_texts = [tpl.render(r) for r in select]
        truth_probe = np.array([names.index(r["domain"]) for r in probe])  # evaluation only
        truth_select = [r["domain"] for r in select]
        x_probe = probe_cache.encode(probe_texts, progress=False).layer
        x_select = probe_cache.encode(select_texts, progress=False).layer
        cover_space = spaces.sentence(select_texts)
        n_keep = int(round(args.ratio * len(select)))

        def evaluate(keep: np.ndarray) -> tuple[float, float]:
            return (entropy_nats([truth_select[i] for i in keep]),
                    facility_location_coverage(cover_space, cover_space[keep]))

        rand = [evaluate(np.sort(np.random.default_rng(100 + s).permutation(len(select))
                                 [:n_keep])) for s in range(args.random_seeds)]
        r_ent, r_cov = np.array(rand).T
        print(f"\n== pool {pool_name}: probe {len(probe)}, selection pool {len(select)}, keep "
              f"{n_keep}; random ({args.random_seeds} seeds): entropy {r_ent.mean():.3f} +- "
              f"{r_ent.std():.3f}, coverage {r_cov.mean():.4f} +- {r_cov.std():.4f}", flush=True)
        report[pool_name] = {"random": {"entropy": r_ent.tolist(), "coverage": r_cov.tolist()}}
        runs = [(m, s) for m in args.methods for s in args.seeds]
        if not args.no_true_label:
            runs.append(("true-label probes", args.seeds[0]))
        per_method: dict[str, list] = {}
        for method, seed in runs:
            if method == "true-label probes":
                labels, agreement = truth_probe, 1.0
            else:
                cfg = replace(E.METHODS[method], seed=seed)
                feats = spaces.get(cfg.space, probe_texts)
                anchor_texts, a_labels, is_desc = E.anchor_set(synth[seed], domains, tpl)
                anchors = spaces.get(cfg.space, anchor_texts)
                # the joint clustering space also needs the probe pool's LM features
                joint = (spaces.get(cfg.joint_feature, probe_texts)
                         if cfg.method == "cluster" and cfg.cluster_space == "joint" else None)
                labels, _, _ = pseudo_label(feats, anchors, a_labels, k, is_desc, cfg,
                                            cluster_features=joint)
                agreement = float((labels == truth_probe).mean())
            result = train_daar_probes(x_probe, labels, names,
                                       TrainConfig(seed=seed, epochs=args.epochs),
                                       progress=False)
            probes = DaarProbes(result.dom, result.div, names)
            rewards, fit = rule_rewards(probes, x_select, x_probe[result.val_idx],
                                        np.asarray(labels)[result.val_idx], args.rules)
            for rule in args.rules:
                keep = top_rows(rewards[rule], n_keep)
                ent, cov = evaluate(keep)
                counts = Counter(truth_select[i] for i in keep)
                key = method if args.rules == ["div"] else f"{method}|{rule}"
                per_method.setdefault(key, []).append((ent, cov, agreement))
                # rewards tied at exactly 0 (underflow at a small T) are kept in index order
                ties = int((rewards[rule][keep] == 0).sum())
                print(f"  {method:20s} seed {seed} rule {rule:14s}: agreement {agreement:.3f}  "
                      f"entropy {ent:.3f}  coverage {cov:.4f}  psi_dom val acc "
                      f"{result.metrics['dom_val_accuracy']:.3f}  T {fit['temperature']:.3f}  "
                      f"kept at reward 0: {ties}  selected {dict(sorted(counts.items()))}",
                      flush=True)
        report[pool_name]["methods"] = per_method
        for key, vals in per_method.items():
            method, _, rule = key.partition("|")
            ent, cov, agr = np.array(vals).T
            lines.append(
                f"RESULT pool={pool_name} method={method.replace(' ', '_')}"
                f"{rule_tag(rule, args.rules)} "
                f"entropy={ent.mean():.4f} entropy_std={ent.std():.4f} "
                f"entropy_random={r_ent.mean():.4f} entropy_random_std={r_ent.std():.4f} "
                f"coverage={cov.mean():.4f} coverage_std={cov.std():.4f} "
                f"coverage_random={r_cov.mean():.4f} coverage_random_std={r_cov.std():.4f} "
                f"pseudo_agreement={agr.mean():.4f} seeds={len(vals)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    print(f"\ntotal {time.perf_counter() - t_start:.1f}s")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
