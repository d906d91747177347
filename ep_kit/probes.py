"""The synthetic benchmark's question types as probes of the paper's claims, with hypotheses fixed in code.

Why a constant: the ablation report prints these hypotheses (and writes them into its results file)
before any row trains, so what each probe is expected to show is on record before its numbers exist.
Each probe is one question type of :class:`ep_kit.data.synthetic.SyntheticAVBenchmark` (its
``category`` in the metrics); a probe tied to a claim names the ablation rows the full method
(``cs2_ste_20``) should beat on it. The five original question types test no single claim.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the full method's row (recipe name) in the ablation table.
FULL = "cs2_ste_20"


@dataclass(frozen=True)
class Probe:
    """A question type, the claim it tests, and the hypothesis about the ablation rows on it.

    ``beats``: the rows the full method should beat on this probe (empty: no claim).
    ``by_length``: the hypothesis also says the gap grows with clip length.
    """

    name: str
    claim: str
    design: str
    hypothesis: str
    beats: tuple[str, ...] = ()
    by_length: bool = False


PROBES: tuple[Probe, ...] = (
    Probe(
        "query",
        "query dependence (bidirectional vs causal sieve)",
        "12 s clips with a flash and a tone in every second (more events than a 20% budget keeps whole); "
        "the question names a colour and asks the tone heard during it.",
        "The bidirectional sieve (full) beats the causal sieve (ablation_causal): only it sees the question "
        "when scoring.",
        ("ablation_causal",),
    ),
    Probe(
        "binding",
        "cross-modal binding (pre-fusion, intra-modal attention)",
        "4 flashes and 4 tones at different moments; the question names a tone and asks the colour on "
        "screen during it.",
        "Full beats ablation_no_prefusion and ablation_intramodal: media tokens that cannot attend across "
        "modalities cannot know which flash coincides with the named tone.",
        ("ablation_no_prefusion", "ablation_intramodal"),
    ),
    Probe(
        "order_long",
        "aliasing (Sync-RoPE vs TMRoPE) on long clips",
        "clips of 8, 16, 24 and 32 s, two flashes far apart (first / last quarter); which came first. "
        "TMRoPE's slowest temporal channel turns every 6.4 s in the 3B model, every 0.8 s in the toy "
        "layout [2, 3, 3] of head_dim 16 at the toy rope base 1e4 (the report prints both toy layouts' "
        "periods). Sync-RoPE's t_low pairs turn 0.26-0.8 rad over 32 s there: readable, never wrapped.",
        "Full (Sync-RoPE) beats ablation_no_syncrope (TMRoPE), with the gap growing with clip length.",
        ("ablation_no_syncrope",),
        by_length=True,
    ),
    Probe(
        "distractor",
        "salient distractors (learned scorer vs similarity heuristic)",
        "3 bright full-frame flashes the question does not ask about and one small dim square; colour of "
        "the small square.",
        "The learned MLP scorer (full) beats the similarity heuristic (ablation_similarity).",
        ("ablation_similarity",),
    ),
    Probe(
        "quota",
        "modality quota (joint vs per-modality Top-K)",
        "all evidence in one modality (one tone, or one flash) while the other modality has an event "
        "every second.",
        "Joint Top-K (full) beats per-modality Top-K (ablation_per_modality).",
        ("ablation_per_modality",),
    ),
    *(
        Probe(name, "none (original question type)", design, "No single claim: reported per row, no verdict.")
        for name, design in (
            ("av_saliency", "flash+tone pairs; the colour during a named tone."),
            ("temporal_order", "flashes at the start and the end; which came first."),
            ("sound_only", "one tone (a flash distracts); which tone."),
            ("picture_only", "one flash (a tone distracts); which colour."),
            ("sync", "a flash and a tone; together, which first, or no sound."),
        )
    ),
)

#: rows of the ablation table that no probe targets, and why.
UNTARGETED: dict[str, str] = {
    "ablation_gumbel": "Gumbel-Softmax vs STE Top-K is a training-estimator choice; no probe targets it "
    "(compared on the whole test split only).",
}


def probe(name: str) -> Probe | None:
    """The probe named ``name`` (a question type), or None."""
    return next((p for p in PROBES if p.name == name), None)


def hypotheses_markdown() -> list[str]:
    """The "Hypotheses (fixed before the run)" section, one bullet per probe (markdown lines)."""
    lines = ["## Hypotheses (fixed before the run)", ""]
    for p in PROBES:
        lines.append(f"- **`{p.name}`** -- claim: {p.claim}. Design: {p.design} Hypothesis: {p.hypothesis}")
    for row, why in UNTARGETED.items():
        lines.append(f"- **`{row}`**: {why}")
    return lines
