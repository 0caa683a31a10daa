"""DaaR probes: architecture, training, entropy targets, checkpoints, ``daar-ops train-probe``."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from daar_ops.algorithms.probes import (DaarProbes, ProbeMLP, TrainConfig, default_hidden,
                                        entropy_nats, predict, softmax, split_indices,
                                        train_daar_probes)
from daar_ops.artifacts import ArtifactError, artifact_digest
from daar_ops.cli import main
from daar_ops.probe_checkpoint import (check_checkpoint_compatible, load_probe_checkpoint,
                                       save_probe_checkpoint)

DOMAINS = ["coding", "math", "qa"]


def clusters(n: int = 300, d: int = 16, k: int = 3, spread: float = 0.6, seed: int = 0):
    """Gaussian clusters, one per class, plus a large constant offset on one coordinate (like the
    outlier dimensions of real decoder-layer features)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = np.arange(n) % k
    x = centers[y] + rng.normal(scale=spread, size=(n, d))
    x[:, 0] += 50.0
    return x.astype(np.float32), y


def fast_config(**kw) -> TrainConfig:
    base = dict(epochs=8, batch_size=16, lr=3e-3, val_fraction=0.2, seed=0, hidden=[32, 16])
    base.update(kw)
    return TrainConfig(**base)


def fake_pseudo_labelled(n: int = 120, seed: int = 0) -> list[dict]:
    words = {"coding": "def return list sort function code loop", "math": "12 7 84 sum solve x",
             "qa": "capital France Paris what who where"}
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        dom = DOMAINS[i % 3]
        w = words[dom].split()
        recs.append({"instruction": " ".join(rng.choice(w) for _ in range(6)), "input": "",
                     "output": " ".join(rng.choice(w) for _ in range(4)),
                     "__dj__meta__": {"daar_pseudo_domain": dom}})
    return recs


def test_probe_architecture_matches_the_paper():
    d, k = 24, 4
    net = ProbeMLP(d, k)
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (24, 48), (48, 24), (24, 12), (12, 256), (256, 4)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.net) == 4
    assert default_hidden(576) == [1152, 576, 288, 256]


def test_split_is_seeded_disjoint_and_97_3():
    tr, va = split_indices(1000, 0.03, seed=5)
    assert len(va) == 30 and len(tr) == 970
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(1000))
    tr2, va2 = split_indices(1000, 0.03, seed=5)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_indices(1000, 0.03, seed=6)[1])
    assert len(split_indices(10, 0.03, 0)[1]) == 1  # never an empty validation set by rounding


def test_entropy_targets():
    k = 4
    uniform = np.full((1, k), 1 / k)
    onehot = np.eye(k)[:1]
    assert entropy_nats(uniform)[0] == pytest.approx(math.log(k), rel=1e-6)
    assert entropy_nats(onehot)[0] == pytest.approx(0.0, abs=1e-7)
    p = softmax(np.random.default_rng(0).normal(size=(50, k)))
    h = entropy_nats(p)
    assert np.all(h >= 0) and np.all(h <= math.log(k) + 1e-6)


def test_training_learns_domains_and_the_entropy():
    x, y = clusters(n=600, spread=2.0)  # overlapping clusters: entropies vary
    res = train_daar_probes(x, y, DOMAINS, fast_config(), progress=False)
    m = res.metrics
    assert m["dom_val_accuracy"] >= 0.9
    assert m["n_train"] + m["n_val"] == len(x)
    assert np.all(res.entropy_targets >= 0) and np.all(res.entropy_targets <= math.log(3) + 1e-6)
    # psi_div predicts psi_dom's entropy better than the constant mean does
    assert m["div_val_mse"] < m["div_val_mse_predict_mean_baseline"]
    assert m["div_val_spearman"] > 0.4
    h = res.history["dom"]
    assert h["epoch"] == list(range(9)) and len(h["val_loss"]) == 9
    assert h["val_loss"][-1] < h["val_loss"][0]
    # restore_best: the kept psi_dom is the epoch with the lowest validation loss
    assert h["val_loss"][m["dom_best_epoch"]] == min(h["val_loss"][1:])


def test_without_validation_the_last_epoch_is_kept():
    x, y = clusters(n=60)
    res = train_daar_probes(x, y, DOMAINS, fast_config(epochs=2, val_fraction=0.0),
                            progress=False)
    assert res.metrics["n_val"] == 0 and res.metrics["dom_best_epoch"] == 2


def test_standardisation_is_part_of_the_model():
    x, y = clusters()
    res = train_daar_probes(x, y, DOMAINS, fast_config(epochs=1), progress=False)
    assert res.dom.feature_mean[0].item() == pytest.approx(float(x[res.train_idx, 0].mean()),
                                                           rel=1e-4)
    raw = train_daar_probes(x, y, DOMAINS, fast_config(epochs=1, standardize=False),
                            progress=False)
    assert torch.all(raw.dom.feature_mean == 0) and torch.all(raw.dom.feature_scale == 1)


def test_training_is_deterministic_per_seed():
    x, y = clusters(n=90)
    a = train_daar_probes(x, y, DOMAINS, fast_config(epochs=2), progress=False)
    b = train_daar_probes(x, y, DOMAINS, fast_config(epochs=2), progress=False)
    c = train_daar_probes(x, y, DOMAINS, fast_config(epochs=2, seed=1), progress=False)
    assert np.array_equal(predict(a.div, x), predict(b.div, x))
    assert np.array_equal(a.entropy_targets, b.entropy_targets)
    assert not np.array_equal(predict(a.div, x), predict(c.div, x))


def test_psi_div_starts_from_a_fresh_init():
    x, y = clusters(n=60)
    res = train_daar_probes(x, y, DOMAINS, fast_config(epochs=1, lr=1e-12), progress=False)
    # with a negligible lr both stay at their initialisation: different seeds, different weights
    assert not torch.equal(res.dom.net[0].weight, res.div.net[0].weight)


def test_paper_setting_runs_single_sample_batches():
    cfg = TrainConfig.paper(hidden=[8, 8], val_fraction=0.1)
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.optimizer, cfg.standardize) == (
        1, 1, 1e-5, "adamw", False)
    x, y = clusters(n=40, d=8)
    res = train_daar_probes(x, y, DOMAINS, cfg, progress=False)
    assert res.history["dom"]["steps_per_epoch"] == res.metrics["n_train"]


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"),
    (dict(optimizer="lion"), "optimizer"), (dict(val_fraction=1.0), "val_fraction")])
def test_invalid_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        train_daar_probes(*clusters(n=30), DOMAINS, fast_config(**bad), progress=False)


def test_bad_training_inputs_are_refused():
    x, y = clusters(n=30)
    with pytest.raises(ValueError, match="labels must lie"):
        train_daar_probes(x, y + 1, DOMAINS, fast_config(), progress=False)
    x_nan = x.copy()
    x_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_daar_probes(x_nan, y, DOMAINS, fast_config(), progress=False)
    with pytest.raises(ValueError, match="2 domains"):
        train_daar_probes(x, np.zeros(30, int), ["only"], fast_config(), progress=False)


DESCRIPTION = {"model": "m", "model_path": "/nowhere/m", "model_fingerprint": "abc", "layer": 3,
               "feature_dim": 16, "max_length": 64, "pooling": "masked_mean",
               "layer_definition": "raw"}


def test_checkpoint_roundtrip_and_manifest(tmp_path):
    x, y = clusters()
    res = train_daar_probes(x, y, DOMAINS, fast_config(epochs=2), progress=False)
    out = save_probe_checkpoint(tmp_path / "ck", res, DESCRIPTION, "{instruction} {output}",
                                extra={"label_key": "lbl"})
    probes, manifest = load_probe_checkpoint(out)
    reward, probs = probes.score(x)
    assert np.allclose(reward, predict(res.div, x)[:, 0])
    assert np.allclose(probs, softmax(predict(res.dom, x)))
    for key in ("model", "model_path", "model_fingerprint", "layer", "feature_dim", "max_length",
                "template", "domains", "feature", "metrics", "versions", "sha256", "label_key"):
        assert key in manifest, key
    assert manifest["kind"] == "daar_probe" and manifest["domains"] == DOMAINS
    assert manifest["feature"] == "layer" and manifest["template"] == "{instruction} {output}"
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"dom", "div"}
    assert (out / "curves.png").stat().st_size > 1000
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))


def test_tampered_or_foreign_checkpoint_is_refused(tmp_path):
    x, y = clusters(n=60)
    res = train_daar_probes(x, y, DOMAINS, fast_config(epochs=1), progress=False)
    out = save_probe_checkpoint(tmp_path / "ck", res, DESCRIPTION, "{instruction}", plot=False)
    _, manifest = load_probe_checkpoint(out)
    with pytest.raises(ArtifactError, match="model_fingerprint"):
        check_checkpoint_compatible(manifest, dict(DESCRIPTION, model_fingerprint="other"))
    with pytest.raises(ArtifactError, match="feature_dim"):
        check_checkpoint_compatible(manifest, dict(DESCRIPTION, feature_dim=32))
    check_checkpoint_compatible(manifest, DESCRIPTION)
    tensor_file = out / "probes.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_probe_checkpoint(out)


def test_daar_probes_refuses_inconsistent_heads():
    with pytest.raises(ValueError, match="one output per domain"):
        DaarProbes(ProbeMLP(8, 2), ProbeMLP(8, 1), DOMAINS)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_train_probe_cli_end_to_end_and_cache_reuse(tmp_path, tiny_llama, capsys):
    records = fake_pseudo_labelled(120)
    records.append({"instruction": "no label here", "output": "x"})  # skipped, counted
    data = _write_jsonl(tmp_path / "labelled.jsonl", records)
    args = ["train-probe", "--input", str(data), "--model", str(tiny_llama), "--layer", "2",
            "--max-length", "64", "--cache-dir", str(tmp_path / "cache"), "--epochs", "6",
            "--lr", "3e-3", "--val-fraction", "0.2", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "ck1")]) == 0
    printed = capsys.readouterr().out
    assert "psi_dom val_accuracy=" in printed and "psi_div val_mse=" in printed
    _, m1 = load_probe_checkpoint(tmp_path / "ck1")
    assert m1["domains"] == DOMAINS and m1["layer"] == 2 and m1["max_length"] == 64
    assert m1["data"]["n_used"] == 120 and m1["data"]["n_unlabelled"] == 1
    assert json.loads((tmp_path / "ck1" / "run.json").read_text())["feature_cache_hits"] == 0
    assert m1["label_key"] == "__dj__meta__.daar_pseudo_domain"
    assert m1["metrics"]["dom_val_accuracy"] > 0.6  # the three vocabularies are separable
    # second run: every feature comes from the cache, and the result is identical
    assert main([*args, "--output", str(tmp_path / "ck2")]) == 0
    _, m2 = load_probe_checkpoint(tmp_path / "ck2")
    assert json.loads((tmp_path / "ck2" / "run.json").read_text())["feature_cache_hits"] == 120
    assert m2["sha256"] == m1["sha256"]
    # identical trainings, identical checkpoints: timings and cache hits are not in the manifest
    assert artifact_digest(tmp_path / "ck2") == artifact_digest(tmp_path / "ck1")


def test_train_probe_cli_explains_missing_labels(tmp_path, tiny_llama, capsys):
    data = _write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "a", "output": "b"}] * 5)
    code = main(["train-probe", "--input", str(data), "--output", str(tmp_path / "ck"),
                 "--model", str(tiny_llama), "--no-cache", "--quiet"])
    assert code == 2
    assert "keep_stats_in_res_ds" in capsys.readouterr().err


def test_train_probe_cli_paper_preset_and_label_key(tmp_path, tiny_llama):
    records = [dict(r, topic=r["__dj__meta__"]["daar_pseudo_domain"])
               for r in fake_pseudo_labelled(45)]
    for r in records:
        del r["__dj__meta__"]
    data = _write_jsonl(tmp_path / "own_labels.jsonl", records)
    assert main(["train-probe", "--input", str(data), "--output", str(tmp_path / "ck"),
                 "--model", str(tiny_llama), "--layer", "1", "--label-key", "topic",
                 "--domains", "qa", "math", "coding", "--paper", "--no-cache", "--quiet"]) == 0
    _, manifest = load_probe_checkpoint(tmp_path / "ck")
    assert manifest["domains"] == ["qa", "math", "coding"]
    assert manifest["training"]["batch_size"] == 1 and manifest["training"]["lr"] == 1e-5
    assert manifest["training"]["standardize"] is False


def test_predict_is_batch_invariant_bit_for_bit():
    # a sample's reward must not depend on how many others are scored with it (multi-process
    # scoring gives each worker a shard)
    torch.manual_seed(0)
    net = ProbeMLP(576, 4)
    x = np.random.default_rng(0).normal(size=(1500, 576)).astype(np.float32)
    whole = predict(net, x)
    for start, stop in ((0, 1), (3, 10), (25, 50), (1000, 1500), (1023, 1025)):
        assert np.array_equal(predict(net, x[start:stop]), whole[start:stop])
    assert predict(net, x[:0]).shape == (0, 4)
