"""A seeded synthetic audio-visual multiple-choice benchmark with real mp4 files (video + audio).

Why: the kit must run end to end with no downloads, and token reduction must be tested on
questions whose answers need specific media tokens: a sieve that drops the wrong audio or video
tokens should visibly lose accuracy. Each clip is a few seconds of full-frame solid colours
("flashes") over black and pure tones of very different pitches over silence, in one-second slots,
so a tiny thinker (hidden 64) can learn it on a CPU in minutes. Question types:

* ``av_saliency``: what colour was on screen while a given tone played (audio-guided);
* ``temporal_order``: which of two flashes, far apart in time, came first;
* ``sound_only``: which tone was heard (a flash is a distractor);
* ``picture_only``: which colour appeared (a tone is a distractor);
* ``sync``: whether the flash and the tone were together, which came first, or no sound at all.

Mechanism probes (issue 14), each tied to one claim of the paper; name them in ``question_types``
(:data:`PROBE_TYPES`; :data:`TOY_PROBE_MIX` is the mix the toy recipes use):

* ``query`` (query dependence): a flash and a tone in every second of a ``dense_seconds`` clip, more
  events than a 20% budget keeps whole; the question (after the media) names a colour and asks the
  tone heard during it. Only a sieve that sees the question can know which second matters.
* ``binding`` (cross-modal binding): four flashes and four tones at different moments; the question
  names a tone and asks the colour on screen during it.
* ``order_long`` (aliasing): clips of ``long_seconds`` (cycled), two flashes far apart (first and
  last quarter), "which came first"; beyond the period of TMRoPE's slowest temporal channel.
* ``distractor`` (salient distractors): bright full-frame flashes and loud tones the question does
  not ask about, and one small dim square; "colour of the small square".
* ``quota`` (modality quota): all the evidence in one modality (one tone, or one flash) while the
  other modality has an event every second.

At ``resolution=280`` a second of clip is 100 video and 25 audio tokens (video 80% of the A/V tokens,
as in real clips at Qwen2.5-Omni's default frame sizes).

By default the options keep one canonical order per question type (``shuffle_options=False``): the
tiny model then only has to map what it perceived to a letter, which it learns in minutes; with
``shuffle_options=True`` it must also read the options.

Each jsonl row keeps its event list, so every answer can be recomputed from the events. Splits
are deterministic per seed; answer letters are balanced per split; files are written once into a
directory keyed by the knobs (idempotent cache, atomic rename so parallel workers never see half
a benchmark).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ep_kit.data.benchmarks import LETTERS, MCSample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 210, 25),
    "blue": (25, 50, 235),
    "yellow": (235, 225, 25),
}
#: tone name -> frequency in Hz (octaves apart, all well inside the 8 kHz mel range).
PITCHES: dict[str, float] = {"low": 250.0, "middle": 700.0, "high": 1800.0, "very high": 4500.0}
SYNC_OPTIONS = ("together", "sound first", "flash first", "no sound")
QUESTION_TYPES = ("av_saliency", "temporal_order", "sound_only", "picture_only", "sync")
#: the mechanism probes (module docstring); each clip of these has its own length (``row["seconds"]``).
PROBE_TYPES = ("query", "binding", "order_long", "distractor", "quota")
#: the toy recipes' question mix: every probe and every original type.
TOY_PROBE_MIX = (*PROBE_TYPES, *QUESTION_TYPES)
#: brightness of the ``distractor`` probe's small square (the flashes are at full brightness).
DIM_LEVEL = 0.45
#: question type -> its four answers, in the canonical option order (A, B, C, D).
ANSWER_POOLS: dict[str, tuple[str, ...]] = {
    "av_saliency": tuple(COLOURS),
    "temporal_order": tuple(COLOURS),
    "sound_only": tuple(PITCHES),
    "picture_only": tuple(COLOURS),
    "sync": SYNC_OPTIONS,
    "query": tuple(PITCHES),
    "binding": tuple(COLOURS),
    "order_long": tuple(COLOURS),
    "distractor": tuple(COLOURS),
    "quota": tuple(COLOURS),  # the flash variant; the tone variant answers from PITCHES
}
SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16000
TONE_AMPLITUDE = 0.6
BENCHMARK_NAME = "synthetic_av"


@dataclass(frozen=True)
class Event:
    """A flash (full-frame colour, or a square), or a tone, ``duration`` seconds from ``onset``.

    A square (``size`` > 0) covers ``size`` x ``size`` cells of 28 pixels (one merged video token
    each) from cell (``row``, ``col``); ``level`` scales the colour's brightness.
    """

    kind: str  # "flash" | "tone"
    onset: float
    duration: float
    colour: str | None = None
    pitch: str | None = None
    size: int = 0
    row: int = 0
    col: int = 0
    level: float = 1.0


def write_av_clip(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None,
    sample_rate: int = SAMPLE_RATE,
    codec: str = "libx264",
) -> None:
    """Write ``(T, H, W, 3)`` uint8 frames at ``fps`` (+ mono float audio as AAC) to an mp4."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    container = av.open(str(path), mode="w")
    try:
        video = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        if codec == "libx264":
            video.options = {"crf": "12", "preset": "ultrafast"}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            chunk = av.AudioFrame.from_ndarray(
                np.asarray(audio, dtype=np.float32)[None], format="fltp", layout="mono"
            )
            chunk.sample_rate = sample_rate
            chunk.pts = 0
            for packet in sound.encode(chunk):
                container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
    finally:
        container.close()


def render_events(
    events: list[Event], seconds: float, fps: float, size: int, sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(T, size, size, 3)`` and mono audio for an event list (black / silence elsewhere)."""
    n_frames = int(round(seconds * fps))
    frames = np.zeros((n_frames, size, size, 3), dtype=np.uint8)
    audio = np.zeros(int(round(seconds * sample_rate)), dtype=np.float32)
    t_frames = np.arange(n_frames) / fps
    ramp = int(0.01 * sample_rate)
    for e in events:
        if e.kind == "flash":
            on = (t_frames >= e.onset) & (t_frames < e.onset + e.duration)
            rgb = np.round(np.array(COLOURS[e.colour], dtype=np.float64) * e.level).astype(np.uint8)
            if e.size:
                cell = size // max(1, size // 28)
                r0, c0 = e.row * cell, e.col * cell
                if r0 + e.size * cell > size or c0 + e.size * cell > size:
                    raise ValueError(f"square at cell ({e.row}, {e.col}) of size {e.size} leaves the {size}px frame")
                frames[on, r0 : r0 + e.size * cell, c0 : c0 + e.size * cell] = rgb
            else:
                frames[on] = rgb
        elif e.kind == "tone":
            start, stop = int(round(e.onset * sample_rate)), int(round((e.onset + e.duration) * sample_rate))
            t = np.arange(stop - start) / sample_rate
            tone = TONE_AMPLITUDE * np.sin(2 * np.pi * PITCHES[e.pitch] * t)
            envelope = np.ones_like(tone)
            envelope[:ramp] = np.linspace(0, 1, ramp)
            envelope[-ramp:] = np.linspace(1, 0, ramp)
            audio[start:stop] += (tone * envelope).astype(np.float32)
        else:
            raise ValueError(f"unknown event kind {e.kind!r}")
    return frames, audio


class SyntheticAVBenchmark:
    """Generate (once) and read the synthetic benchmark.

    Args:
        root: parent directory; files go to ``root/synthetic_av-<knob hash>/``.
        num_train / num_val / num_test: questions (= clips) per split.
        seconds: clip length in whole seconds (one event slot per second), >= 2.
        events: flash+tone pairs in ``av_saliency`` clips and flashes in ``temporal_order`` clips
            (2..min(4, seconds)).
        resolution: frame side in pixels (square, even; 56 or 84 keep CPU runs fast).
        seed: everything (events, options, letters) is a function of the seed.
        video_fps: encoding frame rate (sampling at 2 fps picks frames from it).
        shuffle_options: shuffle the options per question (harder: the model must read them).
        question_types: the question types, cycled over each split (default: the five original
            types, :data:`QUESTION_TYPES`); the probes are in :data:`PROBE_TYPES`.
        dense_seconds: clip length of the ``query`` probe (an event every second).
        long_seconds: clip lengths of the ``order_long`` probe, cycled (each >= 8).
    """

    def __init__(
        self,
        root: str | Path,
        num_train: int = 500,
        num_val: int = 60,
        num_test: int = 100,
        seconds: int = 4,
        events: int = 2,
        resolution: int = 56,
        seed: int = 0,
        video_fps: float = 4.0,
        shuffle_options: bool = False,
        question_types: list[str] | None = None,
        dense_seconds: int = 12,
        long_seconds: list[int] | None = None,
    ) -> None:
        types = tuple(question_types) if question_types is not None else QUESTION_TYPES
        unknown = [t for t in types if t not in ANSWER_POOLS]
        if not types or unknown:
            raise ValueError(
                f"question_types must name at least one of {sorted(ANSWER_POOLS)}, got unknown {unknown or 'none'}"
            )
        long_seconds = list(long_seconds) if long_seconds is not None else [8, 16, 24, 32]
        if not long_seconds or min(long_seconds) < 8:
            raise ValueError(f"long_seconds must be clip lengths >= 8 (two far-apart quarters), got {long_seconds}")
        if dense_seconds < 4:
            raise ValueError(f"dense_seconds must be >= 4 (one event per second, several seconds), got {dense_seconds}")
        probes = [t for t in types if t in PROBE_TYPES]
        if probes and seconds < 4:
            raise ValueError(f"the probes {probes} need seconds >= 4 (four events in distinct seconds), got {seconds}")
        if seconds < 2:
            raise ValueError(f"seconds must be >= 2 (one-second event slots), got {seconds}")
        if not 2 <= events <= min(4, seconds):
            raise ValueError(f"events must be in [2, min(4, seconds)={min(4, seconds)}], got {events}")
        if resolution < 28 or resolution % 2:
            raise ValueError(f"resolution must be even and >= 28, got {resolution}")
        if video_fps < 2:
            raise ValueError(f"video_fps must be >= 2, got {video_fps}")
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        self.root = Path(root)
        self.knobs = {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "seconds": int(seconds),
            "events": int(events),
            "resolution": int(resolution),
            "video_fps": float(video_fps),
            "shuffle_options": bool(shuffle_options),
            "seed": int(seed),
            "version": 1,
        }
        if types != QUESTION_TYPES:  # (knobs of the original benchmark keep their directory)
            self.knobs.update(question_types=list(types), dense_seconds=int(dense_seconds),
                              long_seconds=[int(x) for x in long_seconds], version=2)

    @property
    def question_types(self) -> tuple[str, ...]:
        return tuple(self.knobs.get("question_types", QUESTION_TYPES))

    @property
    def max_seconds(self) -> int:
        """The longest clip of the benchmark (for the audio window)."""
        lengths = [self.knobs["seconds"]]
        if "query" in self.question_types:
            lengths.append(self.knobs["dense_seconds"])
        if "order_long" in self.question_types:
            lengths += self.knobs["long_seconds"]
        return max(lengths)

    @property
    def directory(self) -> Path:
        digest = hashlib.sha1(json.dumps(self.knobs, sort_keys=True).encode()).hexdigest()[:12]
        return self.root / f"{BENCHMARK_NAME}-{digest}"

    def annotation(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.directory / f"{split}.jsonl"

    # ------------------------------------------------------------------ generation
    def prepare(self) -> SyntheticAVBenchmark:
        """Write all clips and annotations unless this knob set was already written."""
        final = self.directory
        if (final / "manifest.json").is_file():
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.root))
        try:
            rows = []
            for split_index, split in enumerate(SPLITS):
                rng = np.random.default_rng([self.knobs["seed"], split_index])
                split_rows = self._split_rows(split, self.knobs[f"num_{split}"], rng)
                (tmp / split).mkdir()
                (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows), encoding="utf-8")
                rows += split_rows
            # Every clip is a function of its row alone: encode them on a few threads (libav's encoder
            # releases the GIL; about 1.5x on 2 cores).
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                for _ in pool.map(lambda row: self._write_clip(tmp, row), rows):
                    pass
            (tmp / "manifest.json").write_text(json.dumps(self.knobs, indent=2, sort_keys=True))
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished first: keep theirs
                if not (final / "manifest.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self

    def _write_clip(self, directory: Path, row: dict[str, Any]) -> None:
        events = [Event(**e) for e in row["events"]]
        frames, audio = render_events(events, row["seconds"], self.knobs["video_fps"], self.knobs["resolution"])
        write_av_clip(directory / row["video"], frames, self.knobs["video_fps"], audio)

    def _split_rows(self, split: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        letters = np.array([LETTERS[i % 4] for i in range(n)])
        rng.shuffle(letters)
        rows = []
        types = self.question_types
        for i in range(n):
            qtype = types[i % len(types)]
            letter = str(letters[i])
            seconds = self._clip_seconds(qtype, i // len(types))
            variant = "tone" if qtype == "quota" and rng.random() < 0.5 else None
            pool = list(PITCHES if variant == "tone" else ANSWER_POOLS[qtype])
            if self.knobs["shuffle_options"]:
                correct = pool[int(rng.integers(len(pool)))]
                options = self._place(correct, pool, letter, rng)
            else:  # canonical option order: the answer letter fixes the answer value
                correct, options = pool[LETTERS.index(letter)], pool
            if qtype in PROBE_TYPES:
                events, question = self._make_probe(qtype, correct, seconds, rng, variant)
            else:
                events, question = self._make_question(qtype, correct, rng)
            qid = f"{split}-{i:05d}"
            rows.append(
                {
                    "question_id": qid,
                    "split": split,
                    "video": f"{split}/{qid}.mp4",
                    "question_type": qtype,
                    "question": question,
                    "options": options,
                    "answer": letter,
                    "seconds": seconds,
                    "events": [asdict(e) for e in events],
                }
            )
        return rows

    @staticmethod
    def _place(correct: str, pool: list[str], letter: str, rng: np.random.Generator) -> list[str]:
        """Four options with ``correct`` at ``letter`` and the other pool entries shuffled around it."""
        others = [o for o in pool if o != correct]
        rng.shuffle(others)
        others = others[:3]
        target = LETTERS.index(letter)
        return others[:target] + [correct] + others[target:]

    def _make_question(self, qtype: str, correct: str, rng: np.random.Generator) -> tuple[list[Event], str]:
        """Events whose answer to a ``qtype`` question is ``correct``, and the question text."""
        slots = self.knobs["seconds"]
        colours, pitches = list(COLOURS), list(PITCHES)

        def pick(items: list[str], k: int, without: str | None = None) -> list[str]:
            items = [x for x in items if x != without]
            return [items[j] for j in rng.permutation(len(items))[:k]]

        def flash(slot: int, colour: str) -> Event:
            return Event("flash", float(slot), 1.0, colour=colour)

        def tone(slot: int, pitch: str) -> Event:
            return Event("tone", float(slot), 1.0, pitch=pitch)

        if qtype == "av_saliency":
            k = self.knobs["events"]
            where = sorted(rng.choice(slots, size=k, replace=False).tolist())
            target = int(rng.integers(k))
            cs = pick(colours, k - 1, without=correct)
            cs.insert(target, correct)
            ps = pick(pitches, k)
            events = [e for s, c, p in zip(where, cs, ps, strict=True) for e in (flash(s, c), tone(s, p))]
            return events, f"Colour during the {ps[target]} tone?"
        if qtype == "temporal_order":
            k = self.knobs["events"]
            middle = rng.choice(np.arange(1, slots - 1), size=k - 2, replace=False).tolist() if k > 2 else []
            where = [0] + sorted(middle) + [slots - 1]
            cs = [correct] + pick(colours, k - 1, without=correct)
            events = [flash(s, c) for s, c in zip(where, cs, strict=True)]
            named = [cs[0], cs[-1]] if rng.random() < 0.5 else [cs[-1], cs[0]]
            return events, f"Which came first, {named[0]} or {named[1]}?"
        if qtype == "sound_only":
            s_tone, s_flash = (int(x) for x in rng.choice(slots, size=2, replace=False))
            return [tone(s_tone, correct), flash(s_flash, pick(colours, 1)[0])], "Which tone was heard?"
        if qtype == "picture_only":
            s_flash, s_tone = (int(x) for x in rng.choice(slots, size=2, replace=False))
            return [flash(s_flash, correct), tone(s_tone, pick(pitches, 1)[0])], "Which colour was shown?"
        if qtype == "sync":
            p, c = pick(pitches, 1)[0], pick(colours, 1)[0]
            a, b = sorted(int(x) for x in rng.choice(slots, size=2, replace=False))
            if correct == "together":
                events = [flash(a, c), tone(a, p)]
            elif correct == "sound first":
                events = [flash(b, c), tone(a, p)]
            elif correct == "flash first":
                events = [flash(a, c), tone(b, p)]
            elif correct == "no sound":
                events = [flash(a, c)]
            else:
                raise ValueError(f"unknown sync answer {correct!r}")
            return events, "Flash and sound in sync?"
        raise ValueError(f"unknown question type {qtype!r}")

    def _clip_seconds(self, qtype: str, k: int) -> int:
        """Length of the ``k``-th clip of a question type."""
        if qtype == "query":
            return int(self.knobs["dense_seconds"])
        if qtype == "order_long":
            lengths = self.knobs["long_seconds"]
            return int(lengths[k % len(lengths)])
        return int(self.knobs["seconds"])

    def _make_probe(
        self, qtype: str, correct: str, seconds: int, rng: np.random.Generator, variant: str | None
    ) -> tuple[list[Event], str]:
        """Events and question of a mechanism probe (module docstring) whose answer is ``correct``."""
        colours, pitches = list(COLOURS), list(PITCHES)

        def flash(slot: int, colour: str, **kw: Any) -> Event:
            return Event("flash", float(slot), 1.0, colour=colour, **kw)

        def tone(slot: int, pitch: str) -> Event:
            return Event("tone", float(slot), 1.0, pitch=pitch)

        def choice(items: list[str], without: str | None = None) -> str:
            items = [x for x in items if x != without]
            return items[int(rng.integers(len(items)))]

        if qtype == "query":  # a flash and a tone in every second; the named colour shows once
            named = choice(colours)
            target = int(rng.integers(seconds))
            cs = [named if s == target else choice(colours, without=named) for s in range(seconds)]
            ps = [correct if s == target else choice(pitches) for s in range(seconds)]
            events = [e for s in range(seconds) for e in (flash(s, cs[s]), tone(s, ps[s]))]
            return events, f"Tone during the {named} flash?"
        if qtype == "binding":  # 4 flashes, 4 tones; the named tone coincides with the answer's flash
            flash_slots = sorted(rng.choice(seconds, size=4, replace=False).tolist())
            cs = [correct] + [colours[j] for j in rng.permutation([c for c in range(4) if colours[c] != correct])]
            order = rng.permutation(4)
            cs = [cs[j] for j in order]
            target_slot = flash_slots[int(np.flatnonzero(order == 0)[0])]
            ps = [pitches[j] for j in rng.permutation(4)]
            others = [s for s in range(seconds) if s != target_slot]
            tone_slots = [target_slot] + rng.choice(others, size=3, replace=False).tolist()
            events = [flash(s, c) for s, c in zip(flash_slots, cs, strict=True)]
            events += [tone(int(s), p) for s, p in zip(tone_slots, ps, strict=True)]
            return events, f"Colour during the {ps[0]} tone?"
        if qtype == "order_long":  # two flashes, first and last quarter of a long clip
            quarter = seconds // 4
            first = int(rng.integers(quarter))
            last = seconds - 1 - int(rng.integers(quarter))
            other = choice(colours, without=correct)
            events = [flash(first, correct), flash(last, other)]
            named = [correct, other] if rng.random() < 0.5 else [other, correct]
            return events, f"Which came first, {named[0]} or {named[1]}?"
        if qtype == "distractor":  # bright flashes + loud tones around one small dim square
            slots = rng.choice(seconds, size=4, replace=False).tolist()
            cells = self.knobs["resolution"] // 28
            size = max(1, cells // 5)
            r, c = (int(x) for x in rng.integers(cells - size + 1, size=2))
            events = [flash(slots[0], correct, size=size, row=r, col=c, level=DIM_LEVEL)]
            events += [flash(s, choice(colours)) for s in slots[1:]]
            events += [tone(int(s), choice(pitches)) for s in rng.choice(seconds, size=2, replace=False)]
            return events, "Colour of the small square?"
        if qtype == "quota":  # the evidence in one modality, the other one busy every second
            slot = int(rng.integers(seconds))
            if variant == "tone":
                events = [tone(slot, correct)] + [flash(s, choice(colours)) for s in range(seconds)]
                return events, "Which tone was heard?"
            events = [flash(slot, correct)] + [tone(s, choice(pitches)) for s in range(seconds)]
            return events, "Which colour was shown?"
        raise ValueError(f"unknown probe {qtype!r}")

    # ------------------------------------------------------------------ reading
    def rows(self, split: str) -> list[dict[str, Any]]:
        """The raw jsonl rows (with event lists) of a prepared split."""
        path = self.annotation(split)
        if not path.is_file():
            raise FileNotFoundError(f"synthetic benchmark split not prepared: {path} (call prepare())")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def samples(self, split: str) -> list[MCSample]:
        """A prepared split as multiple-choice samples (category = question type)."""
        return [
            MCSample(
                question_id=row["question_id"],
                video_path=str(self.directory / row["video"]),
                question=row["question"],
                options=list(row["options"]),
                answer_letter=row["answer"],
                category=row["question_type"],
                benchmark=BENCHMARK_NAME,
            )
            for row in self.rows(split)
        ]
