"""`prepare_data`: sources → validated documents → tokenizer → token cache → block datasets.

Global rank 0 (of an initialised `torch.distributed` group; else the single process) reads and
writes first; the other ranks wait on a barrier and receive the cache's name (or rank 0's error).
On a filesystem every rank sees, they memory-map rank 0's files. Under a node-local
`data.cache_dir` (a node's own disk, `AVA_CACHE` per node) the first rank of each other node
(LOCAL_RANK 0) builds the same cache from the same sources, and every rank's copy is checked
against rank 0's before training. A second call with the same inputs finds the published cache and only opens
it. The train/validation split is at document level: a permutation seeded by `seed` puts
`round(val_fraction * documents)` documents (at least one when `val_fraction > 0` and there
are two or more documents) in validation, so no document straddles the two splits.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ava import dist
from ava.config import DataConfig
from ava.data import cache
from ava.data import tokenizer as tok
from ava.data.chat import TOO_LONG, ChatTemplate, ChatValidator, load_template
from ava.data.errors import DataError, DataSourceError, DataValidationError
from ava.data.packing import (
    ChatBlocks,
    TokenBlocks,
    pack_conversations,
    token_dtype,
    tokenize,
    tokenize_chat,
    write_blocks,
    write_stream,
)
from ava.data.sources import Source, resolve_sources
from ava.data.validate import TextValidator, ValidationReport, Validator
from ava.files import sha256_file

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the trainer needs from the data, all backed by one cache directory."""

    train: TokenBlocks | ChatBlocks
    val: TokenBlocks | ChatBlocks
    tokenizer_path: Path
    vocab_size: int
    fingerprint: str  # cache key + seq_len: a resumed run must see the same value
    report: ValidationReport
    eos_id: int
    pad_id: int
    cache_path: Path
    seq_len: int
    kind: str = "text"
    chat_template_path: Optional[Path] = None  # chat: the template used, which the export carries


class _Output:
    """Human output of the preparation. Every line goes to `logging` (INFO), so a run's
    `train.log` holds the sources used and the validation report; where nobody configured
    logging (a notebook, a script), `progress` prints the lines on stderr instead."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.console = None
        if progress and not log.hasHandlers():
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, markup=False)
        else:
            log.info("%s", message)

    def report(self, report: ValidationReport) -> None:
        for line in report.lines():
            self.say(f"data validation: {line}" if not line.startswith(" ") else line)


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices, each sorted; deterministic given `seed`."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _keys(data_cfg: DataConfig, sources: List[Source], seed: int, model_vocab_size: int,
          template: Optional[ChatTemplate]) -> Tuple[str, str, dict]:
    """(cache key, corpus key, tokenizer identity). The corpus key covers what decides the
    documents of each split; the cache key adds the tokenizer. For text `seq_len` is in neither:
    blocks are views, so one cache serves every sequence length. Conversations are packed into
    blocks of `seq_len + 1`, so for chat the key holds it, with the template and the mask rule."""
    chat = None
    if template is not None:
        chat = {"template": template.identity, "train_on": data_cfg.train_on,
                "overlong": data_cfg.chat.overlong, "seq_len": data_cfg.seq_len,
                "fields": [data_cfg.chat.messages_field, data_cfg.chat.prompt_field,
                           data_cfg.chat.completion_field]}
    corpus_key = cache.stable_hash({
        "sources": [s.identity for s in sources], "max_doc_chars": data_cfg.max_doc_chars,
        "val_fraction": data_cfg.val_fraction, "seed": seed, "chat": chat,
        "format_version": cache.CACHE_FORMAT_VERSION})
    tcfg = data_cfg.tokenizer
    if tcfg.path:
        path = Path(tcfg.path).expanduser().resolve()
        if not path.is_file():
            raise DataSourceError(f"data.tokenizer.path={tcfg.path!r} does not exist")
        identity = {"path": str(path), "sha256": sha256_file(path),
                    "eos": tcfg.eos_token, "pad": tcfg.pad_token}
    else:
        size = tok.target_vocab_size(tcfg, model_vocab_size)
        identity = {"train": tok.training_key(tcfg, size, corpus_key),
                    "eos": tcfg.eos_token, "pad": tcfg.pad_token}
    return cache.stable_hash({"corpus": corpus_key, "tokenizer": identity}), corpus_key, identity


TEXT_SCHEMA = pa.schema([("text", pa.string())])
CHAT_SCHEMA = pa.schema([("location", pa.string()), ("segments", pa.list_(pa.string())),
                         ("targets", pa.list_(pa.bool_()))])


def _read_documents(sources: List[Source], validator: Validator, path: Path, batch_size: int,
                    progress: bool, schema: pa.Schema) -> int:
    """Validate every record of every source and write the kept documents to an Arrow
    stream file (`TEXT_SCHEMA`, or `CHAT_SCHEMA` for rendered conversations), in source order;
    returns the number of documents."""
    def flush(rows: list) -> None:
        if schema is TEXT_SCHEMA:
            writer.write_batch(pa.record_batch([pa.array(rows, pa.string())], schema=schema))
        else:
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))

    written = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(desc="read + validate", unit="doc", disable=not progress) as bar:
        batch: list = []
        for source in sources:
            bar.set_postfix_str(source.name[-60:], refresh=False)
            try:
                for document in validator(_counted(source.records(), bar)):
                    batch.append(document)
                    if len(batch) >= batch_size:
                        flush(batch)
                        written += len(batch)
                        batch = []
            except (OSError, pa.ArrowException) as exc:
                raise DataSourceError(f"{source.name}: read failed: {exc}") from exc
        if batch:
            flush(batch)
            written += len(batch)
    return written


def _counted(records: Iterator, bar: tqdm) -> Iterator:
    for record in records:
        bar.update()
        yield record


def _text_batches(dataset, batch_size: int) -> Iterator[List[str]]:
    """What BPE trains on: the documents, or the rendered conversations."""
    for batch in dataset.iter(batch_size=batch_size):
        yield batch["text"] if "text" in batch else ["".join(spans) for spans in batch["segments"]]


def _obtain_tokenizer(data_cfg: DataConfig, train_ds, identity: dict, root: Path,
                      model_vocab_size: int, progress: bool, out: _Output):
    """Load `data.tokenizer.path`, or reuse/train the BPE tokenizer cached under its key."""
    tcfg = data_cfg.tokenizer
    if tcfg.path:
        return tok.load_tokenizer(Path(identity["path"]))
    cached = root / "tokenizers" / f"bpe-{identity['train'][:16]}.json"
    if cached.is_file():
        out.say(f"data: reusing trained tokenizer {cached}")
        return tok.load_tokenizer(cached)
    if len(train_ds) == 0:
        raise DataError("no training documents to train a tokenizer on")
    size = tok.target_vocab_size(tcfg, model_vocab_size)
    start = time.perf_counter()
    trained = tok.train_tokenizer(_text_batches(train_ds, data_cfg.batch_size), cfg=tcfg,
                                  vocab_size=size, length=len(train_ds), progress=progress)
    tok.save_atomic(trained, cached)
    out.say(f"data: trained byte-level BPE ({tok.vocab_size_of(trained)} ids, asked {size}) "
            f"in {time.perf_counter() - start:.1f}s -> {cached}")
    return trained


def _build(data_cfg: DataConfig, sources: List[Source], key: str, identity: dict, final: Path, seed: int,
           model_vocab_size: int, template: Optional[ChatTemplate], out: _Output) -> None:
    """Build the cache directory `final` (in a scratch directory, then renamed into place);
    `template`: the chat template for conversations, None for text."""
    import datasets

    start = time.perf_counter()
    root = final.parent
    scratch = cache.scratch_dir(root, key)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not out.progress:
        datasets.disable_progress_bars()
    try:
        work = scratch / "work"
        work.mkdir()
        chat = template is not None
        if chat:
            out.say(f"data: chat template from {template.origin}; targets: {data_cfg.train_on} tokens")
            validator: Validator = ChatValidator(template, data_cfg.train_on, strict=data_cfg.strict,
                                                 report_examples=data_cfg.report_examples)
        else:
            validator = TextValidator(max_doc_chars=data_cfg.max_doc_chars, strict=data_cfg.strict,
                                  report_examples=data_cfg.report_examples)
        n_docs = _read_documents(sources, validator, work / "documents.arrow",
                                 data_cfg.batch_size, out.progress, CHAT_SCHEMA if chat else TEXT_SCHEMA)
        report = validator.report
        if n_docs == 0:
            raise DataError(f"data '{data_cfg.name}': no document survived validation; "
                            + "; ".join(report.lines()))
        documents = datasets.Dataset.from_file(str(work / "documents.arrow"))
        train_idx, val_idx = split_indices(n_docs, data_cfg.val_fraction, seed)
        splits = {"train": documents.select(train_idx), "val": documents.select(val_idx)}

        tokenizer = _obtain_tokenizer(data_cfg, splits["train"], identity, root.parent,
                                      model_vocab_size, out.progress, out)
        vocab_size = tok.vocab_size_of(tokenizer)
        tok.check_agreement(vocab_size, model_vocab_size)
        eos_id, pad_id = tok.special_ids(tokenizer, data_cfg.tokenizer,
                                         data_cfg.tokenizer.path or "trained tokenizer")
        dtype = token_dtype(vocab_size)
        counts, blocks = {}, {}
        for split, dataset in splits.items():
            tokenized = None
            common = dict(eos_id=eos_id, dtype=dtype, num_proc=data_cfg.num_proc, batch_size=data_cfg.batch_size,
                          cache_file=work / f"tokens-{split}.arrow", desc=f"tokenize {split}",
                          fingerprint=f"{key[:32]}-{split}")
            if chat:
                if len(dataset):
                    tokenized = tokenize_chat(dataset, tokenizer, eos_target=data_cfg.train_on == "all", **common)
                rows = (() if tokenized is None else
                        (row for b in tokenized.iter(batch_size=data_cfg.batch_size)
                         for row in zip(b["location"], b["ids"], b["targets"], strict=True)))
                packed = pack_conversations(rows, data_cfg.seq_len + 1, pad_id, data_cfg.chat.overlong,
                                            validator.truncate,
                                            lambda location, detail: validator.drop(location, TOO_LONG, detail))
                blocks[split], counts[split] = write_blocks(packed, scratch / f"{split}.bin", dtype)
            else:
                if len(dataset):
                    tokenized = tokenize(dataset, tokenizer, **common)
                counts[split] = write_stream(tokenized, scratch / f"{split}.bin", dtype,
                                             data_cfg.batch_size)
        del documents, splits, tokenized
        shutil.rmtree(work)
        tokenizer.save(str(scratch / cache.TOKENIZER))
        if chat:
            (scratch / cache.CHAT_TEMPLATE).write_text(template.text, "utf-8")
        report.save(scratch / cache.REPORT)
        cache.CacheMeta(key=key, name=data_cfg.name, dtype=dtype.name, vocab_size=vocab_size,
                        eos_id=eos_id, pad_id=pad_id, train_tokens=counts["train"],
                        val_tokens=counts["val"], train_documents=len(train_idx),
                        val_documents=len(val_idx),
                        build_seconds=round(time.perf_counter() - start, 3), kind=data_cfg.kind,
                        block_len=data_cfg.seq_len + 1 if chat else 0,
                        train_blocks=blocks.get("train", 0), val_blocks=blocks.get("val", 0)).save(scratch)
        cache.publish(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    out.report(report)


SOURCES_SHOWN = 5  # sources named one by one in the preparation log; the rest are counted


def describe_sources(sources: List[Source]) -> str:
    """One line naming the sources a run reads (the built-in corpus included)."""
    names = [s.name for s in sources[:SOURCES_SHOWN]]
    rest = len(sources) - len(names)
    return (f"data: {len(sources)} source(s): " + ", ".join(names)
            + (f", and {rest} more" if rest > 0 else ""))


def _prepare_rank0(data_cfg: DataConfig, model_vocab_size: int, seed: int,
                   out: _Output) -> Path:
    """Find or build the cache directory; returns its path."""
    start = time.perf_counter()
    root = cache.cache_root(data_cfg.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(data_cfg, hf_cache_dir=root.parent / "hf")
    out.say(describe_sources(sources))
    if data_cfg.builtin and data_cfg.sources:
        log.warning("data: the built-in corpus %r is used as well as data.sources "
                    "(data.builtin=%s); to train on your files only, use data=files", data_cfg.builtin,
                    data_cfg.builtin)
    template = load_template(data_cfg) if data_cfg.kind == "chat" else None
    key, _corpus_key, identity = _keys(data_cfg, sources, seed, model_vocab_size, template)
    final = root / f"{data_cfg.name}-{key[:16]}"
    if cache.is_complete(final):
        report = ValidationReport.load(final / cache.REPORT)
        if data_cfg.strict and report.total_skipped:
            # the cache was built without strict mode: strict must hold whatever the cache holds
            raise DataValidationError(report.strict_error() or "")
        out.say(f"data: reusing cache {final} ({time.perf_counter() - start:.2f}s)")
        out.report(report)
    else:
        _build(data_cfg, sources, key, identity, final, seed, model_vocab_size, template, out)
    return final


def _open(final: Path, data_cfg: DataConfig, model_vocab_size: int) -> PreparedData:
    if not cache.is_complete(final):
        raise DataError(f"data cache {final} is incomplete: it was removed or changed while this run "
                        "opened it; run again to rebuild it")
    meta = cache.CacheMeta.load(final)
    tok.check_agreement(meta.vocab_size, model_vocab_size)  # every rank fails alike
    dtype = np.dtype(meta.dtype)
    seq_len = data_cfg.seq_len
    if meta.kind == "chat":
        train: TokenBlocks | ChatBlocks = ChatBlocks(final / cache.TRAIN, dtype, seq_len, meta.train_blocks)
        val: TokenBlocks | ChatBlocks = ChatBlocks(final / cache.VAL, dtype, seq_len, meta.val_blocks)
    else:
        train = TokenBlocks(final / cache.TRAIN, dtype, seq_len, meta.train_tokens)
        val = TokenBlocks(final / cache.VAL, dtype, seq_len, meta.val_tokens)
    return PreparedData(
        train=train, val=val,
        tokenizer_path=final / cache.TOKENIZER, vocab_size=meta.vocab_size,
        fingerprint=cache.stable_hash({"cache": meta.key, "seq_len": seq_len})[:32],
        report=ValidationReport.load(final / cache.REPORT), eos_id=meta.eos_id,
        pad_id=meta.pad_id, cache_path=final, seq_len=seq_len, kind=meta.kind,
        chat_template_path=final / cache.CHAT_TEMPLATE if meta.kind == "chat" else None)


def _digest(final: Path) -> str:
    """What must agree between node-local caches: the counts and the tokenizer, byte for byte."""
    meta = asdict(cache.CacheMeta.load(final))
    meta.pop("build_seconds")
    return cache.stable_hash({"meta": meta, "tokenizer": sha256_file(final / cache.TOKENIZER)})


def _prepare_node_local(data_cfg: DataConfig, model_vocab_size: int, seed: int, name: str) -> Optional[str]:
    """On a node's first rank (other than global rank 0): the cache rank 0 prepared is found here
    when `data.cache_dir` is shared, and built again from the same sources when it is node-local
    (a node's own disk); returns the failure, if any."""
    own = cache.cache_root(data_cfg.cache_dir) / name
    if cache.is_complete(own):
        return None
    log.info("data: rank %d: no cache at %s (data.cache_dir is node-local): preparing it on this node",
             dist.rank(), own)
    try:
        built = _prepare_rank0(data_cfg, model_vocab_size, seed, _Output(False))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if built != own:
        return f"it prepared {built}, rank 0 {name}: the sources differ between nodes"
    return None


def prepare_data(data_cfg: DataConfig, *, model_vocab_size: int, seed: int = 1234,
                 progress: bool = True) -> PreparedData:
    """Prepare (or reuse) the token cache of `data_cfg` and open it as block datasets.

    Raises `DataError` subclasses with messages naming the file, line or config key: a bad
    source, a bad record under `data.strict=true`, or a tokenizer larger than
    `model_vocab_size`. Under `torch.distributed`, every rank must call it. Global rank 0
    prepares first; the first rank of every other node then uses that cache on a shared
    filesystem or builds its own under a node-local `data.cache_dir`, and every rank checks
    that its cache agrees with rank 0's.
    """
    start = time.perf_counter()
    rank = dist.rank()
    out = _Output(progress and rank == 0)
    final: Optional[Path] = None
    failure: Optional[BaseException] = None
    if rank == 0:
        try:
            final = _prepare_rank0(data_cfg, model_vocab_size, seed, out)
        except Exception as exc:  # forwarded to the other ranks before re-raising
            failure = exc
    if dist.world_size() > 1:
        dist.barrier()
        shared = dist.broadcast_object([final.name if final else None,
                                        f"{type(failure).__name__}: {failure}" if failure else None])
        if rank != 0 and shared[1] is not None:
            raise DataError(f"rank 0 failed to prepare the data: {shared[1]}")
        if failure is None:
            final = _join_node_caches(data_cfg, model_vocab_size, seed, shared[0])
    if failure is not None:
        raise failure
    assert final is not None
    prepared = _open(final, data_cfg, model_vocab_size)
    if rank == 0:
        note = tok.check_agreement(prepared.vocab_size, model_vocab_size)
        if note:
            out.say(f"data: {note}")
        meta = cache.CacheMeta.load(final)
        out.say(f"data: {data_cfg.name}: {meta.train_documents + meta.val_documents} documents "
                f"({prepared.report.total_skipped} records skipped), "
                f"{meta.train_tokens + meta.val_tokens} tokens, "
                f"{len(prepared.train)} train + {len(prepared.val)} val blocks of "
                f"{data_cfg.seq_len}+1, {time.perf_counter() - start:.2f}s, cache {final}")
    return prepared


def _join_node_caches(data_cfg: DataConfig, model_vocab_size: int, seed: int, name: str) -> Path:
    """Every rank's own path to the cache named `name` (rank 0's), prepared node by node and
    checked against rank 0's; raises `DataError` on every rank alike."""
    rank = dist.rank()
    problem = None
    if rank != 0 and dist.local_rank() == 0:
        problem = _prepare_node_local(data_cfg, model_vocab_size, seed, name)
    problems = [(r, p) for r, p in enumerate(dist.all_gather_object(problem)) if p]
    if problems:
        r, p = problems[0]
        raise DataError(f"rank {r} could not prepare its node's data cache: {p}")
    final = cache.cache_root(data_cfg.cache_dir) / name
    digest = _digest(final) if cache.is_complete(final) else None
    digests = dist.all_gather_object(digest)
    missing = [r for r, d in enumerate(digests) if d is None]
    if missing:
        raise DataError(f"data cache {name} is missing on rank(s) {missing} under data.cache_dir: each node's "
                        "first rank (LOCAL_RANK 0) prepares it, so every rank of a node must see that node's "
                        "data.cache_dir")
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DataError(f"data cache {name} on rank(s) {differ} differs from rank 0's (token counts or "
                        "tokenizer.json): node-local caches must be built from identical sources; put "
                        "data.cache_dir on a filesystem all nodes share")
    return final
