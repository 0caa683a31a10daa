"""DaaR stage-1 synthesis: parsing, prompts, novelty acceptance, settings."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.algorithms.synthesis import (DEFAULT_DOMAINS, DomainSpec, InstructionPair,
                                           SynthesisConfig, augment_prompt, pairs_settled,
                                           parse_domains, parse_pairs, seed_prompt, synthesize)

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
    run(gen, samples_per_domain=1, max_attempts=2, tau=0.99, n_seed_pairs=2,
        candidates_per_round=1)
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


def run(generator, **settings):
    """:func:`synthesize` over DOMS with the bag-of-words features, without a progress bar."""
    return synthesize(generator, DOMS, _bag_embed, SynthesisConfig(**settings), progress=False)


def test_synthesis_accepts_novel_pairs_until_target():
    words = ["add", "sum", "code", "python", "list", "cat", "dog", "tree", "river", "blue"]

    def answer(prompt, i):  # every call a different topic word -> always novel
        w = words[i % len(words)]
        return f"Instruction: tell me about {w} {w}\nOutput: {w} {w} {w}"

    gen = ScriptedGenerator(answer)
    res = run(gen, samples_per_domain=3, max_attempts=20, candidates_per_round=2, tau=0.9)
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
    res = run(gen, samples_per_domain=1, max_attempts=2)
    assert res.samples["math"][0].instruction == "Say the word cat 1 times"
    gen = ScriptedGenerator(lambda p, i: f" Say the word cat {i} times\nOutput: cat")
    res = run(gen, samples_per_domain=1, max_attempts=2, response_prefix=None)
    assert res.samples["math"] == [] and gen.last_turns[0]["role"] == "user"


def test_synthesis_rejects_near_duplicates_and_stops_at_max_attempts():
    gen = ScriptedGenerator(lambda p, i: "Instruction: add the numbers\nOutput: sum is add")
    res = run(gen, samples_per_domain=5, max_attempts=6, candidates_per_round=4, tau=0.85)
    for d in DOMS:
        st = res.stats[d.name]
        assert len(res.samples[d.name]) == 1  # the same pair again is never novel
        assert st.attempts == 6 and st.rejected_similar == st.candidates - 1
    assert res.shortfall(5) == {"math": 4, "code": 4}


def test_per_domain_tau_override():
    def answer(prompt, i):
        return f"Instruction: add the cat numbers {i}\nOutput: add add cat {'dog ' * (i % 3)}"

    # the answers have three distinct feature vectors (i % 3), pairwise cosine 0.87-0.97
    res = run(ScriptedGenerator(answer), samples_per_domain=4, max_attempts=12,
              tau={"math": 0.99, "default": 0.5})
    assert len(res.samples["math"]) == 3  # every distinct vector, no repeat
    assert len(res.samples["code"]) == 1  # under 0.5 nothing after the first is novel
    assert res.settings["tau"] == {"math": 0.99, "code": 0.5}


def test_junk_generations_end_with_a_counted_shortfall_not_a_hang():
    res = run(ScriptedGenerator(lambda p, i: "\n\n\n"), samples_per_domain=3, max_attempts=5)
    for d in DOMS:
        assert res.samples[d.name] == []
        assert res.stats[d.name].attempts == 5 and res.stats[d.name].malformed == 5
    assert res.shortfall(3) == {"math": 3, "code": 3}


def test_synthesis_survives_a_failing_generator():
    class Broken:
        def generate(self, conversations, **kw):
            raise RuntimeError("CUDA out of memory")

    res = run(Broken(), samples_per_domain=2, max_attempts=3)
    assert res.stats["math"].malformed == 3


def test_synthesis_is_deterministic_for_a_seed():
    rng_words = ["add", "sum", "code", "python", "list", "cat", "dog", "tree"]

    def answer(prompt, i):
        w = rng_words[(len(prompt) + i) % len(rng_words)]
        return f"Instruction: what about {w} and {rng_words[i % 8]}\nOutput: {w}"

    runs = [run(ScriptedGenerator(answer), samples_per_domain=4, max_attempts=12,
                seed=7).records() for _ in range(2)]
    assert runs[0] == runs[1]




@pytest.mark.parametrize("field, value", [
    ("samples_per_domain", 0), ("max_attempts", 2.5), ("n_seed_pairs", True),
    ("candidates_per_round", 0), ("max_new_tokens", 0), ("n_counterexamples", -1),
    ("seed", -1), ("tau", 0.0), ("tau", 1.5), ("tau", {"math": 0.9, "default": 2}),
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
])
def test_settings_are_checked_once_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SynthesisConfig(**{field: value})


def test_settings_resolve_tau_per_domain_and_normalise_the_prefix():
    cfg = SynthesisConfig(tau={"math": 0.9, "default": 0.8}, response_prefix="")
    assert (cfg.tau_for("math"), cfg.tau_for("code")) == (0.9, 0.8)
    assert SynthesisConfig(tau={"math": 0.9}).tau_for("code") == 0.85  # the paper's tau
    assert SynthesisConfig(tau=1).tau_for("code") == 1.0
    assert cfg.response_prefix is None
