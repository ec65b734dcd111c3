"""Bytes/token and decode fidelity of the logit-cache encodings on real teacher distributions.

Teacher: the embedded SmolLM2-135M-Instruct (HF, float32 forward, exact full-vocab
log-softmax).  Text: the ``METADATA`` files (package descriptions, mostly English prose and
Markdown READMEs) of the Python distributions installed in this interpreter's
site-packages, in name order — offline and reproducible on any machine with the same venv.

For top-k (k in 16, 32, 64, 128) and sampled targets (N in 25, 50 draws with replacement
from the full distribution) the script writes real caches with ``CacheWriter`` (one shard,
so the compact shard's id table is amortised over this run's tokens only: a production
shard of 1024 x 512 tokens amortises it ~25x better), reads them back with ``CacheReader``
and prints one table: on-disk bytes/token per encoding next to raw references (int32 ids +
fp32 / fp16 log-probs, full-vocab fp16 logits raw and zstd'd), the decode error on stored
entries and the tail-bucket KL(exact || decoded) in nats/token.  Then the read throughput of
the compact top-64 cache (decoded target positions per second, sha256 verification
included).

    .venv/bin/python bench/cache_size.py [--tokens 20480] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import site
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from qadpipe.cache import CacheMeta, CacheReader, CacheWriter
from qadpipe.cache.reader import DEFAULT_DECODE_THREADS
from qadpipe.models import embedded_smollm2_dir, load_causal_lm, load_tokenizer, tokenizer_fingerprint
from qadpipe.targets import SequenceTargets, tail_mass_from_logprobs

K_VALUES = (16, 32, 64, 128)
N_VALUES = (25, 50)


def offline_text(min_chars: int) -> tuple[str, str]:
    """Concatenated METADATA files of installed distributions (and where they came from)."""
    root = Path(next(p for p in site.getsitepackages() if Path(p).is_dir()))
    parts, used = [], 0
    for path in sorted(root.glob("*.dist-info/METADATA")):
        parts.append(path.read_text(errors="replace"))
        used += 1
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts), f"METADATA of the first {used} distributions (by name) in {root}"


def teacher_targets(model, windows: np.ndarray, seed: int) -> dict:
    """Exact top-128 (ids, fp32 log-probs), and N-draw samples, for every position."""
    generator = torch.Generator().manual_seed(seed)
    out = {"ids": [], "logprobs": [], "draws": {n: [] for n in N_VALUES}, "fp16_zstd": []}
    for window in tqdm(windows, desc="teacher forward", unit="seq"):
        with torch.no_grad():
            logits = model(torch.from_numpy(window)[None]).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values, ids = logprobs.topk(max(K_VALUES), dim=-1)
        out["ids"].append(ids.int().numpy())
        out["logprobs"].append(values.numpy())
        probs = logprobs.exp()
        for n in N_VALUES:
            out["draws"][n].append(torch.multinomial(probs, n, replacement=True, generator=generator).numpy())
        if len(out["fp16_zstd"]) < 2:   # compressibility of full-vocab fp16 logits, on a sample
            raw = logits.half().numpy().tobytes()
            out["fp16_zstd"].append((len(zstandard.ZstdCompressor(level=3).compress(raw)), logits.shape[0]))
    return out


def sampled_row(row_id: str, window: np.ndarray, draws: np.ndarray) -> SequenceTargets:
    """[n, N] draws -> unique ids + counts per position (vectorised over positions)."""
    n, draws_per_row = draws.shape
    ordered = np.sort(draws, axis=1)
    new = np.ones_like(ordered, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_new = new.ravel()
    starts = np.flatnonzero(flat_new)
    counts = np.diff(np.append(starts, ordered.size))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new.sum(axis=1), out=offsets[1:])
    return SequenceTargets(id=row_id, input_ids=window, target_start=0, sample_offsets=offsets,
                           sample_ids=ordered.ravel()[starts].astype(np.int32), sample_counts=counts.astype(np.int32))


def write(root: Path, meta: CacheMeta, rows: list[SequenceTargets]) -> int:
    with CacheWriter(str(root), meta, rows_per_shard=len(rows) + 1) as writer:
        for row in rows:
            writer.write(row)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fidelity(exact: list[SequenceTargets], decoded: list[SequenceTargets]) -> dict:
    """Max/mean |Δ log-prob| on stored entries (matched by id) and tail-bucket KL(exact||decoded)."""
    errors, kls = [], []
    for want, got in zip(exact, decoded):
        order_w, order_g = np.argsort(want.topk_ids, axis=1), np.argsort(got.topk_ids, axis=1)
        ids_w = np.take_along_axis(want.topk_ids, order_w, axis=1)
        assert (ids_w == np.take_along_axis(got.topk_ids, order_g, axis=1)).all(), "decoded id sets differ"
        lp_w = np.take_along_axis(want.topk_logprobs, order_w, axis=1).astype(np.float64)
        lp_g = np.take_along_axis(got.topk_logprobs, order_g, axis=1).astype(np.float64)
        errors.append(np.abs(lp_w - lp_g).ravel())
        p = np.concatenate([np.exp(lp_w), want.tail_mass[:, None]], axis=1)
        q = np.concatenate([np.exp(lp_g), got.tail_mass[:, None]], axis=1)
        q /= q.sum(axis=1, keepdims=True)
        mask = p > 0
        kls.append((p * (np.log(np.where(mask, p, 1)) - np.log(np.where(mask, q, 1)))).sum(axis=1))
    errors, kls = np.concatenate(errors), np.concatenate(kls)
    return {"max_abs_dlogprob": float(errors.max()), "mean_abs_dlogprob": float(errors.mean()),
            "kl_mean": float(kls.mean()), "kl_max": float(kls.max())}


def write_copies(root: Path, meta: CacheMeta, rows: list[SequenceTargets], copies: int) -> None:
    """A cache of ``copies`` x the rows (ids made unique), for the read figure."""
    with CacheWriter(str(root), meta, rows_per_shard=4 * len(rows)) as writer:
        for copy in range(copies):
            for row in rows:
                writer.write(SequenceTargets(**{**row.__dict__, "id": f"{row.id}-{copy}"}))


def read_pass(root: Path) -> tuple[int, float, float]:
    """One pass of a fresh reader: (target positions, per second, per CPU-second)."""
    reader = CacheReader(str(root))
    started, cpu_started, tokens = time.perf_counter(), time.process_time(), 0
    for row in reader.iter_sequences():
        tokens += row.num_target_rows
    return tokens, tokens / (time.perf_counter() - started), tokens / (time.process_time() - cpu_started)


def read_throughput(roots: dict[str, Path], rounds: int = 3) -> dict[str, dict]:
    """Decoded target positions/s per encoding, in interleaved rounds (the order rotated each
    round), so a slow spell of a shared machine does not land on one encoding."""
    passes: dict[str, list[tuple[int, float, float]]] = {name: [] for name in roots}
    names = list(roots)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            passes[name].append(read_pass(roots[name]))
    return {name: {"tokens": runs[0][0], "tokens_per_s_best": max(r[1] for r in runs),
                   "tokens_per_s_median": float(np.median([r[1] for r in runs])),
                   "tokens_per_cpu_s_median": float(np.median([r[2] for r in runs]))}
            for name, runs in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20480, help="target positions (>= 20k for the issue)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--throughput-copies", type=int, default=10, help="cache size for the read figure")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    model_dir = embedded_smollm2_dir()
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    per_row = args.length - 1
    rows_needed = -(-args.tokens // per_row)
    text, source = offline_text(min_chars=rows_needed * args.length * 6)
    token_ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
    if token_ids.size < rows_needed * args.length:
        sys.exit(f"only {token_ids.size} tokens of offline text, need {rows_needed * args.length}")
    windows = token_ids[: rows_needed * args.length].reshape(rows_needed, args.length)
    vocab = int(model.config.vocab_size)
    print(f"text: {source}\nteacher: {model_dir} (float32 forward), vocab {vocab}; "
          f"{rows_needed} sequences x {per_row} target positions = {rows_needed * per_row} tokens")
    started = time.perf_counter()
    targets = teacher_targets(model, windows, seed=0)
    print(f"teacher: {time.perf_counter() - started:.0f} s")

    base = dict(teacher="smollm2-135m", teacher_revision="", teacher_dtype="float32",
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab, data_fingerprint=source)
    fp16_zstd = sum(b for b, _ in targets["fp16_zstd"]) / sum(n for _, n in targets["fp16_zstd"])
    results = []
    work = Path(tempfile.mkdtemp(prefix="qadpipe-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)   # a few hundred MB of caches
    for k in K_VALUES:
        rows = []
        for i, window in enumerate(windows):
            lp = np.ascontiguousarray(targets["logprobs"][i][:, :k])
            rows.append(SequenceTargets(id=f"seq-{i:05d}", input_ids=window, target_start=0,
                                        topk_ids=np.ascontiguousarray(targets["ids"][i][:, :k]), topk_logprobs=lp,
                                        tail_mass=tail_mass_from_logprobs(lp)))
        for encoding in ("plain", "compact"):
            meta = CacheMeta(**base, target_kind="topk", k=k, num_samples=0, encoding=encoding)
            size = write(work / f"top{k}-{encoding}", meta, rows)
            reader = CacheReader(str(work / f"top{k}-{encoding}"))
            fid = fidelity(rows, list(reader.iter_sequences()))
            results.append({"targets": f"top-{k}", "encoding": encoding, "bytes_per_token": size / reader.num_tokens,
                            "raw_int32_fp32": 8 * k, "raw_int32_fp16": 6 * k, **fid})
    for n in N_VALUES:
        rows = [sampled_row(f"seq-{i:05d}", window, targets["draws"][n][i]) for i, window in enumerate(windows)]
        for encoding in ("plain", "compact"):
            meta = CacheMeta(**base, target_kind="sampled", k=0, num_samples=n, encoding=encoding)
            size = write(work / f"n{n}-{encoding}", meta, rows)
            reader = CacheReader(str(work / f"n{n}-{encoding}"))
            lossless = all(np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.sample_counts, b.sample_counts)
                           for a, b in zip(rows, reader.iter_sequences()))
            unique = float(np.mean([np.diff(r.sample_offsets).mean() for r in rows]))
            results.append({"targets": f"sampled N={n}", "encoding": encoding, "bytes_per_token": size / reader.num_tokens,
                            "unique_per_position": unique, "lossless": lossless})

    print(f"\nreferences: full-vocab fp16 logits {2 * vocab} B/token raw, {fp16_zstd:.0f} B/token zstd-3")
    header = f"{'targets':<14} {'encoding':<8} {'B/token':>8} {'vs i32+f32':>10} {'vs i32+f16':>10} {'vs fp16 full':>12}  fidelity"
    print(header + "\n" + "-" * (len(header) + 40))
    for r in results:
        ref32, ref16 = r.get("raw_int32_fp32"), r.get("raw_int32_fp16")
        ratio = lambda ref: f"{r['bytes_per_token'] / ref:10.3f}" if ref else f"{'-':>10}"  # noqa: E731
        if "kl_mean" in r:
            fid = (f"|Δlp| max {r['max_abs_dlogprob']:.3f} mean {r['mean_abs_dlogprob']:.4f}; "
                   f"KL mean {r['kl_mean']:.1e} max {r['kl_max']:.1e} nat/token")
        else:
            fid = f"{'lossless' if r['lossless'] else 'LOSSY'} ids+counts; {r['unique_per_position']:.1f} unique ids/position"
        print(f"{r['targets']:<14} {r['encoding']:<8} {r['bytes_per_token']:8.1f} {ratio(ref32)} {ratio(ref16)} "
              f"{r['bytes_per_token'] / (2 * vocab):12.5f}  {fid}")

    rows64 = [SequenceTargets(id=f"seq-{i:05d}", input_ids=w, target_start=0,
                              topk_ids=np.ascontiguousarray(targets["ids"][i][:, :64]),
                              topk_logprobs=np.ascontiguousarray(targets["logprobs"][i][:, :64]),
                              tail_mass=tail_mass_from_logprobs(targets["logprobs"][i][:, :64]))
              for i, w in enumerate(windows)]
    roots = {encoding: work / f"read-{encoding}" for encoding in ("compact", "plain")}
    for encoding, root in roots.items():
        write_copies(root, CacheMeta(**base, target_kind="topk", k=64, num_samples=0, encoding=encoding), rows64,
                     args.throughput_copies)
    throughput = read_throughput(roots)
    print(f"\nread throughput, top-64, {throughput['compact']['tokens']} tokens, sha256 verify on (next shard "
          f"hashed on a second thread), {DEFAULT_DECODE_THREADS} decoding threads, "
          f"{os.cpu_count()} CPUs, 3 interleaved passes each, "
          f"load average {os.getloadavg()[0]:.1f} (other processes slow this down):")
    for encoding, t in throughput.items():
        print(f"  {encoding:<8} {t['tokens_per_s_best'] / 1e6:.2f} M tokens/s best of 3 "
              f"(median {t['tokens_per_s_median'] / 1e6:.2f} M); {t['tokens_per_cpu_s_median'] / 1e6:.2f} M tokens "
              "per CPU-second of this process (less sensitive to other load)")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "vocab": vocab, "fp16_zstd_bytes_per_token": fp16_zstd,
                                         "results": results, "read_throughput": throughput}, indent=1))


if __name__ == "__main__":
    main()
