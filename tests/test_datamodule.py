"""AVDataModule: training / evaluation batches, the processed-sample cache, instruction data, skips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ep_kit.data.processor as processor_module
from ep_kit.data.datamodule import AVDataModule, BenchmarkSource, InstructSource, SyntheticSource
from ep_kit.data.instruct import read_instruct_jsonl
from ep_kit.data.media import load_audio
from ep_kit.data.synthetic import write_av_clip
from ep_kit.tokens import TINY_SPECIAL_TOKENS

IM_END = TINY_SPECIAL_TOKENS["<|im_end|>"]
SR = 16000


@pytest.fixture(scope="module")
def synth_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    source = SyntheticSource(root=str(root / "bench"), num_train=8, num_val=4, num_test=4, seconds=4)
    dm = AVDataModule(source, batch_size=3, eval_batch_size=4, cache_dir=str(root / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_train_batch_labels_only_on_answer(synth_dm):
    batch = next(iter(synth_dm.train_dataloader()))
    B = batch["input_ids"].shape[0]
    assert (
        B == 3 and batch["video_grid_thw"].shape == (3, 3) and batch["feature_attention_mask"].shape[0] == 3
    )
    lengths = batch["attention_mask"].sum(-1)
    for b in range(B):
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        letter = "ABCD"[int(batch["answer_index"][b])]
        assert labelled == [ord(letter), IM_END]
        n = int(lengths[b])
        assert batch["input_ids"][b, n - 3 : n].tolist() == [ord(letter), IM_END, ord("\n")]
        assert (batch["input_ids"][b, n:] == TINY_SPECIAL_TOKENS["<|endoftext|>"]).all()
    # The answer mask runs from the letter to the sample's end: letter, <|im_end|> and the newline.
    expected = torch.zeros_like(batch["answer_mask"])
    for b, n in enumerate(lengths.tolist()):
        expected[b, n - 3 : n] = True
    assert torch.equal(batch["answer_mask"], expected)
    assert batch["use_audio_in_video"] is True


def test_eval_batch_prompt_and_choices(synth_dm):
    batch = next(iter(synth_dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    tok = synth_dm.tokenizer
    for b, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
        assert tok.decode(batch["input_ids"][b, n - 11 : n]) == "<|im_start|>assistant\n"
    assert batch["choice_token_ids"].tolist() == [[65, 66, 67, 68]] * 4
    assert batch["choice_mask"].all()
    assert (batch["labels"] == -100).all() and not batch["answer_mask"].any()
    rows = synth_dm.source.bench.rows("val")
    assert batch["question_id"] == [r["question_id"] for r in rows]
    assert batch["answer_index"].tolist() == ["ABCD".index(r["answer"]) for r in rows]
    assert batch["category"] == [r["question_type"] for r in rows]
    assert batch["benchmark"] == ["synthetic_av"] * 4


def test_cache_avoids_decoding_again(synth_dm, monkeypatch):
    first = [b["input_ids"] for b in synth_dm.val_dataloader()]  # fills the cache

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(processor_module, "load_video", boom)
    second = [b["input_ids"] for b in synth_dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _media(tmp_path):
    frames = np.zeros((8, 56, 56, 3), dtype=np.uint8)
    frames[4:] = (200, 30, 30)
    t = np.arange(2 * SR) / SR
    write_av_clip(tmp_path / "clip.mp4", frames, 4.0, (0.4 * np.sin(2 * np.pi * 500 * t)).astype(np.float32))
    write_av_clip(tmp_path / "mute.mp4", frames, 4.0, None)


def test_instruct_jsonl_dataset(tmp_path):
    _media(tmp_path)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<video>What colour appears?"},
                {"role": "assistant", "content": "Red."},
            ],
            "videos": ["clip.mp4"],
        },
        {
            "messages": [
                {"role": "system", "content": "Short answers."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "<video>And now?"},
                {"role": "assistant", "content": "Red"},
            ],
            "videos": [str(tmp_path / "clip.mp4")],
        },
    ]
    ann = tmp_path / "train.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = AVDataModule(InstructSource(train=str(ann)), batch_size=2, min_pixels=28 * 28, max_pixels=56 * 56)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    labelled = [tok.decode(batch["labels"][b][batch["labels"][b] != -100]) for b in range(2)]
    assert labelled == ["Red.<|im_end|>", "Hello<|im_end|>Red<|im_end|>"]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    # Whisper frames = ceil(decoded samples / hop 160) (AAC adds a little padding past the 2 s).
    assert int(batch["feature_attention_mask"][0].sum()) == -(-len(load_audio(tmp_path / "clip.mp4")) // 160)
    assert dm.val_dataloader() == []  # no val split: Lightning runs no validation
    with pytest.raises(ValueError, match="no 'test' split.*eval_benchmarks"):
        dm.test_dataloader()


def test_instruct_bad_rows_name_file_and_line(tmp_path):
    ann = tmp_path / "bad.jsonl"
    good = {
        "messages": [{"role": "user", "content": "<video>Q"}, {"role": "assistant", "content": "A"}],
        "videos": ["v.mp4"],
    }
    cases = [
        ({"videos": ["v.mp4"]}, "missing or empty field 'messages'"),
        ({**good, "videos": []}, r"1 <video> tag\(s\) but 0 entries in 'videos'"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "Q"}]}, r"messages\[0\] has role 'bot'"),
        ({"messages": [{"content": "Q"}]}, r"messages\[0\] needs 'role' and 'content'"),
    ]
    for row, message in cases:
        ann.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"bad\.jsonl line 2: {message}"):
            read_instruct_jsonl(ann)
    ann.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: invalid json"):
        read_instruct_jsonl(ann)


def test_benchmark_source_skips_are_counted(tmp_path):
    _media(tmp_path)
    base = {
        "question": "Colour?",
        "options": ["A. red", "B. blue"],
        "task_type": "Color",
        "duration": "short",
    }
    rows = [
        {**base, "videoID": "clip", "question_id": "q-ok", "answer": "A"},
        {**base, "videoID": "missing", "question_id": "q-missing", "answer": "B"},
        {**base, "videoID": "mute", "question_id": "q-mute", "answer": "A"},
        {**base, "videoID": "clip", "question_id": "q-noanswer"},
    ]
    ann = tmp_path / "videomme.json"
    ann.write_text(json.dumps(rows))
    source = BenchmarkSource("videomme", str(ann), str(tmp_path), skip_bad=True)
    dm = AVDataModule(source, batch_size=2, min_pixels=28 * 28, max_pixels=56 * 56)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["question_id"] == ["q-ok"]
    assert batch["choice_token_ids"].tolist() == [[65, 66]] and batch["answer_index"].tolist() == [0]
    assert dm.skip_report.count == 3
    reasons = " | ".join(f"{w}: {r}" for w, r in dm.skip_report.skipped)
    assert "missing.mp4" in reasons and "mute.mp4" in reasons and "no audio stream" in reasons
    assert "row 3" in reasons and "answer" in reasons
    # Without the skip flag the same data fails loudly, naming the file.
    strict = AVDataModule(
        BenchmarkSource("videomme", str(ann), str(tmp_path)), min_pixels=28 * 28, max_pixels=56 * 56
    )
    with pytest.raises(ValueError, match=r"videomme\.json row 3"):
        strict.setup("test")


def test_cached_sample_is_compressed_and_loads_exactly(synth_dm, tmp_path):
    """The cache stores a sample losslessly (bit-equal to a fresh encode) and much smaller than torch.save."""
    import io

    from ep_kit.data.processor import load_sample, save_sample

    fresh = synth_dm.test_dataloader().dataset[0]
    path = tmp_path / "s.pt"
    save_sample(fresh, path)
    raw = io.BytesIO()
    torch.save(fresh, raw)
    assert path.stat().st_size * 5 < raw.getbuffer().nbytes  # solid-colour frames compress well
    back = load_sample(path)
    tensors = {k for k, v in fresh.items() if isinstance(v, torch.Tensor)}
    assert tensors and tensors == {k for k, v in back.items() if isinstance(v, torch.Tensor)}
    for k in tensors:
        assert back[k].dtype == fresh[k].dtype and torch.equal(back[k], fresh[k]), k
