"""DaaR stage-1 algorithms: parsing, novelty acceptance, centroids, assignment, refinement."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.algorithms.centroids import (DEFAULT_DOMAINS, DomainSpec, InstructionPair,
                                           assign_nearest, augment_prompt, compute_centroids,
                                           kmeans_refine, load_centroids, parse_domains,
                                           pairs_settled, parse_pairs, save_centroids, seed_prompt,
                                           similarities, synthesize)
from daar_ops.artifacts import ArtifactError

# ----------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("Instruction: Compute 2 + 2.\nInput: \nOutput: 4",
     [("Compute 2 + 2.", "", "4")]),
    ("Sure! Here are two:\n1. **Instruction:** Sort a list please.\n**Input:** [3, 1]\n"
     "**Output:** [1, 3]\n\n2. **Instruction 2:** Name a prime number.\n**Output:** 7\n"
     "I hope this helps!",
     [("Sort a list please.", "[3, 1]", "[1, 3]"),
      ("Name a prime number.", "", "7\nI hope this helps!")]),
    ("### Instruction [1]\nInstruction [1]: What is the boiling point of water?\n"
     "Input: N/A\nResponse: 100 degrees Celsius.",
     [("What is the boiling point of water?", "", "100 degrees Celsius.")]),
    ("Question: What color is the sky?\nAnswer: Blue.", [("What color is the sky?", "", "Blue.")]),
    ("Instruction: Give the result of 6 * 7 for the input-output table. Output: The answer: 42",
     [("Give the result of 6 * 7 for the input-output table.", "", "The answer: 42")]),
])
def test_parse_pairs_tolerates_formats(text, expected):
    got = [(p.instruction, p.input, p.output) for p in parse_pairs(text)]
    assert got == expected


@pytest.mark.parametrize("junk", ["", "\n\n\n", None, 12, float("nan"), "Instruction: alone",
                                  "Output: no instruction", "just chatter about things",
                                  "Instruction: x\nOutput:", "\ud800 Instruction: a b Output:",
                                  "Instruction: <a task or question>\nOutput: <the answer>"])
def test_parse_pairs_returns_nothing_for_junk_and_never_raises(junk):
    assert parse_pairs(junk) == []


def test_parse_pairs_drops_duplicates_and_respects_max_pairs():
    text = "Instruction: Add two numbers.\nOutput: 3\n" * 3 + \
        "Instruction: Multiply two numbers.\nOutput: 6\n"
    assert len(parse_pairs(text)) == 2
    assert len(parse_pairs(text, max_pairs=1)) == 1


SETTLE_TEXTS = [
    "Instruction: Add 2 and 3.\nInput:\nOutput: 5\n\nInstruction: Sum 1 and 1.\nOutput: 2\n"
    "Instruction: Name a prime.\nOutput: 7",
    # the first pair is a placeholder (not a pair): the second one must still be parsed
    "Instruction: <a task or question>\nOutput: <the answer>\nInstruction: Reverse a list in "
    "Python.\nInput: [1, 2]\nOutput: [2, 1]\nInstruction: Sort it.\nOutput: sorted(x)",
    # Input after Output belongs to the open pair: it must not settle the text
    "Instruction: Explain recursion briefly.\nOutput: A function calling itself.\nInput: none"
    "\n\n**Instruction 2:** Define a loop.\nOutput: repetition",
    "1. Question: What is 2+2?\nAnswer: 4\n2. Question: What is 3*3?\nAnswer: 9\n3. Task: hi",
    "Output: orphan answer\nInstruction: Real one here.\nOutput: yes",
]


@pytest.mark.parametrize("text", SETTLE_TEXTS)
@pytest.mark.parametrize("max_pairs", [1, 2])
def test_pairs_settled_never_changes_what_is_parsed(text, max_pairs):
    # generation stops at the first prefix where pairs_settled says True: the pairs parsed from
    # that prefix must be exactly those of the whole text
    full = parse_pairs(text, max_pairs)
    for end in range(len(text) + 1):
        if pairs_settled(text[:end], max_pairs):
            assert parse_pairs(text[:end], max_pairs) == full
            assert len(full) == max_pairs
            break


def test_pairs_settled_stops_after_the_wanted_pairs_only():
    text = "Instruction: Add 2 and 3.\nOutput: 5\nInstruction: Sum 4 and 4.\nOutput: 8\n"
    assert not pairs_settled("Instruction: Add 2 and 3.\nOutput: 5", 1)
    assert pairs_settled(text, 1)
    assert not pairs_settled(text, 2)  # the second pair's output may still grow
    assert pairs_settled(text + "Instruction:", 2)
    assert not pairs_settled("", 1) and not pairs_settled(None, 1)


def test_synthesis_passes_a_stop_rule_that_settles_on_the_wanted_pairs():
    seen = {}

    class StopAware(ScriptedGenerator):
        def generate(self, conversations, **kwargs):
            seen["stop"] = kwargs.get("stop")
            return super().generate(conversations, **kwargs)

    gen = StopAware(lambda prompt, i: f"Add {i} and {i}.\nOutput: {2 * i}")
    synthesize(gen, DOMS, _bag_embed, samples_per_domain=1, max_attempts=2, tau=0.99,
               n_seed_pairs=2, candidates_per_round=1, progress=False)
    stop = seen["stop"]  # round 0: seed prompts, which ask for 2 pairs
    assert not stop(0, " Add 1 and 1.\nOutput: 2\nInstruction: more")
    # the prefix "Instruction:" is prepended before the rule reads the text
    assert stop(0, " Add 1 and 1.\nOutput: 2\nInstruction: Add 2 and 2.\nOutput: 4\n"
                   "Instruction:")


def test_prompts_name_domain_description_others_and_counterexamples():
    domains = parse_domains([{"name": "law", "description": "legal questions"}, "cooking", "golf"])
    p = seed_prompt(domains[0], domains, 5)
    assert "law" in p and "legal questions" in p and "Generate 5" in p
    assert "cooking, golf" in p
    ex = [InstructionPair("Define tort law please.", "", "A civil wrong.")]
    a = augment_prompt(domains[0], domains, ex)
    assert "Counterexample 1" in a and "Define tort law please." in a and "Generate 1" in a


def test_parse_domains_forms_and_errors():
    assert [d.name for d in parse_domains(None)] == [d.name for d in DEFAULT_DOMAINS]
    assert parse_domains({"a": "A", "b": "B"})[1] == DomainSpec("b", "B")
    assert parse_domains([{"domain": "x"}, "y"])[0].name == "x"
    with pytest.raises(ValueError, match="at least 2"):
        parse_domains(["only"])
    with pytest.raises(ValueError, match="unique"):
        parse_domains(["a", "a"])


# --------------------------------------------------------------------------------- synthesis

class ScriptedGenerator:
    """Answers from a per-domain script; records the prompts it saw."""

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []
        self.last_turns: list[dict] = []

    def generate(self, conversations, **kwargs):
        out = []
        for conv in conversations:
            prompt = conv[0]["content"]
            self.last_turns.append(conv[-1])
            self.prompts.append(prompt)
            out.append(self.answer(prompt, len(self.prompts)))
        return out


def _bag_embed(texts):
    """Deterministic bag-of-words features over a small vocabulary (+1 bias dimension)."""
    vocab = ["add", "sum", "code", "python", "list", "cat", "dog", "tree", "river", "blue"]
    rows = []
    for t in texts:
        words = t.lower().split()
        rows.append([words.count(w) for w in vocab] + [0.1])
    return np.asarray(rows, dtype=np.float32)


DOMS = [DomainSpec("math", "numbers"), DomainSpec("code", "programs")]


def test_synthesis_accepts_novel_pairs_until_target():
    words = ["add", "sum", "code", "python", "list", "cat", "dog", "tree", "river", "blue"]

    def answer(prompt, i):  # every call a different topic word -> always novel
        w = words[i % len(words)]
        return f"Instruction: tell me about {w} {w}\nOutput: {w} {w} {w}"

    gen = ScriptedGenerator(answer)
    res = synthesize(gen, DOMS, _bag_embed, samples_per_domain=3, max_attempts=20,
                     candidates_per_round=2, tau=0.9, progress=False)
    assert all(len(res.samples[d.name]) == 3 for d in DOMS)
    assert res.shortfall(3) == {}
    assert [r["domain"] for r in res.records()] == ["math"] * 3 + ["code"] * 3
    # the first call of a domain is a seed prompt, later ones show counterexamples
    assert "Generate 5" in gen.prompts[0]
    assert any("Counterexample 1" in p for p in gen.prompts)
    # the assistant turn is prefilled with the response prefix
    assert gen.last_turns[0] == {"role": "assistant", "content": "Instruction:"}


def test_response_prefix_is_prepended_before_parsing_and_can_be_disabled():
    gen = ScriptedGenerator(lambda p, i: f" Say the word cat {i} times\nOutput: cat")
    res = synthesize(gen, DOMS, _bag_embed, samples_per_domain=1, max_attempts=2,
                     progress=False)
    assert res.samples["math"][0].instruction == "Say the word cat 1 times"
    gen = ScriptedGenerator(lambda p, i: f" Say the word cat {i} times\nOutput: cat")
    res = synthesize(gen, DOMS, _bag_embed, samples_per_domain=1, max_attempts=2,
                     response_prefix=None, progress=False)
    assert res.samples["math"] == [] and gen.last_turns[0]["role"] == "user"


def test_synthesis_rejects_near_duplicates_and_stops_at_max_attempts():
    gen = ScriptedGenerator(lambda p, i: "Instruction: add the numbers\nOutput: sum is add")
    res = synthesize(gen, DOMS, _bag_embed, samples_per_domain=5, max_attempts=6,
                     candidates_per_round=4, tau=0.85, progress=False)
    for d in DOMS:
        st = res.stats[d.name]
        assert len(res.samples[d.name]) == 1  # the same pair again is never novel
        assert st.attempts == 6 and st.rejected_similar == st.candidates - 1
    assert res.shortfall(5) == {"math": 4, "code": 4}


def test_per_domain_tau_override():
    def answer(prompt, i):
        return f"Instruction: add the cat numbers {i}\nOutput: add add cat {'dog ' * (i % 3)}"

    res = synthesize(ScriptedGenerator(answer), DOMS, _bag_embed, samples_per_domain=4,
                     max_attempts=12, tau={"math": 1.0001, "default": 0.5}, progress=False)
    assert len(res.samples["math"]) == 4  # tau > 1 accepts everything parseable
    assert len(res.samples["code"]) < 4
    assert res.settings["tau"] == {"math": 1.0001, "code": 0.5}


def test_junk_generations_end_with_a_counted_shortfall_not_a_hang():
    res = synthesize(ScriptedGenerator(lambda p, i: "\n\n\n"), DOMS, _bag_embed,
                     samples_per_domain=3, max_attempts=5, progress=False)
    for d in DOMS:
        assert res.samples[d.name] == []
        assert res.stats[d.name].attempts == 5 and res.stats[d.name].malformed == 5
    assert res.shortfall(3) == {"math": 3, "code": 3}


def test_synthesis_survives_a_failing_generator():
    class Broken:
        def generate(self, conversations, **kw):
            raise RuntimeError("CUDA out of memory")

    res = synthesize(Broken(), DOMS, _bag_embed, samples_per_domain=2, max_attempts=3,
                     progress=False)
    assert res.stats["math"].malformed == 3


def test_synthesis_is_deterministic_for_a_seed():
    rng_words = ["add", "sum", "code", "python", "list", "cat", "dog", "tree"]

    def answer(prompt, i):
        w = rng_words[(len(prompt) + i) % len(rng_words)]
        return f"Instruction: what about {w} and {rng_words[i % 8]}\nOutput: {w}"

    runs = [synthesize(ScriptedGenerator(answer), DOMS, _bag_embed, samples_per_domain=4,
                       max_attempts=12, seed=7, progress=False).records() for _ in range(2)]
    assert runs[0] == runs[1]


# ----------------------------------------------------------------- centroids and assignment

def test_compute_centroids_means_in_name_order_and_missing_domain_errors():
    feats = np.array([[1, 0], [3, 0], [0, 2]], dtype=np.float32)
    cents, counts = compute_centroids(feats, ["a", "a", "b"], ["b", "a"])
    np.testing.assert_allclose(cents, [[0, 2], [2, 0]])
    assert counts.tolist() == [1, 2]
    with pytest.raises(ValueError, match="no sample for domain 'c'"):
        compute_centroids(feats, ["a", "a", "b"], ["a", "c"])


def test_assign_nearest_cosine_vs_euclidean():
    cents = np.array([[1.0, 0.0], [10.0, 10.0]])
    x = np.array([[2.0, 0.1], [1.0, 1.2], [9.0, 3.0]])
    lab_cos, sims_cos = assign_nearest(x, cents, "cosine")
    lab_euc, sims_euc = assign_nearest(x, cents, "euclidean")
    assert lab_cos.tolist() == [0, 1, 0]
    assert lab_euc.tolist() == [0, 0, 1]  # [9, 3] is nearer [10, 10], but points along [1, 0]
    assert sims_cos.dtype == np.float32 and sims_cos.shape == (3, 2)
    np.testing.assert_allclose(sims_euc[0, 0], -np.hypot(1.0, 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        assign_nearest(x, cents, "manhattan")
    with pytest.raises(ValueError, match="does not match"):
        assign_nearest(np.zeros((2, 3)), cents)


def test_non_finite_features_get_defined_labels():
    x = np.array([[np.nan, 1.0], [0.0, 1.0]])
    labels, sims = assign_nearest(x, np.eye(2))
    assert labels.tolist() == [0, 1] and np.isneginf(sims[0]).all()


def test_kmeans_refine_moves_centroids_to_cluster_means_and_keeps_domain_order():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0], 0.3, size=(50, 2))
    b = rng.normal([0, 5], 0.3, size=(30, 2))
    x = np.vstack([a, b])
    init = np.array([[1.0, 0.2], [0.2, 1.0]])  # right directions, wrong places
    ref = kmeans_refine(x, init, iters=5, metric="euclidean")
    np.testing.assert_allclose(ref[0], a.mean(0), atol=1e-5)
    np.testing.assert_allclose(ref[1], b.mean(0), atol=1e-5)
    np.testing.assert_array_equal(kmeans_refine(x, init, iters=0), init.astype(np.float32))
    # an empty cluster keeps its centroid
    far = np.array([[100.0, -100.0], [1.0, 0.2]])
    assert kmeans_refine(a, far, iters=3, metric="euclidean")[0].tolist() == [100.0, -100.0]
    with pytest.raises(ValueError):
        kmeans_refine(x, init, iters=-1)


def test_similarities_cosine_matches_definition():
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    expected = (x @ c.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(c, axis=1))
    np.testing.assert_allclose(similarities(x, c), expected, rtol=1e-10)


def test_centroid_file_roundtrip_and_corruption(tmp_path):
    cents = np.arange(8, dtype=np.float32).reshape(2, 4)
    desc = {"model": "m", "model_fingerprint": "f", "layer": 0, "feature_dim": 4}
    save_centroids(tmp_path / "c", cents, DOMS, desc, "embedding", "{instruction}", [3, 5])
    got, manifest = load_centroids(tmp_path / "c")
    np.testing.assert_array_equal(got, cents)
    assert manifest["domains"] == ["math", "code"] and manifest["counts"] == [3, 5]
    assert manifest["feature"] == "embedding" and manifest["template"] == "{instruction}"
    assert manifest["kind"] == "daar_centroids" and manifest["model_fingerprint"] == "f"
    with pytest.raises(ValueError, match="2 centroids for 3 domains"):
        save_centroids(tmp_path / "d", cents, DOMS + [DomainSpec("x")], desc, "embedding",
                       "{instruction}", [1, 1, 1])
    (tmp_path / "c" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_centroids(tmp_path / "c")
