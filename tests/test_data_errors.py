"""Data mistakes end in one clear line and lose nothing: ``prepare`` never damages an
existing dataset and refuses an empty result, and a dataset the model cannot read (ids
past the vocabulary, float tokens, a short split, a malformed meta.json or .npy, an
unknown EOS) is refused at start-up instead of training into a NaN loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import SMALL, jaxtrain

from jaxtrain import config
from jaxtrain.data import (
    ByteTokenizer,
    TokenDataset,
    check_dataset,
    load_tokenizer,
    open_dataset,
    prepare,
)
from jaxtrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Asserts the CLI failed with exactly one ``jaxtrain: error:`` line naming ``parts``."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxtrain: error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_dataset(root: Path, train: np.ndarray, validation: np.ndarray, **meta) -> Path:
    """A hand-made dataset directory, as a user might assemble one without prepare."""
    root.mkdir(parents=True)
    np.save(root / "train.npy", train)
    np.save(root / "validation.npy", validation)
    fields = {"format": 1, "tokenizer": "byte", "vocab_size": 257, "eos_id": 256} | meta
    (root / "meta.json").write_text(json.dumps(fields))
    return root


def word_tokenizer(directory: Path, specials: list[str]) -> Path:
    """A tiny word-level tokenizer.json with the given special tokens (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the cat sat on the mat", "a dog ate the bone"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=specials))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


# --- prepare: an existing dataset is replaced only on success and only when asked ----


def test_prepare_replaces_a_dataset_only_on_success_and_with_overwrite(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "b.txt").write_text("second document " * 20)
    out = tmp_path / "data" / "tokens"
    good = ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--output", str(out)]
    assert jaxtrain("prepare", *good).returncode == 0
    before = snapshot(out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    proc = jaxtrain("prepare", "--input", str(bad), "--output", str(out), "--overwrite")
    one_error_line(proc, "bad.jsonl:2 is not valid JSON")
    assert snapshot(out) == before  # meta.json and both .npy files, byte for byte
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens"]  # no temp dirs

    proc = jaxtrain("prepare", *good)
    one_error_line(proc, "--output", str(out), "--overwrite")
    assert snapshot(out) == before

    (tmp_path / "c.txt").write_text("a replacement " * 30)
    proc = jaxtrain(
        "prepare", "--input", str(tmp_path / "c.txt"), "--output", str(out), "--overwrite"
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == [str(tmp_path / "c.txt")]
    assert "warning: the validation split is empty (one document)" in proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens"]
    assert "--overwrite" in jaxtrain("prepare", "--help").stdout


def test_prepare_never_overwrites_a_foreign_directory(tmp_path: Path):
    (tmp_path / "a.txt").write_text("some text")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    with pytest.raises(UserError, match="not a prepare output .*notes.md"):
        prepare([str(tmp_path / "a.txt")], str(out), overwrite=True)
    assert snapshot(out) == {"notes.md": b"keep me"}


def test_prepare_keeps_the_old_dataset_when_the_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    out = tmp_path / "out" / "tokens"
    prepare(inputs, str(out))
    before = snapshot(out)
    real_rename = os.rename

    def rename(src, dst):  # the old dataset moves aside, then the new one fails to move in
        if ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(UserError, match="prepare: cannot write --output .*No space left"):
        prepare(inputs, str(out), seed=3, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens"]


# --- prepare: undecodable and empty inputs --------------------------------------------


def test_prepare_skips_files_and_lines_that_are_not_utf8(tmp_path: Path):
    (tmp_path / "good.txt").write_text("plain text " * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    lines = [b'{"text": "one"}', b'{"text": "caf\xe9"}', b'{"text": ""}', b'{"text": "two"}']
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    out = tmp_path / "out"
    proc = jaxtrain("prepare", "--input", str(tmp_path), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"skipped 1 files that are not UTF-8: {tmp_path / 'latin1.txt'}" in proc.stderr
    assert f"skipped 1 JSONL lines that are not UTF-8: {tmp_path / 'docs.jsonl'}:2" in proc.stderr
    assert "skipped 2 empty documents" in proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 3
    tokens = np.concatenate([np.load(out / f"{s}.npy") for s in ("train", "validation")])
    assert "\ufffd" not in ByteTokenizer().decode(tokens)  # nothing was decoded by replacement
    assert meta["max_id"] == 256 and meta["skipped"]["empty_documents"] == 2


def test_prepare_refuses_an_empty_result(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes(b"\xe9t\xe9")
    (tmp_path / "zero.txt").write_bytes(b"")
    out = tmp_path / "out"
    proc = jaxtrain(
        "prepare",
        "--input",
        str(tmp_path / "latin1.txt"),
        str(tmp_path / "zero.txt"),
        "--output",
        str(out),
    )
    one_error_line(proc, "no document with text", "latin1.txt and 1 more", "not UTF-8")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "zero.txt"]


def test_prepare_unreadable_inputs_are_one_line(tmp_path: Path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    proc = jaxtrain("prepare", "--input", str(fifo), "--output", str(tmp_path / "o"))
    one_error_line(proc, str(fifo), "is not a regular file")
    if not Path("/proc/self/mem").is_file():
        pytest.skip("needs /proc/self/mem (Linux), a file whose read fails even for root")
    unreadable = tmp_path / "io_error.txt"
    unreadable.symlink_to("/proc/self/mem")
    proc = jaxtrain("prepare", "--input", str(unreadable), "--output", str(tmp_path / "o"))
    one_error_line(proc, f"cannot read {unreadable}")


# --- training refuses data the model cannot read, before compiling --------------------


BAD_DATA = {
    "ids_past_vocab": (
        lambda: np.arange(1000, dtype=np.uint16) % 600,
        lambda: np.arange(100, dtype=np.uint16),
        ["train.npy holds token id 599", "model.vocab_size 512"],
    ),
    "float_tokens": (
        lambda: np.arange(1000, dtype=np.float32),
        lambda: np.arange(100, dtype=np.float32),
        ["train.npy holds float32 values", "not integer token ids"],
    ),
    "empty_validation": (
        lambda: np.arange(1000, dtype=np.uint16) % 256,
        lambda: np.zeros(0, dtype=np.uint16),
        ["validation.npy has 0 tokens", "data.seq_len=32"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_train_refuses_unusable_tokens_at_startup(tmp_path: Path, case: str):
    train, validation, expected = BAD_DATA[case]
    data = write_dataset(tmp_path / "data", train(), validation())
    run = ["--set", f"data.path={data}", "--set", f"run.dir={tmp_path / 'run'}"]
    proc = jaxtrain("train", *SMALL, *run, "--set", "train.steps=2")
    one_error_line(proc, "data.path: ", str(data), *expected)
    assert "compiled" not in proc.stdout + proc.stderr  # refused before compiling


def test_check_dataset_trusts_the_recorded_max_id_and_refuses_negative_ids(tmp_path: Path):
    data = write_dataset(
        tmp_path / "d", np.arange(300, dtype=np.uint16), np.arange(300, dtype=np.uint16)
    )
    check_dataset(open_dataset(str(data), ByteTokenizer()), vocab_size=300)
    meta = json.loads((data / "meta.json").read_text()) | {"max_id": 400}
    (data / "meta.json").write_text(json.dumps(meta))  # the recorded value is used as is
    with pytest.raises(UserError, match="meta.json records token id 400 but model.vocab_size"):
        check_dataset(open_dataset(str(data), ByteTokenizer()), vocab_size=300)
    signed = np.array([5, -1, 7] * 20, dtype=np.int32)
    ds = TokenDataset(signed, signed, 257, 256, "hand-made")
    with pytest.raises(UserError, match=r"hand-made \(train\) holds token id -1"):
        check_dataset(ds, vocab_size=257)


# --- meta.json and .npy files that are not what they claim ----------------------------


def test_random_bytes_npy_is_not_reported_as_a_pickle(tmp_path: Path):
    data = write_dataset(tmp_path / "d", np.arange(300, dtype=np.uint16), np.arange(300))
    (data / "train.npy").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError) as err:
        open_dataset(str(data), ByteTokenizer())
    assert str(err.value) == f"data.path: {data / 'train.npy'} is not a .npy token array"
    (data / "validation.npy").unlink()
    np.save(data / "train.npy", np.arange(300, dtype=np.uint16))
    with pytest.raises(UserError, match=r"cannot read .*validation.npy \(No such file"):
        open_dataset(str(data), ByteTokenizer())


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("vocab_size", "257", "field 'vocab_size' must be an integer, not str '257'"),
        ("eos_id", True, "field 'eos_id' must be an integer, not bool True"),
        ("tokenizer", None, "field 'tokenizer' must be a string, not NoneType None"),
        ("max_id", 1.5, "field 'max_id' must be an integer, not float 1.5"),
        ("eos_id", 300, "field 'eos_id' is 300; must be in [0, vocab_size)"),
        ("format", 2, "field 'format' is 2; this jaxtrain reads format 1"),
    ],
)
def test_meta_json_field_types(tmp_path: Path, field: str, value, expected: str):
    tokens = np.arange(300, dtype=np.uint16)
    data = write_dataset(tmp_path / "d", tokens, tokens, **{field: value})
    with pytest.raises(UserError) as err:
        open_dataset(str(data), ByteTokenizer())
    assert str(err.value) == f"data.path: {data / 'meta.json'}: {expected}"


# --- the end-of-document id: found by name, or given as data.eos_id -------------------


def test_tokenizer_without_a_known_eos_needs_data_eos_id(tmp_path: Path):
    file = word_tokenizer(tmp_path / "tok", ["<unk>", "<pad>", "<stop>"])
    with pytest.raises(UserError, match="data.tokenizer: .*tokenizer.json has none .* data.eos_id"):
        load_tokenizer(str(file))
    tok = load_tokenizer(str(file), eos_id=2)
    assert tok.eos_id == 2
    with pytest.raises(UserError, match="data.eos_id: 999 is not an id of data.tokenizer"):
        load_tokenizer(str(file), eos_id=999)
    with pytest.raises(UserError, match="data.eos_id: 5; the byte tokenizer's EOS is 256"):
        load_tokenizer("byte", eos_id=5)
    assert load_tokenizer("byte", eos_id=256).eos_id == 256
    with pytest.raises(UserError, match="data.eos_id: must be >= 0, or -1"):
        config.load(None, ["data.eos_id=-2"])
    assert config.load(None, ["data.eos_id=2"]).data.eos_id == 2

    # prepare --eos-id records it, and a run must open the data with the same EOS.
    (tmp_path / "a.txt").write_text("the cat sat on the mat")
    (tmp_path / "b.txt").write_text("a dog ate the bone")
    out = tmp_path / "out"
    inputs = ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    proc = jaxtrain("prepare", *inputs, "--output", str(out), "--tokenizer", str(file))
    one_error_line(proc, "data.tokenizer", "set data.eos_id (prepare: --eos-id)")
    proc = jaxtrain(
        "prepare", *inputs, "--output", str(out), "--tokenizer", str(file), "--eos-id", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["eos_id"] == 2
    assert open_dataset(str(out), tok).eos_id == 2
    with pytest.raises(
        UserError, match="data.eos_id: .* prepared with EOS id 2 .* set data.eos_id=2"
    ):
        open_dataset(str(out), load_tokenizer(str(file), eos_id=1))


def test_unreadable_tokenizer_json_is_one_line(tmp_path: Path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b'{"version": "1.0", "model": "\xff"}')
    with pytest.raises(UserError, match=f"data.tokenizer: {bad} is not UTF-8 text"):
        load_tokenizer(str(bad))
    if not Path("/proc/self/mem").is_file():
        pytest.skip("needs /proc/self/mem (Linux), a file whose read fails even for root")
    bad.unlink()
    bad.symlink_to("/proc/self/mem")
    with pytest.raises(UserError, match=f"data.tokenizer: cannot read {bad} \\(Input/output"):
        load_tokenizer(str(tmp_path))


# --- optional dependencies -------------------------------------------------------------


def test_data_tests_skip_without_pyarrow():
    """With pyarrow missing, the data tests that need it skip with a reason instead of
    failing the whole module at collection."""
    code = (
        "import sys; sys.modules['pyarrow'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', '-n', '0', "
        "'tests/test_data.py', '-k', 'prepare_and_open or byte_tokenizer']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed, 1 skipped" in proc.stdout and "pyarrow is not installed" in proc.stdout
