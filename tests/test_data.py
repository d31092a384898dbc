"""Tests for jaxtrain.data: tokenizers, built-in corpus, prepare, open_dataset, loader."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.data import (
    ByteTokenizer,
    HFTokenizer,
    Loader,
    TokenDataset,
    builtin_corpus,
    corpus_files,
    load_tokenizer,
    open_dataset,
    prepare,
    process_rows,
    sample_windows,
)
from jaxtrain.data.corpus import stdlib_root
from jaxtrain.errors import UserError

SENTENCES = [
    "the cat sat on the mat",
    "the dog ate the bone",
    "a bird sang in the tree",
]


@pytest.fixture
def hf_tokenizer_dir(tmp_path: Path) -> Path:
    """A tiny word-level tokenizer.json, trained here on three sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    out = tmp_path / "tok"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def _pyarrow():
    """pyarrow (an optional dependency) or a skip that says so."""
    reason = "pyarrow is not installed (pip install 'jaxtrain[parquet]')"
    pa = pytest.importorskip("pyarrow", reason=reason)
    return pa, pytest.importorskip("pyarrow.parquet", reason=reason)


@pytest.fixture
def text_inputs(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory of .txt, .jsonl and .parquet files, and every document in it."""
    pa, pq = _pyarrow()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs_txt = ["plain text file one ünïcödé", "plain text two\nwith two lines"]
    for i, d in enumerate(docs_txt):
        (src / f"doc{i}.txt").write_text(d, encoding="utf-8")
    docs_jsonl = [f"json line {i} €" for i in range(8)]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs_jsonl)]
    (src / "sub" / "part.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    docs_parquet = [f"parquet row {i}" for i in range(6)]
    pq.write_table(pa.table({"text": docs_parquet, "n": list(range(6))}), src / "rows.parquet")
    (src / "README.md").write_text("not a document")  # skipped inside a directory
    return src, docs_txt + docs_jsonl + docs_parquet


def split_docs(tokens: np.ndarray, eos: int) -> list[bytes]:
    """Splits a packed token array at EOS into documents (as bytes, for the byte vocab)."""
    assert len(tokens) == 0 or tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [np.asarray(tokens[s:e], np.uint8).tobytes() for s, e in zip(starts, ends, strict=True)]


# --- tokenizers ---------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [256]])) == text  # EOS is not text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # broken UTF-8 is replaced


def test_hf_tokenizer(hf_tokenizer_dir: Path):
    tok = load_tokenizer(str(hf_tokenizer_dir))  # a directory means DIR/tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.name == str((hf_tokenizer_dir / "tokenizer.json").absolute())
    assert tok.eos_id == 1  # "</s>", the second special token
    assert tok.vocab_size == 2 + len({w for s in SENTENCES for w in s.split()})
    ids = tok.encode("the cat ate the bone")
    assert ids.dtype == np.int32 and len(ids) == 5 and ids[0] == ids[3]
    assert tok.decode(np.concatenate([ids, [tok.eos_id]])) == "the cat ate the bone"
    assert [list(x) for x in tok.encode_batch(["the dog", "a bird"])] == [
        list(tok.encode("the dog")),
        list(tok.encode("a bird")),
    ]


def test_tokenizer_errors(tmp_path: Path):
    with pytest.raises(UserError, match="data.tokenizer: .* does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="data.tokenizer: .* is not a tokenizer.json file"):
        load_tokenizer(str(bad))


# --- built-in corpus ----------------------------------------------------------------


def test_corpus_split_by_file():
    files = corpus_files()
    train, val = files["train"], files["validation"]
    assert 0.01 < len(val) / len(train + val) < 0.08  # ~3% of the files, chosen by hash
    assert not set(train) & set(val)
    assert files == corpus_files()  # deterministic
    assert "os.py" in train + val
    for f in train + val:
        parts = f.split("/")
        assert f.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), f

    tok = ByteTokenizer()
    ds = builtin_corpus(tok)
    assert builtin_corpus(tok) is ds  # cached in-process
    assert open_dataset("", tok) is ds
    assert ds.train.dtype == np.uint16 and ds.train.ndim == 1
    # The validation split is exactly its files, in order, each followed by EOS.
    root = stdlib_root()
    texts = [(root / f).read_bytes().decode("utf-8", errors="replace") for f in val]
    assert len(ds.validation) == sum(len(tok.encode(t)) + 1 for t in texts)
    first = tok.encode(texts[0])
    np.testing.assert_array_equal(ds.validation[: len(first)], first)
    assert ds.validation[len(first)] == tok.eos_id
    assert int((ds.train == tok.eos_id).sum()) == len(train)
    assert int((ds.validation == tok.eos_id).sum()) == len(val)


# --- prepare and open_dataset -------------------------------------------------------


def test_prepare_and_open(tmp_path: Path, text_inputs: tuple[Path, list[str]]):
    src, docs = text_inputs
    out = tmp_path / "out"
    meta = prepare([str(src)], str(out), val_fraction=0.3, seed=1)

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eos_id"] == 256
    assert meta["tokenizer"] == "byte"
    assert len(meta["sources"]) == 4
    splits = {s: np.load(out / f"{s}.npy", allow_pickle=False) for s in ("train", "validation")}
    for s, tokens in splits.items():
        assert tokens.dtype == np.uint16 and tokens.ndim == 1
        assert meta["splits"][s]["tokens"] == len(tokens)
        assert meta["splits"][s]["documents"] == int((tokens == 256).sum()) > 0
    got = split_docs(splits["train"], 256) + split_docs(splits["validation"], 256)
    assert sorted(got) == sorted(d.encode("utf-8") for d in docs)

    # Deterministic, and a previous output may be overwritten when asked to.
    assert prepare([str(src)], str(out), val_fraction=0.3, seed=1, overwrite=True) == meta
    np.testing.assert_array_equal(np.load(out / "train.npy"), splits["train"])

    ds = open_dataset(str(out), ByteTokenizer())
    assert isinstance(ds, TokenDataset)
    assert isinstance(ds.train, np.memmap) and not ds.train.flags.writeable
    np.testing.assert_array_equal(ds.validation, splits["validation"])


def test_open_dataset_never_unpickles(
    tmp_path: Path, text_inputs: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
):
    src, _ = text_inputs
    out = tmp_path / "out"
    prepare([str(src)], str(out))
    calls = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    open_dataset(str(out), ByteTokenizer())
    assert len(calls) == 2 and all(c.get("allow_pickle") is False for c in calls)
    np.save(out / "train.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="data.path: cannot read .*train.npy"):
        open_dataset(str(out), ByteTokenizer())


def test_prepare_keeps_both_splits_nonempty(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    meta = prepare(inputs, str(tmp_path / "o"), val_fraction=0.0)
    assert meta["splits"]["train"]["documents"] == 1
    assert meta["splits"]["validation"]["documents"] == 1


def test_prepare_errors(tmp_path: Path, text_inputs: tuple[Path, list[str]]):
    pa, pq = _pyarrow()
    src, _ = text_inputs
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .* files found"):
        prepare([str(tmp_path / "empty")], str(tmp_path / "o0"))
    with pytest.raises(UserError, match="input .*nothing does not exist"):
        prepare([str(tmp_path / "nothing")], str(tmp_path / "o0"))
    with pytest.raises(UserError, match="README.md has an unsupported extension"):
        prepare([str(src / "README.md")], str(tmp_path / "o1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 has no \"text\""):
        prepare([str(bad)], str(tmp_path / "o2"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match='bad.parquet has no "text" column'):
        prepare([str(tmp_path / "bad.parquet")], str(tmp_path / "o3"))
    with pytest.raises(UserError, match="is a non-empty directory that is not a prepare output"):
        prepare([str(src)], str(src))
    assert not (tmp_path / "o2" / "meta.json").exists()


def test_open_dataset_errors(
    tmp_path: Path, text_inputs: tuple[Path, list[str]], hf_tokenizer_dir: Path
):
    with pytest.raises(UserError, match="data.path: .*missing does not exist"):
        open_dataset(str(tmp_path / "missing"), ByteTokenizer())
    with pytest.raises(UserError, match="data.path: .*meta.json does not exist"):
        open_dataset(str(tmp_path), ByteTokenizer())

    src, _ = text_inputs
    out = tmp_path / "out"
    prepare([str(src)], str(out))
    hf = load_tokenizer(str(hf_tokenizer_dir))
    with pytest.raises(UserError, match="data.tokenizer: .* data.path .* prepared with \\(byte"):
        open_dataset(str(out), hf)

    # An HF dataset opens with the same tokenizer.json copied elsewhere, not another one.
    hf_out = tmp_path / "hf_out"
    meta = prepare([str(src)], str(hf_out), tokenizer=str(hf_tokenizer_dir))
    assert meta["tokenizer"] == hf.name and meta["dtype"] == "uint16"
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(hf.name, copy)
    assert open_dataset(str(hf_out), HFTokenizer(copy)).vocab_size == hf.vocab_size
    with pytest.raises(UserError, match="data.tokenizer"):
        open_dataset(str(hf_out), ByteTokenizer())


# --- sampling and the loader --------------------------------------------------------


def test_sample_windows_deterministic():
    tokens = np.arange(1000, dtype=np.uint16)
    kw = dict(seed=3, stream=0, batch=8, seq_len=16)
    a = sample_windows(tokens, step=5, **kw)
    np.testing.assert_array_equal(a["inputs"], sample_windows(tokens, step=5, **kw)["inputs"])
    assert a["inputs"].shape == a["targets"].shape == (8, 16)
    assert a["inputs"].dtype == np.int32
    # Windows are contiguous slices and targets are inputs shifted by one.
    np.testing.assert_array_equal(a["inputs"], a["inputs"][:, :1] + np.arange(16))
    np.testing.assert_array_equal(a["targets"], a["inputs"] + 1)
    assert a["targets"].max() < len(tokens)
    assert not np.array_equal(a["inputs"], sample_windows(tokens, step=6, **kw)["inputs"])
    other_stream = sample_windows(tokens, step=5, **{**kw, "stream": 1})
    assert not np.array_equal(a["inputs"], other_stream["inputs"])
    part = sample_windows(tokens, step=5, rows=range(2, 6), **kw)
    np.testing.assert_array_equal(part["inputs"], a["inputs"][2:6])
    np.testing.assert_array_equal(part["targets"], a["targets"][2:6])

    # The offsets cover the whole allowed range [0, len - seq_len - 1].
    short = np.arange(18)
    starts = {int(sample_windows(short, step=s, **kw)["inputs"][0, 0]) for s in range(50)}
    assert starts == {0, 1}
    with pytest.raises(UserError, match="data.seq_len: 16"):
        sample_windows(np.arange(16), step=0, **kw)


def test_loader_on_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    rng = np.random.default_rng(0)
    ds = TokenDataset(
        train=rng.integers(0, 257, 5000).astype(np.uint16),
        validation=rng.integers(0, 257, 500).astype(np.uint16),
        vocab_size=257,
        eos_id=256,
        source="test",
    )
    assert process_rows(sharding, (16, 32)) == range(16)
    loader = Loader(ds, seed=7, global_batch=16, seq_len=32, sharding=sharding)
    kw = dict(seed=7, batch=16, seq_len=32)
    for batch, want in [
        (loader.train_batch(4), sample_windows(ds.train, step=4, stream=0, **kw)),
        (loader.eval_batch(2), sample_windows(ds.validation, step=2, stream=1, **kw)),
    ]:
        for key in ("inputs", "targets"):
            assert batch[key].shape == (16, 32) and batch[key].dtype == np.int32
            assert batch[key].sharding == sharding
            assert len(batch[key].addressable_shards) == 8
            assert batch[key].addressable_shards[0].data.shape == (2, 32)
            np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
