"""PTQ error table on SmolLM2's real weights: what each preset costs before any QAD.

Per preset: the relative weight error sum ||Q(W) - W||^2 / sum ||W||^2 over the quantized
Linear layers, and the calibrated (untrained) student's KL(teacher || student), top-1
agreement and perplexity on real text.  The teacher is the same SmolLM2 unquantized; both run
in fp32 so the figures measure quantization alone.  This KL is the gap QAD must close.

Text (offline, deterministic): the package descriptions in the ``*.dist-info/METADATA`` files
of the venv's site-packages (READMEs of torch, transformers, ... -- English prose, markdown and
code), concatenated in sorted order and cut into windows; the first ``--calib`` windows
calibrate static input ranges, the next ``--windows`` are scored.

    .venv/bin/python bench/quant_error.py
"""

from __future__ import annotations

import argparse
import copy
import site
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadpipe.config import build_config  # noqa: E402
from qadpipe.errors import ConfigError, QuantError  # noqa: E402
from qadpipe.eval.metrics import AgreementTotals  # noqa: E402
from qadpipe.models import load_causal_lm, load_tokenizer  # noqa: E402
from qadpipe.quant.calibrate import calibrate  # noqa: E402
from qadpipe.quant.quantizers import QuantLinear  # noqa: E402
from qadpipe.quant.recipe import PRESETS, apply_recipe  # noqa: E402


def metadata_text(min_chars: int) -> tuple[str, list[str]]:
    """Package descriptions (the body after the METADATA header) until ``min_chars``."""
    roots = [Path(p) for p in site.getsitepackages()]
    files = sorted(f for root in roots for f in root.glob("*.dist-info/METADATA"))
    parts, used = [], []
    for f in files:
        header, _, body = f.read_text(errors="replace").partition("\n\n")
        if len(body) < 2000:
            continue
        parts.append(body)
        used.append(f.parent.name)
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts), used


def windows(tokenizer, text: str, count: int, length: int) -> list[torch.Tensor]:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise SystemExit(f"only {ids.numel()} tokens of text, need {count * length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def freeze_weights(model: torch.nn.Module) -> float:
    """Fake-quantize every weight once (the weights never change here, so each forward would
    recompute the same Q(W)); returns the relative weight MSE of those Q(W)."""
    err = ref = 0.0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            w = module.weight.detach().float()
            w_q = module.fake_quantized_weight()
            module.weight_quantizer.forward = lambda weight, w_q=w_q: w_q
            err += float(((w_q.float() - w) ** 2).sum())
            ref += float((w ** 2).sum())
    return err / ref


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--group-size", type=int, default=64, help="for group-128 presets (576 = 9 x 64)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    text, used = metadata_text(4 * (args.windows + args.calib) * args.length * 2)
    chunks = windows(tokenizer, text, args.calib + args.windows, args.length)
    mask = torch.ones(1, args.length, dtype=torch.long)
    calib = [{"input_ids": c[None], "attention_mask": mask} for c in chunks[:args.calib]]
    scored = chunks[args.calib:]
    teacher = load_causal_lm("smollm2-135m", dtype="float32")
    teacher_logits = [teacher(input_ids=c[None]).logits for c in scored]

    def score(model: torch.nn.Module) -> dict[str, float]:
        totals = AgreementTotals()
        for c, t_logits in zip(scored, teacher_logits):
            logits = model(input_ids=c[None]).logits
            totals.update(t_logits[0, :-1], logits[0, :-1], c[1:])
        return totals.result()

    teacher_row = score(teacher)
    rows = []
    for preset in args.presets:
        start = time.perf_counter()
        student = copy.deepcopy(teacher)
        # w4a8_fp8 keeps its 128: vLLM's kernel takes no other group (and SmolLM2's 576 is no multiple)
        configurable = PRESETS[preset].weight.group_size == 128 and not PRESETS[preset].weight.fp8_group_scales
        group = args.group_size if configurable else PRESETS[preset].weight.group_size
        try:
            quant = build_config({"quant": {"preset": preset, "group_size": args.group_size if configurable else None,
                                            "calibration_batches": args.calib}}).quant
            apply_recipe(student, quant)
        except (ConfigError, QuantError) as exc:
            print(f"{preset}: skipped ({exc})", file=sys.stderr, flush=True)
            continue
        mse = freeze_weights(student)
        calibrate(student, calib, args.calib)
        result = score(student)
        rows.append((preset, group, mse, result))
        print(f"{preset}: rel. weight MSE {mse:.2e}, KL {result['kl']:.4f} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
        del student

    print(f"\nSmolLM2-135M-Instruct, fp32, PTQ (calibrated, untrained) vs the unquantized teacher; "
          f"{args.windows} x {args.length} tokens scored, {args.calib} calibration windows; text = "
          f"package descriptions from {len(used)} METADATA files ({', '.join(used[:4])}, ...)\n")
    print(f"teacher perplexity on this text: {teacher_row['ppl']:.2f}\n")
    print("| preset | group | rel. weight MSE | KL(teacher‖student) nats/token | top-1 agreement | student ppl |")
    print("|---|---|---|---|---|---|")
    for preset, group, mse, r in rows:
        print(f"| {preset} | {group or '-'} | {mse:.2e} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['ppl']:.2f} |")


if __name__ == "__main__":
    main()
